"""Guarded finetuning: validation at the start and every N steps keeps the best weights (the start
counts), stops after `patience` validations without improvement, and keeps the same best across a
kill during a validation; its settings are refused where they would bias the reports."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from helpers import FINETUNER_IMAGE_SIZE as IMAGE_SIZE
from helpers import FINETUNER_SCHEDULE as SCHEDULE
from helpers import RandomConvFeatures
from helpers import randomize_weights
from helpers import real_images
from helpers import tiny_unet
from mmd_keras import checkpoints
from mmd_keras import finetune
from mmd_keras import mmd
from mmd_keras import validation
from mmd_keras.app import inputs
from mmd_keras.errors import ParameterError


def _settings(*, every=2, patience=10, num_images=24, lr_backoff=1.0):
  """Validation in two random-convolution spaces (16-d: FID needs N > 16) against 24 images."""
  spaces = {"val": RandomConvFeatures(seed=1), "shown": RandomConvFeatures(seed=2)}
  held_back = real_images(24, seed=5)
  real = {name: np.asarray(space(held_back), np.float64) for name, space in spaces.items()}
  # Sampled 16 at a time: the validation set in two batches.
  return validation.Settings(every=every, patience=patience, num_images=num_images, batch_size=16,
                             spaces=spaces, real_features=real, select=("val",),
                             lr_backoff=lr_backoff)


def _finetune(workdir, init, *, steps, learning_rate, settings):
  real = real_images(4, seed=0)
  return finetune.finetune(
      unet_factory=lambda: tiny_unet(image_size=IMAGE_SIZE),
      feature_net_factory=RandomConvFeatures, kernel=mmd.make_kernel("polynomial"),
      dataset_fn=lambda start_batch: tf.data.Dataset.from_tensors(real).repeat(), schedule=SCHEDULE,
      workdir=str(workdir), num_steps=2, finetune_steps=steps, learning_rate=learning_rate,
      grad_clip=0.5, global_batch_size=4, checkpoint_every=100, log_every=1, seed=0,
      strategy=tf.distribute.get_strategy(), init_checkpoint=str(init), num_sample_images=4,
      validation=settings)


def _weights(path):
  unet = tiny_unet(image_size=IMAGE_SIZE).build_for_inference()
  checkpoints.restore_unet(unet, str(path), use_ema=False)
  return [w.numpy() for w in unet.weights]


@pytest.fixture
def base(tmp_path):
  init = tmp_path / "base.weights.h5"
  checkpoints.save_weights_h5(randomize_weights(tiny_unet(image_size=IMAGE_SIZE), scale=0.05),
                              str(init))
  return init


def _record(run):
  with open(run / validation.RECORD) as f:
    return json.load(f)


@pytest.mark.slow
def test_an_absurd_learning_rate_returns_the_starting_weights(tmp_path, base):
  run = tmp_path / "absurd"
  trainer = _finetune(run, base, steps=20, learning_rate=1.0,
                      settings=_settings(every=2, patience=2))
  record = _record(run)
  assert record["best_step"] == 0
  assert [r["step"] for r in record["validations"]] == [0, 2, 4]  # Stopped by patience.
  assert int(trainer.optimizer.iterations.numpy()) == 4
  assert all(r["score"] > 1.0 for r in record["validations"][1:])
  for final, start in zip(_weights(run / "unet.weights.h5"), _weights(base)):
    np.testing.assert_array_equal(final, start)
  # The last weights are kept beside, and they are not the start's.
  assert any(not np.array_equal(a, b) for a, b in zip(_weights(run / "unet_last.weights.h5"),
                                                      _weights(base)))
  assert os.path.isfile(run / "validation.png")
  # Rerun: nothing more to do; the stop is remembered.
  _finetune(run, base, steps=20, learning_rate=1.0, settings=_settings(every=2, patience=2))
  assert _record(run) == record


@pytest.mark.slow
def test_a_kill_during_a_validation_keeps_the_same_best(tmp_path, base, monkeypatch):
  settings = _settings(every=2, patience=10)
  _finetune(tmp_path / "straight", base, steps=6, learning_rate=3e-3, settings=settings)
  straight = _record(tmp_path / "straight")

  write = validation.Validator._write
  killed = []

  def killed_at_step_4(self, step):
    if step == 4 and not killed:
      killed.append(step)  # After the best weights, before the record: the worst moment.
      raise KeyboardInterrupt
    write(self, step)

  monkeypatch.setattr(validation.Validator, "_write", killed_at_step_4)
  with pytest.raises(KeyboardInterrupt):
    _finetune(tmp_path / "resumed", base, steps=6, learning_rate=3e-3, settings=settings)
  assert [r["step"] for r in _record(tmp_path / "resumed")["validations"]] == [0, 2]
  _finetune(tmp_path / "resumed", base, steps=6, learning_rate=3e-3, settings=settings)
  resumed = _record(tmp_path / "resumed")
  assert [r["step"] for r in resumed["validations"]] == [0, 2, 4, 6]
  assert resumed["best_step"] == straight["best_step"]
  np.testing.assert_allclose([r["score"] for r in resumed["validations"]],
                             [r["score"] for r in straight["validations"]], rtol=1e-4)
  for a, b in zip(_weights(tmp_path / "resumed" / "unet.weights.h5"),
                  _weights(tmp_path / "straight" / "unet.weights.h5")):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Only the best step's weights are kept.
  assert os.listdir(tmp_path / "resumed" / "best") == [
      f"unet_step{resumed['best_step']:07d}.weights.h5"]


def test_backoffs_count_the_validations_no_better_than_the_best_before_them():
  history = [dict(step=10 * i, score=s) for i, s in enumerate([1.0, 1.2, 0.9, 0.95, 0.9, 0.5])]
  assert [validation.worse(history, r["step"]) for r in history] == [
      False, True, False, True, True, False]  # A tie with the best is no improvement.
  assert validation.backoffs(history) == 3
  assert validation.backoffs([]) == 0


@pytest.mark.slow
def test_a_validation_without_improvement_rewinds_at_a_lower_rate_and_a_resume_does_the_same(
    tmp_path, base, monkeypatch):
  settings = _settings(every=2, patience=3, lr_backoff=0.5)
  rewound = []
  rewind = finetune._rewind

  def watched(trainer, path, **kwargs):
    rewind(trainer, path, **kwargs)
    best = _weights(path)  # Read now: a later best replaces the file.
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(best, trainer.unet.weights))
    assert all(not np.any(m.numpy()) for m in trainer.optimizer._momentums)
    rewound.append((os.path.basename(path), kwargs["learning_rate"]))

  def expected_rewinds(record, last_step=6):
    """(best weights' file, rate) after each validation no better than every one before it, but
    one that runs out of patience (the third since the best: it stops the run) or is the last
    step's (nothing trains after it); from the scores alone."""
    scores, out = [r["score"] for r in record["validations"]], []
    for i in range(1, len(scores)):
      best = int(np.argmin(scores[:i]))
      last = record["validations"][i]["step"] == last_step
      if scores[i] >= scores[best] and i - best < 3 and not last:
        out.append((f"unet_step{record['validations'][best]['step']:07d}.weights.h5",
                    0.5 ** (len(out) + 1)))
    return out

  monkeypatch.setattr(finetune, "_rewind", watched)
  # An absurd rate: the first steps make things worse, so it is rewound.
  trainer = _finetune(tmp_path / "straight", base, steps=6, learning_rate=1.0, settings=settings)
  straight = _record(tmp_path / "straight")
  assert straight["validations"][1]["score"] > 1.0
  assert len(rewound) >= 1 and rewound == expected_rewinds(straight)
  assert float(trainer.optimizer.learning_rate.numpy()) == 0.5 ** len(rewound)

  # Killed after the record of step 2, before its rewind: the resumed run (from the checkpoint of
  # step 2, saved before the validation) makes the rewind again and ends as the straight run.
  rewind_if_worse = validation.Validator.rewind_if_worse
  killed = []

  def killed_at_step_2(self, step):
    if step == 2 and not killed:
      killed.append(step)
      raise KeyboardInterrupt
    return rewind_if_worse(self, step)

  monkeypatch.setattr(validation.Validator, "rewind_if_worse", killed_at_step_2)
  with pytest.raises(KeyboardInterrupt):
    _finetune(tmp_path / "resumed", base, steps=6, learning_rate=1.0, settings=settings)
  straight_rewinds, rewound[:] = list(rewound), []
  trainer = _finetune(tmp_path / "resumed", base, steps=6, learning_rate=1.0, settings=settings)
  assert rewound == straight_rewinds
  assert float(trainer.optimizer.learning_rate.numpy()) == 0.5 ** len(rewound)
  resumed = _record(tmp_path / "resumed")
  assert [r["step"] for r in resumed["validations"]] == [r["step"] for r in straight["validations"]]
  np.testing.assert_allclose([r["score"] for r in resumed["validations"]],
                             [r["score"] for r in straight["validations"]], rtol=1e-4)
  for a, b in zip(_weights(tmp_path / "resumed" / "unet_last.weights.h5"),
                  _weights(tmp_path / "straight" / "unet_last.weights.h5")):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_resume_with_other_validation_spaces_is_refused(tmp_path):
  settings = _settings()
  images = real_images(24, seed=6)
  validator = validation.Validator(settings=settings, sample_fn=lambda: images,
                                   out_dir=str(tmp_path), save_best=lambda path: None)
  record = validator(0)
  assert record["score"] == 1.0 and validation.Validator(
      settings=settings, sample_fn=None, out_dir=str(tmp_path), save_best=None).history == [record]
  other = validation.Settings(**{**vars(settings), "select": ("shown",)})
  with pytest.raises(ParameterError, match="^val_feature_nets=.* differs from the validation "
                                           "record .*choosing in val"):
    validation.Validator(settings=other, sample_fn=None, out_dir=str(tmp_path), save_best=None)


FASHION = ["--flagfile=configs/fashion_mnist.cfg", "--validate", "--mode=finetune"]


@pytest.mark.parametrize("flags, message", [
    (["--val_split=test[0:]"], "--val_split=test[0:] overlaps the reports' real images, the "
                               "first 5000 of --eval_split=test; start it at 5000 or later"),
    (["--val_split=test[500:]", "--num_eval_images=100"],  # The quickstart's 1000 count too.
     "--val_split=test[500:] overlaps the reports' real images, the first 1000"),
    (["--val_feature_nets=classifier,classifier_heldout"],
     "--val_feature_nets=classifier,classifier_heldout must name a space no report scores"),
    (["--val_split=test[5000"], "--val_split=test[5000 must be a split with an optional slice"),
    (["--val_split=test[6000:5000]"], "--val_split=test[6000:5000] selects no image"),
    (["--patience=0"], "--patience=0 must be >= 1"),
    (["--validate_every=0"], "--validate_every=0 must be > 0"),
    (["--lr_backoff=0"], "--lr_backoff=0.0 must be in (0, 1]"),
    (["--lr_backoff=1.5"], "--lr_backoff=1.5 must be in (0, 1]"),
    (["--val_feature_nets=vgg"], "--val_feature_nets=vgg must be one of"),
])
def test_validation_settings_that_would_bias_the_reports_are_refused(main_module, monkeypatch,
                                                                     repo_root, flags, message):
  monkeypatch.chdir(repo_root)
  main_module._parse_flags(["main.py", *FASHION, *flags])
  with pytest.raises(ParameterError) as caught:
    inputs.check_validation(main_module.configuration())
  assert caught.value.message(main_module.flag_of).startswith(message)


def test_the_flagfile_validates_on_held_back_images_in_a_space_no_report_scores(main_module,
                                                                              monkeypatch,
                                                                              repo_root):
  monkeypatch.chdir(repo_root)
  main_module._parse_flags(["main.py", "--flagfile=configs/fashion_mnist.cfg"])
  cfg = main_module.configuration()
  assert cfg.finetune.validate and cfg.finetune.val_split == ("test", 5000, None)
  select = [n for n in cfg.finetune.val_feature_nets if n not in cfg.eval.feature_nets]
  assert select == ["classifier_val"]
