#!/usr/bin/env bash
# GPU session: the fused SwiGLU matmul (kernels_pallas/swiglu_matmul.py, Mosaic GPU) against XLA: the kernel
# alone (with a tile sweep), then the Sudoku-Extreme train step at batch 768 and the rollout at batch 1024
# with mlp_impl xla and pallas (cuDNN attention). Run from the repo root; everything lands in $OUT.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; ITERS=${ITERS:-30}
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/env_swiglu.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/env_swiglu.txt"
python3 -m benchmarks.kernels --kernel swiglu --shape 768x82 --shape 1024x82 --iters 50 ${SWEEP:---sweep} \
  --out "$OUT/results" 2>&1 | grep -v Warning | tee "$OUT/swiglu_kernel.log"
python3 -m benchmarks.train_step --preset sudoku_extreme --batch 768 ${BATCHES:-} --iters "$ITERS" --torch none \
  --attention-impl cudnn --mlp-impl xla --mlp-impl pallas --out "$OUT/results" 2>&1 | grep -v Warning \
  | tail -8 | tee "$OUT/swiglu_train_step.log"
python3 -m benchmarks.rollout --preset sudoku_extreme --batch 1024 --iters "$ITERS" --no-torch \
  --attention-impl cudnn --mlp-impl xla --mlp-impl pallas --out "$OUT/results" 2>&1 | grep -v Warning \
  | tail -6 | tee "$OUT/swiglu_rollout.log"
