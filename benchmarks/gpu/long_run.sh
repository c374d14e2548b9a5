#!/usr/bin/env bash
# Start the Sudoku-Extreme-1k protocol (paper preset, global batch 768, the 26,041-step schedule) in
# the background for as many steps as one machine lease allows; poll with poll.sh (keep calls less
# than 30 s apart so the machine stays). Data from .gpu_data/ (the shared Sudoku collections).
# DEVICES=N splits each batch over N GPUs (data parallel); STEPS caps the steps (the schedule is 26,041);
# MLP=xla turns off the fused SwiGLU kernel (Hopper only).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# TEST_SIZE empty or unset: the full held-out split (every hard puzzle not used for training, ~47k).
python3 -m experiments.sudoku build --out /tmp/sudoku-1k --source .gpu_data --train-size 1000 --num-aug 1000 \
  ${TEST_SIZE:+--test-size "$TEST_SIZE"} --workers "${WORKERS:-16}" > "$OUT/build.log" 2>&1; tail -2 "$OUT/build.log"
cp "$OUT/build.log" /tmp/build.log
# The machine's ceiling right now (bf16 8192^3 matmuls for ~5 s): leases differ (see BUILD_NOTES, GPU speed).
python3 -c "
import jax, jax.numpy as jnp, time
x = jnp.ones((8192, 8192), jnp.bfloat16); f = jax.jit(lambda a: a @ a); f(x).block_until_ready()
ts = []
for _ in range(200):
    t = time.perf_counter(); f(x).block_until_ready(); ts.append(time.perf_counter() - t)
ts.sort(); print('bf16 matmul TFLOP/s over 200 calls: median %.0f, min-time %.0f' % (2 * 8192**3 / ts[100] / 1e12, 2 * 8192**3 / ts[0] / 1e12))
" 2>&1 | grep -v Warning | tee "$OUT/ceiling.txt"
setsid nohup python3 -m experiments.sudoku train --data /tmp/sudoku-1k --preset sudoku_extreme --out /tmp/long \
  --attention-impl "${ATTN:-cudnn}" --mlp-impl "${MLP:-pallas}" --max-steps "${STEPS:-15000}" --eval-every "${EVAL_EVERY:-1500}" --log-every 100 \
  --eval-batch-size 1024 --devices "${DEVICES:-1}" \
  --no-progress > /tmp/long.log 2>&1 < /dev/null &
sleep "${FIRST_WAIT:-150}"; grep -v Warning /tmp/long.log | tail -4; tail -2 /tmp/long/metrics.jsonl 2>/dev/null | cut -c1-400
