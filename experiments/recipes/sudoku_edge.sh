#!/usr/bin/env bash
# The recipe of the shipped Sudoku model (preset sudoku_edge) on one GPU: build the mixed-difficulty set from
# solved base puzzles, train for a wall-time budget, evaluate on every held-out set with and without Q-head
# early halting, and export the weights with the reference's key names (safetensors).
#
#   SOURCE=../shared/data/sudoku MINUTES=17 OUT=out bash experiments/recipes/sudoku_edge.sh
#
# SOURCE holds 17_clue.txt, forum_hardest_1905_11plus.txt and magictour_top1465.txt; the solved base puzzles
# are saved to $OUT/bases.npz (pass BASES=that file to rebuild the same set without solving again).
#
# The learning rate is constant after warm-up (lr_min_ratio 1.0, as the paper's runs), so stopping on time
# (SIGINT after MINUTES: the trainer finishes the step and saves it) changes nothing but the number of steps.
set -euo pipefail
BASES=${BASES:-}
SOURCE=${SOURCE:-../shared/data/sudoku}
MINUTES=${MINUTES:-17}
OUT=${OUT:-runs/sudoku-edge-results}
DATA=${DATA:-runs/data/sudoku-mixed}
RUN=${RUN:-runs/sudoku-edge}
PY=${PY:-python}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ -n "$BASES" ]; then bases=(--bases "$BASES"); else bases=(--source "$SOURCE" --bases-out "$OUT/bases.npz"); fi
$PY -m experiments.sudoku build-mixed "${bases[@]}" --out "$DATA" --variants 32 > "$OUT/build.log" 2>&1
start=$(date +%s)
timeout --signal=INT --kill-after=120 "$((MINUTES * 60))" \
  $PY -m experiments.sudoku train --data "$DATA" --preset sudoku_edge --out "$RUN" \
    --eval-every 2000 --checkpoint-every 1000 --eval-batch-size 1000 --log-every 100 --no-progress \
    > "$OUT/train.log" 2>&1 || echo "training stopped (exit $?) after $(( $(date +%s) - start )) s" >> "$OUT/train.log"
cp "$RUN/metrics.jsonl" "$OUT/" && cp "$RUN"/*.png "$OUT/" 2>/dev/null || true
for split in test_news test_17 test_hard; do
  $PY -m experiments.sudoku eval --checkpoint "$RUN" --data "$DATA" --split "$split" --batch-size 1000 \
    --json "$OUT/eval_$split.json" >> "$OUT/eval.log" 2>&1
done
$PY -m export torch --checkpoint "$RUN" --out "$OUT/model.safetensors" >> "$OUT/eval.log" 2>&1
$PY -c "import json, sys; from hrm_jax.checkpoint import read_meta; \
json.dump(read_meta(sys.argv[1])['model_config'], open(sys.argv[2], 'w'), indent=1)" "$RUN" "$OUT/config.json"
