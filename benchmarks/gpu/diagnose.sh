#!/usr/bin/env bash
# GPU session (one 10-minute device call): build the Sudoku-Extreme-1k set in the background, time the
# Pallas kernels against XLA, then the training loop fed four ways (benchmarks/train_loop.py). At most
# 8 files land in $OUT (the device tool's limit).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; nproc; } > "$OUT/env.txt" 2>&1
setsid nohup python3 -m experiments.sudoku build --out /tmp/sudoku-1k --source .gpu_data --train-size 1000 \
  --num-aug 1000 --test-size "${TEST_SIZE:-5000}" --workers 12 > /tmp/build.log 2>&1 < /dev/null &
timeout "${KERNEL_TIMEOUT:-240}" python3 -m benchmarks.kernels --iters 50 ${SWEEP_FLAG:---sweep} --out /tmp/kern \
  2>&1 | grep -v Warning > "$OUT/kernels.log"
cp /tmp/kern/*.json "$OUT/kernels.json" 2>/dev/null
while [ ! -f /tmp/sudoku-1k/test/dataset.json ]; do sleep 5; done; tail -2 /tmp/build.log > "$OUT/build.log"
timeout "${LOOP_TIMEOUT:-280}" python3 -m benchmarks.train_loop --data /tmp/sudoku-1k --attention-impl cudnn \
  --steps 300 --out /tmp/loop 2>&1 | grep -v Warning > "$OUT/train_loop.log"
cp /tmp/loop/*.json "$OUT/train_loop.json" 2>/dev/null
tail -8 "$OUT/kernels.log"; tail -6 "$OUT/train_loop.log"
