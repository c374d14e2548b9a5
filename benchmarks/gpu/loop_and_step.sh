#!/usr/bin/env bash
# GPU session (one 10-minute device call): the training loop fed four ways (benchmarks/train_loop.py),
# then the Sudoku-Extreme train step at batch 768 for attention {xla,cudnn,pallas} x norm {xla,pallas}.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -f /tmp/sudoku-1k/test/dataset.json ] || python3 -m experiments.sudoku build --out /tmp/sudoku-1k --source .gpu_data \
  --train-size 1000 --num-aug 1000 --test-size "${TEST_SIZE:-5000}" --workers 16 > /tmp/build.log 2>&1
timeout "${LOOP_TIMEOUT:-240}" python3 -m benchmarks.train_loop --data /tmp/sudoku-1k --attention-impl cudnn \
  --steps "${LOOP_STEPS:-200}" --profile-out "$OUT/train_loop.prof" --out /tmp/loop 2>&1 \
  | grep --line-buffered -v Warning > "$OUT/train_loop.log"
cp /tmp/loop/*.json "$OUT/train_loop.json" 2>/dev/null
timeout "${STEP_TIMEOUT:-300}" python3 -m benchmarks.train_step --preset sudoku_extreme --batch "${BATCH:-768}" \
  --iters "${ITERS:-30}" --attention-impl xla --attention-impl cudnn --attention-impl pallas --norm-impl xla \
  --norm-impl pallas --out /tmp/step 2>&1 | grep --line-buffered -v Warning > "$OUT/train_step.log"
cp /tmp/step/*.json "$OUT/train_step.json" 2>/dev/null
grep -E "steps|train " "$OUT/train_loop.log"; tail -9 "$OUT/train_step.log"
