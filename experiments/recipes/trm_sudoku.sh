#!/usr/bin/env bash
# TRM-MLP (preset trm_sudoku_mlp, 5,028,866 parameters) on the Sudoku-Extreme-1k protocol on one GPU, for a
# wall-time budget: build 1,000 hard training puzzles x 1,000 augmentations with TEST_SIZE other hard puzzles
# held out, train with the reference README's hyperparameters (global batch 768, lr 1e-4 after a 2,000-step
# warm-up, weight decay 1.0, EMA 0.999), stop after MINUTES (SIGINT: the trainer finishes the step and saves),
# evaluate the EMA weights on the held-out puzzles with all 16 segments and with TRM's early halting, and export
# them with the reference's key names (safetensors).
#
#   SOURCE=../shared/data/sudoku MINUTES=12 OUT=out bash experiments/recipes/trm_sudoku.sh
#
# The schedule is the full protocol's (65,104 steps) and constant after warm-up (lr_min_ratio 1.0), so a run
# stopped on time is the start of the paper's run, not a shortened schedule; --resume continues it.
# TRAIN_FLAGS adds flags to the train command (e.g. "--max-steps 2 --global-batch-size 8" for a CPU smoke test).
set -euo pipefail
SOURCE=${SOURCE:-../shared/data/sudoku}
MINUTES=${MINUTES:-12}
TRAIN_SIZE=${TRAIN_SIZE:-1000}
NUM_AUG=${NUM_AUG:-1000}
TEST_SIZE=${TEST_SIZE:-5000}
EVAL_EVERY=${EVAL_EVERY:-1000}
EVAL_BATCH=${EVAL_BATCH:-1000}
OUT=${OUT:-runs/trm-sudoku-results}
DATA=${DATA:-runs/data/sudoku-extreme-1k}
RUN=${RUN:-runs/trm-sudoku}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
PY=${PY:-python}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ ! -f "$DATA/train/dataset.json" ]; then
  $PY -m experiments.sudoku build --out "$DATA" --source "$SOURCE" --train-size "$TRAIN_SIZE" --num-aug "$NUM_AUG" \
    --test-size "$TEST_SIZE" ${WORKERS:+--workers "$WORKERS"} > "$OUT/build.log" 2>&1
fi
start=$(date +%s)
# shellcheck disable=SC2086  # TRAIN_FLAGS is a list of flags
timeout --signal=INT --kill-after=120 "$((MINUTES * 60))" \
  $PY -m experiments.sudoku train --data "$DATA" --preset trm_sudoku_mlp --out "$RUN" \
    --eval-every "$EVAL_EVERY" --eval-batch-size "$EVAL_BATCH" --log-every 100 --no-progress $TRAIN_FLAGS \
    > "$OUT/train.log" 2>&1 || echo "training stopped (exit $?) after $(( $(date +%s) - start )) s" >> "$OUT/train.log"
cp "$RUN/metrics.jsonl" "$OUT/" && cp "$RUN"/*.png "$OUT/" 2>/dev/null || true
$PY -m experiments.sudoku eval --checkpoint "$RUN" --data "$DATA" --split test --batch-size "$EVAL_BATCH" \
  --json "$OUT/eval_test.json" > "$OUT/eval.log" 2>&1
$PY -m export torch --checkpoint "$RUN" --out "$OUT/model.safetensors" >> "$OUT/eval.log" 2>&1
echo "results in $OUT: metrics.jsonl, curves, eval_test.json, model.safetensors"
