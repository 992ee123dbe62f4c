#!/usr/bin/env bash
# The GPU numbers of one machine in one command (README "Speed on one GPU"):
#
#   bash benchmarks/gpu_report.sh OUT_DIR [DINO_DIR OFFICIAL_BENCH]
#
# 1. ViT-S/16 multi-crop (2x224 + 10x96), bfloat16 compute with float32 master
#    weights, cuDNN flash attention (--fused_attention), batch 128: the bare step
#    and the training loop (trainer.train_and_evaluate), median of 3 each, images/s, MFU, peak memory; with
#    DINO_DIR (a facebookresearch/dino checkout) and OFFICIAL_BENCH
#    (official_step_bench.py) the official step (fp16 autocast + GradScaler, its
#    --use_fp16) on the same GPU between our repeats, and the ratio.
# 2. The same bare step with XLA's attention instead of cuDNN's (what the fused
#    kernel gains), then under each XLA GPU flag set in XLA_FLAG_SETS (one run each).
#
# Writes OUT_DIR/{device.txt,main.log,variants.log}; each benchmark's last line is
# JSON. Environment: PYTHON (ours, default python3), OFFICIAL_PYTHON (torch +
# torchvision, default PYTHON), ARGS (the step's recipe arguments, default the
# ViT-S/16 ones above; e.g. ARGS="--recipe nano --batch_size 8" for a CPU smoke
# run), OFFICIAL_DEVICE (default cuda), STEPS (default 20), XLA_FLAG_SETS (";"-separated; "" for none).
set -uo pipefail
out=${1:?usage: gpu_report.sh OUT_DIR [DINO_DIR OFFICIAL_BENCH]}
dino=${2:-}
bench=${3:-}
py=${PYTHON:-python3}
official_py=${OFFICIAL_PYTHON:-$py}
args=${ARGS:---recipe vit_s16 --batch_size 128 --dtype bfloat16}
steps=${STEPS:-20}
flag_sets=${XLA_FLAG_SETS---xla_gpu_enable_latency_hiding_scheduler=true;--xla_gpu_enable_triton_gemm=false}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out" || exit 2

{ if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; else echo "no nvidia-smi"; fi
  "$py" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} | tee "$out/device.txt"

official=()
if [ -n "$dino" ]; then
  [ -f "$bench" ] || { echo "error: OFFICIAL_BENCH '$bench' is not a file" >&2; exit 2; }
  official=(--official "$dino" --official_bench "$bench" --official_python "$official_py"
            --official_device "${OFFICIAL_DEVICE:-cuda}" --official_steps "$steps")
  [ "${OFFICIAL_DEVICE:-cuda}" = cuda ] && official+=(--official_fp16)  # autocast is CUDA's
fi

# shellcheck disable=SC2086  # ARGS is a list of arguments
"$py" "$here/train_step.py" $args --fused_attention --steps "$steps" --loop "$steps" \
    --log_every_steps 10 --repeats 3 "${official[@]}" 2>&1 | tee "$out/main.log"
status=${PIPESTATUS[0]}

: > "$out/variants.log"
variant() {  # variant LABEL XLA_FLAGS [extra args]: one bare-step run, its JSON line labelled
  local label=$1 flags=$2; shift 2
  # shellcheck disable=SC2086
  XLA_FLAGS="$flags" "$py" "$here/train_step.py" $args --steps "$steps" "$@" 2>&1 \
      | tail -1 | sed "s|^|$label |" | tee -a "$out/variants.log"
}
variant "xla-attention" ""
IFS=';' read -r -a sets <<< "$flag_sets"
for f in "${sets[@]}"; do
  [ -n "$f" ] && variant "fused $f" "$f" --fused_attention
done
exit "$status"
