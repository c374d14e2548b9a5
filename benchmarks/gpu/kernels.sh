#!/usr/bin/env bash
# GPU session: the Pallas kernels (kernels_pallas/) against XLA, then the Sudoku-Extreme training step
# with every attention x norm implementation. Run from the repo root; everything lands in $OUT.
#   bash benchmarks/gpu/kernels.sh kernels  # kernels at 384x82, 768x82, 32x900, then a block-size sweep (SWEEP=0: none)
#   bash benchmarks/gpu/kernels.sh train    # train step, attention {xla,pallas,cudnn} x norm {xla,pallas}, batch 384/768
#   bash benchmarks/gpu/kernels.sh          # both (may need more than one 10-minute device call)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGE=${1:-all}; ITERS=${ITERS:-50}; SWEEP_FLAG=$([[ ${SWEEP:-1} == 0 ]] || echo --sweep)
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/env_kernels.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/env_kernels.txt"
if [[ $STAGE == all || $STAGE == kernels ]]; then
  python3 -m benchmarks.kernels --iters "$ITERS" $SWEEP_FLAG --out "$OUT/kernels" 2>&1 | grep -v Warning \
    | tee "$OUT/kernels.log"
fi
if [[ $STAGE == all || $STAGE == train ]]; then
  # One process per attention impl (each writes its own results folder: a run replaces the key it saves).
  for attn in xla pallas cudnn; do
    python3 -m benchmarks.train_step --preset sudoku_extreme --batch 384 --batch 768 --iters "$ITERS" \
      --attention-impl "$attn" --norm-impl xla --norm-impl pallas --out "$OUT/train_$attn" 2>&1 \
      | grep -v Warning | tail -6 | tee "$OUT/train_step_$attn.log"
  done
fi
