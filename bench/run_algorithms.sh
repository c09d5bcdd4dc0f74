#!/usr/bin/env bash
# Issue 27 point 3 on one GPU: each sparse algorithm (quest, shadowkv, retroinfer, seer) on the
# fast path. Run from the repository root:
#
#     OUT=/some/dir bash bench/run_algorithms.sh graphs step     # call 1
#     OUT=/some/dir bash bench/run_algorithms.sh throughput      # call 2
#
# graphs:     decode_graphs_check per algorithm (eager against CUDA graphs: identical tokens,
#             graphs really replayed), Llama-3.2-1B shape, 2,048-token prompts, batch 1 and 8.
# step:       the decode step at equal batch, CUDA graphs, 8 x 32K (STEP_BATCH, STEP_LEN),
#             budget 512 (1.6% of the context): dense, then each algorithm under spin and
#             sparse-naive (spin_kernel_profile.py --graphs: step p50, GPU replay time, hit rate,
#             H2D bytes, host synchronisations per step, kernels per step).
# throughput: `spin-ray bench`, half-scale LongBench-v2-like (8 prompts at once, budget 1,024,
#             equal HBM of 131,072 tokens, CPU tier 262,144, 45 s windows): dense, then spin
#             with each algorithm.
# Llama-3.1-8B shape (random weights), bf16. Everything printed lands in $OUT (*.log, *.json).
# STOP_AT (seconds, default 570): a run that would start later than STOP_AT - its own limit is
# skipped (said in commands.txt), so one device call of 600 s returns what it measured.
set -u
OUT=${OUT:?set OUT to a folder for logs and results}
ALGORITHMS=${ALGORITHMS:-quest shadowkv retroinfer seer}
export PYTHONUNBUFFERED=1
# spin_ray.kernels lives in kernels/ (pyproject's package-dir): assemble the package in /tmp
PKG=/tmp/spin_ray_pkg
rm -rf "$PKG" && mkdir -p "$PKG" && cp -r spin_ray "$PKG"/ && cp -r kernels "$PKG"/spin_ray/kernels
export PYTHONPATH=$PKG
REPO=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

run() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    if ((SECONDS + limit > ${STOP_AT:-570})); then
        echo "=== $name skipped at t=${SECONDS}s (STOP_AT ${STOP_AT:-570})" | tee -a "$OUT/commands.txt"
        return
    fi
    echo "=== $name (t=${SECONDS}s): $*" | tee -a "$OUT/commands.txt"
    (cd /tmp && timeout "$limit" "$@") > "$OUT/$name.log" 2>&1
    echo "rc=$? at t=${SECONDS}s" | tee -a "$OUT/$name.log"
}

for stage in "$@"; do
    case $stage in
    graphs)
        for algorithm in ${ALGORITHMS/quest/}; do
            run "graphs-$algorithm" 90 python3 "$REPO/bench/decode_graphs_check.py" \
                --device cuda --model llama-3.2-1b --modes spin --sparse "$algorithm" \
                --batch-sizes 1,8 --max-tokens 32 --output "$OUT/graphs-$algorithm.json"
            tail -6 "$OUT/graphs-$algorithm.log"
        done
        ;;
    step)
        step_args=(--model llama-3.1-8b --batch "${STEP_BATCH:-8}" --prompt-len "${STEP_LEN:-32768}"
                   --token-budget 512 --steps 8 --warmup-steps 32 --graphs)
        run step-dense 100 python3 "$REPO/bench/spin_kernel_profile.py" --mode dense "${step_args[@]}"
        grep -h "graph decode step\|rc=" "$OUT/step-dense.log"
        for algorithm in $ALGORITHMS; do
            for mode in spin sparse-naive; do
                run "step-$algorithm-$mode" 100 python3 "$REPO/bench/spin_kernel_profile.py" \
                    --mode "$mode" --sparse "$algorithm" "${step_args[@]}"
                grep -h "graph decode step\|hit rate\|synchronisations per\|rc=" \
                    "$OUT/step-$algorithm-$mode.log"
            done
        done
        ;;
    throughput)
        bench_args=(--model llama-3.1-8b --device cuda --dtype bfloat16 --no-progress
                    --workload longbench-v2 --scale 0.5 --output-len 256 --num-prompts 8
                    --request-rate inf --token-budget 1024 --gpu-cache-tokens 131072
                    --cpu-cache-tokens 262144 --time-limit "${TIME_LIMIT:-45}")
        first=1
        for algorithm in $ALGORITHMS; do
            modes=spin
            [[ $first == 1 ]] && modes=dense,spin && first=0
            run "bench-$algorithm" 200 python3 -m spin_ray.cli bench "${bench_args[@]}" \
                --modes "$modes" --sparse "$algorithm" --output "$OUT/bench-$algorithm.json"
            tail -12 "$OUT/bench-$algorithm.log"
        done
        ;;
    *) echo "unknown stage $stage" ;;
    esac
done
echo "=== done at ${SECONDS}s"
