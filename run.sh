#!/usr/bin/env bash
# Presets for train_gpt.py:  ./run.sh [PRESET] [ARGS...]   (./run.sh --help prints this text)
# Any ARGS go on to train_gpt.py after the preset's own flags, so they override them (e.g. --steps 100).
#   demo      (the default) a tiny baseline and a tiny gated model on the shipped Jane Austen sample, then a table
#   baseline  full causal attention, no gate: the paper's baseline
#   gated     256-token sliding window + head gate: the paper's method
#   window    256-token sliding window, no gate (ablation)
#   gate      full causal attention + head gate (ablation)
#   compare   baseline and gated over several seeds (--seeds 0,1,2) and learning rates (--lrs 1e-3,2e-3), then
#             a table beside the paper's Table 1 (logs/compare-<time>/table.md)
#   ablate    window only, gate only, windows 64/128/256/512 with the gate, full attention, and the --mix-full
#             reading (--seeds 0 by default), then the same table (logs/ablate-<time>/table.md)
#   compare and ablate run in study.py (its docstring has the details): --arms a,b for some arms only, --log-dir DIR
#             for the study's directory; each run trains on one GPU, NGPU at once, the next one starting on the
#             first GPU to free; a failed run is reported and the others go on.
# The other presets train on all visible GPUs through torchrun (set NGPU to use fewer), or on the CPU without one.

# Written for bash 3.2 (macOS's): no associative arrays, mapfile or other bash 4 features (test_study.py checks).
set -euo pipefail
cd "$(dirname "$0")"

usage() {  # the comment block at the top of this file, without its '#'
    awk 'NR == 1 {next} /^#/ {sub(/^# ?/, ""); print; next} {exit}' "$0"
}

preset="${1:-demo}"
[ "$#" -gt 0 ] && shift
case "$preset" in
    -h|--help) usage; exit 0 ;;
esac
if [ -z "${NGPU:-}" ]; then
    NGPU=$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi

train() {
    torchrun --standalone --nproc_per_node="$NGPU" train_gpt.py "$@"
}

# FineWeb presets fetch their shards first, unless the user points --train-files elsewhere (--train-files X or
# --train-files=X).
fetch_fineweb() {
    local arg
    for arg in "$@"; do
        case "$arg" in
            --train-files|--train-files=*) return 0 ;;
        esac
    done
    python3 data/fineweb.py
}

case "$preset" in
    baseline|gated|window|gate)
        attention=$(python3 study.py --flags "$preset")  # the arm's flags, from study.py's table of arms
        fetch_fineweb "$@"
        train $attention --run-name "$preset" "$@"  # $attention unquoted: it is several flags
        ;;
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
    compare|ablate) NGPU="$NGPU" exec python3 study.py "$preset" "$@" ;;  # exec: signals reach study.py itself
    *)
        echo "unknown preset '$preset': use demo, baseline, gated, window, gate, compare or ablate (./run.sh --help)" >&2
        exit 2
        ;;
esac
