"""Guarded finetuning: every `every` steps (and at the start) the current weights sample a fixed
noise batch, are scored against held-back real images in several feature spaces, and the best
weights are kept; training stops after `patience` validations without improvement.

A validation without improvement also rewinds (with `lr_backoff` < 1): training goes back to the
best weights and goes on at `lr_backoff` times the learning rate. The rate that fits a step budget
and a sampler is thus found on validation, descending from the flag's (the rule and its evidence:
results/guarded_finetune_fashion_mnist/README.md). How many rewinds a run made follows from its
record alone (`backoffs`), so a resumed run continues at the same rate.

The selection score is the mean, over the `select` spaces (ones no report scores), of FID relative
to the first validation's; the start counts, so a finetune never ends worse on validation than the
model it started from. The record (validation.json: every validation, the best step) is written
after the best weights (`best/unet_step<N>.weights.h5`), each atomically, so a kill at any point
leaves a record whose best weights exist; a resumed run reads it back and keeps the same best.
"""

import dataclasses
import glob
import json
import os

import numpy as np
import tensorflow as tf

from mmd_keras import atomic
from mmd_keras import metrics
from mmd_keras.errors import ParameterError
from mmd_keras.evaluation import sweep

RECORD = "validation.json"


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a finetune is validated: `num_images` samples every `every` steps, scored in `spaces`
  ({name: feature network}) against `real_features` ({name: float64 [M, D]}, held-back images);
  the best by the `select` spaces is kept; `patience` validations without improvement stop it.
  The samples are drawn `batch_size` at a time. A validation without improvement multiplies the
  learning rate by `lr_backoff` and rewinds to the best weights (1: neither)."""
  every: int
  patience: int
  num_images: int
  batch_size: int
  spaces: dict
  real_features: dict
  select: tuple
  lr_backoff: float = 1.0


def _read_record(out_dir):
  """The validation record in `out_dir`, or None for a run not validated yet."""
  path = os.path.join(out_dir, RECORD)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_history(out_dir):
  """The validations recorded in `out_dir` (oldest first), [] for a run not validated yet."""
  record = _read_record(out_dir)
  return [] if record is None else record["validations"]


def worse(history, step):
  """Whether the validation of `step` scored no better than the best one before it."""
  score, = [r["score"] for r in history if r["step"] == step]
  earlier = [r["score"] for r in history if r["step"] < step]
  return bool(earlier) and score >= min(earlier)


def backoffs(history):
  """How many validations of `history` scored no better than the best before them: the rewinds
  of the run, each one a factor `lr_backoff` on its learning rate."""
  return sum(worse(history, r["step"]) for r in history)


def learning_rate_factor(history, lr_backoff):
  """The factor on a run's learning rate after the rewinds of `history`."""
  return lr_backoff ** backoffs(history)


class Validator:
  """Validates a run in `out_dir` by `settings`: `sample_fn()` -> images [N, H, W, C] of the
  current weights on fixed noise; `save_best(path)` writes the current weights to `path`;
  `rewind(path, factor)` loads the weights of `path` and sets the learning rate to `factor` times
  the run's."""

  def __init__(self, *, settings, sample_fn, out_dir, save_best, rewind=None, writer=None):
    self.sample_fn = sample_fn
    self.spaces = dict(settings.spaces)
    self.real = settings.real_features
    self.real_stats = {name: metrics.StreamingStats().update(f)
                       for name, f in self.real.items()}
    self.select = tuple(settings.select)
    self.every = settings.every
    self.patience = settings.patience
    self.out_dir = out_dir
    self.save_best = save_best
    self.rewind = rewind
    self.lr_backoff = settings.lr_backoff
    self.writer = writer
    self.history = []
    record = _read_record(out_dir)
    if record is not None:
      path = os.path.join(out_dir, RECORD)
      # A resumed run must score as the one it resumes: its best is in those spaces' terms.
      recorded = (tuple(record["select"]), sorted(record["validations"][0]["spaces"]))
      if recorded != (self.select, sorted(self.spaces)):
        raise ParameterError(
            "val_feature_nets", f"differs from the validation record {path} of the run this "
            f"one resumes (validated in {', '.join(recorded[1])}, choosing in "
            f"{', '.join(recorded[0])}); rerun with its settings or use another {{workdir}}",
            value=sorted(self.spaces), refs=("workdir",))
      self.history = record["validations"]

  @property
  def best(self):
    """The record of the best validation so far, or None."""
    return min(self.history, key=lambda r: (r["score"], r["step"])) if self.history else None

  def best_weights(self):
    return os.path.join(self.out_dir, "best", f"unet_step{self.best['step']:07d}.weights.h5")

  def exhausted(self):
    """`patience` validations since the best one: training should stop."""
    return bool(self.history) and sum(r["step"] > self.best["step"]
                                      for r in self.history) >= self.patience

  def done(self, step):
    return any(r["step"] == step for r in self.history)

  def learning_rate_factor(self):
    """The factor on the run's learning rate after the rewinds so far."""
    return learning_rate_factor(self.history, self.lr_backoff)

  def rewind_if_worse(self, step):
    """After the validation of `step`: back to the best weights at a lower learning rate if it
    did not improve (and training goes on). Returns whether it rewound. Applying it twice is the
    same as once, so a resumed run reapplies the rewind of its checkpoint's step (saved before
    its validation)."""
    if self.lr_backoff >= 1 or not worse(self.history, step) or self.exhausted():
      return False
    self.rewind(self.best_weights(), self.learning_rate_factor())
    return True

  def __call__(self, step):
    """Validates the current weights as those of `step`; returns the record."""
    images = np.asarray(self.sample_fn(), np.float32)
    scores = {}
    for name, network in self.spaces.items():
      fake = np.asarray(network(tf.clip_by_value(images, -1.0, 1.0)), np.float64)
      scores[name] = sweep.score(self.real[name], fake, real_stats=self.real_stats[name])
    first = self.history[0]["spaces"] if self.history else scores
    score = float(np.mean([scores[n]["fid"] / first[n]["fid"] for n in self.select]))
    record = dict(step=step, score=score, spaces=scores)
    improved = self.best is None or score < self.best["score"]
    self.history = [r for r in self.history if r["step"] != step] + [record]
    if improved:
      os.makedirs(os.path.join(self.out_dir, "best"), exist_ok=True)
      self.save_best(self.best_weights())
    self._write(step)
    if self.writer is not None:
      with self.writer.as_default(step=step):
        tf.summary.scalar("validation/score", score)
        for name, s in scores.items():
          tf.summary.scalar(f"validation/fid_{name}", s["fid"])
          tf.summary.scalar(f"validation/kid_{name}", s["kid"])
          tf.summary.scalar(f"validation/recall_{name}", s["recall"])
    return record

  def _write(self, step):
    best = self.best
    atomic.write_json(os.path.join(self.out_dir, RECORD), dict(
        select=list(self.select), best_step=best["step"], last_step=step,
        validations=sorted(self.history, key=lambda r: r["step"])))
    keep = self.best_weights()[:-len("weights.h5")]  # Its timesteps file too.
    for path in glob.glob(os.path.join(self.out_dir, "best", "unet_step*")):
      if not path.startswith(keep):
        os.remove(path)
    plot_curve(self.history, self.select, os.path.join(self.out_dir, "validation.png"))


def plot_curve(history, select, path):
  """FID against the step in every space, the best step marked."""
  import matplotlib  # Imported here: only the curve needs it.
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  history = sorted(history, key=lambda r: r["step"])
  best = min(history, key=lambda r: (r["score"], r["step"]))
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in history[0]["spaces"]:
    ax.plot([r["step"] for r in history], [r["spaces"][name]["fid"] for r in history],
            marker="o", label=f"{name}{' (selects)' if name in select else ''}")
  ax.axvline(best["step"], color="gray", linestyle="--", label=f"best: step {best['step']}")
  ax.set_xlabel("finetuning step")
  ax.set_ylabel("FID (validation)")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with atomic.staged(path) as staging:
    fig.savefig(staging, dpi=100, format="png")
  plt.close(fig)
