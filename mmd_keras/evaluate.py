"""Step-budget sweeps: FID / KID / diversity of base and MMD-DDM samples in several feature spaces.

Every (model, sampler, K) starts from the same noise (`sampling.initial_noise` keyed by the seed),
so differences come from the model, the sampler and the step budget only. Samples and real images
are embedded batch by batch: only their features (and the images of one sample grid) are kept. The
report and the sample grids are written to temporary names and renamed at the end: an interrupted
evaluation never leaves a report that looks complete, nor changes what an earlier complete run left.
"""

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import re
import shutil
import time

import numpy as np
import tensorflow as tf
from absl import logging

from mmd_keras import atomic
from mmd_keras import console
from mmd_keras import grid
from mmd_keras import metrics
from mmd_keras import provenance
from mmd_keras import sampling
from mmd_keras import schedule as schedule_lib
from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError

GRID_IMAGES = 100
FINETUNED = "MMD-DDM"  # The label of finetuned models; every other row is training-free.


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


def parse_steps(steps):
  """'5,10,20' (or a list of strings or ints) -> (5, 10, 20); a ParameterError on `steps` if it is
  empty, not integers, not positive or repeats a K."""
  items = steps.split(",") if isinstance(steps, str) else list(steps)
  items = [str(v).strip() for v in items if str(v).strip()]
  if not items:
    raise ParameterError("steps", "is empty; expected a comma-separated list of step budgets like "
                         "5,10,20")
  try:
    parsed = tuple(int(v) for v in items)
  except ValueError:
    raise ParameterError("steps", "must be a comma-separated list of integers",
                         value=items) from None
  if any(k < 1 for k in parsed):
    raise ParameterError("steps", "entries must be >= 1", value=items)
  repeated = sorted({k for k in parsed if parsed.count(k) > 1})
  if repeated:
    raise ParameterError("steps", f"lists K={repeated[0]} more than once; expected distinct step "
                         f"budgets", value=items)
  return parsed


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


def _network_weights(network):
  """The values of a feature network's variables: its Keras model's weights, or every variable a
  loaded SavedModel tracks (it has no `weights`)."""
  model = getattr(network, "model", network)
  weights = getattr(model, "weights", None)
  if weights is None:
    weights = [v for v in tf.train.TrackableView(model).descendants()
               if isinstance(v, tf.Variable)]
  return [np.asarray(w) for w in weights]


def feature_cache_key(space):
  """The key of a feature space's cached features (its name in the report too): sha256 of its
  network's weights, dimension and `settings`, so that features cached with another network (a
  retrained classifier, another resolution) are never reused."""
  return _cache_digest(_network_weights(space.network), repr((space.network.dim, space.settings)))


def _image_batches(images, batch_size):
  """Batches of an array [M, H, W, C], or of `images()` when it is a function (a data stream)."""
  if callable(images):
    yield from images()
    return
  for i in range(0, len(images), batch_size):
    yield images[i:i + batch_size]


def reference_features(spaces, real_images, *, num_images, batch_size, digests, cache_dir=None,
                       real_set="real"):
  """{space name: float64 [N, D]}: features of the first N real images in every space, in one pass
  over the images for the spaces not cached yet.

  The cache is `<cache_dir>/<real_set>_<space>_<N>_<digest>.npz` (float32, staged and renamed),
  keyed by the network's `feature_cache_key`, which is stored in the file and compared on load.
  """
  # A model file's name (savedmodel:/path/dir) in a file name: its path's separators replaced.
  paths = {s.name: cache_dir and os.path.join(
      cache_dir, f"{real_set}_{re.sub(r'[^A-Za-z0-9_.-]', '_', s.name)}_{num_images}_"
                 f"{digests[s.name][:16]}.npz") for s in spaces}
  features, missing = {}, []
  for space in spaces:
    path = paths[space.name]
    if path and os.path.exists(path):
      with np.load(path) as cached:
        stored, digest = cached["features"], str(cached["digest"]) if "digest" in cached else ""
      if digest == digests[space.name] and stored.shape == (num_images, space.network.dim):
        features[space.name] = stored.astype(np.float64)
        continue
      logging.info("ignoring %s: it was computed for other images or another network", path)
    missing.append(space)
  if not missing:
    return features
  chunks = {s.name: [] for s in missing}
  count = 0
  with console.ProgressBar(num_images, desc=f"embedding real images in "
                           f"{', '.join(s.name for s in missing)}", unit="images",
                           rate_unit="img") as bar:
    for batch in _image_batches(real_images, batch_size):
      batch = np.asarray(batch)[:num_images - count]
      for space in missing:
        chunks[space.name].append(np.asarray(space.network(batch), np.float64))
      count += len(batch)
      bar.update(len(batch))
      if count >= num_images:
        break
  if count < num_images:
    raise ParameterError("num_images", f"exceeds the {count} real images available for the "
                         f"reference statistics", value=num_images)
  for space in missing:
    features[space.name] = np.concatenate(chunks[space.name], axis=0)
    path = paths[space.name]
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      # Evaluations sharing a cache may write the same file at once.
      with atomic.staged(path, unique=True) as staging:
        np.savez(staging, features=features[space.name].astype(np.float32),
                 digest=np.array(digests[space.name]))
  return features


def run(*, models, feature_spaces, real_images, schedule, num_images, seed, out_dir,
        sampler="ddim", timestep_kind="uniform", eta=0.0, clip_x0=False, batch_size=256,
        real_set="real", cache_dir=None, reuse_dirs=()):
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
  digests = {space.name: feature_cache_key(space) for space in feature_spaces}
  reference = reference_features(feature_spaces, real_images, num_images=num_images,
                                 batch_size=batch_size, digests=digests, cache_dir=cache_dir,
                                 real_set=real_set)
  reference_stats = {name: metrics.StreamingStats().update(features)
                     for name, features in reference.items()}
  rows, grids = [], []
  total = sum(len(m.steps) for m in models)
  # A finished row (and its grid) is kept under a key of its samples' settings and of what they
  # are scored against, so an interrupted sweep (a long one takes hours on a CPU) restarts where
  # it stopped.
  row_dir = os.path.join(out_dir, "rows")
  scoring = _cache_digest([reference[s.name] for s in feature_spaces],
                          repr((real_set, [(s.name, s.trained, digests[s.name])
                                           for s in feature_spaces])))
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
      key = _cache_digest([], json.dumps(samples, sort_keys=True) + scoring)
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
  _write_outputs(report, out_dir, grids=grids)
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
  with console.ProgressBar(num_images, desc=desc, unit="images", rate_unit="img") as bar:
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


def learned_timesteps(row):
  """The continuous (learned) timesteps a report row was sampled at, or None."""
  timesteps = row.get("timesteps")
  if isinstance(timesteps, list) and any(isinstance(t, float) for t in timesteps):
    return timesteps
  return None


def _cache_digest(arrays, text=""):
  """sha256 hex digest of arrays' bytes and a string."""
  h = hashlib.sha256(text.encode())
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _one_line(row):
  parts = [f"{name}: FID {s['fid']:.2f} KID {s['kid']:.4f}" for name, s in row["spaces"].items()]
  return f"{row['model']} K={row['num_steps']}  " + "  ".join(parts)


def trained_space(report):
  """The name of the report's trained feature space, or None."""
  return next((name for name, kind in report["feature_spaces"].items() if kind == "trained"),
              None)


def best_training_free(report):
  """{K: the training-free row (any model but MMD-DDM) of lowest FID in the trained space at K},
  for every K of an MMD-DDM row with such a row; {} without a trained space."""
  space = trained_space(report)
  if space is None:
    return {}
  finetuned_steps = {row["num_steps"] for row in report["rows"] if row["model"] == FINETUNED}
  fid = lambda row: row["spaces"][space]["fid"]
  best = {}
  for row in report["rows"]:
    k = row["num_steps"]
    if row["model"] != FINETUNED and k in finetuned_steps and (k not in best
                                                               or fid(row) < fid(best[k])):
      best[k] = row
  return dict(sorted(best.items()))


def markdown_table(report):
  """The report as a Markdown table: one row per (model, K), FID/KID/coverage per space; then, for
  each K of an MMD-DDM row, the best training-free row at that K (`best_training_free`)."""
  spaces = list(report["feature_spaces"])
  header = ["model", "K"]
  for name in spaces:
    kind = report["feature_spaces"][name]
    header += [f"FID {name} ({kind})", f"KID×1e3 {name}", f"recall {name}", f"coverage {name}"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in report["rows"]:
    if "seeds" in row:
      cells = [f"{row['model']} ({len(row['seeds'])} seeds)", str(row["num_steps"])]
      for name in spaces:
        s, sd = row["spaces"][name], row["seed_std"][name]
        cells += [f"{s['fid']:.2f} ± {sd['fid']:.2f}",
                  f"{1e3 * s['kid']:.2f} ± {1e3 * sd['kid']:.2f}",
                  f"{s['recall']:.3f} ± {sd['recall']:.3f}",
                  f"{s['coverage']:.3f} ± {sd['coverage']:.3f}"]
    else:
      cells = [row["model"], str(row["num_steps"])]
      for name in spaces:
        s = row["spaces"][name]
        cells += [f"{s['fid']:.2f}", f"{1e3 * s['kid']:.2f} ± {1e3 * s['kid_std']:.2f}",
                  f"{s['recall']:.3f}", f"{s['coverage']:.3f}"]
    lines.append("| " + " | ".join(cells) + " |")
  best = best_training_free(report)
  space = trained_space(report)
  finetuned = {row["num_steps"]: row for row in report["rows"] if row["model"] == FINETUNED}
  fid = lambda row: row["spaces"][space]["fid"]
  learned = [row for row in report["rows"] if learned_timesteps(row)]
  lines += [""] if best or learned else []
  for k, row in best.items():
    lines.append(f"- best training-free at K={k}: {row['model']}, FID {fid(row):.2f} in {space} "
                 f"(trained); {FINETUNED} K={k}: {fid(finetuned[k]):.2f}")
  for row in learned:
    lines.append(f"- {row['model']} K={row['num_steps']} samples at its learned timesteps "
                 f"{schedule_lib.format_timesteps(learned_timesteps(row))}")
  if any("seeds" in row for row in report["rows"]):
    lines += [] if best or learned else [""]
    lines.append("- rows over seeds: mean ± standard deviation over the seeds' finetunes; "
                 "elsewhere KID's ± is its estimate's standard deviation")
  return "\n".join(lines) + "\n"


def plot_fid_vs_steps(report, path):
  """FID against K, one curve per row label (each training-free sampler, MMD-DDM), one panel per
  feature space."""
  import matplotlib  # Imported here: only the report needs it.
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  spaces = list(report["feature_spaces"])
  fig, axes = plt.subplots(1, len(spaces), figsize=(5 * len(spaces), 4), squeeze=False)
  for ax, name in zip(axes[0], spaces):
    for label in sorted({r["model"] for r in report["rows"]}):
      rows = sorted((r for r in report["rows"] if r["model"] == label),
                    key=lambda r: r["num_steps"])
      # Rows over seeds: their spread as error bars.
      ax.errorbar([r["num_steps"] for r in rows], [r["spaces"][name]["fid"] for r in rows],
                  yerr=[r.get("seed_std", {}).get(name, {}).get("fid", 0.0) for r in rows],
                  marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps K")
    ax.set_ylabel("FID")
    ax.set_title(f"{name} ({report['feature_spaces'][name]})")
    ax.grid(True, alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def merge_reports(reports, out_dir):
  """One report from several runs over the same real set and noise (e.g. the base model's long K
  sweep and a later run of the finetuned models); writes it to `out_dir` and returns it.

  Rows present in several reports must agree: with the same seed and N they are the same samples.
  MMD-DDM rows of one K from different weights are seeds when their finetunes' recorded settings
  (`ModelSpec.finetune`) differ in run.seed alone: they become one row of means over the seeds
  (`_seeds_row`). Everything of a report but its rows is a setting they share; a report without
  `sampler` is one of DDIM, made before there was a choice. Rows without `sampler` and
  `timesteps` (older code) were sampled with the report's.
  """
  reports = [dict(provenance.SAMPLER_DEFAULTS, **report) for report in reports]
  first = reports[0]
  settings = [key for key in first if key != "rows"]
  for other in reports[1:]:
    for key in dict.fromkeys(settings + [key for key in other if key != "rows"]):
      # A report of older code lacks some keys: it cannot show it used the same settings.
      if other.get(key) != first.get(key):
        raise UserError(f"reports differ in {key}: {first.get(key)!r} vs {other.get(key)!r}; "
                        f"only runs with the same samples and feature spaces can be merged")
  groups = {}
  for report in reports:
    for row in report["rows"]:
      row = dict(row, sampler=row.get("sampler", report["sampler"]),
                 timesteps=row.get("timesteps", report["timesteps"]))
      groups.setdefault((row["model"], row["num_steps"]), []).append(row)
  trained = trained_space(first)
  rows = {key: _merged_row(key, group, trained=trained) for key, group in groups.items()}
  # The training-free rows first, then the finetuned models, each by label and K.
  order = sorted(rows, key=lambda key: (key[0] == FINETUNED, key[0], key[1]))
  merged = {key: first.get(key) for key in settings}
  merged["rows"] = [rows[key] for key in order]
  os.makedirs(out_dir, exist_ok=True)
  _write_outputs(merged, out_dir)
  return merged


def _merged_row(key, group, *, trained):
  """The row of (model, K) = `key` from its rows in several reports: rows of the same weights must
  agree; MMD-DDM rows of several seeds of one setting become one (`_seeds_row`)."""
  label, k = key
  by_weights = {}
  for row in group:
    if "seeds" in row and len(group) > 1:
      raise UserError(f"{label} K={k} is already a mean over seeds in one of the reports; merge "
                      f"the reports of the seeds themselves")
    same = by_weights.setdefault(row.get("weights", {}).get("sha256"), row)
    if same is not row:
      _check_same_samples(key, same, row)
  rows = list(by_weights.values())
  if len(rows) == 1:
    return rows[0]
  if label != FINETUNED or any(row.get("finetune") is None for row in rows):
    _check_same_samples(key, *rows[:2])  # Different weights, and nothing says they are seeds.
  return _seeds_row(key, rows, trained=trained)


def _check_same_samples(key, row, other):
  for name, s in other["spaces"].items():
    if not np.isclose(s["fid"], row["spaces"][name]["fid"], rtol=1e-4):
      raise UserError(f"{key[0]} K={key[1]} has FID {s['fid']} and {row['spaces'][name]['fid']} "
                      f"in {name}: not the same samples")


SEED_FIELD = "run.seed"


def _seeds_row(key, rows, *, trained):
  """One row from MMD-DDM rows whose finetunes differ in run.seed alone: each metric's mean over the
  seeds in `spaces`, its standard deviation over them (ddof 1) in `seed_std`, every seed's figures,
  weights and timesteps (which differ when they were learned) in `seeds`, and `median_seed`, the seed of the median FID in the `trained` space (the lower middle
  one for an even number of seeds)."""
  label, k = key
  settings = rows[0]["finetune"]
  for row in rows[1:]:
    for field in sorted((set(settings) | set(row["finetune"])) - {SEED_FIELD}):
      if settings.get(field) != row["finetune"].get(field):
        raise ParameterError(
            None, f"{label} K={k}: the finetunes of {rows[0]['weights']['path']} and "
            f"{row['weights']['path']} differ in {{{field}}} ({settings.get(field)!r} vs "
            f"{row['finetune'].get(field)!r}); only finetunes that differ in {{{SEED_FIELD}}} "
            f"alone merge as seeds", refs=(field, SEED_FIELD))
  seed = lambda row: row["finetune"].get(SEED_FIELD)
  rows = sorted(rows, key=seed)
  for row, other in zip(rows, rows[1:]):
    if seed(row) == seed(other):
      raise ParameterError(
          None, f"{label} K={k}: {row['weights']['path']} and {other['weights']['path']} were "
          f"both finetuned with {{{SEED_FIELD}}}={seed(row)} yet differ (made without "
          f"{{run.deterministic}}?); merge one of them", refs=(SEED_FIELD, "run.deterministic"))
  spaces, seed_std = {}, {}
  for name in rows[0]["spaces"]:
    values = {metric: np.array([row["spaces"][name][metric] for row in rows], np.float64)
              for metric, value in rows[0]["spaces"][name].items()
              if isinstance(value, (int, float))}
    spaces[name] = {metric: float(v.mean()) for metric, v in values.items()}
    seed_std[name] = {metric: float(v.std(ddof=1)) for metric, v in values.items()}
  space = trained or next(iter(spaces))
  by_fid = sorted(rows, key=lambda row: row["spaces"][space]["fid"])
  merged = {name: value for name, value in rows[0].items()
            if name not in ("weights", "seconds", "spaces", "finetune")}
  merged.update(
      spaces=spaces, seed_std=seed_std, median_seed=seed(by_fid[(len(rows) - 1) // 2]),
      finetune={field: value for field, value in settings.items() if field != SEED_FIELD},
      seeds=[dict(seed=seed(row), weights=row["weights"], spaces=row["spaces"],
                  timesteps=row["timesteps"]) for row in rows])
  if any(row["timesteps"] != rows[0]["timesteps"] for row in rows):
    merged["timesteps"] = "learned per seed"  # Each seed's are in `seeds`.
  return merged


def _write_outputs(report, out_dir, *, grids=()):
  """report.json, report.md, fid_vs_steps.png and the sample grids ((name, source file) pairs):
  all staged first, then renamed, report.json last."""
  outputs = {
      "report.json": lambda p: pathlib.Path(p).write_text(json.dumps(report, indent=2) + "\n"),
      "report.md": lambda p: pathlib.Path(p).write_text(markdown_table(report)),
      "fid_vs_steps.png": lambda p: plot_fid_vs_steps(report, p),
  }
  outputs.update({name: lambda p, source=source: shutil.copyfile(source, p)
                  for name, source in grids})
  # The stack renames in the reverse order of staging.
  with contextlib.ExitStack() as stack:
    for name, write in outputs.items():
      write(stack.enter_context(atomic.staged(os.path.join(out_dir, name))))
