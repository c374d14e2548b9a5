#!/usr/bin/env bash
# Wait up to $WAIT seconds for fused_mlp.sh, then bring its logs and results back in $OUT.
R=/tmp/s5; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for _ in $(seq 1 "${WAIT:-500}"); do [ -e "$R/DONE" ] && break; sleep 1; done
cp "$R"/*.log "$R/env.txt" "$OUT/" 2>/dev/null; tar czf "$OUT/results.tgz" -C "$R" . 2>/dev/null
[ -e "$R/DONE" ] && echo DONE || echo "still running"; tail -40 "$R/kernels.log"; cat "$R/train_step.log"; cat "$R/rollout.log" 2>/dev/null | tail -12
