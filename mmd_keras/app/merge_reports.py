"""--mode=merge_reports: one report from several evaluations over the same real set and noise
(e.g. the base model's long K sweep and a later run of the finetuned models)."""

import json
import os

from mmd_keras import evaluation as evaluate_lib
from mmd_keras.app import runs
from mmd_keras.errors import ParameterError


def report_path(path):
  """A report.json, or the report.json inside a directory (or its evaluate/ subdirectory)."""
  for candidate in (path, os.path.join(path, "report.json"),
                    os.path.join(path, "evaluate", "report.json")):
    if os.path.isfile(candidate):
      return candidate
  raise ParameterError("merge.reports", "entry holds no report.json (expected a report.json "
                       "file or an evaluation directory)", value=path)


def read_reports(paths):
  if len(paths) < 2:
    raise ParameterError("merge.reports", "must list at least two reports to merge", value=paths)
  reports = []
  for path in paths:
    path = report_path(path)
    try:
      with open(path) as f:
        reports.append(json.load(f))
    except (OSError, ValueError) as e:
      raise ParameterError("merge.reports", f"entry {path} is not a readable report.json: {e}",
                           value=",".join(paths)) from None
    if not isinstance(reports[-1], dict) or "rows" not in reports[-1]:
      raise ParameterError("merge.reports", f"entry {path} is not the report of an evaluation "
                           f"(no rows)", value=",".join(paths))
  return reports


def run(cfg):
  """Merges the reports of the config.MergeConfig `cfg` (report.json files or evaluation
  directories) into <workdir>/merged."""
  loaded = read_reports(cfg.reports)
  out_dir = runs.mode_dir(cfg.run, "merged")
  merged = evaluate_lib.merge_reports(loaded, out_dir)
  print(evaluate_lib.markdown_table(merged), end="")
  print(f"report: {os.path.join(out_dir, 'report.md')}")
  return merged
