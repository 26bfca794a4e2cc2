#!/usr/bin/env bash
# A guarded finetune beside its last weights: the flagfile's recipe (validation on, rewinds, 60
# steps, lr 2e-5) at K and seed given, then the base model's sampler at K, the guarded weights
# (unet.weights.h5, the best validated step) and the last trained weights (unet_last.weights.h5;
# with --lr_backoff=1, what an unguarded run ships) scored on the same noise at N images in the
# report spaces (with --lora_rank: the adapters files of the same names).
#
#   bash scripts/guarded_finetune_fashion_mnist.sh WORKDIR [K=10] [SEED=2] [N=1000] [FLAG ...]
#
# Flags after N go to every run (e.g. --sampler=dpm_solver_pp: finetuned and scored through it).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:?usage: bash scripts/guarded_finetune_fashion_mnist.sh WORKDIR [K] [SEED] [N]}
K=${2:-10}
SEED=${3:-2}
N=${4:-1000}
F=(--flagfile=configs/fashion_mnist.cfg --workdir="$WORK" --deterministic --seed="$SEED" "${@:5}")
python main.py "${F[@]}" --mode=finetune --num_steps="$K"
RUN=$(ls -d "$WORK"/finetune_*k"$K"*/)  # finetune_[<sampler>_]k<K>[_lora<R>...]
REUSE=  # The second evaluation reuses the first's base-model row.
for weights in unet unet_last; do
  FILE="$RUN$weights.weights.h5"
  [ -f "$FILE" ] || FILE="$RUN$weights.adapters.npz"  # A --lora_rank finetune ships adapters.
  python main.py "${F[@]}" --mode=evaluate --eval_steps="$K" --num_eval_images="$N" \
    --eval_samplers= --eval_feature_nets=classifier,classifier_heldout \
    --finetuned_checkpoints="$K:$FILE" --eval_reuse_rows="$REUSE" \
    --seed=0 --workdir="$WORK/$weights"
  REUSE="$WORK/unet/evaluate/rows"
done
cat "${RUN}validation.json"
cat "$WORK/unet/evaluate/report.md" "$WORK/unet_last/evaluate/report.md"
