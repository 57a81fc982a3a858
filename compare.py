"""The study's table of finished runs, from their summary.json files, shaped like the paper's Table 1.

    python compare.py logs/demo-20261127-120000          # every run under a directory, at any depth
    python compare.py logs/baseline-* logs/gated-*       # or the run directories themselves
    python compare.py logs/study --paper --out table.md  # with the paper's rows; also written to table.md
    python compare.py logs/study --pairs gated:window,gated:baseline   # these rows' paired differences

Runs with the same run name, window, gate and learning rate form one row (seeds are what is averaged): val
loss as mean +- sample standard deviation over them, and its min-max range. A run name trained at two
learning rates gives two rows, never one average. The baseline row is the full-attention, ungated group
with the lowest mean val loss (the strongest baseline); every row's improvement is (baseline - row) /
baseline, in percent, so a positive number means a lower val loss than the baseline. A run found twice (a
directory and a run inside it) counts once; two run directories with the same seed in one row are refused.

Under the table: the paired differences (by default each row against the baseline row) over the seeds both
rows have, as the same seed means the same initial weights and data order, and the interaction of each 2 x 2 of
window and gate at one learning rate; val loss at each --eval-seq-lens
length, where runs have it; and notes where the runs' commits, code or data differ, or are unknown.
"""
import argparse
import glob
import json
import math
import os
import statistics
import sys

# Table 1 of "Dynamic Sparse Attention with Learned Head Gating": a 134M-parameter Qwen-style model on
# FineWeb, trained on their hardware with their budget, so only the relative improvement compares with ours.
PAPER_BASELINE = {"run": "paper: full attention", "window": 0, "gate": "none", "val_loss": 4.9266, "hours": 24.5}
PAPER_GATED = {"run": "paper: window + gate", "window": 256, "gate": "head", "val_loss": 4.6498, "hours": 25.1}
PAPER_STATED_IMPROVEMENT = "5.7%"
REQUIRED_KEYS = ("run_name", "window", "gate", "val_loss", "train_time_s", "tokens_per_s")
# summary.json's provenance entries, as the notes name them, and how many leading characters identify a value
PROVENANCE = {"git_commit": ("commit", 7), "git_dirty": ("uncommitted changes", None),
              "code_sha256": ("code", 12), "train_data": ("train data", 12), "val_data": ("val data", 12)}


def read_json(file):
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from None


def load_run(summary_file):
    """One run's summary, with seed and lr taken from its config.json when the summary predates them, its data
    order's seed (--data-seed; the seed itself where it is -1 or the run predates it) and its directory."""
    run = read_json(summary_file)
    missing = [key for key in REQUIRED_KEYS if key not in run]
    if missing:
        raise ValueError(f"{summary_file}: no {', '.join(missing)}; is it a summary.json written by train_gpt.py?")
    run_dir = os.path.dirname(summary_file)
    config_file = os.path.join(run_dir, "config.json")
    config = read_json(config_file) if os.path.exists(config_file) else {}
    for key in ("seed", "lr"):
        if key not in run:
            if key not in config:
                raise ValueError(f"{summary_file}: no {key}, and no config.json beside it with one to read")
            run[key] = config[key]
    data_seed = run.get("data_seed", config.get("data_seed", -1))
    run["data_seed"] = run["seed"] if data_seed < 0 else data_seed
    run["run_dir"] = run_dir
    return run


def load_runs(paths):
    """The summary of each run directory among the paths and under them, each run once however often it is found."""
    runs, seen = [], set()
    for path in paths:
        if not os.path.isdir(path):
            raise ValueError(f"{path}: no such directory")
        found = sorted(glob.glob(os.path.join(path, "**", "summary.json"), recursive=True))
        if not found:
            raise ValueError(f"{path}: no summary.json in it or in its subdirectories; did the run finish?")
        for file in found:
            real = os.path.realpath(os.path.dirname(file))
            if real not in seen:
                seen.add(real)
                runs.append(load_run(file))
    return runs


def seed_label(run):
    """The seed, and the data order's seed where --data-seed set another."""
    return str(run["seed"]) if run["data_seed"] == run["seed"] else f"{run['seed']}/data {run['data_seed']}"


def group_runs(runs):
    """Runs keyed by (run name, window, gate, lr), in the order they came; refuses to average runs of unlike size
    or to count one seed twice."""
    groups = {}
    for run in runs:
        groups.setdefault((run["run_name"], run["window"], run["gate"], run["lr"]), []).append(run)
    for (name, _, _, lr), members in groups.items():
        for key in ("tokens", "params"):  # neither shows in the table, so a mismatch would go unseen
            values = sorted({r[key] for r in members if key in r})
            if len(values) > 1:
                raise ValueError(f"runs named {name!r} at lr {lr:g} differ in {key} ({values}): "
                                 f"give them different --run-name values to compare them")
        by_seed = {}
        for r in members:
            other = by_seed.setdefault((r["seed"], r["data_seed"]), r)
            if other is not r:
                raise ValueError(f"{other['run_dir']} and {r['run_dir']} are both {name!r} at lr {lr:g}, seed "
                                 f"{seed_label(r)}: a seed counted twice would skew the row's mean; pass one of them")
    return groups


def row_labels(groups):
    """Each row's name where no other row has it, else name@lr: the names --pairs takes."""
    names = [key[0] for key in groups]
    return {key: key[0] if names.count(key[0]) == 1 else f"{key[0]}@{key[3]:g}" for key in groups}


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


# -----------------------------------------------------------------------------
# Paired differences: the same seed gives two arms the same initial weights and data order, so the difference
# seed by seed leaves out what the seed alone moves, and needs fewer seeds than comparing the two means.


def t_coverage(t, dof):
    """P(|T| < t) for Student's t with an integer number of degrees of freedom, in closed form (Abramowitz and
    Stegun, Handbook of Mathematical Functions, 26.7.3 for odd and 26.7.4 for even dof)."""
    theta = math.atan(t / math.sqrt(dof))
    cos2 = math.cos(theta) ** 2
    term = total = 1.0
    if dof % 2 == 0:
        for k in range(1, dof // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total
    for k in range(1, (dof - 1) // 2):
        term *= cos2 * 2 * k / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if dof > 1 else 0.0))


def t_quantile(p, dof):
    """The p quantile (p > 0.5) of Student's t, by bisection on t_coverage, which rises with t."""
    coverage, low, high = 2 * p - 1, 0.0, 1.0
    while t_coverage(high, dof) < coverage:
        high *= 2
    for _ in range(60):  # halves the bracket to well under float precision
        middle = (low + high) / 2
        low, high = (middle, high) if t_coverage(middle, dof) < coverage else (low, middle)
    return (low + high) / 2


def find_row(groups, labels, text):
    """The row --pairs names: by its name, or name@lr where the name has rows at several learning rates."""
    name, at, lr = text.partition("@")
    keys = [key for key in groups if key[0] == name]
    if at:
        try:
            keys = [key for key in keys if key[3] == float(lr)]
        except ValueError:
            raise ValueError(f"--pairs {text}: {lr!r} is not a learning rate; write NAME@LR, e.g. "
                             f"{name}@0.001") from None
    if not keys:
        raise ValueError(f"--pairs {text}: no such row; the rows are {', '.join(labels.values())}")
    if len(keys) > 1:
        raise ValueError(f"--pairs {text}: {name} has rows at lr {', '.join(f'{key[3]:g}' for key in keys)}; "
                         f"write {labels[keys[0]]}")
    return keys[0]


def parse_pairs(text, groups, labels):
    """--pairs A:B,C:D as pairs of row keys."""
    pairs = []
    for item in text.split(","):
        first, colon, second = item.partition(":")
        if not colon or not first or not second:
            raise ValueError(f"--pairs {item}: expected ROW:ROW, e.g. gated:baseline")
        pairs.append((find_row(groups, labels, first), find_row(groups, labels, second)))
    return pairs


def interactions(groups, labels):
    """The 2 x 2s among the rows: for each windowed, gated row, the rows at its learning rate with neither (full
    attention, no gate), the window alone and the gate alone. As (coefficient, row) terms of the interaction,
    (window and gate - gate alone) - (window alone - neither): how much the window changes the gate's effect, 0 where
    the two effects add. Also notes on the 2 x 2s left out because a corner has several rows to choose from (a
    missing corner only means the rows are not a 2 x 2, as for const and scalar)."""
    found, ambiguous = [], []
    for key in groups:
        _, window, gate, lr = key
        if not window or gate == "none":
            continue
        corners = [[k for k in groups if (k[1], k[2], k[3]) == (*corner, lr)]
                   for corner in ((0, "none"), (window, "none"), (0, gate))]
        if not all(corners):
            continue
        if any(len(matches) > 1 for matches in corners):
            ambiguous.append(f"{labels[key]} ({' or '.join(labels[k] for k in max(corners, key=len))})")
        else:
            (neither,), (window_alone,), (gate_alone,) = corners
            found.append([(1, key), (-1, gate_alone), (-1, window_alone), (1, neither)])
    return found, ambiguous


def contrast_row(name, terms, groups):
    """A row of the paired table for sum(coefficient x val loss) over (coefficient, row) terms, seed by seed over the
    seeds every term's row has; None where they have none in common."""
    by_seed = [{(r["seed"], r["data_seed"]): r for r in groups[key]} for _, key in terms]
    seeds = [seed for seed in by_seed[0] if all(seed in runs for runs in by_seed[1:])]
    if not seeds:
        return None
    differences = [sum(c * runs[s]["val_loss"] for (c, _), runs in zip(terms, by_seed)) for s in seeds]
    mean = statistics.mean(differences)
    interval = ""
    if len(differences) > 1:
        half = t_quantile(0.975, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
        interval = f"{mean - half:+.4f} to {mean + half:+.4f}"
    agree = sum(1 for d in differences if d * mean > 0)
    return row([name, ",".join(seed_label(by_seed[0][s]) for s in seeds), len(seeds),
                ", ".join(f"{d:+.4f}" for d in differences), f"{mean:+.4f}", interval, f"{agree}/{len(seeds)}"])


def paired_table(groups, labels, pairs, chosen):
    """The table of paired differences, then each 2 x 2's interaction (interactions), and its notes; pairs without a
    seed in common are refused when chosen (--pairs), else named in a note."""
    lines = [row(["pair", "seeds", "n", "difference by seed", "mean", "95% interval", "sign"]), row(["---"] * 7)]
    unpaired = []
    for first, second in pairs:
        name = f"{labels[first]} − {labels[second]}"
        line = contrast_row(name, [(1, first), (-1, second)], groups)
        if line is None:
            if chosen:
                raise ValueError(f"--pairs {labels[first]}:{labels[second]}: the rows have no seed in common")
            unpaired.append(name)
            continue
        lines.append(line)
    crosses, ambiguous = interactions(groups, labels)
    crossed = [line for terms in crosses
               if (line := contrast_row("interaction: ({} − {}) − ({} − {})".format(*(labels[k] for _, k in terms)),
                                        terms, groups))]
    if len(lines) == 2 and not crossed and not ambiguous:
        return []
    notes = ["Paired: the first row's val loss minus the second's, seed by seed over the seeds both have (the same "
             "seed: the same initial weights and data order); negative means the first row's is lower. Mean with its "
             "95% interval (Student t on the differences, n - 1 degrees of freedom; none from one seed); sign: the "
             "seeds whose difference has the mean's sign."]
    if crossed:
        notes.append("Interaction: in a 2 x 2 of window and gate at one learning rate, the gate's effect with the "
                     "window minus its effect without, seed by seed over the seeds all four rows have; 0 where the two "
                     "effects add, negative where together they gain more than the sum of each alone.")
    if ambiguous:
        notes.append("No interaction for " + "; ".join(ambiguous) + ": a corner of its 2 x 2 has several rows (by "
                     "window, gate and learning rate); compare those rows with --pairs.")
    if unpaired:
        notes.append(f"Not paired, no seed in common: {', '.join(unpaired)}.")
    return ["\n".join(lines + crossed)] + notes


# -----------------------------------------------------------------------------
# Evaluation lengths and provenance


def seq_len_table(groups, labels):
    """Val loss at each --eval-seq-lens length, mean over a row's seeds; [] if no run has one."""
    lengths = sorted({int(n) for members in groups.values() for r in members for n in r.get("val_loss_by_seq_len", {})})
    if not lengths:
        return []
    lines = [row(["run", "window", "gate", "lr", *(f"T={n}" for n in lengths)]), row(["---"] * (4 + len(lengths)))]
    partial = False
    for key, members in groups.items():
        cells = []
        for n in lengths:
            values = [r["val_loss_by_seq_len"][str(n)] for r in members if str(n) in r.get("val_loss_by_seq_len", {})]
            partial |= 0 < len(values) < len(members)
            cells.append("" if not values else f"{statistics.mean(values):.4f}"
                         + (f" ({len(values)} of {len(members)})" if len(values) < len(members) else ""))
        lines.append(row([labels[key], key[1] or "full", key[2], f"{key[3]:g}", *cells]))
    note = "Val loss by evaluation length T (tokens per sequence, --eval-seq-lens), mean over the row's seeds"
    return ["\n".join(lines), note + ("; (k of n): only k of its n runs evaluated at that length." if partial else ".")]


def describe(runs, label_of):
    """Runs as their rows' labels with seeds: 'baseline seeds 0,1; gated seed 2'."""
    rows = {}
    for r in runs:
        rows.setdefault(label_of[id(r)], []).append(seed_label(r))
    return "; ".join(f"{label} seed{'s' if len(seeds) > 1 else ''} {','.join(seeds)}" for label, seeds in rows.items())


def provenance_notes(groups, labels):
    """A note naming the runs where their commit, code or data differ, and one naming the runs whose provenance is
    unknown (written before train_gpt.py recorded it). Where every run's code has the same sha256, the commits are
    not compared: the same code ran, from checkouts that differ elsewhere (a study run from a pinned copy of the
    code records the checkout's commit, docs/studies.md)."""
    label_of = {id(r): labels[key] for key, members in groups.items() for r in members}
    runs = [r for members in groups.values() for r in members]
    codes = {r["provenance"].get("code_sha256") if "provenance" in r else None for r in runs}
    same_code = len(codes) == 1 and None not in codes
    fields = [f for f in PROVENANCE if not (same_code and f in ("git_commit", "git_dirty"))]
    differing = []
    for field in fields:
        what, digits = PROVENANCE[field]
        by_value = {}
        for r in runs:
            if "provenance" in r:
                by_value.setdefault(r["provenance"].get(field), []).append(r)
        if len(by_value) > 1:
            differing.append(what + ": " + ", ".join(
                f"{'unknown' if value is None else str(value)[:digits] if digits else 'yes' if value else 'no'} "
                f"({describe(members, label_of)})" for value, members in by_value.items()))
    notes = []
    if differing:
        notes.append("Caution: these runs were not trained from the same code and data; " + "; ".join(differing) + ".")
    unknown = [r for r in runs if "provenance" not in r]
    if unknown:
        notes.append(f"Provenance unknown (no commit, code or data fingerprints in summary.json): "
                     f"{describe(unknown, label_of)}.")
    return notes


# -----------------------------------------------------------------------------
# The table


def table(runs, paper=False, pairs=None) -> str:
    """The markdown table, with a note under it naming the baseline row (and, with paper, the paper's rows); then
    the paired differences (pairs: "A:B,C:D", else each row against the baseline), the val loss by evaluation
    length, and the provenance notes."""
    groups = group_runs(runs)
    labels = row_labels(groups)
    losses = {key: [r["val_loss"] for r in members] for key, members in groups.items()}
    full_ungated = [key for key in groups if key[1] == 0 and key[2] == "none"]
    base = min(full_ungated, key=lambda key: statistics.mean(losses[key]), default=None)
    chosen = parse_pairs(pairs, groups, labels) if pairs else None
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
        lines.append(row([name, window or "full", gate, f"{lr:g}", ",".join(seed_label(r) for r in members),
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
    notes += provenance_notes(groups, labels)
    if paper:
        for p in (PAPER_BASELINE, PAPER_GATED):
            vs_paper = "baseline" if p is PAPER_BASELINE else improvement(PAPER_BASELINE["val_loss"], p["val_loss"]) + " ¹"
            lines.append(row([p["run"], p["window"] or "full", p["gate"], "", "", "", f"{p['val_loss']:.4f}", "",
                              f"{p['hours']:.1f} h", "", vs_paper]))
        notes.append("Rows `paper: ...`: Table 1 of *Dynamic Sparse Attention with Learned Head Gating* (134M Qwen "
                     "model on FineWeb, their hardware, their budget), improvement against the paper's own baseline; "
                     "compare our rows with them in relative terms only.")
        notes.append(f"¹ Computed from the two losses; the paper states {PAPER_STATED_IMPROVEMENT}.")
    default_pairs = [(key, base) for key in groups if base and key != base]
    sections = ["\n".join(lines), *notes, *paired_table(groups, labels, chosen or default_pairs, bool(chosen)),
                *seq_len_table(groups, labels)]
    return "\n\n".join(sections)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="DIR", help="run directories, or directories of runs")
    parser.add_argument("--paper", action="store_true", help="add the paper's two rows of Table 1")
    parser.add_argument("--pairs", metavar="A:B,...", help="the rows to pair, each A:B for A's val loss minus B's, "
                        "by run name (name@lr where a name has several rows); default: each row against the baseline")
    parser.add_argument("--out", metavar="FILE.md", help="also write the table to this file (never overwritten)")
    args = parser.parse_args(argv)
    try:
        text = table(load_runs(args.runs), paper=args.paper, pairs=args.pairs)
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
