"""Step-budget evaluation: report contents, shared noise across models, atomic outputs, bad input."""

import glob
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from scipy import linalg

from mmd_keras import checkpoints
from mmd_keras import evaluation as evaluate
from mmd_keras import samplers
from mmd_keras import schedule as schedule_lib
from mmd_keras import unet as unet_lib
from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError
from mmd_keras.export import sampler_module


class PixelFeatures:
  """A fixed 'feature network': 8 random projections of the flattened image (independent of code)."""

  def __init__(self, *, image_size, seed=0, dim=8):
    rng = np.random.default_rng(seed)
    self.matrix = rng.normal(size=(image_size * image_size, dim)).astype(np.float32)
    self.dim = dim
    self.calls = 0

  @property
  def weights(self):
    return [self.matrix]

  def __call__(self, images):
    self.calls += 1
    flat = np.asarray(images, np.float32).reshape(len(images), -1)
    return flat @ self.matrix


def scipy_fid(ref, fake):
  """FID from NumPy's own mean/cov and SciPy's sqrtm: independent of metrics.StreamingStats."""
  mu1, mu2 = ref.mean(0), fake.mean(0)
  s1, s2 = np.cov(ref, rowvar=False), np.cov(fake, rowvar=False)
  return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)


def _tiny_unet(seed):
  unet = unet_lib.UNet(image_size=8, channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(), dropout=0.0).build_for_inference()
  rng = np.random.default_rng(seed)
  # conv_out starts at zero; random values make the model's output depend on its weights.
  unet.conv_out.kernel.assign(rng.normal(scale=0.05, size=unet.conv_out.kernel.shape))
  return unet


@pytest.fixture(scope="module")
def setup():
  schedule = schedule_lib.NoiseSchedule.linear(num_timesteps=100)
  real = np.clip(np.random.default_rng(1).normal(size=(40, 8, 8, 1)) * 0.5, -1, 1)
  return schedule, real.astype(np.float32)


def _spaces(image_size):
  return [evaluate.FeatureSpace("train_space", PixelFeatures(image_size=image_size, seed=0), True),
          evaluate.FeatureSpace("heldout", PixelFeatures(image_size=image_size, seed=1), False)]


def test_report_rows_files_and_shared_noise(setup, tmp_path):
  schedule, real = setup
  unet = _tiny_unet(0)
  # The same weights under two labels must score identically: both see the same noise.
  models = [evaluate.ModelSpec("DDIM", unet, (2, 5)), evaluate.ModelSpec("MMD-DDM", unet, (2,))]
  report = evaluate.run(models=models, feature_spaces=_spaces(8), real_images=real,
                        schedule=schedule, num_images=20, seed=3, out_dir=str(tmp_path),
                        clip_x0=True, batch_size=8, cache_dir=str(tmp_path / "reference"))
  assert [(r["model"], r["num_steps"]) for r in report["rows"]] == [
      ("DDIM", 2), ("DDIM", 5), ("MMD-DDM", 2)]
  assert report["sampler"] == "ddim"
  assert report["rows"][0]["spaces"] == report["rows"][2]["spaces"]
  assert report["rows"][0]["spaces"]["heldout"]["fid"] != report["rows"][1]["spaces"]["heldout"][
      "fid"]
  for name in ("report.json", "report.md", "fid_vs_steps.png", "samples_ddim_k2.png",
               "samples_ddim_k5.png", "samples_mmd_ddm_k2.png"):
    assert (tmp_path / name).exists(), name
  assert len(glob.glob(str(tmp_path / "reference" / "real_heldout_20_*.npz"))) == 1
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
  on_disk = json.loads((tmp_path / "report.json").read_text())
  assert on_disk["feature_spaces"] == {"train_space": "trained", "heldout": "held-out"}
  assert (on_disk["sample_batch_size"], on_disk["clip_x0"], on_disk["schedule"]) == (
      8, True, dict(num_timesteps=100, beta_start=1e-4, beta_end=0.02))
  table = (tmp_path / "report.md").read_text()
  assert table.count("\n| DDIM |") == 2 and table.count("\n| MMD-DDM |") == 1


def test_scores_match_independent_computation(setup, tmp_path):
  schedule, real = setup
  unet = _tiny_unet(1)
  spaces = _spaces(8)
  report = evaluate.run(models=[evaluate.ModelSpec("DDIM", unet, (3,))], feature_spaces=spaces,
                        real_images=real, schedule=schedule, num_images=20, seed=5,
                        out_dir=str(tmp_path), clip_x0=True, batch_size=8)
  images = evaluate.sampling.generate(unet, num_images=20, num_steps=3, schedule=schedule,
                                      clip_x0=True, seed=5, batch_size=8)
  fake = spaces[1].network(images).astype(np.float64)
  ref = spaces[1].network(real[:20]).astype(np.float64)
  assert report["rows"][0]["spaces"]["heldout"]["fid"] == pytest.approx(scipy_fid(ref, fake),
                                                                         rel=1e-4)


def test_interrupted_run_leaves_no_report(setup, tmp_path):
  schedule, real = setup

  class Failing(PixelFeatures):

    def __call__(self, images):
      if self.calls >= 2:  # The real set and the first model pass; the second model fails.
        raise RuntimeError("boom")
      return super().__call__(images)

  spaces = [evaluate.FeatureSpace("f", Failing(image_size=8), True)]
  with pytest.raises(RuntimeError):
    evaluate.run(models=[evaluate.ModelSpec("DDIM", _tiny_unet(0), (2, 3))],
                 feature_spaces=spaces, real_images=real, schedule=schedule, num_images=20,
                 seed=0, out_dir=str(tmp_path), clip_x0=True, batch_size=20)
  assert not (tmp_path / "report.json").exists()
  assert not (tmp_path / "report.md").exists()


def test_too_few_images_for_covariance(setup, tmp_path):
  schedule, real = setup
  with pytest.raises(UserError, match="^num_images=6 .*8-d"):
    evaluate.run(models=[evaluate.ModelSpec("DDIM", _tiny_unet(0), (2,))],
                 feature_spaces=_spaces(8), real_images=real, schedule=schedule, num_images=6,
                 seed=0, out_dir=str(tmp_path))
  with pytest.raises(UserError, match="^num_images=100 exceeds"):
    evaluate.run(models=[], feature_spaces=_spaces(8), real_images=real, schedule=schedule,
                 num_images=100, seed=0, out_dir=str(tmp_path))


def test_cached_reference_features_are_reused(setup, tmp_path):
  _, real = setup
  space = _spaces(8)[0]
  kwargs = dict(num_images=40, batch_size=16,
                digests={space.name: evaluate.feature_cache_key(space)}, cache_dir=str(tmp_path))
  first = evaluate.reference_features([space], real, **kwargs)[space.name]
  calls = space.network.calls
  second = evaluate.reference_features([space], real, **kwargs)[space.name]
  assert space.network.calls == calls
  np.testing.assert_allclose(first, second, rtol=1e-6)
  # Embedded in batches of 16 vs all 40 at once: oneDNN may pick other float32 kernels per batch
  # size (seen on AVX-512 CPUs: 1e-6 absolute differences).
  np.testing.assert_allclose(first, space.network(real), rtol=1e-5, atol=1e-5)


def test_another_feature_network_recomputes_features_and_rows(setup, tmp_path, monkeypatch):
  schedule, real = setup
  unet = _tiny_unet(7)
  spaces = _spaces(8)
  common = dict(models=[evaluate.ModelSpec("DDIM", unet, (2,))], feature_spaces=spaces,
                real_images=real, schedule=schedule, num_images=16, seed=1, clip_x0=True,
                batch_size=8, out_dir=str(tmp_path / "evaluate"),
                cache_dir=str(tmp_path / "reference"))
  evaluate.run(**common)
  sampled = _record_sampling(monkeypatch)
  calls = [space.network.calls for space in spaces]
  evaluate.run(**common)
  assert sampled == [] and [space.network.calls for space in spaces] == calls

  # A retrained held-out classifier: the same name, shapes and dimension, other weights.
  spaces[1].network.matrix = np.random.default_rng(9).normal(size=(64, 8)).astype(np.float32)
  report = evaluate.run(**common)
  assert sampled == [2]
  # The trained space embedded the 2 batches of samples only; the held-out one the real set too.
  assert spaces[0].network.calls == calls[0] + 2 and spaces[1].network.calls == calls[1] + 4
  images = evaluate.sampling.generate(unet, num_images=16, num_steps=2, schedule=schedule,
                                      clip_x0=True, seed=1, batch_size=8)
  expected = scipy_fid(spaces[1].network(real[:16]).astype(np.float64),
                       spaces[1].network(images).astype(np.float64))
  assert report["rows"][0]["spaces"]["heldout"]["fid"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("change", [dict(seed=2), dict(eta=0.5), dict(clip_x0=False),
                                    dict(sampler="dpm_solver_pp"),
                                    dict(timestep_kind="quadratic"), dict(batch_size=16)])
def test_rows_are_keyed_by_every_sampler_setting(setup, tmp_path, monkeypatch, change):
  schedule, real = setup
  common = dict(models=[evaluate.ModelSpec("DDIM", _tiny_unet(7), (2,))], feature_spaces=_spaces(8),
                real_images=real, schedule=schedule, num_images=16, seed=1, clip_x0=True,
                batch_size=8, out_dir=str(tmp_path / "evaluate"))
  evaluate.run(**common)
  sampled = _record_sampling(monkeypatch)
  evaluate.run(**common)
  assert sampled == []
  evaluate.run(**dict(common, **change))
  assert sampled == [2]


def test_feature_cache_key_of_a_saved_model_follows_its_variables(tmp_path):

  class Projection(tf.Module):

    def __init__(self, value):
      super().__init__()
      self.w = tf.Variable(tf.fill([3, 2], value))

    @tf.function(input_signature=[tf.TensorSpec([None, 3])])
    def serve(self, x):
      return x @ self.w

  class Network:
    dim = 2

    def __init__(self, value, name):
      module = Projection(value)
      tf.saved_model.save(module, str(tmp_path / name))
      self.model = tf.saved_model.load(str(tmp_path / name))

  digest = lambda network, settings="": evaluate.feature_cache_key(
      evaluate.FeatureSpace("inception_v3", network, True, settings))
  assert digest(Network(1.0, "a")) == digest(Network(1.0, "b"))
  assert digest(Network(1.0, "a")) != digest(Network(2.0, "c"))
  assert digest(Network(1.0, "a"), "299 px") != digest(Network(1.0, "a"), "150 px")


def _record_sampling(monkeypatch):
  """The K of every (model, K) sampled from now on."""
  sampled = []
  batches = evaluate.sampling.batches

  def recording(*args, **kwargs):
    sampled.append(kwargs["num_steps"])
    return batches(*args, **kwargs)

  monkeypatch.setattr(evaluate.sampling, "batches", recording)
  return sampled


def test_merged_reports_equal_one_run_over_all_models(setup, tmp_path, main_module, capsys):
  schedule, real = setup
  base, finetuned = _tiny_unet(2), _tiny_unet(3)
  common = dict(feature_spaces=_spaces(8), real_images=real, schedule=schedule, num_images=16,
                seed=4, clip_x0=True, batch_size=8)
  run = lambda models, name: evaluate.run(models=models, out_dir=str(tmp_path / name), **common)
  sweep = run([evaluate.ModelSpec("DDIM", base, (2, 5))], "sweep")
  later = run([evaluate.ModelSpec("DDIM", base, (2,)),
               evaluate.ModelSpec("MMD-DDM", finetuned, (2,))], "later")
  together = run([evaluate.ModelSpec("DDIM", base, (2, 5)),
                  evaluate.ModelSpec("MMD-DDM", finetuned, (2,))], "together")
  merged = evaluate.merge_reports([sweep, later], str(tmp_path / "merged"))
  strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
  assert strip(merged["rows"]) == strip(together["rows"])
  assert json.loads((tmp_path / "merged" / "report.json").read_text()) == merged
  assert (tmp_path / "merged" / "report.md").read_text() == evaluate.markdown_table(merged)

  # The same through main.py: a directory or a report.json per entry, into <workdir>/merged.
  main_module._run_main(main_module._parse_flags([
      "main.py", "--mode=merge_reports", f"--workdir={tmp_path / 'cli'}",
      f"--reports={tmp_path / 'sweep'},{tmp_path / 'later' / 'report.json'}"]))
  assert json.loads((tmp_path / "cli" / "merged" / "report.json").read_text()) == merged
  assert evaluate.markdown_table(merged) in capsys.readouterr().out
  for reports, message in ((f"{tmp_path / 'sweep'}", "--reports=.* at least two reports"),
                           (f"{tmp_path / 'sweep'},{tmp_path}", f"--reports={tmp_path} entry "
                                                                 f"holds no report.json")):
    main_module.FLAGS.unparse_flags()
    with pytest.raises(SystemExit):
      main_module._run_main(main_module._parse_flags([
          "main.py", "--mode=merge_reports", f"--workdir={tmp_path / 'bad_cli'}",
          f"--reports={reports}"]))
    assert re.search(f"^error: {message}", capsys.readouterr().err), message
  assert not (tmp_path / "bad_cli").exists()

  with pytest.raises(UserError, match="num_images"):
    evaluate.merge_reports([sweep, dict(later, num_images=17)], str(tmp_path / "bad"))
  with pytest.raises(UserError, match="sample_batch_size: 8 vs 4"):
    evaluate.merge_reports([sweep, dict(later, sample_batch_size=4)], str(tmp_path / "bad"))
  with pytest.raises(UserError, match="schedule"):
    evaluate.merge_reports(
        [sweep, dict(later, schedule=dict(later["schedule"], beta_end=0.03))],
        str(tmp_path / "bad"))
  older = {k: v for k, v in later.items() if k != "clip_x0"}  # Written before clip_x0 was kept.
  with pytest.raises(UserError, match="clip_x0"):
    evaluate.merge_reports([sweep, older], str(tmp_path / "bad"))
  with pytest.raises(UserError, match="sampler: 'dpm_solver_pp' vs 'ddim'"):
    evaluate.merge_reports([dict(sweep, sampler="dpm_solver_pp"), later], str(tmp_path / "bad"))
  with pytest.raises(UserError, match="not the same samples"):
    evaluate.merge_reports([sweep, run([evaluate.ModelSpec("DDIM", finetuned, (2,))], "other")],
                           str(tmp_path / "bad"))


def test_an_interrupted_sweep_reuses_its_finished_rows(setup, tmp_path, monkeypatch):
  schedule, real = setup
  unet = _tiny_unet(5)
  common = dict(feature_spaces=_spaces(8), real_images=real, schedule=schedule, num_images=16,
                seed=6, clip_x0=True, batch_size=8, out_dir=str(tmp_path))
  first = evaluate.run(models=[evaluate.ModelSpec("DDIM", unet, (2,))], **common)
  sampled = _record_sampling(monkeypatch)
  second = evaluate.run(models=[evaluate.ModelSpec("DDIM", unet, (2, 3))], **common)
  assert sampled == [3] and second["rows"][0] == first["rows"][0]
  # Everything that changes the samples changes the key: nothing is reused.
  changes = [dict(seed=7), dict(batch_size=4), dict(eta=0.5), dict(clip_x0=False),
             dict(timestep_kind="quadratic"),
             dict(schedule=schedule_lib.NoiseSchedule.linear(num_timesteps=100, beta_end=0.03))]
  for change in changes:
    evaluate.run(models=[evaluate.ModelSpec("DDIM", unet, (2,))], **dict(common, **change))
  assert sampled == [3] + [2] * len(changes)
  unet.conv_out.kernel.assign(unet.conv_out.kernel * 2.0)
  evaluate.run(models=[evaluate.ModelSpec("DDIM", unet, (2,))], **common)
  assert sampled == [3] + [2] * len(changes) + [2]


def _files(folder):
  """{relative path: bytes} of every file under `folder`."""
  return {str(path.relative_to(folder)): path.read_bytes()
          for path in folder.rglob("*") if path.is_file()}


def test_rows_of_another_evaluation_are_reused_read_only_under_their_key(setup, tmp_path,
                                                                          monkeypatch):
  schedule, real = setup
  unet = _tiny_unet(5)
  common = dict(feature_spaces=_spaces(8), real_images=real, schedule=schedule, num_images=16,
                seed=6, clip_x0=True, batch_size=8)
  first = evaluate.run(models=[evaluate.ModelSpec("DDIM", unet, (2, 3))],
                       out_dir=str(tmp_path / "first"), **common)
  bundled = tmp_path / "first" / "rows"
  before = _files(bundled)
  sampled = _record_sampling(monkeypatch)
  # K=2 and 3 come from the other evaluation's rows, K=4 is sampled into this run's own rows/.
  second = evaluate.run(models=[evaluate.ModelSpec("DDIM", unet, (2, 3, 4))],
                        out_dir=str(tmp_path / "second"), reuse_dirs=[str(bundled)], **common)
  assert sampled == [4]
  assert second["rows"][:2] == first["rows"]
  assert _files(bundled) == before
  assert [os.path.basename(p).split("_")[1] for p in os.listdir(tmp_path / "second" / "rows")
          if p.endswith(".json")] == ["k4"]
  # The grids of reused rows are the run's grids too.
  assert ((tmp_path / "second" / "samples_ddim_k2.png").read_bytes()
          == (tmp_path / "first" / "samples_ddim_k2.png").read_bytes())
  # Another seed is another key: nothing of the other evaluation fits.
  evaluate.run(models=[evaluate.ModelSpec("DDIM", unet, (2,))], out_dir=str(tmp_path / "third"),
               reuse_dirs=[str(bundled)], **dict(common, seed=7))
  assert sampled == [4, 2]


class NoisyPixelFeatures(PixelFeatures):
  """PixelFeatures as another CPU computes them: the same weights, outputs off by ~1e-5."""

  def __call__(self, images):
    out = super().__call__(images)
    return out * (1 + 1e-5 * np.random.default_rng(self.calls).standard_normal(out.shape))


def test_rows_travel_between_machines_but_not_between_inputs(setup, tmp_path, monkeypatch):
  """A row's key holds what decides it, never a float computed on the machine: rows sampled where
  the reference features round differently are still reused; other weights, another real set or
  another feature network are not."""
  schedule, real = setup
  unet = _tiny_unet(5)
  common = dict(real_images=real, schedule=schedule, num_images=16, seed=6, clip_x0=True,
                batch_size=8, models=[evaluate.ModelSpec("DDIM", unet, (2,))])
  evaluate.run(feature_spaces=_spaces(8), out_dir=str(tmp_path / "here"), **common)
  bundled = str(tmp_path / "here" / "rows")
  sampled = _record_sampling(monkeypatch)
  elsewhere = [evaluate.FeatureSpace("train_space", NoisyPixelFeatures(image_size=8, seed=0), True),
               evaluate.FeatureSpace("heldout", NoisyPixelFeatures(image_size=8, seed=1), False)]
  evaluate.run(feature_spaces=elsewhere, out_dir=str(tmp_path / "there"), reuse_dirs=[bundled],
               **common)
  assert sampled == []
  other_net = [evaluate.FeatureSpace("train_space", PixelFeatures(image_size=8, seed=0), True),
               evaluate.FeatureSpace("heldout", PixelFeatures(image_size=8, seed=2), False)]
  evaluate.run(feature_spaces=other_net, out_dir=str(tmp_path / "net"), reuse_dirs=[bundled],
               **common)
  evaluate.run(feature_spaces=_spaces(8), out_dir=str(tmp_path / "real"), reuse_dirs=[bundled],
               real_set="other_real", **common)
  assert sampled == [2, 2]
  unet.conv_out.kernel.assign(unet.conv_out.kernel * 2.0)
  evaluate.run(feature_spaces=_spaces(8), out_dir=str(tmp_path / "weights"), reuse_dirs=[bundled],
               **common)
  assert sampled == [2, 2, 2]


def _top_level_files(folder):
  """{name: bytes} of the files directly in `folder` (not rows/)."""
  return {name: (folder / name).read_bytes() for name in os.listdir(folder)
          if (folder / name).is_file()}


def test_an_interrupted_run_leaves_the_earlier_grids_and_report(setup, tmp_path):
  schedule, real = setup

  class FailingSecondRow(PixelFeatures):
    fail = False

    def __call__(self, images):
      # Call 1 embeds the real set, call 2 the first row's samples.
      if self.fail and self.calls >= 2:
        raise RuntimeError("interrupted")
      return super().__call__(images)

  network = FailingSecondRow(image_size=8)
  common = dict(models=[evaluate.ModelSpec("DDIM", _tiny_unet(0), (2, 3))],
                feature_spaces=[evaluate.FeatureSpace("f", network, True)], real_images=real,
                schedule=schedule, num_images=20, clip_x0=True, batch_size=20,
                out_dir=str(tmp_path))
  evaluate.run(seed=0, **common)
  earlier = _top_level_files(tmp_path)
  assert {"samples_ddim_k2.png", "samples_ddim_k3.png", "report.json"} <= set(earlier)

  network.calls, network.fail = 0, True
  with pytest.raises(RuntimeError, match="interrupted"):
    evaluate.run(seed=1, **common)
  # The first row's grid of seed 1 exists (in rows/), but the run's outputs were not touched.
  assert len(glob.glob(str(tmp_path / "rows" / "ddim_k2_*.png"))) == 2
  assert _top_level_files(tmp_path) == earlier

  network.fail = False
  evaluate.run(seed=1, **common)
  later = _top_level_files(tmp_path)
  assert later["samples_ddim_k2.png"] != earlier["samples_ddim_k2.png"]
  assert json.loads(later["report.json"])["seed"] == 1


def test_samples_and_real_images_are_embedded_batch_by_batch(setup, tmp_path, monkeypatch):
  schedule, real = setup
  events = []

  class Recording(PixelFeatures):

    def __call__(self, images):
      events.append(("embed", len(images)))
      return super().__call__(images)

  def real_batches():
    for i in range(0, len(real), 8):
      events.append(("real", len(real[i:i + 8])))
      yield real[i:i + 8]

  batches = evaluate.sampling.batches

  def sampled_batches(*args, **kwargs):
    for images in batches(*args, **kwargs):
      events.append(("sample", len(images)))
      yield images

  monkeypatch.setattr(evaluate.sampling, "batches", sampled_batches)
  common = dict(models=[evaluate.ModelSpec("DDIM", _tiny_unet(4), (2,))],
                feature_spaces=[evaluate.FeatureSpace("f", Recording(image_size=8), True)],
                real_images=real_batches, schedule=schedule, num_images=20, seed=2,
                clip_x0=True, batch_size=8, cache_dir=str(tmp_path / "reference"))
  report = evaluate.run(out_dir=str(tmp_path / "a"), **common)
  # Each batch is embedded before the next one is read or drawn; 20 images take 8 + 8 + 4.
  assert events == [("real", 8), ("embed", 8), ("real", 8), ("embed", 8), ("real", 8),
                    ("embed", 4), ("sample", 8), ("embed", 8), ("sample", 8), ("embed", 8),
                    ("sample", 4), ("embed", 4)]
  assert report["rows"][0]["num_images"] == 20
  # With the real features cached, the real images are not read again.
  events.clear()
  evaluate.run(out_dir=str(tmp_path / "b"), **common)
  assert [kind for kind, _ in events] == ["sample", "embed"] * 3

  too_few = dict(common, real_images=lambda: iter([real[:8]]), cache_dir=None)
  with pytest.raises(UserError, match="^num_images=20 exceeds the 8 real images"):
    evaluate.run(out_dir=str(tmp_path / "c"), **too_few)


def test_rows_name_the_weights_file_and_the_fingerprint_the_export_records(setup, tmp_path):
  schedule, real = setup
  path = str(tmp_path / "unet.weights.h5")
  checkpoints.save_weights_h5(_tiny_unet(6), path)
  # Two UNets of other initial values, each loaded from the file as main.py loads them.
  evaluated, exported = _tiny_unet(7), _tiny_unet(8)
  checkpoints.restore_unet(evaluated, path)
  checkpoints.restore_unet(exported, path)
  report = evaluate.run(models=[evaluate.ModelSpec("MMD-DDM", evaluated, (2,), path=path)],
                        feature_spaces=_spaces(8), real_images=real, schedule=schedule,
                        num_images=16, seed=0, out_dir=str(tmp_path / "evaluate"), batch_size=8)
  metadata = sampler_module.Sampler.from_schedule(exported, schedule=schedule,
                                                  num_steps=2).metadata()
  assert report["rows"][0]["weights"] == dict(path=path, sha256=metadata["weights_sha256"])


def _record_batches(monkeypatch):
  """[((sampler, spacing, K), [image batches])] of every row sampled from now on."""
  sampled = []
  batches = evaluate.sampling.batches

  def recording(*args, **kwargs):
    images = []
    sampled.append(((kwargs["sampler"], kwargs["timestep_kind"], kwargs["num_steps"]), images))
    for batch in batches(*args, **kwargs):
      images.append(batch)
      yield batch

  monkeypatch.setattr(evaluate.sampling, "batches", recording)
  return sampled


def test_rows_of_other_samplers_share_the_noise(setup, tmp_path, monkeypatch):
  schedule, real = setup
  unet = _tiny_unet(8)
  sampled = _record_batches(monkeypatch)
  models = [
      evaluate.ModelSpec("DDIM", unet, (2, 3)),
      evaluate.ModelSpec("DDIM (uniform)", unet, (2,), sampler="ddim", timesteps="uniform"),
      evaluate.ModelSpec("DDIM (trailing)", unet, (2,), sampler="ddim", timesteps="trailing"),
      evaluate.ModelSpec("DPM-Solver++ (trailing)", unet, (3,), sampler="dpm_solver_pp",
                         timesteps="trailing")]
  report = evaluate.run(models=models, feature_spaces=_spaces(8), real_images=real,
                        schedule=schedule, num_images=20, seed=3, out_dir=str(tmp_path),
                        clip_x0=True, batch_size=8)
  assert [(r["model"], r["num_steps"], r["sampler"], r["timesteps"]) for r in report["rows"]] == [
      ("DDIM", 2, "ddim", "uniform"), ("DDIM", 3, "ddim", "uniform"),
      ("DDIM (uniform)", 2, "ddim", "uniform"), ("DDIM (trailing)", 2, "ddim", "trailing"),
      ("DPM-Solver++ (trailing)", 3, "dpm_solver_pp", "trailing")]
  rows = {(r["model"], r["num_steps"]): r for r in report["rows"]}
  # The run's sampler and spacing under another label: the same noise, so the same samples.
  assert rows["DDIM (uniform)", 2]["spaces"] == rows["DDIM", 2]["spaces"]
  assert rows["DDIM (trailing)", 2]["spaces"] != rows["DDIM", 2]["spaces"]
  # The DPM-Solver++ row scores samplers.sample from each batch's noise.
  [batches] = [images for settings, images in sampled if settings[0] == "dpm_solver_pp"]
  for i, images in enumerate(batches):
    noise = evaluate.sampling.initial_noise(seed=3, batch_index=i, batch_size=8,
                                            image_shape=(8, 8, 1))[:len(images)]
    expected = samplers.sample("dpm_solver_pp", lambda x, t: unet(x, t), noise,
                               timesteps=schedule.timesteps(3, "trailing"),
                               alphas_cumprod=schedule.alphas_cumprod, clip_x0=True)
    np.testing.assert_allclose(images, np.clip(expected, -1.0, 1.0), atol=1e-5)
  for name in ("samples_ddim_uniform_k2.png", "samples_ddim_trailing_k2.png",
               "samples_dpm_solver++_trailing_k3.png"):
    assert (tmp_path / name).exists(), name
  assert json.loads((tmp_path / "report.json").read_text())["rows"] == report["rows"]


def test_rows_of_other_samplers_are_cached_apart(setup, tmp_path, monkeypatch):
  schedule, real = setup
  unet = _tiny_unet(9)
  common = dict(feature_spaces=_spaces(8), real_images=real, schedule=schedule, num_images=16,
                seed=1, clip_x0=True, batch_size=8, out_dir=str(tmp_path))
  ddim = evaluate.ModelSpec("DDIM", unet, (2,))
  others = [evaluate.ModelSpec("DDIM (trailing)", unet, (2,), sampler="ddim", timesteps="trailing"),
            evaluate.ModelSpec("DPM-Solver++ (uniform)", unet, (2,), sampler="dpm_solver_pp",
                               timesteps="uniform")]
  first = evaluate.run(models=[ddim], **common)
  sampled = _record_batches(monkeypatch)
  second = evaluate.run(models=[ddim, *others], **common)
  # The cached DDIM-uniform row stands for the DDIM row only.
  assert [settings for settings, _ in sampled] == [("ddim", "trailing", 2),
                                                   ("dpm_solver_pp", "uniform", 2)]
  assert second["rows"][0] == first["rows"][0]
  assert len({json.dumps(row["spaces"]) for row in second["rows"]}) == 3
  third = evaluate.run(models=[ddim, *others], **common)
  assert len(sampled) == 2 and third["rows"] == second["rows"]


def test_a_row_is_found_by_its_key_under_another_label(setup, tmp_path, monkeypatch):
  schedule, real = setup
  unet = _tiny_unet(9)
  common = dict(feature_spaces=_spaces(8), real_images=real, schedule=schedule, num_images=16,
                seed=1, clip_x0=True, batch_size=8, out_dir=str(tmp_path))
  # DPM-Solver++ over uniform timesteps as an --eval_samplers row, then as the run's own sampler.
  extra = evaluate.run(models=[evaluate.ModelSpec("DPM-Solver++ (uniform)", unet, (2,),
                                                  sampler="dpm_solver_pp", timesteps="uniform")],
                       **common)
  sampled = _record_batches(monkeypatch)
  own = evaluate.run(models=[evaluate.ModelSpec("DPM-Solver++", unet, (2,))],
                     **dict(common, sampler="dpm_solver_pp"))
  assert sampled == []
  assert own["rows"][0] == dict(extra["rows"][0], model="DPM-Solver++")
  assert os.path.exists(tmp_path / "samples_dpm_solver++_k2.png")
  # Trailing timesteps are other samples: sampled.
  evaluate.run(models=[evaluate.ModelSpec("DPM-Solver++", unet, (2,))],
               **dict(common, sampler="dpm_solver_pp", timestep_kind="trailing"))
  assert [settings for settings, _ in sampled] == [("dpm_solver_pp", "trailing", 2)]


def _row(model, k, fids, **settings):
  """A report row with the FID `fids[space]` in each space (its other figures fixed), sampled by
  DDIM at uniform timesteps unless `settings` say otherwise."""
  spaces = {name: dict(fid=fid, kid=1e-3, kid_std=1e-4, recall=0.5, coverage=0.5)
            for name, fid in fids.items()}
  return dict(dict(sampler="ddim", timesteps="uniform"), model=model, num_steps=k, num_images=16,
              spaces=spaces, **settings)


def _report(rows):
  # The trained space second: it is found by its kind, not its place.
  return dict(num_images=16, seed=0, sampler="ddim", timesteps="uniform", eta=0.0, clip_x0=False,
              sample_batch_size=8, feature_spaces={"heldout": "held-out", "tr": "trained"},
              rows=rows)


def test_table_names_the_best_training_free_row_at_each_finetuned_k():
  report = _report([_row("DDIM", 5, dict(tr=60.0, heldout=10.0)),
                    _row("DDIM", 10, dict(tr=30.0, heldout=9.0)),
                    _row("DDIM (trailing)", 5, dict(tr=40.0, heldout=30.0)),
                    _row("DPM-Solver++ (trailing)", 5, dict(tr=45.0, heldout=5.0)),
                    _row("MMD-DDM", 5, dict(tr=20.0, heldout=8.0))])
  assert {k: row["model"] for k, row in evaluate.best_training_free(report).items()} == {
      5: "DDIM (trailing)"}
  assert evaluate.markdown_table(report).endswith(
      " |\n\n- best training-free at K=5: DDIM (trailing), FID 40.00 in tr (trained); "
      "MMD-DDM K=5: 20.00\n")
  # Without an MMD-DDM row, or without a trained space, the table is all.
  for other in (_report(report["rows"][:4]),
                dict(report, feature_spaces={"heldout": "held-out", "tr": "held-out"})):
    assert evaluate.best_training_free(other) == {}
    assert evaluate.markdown_table(other).endswith(" |\n")


def test_merge_keeps_the_rows_of_other_samplers(tmp_path):
  fids = dict(tr=50.0, heldout=10.0)
  sweep = _report([_row("DDIM", 5, fids), _row("DDIM", 10, fids)])
  newer = _report([_row("DDIM", 5, fids, sampler="ddim", timesteps="uniform"),
                   _row("DPM-Solver++ (trailing)", 5, dict(tr=30.0, heldout=9.0),
                        sampler="dpm_solver_pp", timesteps="trailing"),
                   _row("MMD-DDM", 5, dict(tr=20.0, heldout=8.0), sampler="ddim",
                        timesteps="uniform")])
  merged = evaluate.merge_reports([sweep, newer], str(tmp_path))
  assert [(r["model"], r["num_steps"], r["sampler"], r["timesteps"]) for r in merged["rows"]] == [
      ("DDIM", 5, "ddim", "uniform"), ("DDIM", 10, "ddim", "uniform"),
      ("DPM-Solver++ (trailing)", 5, "dpm_solver_pp", "trailing"),
      ("MMD-DDM", 5, "ddim", "uniform")]
  assert "best training-free at K=5: DPM-Solver++ (trailing), FID 30.00" in (
      tmp_path / "report.md").read_text()


def _seed_row(seed, fids, sha, **settings):
  """An MMD-DDM K=5 row of weights `sha` finetuned with `seed` and `settings`."""
  finetune = {"run.seed": seed, "finetune.learning_rate": 1e-5, **settings}
  return _row("MMD-DDM", 5, fids, weights=dict(path=f"seed{seed}/unet.weights.h5", sha256=sha),
              finetune=finetune)


def test_merge_averages_the_seeds_of_one_finetune_setting(tmp_path):
  ddim = _row("DDIM", 5, dict(tr=60.0, heldout=12.0), weights=dict(path="base", sha256="b"))
  fids = {0: dict(tr=20.0, heldout=8.0), 1: dict(tr=26.0, heldout=9.5),
          2: dict(tr=23.0, heldout=7.0)}
  reports = [_report([ddim, _seed_row(seed, fids[seed], f"w{seed}")]) for seed in (2, 0, 1)]
  merged = evaluate.merge_reports(reports, str(tmp_path))
  ddim_row, seeds_row = merged["rows"]
  assert ddim_row == ddim
  for space in ("tr", "heldout"):
    values = np.array([fids[seed][space] for seed in (0, 1, 2)])
    assert seeds_row["spaces"][space]["fid"] == pytest.approx(values.mean())
    assert seeds_row["seed_std"][space]["fid"] == pytest.approx(values.std(ddof=1))
  assert seeds_row["seed_std"]["tr"]["recall"] == 0.0
  assert [s["seed"] for s in seeds_row["seeds"]] == [0, 1, 2]
  assert [s["weights"]["sha256"] for s in seeds_row["seeds"]] == ["w0", "w1", "w2"]
  assert seeds_row["median_seed"] == 2  # Trained-space FIDs 20, 26, 23.
  assert seeds_row["finetune"] == {"finetune.learning_rate": 1e-5}
  assert "weights" not in seeds_row
  table = (tmp_path / "report.md").read_text()
  assert "| MMD-DDM (3 seeds) | 5 | 8.17 ± 1.26 |" in table
  assert "- rows over seeds: mean ± standard deviation" in table
  assert "MMD-DDM K=5: 23.00" in table  # The best training-free line compares the mean.
  assert seeds_row["timesteps"] == "uniform"
  # Timesteps learned by each seed stay with it.
  learned = [_report([dict(_seed_row(seed, fids[seed], f"w{seed}"), timesteps=[seed + 0.5, 9.5])])
             for seed in (0, 1)]
  per_seed = evaluate.merge_reports(learned, str(tmp_path / "learned"))["rows"][0]
  assert per_seed["timesteps"] == "learned per seed"
  assert [s["timesteps"] for s in per_seed["seeds"]] == [[0.5, 9.5], [1.5, 9.5]]
  # The same seed's report twice is one seed: its rows agree.
  again = evaluate.merge_reports(reports + reports[:1], str(tmp_path / "again"))
  assert again["rows"] == merged["rows"]


def test_merge_refuses_seeds_that_differ_in_more_than_the_seed(tmp_path):
  fids = dict(tr=20.0, heldout=8.0)
  base = _report([_seed_row(0, fids, "w0")])
  other_lr = _report([_seed_row(1, dict(tr=21.0, heldout=8.0), "w1",
                                **{"finetune.learning_rate": 2e-5})])
  with pytest.raises(ParameterError) as e:
    evaluate.merge_reports([base, other_lr], str(tmp_path / "lr"))
  assert e.value.message(lambda name: f"--{name.split('.')[-1]}") == (
      "MMD-DDM K=5: the finetunes of seed0/unet.weights.h5 and seed1/unet.weights.h5 differ in "
      "--learning_rate (1e-05 vs 2e-05); only finetunes that differ in --seed alone merge as seeds")
  same_seed = _report([_seed_row(0, dict(tr=21.0, heldout=8.0), "w1")])
  with pytest.raises(ParameterError, match="both finetuned with run.seed=0 yet differ"):
    evaluate.merge_reports([base, same_seed], str(tmp_path / "seed"))
  # Different weights without a record of their finetunes (older code, copied weights).
  unrecorded = _report([{k: v for k, v in _seed_row(1, dict(tr=21.0, heldout=8.0), "w1").items()
                         if k != "finetune"}])
  with pytest.raises(UserError, match="not the same samples"):
    evaluate.merge_reports([base, unrecorded], str(tmp_path / "unrecorded"))
  merged = evaluate.merge_reports([base, _report([_seed_row(1, fids, "w1")])], str(tmp_path / "m"))
  with pytest.raises(UserError, match="already a mean over seeds"):
    evaluate.merge_reports([merged, base], str(tmp_path / "twice"))
  assert not any((tmp_path / name).exists() for name in ("lr", "seed", "unrecorded", "twice"))


def test_a_model_with_learned_timesteps_is_sampled_and_reported_at_them(setup, tmp_path):
  schedule, real = setup
  unet = _tiny_unet(0)
  learned = np.array([12.5, 60.25])
  models = [evaluate.ModelSpec("DDIM", unet, (2,)),
            evaluate.ModelSpec(evaluate.FINETUNED, unet, (2,), timesteps=learned)]
  report = evaluate.run(models=models, feature_spaces=_spaces(8), real_images=real,
                        schedule=schedule, num_images=20, seed=3, out_dir=str(tmp_path),
                        batch_size=8)
  rows = json.loads((tmp_path / "report.json").read_text())["rows"]
  assert rows[0]["timesteps"] == "uniform" and rows[1]["timesteps"] == [12.5, 60.25]
  # The same weights at other timesteps: other samples.
  assert rows[0]["spaces"]["heldout"]["fid"] != rows[1]["spaces"]["heldout"]["fid"]
  assert evaluate.learned_timesteps(report["rows"][0]) is None
  assert "- MMD-DDM K=2 samples at its learned timesteps 12.50,60.25" in (
      tmp_path / "report.md").read_text()
