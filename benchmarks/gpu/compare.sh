#!/usr/bin/env bash
# GPU session: per-kernel profile of the train step, then JAX vs the torch module (eager and
# torch.compile) side by side: the train step at batch 384 and 768, and the 16-segment rollout at
# batch 1, 64 and 1024. Runs in the background (it takes ~15 minutes); poll with compare_poll.sh.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/compare; rm -rf "$R"; mkdir -p "$R"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,driver_version --format=csv > "$R/env.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, 'torch', torch.__version__)" >> "$R/env.txt" 2>&1
setsid nohup bash -c "
  python3 -m benchmarks.profile_step --batch 768 --attention-impl cudnn --out $R > $R/profile.log 2>&1
  python3 -m benchmarks.train_step --batch 384 --batch 768 --attention-impl cudnn --attention-impl pallas \
    --torch eager --torch compile --iters 50 --out $R > $R/train_step.log 2>&1
  python3 -m benchmarks.rollout --batch 1 --batch 64 --batch 1024 --attention-impl cudnn --attention-impl pallas \
    --iters 20 --out $R > $R/rollout.log 2>&1
  touch $R/DONE" > /dev/null 2>&1 < /dev/null &
sleep "${FIRST_WAIT:-60}"; cat "$R/env.txt"; grep -v Warning "$R/profile.log" | tail -5
