"""Figures of runs, from their metrics.jsonl and config.json, and of finished runs, from their summary.json as
compare.py reads it; needs matplotlib (pip install matplotlib).

    python plot.py logs/baseline-20261127-120000 logs/gated-20261127-130000 --out figures
    python plot.py results/study/1-brackets --out figures          # every run directory under a directory
    python plot.py logs/r2 logs/r3 --gap gated:baseline --gap-x tokens --out figures

Writes into --out (made if missing; files already there are never overwritten):
- loss.png: train loss (faint: every step; solid: a moving average) and val loss (markers) against tokens,
  one colour per run, over the whole run and, beside it, over its second half, where the runs differ;
- gates_<run directory>.png, for each gated run: the mean gate of every layer and head, at up to
  MAX_GATE_PANELS evaluations evenly spread over training, on one colour scale from 0 to 1;
- sinks.png: per layer, the share of attention probability on the sequence's first token and on the first
  token of each query's window, at each run's last evaluation;
- lr.png, where an arm (run name, window, gate) has finished runs at two learning rates or more: final val loss
  against learning rate, per arm, mean over seeds with min-max bars, each arm's best rate starred;
- lengths.png, where finished runs evaluated at other lengths (--eval-seq-lens): val loss against evaluation
  length, per compare.py row, mean over seeds with min-max bars;
- gap.png, with --gap A:B and --gap-x tokens|params: A's val loss minus B's, paired by seed, at each training
  budget or model size, mean with its 95% Student t interval, each arm at its best rate there unless NAME@LR
  fixes one.
lr.png and lengths.png are left out, with a line saying why, when an arm's runs differ in tokens or params.
It also prints, for each gated run's last evaluation, a markdown table of its gates per layer.
"""
import argparse
import collections
import glob
import json
import math
import os
import statistics
import sys

import numpy as np

import compare

MAX_GATE_PANELS = 6  # more heatmaps in one row become too small to read
# The config.json fields that set a model's size (train_gpt.py's ModelConfig, its shape): runs that agree on them are
# one size for gap.png, whatever their arm, since a gate adds parameters and so two arms of one size differ in params.
SIZE_FIELDS = ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "mlp_hidden")
GAP_X = ("tokens", "params")


def read_jsonl(file):
    records = []
    with open(file) as f:
        for number, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}, line {number}: not valid JSON ({error})") from None
    return records


def load_run(run_dir):
    """A run's config, training records and evaluation records (the lines with a val_loss)."""
    for name in ("metrics.jsonl", "config.json"):
        if not os.path.exists(os.path.join(run_dir, name)):
            raise ValueError(f"{run_dir}: no {name}; is it a run directory written by train_gpt.py?")
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    run = {"dir": run_dir, "config": config,
           "label": f"{config['run_name']} seed {config['seed']} lr {config['lr']:g}",
           "train": [r for r in records if "train_loss" in r], "evals": [r for r in records if "val_loss" in r]}
    summary_file = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_file):  # finished: its final losses go into the figures of finished runs
        run["summary"] = compare.load_run(summary_file)
        run["summary"]["size"] = tuple(config.get(field) for field in SIZE_FIELDS)
    return run


def load_runs(paths):
    """Each path is a run directory (it holds metrics.jsonl) or a directory with runs at any depth, such as a study's
    folder (<arm>-lr<lr>-seed<seed>/<run directory>); a run found twice counts once."""
    runs, seen = [], set()
    for path in paths:
        if not os.path.isdir(path):
            raise ValueError(f"{path}: no such directory")
        found = glob.glob(os.path.join(path, "**", "metrics.jsonl"), recursive=True)
        inside = sorted(os.path.dirname(f) for f in found)
        for run_dir in inside or [path]:  # a path with no run in it goes to load_run, which says what it lacks
            if os.path.realpath(run_dir) not in seen:
                seen.add(os.path.realpath(run_dir))
                runs.append(load_run(run_dir))
    labels = [run["label"] for run in runs]
    for run in runs:  # two runs with one name, seed and lr would be told apart only by colour
        if labels.count(run["label"]) > 1:
            run["label"] += f" ({os.path.basename(os.path.normpath(run['dir']))})"
    return runs


def gated(run):
    return [e for e in run["evals"] if "gates" in e]


def with_sinks(run):
    return [e for e in run["evals"] if "sinks" in e]


def moving_average(values, width):
    return np.convolve(values, np.ones(width) / width, mode="valid")


def plot_losses(plt, runs, file):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    zoom = []  # (tokens, loss) of every point drawn, to frame the second half
    for i, run in enumerate(runs):
        tokens_per_step = run["config"]["batch_tokens"]
        tokens = np.array([r["step"] for r in run["train"]]) * tokens_per_step
        loss = np.array([r["train_loss"] for r in run["train"]])
        width = max(1, len(loss) // 50)  # about 50 independent points along the curve, whatever the run's length
        eval_tokens = [e["step"] * tokens_per_step for e in run["evals"]]
        eval_loss = [e["val_loss"] for e in run["evals"]]
        zoom += list(zip(tokens, loss)) + list(zip(eval_tokens, eval_loss))
        for ax in axes:
            ax.plot(tokens, loss, color=f"C{i}", alpha=0.2, linewidth=0.8)
            if len(loss):  # a run stopped before its first step has none
                centred = tokens[(width - 1) // 2:len(loss) - width // 2]  # each average sits mid-window
                ax.plot(centred, moving_average(loss, width), color=f"C{i}", linewidth=1.2)
            ax.plot(eval_tokens, eval_loss, color=f"C{i}", marker="o", linestyle="--", label=run["label"])
    late = [loss for t, loss in zoom if t >= max(t for t, _ in zoom) / 2 and np.isfinite(loss)]
    if late:  # a diverged run's inf or nan would make no frame at all
        axes[1].set_xlim(left=max(t for t, _ in zoom) / 2)
        axes[1].set_ylim(min(late) - 0.05, max(late) + 0.05)
    axes[0].set_title("train loss (solid) and val loss (markers)")
    axes[1].set_title("the same, second half of training")
    for ax in axes:
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_gates(plt, run, file):
    evals = gated(run)
    picks = sorted(set(np.linspace(0, len(evals) - 1, min(len(evals), MAX_GATE_PANELS)).round().astype(int)))
    fig, axes = plt.subplots(1, len(picks), figsize=(2.6 * len(picks) + 1, 3.5), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, i in zip(axes[0], picks):
        mean = np.array(evals[i]["gates"]["mean"])  # (layers, heads)
        image = ax.imshow(mean, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(mean.shape[1]))
        ax.set_yticks(range(mean.shape[0]))
        ax.set_title(f"step {evals[i]['step']}")
        ax.set_xlabel("head")
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="mean gate")
    fig.suptitle(f"{run['label']}: mean gate per layer and head")
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_sinks(plt, runs, file):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True, layout="constrained")
    for run in runs:
        last = with_sinks(run)[-1]
        kind = f"window {run['config']['window']}" if run["config"]["window"] else "full"
        label = f"{run['label']} ({kind}, gate {run['config']['gate']}, step {last['step']})"
        for ax, key in zip(axes, ("first_token", "window_start")):
            ax.plot(last["sinks"][key], marker="o", label=label)
    axes[0].set_title("share of attention on the sequence's first token")
    axes[1].set_title("share of attention on the first token of the window")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean attention probability")
    axes[0].legend(fontsize="small")
    fig.savefig(file, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Figures of finished runs, from their summary.json as compare.py reads it (compare.load_run): its rows, a run name,
# window, gate and learning rate, with the seeds as what is averaged (compare.group_runs). An arm is a row without
# its learning rate.


def arm(summary):
    return summary["run_name"], summary["window"], summary["gate"]


def arm_label(key):
    name, window, gate = key[:3]
    return f"{name} ({f'window {window}' if window else 'full'}, gate {gate})"


def spread(values):
    return statistics.mean(values), min(values), max(values)


def mixed_budget(summaries) -> str:
    """What makes one arm's runs unlike (their tokens or params differ), else "": a curve of such runs would mix
    budgets or sizes under one name."""
    for key in ("tokens", "params"):
        values = {}
        for r in summaries:
            values.setdefault(arm(r), set()).update([r[key]] if key in r else [])
        for name, found in values.items():
            if len(found) > 1:
                return f"the {name[0]} runs differ in {key} ({', '.join(f'{v:,}' for v in sorted(found))})"
    return ""


def lr_curves(summaries):
    """Final val loss against learning rate, per arm: {arm: [(lr, mean, min, max) over its seeds, by rising lr]}."""
    curves = {}
    for key, members in compare.group_runs(summaries).items():
        curves.setdefault(key[:3], []).append((key[3], *spread([r["val_loss"] for r in members])))
    return {key: sorted(points) for key, points in curves.items()}


def plot_lr(plt, curves, file):
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for i, (key, points) in enumerate(curves.items()):
        lrs, means, lows, highs = (np.array(values) for values in zip(*points))
        ax.errorbar(lrs, means, yerr=[means - lows, highs - means], color=f"C{i}", marker="o", capsize=3,
                    label=arm_label(key))
        best = min(points, key=lambda point: point[1])
        ax.plot(best[0], best[1], color=f"C{i}", marker="*", markersize=16, linestyle="none")
    rates = sorted({point[0] for points in curves.values() for point in points})
    ax.set_xscale("log")
    ax.set_xticks(rates, [f"{lr:g}" for lr in rates])
    ax.minorticks_off()  # the log axis's own minor ticks would sit between the rates and label nothing
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final val loss")
    ax.set_title("final val loss against learning rate\nmean over seeds, bars min–max, star: each arm's best rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(file, dpi=120)
    plt.close(fig)


def length_curves(summaries):
    """Val loss against evaluation length (summary.json's val_loss_by_seq_len, --eval-seq-lens), per row whose runs
    have it: {(run name, window, gate, lr): [(length, mean, min, max, n) by rising length]}, over the n of its runs
    evaluated at that length."""
    curves = {}
    for key, members in compare.group_runs(summaries).items():
        by_length = {}
        for r in members:
            for length, loss in r.get("val_loss_by_seq_len", {}).items():
                by_length.setdefault(int(length), []).append(loss)
        if by_length:
            curves[key] = [(length, *spread(losses), len(losses)) for length, losses in sorted(by_length.items())]
    return curves


def plot_lengths(plt, curves, file):
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for i, (key, points) in enumerate(curves.items()):
        lengths, means, lows, highs, _ = (np.array(values) for values in zip(*points))
        ax.errorbar(lengths, means, yerr=[means - lows, highs - means], color=f"C{i}", marker="o", capsize=3,
                    label=f"{arm_label(key)} lr {key[3]:g}")
    lengths = sorted({point[0] for points in curves.values() for point in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.minorticks_off()
    ax.set_xlabel("evaluation sequence length (tokens)")
    ax.set_ylabel("val loss")
    ax.set_title("val loss against evaluation length\nmean over seeds, bars min–max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(file, dpi=120)
    plt.close(fig)


# A point of gap.png at one x: A's val loss minus B's, mean over the seeds both have (n), with its 95% interval (low,
# high; None from one seed); rates: the learning rates of A and B used there; choices: how many each had at that x.
GapPoint = collections.namedtuple("GapPoint", "x mean low high n rates choices")


def side_label(side):
    name, lr = side
    return name if lr is None else f"{name}@{lr:g}"


def parse_gap(text, summaries):
    """--gap A:B as two (run name, lr) sides, lr None for the arm's best rate at each x (NAME@LR: that rate only)."""
    first, colon, second = text.partition(":")
    if not colon or not first or not second:
        raise ValueError(f"--gap {text}: expected A:B, e.g. gated:baseline")
    arms = {}
    for r in summaries:
        arms.setdefault(r["run_name"], set()).add((r["window"], r["gate"]))
    sides = []
    for side in (first, second):
        name, at, lr = side.partition("@")
        if name not in arms:
            raise ValueError(f"--gap {text}: no row {name!r}; the rows are {', '.join(arms)} (NAME, or NAME@LR for "
                             f"one learning rate)")
        if len(arms[name]) > 1:  # its best rate could then be another arm's
            kinds = ", ".join(f"window {window} gate {gate}" for window, gate in sorted(arms[name]))
            raise ValueError(f"--gap {text}: the runs named {name!r} are of several arms ({kinds}); give each arm "
                             f"its own --run-name")
        rate = None
        if at:
            rates = sorted({r["lr"] for r in summaries if r["run_name"] == name})
            try:
                rate = float(lr)
            except ValueError:
                raise ValueError(f"--gap {text}: {lr!r} is not a learning rate; write NAME@LR, e.g. {name}@"
                                 f"{rates[0]:g}") from None
            if rate not in rates:
                raise ValueError(f"--gap {text}: {name} has no runs at lr {lr}; its rates are "
                                 f"{', '.join(f'{r:g}' for r in rates)}")
        sides.append((name, rate))
    return sides


def gap_points(summaries, pair, x):
    """A's val loss minus B's (pair: parse_gap's sides), paired by seed, at each value of x: "tokens", or "params"
    (runs of one size, SIZE_FIELDS, placed at B's parameter count). Where a side has runs at several rates at one x,
    its best there (lowest mean val loss over its seeds) stands for it. Returns the GapPoints by rising x, and a line
    for each x left out."""
    other = "params" if x == "tokens" else "tokens"
    by_x = {}
    for r in summaries:
        if x not in r:
            raise ValueError(f"--gap-x {x}: {r['run_dir']}/summary.json has no {x}, which gap.png needs; leave that "
                             f"run out")
        by_x.setdefault(r[x] if x == "tokens" else r["size"], []).append(r)
    points, left_out = [], []
    for key, members in by_x.items():
        some = members[0]
        where = f"{key:,} tokens" if x == "tokens" else f"{some['run_name']}'s size of {some['params']:,} parameters"
        sides = [[r for r in members if r["run_name"] == name and lr in (None, r["lr"])] for name, lr in pair]
        missing = [side_label(side) for side, runs in zip(pair, sides) if not runs]
        if missing:
            left_out.append(f"at {where}: no {' or '.join(missing)} runs")
            continue
        for runs in sides:  # at one x, runs must differ only in x's property, or a "best rate" compares unlike runs
            values = sorted({r[other] for r in runs if other in r})
            if len(values) > 1:
                raise ValueError(f"--gap-x {x}: at {where}, the {runs[0]['run_name']} runs differ in {other} "
                                 f"({', '.join(f'{v:,}' for v in values)}); pass runs that differ only in {x}")
        groups = [compare.group_runs(runs) for runs in sides]
        best = [min(rows, key=lambda row: statistics.mean(r["val_loss"] for r in rows[row])) for rows in groups]
        losses = [{(r["seed"], r["data_seed"]): r["val_loss"] for r in rows[row]} for rows, row in zip(groups, best)]
        seeds = [seed for seed in losses[0] if seed in losses[1]]
        if not seeds:
            left_out.append(f"at {where}: {' and '.join(map(side_label, pair))} have no seed in common")
            continue
        differences = [losses[0][seed] - losses[1][seed] for seed in seeds]
        mean, low, high = statistics.mean(differences), None, None
        if len(seeds) > 1:  # Student t on the differences, as compare.py's paired table
            half = compare.t_quantile(0.975, len(seeds) - 1) * statistics.stdev(differences) / math.sqrt(len(seeds))
            low, high = mean - half, mean + half
        position = key if x == "tokens" else groups[1][best[1]][0]["params"]
        points.append(GapPoint(position, mean, low, high, len(seeds), (best[0][3], best[1][3]),
                               (len(groups[0]), len(groups[1]))))
    return sorted(points), left_out


def plot_gap(plt, points, pair, x, file):
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.plot([p.x for p in points], [p.mean for p in points], color="C0", marker="o")
    spans = [p for p in points if p.low is not None]
    if spans:
        ax.errorbar([p.x for p in spans], [p.mean for p in spans], color="C0", linestyle="none", capsize=4,
                    yerr=[[p.mean - p.low for p in spans], [p.high - p.mean for p in spans]])
    for p in points:
        ax.annotate(f"{p.n} seed{'s' if p.n > 1 else ''}", (p.x, p.mean), textcoords="offset points", xytext=(6, 6),
                    fontsize="small")
    ax.set_xscale("log")
    ax.margins(x=0.1)  # room for the last point's label
    ax.set_xticks([p.x for p in points], [f"{p.x:,}" for p in points])
    ax.minorticks_off()
    a, b = map(side_label, pair)
    ax.set_xlabel("training tokens" if x == "tokens" else f"parameters (of {b})")
    ax.set_ylabel(f"val loss, {a} − {b}")
    title = f"{a} − {b}, paired by seed: mean, bars 95% t interval (none from one seed)"
    if any(max(p.choices) > 1 for p in points):
        title += "\neach arm at its best learning rate at each x (lowest mean val loss)"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.savefig(file, dpi=120)
    plt.close(fig)


def gate_table(run) -> str:
    """Per layer at the last evaluation: the gate's mean, its range over heads, and how often it is nearly shut or open."""
    last = gated(run)[-1]
    gates = {key: np.array(value) for key, value in last["gates"].items()}  # each (layers, heads)
    lines = [f"Gates of {run['label']} at step {last['step']} (means over heads; std is over tokens):", "",
             "| layer | mean | head min–max | std | < 0.1 | > 0.9 |", "| --- | --- | --- | --- | --- | --- |"]
    for layer, mean in enumerate(gates["mean"]):
        lines.append(f"| {layer} | {mean.mean():.3f} | {mean.min():.3f}–{mean.max():.3f} | "
                     f"{gates['std'][layer].mean():.3f} | {100 * gates['below_0.1'][layer].mean():.1f}% | "
                     f"{100 * gates['above_0.9'][layer].mean():.1f}% |")
    return "\n".join(lines)


def gap_figure(summaries, text, x):
    """gap.png of --gap text against --gap-x x, with a line for each x it leaves out and each best rate it picks."""
    if not summaries:
        raise ValueError(f"--gap {text}: none of the runs given has finished (no summary.json)")
    pair = parse_gap(text, summaries)
    points, left_out = gap_points(summaries, pair, x)
    if not points:
        raise ValueError(f"--gap {text}: no {x} value at which both have runs of one seed ({'; '.join(left_out)})")
    for line in left_out:
        print(f"gap.png has no point {line}", file=sys.stderr)
    for p in points:
        if max(p.choices) > 1:
            where = f"{p.x:,} {'tokens' if x == 'tokens' else 'parameters'}"
            print(f"gap.png at {where}: " + ", ".join(f"{name} at lr {lr:g} (best of {count})" for (name, _), lr, count
                                                        in zip(pair, p.rates, p.choices)))
    return {"gap.png": lambda plt, file: plot_gap(plt, points, pair, x, file)}


def summary_figures(summaries):
    """The figures of finished runs that these runs have what they need for, as {file name: draw(plt, file)}."""
    rates = {}
    for r in summaries:
        rates.setdefault(arm(r), set()).add(r["lr"])
    wanted = ["lr.png"] if any(len(found) > 1 for found in rates.values()) else []  # one rate per arm is no curve
    wanted += ["lengths.png"] if any("val_loss_by_seq_len" in r for r in summaries) else []
    unlike = mixed_budget(summaries)
    if wanted and unlike:
        print(f"{' and '.join(wanted)} not drawn: {unlike}; pass the runs of one training budget and model size",
              file=sys.stderr)
        return {}
    figures = {}
    if "lr.png" in wanted:
        rate_curves = lr_curves(summaries)
        figures["lr.png"] = lambda plt, file: plot_lr(plt, rate_curves, file)
    if "lengths.png" in wanted:
        curves = length_curves(summaries)
        for key, points in curves.items():
            if len({point[4] for point in points}) > 1:  # its means at two lengths are then over different runs
                counts = ", ".join(f"{point[4]} at {point[0]}" for point in points)
                print(f"lengths.png: {arm_label(key)} lr {key[3]:g} has runs at some lengths only ({counts})",
                      file=sys.stderr)
        figures["lengths.png"] = lambda plt, file: plot_lengths(plt, curves, file)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories with runs at any depth")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
    parser.add_argument("--gap", metavar="A:B", help="gap.png: A's val loss minus B's, paired by seed, against "
                        "--gap-x; rows by run name (each arm's best rate at each x), or NAME@LR for one rate")
    parser.add_argument("--gap-x", choices=GAP_X, help="what gap.png's x axis is: the runs' training tokens, or "
                        "their parameters (runs of one model shape are one size)")
    args = parser.parse_args(argv)
    if bool(args.gap) != bool(args.gap_x):
        sys.exit("error: --gap and --gap-x go together: --gap A:B --gap-x tokens (or params)")
    try:
        runs = load_runs(args.runs)
    except ValueError as error:
        sys.exit(f"error: {error}")
    figures = {"loss.png": lambda plt, file: plot_losses(plt, runs, file)}
    for run in filter(gated, runs):
        name = os.path.basename(os.path.normpath(run["dir"]))
        figures[f"gates_{name}.png"] = lambda plt, file, run=run: plot_gates(plt, run, file)
    sink_runs = list(filter(with_sinks, runs))
    for run in runs:
        if not with_sinks(run):  # a run from before train_gpt.py logged them
            print(f"{run['dir']}: no attention sinks in its evaluations, so it is not in sinks.png", file=sys.stderr)
    if sink_runs:
        figures["sinks.png"] = lambda plt, file: plot_sinks(plt, sink_runs, file)
    summaries = [run["summary"] for run in runs if "summary" in run]
    try:
        figures.update(summary_figures(summaries))
        if args.gap:
            figures.update(gap_figure(summaries, args.gap, args.gap_x))
    except ValueError as error:
        sys.exit(f"error: {error}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        sys.exit(f"error: --out {args.out} is a file, not a folder; pass a folder for the figures")
    existing = [name for name in figures if os.path.exists(os.path.join(args.out, name))]
    if existing:
        sys.exit(f"error: --out {args.out} already holds {', '.join(existing)}; delete them or choose another --out")
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: plot.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")  # files only: no display needed, and none opened
    import matplotlib.pyplot as plt
    try:
        os.makedirs(args.out, exist_ok=True)
        for name, draw in figures.items():
            draw(plt, os.path.join(args.out, name))
            print(f"wrote {os.path.join(args.out, name)}")
    except OSError as error:
        sys.exit(f"error: --out {args.out}: cannot write the figures there ({error}); pass a folder you can write to")
    for run in filter(gated, runs):
        print("\n" + gate_table(run))


if __name__ == "__main__":
    main()
