#!/usr/bin/env bash
# MMD finetuning through DDIM vs through DPM-Solver++(2M) at K=5 on Fashion-MNIST (issue #15 item 5):
#  1. for each seed, a K=5 finetune through each sampler (the flagfile's settings, --deterministic);
#  2. each finetuned model evaluated with its own sampler at K=5 (N images, both feature spaces,
#     evaluation seed 0), beside the training-free rows DDIM and DPM-Solver++ with uniform and
#     trailing spacing on the same noise (cached in WORK/eval, so sampled once);
#  3. WORK/summary.md: every row, MMD-DDM rows as mean ± std over the seeds (and each seed's).
# Usage: bash scripts/samplers_finetune_fashion_mnist.sh BASE_WEIGHTS [WORK] [N] [SEEDS]
#   e.g. bash scripts/samplers_finetune_fashion_mnist.sh pretrained/fashion_mnist/unet_ema.weights.h5
# EVAL (environment) is the evaluation workdir, WORK/eval by default: point it at the headline's
# (runs/headline/eval) to reuse its rows, and WORK at the headline's runs/headline/lr_<rate> to
# reuse its DDIM finetunes (the same settings and seeds: --deterministic gives the same weights).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=$1; WORK=${2:-runs/samplers_finetune}; N=${3:-5000}; SEEDS=${4:-0 1 2}
CFG=configs/fashion_mnist.cfg
K=5
SAMPLERS=(ddim dpm_solver_pp)
# The run's own sampler is left out of --eval_samplers by evaluate, so every report has all four.
TRAINING_FREE=ddim:uniform,ddim:trailing,dpm_solver_pp:uniform,dpm_solver_pp:trailing
EVAL=${EVAL:-$WORK/eval}
mkdir -p "$WORK/reports"
stamp() { date +%H:%M:%S; }

for seed in $SEEDS; do
  for sampler in "${SAMPLERS[@]}"; do
    if [ "$sampler" = ddim ]; then sub=finetune_k$K; else sub=finetune_${sampler}_k$K; fi
    weights="$WORK/seed_$seed/$sub/unet.weights.h5"
    # Finished stages are skipped, so a rerun after an interruption continues where it stopped.
    if [ ! -f "$weights" ]; then
      echo "$(stamp) finetune K=$K through $sampler, seed $seed"
      python main.py --flagfile=$CFG --mode=finetune --workdir="$WORK/seed_$seed" \
        --init_checkpoint="$BASE" --num_steps=$K --sampler=$sampler --seed="$seed" --deterministic \
        --checkpoint_every=20  # A finetune cut short resumes from its last checkpoint.
    fi
    report="$WORK/reports/${sampler}_seed$seed.json"
    if [ ! -f "$report" ]; then
      echo "$(stamp) evaluate MMD-DDM($sampler) seed $seed and the training-free rows, N=$N"
      python main.py --flagfile=$CFG --mode=evaluate --workdir="$EVAL" --seed=0 \
        --init_checkpoint="$BASE" --sampler=$sampler --eval_steps=$K --num_eval_images="$N" \
        --eval_samplers=$TRAINING_FREE --finetuned_checkpoints=$K:"$weights"
      cp "$EVAL/evaluate/report.json" "$report"
    fi
  done
done

python - "$WORK" > "$WORK/summary.md" <<'PY'
import glob, json, os, sys
import numpy as np
work = sys.argv[1]
labels = {"ddim": "DDIM", "dpm_solver_pp": "DPM-Solver++"}
free, tuned, spaces = {}, {}, None
for path in sorted(glob.glob(os.path.join(work, "reports", "*.json"))):
  report = json.load(open(path))
  spaces = spaces or list(report["rows"][0]["spaces"])
  for row in report["rows"]:
    sampler = row.get("sampler", report["sampler"])
    fids = [row["spaces"][s]["fid"] for s in spaces]
    if row["model"] == "MMD-DDM":
      tuned.setdefault(sampler, []).append(fids)
    else:
      name = f"{labels[sampler]} ({row.get('timesteps', report['timesteps'])})"
      # The same noise and weights in every report: training-free rows must agree.
      if name in free and not np.allclose(free[name], fids, rtol=1e-4):
        sys.exit(f"{name}: FID {free[name]} vs {fids} in {path}: not the same samples")
      free[name] = fids
print(f"| model, K=5 | " + " | ".join(f"FID {s}" for s in spaces) + " |")
print("|---|" + "---|" * len(spaces))
for name, fids in sorted(free.items()):
  print(f"| {name} | " + " | ".join(f"{f:.2f}" for f in fids) + " |")
for sampler, runs in sorted(tuned.items()):
  runs = np.array(runs)
  std = runs.std(0, ddof=1) if len(runs) > 1 else np.zeros(len(spaces))
  cells = [f"{m:.2f} ± {s:.2f} ({' / '.join(f'{f:.2f}' for f in col)})"
           for m, s, col in zip(runs.mean(0), std, runs.T)]
  print(f"| MMD-DDM through {labels[sampler]} (uniform), {len(runs)} seed(s) | "
        + " | ".join(cells) + " |")
PY
cat "$WORK/summary.md"
