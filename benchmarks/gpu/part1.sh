#!/usr/bin/env bash
# GPU session, part 1 (run from the repo root on the device machine, Sudoku collections in .gpu_data/):
# environment, the training-step benchmark, then the paper-preset smoke run started in the background
# (it outlives this command; part2.sh collects it). Everything lands in $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import jax, flax, optax, orbax.checkpoint, einops, chex, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)" 2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/env.txt"
python3 -m benchmarks.train_step --preset sudoku_extreme --batch 384 --batch 768 --iters 50 --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/train_step.log"
python3 -m experiments.sudoku build --out /tmp/sudoku-1k --source .gpu_data --train-size 1000 --num-aug 1000 \
  --test-size 2000 --workers 16 > "$OUT/build.log" 2>&1; tail -3 "$OUT/build.log"
setsid nohup python3 -m experiments.sudoku train --data /tmp/sudoku-1k --preset sudoku_extreme --out /tmp/smoke \
  --max-steps "${SMOKE_STEPS:-600}" --eval-every 300 --log-every 25 --no-progress > /tmp/smoke.log 2>&1 < /dev/null &
sleep 5; echo "smoke run started"; tail -3 /tmp/smoke.log
