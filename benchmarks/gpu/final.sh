#!/usr/bin/env bash
# GPU session after the embedding fix (one 10-minute call): the train step at batch 768 for each
# attention impl, then the Sudoku-Extreme-1k protocol for the rest of the call; results in $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m experiments.sudoku build --out /tmp/sudoku-1k --source .gpu_data --train-size 1000 --num-aug 1000 \
  --test-size 5000 --workers 16 > /tmp/build.log 2>&1 &
timeout 200 python3 -m benchmarks.train_step --preset sudoku_extreme --batch 768 --iters 30 --attention-impl xla \
  --attention-impl cudnn --attention-impl pallas --out /tmp/step 2>&1 | grep -v Warning | tail -5 | tee "$OUT/train_step.log"
cp /tmp/step/*.json "$OUT/train_step.json" 2>/dev/null
wait
setsid nohup python3 -m experiments.sudoku train --data /tmp/sudoku-1k --preset sudoku_extreme --out /tmp/long \
  --attention-impl cudnn --eval-every 1000 --log-every 100 --no-progress > /tmp/long.log 2>&1 < /dev/null &
sleep "${RUN_SECONDS:-330}"
cp /tmp/long.log "$OUT/long.log"; cp /tmp/long/metrics.jsonl /tmp/long/curves.png "$OUT/" 2>/dev/null
grep '"eval"' /tmp/long/metrics.jsonl | tail -2 | cut -c1-250; tail -1 /tmp/long/metrics.jsonl | cut -c1-250
