#!/usr/bin/env bash
# Wait up to $WAIT seconds for compare.sh's background job, then copy its logs and results to $OUT.
OUT=${OUT:-/tmp/out}; R=/tmp/compare; mkdir -p "$OUT"
for _ in $(seq 1 "${WAIT:-540}"); do [ -e "$R/DONE" ] && break; sleep 1; done
for f in env.txt profile.log train_step.log rollout.log profile_step.json; do
  [ -e "$R/$f" ] && grep -v "Warning\|warn(" "$R/$f" > "$OUT/$f"; done
cp "$R"/h100-*.json "$R"/h200-*.json "$OUT/" 2>/dev/null
[ -e "$R/DONE" ] && echo "compare: done" || echo "compare: still running"
for f in profile.log train_step.log rollout.log; do echo "== $f"; tail -14 "$OUT/$f" 2>/dev/null; done
