#!/usr/bin/env bash
# Wait up to $WAIT seconds for the long run (long_run.sh), then copy its logs, metrics and plot to $OUT.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for _ in $(seq 1 "${WAIT:-500}"); do pgrep -f "experiments.sudoku train" > /dev/null || break; sleep 1; done
cp /tmp/long.log /tmp/build.log "$OUT/" 2>/dev/null; cp /tmp/long/metrics.jsonl /tmp/long/curves.png "$OUT/" 2>/dev/null
grep '"eval"' /tmp/long/metrics.jsonl | tail -3 | cut -c1-300; tail -1 /tmp/long/metrics.jsonl | cut -c1-300
pgrep -f "experiments.sudoku train" > /dev/null && echo "still running" || { echo finished; grep -v Warning /tmp/long.log | tail -14; }
