"""Training parity: does a changed path train like today's? Compares runs of train_gpt.py from one seed and flags.

    python results/perf/parity.py REF_A REF_B NEW [NEW ...]    # run directories (each with metrics.jsonl)

REF_A and REF_B are two runs of today's path: on the GPU they differ only by the kernels' non-deterministic sums,
so their difference is the noise. Each NEW run is set against both. Per pair: the largest and the mean absolute
difference of the per-step train loss, over all steps and from the run's second half on (where early spikes are
gone), the share of steps where NEW lies within the two references' band (min to max), and the final validation
losses. A NEW run trains like today's when its differences are of the size of REF_B against REF_A.
"""
import json
import os
import sys


def read(run_dir):
    """(train loss by step, final val loss) of a run directory."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    except OSError as error:
        sys.exit(f"error: {run_dir}: {error.strerror}; give run directories that hold metrics.jsonl")
    train = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    if not train or not vals:
        sys.exit(f"error: {run_dir}/metrics.jsonl: no train or no val losses; did the run finish?")
    return train, vals[-1]


def differences(a, b, from_step=1):
    steps = sorted(s for s in a.keys() & b.keys() if s >= from_step)
    gaps = [abs(a[s] - b[s]) for s in steps]
    return max(gaps), sum(gaps) / len(gaps)


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    runs = {os.path.basename(os.path.normpath(d)): read(d) for d in argv}
    names = list(runs)
    (ref_a, ref_b), news = names[:2], names[2:]
    last = max(runs[ref_a][0])
    half = last // 2 + 1
    print(f"| pair | largest (mean) train loss difference, steps 1-{last} | the same, steps {half}-{last} | "
          f"steps within the references' band | final val loss |")
    print("|---|---|---|---|---|")
    a, b = runs[ref_a][0], runs[ref_b][0]
    pairs = [(ref_b, ref_a)] + [(new, ref) for new in news for ref in (ref_a, ref_b)]
    for first, second in pairs:
        whole = differences(runs[first][0], runs[second][0])
        late = differences(runs[first][0], runs[second][0], half)
        band = ""
        if first in news:
            steps = sorted(runs[first][0].keys() & a.keys() & b.keys())
            inside = sum(min(a[s], b[s]) <= runs[first][0][s] <= max(a[s], b[s]) for s in steps)
            band = f"{inside} of {len(steps)}"
        print(f"| {first} against {second} | {whole[0]:.3f} ({whole[1]:.3f}) | {late[0]:.3f} ({late[1]:.3f}) | "
              f"{band} | {runs[first][1]:.4f} ({second}: {runs[second][1]:.4f}) |")


if __name__ == "__main__":
    main(sys.argv[1:])
