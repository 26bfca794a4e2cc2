"""main.py as a user runs it: one-line errors for bad input, tiny pretrain -> sample, quickstart and
evaluate runs."""

import glob
import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from helpers import REPO_ROOT
from helpers import TINY_UNET
from helpers import assert_user_error
from helpers import run_main
from mmd_keras import adapters
from mmd_keras import checkpoints
from mmd_keras import ddim
from mmd_keras import evaluation as evaluate
from mmd_keras import provenance
from mmd_keras import schedule as schedule_lib
from mmd_keras import unet as unet_lib
from mmd_keras.app import quickstart as quickstart_app
from mmd_keras.app import runs
from mmd_keras.errors import ParameterError


@pytest.mark.slow
@pytest.mark.parametrize("args, flag", [
    (["--mode=pretrain", "--dataset=foo"], "--dataset"),
    (["--mode=pretrain", "--image_size=30", "--ch=32", "--ch_mult=1,2,2"], "--image_size"),
    (["--mode=sample", "--num_steps=0"], "--num_steps"),
    (["--mode=sample", "--num_steps=2000"], "--num_steps"),
])
def test_bad_flags_give_one_line_errors(tmp_path, args, flag):
  result = run_main(f"--workdir={tmp_path}", *args)
  assert_user_error(result, flag)
  assert not glob.glob(str(tmp_path / "*" / "checkpoints"))


@pytest.mark.slow
def test_missing_data_files_say_how_to_install(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  result = run_main(f"--workdir={tmp_path / 'run'}", "--mode=pretrain", f"--data_dir={empty}",
                    *TINY_UNET)
  assert_user_error(result, "--data_dir")
  assert "apt-get install -y dataset-fashion-mnist" in result.stderr


@pytest.mark.slow
def test_unknown_mode_is_refused_by_absl(tmp_path):
  result = run_main(f"--workdir={tmp_path}", "--mode=foo")
  assert result.returncode != 0
  assert "--mode" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_pretrain_then_sample(tmp_path):
  workdir = str(tmp_path / "run")
  common = [f"--workdir={workdir}", "--dataset=fashion_mnist", *TINY_UNET]
  pretrain = ["--mode=pretrain", "--batch_size=8", "--checkpoint_every=2", "--log_every=2",
              "--init_checkpoint="]
  first = run_main(*common, *pretrain, "--train_steps=4")
  assert first.returncode == 0, first.stderr
  assert glob.glob(os.path.join(workdir, "pretrain", "checkpoints", "ckpt-4.index"))
  assert glob.glob(os.path.join(workdir, "pretrain", "samples", "step_0000004.png"))
  with open(os.path.join(workdir, "pretrain", "flags.cfg")) as f:
    saved = f.read().splitlines()
  assert "--ch=32" in saved and "--train_steps=4" in saved
  with open(os.path.join(workdir, "pretrain", "settings.json")) as f:
    record = json.load(f)
  assert record["mode"] == "pretrain" and record["settings"]["pretrain.steps"] == 4

  # A second run with more steps resumes from the checkpoint instead of starting over; its
  # record keeps the first run's under "before".
  resumed = run_main(*common, *pretrain, "--train_steps=6")
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from" in resumed.stderr and "at step 4" in resumed.stderr
  assert glob.glob(os.path.join(workdir, "pretrain", "checkpoints", "ckpt-6.index"))
  with open(os.path.join(workdir, "pretrain", "settings.json")) as f:
    again = json.load(f)
  assert again["settings"]["pretrain.steps"] == 6 and again["before"] == record
  assert [n for n in os.listdir(os.path.join(workdir, "pretrain")) if n.endswith(".cfg")] == [
      "flags.cfg"]

  sample = run_main(*common, "--mode=sample", "--num_images=5", "--num_steps=3",
                    "--sample_batch_size=4")
  assert sample.returncode == 0, sample.stderr
  [npz] = glob.glob(os.path.join(workdir, "sample", "*.npz"))
  [png] = glob.glob(os.path.join(workdir, "sample", "*.png"))
  images = np.load(npz)["images"]
  assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
  assert tf.io.decode_png(tf.io.read_file(png)).shape[-1] == 1
  assert os.path.isfile(os.path.join(workdir, "sample", "flags.cfg"))
  assert os.path.isfile(os.path.join(workdir, "sample", "settings.json"))


# The evaluation's checks, run through main.py's parser and error handler in this process. The
# flagfile's data and bundled models are real: each mistake is the only one.
QUICKSTART_CFG = ["--flagfile=configs/fashion_mnist.cfg"]
QUICKSTART_RUN = "finetune_dpm_solver_pp_k5"  # Where the flagfile's finetune at K=5 goes.


def _error_in_process(main_module, capsys, args):
  """The one `error:` line of main.py run with `args` (exit code 2)."""
  with pytest.raises(SystemExit) as exit_info:
    main_module._run_main(main_module._parse_flags(["main.py", *args]))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


@pytest.mark.parametrize("args, names", [
    (["--mode=evaluate", "--num_eval_images=10001"],
     ["--num_eval_images=10001", "10000 images", "--eval_split=test"]),
    (["--mode=evaluate", "--eval_split=train", "--num_eval_images=60001"],
     ["--num_eval_images=60001", "60000 images"]),
    (["--mode=quickstart", "--quickstart_eval_images=10001"],
     ["--quickstart_eval_images=10001", "10000 images"]),
    (["--mode=evaluate", "--eval_steps=5,10,5"], ["--eval_steps", "K=5 more than once"]),
    (["--mode=quickstart", "--eval_reuse_rows=pretrained/fashion_mnist/rows,/no/such/rows"],
     ["--eval_reuse_rows", "'/no/such/rows' is not a directory"]),
    (["--mode=evaluate", "--eval_reuse_rows=pretrained/fashion_mnist/unet_ema.weights.h5"],
     ["--eval_reuse_rows", "unet_ema.weights.h5' is not a directory"]),
    (["--mode=evaluate", "--finetuned_checkpoints=5:pretrained/fashion_mnist/unet_ema.weights.h5,"
      "5:pretrained/fashion_mnist/classifier.weights.h5"],
     ["--finetuned_checkpoints", "K=5 twice", "unet_ema.weights.h5", "classifier.weights.h5"]),
])
def test_evaluation_flags_checked_before_any_work(main_module, capsys, monkeypatch, tmp_path,
                                                  args, names):
  monkeypatch.chdir(REPO_ROOT)  # The flagfile's paths are relative to the repository.
  line = _error_in_process(main_module, capsys, [
      *QUICKSTART_CFG, f"--workdir={tmp_path}", f"--export_dir={tmp_path}/export", *args])
  for name in names:
    assert name in line, line
  assert os.listdir(tmp_path) == []  # Refused before the finetune (or sweep) wrote anything.


def test_quickstart_refuses_a_finetune_whose_settings_were_not_recorded(main_module, capsys,
                                                                      monkeypatch, tmp_path):
  monkeypatch.chdir(REPO_ROOT)
  (tmp_path / QUICKSTART_RUN).mkdir()
  (tmp_path / QUICKSTART_RUN / "unet.weights.h5").write_bytes(b"written by --mode=finetune")
  line = _error_in_process(main_module, capsys, [
      *QUICKSTART_CFG, f"--workdir={tmp_path}", f"--export_dir={tmp_path}/export",
      "--mode=quickstart"])
  assert f"--workdir={tmp_path}" in line and "settings were not recorded" in line
  assert os.listdir(tmp_path) == [QUICKSTART_RUN]
  assert os.listdir(tmp_path / QUICKSTART_RUN) == ["unet.weights.h5"]


def test_quickstart_reuses_a_finetune_only_if_every_run_of_it_had_its_settings(
    main_module, monkeypatch, tmp_path):
  monkeypatch.chdir(REPO_ROOT)

  def configured(*flags):
    main_module._parse_flags(["main.py", *QUICKSTART_CFG, f"--workdir={tmp_path}", *flags])
    cfg = main_module.configuration()
    return cfg, provenance.finetune_settings(cfg, init_checkpoint=cfg.run.init_checkpoint)

  cfg, settings = configured("--mode=finetune")
  run_dir = tmp_path / QUICKSTART_RUN
  (run_dir / "checkpoints").mkdir(parents=True)
  runs.write_record(cfg, str(run_dir), decides_weights=settings)
  # Started by --mode=finetune with the quickstart's settings: the quickstart may resume it.
  quickstart_cfg, _ = configured("--mode=quickstart")
  quickstart_app.check_reuse(quickstart_cfg, settings)
  # Resumed with another learning rate: the record keeps the first run's, which differs.
  cfg, faster = configured("--mode=finetune", "--learning_rate=1e-3")
  runs.write_record(cfg, str(run_dir), decides_weights=faster)
  with open(run_dir / "settings.json") as f:
    assert json.load(f)["before"]["decides_weights"] == settings
  for wanted in (settings, faster):
    with pytest.raises(ParameterError) as caught:
      quickstart_app.check_reuse(quickstart_cfg, wanted)
    assert "--learning_rate" in caught.value.message(main_module.flag_of)


# The end-to-end runs: a tiny UNet at 28 px (the bundled classifiers' size, feature dimension
# 128), so N = 130 images is just above what a covariance needs.
E2E_UNET = ["--image_size=28", "--ch=32", "--ch_mult=1,2", "--num_res_blocks=1",
            "--attn_resolutions=", "--dropout=0", "--num_timesteps=10"]
E2E_EVAL = ["--eval_feature_nets=classifier,classifier_heldout", "--feature_net=classifier",
            "--sample_batch_size=65"]


def _e2e_unet(ch=32):
  return unet_lib.UNet(image_size=28, channels=1, ch=ch, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(), dropout=0.0).build_for_inference()


def _unet_file(path, *, seed, ch=32):
  """The weights of the UNet of E2E_UNET (with `ch`), its output layer random (zero at init:
  every sample would be alike)."""
  unet = _e2e_unet(ch)
  rng = np.random.default_rng(seed)
  unet.conv_out.kernel.assign(rng.normal(scale=0.05, size=unet.conv_out.kernel.shape))
  checkpoints.save_weights_h5(unet, str(path))
  return str(path)


def _fingerprint(path):
  """The weights fingerprint reports and exports record for a weights file of the E2E UNet."""
  unet = _e2e_unet()
  checkpoints.restore_unet(unet, path)
  return provenance.weights_sha256(unet.weights)


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _check_report(folder, *, rows, stdout):
  """report.json/.md, the plot and one grid per row in `folder`, as main.py printed them."""
  with open(os.path.join(folder, "report.json")) as f:
    report = json.load(f)
  assert [(r["model"], r["num_steps"]) for r in report["rows"]] == rows
  assert report["num_images"] == 130
  assert report["feature_spaces"] == {"classifier": "trained", "classifier_heldout": "held-out"}
  with open(os.path.join(folder, "report.md")) as f:
    table = f.read()
  assert table in stdout  # The printed table is the report's.
  for model, k in rows:
    assert f"\n| {model} | {k} |" in table
    png = os.path.join(folder, f"samples_{evaluate.label_slug(model)}_k{k}.png")
    # 100 images of 28 px in 10 columns with 1-px gaps, upscaled 2x (64 // 28).
    assert tf.io.decode_png(tf.io.read_file(png)).shape == (578, 578, 1)
  assert tf.io.decode_png(tf.io.read_file(os.path.join(folder, "fid_vs_steps.png"))).shape[0] > 0
  assert not [name for name in os.listdir(folder) if name.startswith(".tmp")]
  return report


@pytest.mark.slow
def test_finetuned_checkpoint_of_another_unet_is_one_line_error(tmp_path):
  base = _unet_file(tmp_path / "base.weights.h5", seed=0)
  other = _unet_file(tmp_path / "ch64.weights.h5", seed=1, ch=64)
  result = run_main(f"--workdir={tmp_path / 'run'}", "--mode=evaluate", f"--init_checkpoint={base}",
                    *E2E_UNET, *E2E_EVAL, "--eval_steps=2", "--num_eval_images=130",
                    f"--finetuned_checkpoints=2:{other}")
  assert_user_error(result, "--finetuned_checkpoints")
  assert "ch64.weights.h5" in result.stderr and "--ch" in result.stderr
  assert not glob.glob(str(tmp_path / "run" / "evaluate" / "report.*"))


@pytest.mark.slow
def test_evaluate_end_to_end(tmp_path):
  base = _unet_file(tmp_path / "base.weights.h5", seed=0)
  finetuned = _unet_file(tmp_path / "finetuned.weights.h5", seed=1)
  workdir = str(tmp_path / "run")
  result = run_main(f"--workdir={workdir}", "--mode=evaluate", f"--init_checkpoint={base}",
                    *E2E_UNET, *E2E_EVAL, "--eval_steps=2,3", "--num_eval_images=130",
                    f"--finetuned_checkpoints=2:{finetuned}",
                    "--eval_samplers=ddim:uniform,dpm_solver_pp:trailing")
  assert result.returncode == 0, result.stderr
  # ddim:uniform is --sampler with --timesteps: its rows are the DDIM rows.
  report = _check_report(os.path.join(workdir, "evaluate"), stdout=result.stdout,
                         rows=[("DDIM", 2), ("DDIM", 3), ("DPM-Solver++ (trailing)", 2),
                               ("DPM-Solver++ (trailing)", 3), ("MMD-DDM", 2)])
  assert [(r["sampler"], r["timesteps"]) for r in report["rows"]] == (
      [("ddim", "uniform")] * 2 + [("dpm_solver_pp", "trailing")] * 2 + [("ddim", "uniform")])
  assert "\n- best training-free at K=2: " in result.stdout
  assert [r["weights"] for r in report["rows"]] == (
      [dict(path=base, sha256=_fingerprint(base))] * 4
      + [dict(path=finetuned, sha256=_fingerprint(finetuned))])
  assert len(glob.glob(os.path.join(workdir, "reference", "*.npz"))) == 2
  assert os.path.isfile(os.path.join(workdir, "evaluate", "flags.cfg"))


@pytest.mark.slow
def test_the_flagfiles_quickstart_samples_only_mmd_ddm(main_module, monkeypatch, tmp_path):
  """The base model's rows of configs/fashion_mnist.cfg's quickstart (its sampler and the
  --eval_samplers at K=5, DDIM K=100) are all in the rows bundled with the base model
  (--eval_reuse_rows).
  A change of the code or the flagfile that changes their keys fails here, not as a quickstart
  that silently takes 15 minutes longer: rerun scripts/quickstart_rows_fashion_mnist.sh."""
  monkeypatch.chdir(REPO_ROOT)  # The flagfile's paths are relative to the repository.
  main_module._parse_flags(["main.py", *QUICKSTART_CFG, f"--workdir={tmp_path}"])
  cfg = main_module.configuration()
  assert cfg.eval.reuse_rows == ("pretrained/fashion_mnist/rows",)

  def no_sampling(*args, **kwargs):
    raise AssertionError(f"the quickstart sampled a base-model row: {kwargs}")

  monkeypatch.setattr(evaluate.sampling, "batches", no_sampling)
  spaces = quickstart_app.inputs.feature_spaces(
      cfg, num_images=cfg.eval.quickstart_images, images_field="eval.quickstart_images",
      skip_too_wide=True)
  report = quickstart_app.compare(cfg, finetuned={}, spaces=spaces,
                                  init_checkpoint=cfg.run.init_checkpoint)
  # Finetuned through DPM-Solver++: its row, the other training-free samplers at K and DDIM K=100.
  assert [(row["model"], row["num_steps"]) for row in report["rows"]] == [
      ("DPM-Solver++", 5), ("DDIM", 100), ("DDIM (uniform)", 5), ("DDIM (trailing)", 5),
      ("DPM-Solver++ (trailing)", 5)]
  assert set(report["feature_spaces"]) == {"classifier", "classifier_heldout"}
  assert glob.glob(os.path.join(tmp_path, "quickstart", "rows", "*")) == []


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
  """A finished quickstart run: (its command, workdir, export dir, result)."""
  root = tmp_path_factory.mktemp("quickstart")
  base = _unet_file(root / "base.weights.h5", seed=0)
  workdir = str(root / "run")
  export = os.path.join(workdir, "export")
  command = [f"--workdir={workdir}", f"--export_dir={export}", "--mode=quickstart",
             f"--init_checkpoint={base}", *E2E_UNET, *E2E_EVAL, "--num_steps=2",
             "--finetune_steps=2", "--batch_size=4", "--checkpoint_every=2", "--log_every=1",
             "--learning_rate=1e-4", "--quickstart_eval_images=130",
             "--eval_samplers=dpm_solver_pp:trailing"]
  return command, workdir, export, run_main(*command)


@pytest.mark.slow
def test_quickstart_end_to_end(quickstart):
  _, workdir, export, result = quickstart
  assert result.returncode == 0, result.stderr
  assert "[1/3]" in result.stdout and "[3/3]" in result.stdout
  # DDIM at K and at the reference K = min(100, T) = 10, --eval_samplers and the finetuned model
  # at K only.
  assert ("[2/3] evaluating DDIM K=2, DPM-Solver++ (trailing) K=2, MMD-DDM K=2 and DDIM K=10 "
          "on 130 images") in result.stdout
  report = _check_report(os.path.join(workdir, "quickstart"), stdout=result.stdout,
                         rows=[("DDIM", 2), ("DDIM", 10), ("DPM-Solver++ (trailing)", 2),
                               ("MMD-DDM", 2)])
  assert "\n- best training-free at K=2: " in result.stdout
  weights = os.path.join(workdir, "finetune_k2", "unet.weights.h5")
  assert report["rows"][3]["weights"] == dict(path=weights, sha256=_fingerprint(weights))
  # The run's one record beside its weights: its flags as a flagfile, every setting, and those
  # deciding the weights, which its report row carries (what merges seeds).
  run_dir = os.path.join(workdir, "finetune_k2")
  assert sorted(n for n in os.listdir(run_dir) if n.endswith((".cfg", ".json"))) == [
      "flags.cfg", "settings.json"]
  with open(os.path.join(run_dir, "settings.json")) as f:
    record = json.load(f)
  assert record["mode"] == "quickstart" and record["flagfile"] == "flags.cfg"
  assert record["settings"]["finetune.learning_rate"] == 1e-4
  with open(os.path.join(run_dir, "flags.cfg")) as f:
    assert "--learning_rate=0.0001" in f.read().split("\n")
  settings = record["decides_weights"]
  assert (settings["run.seed"], settings["finetune.learning_rate"]) == (0, 1e-4)
  assert report["rows"][3]["finetune"] == settings
  assert not any("finetune" in row for row in report["rows"][:3])
  assert os.path.exists(os.path.join(export, "mmd_ddm", "1", "saved_model.pb"))
  # The export records the fingerprint of the same weights.
  with open(os.path.join(export, "mmd_ddm", "1", "assets", "sampler.json")) as f:
    assert json.load(f)["weights_sha256"] == _fingerprint(weights)
  # The quickstart names its TFLite after the version it belongs to.
  assert os.path.exists(os.path.join(export, "mmd_ddm_k2_v1.tflite"))


@pytest.mark.slow
def test_quickstart_rerun_reuses_only_its_own_finetune(quickstart):
  command, workdir, export, first = quickstart
  assert first.returncode == 0, first.stderr
  with open(os.path.join(workdir, "quickstart", "report.json")) as f:
    rows = json.load(f)["rows"]
  # The same command again reuses the finetune, the scored rows and the export of these weights.
  again = run_main(*command)
  assert again.returncode == 0, again.stderr
  assert "already finetuned" in again.stderr and again.stderr.count("reusing") == 4
  assert "reusing SavedModel" in again.stdout
  with open(os.path.join(workdir, "quickstart", "report.json")) as f:
    assert json.load(f)["rows"] == rows
  assert sorted(os.listdir(os.path.join(export, "mmd_ddm"))) == ["1"]

  # Another learning rate would reuse a finetune it did not make: refused before any work.
  weights = os.path.join(workdir, "finetune_k2", "unet.weights.h5")
  before = _sha256(weights), sorted(os.listdir(os.path.join(workdir, "quickstart")))
  changed = run_main(*command, "--learning_rate=2e-4")
  assert_user_error(changed, "--learning_rate")
  assert "--workdir" in changed.stderr and "0.0001 then, 0.0002 now" in changed.stderr
  assert (_sha256(weights), sorted(os.listdir(os.path.join(workdir, "quickstart")))) == before
  assert sorted(os.listdir(os.path.join(export, "mmd_ddm"))) == ["1"]


@pytest.mark.slow
def test_quickstart_with_learned_timesteps_evaluates_and_exports_at_them(tmp_path):
  base = _unet_file(tmp_path / "base.weights.h5", seed=0)
  workdir = str(tmp_path / "run")
  export = os.path.join(workdir, "export")
  result = run_main(f"--workdir={workdir}", f"--export_dir={export}", "--mode=quickstart",
                    f"--init_checkpoint={base}", *E2E_UNET, *E2E_EVAL, "--num_steps=2",
                    "--finetune_steps=2", "--batch_size=4", "--checkpoint_every=2",
                    "--log_every=1", "--learning_rate=1e-4", "--quickstart_eval_images=130",
                    "--eval_samplers=", "--learn_timesteps", "--timesteps_lr=0.1")
  assert result.returncode == 0, result.stderr
  weights = os.path.join(workdir, "finetune_k2", "unet.weights.h5")
  with open(checkpoints.timesteps_path(weights)) as f:
    learned = json.load(f)["timesteps"]
  # Started at the uniform spacing of T=10, K=2 (0 and 5; 0 moves inside (0, 9)), then learned.
  assert len(learned) == 2 and learned != [0.5, 5.0] and 0 < learned[0] < learned[1] < 9
  assert f"finetuned at the learned timesteps {learned[0]:.2f},{learned[1]:.2f}" in result.stdout
  with open(os.path.join(workdir, "quickstart", "report.json")) as f:
    rows = {row["model"]: row for row in json.load(f)["rows"] if row["num_steps"] == 2}
  assert rows["MMD-DDM"]["timesteps"] == learned and rows["DDIM"]["timesteps"] == "uniform"
  assert "- MMD-DDM K=2 samples at its learned timesteps" in result.stdout
  with open(os.path.join(export, "mmd_ddm", "1", "assets", "sampler.json")) as f:
    assert json.load(f)["timesteps"] == learned


@pytest.mark.slow
def test_quickstart_with_adapters_ships_them_alone_and_exports_them_merged(tmp_path):
  """--lora_rank: the finetune writes its adapters alone, the report scores them on the base model
  and the export (adapters merged into the kernels) samples what the adapters do at run time."""
  base = _unet_file(tmp_path / "base.weights.h5", seed=0)
  workdir, export = str(tmp_path / "run"), str(tmp_path / "export")
  result = run_main(f"--workdir={workdir}", f"--export_dir={export}", "--mode=quickstart",
                    f"--init_checkpoint={base}", *E2E_UNET, *E2E_EVAL, "--num_steps=2",
                    "--finetune_steps=2", "--batch_size=4", "--checkpoint_every=2",
                    "--log_every=1", "--learning_rate=1e-2", "--quickstart_eval_images=130",
                    "--lora_rank=2", "--lora_targets=up")
  assert result.returncode == 0, result.stderr
  run_dir = os.path.join(workdir, "finetune_k2_lora2_up")
  product = os.path.join(run_dir, "unet.adapters.npz")
  assert [n for n in os.listdir(run_dir) if n.startswith("unet")] == ["unet.adapters.npz"]
  assert f"finetuned adapters: {product}" in result.stdout
  with open(os.path.join(workdir, "quickstart", "report.json")) as f:
    rows = json.load(f)["rows"]
  assert rows[-1]["model"] == "MMD-DDM" and rows[-1]["weights"]["path"] == product
  meta, _ = adapters.read(product)
  assert (meta["rank"], meta["targets"]) == (2, "up")

  adapted = _e2e_unet()
  checkpoints.restore_unet(adapted, base)
  adapters.load(adapted, product)  # Adapters at run time: x W + x (α/r) A B.
  noise = np.random.default_rng(3).standard_normal((6, 28, 28, 1)).astype(np.float32)
  schedule = schedule_lib.NoiseSchedule.linear(num_timesteps=10)
  want = ddim.to_uint8(ddim.sample(lambda x, t: adapted(x, t), tf.constant(noise),
                                   timesteps=schedule.timesteps(2),
                                   alphas_cumprod=schedule.alphas_cumprod)).numpy()
  served = tf.saved_model.load(os.path.join(export, "mmd_ddm", "1"))
  got = served.signatures["from_noise"](noise=tf.constant(noise))["images"].numpy()
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
  plain = _e2e_unet()
  checkpoints.restore_unet(plain, base)
  assert not np.array_equal(want, ddim.to_uint8(ddim.sample(
      lambda x, t: plain(x, t), tf.constant(noise), timesteps=schedule.timesteps(2),
      alphas_cumprod=schedule.alphas_cumprod)).numpy())  # The adapters changed the model.
