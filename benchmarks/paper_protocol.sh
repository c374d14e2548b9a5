#!/usr/bin/env bash
# The paper's Sudoku-Extreme-1k protocol on any GPU host, then the speed benchmarks, from the repository root.
#
#   bash benchmarks/paper_protocol.sh                   # everything below, on one GPU
#   DEVICES=4 bash benchmarks/paper_protocol.sh         # the training split over 4 GPUs (data parallel)
#   STAGES=speed bash benchmarks/paper_protocol.sh      # only the train-step and rollout benchmarks
#
# Stages (STAGES, space-separated; default "data train speed"):
#   data   python -m experiments.sudoku build: 1,000 hard training puzzles x 1,000 augmentations, every other hard
#          puzzle held out (the reference's dataset/build_sudoku_dataset.py sizes); needs the Sudoku collections
#          in SUDOKU_SOURCE (default ../shared/data/sudoku).
#   train  python -m experiments.sudoku train --preset sudoku_extreme: global batch 768, the full 26,041-step
#          schedule unless STEPS caps it, evaluating every EVAL_EVERY steps; the run folder holds metrics.jsonl,
#          curves.png and the checkpoints (continue an interrupted run with RESUME=1).
#   speed  python -m benchmarks.train_step and benchmarks.rollout: JAX against torch.compile, JSON into OUT.
#
# Settings: OUT (default runs/paper-protocol), DATA (default $OUT/sudoku-extreme-1k), DEVICES (1), STEPS (the
# schedule), EVAL_EVERY (2604: ten evaluations), ATTN (cudnn), MLP (xla; pallas needs a Hopper GPU), WORKERS
# (solver processes for the build; default all CPUs). Results from earlier runs: benchmarks/results/README.md.
set -euo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/paper-protocol}
DATA=${DATA:-$OUT/sudoku-extreme-1k}
STAGES=${STAGES:-data train speed}
mkdir -p "$OUT"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/env.txt" || true

if [[ " $STAGES " == *" data "* && ! -f "$DATA/train/dataset.json" ]]; then
  python3 -m experiments.sudoku build --out "$DATA" --source "${SUDOKU_SOURCE:-../shared/data/sudoku}" \
    --train-size 1000 --num-aug 1000 ${WORKERS:+--workers "$WORKERS"} | tee "$OUT/build.log"
fi

if [[ " $STAGES " == *" train "* ]]; then
  python3 -m experiments.sudoku train --data "$DATA" --preset sudoku_extreme --out "$OUT/train" \
    --attention-impl "${ATTN:-cudnn}" --mlp-impl "${MLP:-xla}" --devices "${DEVICES:-1}" \
    --eval-every "${EVAL_EVERY:-2604}" --eval-batch-size 1024 --log-every 100 --no-progress \
    ${STEPS:+--max-steps "$STEPS"} ${RESUME:+--resume} 2>&1 | tee -a "$OUT/train.log"
fi

if [[ " $STAGES " == *" speed "* ]]; then
  python3 -m benchmarks.train_step --preset sudoku_extreme --batch 768 --batch 384 --attention-impl "${ATTN:-cudnn}" \
    --mlp-impl xla --torch compile --iters 30 --out "$OUT/speed" | tee "$OUT/train_step.log"
  python3 -m benchmarks.rollout --batch 1 --batch 64 --batch 1024 --attention-impl "${ATTN:-cudnn}" --iters 20 \
    --out "$OUT/speed" | tee "$OUT/rollout.log"
fi
