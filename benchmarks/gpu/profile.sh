#!/usr/bin/env bash
# GPU session: per-kernel profile of the Sudoku-Extreme train step (benchmarks/profile_step.py).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,power.limit --format=csv > "$OUT/env.txt"
python3 -m benchmarks.profile_step --batch 768 --attention-impl "${ATTN:-cudnn}" --out "$OUT" 2>&1 \
  | grep --line-buffered -v Warning | tee "$OUT/profile.log" | head -60
