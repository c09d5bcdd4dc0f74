#!/usr/bin/env bash
# Issue 4 on one H200: every spin-ray mode on the same LongBench-v2-like workload, Llama-3.1-8B
# shape (random weights), bf16, in one `spin-ray bench` run; then, while the time budget lasts,
# spin vs dense at growing input lengths. Run from the repository root:
#
#     OUT=/some/dir bash bench/run_h200_modes.sh [budget_seconds]
#
# MODES (default: all four), TIME_LIMIT (seconds per mode, default 45) and SCALING (0 skips
# the input-length sweep) adjust it.
#
# Everything printed also lands in $OUT (*.log, *.json). The HBM KV capacity is the same for
# every mode (--gpu-cache-tokens: dense's KV pool; spin's slots plus its dense layers' KV) and is
# deliberately small, so the scaled-down workload keeps the regime the issue is about: far
# more context than HBM holds.
set -u
OUT=${OUT:?set OUT to a folder for logs and results}
BUDGET=${1:-270}
export PYTHONUNBUFFERED=1

# spin_ray.kernels lives in kernels/ (pyproject's package-dir); assemble the package in /tmp
# rather than installing anything on the machine, and run from there (the repository root would
# put its own spin_ray, without kernels, first on the path).
PKG=/tmp/spin_ray_pkg
rm -rf "$PKG" && mkdir -p "$PKG" && cp -r spin_ray "$PKG"/ && cp -r kernels "$PKG"/spin_ray/kernels
export PYTHONPATH=$PKG

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
    | tee -a "$OUT/gpu.txt"

bench() {  # name, then the bench arguments
    local name=$1
    shift
    echo "=== $name (t=${SECONDS}s): spin-ray bench $*" | tee -a "$OUT/commands.txt"
    (cd "$PKG" && python3 -m spin_ray.cli bench --model llama-3.1-8b --device cuda --dtype bfloat16 \
        --no-progress --output "$OUT/$name.json" "$@") 2>&1 | tee "$OUT/$name.log"
}

bench modes --modes "${MODES:-dense,spin,sparse-naive,dense-offload}" --sparse quest \
    --workload longbench-v2 --scale 0.125 --output-len 256 --num-prompts 16 \
    --request-rate inf --token-budget 512 --gpu-cache-tokens 49152 --cpu-cache-tokens 131072 \
    --time-limit "${TIME_LIMIT:-45}"

for len in 16000 32000 64000 128000; do  # 128000 + 64 fits Llama-3.1's 131072 positions
    if [[ ${SCALING:-1} == 0 ]]; then
        break
    fi
    if ((SECONDS > BUDGET - 60)); then
        echo "=== scaling at $len skipped: ${SECONDS}s of ${BUDGET}s used" | tee -a "$OUT/commands.txt"
        continue
    fi
    bench "scaling-$len" --modes dense,spin --sparse quest --input-len "$len" --output-len 64 \
        --num-prompts 2 --request-rate inf --token-budget 2048 \
        --cpu-cache-tokens $((2 * len + 8192)) \
        --time-limit 40
done
echo "=== done at ${SECONDS}s"
