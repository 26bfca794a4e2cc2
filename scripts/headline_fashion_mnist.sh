#!/usr/bin/env bash
# The README's headline run on Fashion-MNIST (issue #4), end to end from the bundled base model:
#  1. learning-rate sweep of the K=5 finetune, scored in the TRAINED feature space only
#     (--eval_feature_nets=classifier: the held-out space is not even computed here);
#  2. K=10 finetune with the chosen learning rate;
#  3. evaluation at N=5000 in both spaces: DDIM K=5,10,20,50,100, MMD-DDM K=5, K=10 and the
#     flagfile's --eval_samplers at K=5,10 (the best training-free sampler at MMD-DDM's K), merged
#     into WORKDIR/merged/{report.md,report.json,fid_vs_steps.png}.
# Usage: bash scripts/headline_fashion_mnist.sh [WORKDIR]   (default runs/headline; ~2.5 h on 2 free cores)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/headline}
CFG=configs/fashion_mnist.cfg
# 1e-5 beat 2e-5 (the first default) in the trained space, so the sweep reaches down to the
# paper's 5e-6 rather than up.
LRS=(5e-6 1e-5 2e-5)
mkdir -p "$WORK"
stamp() { date +%H:%M:%S; }

for lr in "${LRS[@]}"; do
  dir="$WORK/lr_$lr"
  # Finished stages are skipped, so a rerun after an interruption continues where it stopped.
  if [ ! -f "$dir/finetune_k5/unet.weights.h5" ]; then
    echo "$(stamp) [sweep] finetune K=5 lr=$lr -> $dir"
    python main.py --flagfile=$CFG --mode=finetune --workdir="$dir" --num_steps=5 --learning_rate="$lr"
  fi
  if [ ! -f "$dir/evaluate/report.json" ]; then
    echo "$(stamp) [sweep] score K=5 lr=$lr in the trained space (N=1000)"
    # Only MMD-DDM's FID chooses the rate: no other training-free samplers here.
    python main.py --flagfile=$CFG --mode=evaluate --workdir="$dir" --eval_steps=5 \
      --num_eval_images=1000 --eval_feature_nets=classifier --eval_samplers= \
      --finetuned_checkpoints=5:"$dir/finetune_k5/unet.weights.h5"
  fi
done

BEST=$(python - "$WORK" "${LRS[@]}" <<'PY'
import json, sys
work, lrs = sys.argv[1], sys.argv[2:]
fid = {}
for lr in lrs:
  report = json.load(open(f"{work}/lr_{lr}/evaluate/report.json"))
  row, = [r for r in report["rows"] if r["model"] == "MMD-DDM"]
  fid[lr] = row["spaces"]["classifier"]["fid"]
  print(f"lr={lr}: trained-space FID of MMD-DDM K=5 = {fid[lr]:.2f}", file=sys.stderr)
print(min(fid, key=fid.get))
PY
)
echo "$(stamp) [sweep] chosen learning rate: $BEST"
echo "$BEST" > "$WORK/chosen_learning_rate.txt"

mkdir -p "$WORK/final/finetune_k5"
cp "$WORK/lr_$BEST/finetune_k5/unet.weights.h5" "$WORK/final/finetune_k5/unet.weights.h5"
if [ ! -f "$WORK/final/finetune_k10/unet.weights.h5" ]; then
  echo "$(stamp) [final] finetune K=10 lr=$BEST"
  python main.py --flagfile=$CFG --mode=finetune --workdir="$WORK/final" --num_steps=10 \
    --learning_rate="$BEST"
fi
# The base model's sweep (the long part: 185 sampling steps per image) does not depend on the
# finetuning, so it is its own run; the finetuned models are evaluated with DDIM at their K beside
# them, and the two reports are merged (the shared rows must agree: same noise, same samples).
# The other training-free samplers run at the finetuned models' K only: at every K they would
# take 3x the base model's sweep.
if [ ! -f "$WORK/ddim/evaluate/report.json" ]; then
  echo "$(stamp) [final] evaluate DDIM K=5,10,20,50,100, N=5000, both spaces"
  python main.py --flagfile=$CFG --mode=evaluate --workdir="$WORK/ddim" --num_eval_images=5000 \
    --eval_steps=5,10,20,50,100 --eval_samplers=
fi
echo "$(stamp) [final] evaluate MMD-DDM, DDIM and --eval_samplers at K=5,10, N=5000, both spaces"
python main.py --flagfile=$CFG --mode=evaluate --workdir="$WORK/final" --num_eval_images=5000 \
  --eval_steps=5,10
python main.py --mode=merge_reports --workdir="$WORK" \
  --reports="$WORK/ddim/evaluate,$WORK/final/evaluate"
echo "$(stamp) done: $WORK/merged/report.md"
