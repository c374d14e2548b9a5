#!/usr/bin/env bash
# GPU session, part 2: wait for part 1's smoke run, collect it, then the rollout benchmark (JAX vs torch).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for _ in $(seq 1 "${WAIT_S:-240}"); do pgrep -f "experiments.sudoku train" > /dev/null || break; sleep 1; done
pgrep -f "experiments.sudoku train" > /dev/null && echo "smoke run still going"
cp /tmp/smoke.log "$OUT/smoke.log"; cp /tmp/smoke/metrics.jsonl /tmp/smoke/curves.png "$OUT/" 2>/dev/null
tail -15 /tmp/smoke.log
python3 -m benchmarks.rollout --preset sudoku_extreme --batch 1 --batch 64 --batch 1024 --iters 20 --out "$OUT" 2>&1 \
  | grep -v Warning | tee "$OUT/rollout.log"
python3 -m benchmarks.train_step --preset sudoku_extreme --batch 384 --batch 768 --iters 50 --attention-impl cudnn \
  --out "$OUT/cudnn" 2>&1 | grep -v Warning | tail -8 | tee "$OUT/train_step_cudnn.log"
