"""The study's table of finished runs, from their summary.json files, shaped like the paper's Table 1.

    python compare.py logs/demo-20261127-120000          # every run under a directory
    python compare.py logs/baseline-* logs/gated-*       # or the run directories themselves
    python compare.py logs/study --paper --out table.md  # with the paper's rows; also written to table.md

Runs with the same run name, window, gate and learning rate form one row (seeds are what is averaged): val
loss as mean +- sample standard deviation over them, and its min-max range. A run name trained at two
learning rates gives two rows, never one average. The baseline row is the full-attention, ungated group
with the lowest mean val loss (the strongest baseline); every row's improvement is (baseline - row) /
baseline, in percent, so a positive number means a lower val loss than the baseline.
"""
import argparse
import glob
import json
import os
import statistics
import sys

# Table 1 of "Dynamic Sparse Attention with Learned Head Gating": a 134M-parameter Qwen-style model on
# FineWeb, trained on their hardware with their budget, so only the relative improvement compares with ours.
PAPER_BASELINE = {"run": "paper: full attention", "window": 0, "gate": "none", "val_loss": 4.9266, "hours": 24.5}
PAPER_GATED = {"run": "paper: window + gate", "window": 256, "gate": "head", "val_loss": 4.6498, "hours": 25.1}
PAPER_STATED_IMPROVEMENT = "5.7%"
REQUIRED_KEYS = ("run_name", "window", "gate", "val_loss", "train_time_s", "tokens_per_s")


def read_json(file):
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from None


def load_run(summary_file):
    """One run's summary, with seed and lr taken from its config.json when the summary predates them."""
    run = read_json(summary_file)
    missing = [key for key in REQUIRED_KEYS if key not in run]
    if missing:
        raise ValueError(f"{summary_file}: no {', '.join(missing)}; is it a summary.json written by train_gpt.py?")
    config_file = os.path.join(os.path.dirname(summary_file), "config.json")
    for key in ("seed", "lr"):
        if key not in run:
            if not os.path.exists(config_file):
                raise ValueError(f"{summary_file}: no {key}, and no config.json beside it to read it from")
            run[key] = read_json(config_file)[key]
    return run


def load_runs(paths):
    """The summary of each path that is a run directory, or of each run directory inside it."""
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            raise ValueError(f"{path}: no such directory")
        found = glob.glob(os.path.join(path, "summary.json")) or sorted(glob.glob(os.path.join(path, "*", "summary.json")))
        if not found:
            raise ValueError(f"{path}: no summary.json in it or in its subdirectories; did the run finish?")
        runs += [load_run(file) for file in found]
    return runs


def group_runs(runs):
    """Runs keyed by (run name, window, gate, lr), in the order they came; refuses to average runs of unlike size."""
    groups = {}
    for run in runs:
        groups.setdefault((run["run_name"], run["window"], run["gate"], run["lr"]), []).append(run)
    for (name, _, _, lr), members in groups.items():
        for key in ("tokens", "params"):  # neither shows in the table, so a mismatch would go unseen
            values = sorted({r[key] for r in members if key in r})
            if len(values) > 1:
                raise ValueError(f"runs named {name!r} at lr {lr:g} differ in {key} ({values}): "
                                 f"give them different --run-name values to compare them")
    return groups


def format_duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def improvement(base_loss, loss):
    return f"{100 * (base_loss - loss) / base_loss:.2f}%"


def row(cells):
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def table(runs, paper=False) -> str:
    """The markdown table, with a note under it naming the baseline row (and, with paper, the paper's rows)."""
    groups = group_runs(runs)
    losses = {key: [r["val_loss"] for r in members] for key, members in groups.items()}
    full_ungated = [key for key in groups if key[1] == 0 and key[2] == "none"]
    base = min(full_ungated, key=lambda key: statistics.mean(losses[key]), default=None)
    lines = [row(["run", "window", "gate", "lr", "seeds", "n", "val loss", "min–max", "train time", "tokens/s",
                  "vs baseline"]),
             row(["---"] * 11)]
    for key, members in groups.items():
        name, window, gate, lr = key
        values = losses[key]
        mean = statistics.mean(values)
        loss_text, range_text = f"{mean:.4f}", ""
        if len(values) > 1:  # a sample standard deviation needs two runs
            loss_text += f" ± {statistics.stdev(values):.4f}"
            range_text = f"{min(values):.4f}–{max(values):.4f}"
        vs_base = "baseline" if key == base else (improvement(statistics.mean(losses[base]), mean) if base else "")
        lines.append(row([name, window or "full", gate, f"{lr:g}", ",".join(str(r["seed"]) for r in members),
                          len(members), loss_text, range_text,
                          format_duration(statistics.mean(r["train_time_s"] for r in members)),
                          f"{statistics.mean(r['tokens_per_s'] for r in members):,.0f}", vs_base]))
    notes = []
    if base:
        which = ("the only full-attention ungated row" if len(full_ungated) == 1 else
                 f"the lowest mean val loss of the {len(full_ungated)} full-attention ungated rows")
        notes.append(f"Improvement: (baseline - val loss) / baseline, against `{base[0]}` at lr {base[3]:g}, {which}.")
    else:
        notes.append("No full-attention ungated run (window 0, gate none), so no improvement column.")
    budgets = sorted({r["tokens"] for r in runs if "tokens" in r})
    if len(budgets) > 1:  # a longer run has a lower loss whatever its attention, so say so beside the numbers
        notes.append(f"Caution: the runs trained on different numbers of tokens ({', '.join(f'{t:,}' for t in budgets)}).")
    if paper:
        for p in (PAPER_BASELINE, PAPER_GATED):
            vs_paper = "baseline" if p is PAPER_BASELINE else improvement(PAPER_BASELINE["val_loss"], p["val_loss"]) + " ¹"
            lines.append(row([p["run"], p["window"] or "full", p["gate"], "", "", "", f"{p['val_loss']:.4f}", "",
                              f"{p['hours']:.1f} h", "", vs_paper]))
        notes.append("Rows `paper: ...`: Table 1 of *Dynamic Sparse Attention with Learned Head Gating* (134M Qwen "
                     "model on FineWeb, their hardware, their budget), improvement against the paper's own baseline; "
                     "compare our rows with them in relative terms only.")
        notes.append(f"¹ Computed from the two losses; the paper states {PAPER_STATED_IMPROVEMENT}.")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="DIR", help="run directories, or directories of runs")
    parser.add_argument("--paper", action="store_true", help="add the paper's two rows of Table 1")
    parser.add_argument("--out", metavar="FILE.md", help="also write the table to this file (never overwritten)")
    args = parser.parse_args(argv)
    try:
        text = table(load_runs(args.runs), paper=args.paper)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if args.out:
        try:
            with open(args.out, "x") as f:  # "x": refuses a file that exists, so no table is overwritten
                f.write(text + "\n")
        except FileExistsError:
            sys.exit(f"error: --out {args.out}: the file exists; delete it or choose another name")
        except OSError as error:
            sys.exit(f"error: --out {args.out}: {error.strerror}")
    print(text)


if __name__ == "__main__":
    main()
