#!/usr/bin/env bash
# Presets for train_gpt.py:  ./run.sh [PRESET] [ARGS...]
# Any ARGS go on to train_gpt.py after the preset's own flags, so they override them (e.g. --steps 100).
#   demo      (the default) a tiny baseline and a tiny gated model on the shipped Jane Austen sample, then a table
#   baseline  full causal attention, no gate: the paper's baseline
#   gated     256-token sliding window + head gate: the paper's method
#   window    256-token sliding window, no gate (ablation)
#   gate      full causal attention + head gate (ablation)
#   compare   baseline and gated over several seeds (--seeds 0,1,2) and learning rates (--lrs 1e-3,2e-3), then
#             a table beside the paper's Table 1 (logs/compare-<time>/table.md)
#   ablate    window only, gate only, windows 64/128/256/512 with the gate, full attention, and the --gate mix
#             reading (--seeds 0 by default), then the same table (logs/ablate-<time>/table.md)
#   compare and ablate take --arms a,b (some of their arms only) and --log-dir DIR (the study's directory goes there).
# Training runs on all visible GPUs through torchrun (set NGPU to use fewer), or on the CPU without one.
# compare and ablate instead give each run one GPU and run NGPU of them at once: at this model size that
# is faster than spreading every run over all GPUs.
set -euo pipefail
cd "$(dirname "$0")"

preset="${1:-demo}"
[ "$#" -gt 0 ] && shift
if [ -z "${NGPU:-}" ]; then
    NGPU=$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi

train() {
    torchrun --standalone --nproc_per_node="$NGPU" train_gpt.py "$@"
}

# FineWeb presets fetch their shards first, unless the user points --train-files elsewhere.
fetch_fineweb() {
    local arg
    for arg in "$@"; do
        [ "$arg" = "--train-files" ] && return 0
    done
    python3 data/fineweb.py
}

# The single-run presets and the arms of the compare and ablate studies: name, then its attention flags.
declare -A ARM=(
    [baseline]="--window 0 --gate none"
    [gated]="--window 256 --gate head"
    [window]="--window 256 --gate none"
    [gate]="--window 0 --gate head"
    [gated-64]="--window 64 --gate head"
    [gated-128]="--window 128 --gate head"
    [gated-512]="--window 512 --gate head"
    [mix]="--window 256 --gate mix"
)

# wait_for PID: its exit status, also when a trapped signal ends `wait` early (the process still runs then)
wait_for() {
    local status
    while :; do
        wait "$1" && status=0 || status=$?
        kill -0 "$1" 2>/dev/null || return "$status"
    done
}

# study NAME DEFAULT_ARMS DEFAULT_SEEDS ARGS...: every arm x seed x learning rate, one GPU per run, then a table.
study() {
    local name="$1" arms="$2" seeds="$3" lrs="" log_dir=logs passed=()
    shift 3
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --arms|--seeds|--lrs|--log-dir)
                [ "$#" -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
                case "$1" in
                    --arms) arms="$2" ;;
                    --seeds) seeds="$2" ;;
                    --lrs) lrs="$2" ;;
                    --log-dir) log_dir="$2" ;;
                esac
                shift 2 ;;
            --run-name|--seed|--window|--gate)
                echo "$name sets $1 itself for each run: use --arms, --seeds and --lrs" >&2; exit 2 ;;
            *) passed+=("$1"); shift ;;
        esac
    done
    local arm seed lr runs=() arm_list=(${arms//,/ }) lr_list=(${lrs//,/ })
    [ "${#lr_list[@]}" -gt 0 ] || lr_list=("")  # no --lrs: the flags' learning rate (train_gpt.py's default)
    for arm in "${arm_list[@]}"; do
        [ -n "${ARM[$arm]:-}" ] || { echo "unknown arm '$arm': use ${!ARM[*]}" >&2; exit 2; }
    done
    # the GPUs: those CUDA_VISIBLE_DEVICES lists if it is set (set but empty: none, every run on the CPU), else
    # 0 .. NGPU-1; list one twice to train two runs on it at once
    local devices=()
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        IFS=',' read -r -a devices <<< "$CUDA_VISIBLE_DEVICES"
    else
        devices=($(seq 0 $((NGPU - 1))))
    fi
    if [ "${#devices[@]}" -gt 0 ] && [ "$NGPU" -gt "${#devices[@]}" ]; then
        echo "NGPU=$NGPU runs at once, but CUDA_VISIBLE_DEVICES lists ${#devices[@]} GPU(s); list one for each" >&2
        exit 2
    fi
    fetch_fineweb "${passed[@]}"
    local out
    out="$log_dir/$name-$(date +%Y%m%d-%H%M%S)"
    mkdir -p "$log_dir"
    mkdir "$out" || { echo "$out exists; start the study again in a second" >&2; exit 1; }
    for lr in "${lr_list[@]}"; do
        for seed in ${seeds//,/ }; do
            for arm in "${arm_list[@]}"; do
                runs+=("$arm|$seed|$lr")
            done
        done
    done
    # NGPU lanes, each working through its runs in turn. Run i goes to lane (i + i / arms) mod NGPU, so no arm keeps
    # to one GPU (which would bias its speed, or hide a faulty card).
    local lane pids=() failed=0
    for ((lane = 0; lane < NGPU; lane++)); do
        (
            local i child="" stopped="" status=0
            # SIGTERM or SIGINT: the run in progress stops after its step with a checkpoint; the rest are skipped
            trap 'stopped=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null' TERM INT
            for ((i = 0; i < ${#runs[@]}; i++)); do
                (( (i + i / ${#arm_list[@]}) % NGPU == lane )) || continue
                IFS='|' read -r arm seed lr <<< "${runs[$i]}"
                local what="$arm, seed $seed${lr:+, lr $lr}" output="$out/$arm-seed$seed${lr:+-lr$lr}.out"
                if [ -n "$stopped" ] || [ "$status" != 0 ]; then
                    echo "skipped: $what" >&2
                    continue
                fi
                local flags=(${ARM[$arm]} --run-name "$arm" --seed "$seed" ${lr:+--lr "$lr"} --log-dir "$out")
                echo "run $((i + 1))/${#runs[@]}: $what, CUDA_VISIBLE_DEVICES=${devices[$lane]:-}; output in $output"
                CUDA_VISIBLE_DEVICES="${devices[$lane]:-}" torchrun --standalone --nproc_per_node=1 train_gpt.py \
                    "${passed[@]}" "${flags[@]}" > "$output" 2>&1 &
                child=$!
                wait_for "$child" && status=0 || status=$?
                child=""
                if [ "$status" != 0 ]; then
                    echo "run $what failed; from $output:" >&2
                    # the worker's own error, which torchrun's report follows
                    grep -m 1 -A 3 -E "^error: |^[A-Za-z.]*(Error|Exception)\b" "$output" >&2 || tail -n 5 "$output" >&2
                fi
            done
            [ -z "$stopped" ] && [ "$status" = 0 ]
        ) &
        pids+=($!)
    done
    trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
    for pid in "${pids[@]}"; do
        wait_for "$pid" || failed=1
    done
    trap - TERM INT
    if compgen -G "$out/*/summary.json" > /dev/null; then
        python3 compare.py --paper --out "$out/table.md" "$out"
    fi
    [ "$failed" = 0 ] || { echo "$name: some runs failed or were stopped (above); the finished ones are in $out" >&2; exit 1; }
}

case "$preset" in
    baseline|gated|window|gate) fetch_fineweb "$@"; train ${ARM[$preset]} --run-name "$preset" "$@" ;;
    demo)
        NGPU=1
        # On the CPU, glibc hands each step's ~400 MB of logits back to the OS and page-faults them in again
        # on the next step; keeping freed memory makes the demo about 1.7x faster.
        export MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_TOP_PAD_=1000000000
        out="logs/demo-$(date +%Y%m%d-%H%M%S)"
        tiny=(--train-files 'data/sample/austen_train_*.bin' --val-files 'data/sample/austen_val_*.bin'
              --n-layer 4 --d-model 128 --n-head 4 --n-kv-head 2 --head-dim 32 --mlp-hidden 384
              --seq-len 256 --batch-tokens 2048 --micro-batch-tokens 2048 --val-tokens 8192
              --steps 40 --warmup-steps 4 --cooldown-steps 10 --lr 3e-3 --val-every 20 --log-dir "$out")
        train "${tiny[@]}" --window 0 --gate none --run-name baseline "$@"
        train "${tiny[@]}" --window 64 --gate head --run-name gated "$@"
        python3 compare.py "$out"
        ;;
    compare) study compare baseline,gated 0,1,2 "$@" ;;
    ablate)  study ablate baseline,gated,window,gate,gated-64,gated-128,gated-512,mix 0 "$@" ;;
    *)
        echo "unknown preset '$preset': use demo, baseline, gated, window, gate, compare or ablate" >&2
        exit 2
        ;;
esac
