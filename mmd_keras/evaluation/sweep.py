"""Step-budget sweeps: FID / KID / diversity of base and MMD-DDM samples in several feature spaces.

Every (model, sampler, K) starts from the same noise (`sampling.initial_noise` keyed by the seed),
so differences come from the model, the sampler and the step budget only. Samples and real images
are embedded batch by batch: only their features (and the images of one sample grid) are kept. The
report and the sample grids are written to temporary names and renamed at the end: an interrupted
evaluation never leaves a report that looks complete, nor changes what an earlier complete run left.
"""


import dataclasses
import glob
import json
import os
import re
import time

import numpy as np
from absl import logging

from mmd_keras import atomic
from mmd_keras import console
from mmd_keras import grid
from mmd_keras import metrics
from mmd_keras import provenance
from mmd_keras import sampling
from mmd_keras.evaluation import reference as reference_lib
from mmd_keras.evaluation import report as report_lib
from mmd_keras.errors import ParameterError

GRID_IMAGES = 100


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model to evaluate: its label (the base model's sampler of `samplers.LABELS`, "DDIM
  (trailing)" for another sampler or spacing, or "MMD-DDM"), UNet, the step budgets to run and the
  weights file it was loaded from (`path`, named in the report with the weights' fingerprint).

  `sampler` and `timesteps` (a spacing of `schedule.TIMESTEP_KINDS`, or the K timesteps, e.g.
  those learned with a finetuned model) override the run's.
  `finetune`: the settings a finetuned model was made with ({config field: value}, seed included),
  copied into its rows so that `merge_reports` can average seeds of one setting.
  """

  label: str
  unet: object
  steps: tuple
  path: str = None
  sampler: str = None
  timesteps: object = None
  finetune: dict = None


@dataclasses.dataclass(frozen=True)
class FeatureSpace:
  """A frozen feature network and whether finetuning optimised in it (`trained`) or not.

  `settings` describes what the network's weights do not show but its features depend on (image
  size, Inception resolution); it is part of the key of cached features.
  """

  name: str
  network: object
  trained: bool
  settings: str = ""


def score(real_features, fake_features, *, real_stats=None, kid_subset_size=1000, nearest_k=5):
  """FID, KID (mean ± std) and diversity figures of one sample set against the real one.

  `real_stats` (StreamingStats of real_features) lets many calls share one Σ^{1/2} of the reference.
  """
  real_stats = real_stats or metrics.StreamingStats().update(real_features)
  # Subsets of at most half the set: subsets of the whole set would all be equal (std 0).
  kid_mean, kid_std = metrics.kid(real_features, fake_features,
                                  subset_size=min(kid_subset_size, len(fake_features) // 2))
  result = dict(fid=metrics.fid_between(real_stats, metrics.StreamingStats().update(fake_features)),
                kid=float(kid_mean), kid_std=float(kid_std))
  result.update({k: float(v) for k, v in metrics.precision_recall(
      real_features, fake_features, k=3).items()})
  result.update({k: float(v) for k, v in metrics.density_coverage(
      real_features, fake_features, k=nearest_k).items()})
  return result


def run(*, models, feature_spaces, real_images, schedule, num_images, seed, out_dir,
        sampler="ddim", timestep_kind="uniform", eta=0.0, clip_x0=False,
        batch_size=sampling.BATCH_SIZE, real_set="real", cache_dir=None, reuse_dirs=()):
  """Samples every (model, K) with `sampler` over `timestep_kind` (or the model's own), scores it
  in every feature space, writes the report; returns it.

  real_images: an array [M, H, W, C] or a function returning an iterable of batches (read only if
  a space's features are not cached); its first `num_images` images are the reference set.
  real_set: names those images (dataset, split, size) in the report and the cache's file names.
  cache_dir: where the real set's features are cached (see `reference_features`).
  reuse_dirs: directories of finished rows (the rows/ of other evaluations) read, never written,
    when `out_dir/rows` lacks a row: a row is a function of its file name's key alone.
  """
  if not callable(real_images) and len(real_images) < num_images:
    raise ParameterError("num_images", f"exceeds the {len(real_images)} real images available "
                         f"for the reference statistics", value=num_images)
  for space in feature_spaces:
    metrics.check_enough_samples(num_images, space.network.dim)
  os.makedirs(out_dir, exist_ok=True)
  digests = {space.name: reference_lib.feature_cache_key(space) for space in feature_spaces}
  reference = reference_lib.reference_features(feature_spaces, real_images, num_images=num_images,
                                 batch_size=batch_size, digests=digests, cache_dir=cache_dir,
                                 real_set=real_set)
  reference_stats = {name: metrics.StreamingStats().update(features)
                     for name, features in reference.items()}
  rows, grids = [], []
  total = sum(len(m.steps) for m in models)
  # A finished row (and its grid) is kept under a key of its samples' settings and of what they
  # are scored against, so an interrupted sweep (a long one takes hours on a CPU) restarts where
  # it stopped. The key holds only inputs (weights, settings, the real set's name, the feature
  # networks' weights), never a float computed here: rows move between machines whose CPUs round
  # the reference features differently.
  row_dir = os.path.join(out_dir, "rows")
  scoring = repr((real_set, [(s.name, s.trained, digests[s.name]) for s in feature_spaces]))
  for model in models:
    weights = provenance.weights_sha256(model.unet.weights)
    model_sampler = model.sampler or sampler
    kind = timestep_kind if model.timesteps is None else model.timesteps
    sampling_args = dict(schedule=schedule, sampler=model_sampler, timestep_kind=kind, eta=eta,
                         clip_x0=clip_x0, seed=seed, batch_size=batch_size)
    for num_steps in model.steps:
      samples = provenance.samples_settings(
          provenance.sampler_settings(
              sampler=model_sampler, weights_sha256=weights,
              alphas_cumprod=schedule.alphas_cumprod, timesteps=schedule.timesteps(num_steps, kind),
              eta=eta, clip_x0=clip_x0,
              image_shape=(model.unet.image_size, model.unet.image_size, model.unet.channels)),
          seed=seed, batch_size=batch_size, num_images=num_images)
      slug = f"{label_slug(model.label)}_k{num_steps}"
      key = reference_lib.digest([], json.dumps(samples, sort_keys=True) + scoring)
      name = f"{slug}_{key[:16]}"
      stem = _finished_row(name, key[:16], [row_dir, *reuse_dirs])
      if stem is not None:
        with open(stem + ".json") as f:
          row = json.load(f)
        # The key alone decides: a row sampled under another label (DDIM as "DDIM (uniform)"
        # of --eval_samplers, say) holds the same samples and scores.
        row["model"] = model.label
        console.note(f"[{len(rows) + 1}/{total}] {model.label} K={num_steps}: reusing "
                     f"{stem}.json")
      else:
        stem = os.path.join(row_dir, name)
        row = _sample_and_score(model, num_steps, feature_spaces=feature_spaces,
                                reference=reference, reference_stats=reference_stats,
                                num_images=num_images, sampling_args=sampling_args, stem=stem,
                                desc=f"[{len(rows) + 1}/{total}] {model.label} K={num_steps}")
        logging.info("  %s", _one_line(row))
      # On every row, cached or not: rows cached by older code lack the sampler and spacing.
      row["weights"] = dict(path=model.path, sha256=weights)
      row.update(sampler=model_sampler, timesteps=_json_timesteps(kind))
      if model.finetune is not None:
        row["finetune"] = model.finetune
      rows.append(row)
      grids.append((f"samples_{slug}.png", stem + ".png"))
  report = dict(num_images=num_images, seed=seed, sampler=sampler, timesteps=timestep_kind, eta=eta,
                clip_x0=clip_x0, sample_batch_size=batch_size,
                schedule=dict(num_timesteps=schedule.num_timesteps,
                              beta_start=float(schedule.betas[0]),
                              beta_end=float(schedule.betas[-1])),
                real_set=real_set,
                feature_spaces={s.name: ("trained" if s.trained else "held-out")
                                for s in feature_spaces},
                feature_networks={name: digest[:16] for name, digest in digests.items()},
                rows=rows)
  report_lib.write_outputs(report, out_dir, grids=grids)
  return report


def _finished_row(name, key, dirs):
  """The stem (path without .json/.png) of a finished row of key `key` (its .json, written after
  its .png) in the first of `dirs` that has one, preferring the name `name` (`<slug>_<key>`); or
  None."""
  for folder in dirs:
    candidates = [os.path.join(folder, name)] + sorted(
        path[:-len(".json")]
        for path in glob.glob(os.path.join(glob.escape(folder), f"*_{key}.json")))
    for stem in candidates:
      if os.path.exists(stem + ".json") and os.path.exists(stem + ".png"):
        return stem
  return None


def _sample_and_score(model, num_steps, *, feature_spaces, reference, reference_stats, num_images,
                      sampling_args, stem, desc):
  """One row: samples embedded batch by batch under a progress bar named `desc`; `<stem>.png` (the
  grid), then `<stem>.json`."""
  started = time.time()
  fake = {space.name: [] for space in feature_spaces}
  shown = []
  done = 0
  with console.progress(num_images, desc=desc, unit="images") as bar:
    for images in sampling.batches(model.unet, num_images=num_images, num_steps=num_steps,
                                   **sampling_args):
      shown.append(images[:max(0, GRID_IMAGES - done)])
      for space in feature_spaces:
        fake[space.name].append(np.asarray(space.network(images), np.float64))
      done += len(images)
      bar.update(len(images))
  shown = np.concatenate(shown, axis=0)
  os.makedirs(os.path.dirname(stem), exist_ok=True)
  with atomic.staged(stem + ".png") as staging:
    grid.write_png(staging, shown, columns=10, scale=max(1, 64 // shown.shape[1]))
  row = dict(model=model.label, num_steps=num_steps, num_images=num_images,
             seconds=round(time.time() - started, 1), spaces={})
  for space in feature_spaces:
    row["spaces"][space.name] = score(reference[space.name],
                                      np.concatenate(fake[space.name], axis=0),
                                      real_stats=reference_stats[space.name])
  # The .json is the row's commit mark: written last, so a row with one has its grid too.
  atomic.write_json(stem + ".json", row, indent=None)
  return row


def label_slug(label):
  """A row label in file names: "MMD-DDM" -> "mmd_ddm", "DPM-Solver++ (trailing)" ->
  "dpm_solver++_trailing" (the grids and cached rows of older labels keep their names)."""
  return re.sub(r"[ ()]+", "_", label.lower().replace("-", "_")).strip("_")


def _json_timesteps(kind):
  """A spacing name, or explicit timesteps as a list of ints, or of floats for continuous ones (as
  read back from report.json)."""
  return kind if isinstance(kind, str) else provenance.json_timesteps(kind)


def _one_line(row):
  parts = [f"{name}: FID {s['fid']:.2f} KID {s['kid']:.4f}" for name, s in row["spaces"].items()]
  return f"{row['model']} K={row['num_steps']}  " + "  ".join(parts)
