"""What an evaluation shows: report.json, the Markdown table, FID against K, the best
training-free row beside MMD-DDM; written staged, report.json last."""

import contextlib
import json
import os
import pathlib
import shutil

from mmd_keras import atomic
from mmd_keras import schedule as schedule_lib

FINETUNED = "MMD-DDM"  # The label of finetuned models; every other row is training-free.


def learned_timesteps(row):
  """The continuous (learned) timesteps a report row was sampled at, or None."""
  timesteps = row.get("timesteps")
  if isinstance(timesteps, list) and any(isinstance(t, float) for t in timesteps):
    return timesteps
  return None


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


def write_outputs(report, out_dir, *, grids=()):
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
