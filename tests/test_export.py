"""mmd_keras/export: the serving SavedModel and TFLite files against the in-process `ddim.sample`
(and `dpm_solver.sample` for a DPM-Solver++ export).

Parity is only meaningful on a UNet whose outputs are not trivial and not exploding: an untrained
UNet has zero output convolutions (ε̂ = 0) and its x̂0 at t ≈ T divides by sqrt(ᾱ_T) ≈ 0.006. So the
tiny UNet here gets N(0, 0.1²) random weights everywhere and the sampler clips x̂0 (clip_x0=True).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from helpers import REPO_ROOT
from helpers import randomize_weights, tiny_unet
from mmd_keras import ddim
from mmd_keras import dpm_solver
from mmd_keras import provenance
from mmd_keras import schedule as schedule_lib
from mmd_keras.app import export as export_app
from mmd_keras.export import sampler_module, writers
from mmd_keras.errors import UserError

NUM_STEPS = 2
MAX_IMAGES = 4
IMAGE_SHAPE = (8, 8, 1)
SCHEDULE = schedule_lib.NoiseSchedule.linear()
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _sampler(unet, **kwargs):
  return sampler_module.Sampler.from_schedule(unet, schedule=SCHEDULE, num_steps=NUM_STEPS,
                                              clip_x0=True, max_images=MAX_IMAGES, **kwargs)


@pytest.fixture(scope="module")
def unet():
  return randomize_weights(tiny_unet(attn_resolutions=(4,)), seed=1)


@pytest.fixture(scope="module")
def exported(unet, tmp_path_factory):
  root = tmp_path_factory.mktemp("exports")
  sampler = _sampler(unet)
  saved = writers.write_saved_model(sampler, export_dir=str(root), model_name="mmd_ddm", version=1)
  tflite = {float16: writers.write_tflite(sampler, writers.tflite_path(
      export_dir=str(root), model_name="mmd_ddm", num_steps=NUM_STEPS, float16=float16),
      float16=float16) for float16 in (False, True)}
  return dict(root=root, saved=saved, tflite=tflite)


@pytest.fixture(scope="module")
def loaded(exported):
  return tf.saved_model.load(exported["saved"])


def _reference(unet, noise, seed=None, eta=0.0):
  """The in-process sampler: `ddim.sample` on the Keras UNet, then `ddim.to_uint8`."""
  x_0 = ddim.sample(lambda x, t: unet(x, t), tf.constant(noise),
                    timesteps=SCHEDULE.timesteps(NUM_STEPS), alphas_cumprod=SCHEDULE.alphas_cumprod,
                    eta=eta, clip_x0=True, seed=seed)
  return ddim.to_uint8(x_0).numpy()


def _noise(batch, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, *IMAGE_SHAPE)).astype(np.float32)


def _max_abs_diff(a, b):
  return int(np.max(np.abs(a.astype(np.int32) - b.astype(np.int32))))


def test_layout_and_saved_settings(exported, loaded):
  assert exported["saved"] == os.path.join(exported["root"], "mmd_ddm", "1")
  assert sorted(os.listdir(exported["root"] / "mmd_ddm")) == ["1"]  # No staging leftovers.
  assert os.path.exists(os.path.join(exported["saved"], "saved_model.pb"))
  with open(os.path.join(exported["saved"], "assets", "sampler.json")) as f:
    meta = json.load(f)
  expected_timesteps = [0, 500]  # i·⌊1000/2⌋
  assert meta["num_steps"] == NUM_STEPS and meta["timesteps"] == expected_timesteps
  assert meta["image_shape"] == list(IMAGE_SHAPE) and meta["eta"] == 0.0 and meta["clip_x0"]
  assert int(loaded.num_steps) == NUM_STEPS
  assert loaded.timesteps.numpy().tolist() == expected_timesteps
  assert loaded.image_shape.numpy().tolist() == list(IMAGE_SHAPE)
  assert float(loaded.eta) == 0.0 and bool(loaded.clip_x0) and int(loaded.max_images) == MAX_IMAGES


def test_from_noise_equals_the_in_process_sampler(unet, loaded):
  noise = _noise(3)
  out = loaded.signatures["from_noise"](noise=tf.constant(noise))
  assert out["images"].dtype == tf.uint8 and out["images"].shape == (3, *IMAGE_SHAPE)
  reference = _reference(unet, noise)
  assert reference.std() > 5  # Non-trivial images, or parity would prove nothing.
  assert _max_abs_diff(out["images"].numpy(), reference) <= 1
  images_float = out["images_float"].numpy()
  assert images_float.min() >= -1.0 and images_float.max() <= 1.0
  assert _max_abs_diff(ddim.to_uint8(images_float).numpy(), reference) <= 1


def test_serving_default_is_deterministic_per_seed(unet, loaded):
  serve = loaded.signatures["serving_default"]
  first = serve(seed=tf.constant(3, tf.int64), num_images=tf.constant(2))["images"].numpy()
  again = serve(seed=tf.constant(3, tf.int64), num_images=tf.constant(2))["images"].numpy()
  other = serve(seed=tf.constant(4, tf.int64), num_images=tf.constant(2))["images"].numpy()
  np.testing.assert_array_equal(first, again)
  assert np.any(first != other)
  # x_T is stateless_normal(seed=(seed, 0)), written out here independently of the module.
  x_T = tf.random.stateless_normal([2, *IMAGE_SHAPE], seed=tf.constant([3, 0], tf.int64)).numpy()
  assert _max_abs_diff(first, _reference(unet, x_T)) <= 1
  # The README's way to reproduce served images from the noise.
  np.testing.assert_array_equal(
      first, loaded.signatures["from_noise"](noise=tf.constant(x_T))["images"].numpy())


def test_eta_noise_comes_from_the_seed(unet):
  sampler = _sampler(unet, eta=0.5)
  seed = tf.constant(7, tf.int64)
  first = sampler.serving_default(seed, tf.constant(2))["images"].numpy()
  np.testing.assert_array_equal(first, sampler.serving_default(seed, tf.constant(2))["images"])
  x_T = tf.random.stateless_normal([2, *IMAGE_SHAPE], seed=tf.constant([7, 0], tf.int64)).numpy()
  expected = _reference(unet, x_T, seed=tf.constant([7, 1], tf.int64), eta=0.5)
  assert _max_abs_diff(first, expected) <= 1
  assert _max_abs_diff(first, _reference(unet, x_T)) > 1  # η really adds noise.


@pytest.fixture(scope="module")
def eta_sampler(unet, tmp_path_factory):
  """An η = 0.5 sampler, in process and saved then loaded."""
  sampler = _sampler(unet, eta=0.5)
  path = writers.write_saved_model(sampler, export_dir=str(tmp_path_factory.mktemp("eta")),
                                   model_name="m", version=1)
  return sampler, tf.saved_model.load(path)


def test_eta_saved_model_round_trip(unet, eta_sampler):
  sampler, loaded = eta_sampler
  assert float(loaded.eta) == 0.5
  serve = lambda seed: loaded.signatures["serving_default"](
      seed=tf.constant(seed, tf.int64), num_images=tf.constant(3))["images"].numpy()
  first = serve(7)
  np.testing.assert_array_equal(first, serve(7))
  assert np.any(first != serve(8))
  in_process = sampler.serving_default(tf.constant(7, tf.int64), tf.constant(3))["images"].numpy()
  np.testing.assert_array_equal(first, in_process)
  x_T = tf.random.stateless_normal([3, *IMAGE_SHAPE], seed=tf.constant([7, 0], tf.int64)).numpy()
  expected = _reference(unet, x_T, seed=tf.constant([7, 1], tf.int64), eta=0.5)
  assert _max_abs_diff(first, expected) <= 1
  # from_noise draws its step noise from seed 0.
  noise = _noise(2, seed=4)
  images = loaded.signatures["from_noise"](noise=tf.constant(noise))["images"].numpy()
  np.testing.assert_array_equal(
      images, loaded.signatures["from_noise"](noise=tf.constant(noise))["images"].numpy())
  assert _max_abs_diff(images, _reference(unet, noise, seed=tf.constant([0, 1], tf.int64),
                                          eta=0.5)) <= 1
  assert _max_abs_diff(images, _reference(unet, noise)) > 1  # η really adds noise.


def test_dpm_solver_pp_export_records_its_sampler_and_serves_dpm_solver_sample(unet, tmp_path):
  # K = 3: the middle step is second order. (Trailing would start at t = 999, where the random
  # UNet's x̂0 saturates every pixel.)
  sampler = sampler_module.Sampler.from_schedule(
      unet, schedule=SCHEDULE, num_steps=3, sampler="dpm_solver_pp", clip_x0=True,
      max_images=MAX_IMAGES)
  path = writers.write_saved_model(sampler, export_dir=str(tmp_path), model_name="m", version=1)
  timesteps = SCHEDULE.timesteps(3)
  with open(os.path.join(path, "assets", "sampler.json")) as f:
    meta = json.load(f)
  assert meta["sampler"] == "dpm_solver_pp" and meta["timesteps"] == list(timesteps)
  assert writers.same_model(meta, sampler.metadata())
  loaded = tf.saved_model.load(path)
  assert loaded.sampler.numpy() == b"dpm_solver_pp"
  noise = _noise(3, seed=2)
  out = loaded.signatures["from_noise"](noise=tf.constant(noise))
  x_0 = dpm_solver.sample(lambda x, t: unet(x, t), tf.constant(noise), timesteps=timesteps,
                          alphas_cumprod=SCHEDULE.alphas_cumprod, clip_x0=True)
  reference = ddim.to_uint8(x_0).numpy()
  assert reference.std() > 5  # Non-trivial images, or parity would prove nothing.
  np.testing.assert_allclose(out["images_float"], np.clip(x_0, -1.0, 1.0), atol=1e-5)
  assert _max_abs_diff(out["images"].numpy(), reference) <= 1
  ddim_x_0 = ddim.sample(lambda x, t: unet(x, t), tf.constant(noise), timesteps=timesteps,
                         alphas_cumprod=SCHEDULE.alphas_cumprod, clip_x0=True)
  assert np.abs(out["images_float"] - np.clip(ddim_x_0, -1.0, 1.0)).max() > 1e-2  # Not DDIM.


def test_a_record_without_a_sampler_is_a_ddim_export(unet):
  metadata = _sampler(unet).metadata()
  assert metadata["sampler"] == "ddim"
  older = {key: value for key, value in metadata.items() if key != "sampler"}
  assert writers.same_model(older, metadata)
  dpm = sampler_module.Sampler.from_schedule(unet, schedule=SCHEDULE, num_steps=NUM_STEPS,
                                             sampler="dpm_solver_pp", clip_x0=True,
                                             max_images=MAX_IMAGES).metadata()
  assert not writers.same_model(older, dpm)


@pytest.mark.parametrize("num_images", [0, -1, MAX_IMAGES + 1])
def test_num_images_out_of_range_is_rejected_in_the_graph(loaded, num_images):
  with pytest.raises(tf.errors.InvalidArgumentError, match=rf"num_images must be in \[1, {MAX_IMAGES}\]"):
    loaded.signatures["serving_default"](seed=tf.constant(0, tf.int64),
                                         num_images=tf.constant(num_images))


@pytest.mark.parametrize("shape", [(8, 8, 1), (2, 8, 8, 3), (2, 4, 8, 1), (1, 2, 8, 8, 1),
                                   (0, 8, 8, 1), (MAX_IMAGES + 1, 8, 8, 1)])
def test_bad_noise_is_rejected_in_the_graph(loaded, shape):
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"noise must be float32 \[N, 8, 8, 1\]"):
    loaded.signatures["from_noise"](noise=tf.zeros(shape))


def test_noise_dtype_is_enforced_by_the_signature(loaded):
  # Not one of the graph's checks: the signature's float32 input refuses a double before it runs.
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="expected to be a float tensor but is a double tensor"):
    loaded.signatures["from_noise"](noise=tf.zeros([1, *IMAGE_SHAPE], tf.float64))


def test_each_signature_is_traced_once_for_any_batch(unet):
  sampler = _sampler(unet)
  for batch in (1, 3):
    sampler.from_noise(tf.constant(_noise(batch)))
    sampler.serving_default(tf.constant(batch, tf.int64), tf.constant(batch))
  assert sampler.from_noise.experimental_get_tracing_count() == 1
  assert sampler.serving_default.experimental_get_tracing_count() == 1


def test_the_k_step_sampler_is_traced_once_for_both_signatures_and_tflite(unet):
  sampler = _sampler(unet)
  sampler.from_noise(tf.constant(_noise(2)))
  sampler.serving_default(tf.constant(0, tf.int64), tf.constant(3))
  sampler.tflite_function()
  assert sampler._sample_traced.experimental_get_tracing_count() == 1


def _conv_ops(sampler):
  # The signatures call the K-step sampler's one traced function.
  graph = sampler._sample_traced.get_concrete_function().graph
  return sum(op.type == "Conv2D" for op in graph.get_operations())


def test_the_k_steps_unroll_into_one_graph(unet):
  # K UNet forwards in the one traced graph: twice the convolutions of K = 1 at K = 2.
  one_step = _conv_ops(sampler_module.Sampler.from_schedule(unet, schedule=SCHEDULE, num_steps=1))
  assert one_step >= len([w for w in unet.weights if len(w.shape) == 4])  # Every conv kernel.
  assert _conv_ops(_sampler(unet)) == NUM_STEPS * one_step


def _run_tflite(path, noise):
  interpreter = Interpreter(model_path=path, num_threads=1)
  index = interpreter.get_input_details()[0]["index"]
  interpreter.resize_tensor_input(index, noise.shape)
  interpreter.allocate_tensors()
  interpreter.set_tensor(index, noise)
  interpreter.invoke()
  return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def test_tflite_float32_equals_the_in_process_sampler_at_any_batch(unet, exported):
  path = exported["tflite"][False]
  assert os.path.basename(path) == f"mmd_ddm_k{NUM_STEPS}.tflite"
  for batch in (1, 3):
    noise = _noise(batch, seed=batch)
    images = _run_tflite(path, noise)
    assert images.dtype == np.uint8 and images.shape == (batch, *IMAGE_SHAPE)
    assert _max_abs_diff(images, _reference(unet, noise)) <= 1


def test_tflite_uses_builtin_ops_only(exported):
  for path in exported["tflite"].values():
    ops = {op["op_name"] for op in Interpreter(model_path=path)._get_ops_details()}  # pylint: disable=protected-access
    assert not any(op.startswith("Flex") for op in ops), ops
    # The UNet's upsampling is a broadcast and a reshape (unet.upsample_nearest_2x).
    assert {"CONV_2D", "BATCH_MATMUL", "BROADCAST_TO", "RESHAPE"} <= ops, ops


def test_tflite_float16_weights_stay_close(unet, exported):
  path = exported["tflite"][True]
  assert os.path.getsize(path) < 0.7 * os.path.getsize(exported["tflite"][False])
  noise = _noise(2, seed=5)
  diff = np.abs(_run_tflite(path, noise).astype(np.int32) - _reference(unet, noise))
  # float16 weights carry ~3 significant digits; a few grey levels of drift is that, not a bug.
  assert diff.mean() < 2.0 and diff.max() <= 16


def test_existing_version_is_not_overwritten(unet, exported, tmp_path):
  with pytest.raises(UserError, match="^overwrite is off and export version .* choose another model_version or pass overwrite"):
    writers.write_saved_model(_sampler(unet), export_dir=str(exported["root"]),
                              model_name="mmd_ddm", version=1)
  target = tmp_path / "m" / "1"
  target.mkdir(parents=True)
  (target / "old_file").write_text("old")
  sampler = sampler_module.Sampler.from_schedule(unet, schedule=SCHEDULE, num_steps=1)
  writers.write_saved_model(sampler, export_dir=str(tmp_path), model_name="m", version=1,
                            overwrite=True)
  assert sorted(os.listdir(target.parent)) == ["1"] and not (target / "old_file").exists()
  assert int(tf.saved_model.load(str(target)).num_steps) == 1


def _failing(error):
  def fail(*args, **kwargs):
    raise error
  return fail


@pytest.mark.parametrize("step", ["converter", "rename"])
def test_failed_tflite_write_leaves_no_staging_file(unet, tmp_path, monkeypatch, step):
  path = str(tmp_path / "m_k2.tflite")
  with open(path, "wb") as f:
    f.write(b"an earlier model")
  if step == "converter":
    monkeypatch.setattr(writers, "tflite_bytes", _failing(RuntimeError("conversion failed")))
  else:  # The staging file is written whole, then the rename fails (e.g. a full or read-only disk).
    monkeypatch.setattr(writers, "tflite_bytes", lambda *args, **kwargs: b"new model" * 1000)
    monkeypatch.setattr(writers.os, "replace", _failing(OSError(28, "No space left on device")))
  with pytest.raises((RuntimeError, OSError)):
    writers.write_tflite(_sampler(unet), path)
  assert os.listdir(tmp_path) == ["m_k2.tflite"]
  with open(path, "rb") as f:
    assert f.read() == b"an earlier model"


def test_written_files_keep_the_umask_permissions(exported):
  # Not mkstemp/mkdtemp's 0600/0700: a server running as another user must read them.
  umask = os.umask(0)
  os.umask(umask)
  for path in (exported["saved"], exported["tflite"][False]):
    mode = os.stat(path).st_mode & 0o777
    expected = (0o777 if os.path.isdir(path) else 0o666) & ~umask
    assert mode == expected, (path, oct(mode))


def _run_main_in_process(main_module, *args):
  """main.py's flag parsing and error handling: (exit code, stderr's `error:` lines)."""
  with pytest.raises(SystemExit) as exit_info:
    main_module._run_main(main_module._parse_flags(["main.py", *args]))  # pylint: disable=protected-access
  return exit_info.value.code


@pytest.mark.parametrize("flag", ["--model_name=.", "--model_name=..", "--model_name=.hidden",
                                  "--model_name=a/b", "--model_name=../up", "--model_name=",
                                  "--model_name=with space", "--model_version=0",
                                  "--model_version=-3"])
def test_model_name_and_version_that_leave_the_layout_are_refused(main_module, tmp_path, capsys,
                                                                   flag):
  export_dir = tmp_path / "export"
  code = _run_main_in_process(
      main_module, "--mode=export", f"--export_dir={export_dir}", f"--workdir={tmp_path / 'run'}",
      f"--init_checkpoint={tmp_path / 'none.weights.h5'}", "--image_size=8", "--ch_mult=1,2",
      "--num_steps=2", flag)
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert code == 2 and len(errors) == 1, errors
  name, _, value = flag.partition("=")
  if name == "--model_name":
    expected = [f"error: --model_name={value} must be letters, digits, '_', '-' and '.', "
                f"starting with a letter or digit"]
  else:
    expected = [f"error: --model_version={value} must be >= 1"]
  assert all(part in errors[0] for part in expected), errors[0]
  assert os.listdir(tmp_path) == []  # Refused before anything was created.


@pytest.mark.parametrize("name", ["mmd_ddm", "fmnist-k5", "model.v2", "A1"])
def test_plain_model_names_are_accepted(name):
  writers.check_model_name(name)


def _sha256_of_files(folder):
  return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
          for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


TINY_UNET_FLAGS = ["--image_size=8", "--ch=32", "--ch_mult=1,2", "--num_res_blocks=1",
                   "--attn_resolutions=4", "--dropout=0", "--clip_x0"]


@pytest.mark.slow
def test_next_free_version_reuses_the_same_weights_and_never_replaces_another_model(
    main_module, unet, tmp_path, capsys):
  from mmd_keras import checkpoints  # pylint: disable=g-import-not-at-top
  other = randomize_weights(tiny_unet(attn_resolutions=(4,)), seed=2)
  paths = {}
  for name, model in (("a", unet), ("b", other)):
    paths[name] = str(tmp_path / f"{name}.weights.h5")
    checkpoints.save_weights_h5(model, paths[name])
  out = tmp_path / "out"
  argv = ["main.py", f"--export_dir={out}", f"--workdir={tmp_path / 'run'}", "--model_name=m",
          f"--num_steps={NUM_STEPS}", *TINY_UNET_FLAGS]
  main_module._parse_flags(argv)  # pylint: disable=protected-access
  cfg = main_module.configuration()
  export = lambda name: (export_app.run(cfg, init_checkpoint=paths[name], next_free_version=True),
                         capsys.readouterr().out)[1]

  log = export("a")
  assert sorted(os.listdir(out / "m")) == ["1"] and f"wrote TFLite {out}/m_k2_v1.tflite" in log
  files = _sha256_of_files(out)
  assert sorted(files) == ["m_k2_v1.tflite", "m_k2_v1.tflite.json"]

  log = export("a")  # The quickstart rerun on the same finetuned weights.
  assert f"reusing SavedModel {out}/m/1: exported from the same weights" in log
  assert sorted(os.listdir(out / "m")) == ["1"] and _sha256_of_files(out) == files

  # Another model's TFLite under the plain name, without a record (an older export).
  (out / "m_k2.tflite").write_bytes(b"an older model")
  files = _sha256_of_files(out)
  log = export("b")  # New weights: a new version, with its own TFLite; nothing replaced.
  assert sorted(os.listdir(out / "m")) == ["1", "2"] and "wrote SavedModel" in log
  assert f"note: {out}/m_k2.tflite holds another model (no record)" in log
  after = _sha256_of_files(out)
  assert {name: after[name] for name in files} == files
  assert sorted(set(after) - set(files)) == ["m_k2_v2.tflite", "m_k2_v2.tflite.json"]

  # Each version's files hold its own weights: images against the in-process sampler of each.
  noise = _noise(2, seed=11)
  for version, model in ((1, unet), (2, other)):
    record = json.loads((out / f"m_k2_v{version}.tflite.json").read_text())
    saved = json.loads((out / "m" / str(version) / "assets" / "sampler.json").read_text())
    assert record["saved_model_version"] == version
    assert record["weights_sha256"] == saved["weights_sha256"]
    reference = _reference(model, noise)
    assert _max_abs_diff(_run_tflite(str(out / f"m_k2_v{version}.tflite"), noise), reference) <= 1
    images = tf.saved_model.load(str(out / "m" / str(version))).signatures["from_noise"](
        noise=tf.constant(noise))["images"].numpy()
    assert _max_abs_diff(images, reference) <= 1
  assert _max_abs_diff(_reference(unet, noise), _reference(other, noise)) > 1  # Distinguishable.


@pytest.mark.slow
def test_load_example_runs_in_a_process_without_project_code(exported, tmp_path):
  script = tmp_path / "load_example.py"
  shutil.copy(REPO_ROOT / "export" / "load_example.py", script)
  check = ("import runpy, sys; sys.argv = ['load_example.py', '--model_dir', sys.argv[1], "
           "'--seed', '3', '--num_images', '3', '--out', 'grid.png']; "
           "runpy.run_path('load_example.py', run_name='__main__'); "
           "assert not {'mmd_keras', 'export', 'conftest'} & set(sys.modules), 'project code'")
  result = subprocess.run([sys.executable, "-c", check, exported["saved"]], cwd=tmp_path,
                          env=CLEAN_ENV, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  grid = tf.io.decode_png(tf.io.read_file(str(tmp_path / "grid.png"))).numpy()
  assert grid.shape == (2 * 8, 2 * 8, 1)  # 3 images on a 2×2 grid.


def _saved_model_cli(*args):
  cli = shutil.which("saved_model_cli")
  command = [cli] if cli else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
  result = subprocess.run(command + list(args), env=CLEAN_ENV, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


@pytest.mark.slow
def test_saved_model_cli_show_matches_the_documented_contract(exported):
  text = _saved_model_cli("show", "--dir", exported["saved"], "--all")
  blocks = {block.split("'")[0]: block for block in text.split("signature_def['")[1:]}
  assert {"serving_default", "from_noise"} <= set(blocks)
  serve = blocks["serving_default"]
  for name, dtype in (("seed", "DT_INT64"), ("num_images", "DT_INT32")):
    assert f"inputs['{name}'] tensor_info:\n        dtype: {dtype}\n        shape: ()" in serve
  assert "outputs['images'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, 8, 8, 1)" in serve
  from_noise = blocks["from_noise"]
  assert "inputs['noise'] tensor_info:\n        dtype: DT_FLOAT\n        shape: unknown_rank" in from_noise
  assert "outputs['images'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, 8, 8, 1)" in from_noise
  assert "outputs['images_float'] tensor_info:\n        dtype: DT_FLOAT" in from_noise
  # The README's REST body {"inputs": {"seed": 3, "num_images": 4}} names exactly these inputs.
  assert serve.count("inputs['") == 2


@pytest.mark.slow
def test_saved_model_cli_run(exported, loaded, tmp_path):
  # TF 2.21's saved_model_cli accepts only Python literals (not np.int64(3)); it casts to the
  # signature dtypes.
  text = _saved_model_cli("run", "--dir", exported["saved"], "--tag_set", "serve",
                          "--signature_def", "serving_default", "--input_exprs",
                          "seed=3;num_images=2", "--outdir", str(tmp_path))
  assert "images" in text
  images = np.load(tmp_path / "images.npy")
  assert images.dtype == np.uint8 and images.shape == (2, *IMAGE_SHAPE)
  # Another process (without project code), the same seed: the same images, bit for bit.
  in_process = loaded.signatures["serving_default"](seed=tf.constant(3, tf.int64),
                                                    num_images=tf.constant(2))["images"].numpy()
  assert in_process.std() > 5
  np.testing.assert_array_equal(images, in_process)


@pytest.mark.slow
def test_main_export_writes_the_serving_layout(unet, repo_root, tmp_path):
  from mmd_keras import checkpoints  # pylint: disable=g-import-not-at-top
  weights = str(tmp_path / "unet.weights.h5")
  checkpoints.save_weights_h5(unet, weights)
  # The record of a finetune beside the weights says what it was made for: another sampler and K.
  with open(tmp_path / "settings.json", "w") as f:
    json.dump(dict(mode="finetune", decides_weights={"sampler.num_steps": 5,
                                                     "sampler.sampler": "dpm_solver_pp"}), f)
  command = [sys.executable, "main.py", "--mode=export", f"--init_checkpoint={weights}",
             "--image_size=8", "--ch=32", "--ch_mult=1,2", "--num_res_blocks=1",
             "--attn_resolutions=4", "--num_steps=1", f"--export_dir={tmp_path / 'out'}",
             f"--workdir={tmp_path / 'run'}"]
  run = lambda *extra: subprocess.run(command + list(extra), cwd=repo_root, capture_output=True,
                                      text=True, timeout=600)
  first = run()
  assert first.returncode == 0, first.stderr[-2000:]
  assert (f"note: {weights} was finetuned for K=5 through dpm_solver_pp; this export samples it at "
          f"K=1 through ddim") in first.stdout
  assert os.path.isdir(tmp_path / "out" / "mmd_ddm" / "1" / "variables")
  assert os.path.isfile(tmp_path / "out" / "mmd_ddm_k1.tflite")
  record = writers.read_tflite_record(str(tmp_path / "out" / "mmd_ddm_k1.tflite"))
  assert record["saved_model_version"] == 1 and record["num_steps"] == 1
  assert record["weights_sha256"] == provenance.weights_sha256(unet.weights)
  second = run()
  assert second.returncode == 2 and "--overwrite" in second.stderr


@pytest.mark.slow
def test_sampler_benchmark_smoke(repo_root, tmp_path):
  json_out = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, "-m", "mmd_keras.benchmarks", "sampler", "--unet=tiny", "--num_steps=1",
       "--batch_sizes=2", "--min_seconds=0", "--tflite_threads=2", f"--json_out={json_out}"],
      cwd=repo_root, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith("# command: python -m mmd_keras.benchmarks sampler --unet=tiny")
  assert f"tensorflow: {tf.__version__}" in lines[0] and "weights: random" in lines[0]
  assert "tflite_threads: 2" in lines[0]
  variants = ["eager python loop", "tf.function", "tf.function dynamic batch",
              "tf.function(jit_compile)", "SavedModel from_noise", "TFLite float32",
              "TFLite float16"]
  assert "| K | batch | bound | " + " | ".join(variants) + " |" in lines
  row = next(line for line in lines if line.startswith("| 1 | 2 |"))
  assert len(row.split("|")) == len(variants) + 5  # K, batch, bound, the variants, the ends.
  report = json.loads(json_out.read_text())
  assert report["tflite_threads"] == 2 and report["tensorflow"] == tf.__version__
  [measured] = report["results"]
  assert measured["num_steps"] == 1 and measured["batch"] == 2
  for name in ["bound"] + variants:  # Images/s, not a "failed: ..." string.
    assert isinstance(measured[name], float) and measured[name] > 0, (name, measured[name])


@pytest.mark.slow
def test_export_of_weights_with_learned_timesteps_samples_at_them(unet, main_module, tmp_path,
                                                                  capsys):
  from mmd_keras import checkpoints  # pylint: disable=g-import-not-at-top
  from mmd_keras import samplers  # pylint: disable=g-import-not-at-top
  weights = str(tmp_path / "unet.weights.h5")
  checkpoints.save_weights_h5(unet, weights)
  learned = [12.5, 640.25]
  checkpoints.save_timesteps(weights, learned, num_timesteps=1000, sampler="dpm_solver_pp")
  main_module._run_main(main_module._parse_flags([  # pylint: disable=protected-access
      "main.py", "--mode=export", f"--init_checkpoint={weights}", "--image_size=8", "--ch=32",
      "--ch_mult=1,2", "--num_res_blocks=1", "--attn_resolutions=4", "--num_steps=2",
      "--sampler=dpm_solver_pp", "--clip_x0", f"--export_dir={tmp_path / 'out'}",
      f"--workdir={tmp_path / 'run'}"]))
  assert "learned with" in capsys.readouterr().out
  version = tmp_path / "out" / "mmd_ddm" / "1"
  with open(version / "assets" / "sampler.json") as f:
    assert json.load(f)["timesteps"] == learned
  loaded = tf.saved_model.load(str(version))
  np.testing.assert_array_equal(loaded.timesteps.numpy(), np.float32(learned))
  noise = _noise(3)
  expected = ddim.to_uint8(tf.clip_by_value(samplers.sample(
      "dpm_solver_pp", lambda x, t: unet(x, t), tf.constant(noise), timesteps=np.array(learned),
      alphas_cumprod=SCHEDULE.alphas_cumprod, clip_x0=True), -1.0, 1.0)).numpy()
  assert _max_abs_diff(loaded.from_noise(noise)["images"].numpy(), expected) <= 1
  assert _max_abs_diff(_run_tflite(str(tmp_path / "out" / "mmd_ddm_k2.tflite"), noise),
                       expected) <= 1
