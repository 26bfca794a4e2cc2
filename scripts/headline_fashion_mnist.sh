#!/usr/bin/env bash
# The README's headline run on Fashion-MNIST, end to end from a base model, over seeds:
#  1. learning-rate sweep of the K=5 finetune, every rate with every seed (--deterministic), scored
#     in the TRAINED feature space only (--eval_feature_nets=classifier: the held-out space is not
#     even computed here); the rate of the lowest mean FID over the seeds is chosen;
#  2. K=10 finetunes with the chosen rate, one per seed;
#  3. evaluation at N images in every space of the flagfile: DDIM K=5,10,20,50,100 once, and per
#     seed MMD-DDM K=5, K=10 beside DDIM and the flagfile's --eval_samplers at K=5,10 (the same
#     noise for every row);
#  4. one report: --mode=merge_reports turns the seeds' MMD-DDM rows into mean ± std over seeds
#     (WORK/merged/{report.md,report.json,fid_vs_steps.png}); the median seed's weights are copied
#     to WORK/merged/mmd_ddm_k<K>.weights.h5.
# Usage: bash scripts/headline_fashion_mnist.sh [WORK] [BASE_WEIGHTS] [N] [SEEDS] [LRS]
#   defaults: runs/headline, the bundled base model, 5000, "0 1 2", "5e-6 1e-5 2e-5 4e-5"
#   On 2 free cores of the 2026-12-01 machine (one UNet call 2.1x slower than in the README's
#   benchmarks): ~12 min per K=5 finetune and its score, ~17 min per K=10 finetune, ~1.8 h for DDIM
#   K=5..100 at N=5000. Rerun the same command after an interruption: finished finetunes and rows
#   are kept, and a finetune cut short resumes from its last checkpoint (every 20 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/headline}
BASE=${2:-pretrained/fashion_mnist/unet_ema.weights.h5}
N=${3:-5000}
SEEDS=(${4:-0 1 2})
LRS=(${5:-5e-6 1e-5 2e-5 4e-5})
CFG=${CFG:-configs/fashion_mnist.cfg}  # Another flagfile only to smoke-test this script.
# Every run is --sampler=ddim: this headline measures the paper's route (the flagfile finetunes
# through DPM-Solver++ since 2026-12-08).
mkdir -p "$WORK/sweep" "$WORK/final"
stamp() { date +%H:%M:%S; }

# $1 workdir, $2 K, $3 lr, $4 seed: a finetune, skipped when its weights exist (so a rerun after an
# interruption continues where it stopped).
finetune() {
  if [ ! -f "$1/finetune_k$2/unet.weights.h5" ]; then
    echo "$(stamp) finetune K=$2 lr=$3 seed=$4 -> $1"
    python main.py --flagfile=$CFG --sampler=ddim --mode=finetune --workdir="$1" --init_checkpoint="$BASE" \
      --num_steps="$2" --learning_rate="$3" --seed="$4" --deterministic --checkpoint_every=20
  fi
}

for lr in "${LRS[@]}"; do
  for seed in "${SEEDS[@]}"; do
    finetune "$WORK/lr_$lr/seed_$seed" 5 "$lr" "$seed"
    report="$WORK/sweep/lr_${lr}_seed_$seed.json"
    if [ ! -f "$report" ]; then
      echo "$(stamp) [sweep] score K=5 lr=$lr seed=$seed in the trained space (N=1000)"
      # Only MMD-DDM's FID chooses the rate: no other training-free samplers here. The evaluation
      # seed stays 0, so every finetune is scored on the same noise (DDIM's row is reused).
      python main.py --flagfile=$CFG --sampler=ddim --mode=evaluate --workdir="$WORK/sweep_eval" --seed=0 \
        --init_checkpoint="$BASE" --eval_steps=5 --num_eval_images=1000 \
        --eval_feature_nets=classifier --eval_samplers= \
        --finetuned_checkpoints=5:"$WORK/lr_$lr/seed_$seed/finetune_k5/unet.weights.h5"
      cp "$WORK/sweep_eval/evaluate/report.json" "$report"
    fi
  done
done

BEST=$(python - "$WORK/sweep" "${LRS[@]}" <<'PY'
import glob, json, sys
import numpy as np
sweep, lrs = sys.argv[1], sys.argv[2:]
mean = {}
for lr in lrs:
  fids = []
  for path in sorted(glob.glob(f"{sweep}/lr_{lr}_seed_*.json")):
    row, = [r for r in json.load(open(path))["rows"] if r["model"] == "MMD-DDM"]
    fids.append(row["spaces"]["classifier"]["fid"])
  mean[lr] = np.mean(fids)
  print(f"lr={lr}: trained-space FID of MMD-DDM K=5 over {len(fids)} seeds: "
        f"{' / '.join(f'{f:.2f}' for f in fids)}, mean {mean[lr]:.2f}", file=sys.stderr)
print(min(mean, key=mean.get))
PY
)
echo "$(stamp) [sweep] chosen learning rate: $BEST"
echo "$BEST" > "$WORK/sweep/chosen_learning_rate.txt"

for seed in "${SEEDS[@]}"; do
  finetune "$WORK/lr_$BEST/seed_$seed" 10 "$BEST" "$seed"
done
# Every N-image evaluation shares one workdir, WORK/eval: `--mode=evaluate` keeps each finished
# row under a key of its samples' settings and feature spaces, so a row needed by several runs (DDIM
# K=5 and K=10, the training-free samplers) is sampled once, and an interrupted run continues.
# The seeds' runs come first (everything at K=5,10: MMD-DDM, DDIM and the flagfile's
# --eval_samplers, on the same noise); the base model's long DDIM sweep (185 sampling steps per
# image) last, reusing their DDIM K=5,10 rows. The other training-free samplers run at the finetuned
# models' K only: at every K they would take 3x the base model's sweep.
reports=""
for seed in "${SEEDS[@]}"; do
  report="$WORK/final/seed_$seed.json"
  if [ ! -f "$report" ]; then
    echo "$(stamp) [final] evaluate MMD-DDM K=5,10 of seed $seed, DDIM and --eval_samplers at K=5,10, N=$N"
    python main.py --flagfile=$CFG --sampler=ddim --mode=evaluate --workdir="$WORK/eval" --seed=0 \
      --init_checkpoint="$BASE" --num_eval_images="$N" --eval_steps=5,10 \
      --finetuned_checkpoints=5:"$WORK/lr_$BEST/seed_$seed/finetune_k5/unet.weights.h5",10:"$WORK/lr_$BEST/seed_$seed/finetune_k10/unet.weights.h5"
    cp "$WORK/eval/evaluate/report.json" "$report"
  fi
  reports="$reports,$report"
done
if [ ! -f "$WORK/final/ddim.json" ]; then
  echo "$(stamp) [final] evaluate DDIM K=5,10,20,50,100, N=$N, every space"
  python main.py --flagfile=$CFG --sampler=ddim --mode=evaluate --workdir="$WORK/eval" --seed=0 \
    --init_checkpoint="$BASE" --num_eval_images="$N" --eval_steps=5,10,20,50,100 --eval_samplers=
  cp "$WORK/eval/evaluate/report.json" "$WORK/final/ddim.json"
fi
reports="$WORK/final/ddim.json$reports"
python main.py --mode=merge_reports --workdir="$WORK" --reports="$reports"
# The median seed's weights (by trained-space FID) stand for the row.
python - "$WORK/merged" <<'PY'
import json, shutil, sys
merged = sys.argv[1]
for row in json.load(open(f"{merged}/report.json"))["rows"]:
  if row["model"] == "MMD-DDM":
    seeds = row.get("seeds") or [dict(seed=row["finetune"]["run.seed"], weights=row["weights"])]
    median = row.get("median_seed", seeds[0]["seed"])
    path, = [s["weights"]["path"] for s in seeds if s["seed"] == median]
    shutil.copyfile(path, f"{merged}/mmd_ddm_k{row['num_steps']}.weights.h5")
    print(f"MMD-DDM K={row['num_steps']}: median seed {median}, weights {path}")
PY
echo "$(stamp) done: $WORK/merged/report.md"
