#!/usr/bin/env bash
# EXPERIMENT (session 5): q/k/v and gate/up as separate matmuls on slices of the fused weights
# (HRM_SPLIT_PROJ=1) against the fused projections: train step, its profile, and the rollout.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for split in 1 2 0; do
  HRM_SPLIT_PROJ=$split timeout 200 python3 -m benchmarks.train_step --batch 768 --attention-impl cudnn --torch none \
    --iters 30 --out "$OUT/step$split" 2>&1 | grep -v Warning | tail -3 | tee -a "$OUT/split.log"
done
HRM_SPLIT_PROJ=2 timeout 150 python3 -m benchmarks.profile_step --batch 768 --attention-impl cudnn --out "$OUT" 2>&1 \
  | grep -v Warning | head -40 > "$OUT/profile_split.log"; head -30 "$OUT/profile_split.log"
for split in 2; do
  HRM_SPLIT_PROJ=$split timeout 120 python3 -m benchmarks.rollout --batch 1024 --attention-impl cudnn --no-torch \
    --iters 10 --out "$OUT/roll$split" 2>&1 | grep -v Warning | tail -3 | tee -a "$OUT/split.log"
done
