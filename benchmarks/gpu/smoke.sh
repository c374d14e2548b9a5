#!/usr/bin/env bash
# GPU smoke run of the paper preset (Sudoku-Extreme-1k protocol, global batch 768) for a few hundred
# steps, in one call: build the data from .gpu_data/, train with evaluation, collect logs in $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m experiments.sudoku build --out /tmp/sudoku-1k --source .gpu_data --train-size 1000 --num-aug 1000 \
  --test-size "${TEST_SIZE:-2000}" --workers 16 > "$OUT/build.log" 2>&1; tail -2 "$OUT/build.log"
start=$(date +%s)
python3 -m experiments.sudoku train --data /tmp/sudoku-1k --preset sudoku_extreme --out /tmp/smoke \
  --attention-impl "${ATTN:-cudnn}" --max-steps "${SMOKE_STEPS:-1000}" --eval-every "${EVAL_EVERY:-500}" \
  --log-every 50 --no-progress 2>&1 | grep -v Warning | tee "$OUT/smoke.log"
echo "wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/smoke.log"
cp /tmp/smoke/metrics.jsonl /tmp/smoke/curves.png "$OUT/"
