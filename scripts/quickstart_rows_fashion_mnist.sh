#!/usr/bin/env bash
# The quickstart's base-model rows (its --sampler and --eval_samplers at K=5, DDIM K=100, on
# --quickstart_eval_images images), for bundling with the base model in pretrained/fashion_mnist/rows:
# with --eval_reuse_rows pointing there (configs/fashion_mnist.cfg does), the quickstart samples only
# MMD-DDM. A row is reused only under its key (base weights, sampler, timesteps, seed, N, sample
# batch, real set, feature networks), so rerun this after changing any of them.
#
#   bash scripts/quickstart_rows_fashion_mnist.sh WORKDIR [OUT=pretrained/fashion_mnist/rows]
#
# It runs the quickstart itself (nothing else gives the same keys) with one finetuning step, whose
# MMD-DDM row is left out, and --eval_reuse_rows= so every base row is sampled afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:?usage: bash scripts/quickstart_rows_fashion_mnist.sh WORKDIR [OUT]}
OUT=${2:-pretrained/fashion_mnist/rows}
if [ -e "$WORK" ]; then
  echo "error: WORKDIR $WORK exists (expected a fresh directory, so that every row is sampled)" >&2
  exit 2
fi
python main.py --flagfile=configs/fashion_mnist.cfg --workdir="$WORK" --eval_reuse_rows= --novalidate \
  --finetune_steps=1 --export_dir="$WORK/export"
mkdir -p "$OUT"
for row in "$WORK"/quickstart/rows/*; do
  case "$(basename "$row")" in
    mmd_ddm_*) ;;
    *) cp "$row" "$OUT/" ;;
  esac
done
ls -l "$OUT"
