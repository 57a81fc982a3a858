"""Side-by-side table of finished runs, from their summary.json files.

    python compare.py logs/demo-20261127-120000          # every run under a directory
    python compare.py logs/baseline-* logs/gated-*       # or the run directories themselves

Runs with the same run name (preset) form one row: val loss as mean +- sample standard deviation over them.
"""
import glob
import json
import os
import statistics
import sys


def load_summaries(paths):
    """summary.json of each path that is a run directory, or of each run directory inside it."""
    summaries = []
    for path in paths:
        found = glob.glob(os.path.join(path, "summary.json")) or sorted(glob.glob(os.path.join(path, "*", "summary.json")))
        if not found:
            raise ValueError(f"{path}: no summary.json in it or in its subdirectories; did the run finish?")
        for file in found:
            with open(file) as f:
                summaries.append(json.load(f))
    return summaries


def mean_and_spread(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(summaries) -> str:
    groups = {}
    for s in summaries:
        groups.setdefault(s["run_name"], []).append(s)
    lines = ["| run | window | gate | runs | val loss | train time (s) | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in groups.items():
        loss, spread = mean_and_spread([r["val_loss"] for r in runs])
        loss_text = f"{loss:.4f} +- {spread:.4f}" if len(runs) > 1 else f"{loss:.4f}"
        time_s = statistics.mean(r["train_time_s"] for r in runs)
        tokens_per_s = statistics.mean(r["tokens_per_s"] for r in runs)
        window = runs[0]["window"] or "full"
        lines.append(f"| {name} | {window} | {runs[0]['gate']} | {len(runs)} | {loss_text} "
                     f"| {time_s:.1f} | {tokens_per_s:,.0f} |")
    return "\n".join(lines)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    try:
        print(table(load_summaries(sys.argv[1:])))
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
