#!/usr/bin/env bash
# Issue 4 on one H200 with CUDA-graph decode: the Llama-3.1-8B shape (random weights), bf16.
# Run from the repository root, naming the stages to run (in order):
#
#     OUT=/some/dir bash bench/run_h200_long.sh check scaling longbench
#
#   check      bench/decode_graphs_check.py: CUDA graphs vs eager, dense and spin (tokens, TPOT);
#              CHECK_MODES (default "dense,spin") may add spin+lookahead
#   profile    GPU time per kernel of eager decode steps (spin, sparse-naive, dense; 16 x 2K)
#   kernels    bench/sparse_gpu.py: sparse kernels vs references, UVA gather bandwidth
#              (KERNEL_SECTIONS, default "kernels bandwidth")
#   prefillprofile  wall and GPU time per kernel of one PREFILL_LEN-token prompt's prefill
#              (chunks of 8192), PREFILL_MODES (default "dense spin"; spin@cpu: spin with HBM
#              for half the prompt, so every chunk reads its prefix from the CPU tier)
#   mixedprofile  the same beside decoding requests, as under longbenchdecode's load:
#              MIXED_RUNS (default "dense:2 spin:9": dense beside 2, its batch of 3 at equal
#              HBM; spin beside 9 at MIXED_GPU_TOKENS=131072 HBM tokens, its floors) of
#              BESIDE_LEN (50000) tokens each, with CUDA graphs; also the GPU's idle gaps and the
#              host ops behind the longest
#   mixedhost  the same without the torch profiler: wall time per mixed step, then the host's
#              own time per function (cProfile) over a second prompt's prefill
#   prefillattn  bench/decode_attention.py's correctness checks and prefill section: the bf16
#              prefill paths (cuDNN prefix + causal chunk, merged) against the reference, timed
#              (cuDNN's ragged path unless CUDNN_SDPA_AVOID_RECOMPILE=0)
#   tokens     bench/sparse_gpu.py: every sparse mode generates the dense engine's tokens
#              (spin-tiny, fp32, chunked prefill beside decodes)
#   hostprofile  host time of spin graph steps (cProfile) and kernels at 4 x 16K, budget 2048
#   steps      decode step time at a fixed batch (TPOT at the same batch size), dense vs spin,
#              8 x 32K, 8 x 64K, 4 x 128K, budget 2048, CUDA graphs
#   steady     the same after 64 warm-up decode steps (the HBM buffer filled); STEP_MODES
#              (default "dense spin") may name spin:R for spin with buffer ratio R and
#              spin+lookahead (or spin+lookahead:R) for spin fetching one layer early, and
#              spin+lookahead@S (:R) for it fetching the best-scored share S of the top-k
#   steadykernels  GPU time per kernel of eager spin decode steps after 64 warm-up steps
#   modes      the previous session's run (1/8-scale LongBench-v2-like, 8 requests), now with graphs
#   scaling    dense vs spin at 16K, 32K, 64K, 128K inputs (SCALING_LENS), 4 requests at once
#   longbench  dense, spin, sparse-naive (LONGBENCH_MODES) on the LongBench-v2-like workload at
#              half scale, with the same HBM KV capacity for every mode (so dense is capacity-bound)
#   longbenchdecode  dense and spin on that workload with its own output lengths (mean 2.5K at
#              half scale) instead of 256: saturating throughput when decode dominates, over a
#              LONGBENCH_LIMIT-second window (default 120; none: to the end); LONGBENCH_SCALE
#              (0.5), LONGBENCH_PROMPTS (24), LONGBENCH_SEED (0: the prompts, lengths and arrivals),
#              LONGBENCH_GPU_TOKENS (131072), LONGBENCH_CPU_TOKENS (524288) and LONGBENCH_BUDGET
#              (spin's token budget, 2048; a tag "-budgetN" names the logs) and
#              LONGBENCH_BUFFER_RATIO (spin's --buffer-ratio, 15; tag "-bufferR") change the
#              workload and the KV capacities for it and for longbenchfloor /
#              longbenchlookahead (the CPU tier is pinned at its exact size: 786432 tokens, 96.6 GB,
#              pinned on the H200 machine; torch's pinned allocator, rounding up to a power of
#              two, had failed at 589824)
#   longbenchfloor  spin alone on the longbenchdecode workload with --min-buffer-ratio R for each
#              R of MIN_BUFFER_RATIOS (default "4 8"): a larger floor admits fewer requests, each
#              with a larger HBM buffer (compare with longbenchdecode's dense in the same call)
#   longbenchlookahead  spin alone on the longbenchdecode workload with --lookahead (compare
#              with longbenchdecode's spin and dense in the same call); LOOKAHEAD_SHARE=S adds
#              --lookahead-share S
#   longbenchrate  dense and spin (LONGBENCH_MODES) on the longbenchdecode workload arriving
#              at LONGBENCH_RATE req/s (Poisson; default 0.1, above dense's ~0.05 req/s at full
#              scale): TTFT where dense saturates
#
# REPEATS=N (default 1) passes --repeats N to every `spin-ray bench` stage (runs of each mode,
# compared run by run and by median).
#
# CUDNN_SDPA_AVOID_RECOMPILE=0|1 exports PyTorch's TORCH_CUDNN_SDPA_AVOID_RECOMPILE with that
# value; unset, the engines set it to 1 themselves (`reuse_cudnn_plans_across_lengths`): cuDNN
# SDPA on BSHD tensors keys its plans on power-of-two lengths, so chunks of one prompt share
# plans instead of building one (~50 ms) per chunk; 0 measures the per-length plans.
#
# Everything printed also lands in $OUT/results.tgz (*.log, *.json; commands.txt lists every
# command), repacked after each stage: the device tool brings back at most 8 files, and a call
# cut off by its time limit still brings back the stages that finished.
set -u
OUT=${OUT:?set OUT to a folder for logs and results}
OUT_DIR=$OUT
mkdir -p "$OUT_DIR"  # e.g. OUT=$OUT/a for a second run in one device call
OUT=$(mktemp -d)  # the logs; packed into $OUT_DIR/results.tgz
pack() { tar czf "$OUT_DIR/results.tgz" -C "$OUT" .; }
export PYTHONUNBUFFERED=1
if [[ -n ${CUDNN_SDPA_AVOID_RECOMPILE:-} ]]; then
    export TORCH_CUDNN_SDPA_AVOID_RECOMPILE=$CUDNN_SDPA_AVOID_RECOMPILE
fi

# spin_ray.kernels lives in kernels/ (pyproject's package-dir): assemble the package in /tmp
PKG=/tmp/spin_ray_pkg
rm -rf "$PKG" && mkdir -p "$PKG" && cp -r spin_ray "$PKG"/ && cp -r kernels "$PKG"/spin_ray/kernels
export PYTHONPATH=$PKG
REPO=$PWD

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
echo "TORCH_CUDNN_SDPA_AVOID_RECOMPILE=${TORCH_CUDNN_SDPA_AVOID_RECOMPILE:-unset (the engines set 1)}" | tee -a "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
    | tee -a "$OUT/gpu.txt"

bench() {  # name, then the bench arguments
    local name=$1
    shift
    echo "=== $name (t=${SECONDS}s): spin-ray bench $*" | tee -a "$OUT/commands.txt"
    (cd "$PKG" && python3 -m spin_ray.cli bench --model llama-3.1-8b --device cuda --dtype bfloat16 \
        --no-progress --repeats "${REPEATS:-1}" --output "$OUT/$name.json" "$@") 2>&1 \
        | tee "$OUT/$name.log"
}

# the longbenchdecode workload: half scale (16K-60K inputs) by default; LONGBENCH_SCALE,
# LONGBENCH_PROMPTS, LONGBENCH_GPU_TOKENS, LONGBENCH_CPU_TOKENS change it (and name the logs)
LONGBENCH_TAG=""
if [ -n "${LONGBENCH_SCALE:-}${LONGBENCH_PROMPTS:-}${LONGBENCH_GPU_TOKENS:-}${LONGBENCH_CPU_TOKENS:-}" ]; then
    LONGBENCH_TAG="-scale${LONGBENCH_SCALE:-0.5}"
fi
[[ ${LONGBENCH_SEED:-0} != 0 ]] && LONGBENCH_TAG+="-seed$LONGBENCH_SEED"
[[ ${LONGBENCH_BUDGET:-2048} != 2048 ]] && LONGBENCH_TAG+="-budget$LONGBENCH_BUDGET"
[[ -n ${LONGBENCH_BUFFER_RATIO:-} ]] && LONGBENCH_TAG+="-buffer$LONGBENCH_BUFFER_RATIO"
longbench_decode=(--sparse quest --workload longbench-v2 --scale "${LONGBENCH_SCALE:-0.5}"
    --num-prompts "${LONGBENCH_PROMPTS:-24}" --token-budget "${LONGBENCH_BUDGET:-2048}" --seed "${LONGBENCH_SEED:-0}"
    --gpu-cache-tokens "${LONGBENCH_GPU_TOKENS:-131072}"
    --cpu-cache-tokens "${LONGBENCH_CPU_TOKENS:-524288}")
[[ -n ${LONGBENCH_BUFFER_RATIO:-} ]] && longbench_decode+=(--buffer-ratio "$LONGBENCH_BUFFER_RATIO")
if [[ ${LONGBENCH_LIMIT:-120} != none ]]; then  # none: every request runs to its end
    longbench_decode+=(--time-limit "${LONGBENCH_LIMIT:-120}")
fi

for stage in "$@"; do
    case $stage in
    check)
        echo "=== check (t=${SECONDS}s)" | tee -a "$OUT/commands.txt"
        (cd "$PKG" && python3 "$REPO/bench/decode_graphs_check.py" --device cuda \
            --model llama-3.1-8b --modes "${CHECK_MODES:-dense,spin}" --output "$OUT/check.json") \
            2>&1 | tee "$OUT/check.log"
        ;;
    profile)
        for mode in spin sparse-naive dense; do
            echo "=== profile $mode (t=${SECONDS}s)" | tee -a "$OUT/commands.txt"
            (cd "$PKG" && python3 "$REPO/bench/spin_kernel_profile.py" --mode $mode) 2>&1 \
                | tee "$OUT/profile-$mode.log"
        done
        ;;
    kernels)
        sections=${KERNEL_SECTIONS:-kernels bandwidth}
        echo "=== kernels (t=${SECONDS}s): sparse_gpu.py --sections $sections" \
            | tee -a "$OUT/commands.txt"
        (cd "$PKG" && python3 "$REPO/bench/sparse_gpu.py" --out "$OUT/sparse_gpu" \
            --sections $sections) 2>&1 | tee "$OUT/kernels.log"
        ;;
    hostprofile)
        prof() {  # name, then spin_kernel_profile.py arguments
            local name=$1
            shift
            echo "=== $name (t=${SECONDS}s): spin_kernel_profile.py $*" | tee -a "$OUT/commands.txt"
            (cd "$PKG" && python3 "$REPO/bench/spin_kernel_profile.py" "$@") 2>&1 \
                | tee "$OUT/$name.log"
        }
        if [[ ${HOST:-1} == 1 ]]; then
            prof host-16x2k --graphs --batch 16 --prompt-len 2048 --token-budget 512
            prof host-4x16k --graphs --batch 4 --prompt-len 16000 --token-budget 2048
        fi
        prof kernels-4x16k --batch 4 --prompt-len 16000 --token-budget 2048
        ;;
    steps | steady)  # steady: the same past the HBM buffer's warm-up (64 decode steps first)
        warmup=2
        [[ $stage == steady ]] && warmup=64
        for shape in ${STEP_SHAPES:-8x32000 8x64000 4x128000}; do  # batch x input
            shape=${shape/x/ }
            set -- $shape
            for run in ${STEP_MODES:-dense spin}; do  # spin:R = spin with buffer ratio R
                mode=${run%%:*}
                ratio=()
                [[ $run == *:* ]] && ratio=(--buffer-ratio "${run#*:}")
                [[ $mode == *+lookahead@* ]] && ratio+=(--lookahead-share "${mode#*@}") \
                    && mode=${mode%@*}
                [[ $mode == *+lookahead ]] && ratio+=(--lookahead) && mode=${mode%+lookahead}
                name="$stage-${run/:/-buffer}-$1x$2"
                echo "=== $name (t=${SECONDS}s)" | tee -a "$OUT/commands.txt"
                (cd "$PKG" && python3 "$REPO/bench/spin_kernel_profile.py" --graphs --mode $mode \
                    --batch $1 --prompt-len $2 --token-budget 2048 --steps 16 \
                    --warmup-steps $warmup "${ratio[@]}") 2>&1 \
                    | tee "$OUT/$name.log" | grep -E "graph decode step|hit rate|Error|error"
            done
        done
        ;;
    prefillprofile)  # wall and kernel time of one PREFILL_LEN prompt's chunked prefill
        for run in ${PREFILL_MODES:-dense spin}; do  # spin@cpu: the prefix read from the CPU tier
            mode=${run%@cpu}
            from_cpu=()
            [[ $run == *@cpu ]] && from_cpu=(--prefix-from-cpu)
            name="prefillprofile-${run/@/-}-${PREFILL_LEN:-64000}"
            echo "=== $name (t=${SECONDS}s)" | tee -a "$OUT/commands.txt"
            (cd "$PKG" && python3 "$REPO/bench/spin_kernel_profile.py" --prefill --mode $mode "${from_cpu[@]}" \
                --batch 1 --prompt-len "${PREFILL_LEN:-64000}" --token-budget 2048) 2>&1 \
                | tee "$OUT/$name.log"
        done
        ;;
    mixedprofile|mixedhost)  # one prompt's prefill beside decoding requests (mixed steps)
        for run in ${MIXED_RUNS:-dense:2 spin:9}; do  # mode:requests decoding beside it
            mode=${run%%:*}
            cap=()
            [[ $mode != dense ]] && cap=(--gpu-cache-tokens "${MIXED_GPU_TOKENS:-131072}")
            [[ $stage == mixedhost ]] && cap+=(--host)
            name="$stage-$mode-beside${run#*:}-${PREFILL_LEN:-64000}"
            echo "=== $name (t=${SECONDS}s)" | tee -a "$OUT/commands.txt"
            (cd "$PKG" && python3 "$REPO/bench/spin_kernel_profile.py" --prefill --graphs \
                --mode $mode --batch 1 --prompt-len "${PREFILL_LEN:-64000}" --beside "${run#*:}" \
                --beside-len "${BESIDE_LEN:-50000}" --token-budget 2048 --warmup-steps 16 \
                "${cap[@]}") 2>&1 | tee "$OUT/$name.log"
        done
        ;;
    prefillattn)  # bf16 prefill attention (cuDNN prefix + causal chunk) against the reference
        echo "=== prefillattn (t=${SECONDS}s): decode_attention.py, prefill section" \
            | tee -a "$OUT/commands.txt"
        (cd "$PKG" && python3 "$REPO/bench/decode_attention.py" --out "$OUT/prefillattn" \
            --skip headline sweep sizes) 2>&1 | tee "$OUT/prefillattn.log"
        ;;
    tokens)  # spin-tiny fp32: every sparse mode's tokens against the dense engine's
        echo "=== tokens (t=${SECONDS}s): sparse_gpu.py --sections tokens" | tee -a "$OUT/commands.txt"
        (cd "$PKG" && python3 "$REPO/bench/sparse_gpu.py" --out "$OUT/sparse_gpu_tokens" \
            --sections tokens) 2>&1 | tee "$OUT/tokens.log"
        ;;
    steadykernels)  # GPU time per kernel of eager spin steps past the warm-up (STEP_SHAPES)
        for shape in ${STEP_SHAPES:-8x64000}; do
            shape=${shape/x/ }
            set -- $shape
            name="steadykernels-spin-$1x$2"
            echo "=== $name (t=${SECONDS}s)" | tee -a "$OUT/commands.txt"
            (cd "$PKG" && python3 "$REPO/bench/spin_kernel_profile.py" --mode spin --batch $1 \
                --prompt-len $2 --token-budget 2048 --steps 8 --warmup-steps 64) 2>&1 \
                | tee "$OUT/$name.log"
        done
        ;;
    modes)
        bench modes --modes dense,spin,sparse-naive --sparse quest --workload longbench-v2 \
            --scale 0.125 --output-len 256 --num-prompts 8 --request-rate inf --token-budget 512 \
            --gpu-cache-tokens 49152 --cpu-cache-tokens 131072 --time-limit 40
        ;;
    scaling)
        for len in ${SCALING_LENS:-16000 32000 64000 128000}; do  # 128000 + 128 fits 131072
            bench "scaling-$len" --modes dense,spin --sparse quest --input-len "$len" \
                --output-len 128 --num-prompts 4 --max-num-seqs 4 --request-rate inf \
                --token-budget 2048 --cpu-cache-tokens $((4 * len + 8192)) --time-limit 100
        done
        ;;
    longbench)
        bench longbench --modes "${LONGBENCH_MODES:-dense,spin,sparse-naive}" --sparse quest --workload longbench-v2 \
            --scale 0.5 --output-len 256 --num-prompts 24 --request-rate inf --token-budget 2048 \
            --gpu-cache-tokens 131072 --cpu-cache-tokens 524288 --time-limit 150
        ;;
    longbenchdecode)  # the workload's own output lengths: decode-bound, truncated at the limit
        bench "longbench-decode$LONGBENCH_TAG" --modes "${LONGBENCH_MODES:-dense,spin}" \
            --request-rate inf "${longbench_decode[@]}"
        ;;
    longbenchfloor)  # longbenchdecode with spin's admission floor raised: batch vs hit rate
        for ratio in ${MIN_BUFFER_RATIOS:-4 8}; do
            bench "longbench-decode$LONGBENCH_TAG-floor$ratio" --modes spin \
                --min-buffer-ratio "$ratio" --request-rate inf "${longbench_decode[@]}"
        done
        ;;
    longbenchlookahead)  # longbenchdecode's spin, fetching each layer's pages one layer early
        share=()
        [[ -n ${LOOKAHEAD_SHARE:-} ]] && share=(--lookahead-share "$LOOKAHEAD_SHARE")
        bench "longbench-decode$LONGBENCH_TAG-lookahead${LOOKAHEAD_SHARE:-}" --modes spin \
            --lookahead "${share[@]}" --request-rate inf "${longbench_decode[@]}"
        ;;
    longbenchrate)  # the same at a finite rate (LONGBENCH_RATE req/s) past dense's capacity
        bench "longbench-rate${LONGBENCH_RATE:-0.1}$LONGBENCH_TAG" \
            --modes "${LONGBENCH_MODES:-dense,spin}" --request-rate "${LONGBENCH_RATE:-0.1}" \
            "${longbench_decode[@]}"
        ;;
    *) echo "unknown stage $stage" >&2 ;;
    esac
    pack
done
echo "=== done at ${SECONDS}s" | tee -a "$OUT/commands.txt"
pack
