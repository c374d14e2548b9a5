#!/usr/bin/env bash
# GPU session 5: the fused SwiGLU + add + RMSNorm kernel (kernels_pallas/mlp.py) alone (with a
# block-size sweep), in the train step and in the rollout, and XLA's own fusion flags on the step.
# Runs in the background (~10 minutes); poll with fused_mlp_poll.sh.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
R=/tmp/s5; rm -rf "$R"; mkdir -p "$R"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,driver_version --format=csv > "$R/env.txt"
python3 -c "import jax; print('jax', jax.__version__)" >> "$R/env.txt" 2>&1
step() {  # step LABEL XLA_FLAGS ARGS...: one train_step process (XLA flags are per process)
  local label=$1 flags=$2; shift 2
  echo "== $label XLA_FLAGS='$flags'" >> "$R/train_step.log"
  XLA_FLAGS="$flags" timeout 300 python3 -m benchmarks.train_step --batch 768 --attention-impl cudnn --torch none \
    --iters 30 --out "$R/step_$label" "$@" 2>&1 | grep -v Warning | tail -6 >> "$R/train_step.log"
}
setsid nohup bash -c "
  $(declare -f step); R=$R
  timeout 400 python3 -m benchmarks.kernels --kernel mlp --shape 768x82 --shape 1024x82 --sweep --iters 30 \
    --out $R/kernels 2>&1 | grep -v Warning > $R/kernels.log
  step fused '' --mlp-impl xla --mlp-impl pallas
  timeout 300 python3 -m benchmarks.rollout --batch 64 --batch 1024 --attention-impl cudnn --mlp-impl xla \
    --mlp-impl pallas --no-torch --iters 20 --out $R/rollout 2>&1 | grep -v Warning > $R/rollout.log
  step triton_any '--xla_gpu_triton_gemm_any=true'
  step triton_only '--xla_gpu_triton_gemm_any=true --xla_gpu_cublas_fallback=false'
  step cudnn_fusion '--xla_gpu_cudnn_gemm_fusion_level=3'
  step cublaslt '--xla_gpu_enable_cublaslt=true'
  touch $R/DONE" > /dev/null 2>&1 < /dev/null &
sleep "${FIRST_WAIT:-45}"; cat "$R/env.txt"; tail -5 "$R/kernels.log"
