"""Merging evaluations of the same samples: rows present in several reports must agree, and
MMD-DDM rows of finetunes that differ in their seed alone become one row of means over the seeds."""

import os

import numpy as np

from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError
from mmd_keras.evaluation import report as report_lib
from mmd_keras.evaluation.report import FINETUNED


def merge_reports(reports, out_dir):
  """One report from several runs over the same real set and noise (e.g. the base model's long K
  sweep and a later run of the finetuned models); writes it to `out_dir` and returns it.

  Rows present in several reports must agree: with the same seed and N they are the same samples.
  MMD-DDM rows of one K from different weights are seeds when their finetunes' recorded settings
  (`ModelSpec.finetune`) differ in run.seed alone: they become one row of means over the seeds
  (`_seeds_row`). Everything of a report but its rows is a setting they share.
  """
  first = reports[0]
  settings = [key for key in first if key != "rows"]
  for other in reports[1:]:
    for key in dict.fromkeys(settings + [key for key in other if key != "rows"]):
      if other.get(key) != first.get(key):
        raise UserError(f"reports differ in {key}: {first.get(key)!r} vs {other.get(key)!r}; "
                        f"only runs with the same samples and feature spaces can be merged")
  groups = {}
  for report in reports:
    for row in report["rows"]:
      groups.setdefault((row["model"], row["num_steps"]), []).append(row)
  trained = report_lib.trained_space(first)
  rows = {key: _merged_row(key, group, trained=trained) for key, group in groups.items()}
  # The training-free rows first, then the finetuned models, each by label and K.
  order = sorted(rows, key=lambda key: (key[0] == FINETUNED, key[0], key[1]))
  merged = {key: first.get(key) for key in settings}
  merged["rows"] = [rows[key] for key in order]
  os.makedirs(out_dir, exist_ok=True)
  report_lib.write_outputs(merged, out_dir)
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
