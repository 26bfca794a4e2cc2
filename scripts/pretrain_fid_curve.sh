#!/usr/bin/env bash
# FID curve of a running (or finished) pretraining: every EVERY steps, the latest checkpoint's EMA
# weights sample N images with 100-step DDIM, scored in both Fashion-MNIST feature spaces.
# Appends "step<TAB>FID trained space<TAB>FID held-out space" to OUT/curve.tsv and keeps each
# report as OUT/reports/step_<step>.json. Stops after evaluating the run's final step.
# Usage: bash scripts/pretrain_fid_curve.sh PRETRAIN_DIR OUT [EVERY=2000] [N=1000] [FINAL_STEP]
set -euo pipefail
cd "$(dirname "$0")/.."
PRETRAIN=$1; OUT=$2; EVERY=${3:-2000}; N=${4:-1000}; FINAL=${5:-0}
mkdir -p "$OUT/reports"
touch "$OUT/curve.tsv"
last=$(tail -n 1 "$OUT/curve.tsv" | cut -f1); last=${last:--1}
while true; do
  # No checkpoint yet is not an error (pipefail would end the watcher): wait for the first.
  ckpt=$( (ls "$PRETRAIN"/checkpoints/ckpt-*.index 2>/dev/null || true) \
         | sed 's/.*ckpt-\([0-9]*\).index/\1/' | sort -n | tail -n 1)
  if [ -n "$ckpt" ] && { [ "$ckpt" -ge $((last + EVERY)) ] || [ "$ckpt" -eq "$FINAL" ]; } \
     && [ "$ckpt" -ne "$last" ]; then
    # The checkpoint may be rotated away while we read it: copy it first.
    mkdir -p "$OUT/ckpt"; rm -f "$OUT"/ckpt/*
    cp "$PRETRAIN/checkpoints/ckpt-$ckpt".* "$OUT/ckpt/"
    python main.py --flagfile=configs/fashion_mnist.cfg --sampler=ddim --mode=evaluate --workdir="$OUT/work" \
      --init_checkpoint="$OUT/ckpt/ckpt-$ckpt" --eval_steps=100 --num_eval_images="$N" --eval_samplers= \
      > "$OUT/reports/step_$ckpt.log" 2>&1
    cp "$OUT/work/evaluate/report.json" "$OUT/reports/step_$ckpt.json"
    python - "$OUT/reports/step_$ckpt.json" "$ckpt" >> "$OUT/curve.tsv" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
spaces = report["rows"][0]["spaces"]
trained = [n for n, kind in report["feature_spaces"].items() if kind == "trained"][0]
heldout = [n for n, kind in report["feature_spaces"].items() if kind != "trained"][0]
print(f"{sys.argv[2]}\t{spaces[trained]['fid']:.3f}\t{spaces[heldout]['fid']:.3f}")
PY
    last=$ckpt
    echo "$(date '+%F %T') step $ckpt: $(tail -n 1 "$OUT/curve.tsv")"
    [ "$ckpt" -eq "$FINAL" ] && break
  fi
  sleep 60
done
