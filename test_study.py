"""study.py's queue of runs, compare.py's table and plot.py's figures, on fake runs and on run directories written
here by hand (no training); and that run.sh keeps to bash 3.2.

    python -m pytest -q test_study.py
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

import compare
import plot
import study as driver  # study.py; study() below writes a study's run directories

HERE = os.path.dirname(os.path.abspath(__file__))


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def write_summary(parent, dir_name, run_name, val_loss, seed, window=0, gate="none", lr=1e-3, train_time_s=100.0,
                  tokens_per_s=1000.0, tokens=1_000_000, params=1_000, **extra):
    """A run directory with train_gpt.py's summary.json; extra: its newer entries (provenance, val_loss_by_seq_len)."""
    run_dir = os.path.join(parent, dir_name)
    os.makedirs(run_dir)
    write_json(os.path.join(run_dir, "summary.json"),
               {"val_loss": val_loss, "train_time_s": train_time_s, "tokens": tokens, "tokens_per_s": tokens_per_s,
                "mfu": None, "peak_mem_gb": None, "params": params, "window": window, "gate": gate,
                "run_name": run_name, "seed": seed, "lr": lr, "device": "cpu", "world_size": 1, **extra})
    return run_dir


def study(tmp_path):
    """Three baseline seeds and two gated seeds."""
    for seed, (loss, time_s, speed) in enumerate([(5.0, 100, 1000), (5.2, 110, 2000), (5.1, 120, 3000)]):
        write_summary(tmp_path, f"baseline-{seed}", "baseline", loss, seed, train_time_s=time_s, tokens_per_s=speed)
    for seed, (loss, time_s) in enumerate([(4.9, 9000), (4.7, 9720)]):
        write_summary(tmp_path, f"gated-{seed}", "gated", loss, seed, window=256, gate="head", train_time_s=time_s,
                      tokens_per_s=1500)
    return str(tmp_path)


def table_lines(*argv):
    return compare.table(compare.load_runs(argv[:1]), paper="--paper" in argv).splitlines()


def test_compare_mean_sample_std_range_and_improvement(tmp_path):
    lines = table_lines(study(tmp_path))
    assert lines[0] == ("| run | window | gate | lr | seeds | n | val loss | min–max | train time | tokens/s "
                        "| vs baseline |")
    # baseline: mean 5.1, sample std 0.1; gated: mean 4.8, sample std sqrt(0.02) = 0.1414; (5.1 - 4.8) / 5.1 = 5.88%
    assert lines[2] == "| baseline | full | none | 0.001 | 0,1,2 | 3 | 5.1000 ± 0.1000 | 5.0000–5.2000 | 110.0 s | 2,000 | baseline |"
    assert lines[3] == "| gated | 256 | head | 0.001 | 0,1 | 2 | 4.8000 ± 0.1414 | 4.7000–4.9000 | 2.6 h | 1,500 | 5.88% |"
    assert "against `baseline` at lr 0.001, the only full-attention ungated row" in lines[5]
    assert not any("paper" in line for line in lines)


def test_compare_splits_learning_rates_and_takes_the_strongest_baseline(tmp_path):
    write_summary(tmp_path, "b1", "baseline", 5.0, 0, lr=1e-3)
    write_summary(tmp_path, "b2", "baseline", 4.0, 0, lr=2e-3)
    write_summary(tmp_path, "g1", "gated", 3.8, 0, window=256, gate="head", lr=2e-3)
    write_summary(tmp_path, "g2", "gated", 3.0, 1, window=256, gate="head", lr=3e-3)
    lines = table_lines(str(tmp_path))
    assert [line.split(" | ")[3] for line in lines[2:6]] == ["0.001", "0.002", "0.002", "0.003"]
    assert [line.split(" | ")[5] for line in lines[2:6]] == ["1"] * 4  # no two learning rates averaged
    assert [line.split(" | ")[-1] for line in lines[2:6]] == ["-25.00% |", "baseline |", "5.00% |", "25.00% |"]
    assert "against `baseline` at lr 0.002, the lowest mean val loss of the 2 full-attention ungated rows" in lines[7]


def test_compare_paper_rows(tmp_path):
    lines = table_lines(study(tmp_path), "--paper")
    assert "| paper: full attention | full | none |  |  |  | 4.9266 |  | 24.5 h |  | baseline |" in lines
    assert "| paper: window + gate | 256 | head |  |  |  | 4.6498 |  | 25.1 h |  | 5.62% ¹ |" in lines
    assert "¹ Computed from the two losses; the paper states 5.7%." in lines
    assert any("FineWeb, their hardware, their budget" in line for line in lines)


def test_compare_out_writes_the_table_and_never_overwrites(tmp_path, capsys):
    runs, out = study(tmp_path / "logs"), str(tmp_path / "table.md")
    compare.main([runs, "--paper", "--out", out])
    printed = capsys.readouterr().out
    with open(out) as f:
        assert f.read() == printed
    with pytest.raises(SystemExit, match="--out .*table.md: the file exists"):
        compare.main([runs, "--out", out])
    with open(out) as f:
        assert f.read() == printed


def test_compare_errors_name_the_directory_or_file(tmp_path):
    with pytest.raises(SystemExit, match="nowhere: no such directory"):
        compare.main([str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="no summary.json in it or in its subdirectories"):
        compare.main([str(tmp_path)])
    write_summary(tmp_path, "a", "baseline", 5.0, 0, tokens=1000)
    write_summary(tmp_path, "b", "baseline", 5.1, 1, tokens=2000)
    with pytest.raises(SystemExit, match=r"runs named 'baseline' at lr 0.001 differ in tokens \(\[1000, 2000\]\)"):
        compare.main([str(tmp_path)])


def test_compare_old_summary_takes_seed_and_lr_from_config(tmp_path):
    run_dir = write_summary(tmp_path, "old", "baseline", 5.0, 0)
    summary_file = os.path.join(run_dir, "summary.json")
    with open(summary_file) as f:
        summary = json.load(f)
    del summary["seed"], summary["lr"]
    write_json(summary_file, summary)
    with pytest.raises(SystemExit, match="summary.json: no seed, and no config.json beside it"):
        compare.main([str(tmp_path)])
    write_json(os.path.join(run_dir, "config.json"), {"seed": 7, "lr": 0.002})
    assert table_lines(str(tmp_path))[2].startswith("| baseline | full | none | 0.002 | 7 | 1 | 5.0000 |")


def test_compare_command_line(tmp_path):
    """The README's (and run.sh's) command: python compare.py DIR."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "compare.py"), study(tmp_path)],
                            capture_output=True, text=True, check=True)
    assert "| gated | 256 | head | 0.001 | 0,1 | 2 | 4.8000 ± 0.1414 |" in result.stdout



@pytest.mark.parametrize("p, dof, t", [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.975, 5, 2.5706),
                                       (0.975, 10, 2.2281), (0.975, 30, 2.0423), (0.975, 120, 1.9799),
                                       (0.95, 4, 2.1318), (0.995, 3, 5.8409)])
def test_compare_t_quantile_matches_the_tables(p, dof, t):
    assert compare.t_quantile(p, dof) == pytest.approx(t, abs=1e-4)


def paired_lines(text):
    return [line for line in text.splitlines() if line.startswith("| ") and " − " in line]


def test_compare_pairs_each_row_with_the_baseline_by_seed(tmp_path):
    """Seeds 0-2 in both rows, seed 3 only in gated's: the differences are -0.10, -0.20, -0.15 (seed 3 left out),
    mean -0.15, sample std 0.05, half-width t(0.975, 2) 4.3027 x 0.05 / sqrt(3) = 0.1242."""
    for seed, loss in enumerate([5.0, 5.2, 5.1]):
        write_summary(tmp_path, f"b{seed}", "baseline", loss, seed)
    for seed, loss in enumerate([4.9, 5.0, 4.95, 3.0]):
        write_summary(tmp_path, f"g{seed}", "gated", loss, seed, window=256, gate="head")
    write_summary(tmp_path, "w", "window", 5.0, 7, window=256)
    write_summary(tmp_path, "b-lr", "baseline", 6.0, 0, lr=2e-3)
    text = compare.table(compare.load_runs([str(tmp_path)]))
    assert paired_lines(text) == [
        "| baseline@0.002 − baseline@0.001 | 0 | 1 | +1.0000 | +1.0000 |  | 1/1 |",
        "| gated − baseline@0.001 | 0,1,2 | 3 | -0.1000, -0.2000, -0.1500 | -0.1500 | -0.2742 to -0.0258 | 3/3 |"]
    assert "Not paired, no seed in common: window − baseline@0.001." in text


def test_compare_pairs_chosen_rows_and_counts_the_seeds_that_agree(tmp_path):
    for seed, (gated, window) in enumerate([(4.9, 4.8), (5.0, 5.1), (4.9, 5.0)]):
        write_summary(tmp_path, f"g{seed}", "gated", gated, seed, window=256, gate="head")
        write_summary(tmp_path, f"w{seed}", "window", window, seed, window=256)
    write_summary(tmp_path, "b", "baseline", 5.5, 0)
    text = compare.table(compare.load_runs([str(tmp_path)]), pairs="gated:window")
    # differences +0.1, -0.1, -0.1: mean -0.0333, two of three seeds with its sign; t(0.975, 2) x 0.11547 / sqrt(3)
    assert paired_lines(text) == ["| gated − window | 0,1,2 | 3 | +0.1000, -0.1000, -0.1000 | -0.0333 | "
                                  "-0.3202 to +0.2535 | 2/3 |"]


def test_compare_gives_the_interaction_of_a_two_by_two_by_seed(tmp_path):
    """baseline, window, gate and gated at one rate: interaction (gated - gate) - (window - baseline) per seed over
    the seeds all four have: seed 0: (3.6 - 3.7) - (4.0 - 4.0) = -0.1; seed 1: (3.5 - 3.8) - (4.2 - 4.1) = -0.4;
    seed 2 lacks gate. Mean -0.25, sample std 0.2121, half-width t(0.975, 1) 12.7062 x 0.2121 / sqrt(2) = 1.9059.
    const (windowed, gated by a constant) has no gate-alone corner, so no 2 x 2; nor has the other rate's baseline."""
    for seed, losses in enumerate([(4.0, 4.0, 3.7, 3.6), (4.1, 4.2, 3.8, 3.5), (4.3, 4.3, None, 3.7)]):
        for (name, window, gate), loss in zip([("baseline", 0, "none"), ("window", 256, "none"),
                                               ("gate", 0, "head"), ("gated", 256, "head")], losses):
            if loss is not None:
                write_summary(tmp_path, f"{name}{seed}", name, loss, seed, window=window, gate=gate)
        write_summary(tmp_path, f"const{seed}", "const", 3.9, seed, window=256, gate="const")
    write_summary(tmp_path, "b-lr", "baseline", 4.5, 0, lr=2e-3)
    text = compare.table(compare.load_runs([str(tmp_path)]))
    (line,) = [line for line in paired_lines(text) if "interaction" in line]
    assert line == ("| interaction: (gated − gate) − (window − baseline@0.001) | 0,1 | 2 | -0.1000, -0.4000 | -0.2500 "
                    "| -2.1559 to +1.6559 | 2/2 |")
    assert "Interaction: in a 2 x 2 of window and gate at one learning rate" in text
    assert "No interaction for" not in text
    write_summary(tmp_path, "other0", "other", 4.0, 0)  # a second full-attention, ungated row at the rate
    text = compare.table(compare.load_runs([str(tmp_path)]))
    assert not [line for line in paired_lines(text) if "interaction" in line]
    assert ("No interaction for gated (baseline@0.001 or other): a corner of its 2 x 2 has several rows (by window, "
            "gate and learning rate); compare those rows with --pairs.") in text


@pytest.mark.parametrize("pairs, message", [
    ("gated", "--pairs gated: expected ROW:ROW"),
    ("gated:nope", "--pairs nope: no such row; the rows are baseline@0.001, baseline@0.002, gated"),
    ("gated:baseline", "--pairs baseline: baseline has rows at lr 0.001, 0.002; write baseline@0.001"),
    ("gated:baseline@x", "--pairs baseline@x: 'x' is not a learning rate"),
    ("gated:baseline@0.002", "--pairs gated:baseline@0.002: the rows have no seed in common"),
])
def test_compare_pairs_errors_name_the_pair(tmp_path, pairs, message):
    write_summary(tmp_path, "b1", "baseline", 5.0, 0)
    write_summary(tmp_path, "b2", "baseline", 5.0, 1, lr=2e-3)
    write_summary(tmp_path, "g", "gated", 5.0, 0, window=256, gate="head")
    with pytest.raises(SystemExit, match=re.escape(f"error: {message}")):
        compare.main([str(tmp_path), "--pairs", pairs])
    assert "| gated − baseline@0.001 | 0 | 1 |" in compare.table(compare.load_runs([str(tmp_path)]),
                                                                pairs="gated:baseline@0.001")


def test_compare_counts_a_run_found_twice_once_and_refuses_a_seed_twice(tmp_path):
    study_dir = tmp_path / "study"
    write_summary(study_dir / "baseline-lr0.001-seed0", "baseline-20261201-120000", "baseline", 5.0, 0)
    run = write_summary(study_dir / "gated-lr0.001-seed0", "gated-20261201-120000", "gated", 4.0, 0, window=256,
                        gate="head")
    lines = table_lines(str(study_dir), run)  # a directory and a run inside it; the run is found at any depth
    assert [line.split(" | ")[5] for line in lines[2:4]] == ["1", "1"]
    again = write_summary(study_dir / "gated-lr0.001-seed0", "gated-20261201-130000", "gated", 4.1, 0, window=256,
                          gate="head")
    with pytest.raises(SystemExit, match=re.escape(f"error: {run} and {again} are both 'gated' at lr 0.001, seed 0: "
                                                   "a seed counted twice")):
        compare.main([str(study_dir)])


def test_compare_data_seed_is_part_of_the_seed(tmp_path):
    """Runs with one --seed and different --data-seed orders are different runs, labelled seed/data; a config.json
    data seed of -1 is the seed itself."""
    for data_seed in (3, 4):
        run_dir = write_summary(tmp_path, f"d{data_seed}", "baseline", 5.0, 0)
        write_json(os.path.join(run_dir, "config.json"), {"seed": 0, "lr": 1e-3, "data_seed": data_seed})
    run_dir = write_summary(tmp_path, "d-1", "baseline", 5.0, 0)
    write_json(os.path.join(run_dir, "config.json"), {"seed": 0, "lr": 1e-3, "data_seed": -1})
    assert table_lines(str(tmp_path))[2].startswith("| baseline | full | none | 0.001 | 0,0/data 3,0/data 4 | 3 |")


def provenance(commit="1a2b3c4d5e6f", dirty=False, code="c" * 64, train="t" * 64, val="v" * 64):
    return {"provenance": {"git_commit": commit, "git_dirty": dirty, "code_sha256": code, "train_data": train,
                           "val_data": val}}


def test_compare_notes_runs_of_other_code_or_data_and_unknown_provenance(tmp_path):
    write_summary(tmp_path, "b0", "baseline", 5.0, 0, **provenance())
    write_summary(tmp_path, "b1", "baseline", 5.0, 1, **provenance())
    write_summary(tmp_path, "g0", "gated", 5.0, 0, window=256, gate="head", **provenance())
    write_summary(tmp_path, "g1", "gated", 5.0, 1, window=256, gate="head",
                  **provenance(commit="9f8e7d6c5b4a", dirty=True, code="d" * 64, train="0" * 64))
    text = compare.table(compare.load_runs([str(tmp_path)]))
    assert ("Caution: these runs were not trained from the same code and data; commit: 1a2b3c4 (baseline seeds 0,1; "
            "gated seed 0), 9f8e7d6 (gated seed 1); uncommitted changes: no (baseline seeds 0,1; gated seed 0), "
            "yes (gated seed 1); code: cccccccccccc (baseline seeds 0,1; gated seed 0), dddddddddddd (gated seed 1); "
            "train data: tttttttttttt (baseline seeds 0,1; gated seed 0), 000000000000 (gated seed 1).") in text
    assert "unknown" not in text
    write_summary(tmp_path, "g2", "gated", 5.0, 2, window=256, gate="head")
    text = compare.table(compare.load_runs([str(tmp_path)]))
    assert "Provenance unknown (no commit, code or data fingerprints in summary.json): gated seed 2." in text


def test_compare_same_code_from_other_commits_needs_no_note(tmp_path):
    # a study run from a pinned copy of the code records the checkout's commit, which moves on between sessions
    write_summary(tmp_path, "b0", "baseline", 5.0, 0, **provenance())
    write_summary(tmp_path, "g0", "gated", 5.0, 0, window=256, gate="head", **provenance(commit="9f8e7d6c5b4a"))
    assert "Caution" not in compare.table(compare.load_runs([str(tmp_path)]))
    write_summary(tmp_path, "g1", "gated", 5.0, 1, window=256, gate="head",
                  **provenance(commit="9f8e7d6c5b4a", code="d" * 64))
    text = compare.table(compare.load_runs([str(tmp_path)]))
    assert "commit: 1a2b3c4 (baseline seed 0), 9f8e7d6 (gated seeds 0,1)" in text
    assert "code: cccccccccccc (baseline seed 0; gated seed 0), dddddddddddd (gated seed 1)" in text


def test_compare_same_provenance_needs_no_note(tmp_path):
    write_summary(tmp_path, "b0", "baseline", 5.0, 0, **provenance(commit=None, dirty=None))
    write_summary(tmp_path, "g0", "gated", 5.0, 0, window=256, gate="head", **provenance(commit=None, dirty=None))
    text = compare.table(compare.load_runs([str(tmp_path)]))
    assert "Caution" not in text and "Provenance unknown" not in text


def test_compare_val_loss_by_evaluation_length(tmp_path):
    write_summary(tmp_path, "b0", "baseline", 5.0, 0, val_loss_by_seq_len={"1024": 5.0, "2048": 5.5})
    write_summary(tmp_path, "b1", "baseline", 5.2, 1, val_loss_by_seq_len={"1024": 5.2})
    write_summary(tmp_path, "g0", "gated", 5.0, 0, window=256, gate="head",
                  val_loss_by_seq_len={"1024": 4.8, "2048": 4.7, "8192": 4.6})
    text = compare.table(compare.load_runs([str(tmp_path)]))
    assert ("| run | window | gate | lr | T=1024 | T=2048 | T=8192 |\n| --- | --- | --- | --- | --- | --- | --- |\n"
            "| baseline | full | none | 0.001 | 5.1000 | 5.5000 (1 of 2) |  |\n"
            "| gated | 256 | head | 0.001 | 4.8000 | 4.7000 | 4.6000 |") in text
    assert "; (k of n): only k of its n runs evaluated at that length." in text
    write_summary(tmp_path / "other", "b", "baseline", 5.0, 0)
    assert "T=" not in compare.table(compare.load_runs([str(tmp_path / "other")]))


LAYERS, HEADS = 3, 4


def gate_stats(step):
    """Layer l, head h: mean gate (l + 1) * (h + 1) / 12 * step / 60, so the heatmaps change over training."""
    mean = [[(l + 1) * (h + 1) / (LAYERS * HEADS) * step / 60 for h in range(HEADS)] for l in range(LAYERS)]
    return {"mean": mean, "std": [[0.1] * HEADS for _ in range(LAYERS)],
            "below_0.1": [[0.25 * (h == 0) for h in range(HEADS)] for _ in range(LAYERS)],
            "above_0.9": [[0.0] * HEADS for _ in range(LAYERS)]}


def write_metrics_run(parent, name, window, gate, steps=60, val_every=10):
    run_dir = os.path.join(parent, name)
    os.makedirs(run_dir)
    write_json(os.path.join(run_dir, "config.json"), {"run_name": name, "seed": 0, "lr": 1e-3, "window": window,
                                                      "gate": gate, "batch_tokens": 2048})
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(steps + 1):
            if step % val_every == 0:
                record = {"step": step, "val_loss": 10 - step / 10, "train_time_s": step / 2,
                          "sinks": {"first_token": [0.5 - 0.1 * l for l in range(LAYERS)],
                                    "window_start": [0.3] * LAYERS}}
                if gate != "none":
                    record["gates"] = gate_stats(step)
                f.write(json.dumps(record) + "\n")
            if step < steps:
                f.write(json.dumps({"step": step + 1, "train_loss": 10 - step / 10 + 0.2 * (step % 2), "lr": 1e-3,
                                    "grad_norm": 0.5, "step_ms": 100.0}) + "\n")
    return run_dir


def write_finished_run(study_dir, name, lr, seed, val_loss, window=0, gate="none", n_layer=2, **summary):
    """A finished run where study.py puts it, <study_dir>/<arm>-lr<lr>-seed<seed>/<name>-0/: config.json, a short
    metrics.jsonl and summary.json (summary: write_summary's keywords, such as tokens, params, val_loss_by_seq_len)."""
    run_dir = write_summary(os.path.join(study_dir, f"{name}-lr{lr:g}-seed{seed}"), f"{name}-0", name, val_loss, seed,
                            window=window, gate=gate, lr=lr, **summary)
    write_json(os.path.join(run_dir, "config.json"), {"run_name": name, "seed": seed, "lr": lr, "window": window,
                                                      "gate": gate, "batch_tokens": 2048, "n_layer": n_layer})
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "train_loss": val_loss + 1}) + "\n")
        f.write(json.dumps({"step": 1, "val_loss": val_loss}) + "\n")
    return run_dir


def test_plot_reads_a_study_folder_at_any_depth(tmp_path):
    baseline = write_finished_run(tmp_path / "study", "baseline", 1e-3, 0, 5.0)
    gated = write_finished_run(tmp_path / "study", "gated", 1e-3, 0, 4.9, window=256, gate="head")
    runs = plot.load_runs([str(tmp_path / "study"), baseline])  # the baseline found twice counts once
    assert sorted(run["dir"] for run in runs) == [baseline, gated]


def learning_rate_study(study_dir, tokens=1_000_000):
    """baseline at lr 1e-3 (seeds 0, 1, 2) and 2e-3 (seed 0); gated at 1e-3 and 2e-3 (seeds 0, 1)."""
    for lr, losses in ((1e-3, [5.0, 5.2, 5.1]), (2e-3, [4.9])):
        for seed, loss in enumerate(losses):
            write_finished_run(study_dir, "baseline", lr, seed, loss, tokens=tokens)
    for lr, losses in ((1e-3, [4.8, 4.6]), (2e-3, [4.7, 4.9])):
        for seed, loss in enumerate(losses):
            write_finished_run(study_dir, "gated", lr, seed, loss, window=256, gate="head", tokens=tokens)
    return str(study_dir)


def finished(*paths):
    return [run["summary"] for run in plot.load_runs(paths) if "summary" in run]


def test_plot_lr_curves_mean_and_range_over_seeds(tmp_path):
    curves = plot.lr_curves(finished(learning_rate_study(tmp_path)))
    assert list(curves) == [("baseline", 0, "none"), ("gated", 256, "head")]
    assert curves["baseline", 0, "none"] == [pytest.approx((1e-3, 5.1, 5.0, 5.2)), pytest.approx((2e-3, 4.9, 4.9, 4.9))]
    assert curves["gated", 256, "head"] == [pytest.approx((1e-3, 4.7, 4.6, 4.8)), pytest.approx((2e-3, 4.8, 4.7, 4.9))]


def test_plot_lr_figure_only_for_runs_of_one_budget(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    study_dir = learning_rate_study(tmp_path / "study")
    plot.main([study_dir, "--out", str(tmp_path / "figures")])
    assert "lr.png" in os.listdir(tmp_path / "figures")
    with pytest.raises(SystemExit, match="already holds loss.png, lr.png; delete them or choose another --out"):
        plot.main([study_dir, "--out", str(tmp_path / "figures")])
    write_finished_run(tmp_path / "longer", "gated", 1e-3, 0, 4.5, window=256, gate="head", tokens=2_000_000)
    plot.main([study_dir, str(tmp_path / "longer"), "--out", str(tmp_path / "mixed")])
    assert "lr.png" not in os.listdir(tmp_path / "mixed")
    assert ("lr.png not drawn: the gated runs differ in tokens (1,000,000, 2,000,000); pass the runs of one training "
            "budget and model size") in capsys.readouterr().err


def test_plot_length_curves_per_row_and_the_runs_behind_each_point(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    study_dir = tmp_path / "study"
    for seed, losses in enumerate([(5.0, 5.4, 6.0), (5.2, 5.6, 6.4)]):
        write_finished_run(study_dir, "baseline", 1e-3, seed, losses[0],
                           val_loss_by_seq_len=dict(zip(("1024", "2048", "4096"), losses)))
    for seed, losses in enumerate([(4.8, 4.8, 4.9), (4.6, 4.7, 4.7), (4.7, 4.6)]):  # seed 2 stopped short of 8192
        write_finished_run(study_dir, "gated", 1e-3, seed, losses[0], window=256, gate="head",
                           val_loss_by_seq_len=dict(zip(("1024", "2048", "8192"), losses)))
    write_finished_run(study_dir, "window", 1e-3, 0, 4.9, window=256)  # evaluated at its training length only
    curves = plot.length_curves(finished(str(study_dir)))
    assert list(curves) == [("baseline", 0, "none", 1e-3), ("gated", 256, "head", 1e-3)]
    assert curves["baseline", 0, "none", 1e-3] == [pytest.approx((1024, 5.1, 5.0, 5.2, 2)),
                                                  pytest.approx((2048, 5.5, 5.4, 5.6, 2)),
                                                  pytest.approx((4096, 6.2, 6.0, 6.4, 2))]
    assert curves["gated", 256, "head", 1e-3] == [pytest.approx((1024, 4.7, 4.6, 4.8, 3)),
                                                 pytest.approx((2048, 4.7, 4.6, 4.8, 3)),
                                                 pytest.approx((8192, 4.8, 4.7, 4.9, 2))]
    plot.main([str(study_dir), "--out", str(tmp_path / "figures")])
    assert "lengths.png" in os.listdir(tmp_path / "figures") and "lr.png" not in os.listdir(tmp_path / "figures")
    assert ("lengths.png: gated (window 256, gate head) lr 0.001 has runs at some lengths only (3 at 1024, 3 at 2048, "
            "2 at 8192)") in capsys.readouterr().err


def tokens_study(study_dir):
    """At 1M tokens gated's best rate is 1e-3 and baseline's 2e-3, seeds 0-2; at 2M tokens they share seed 0 only;
    at 4M tokens gated alone."""
    gated, baseline = {"window": 256, "gate": "head", "params": 1_100}, {"params": 1_000}
    for tokens, name, lr, losses, arm in [(1_000_000, "gated", 1e-3, [4.8, 4.6, 4.7], gated),
                                          (1_000_000, "gated", 2e-3, [4.9, 4.9, 4.9], gated),
                                          (1_000_000, "baseline", 1e-3, [5.2, 5.3, 5.1], baseline),
                                          (1_000_000, "baseline", 2e-3, [5.0, 5.0, 5.0], baseline),
                                          (2_000_000, "gated", 1e-3, [4.5, 4.4], gated),
                                          (2_000_000, "baseline", 2e-3, [4.8, None, 4.9], baseline),
                                          (4_000_000, "gated", 1e-3, [4.3], gated)]:
        for seed, loss in enumerate(losses):
            if loss is not None:
                write_finished_run(os.path.join(study_dir, f"{tokens}"), name, lr, seed, loss, tokens=tokens, **arm)
    return str(study_dir)


def test_plot_gap_against_tokens_pairs_seeds_of_each_arms_best_rate(tmp_path):
    summaries = finished(tokens_study(tmp_path))
    pair = plot.parse_gap("gated:baseline", summaries)
    assert pair == [("gated", None), ("baseline", None)]
    points, left_out = plot.gap_points(summaries, pair, "tokens")
    # 1M tokens: gated at 1e-3 minus baseline at 2e-3 by seed: -0.2, -0.4, -0.3; mean -0.3, sample std 0.1, so the
    # interval is -0.3 +- t(0.975, 2) 4.303 x 0.1 / sqrt(3) = -0.3 +- 0.2484; 2M tokens: seed 0 only, no interval
    assert [tuple(p[:5]) for p in points] == [pytest.approx((1_000_000, -0.3, -0.5484, -0.0516, 3), abs=1e-4),
                                              pytest.approx((2_000_000, -0.3, None, None, 1))]
    assert [(p.rates, p.choices) for p in points] == [((1e-3, 2e-3), (2, 2)), ((1e-3, 2e-3), (1, 1))]
    assert left_out == ["at 4,000,000 tokens: no baseline runs"]
    fixed = plot.parse_gap("gated@0.002:baseline@0.002", summaries)  # one rate each: 1M tokens only
    points, left_out = plot.gap_points(summaries, fixed, "tokens")
    assert [tuple(p[:5]) for p in points] == [pytest.approx((1_000_000, -0.1, -0.1, -0.1, 3))]
    assert left_out == ["at 2,000,000 tokens: no gated@0.002 runs",
                        "at 4,000,000 tokens: no gated@0.002 or baseline@0.002 runs"]


def test_plot_gap_against_params_pairs_runs_of_one_shape(tmp_path):
    """Two model sizes (n_layer 2 and 4); the gate adds parameters, so the arms of one size differ in params."""
    for n_layer, params, gated_losses, baseline_losses in [(2, 1_000, [4.8, 4.7], [5.0, 5.1]),
                                                           (4, 2_000, [4.5, 4.4], [4.6, 4.6])]:
        size = {"n_layer": n_layer, "tokens": 1_000_000}
        for seed in (0, 1):
            write_finished_run(tmp_path / f"{n_layer}", "gated", 1e-3, seed, gated_losses[seed], window=256,
                               gate="head", params=params + 50, **size)
            write_finished_run(tmp_path / f"{n_layer}", "baseline", 1e-3, seed, baseline_losses[seed], params=params,
                               **size)
    summaries = finished(str(tmp_path))
    points, left_out = plot.gap_points(summaries, plot.parse_gap("gated:baseline", summaries), "params")
    # at baseline's parameter counts; differences -0.2, -0.4 (mean -0.3, sample std 0.1414) and -0.1, -0.2 (mean
    # -0.15, std 0.0707), each +- t(0.975, 1) 12.706 x std / sqrt(2)
    assert [tuple(p[:5]) for p in points] == [pytest.approx((1_000, -0.3, -1.5706, 0.9706, 2), abs=1e-4),
                                              pytest.approx((2_000, -0.15, -0.7853, 0.4853, 2), abs=1e-4)]
    assert left_out == []
    points, _ = plot.gap_points(summaries, plot.parse_gap("baseline:gated", summaries), "params")
    assert [(p.x, round(p.mean, 4)) for p in points] == [(1_050, 0.3), (2_050, 0.15)]  # at gated's counts now


def test_plot_gap_figure_and_its_lines(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot.main([tokens_study(tmp_path / "study"), "--out", str(tmp_path / "figures"), "--gap", "gated:baseline",
               "--gap-x", "tokens"])
    assert sorted(os.listdir(tmp_path / "figures")) == ["gap.png", "loss.png"]
    printed = capsys.readouterr()
    assert "gap.png at 1,000,000 tokens: gated at lr 0.001 (best of 2), baseline at lr 0.002 (best of 2)" in printed.out
    assert "gap.png has no point at 4,000,000 tokens: no baseline runs" in printed.err
    assert "lr.png not drawn: the baseline runs differ in tokens (1,000,000, 2,000,000)" in printed.err


@pytest.mark.parametrize("gap, message", [
    ("gatd:baseline", "--gap gatd:baseline: no row 'gatd'; the rows are baseline, gated (NAME, or NAME@LR for one "
                      "learning rate)"),
    ("gated", "--gap gated: expected A:B, e.g. gated:baseline"),
    ("gated@fast:baseline", "--gap gated@fast:baseline: 'fast' is not a learning rate; write NAME@LR, e.g. "
                            "gated@0.001"),
    ("gated@0.005:baseline", "--gap gated@0.005:baseline: gated has no runs at lr 0.005; its rates are 0.001, 0.002"),
])
def test_plot_gap_errors_name_the_row_and_the_rows_there_are(tmp_path, gap, message):
    study_dir = tokens_study(tmp_path / "study")
    with pytest.raises(SystemExit) as error:
        plot.main([study_dir, "--out", str(tmp_path / "figures"), "--gap", gap, "--gap-x", "tokens"])
    assert str(error.value) == f"error: {message}"
    assert not (tmp_path / "figures").exists()


def test_plot_gap_x_errors(tmp_path, capsys):
    study_dir = tokens_study(tmp_path / "study")
    out = str(tmp_path / "figures")
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        plot.main([study_dir, "--out", out, "--gap", "gated:baseline", "--gap-x", "steps"])
    assert "argument --gap-x: invalid choice: 'steps'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^error: --gap and --gap-x go together: --gap A:B --gap-x tokens"):
        plot.main([study_dir, "--out", out, "--gap", "gated:baseline"])
    write_finished_run(tmp_path / "bigger", "gated", 1e-3, 0, 4.0, window=256, gate="head", n_layer=4,
                       tokens=1_000_000, params=2_200)
    with pytest.raises(SystemExit, match=r"^error: --gap-x tokens: at 1,000,000 tokens, the gated runs differ in "
                                         r"params \(1,100, 2,200\); pass runs that differ only in tokens$"):
        plot.main([study_dir, str(tmp_path / "bigger"), "--out", out, "--gap", "gated:baseline", "--gap-x", "tokens"])
    assert not (tmp_path / "figures").exists()


def test_plot_writes_figures_and_gate_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image
    base = write_metrics_run(tmp_path, "baseline", 0, "none")
    gated = write_metrics_run(tmp_path, "gated", 64, "head")
    out = tmp_path / "figures"
    plot.main([base, gated, "--out", str(out)])
    assert sorted(os.listdir(out)) == ["gates_gated.png", "loss.png", "sinks.png"]
    for name in os.listdir(out):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 400, name
        assert image[..., :3].std() > 0.05, name  # not a blank canvas
    # the last evaluation (step 60) of layer 0: means (h + 1) / 12 for h = 0..3, 25% below 0.1 on head 0 only
    assert "| 0 | 0.208 | 0.083–0.333 | 0.100 | 6.2% | 0.0% |" in capsys.readouterr().out


def test_plot_errors_before_importing_matplotlib(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="empty: no metrics.jsonl; is it a run directory"):
        plot.main([str(empty), "--out", str(tmp_path / "figures")])
    run_dir = write_metrics_run(tmp_path, "baseline", 0, "none")
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write("{not json\n")
    with pytest.raises(SystemExit, match="metrics.jsonl, line 68: not valid JSON"):
        plot.main([run_dir, "--out", str(tmp_path / "figures")])


def test_plot_never_overwrites(tmp_path):
    run_dir = write_metrics_run(tmp_path, "baseline", 0, "none")
    out = tmp_path / "figures"
    out.mkdir()
    (out / "sinks.png").write_bytes(b"mine")
    with pytest.raises(SystemExit, match="already holds sinks.png; delete them or choose another --out"):
        plot.main([run_dir, "--out", str(out)])
    assert (out / "sinks.png").read_bytes() == b"mine" and not (out / "loss.png").exists()


# torchrun's own output after its one worker failed (torch 2.13, --nproc_per_node=1; paths shortened)
TORCHRUN_TAIL = """\
E1203 09:15:12.579000 5101 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) \
local_rank: 0 (pid: 5147) of binary: /usr/bin/python3
Traceback (most recent call last):
  File "/usr/bin/torchrun", line 8, in <module>
    sys.exit(main())
             ^^^^^^
  File "site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
train_gpt.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-03_09:15:12
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 5147)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================"""

# study.py's queue, with a fake trainer: a script that makes its run directory as train_gpt.py does (<run name>-...
# under --log-dir) with a config.json of the flags it was given (the fields it lacks count as train_gpt.py's
# defaults), sleeps, records when and where it ran in records.jsonl, then fails (with torchrun's output after its
# error), writes a checkpoint, or writes a summary.json, as plan.json says.
FAKE_TRAINER = f"TORCHRUN_TAIL = {TORCHRUN_TAIL!r}\n" + """
import json, os, signal, sys, tempfile, time

here = os.path.dirname(os.path.abspath(__file__))
flags = dict(zip(sys.argv[1::2], sys.argv[2::2]))  # every flag here comes with a value
name = f"{flags['--run-name']}-seed{flags['--seed']}"
plan = json.load(open(os.path.join(here, "plan.json")))[name]
record = {"name": name, "slot": os.environ["CUDA_VISIBLE_DEVICES"], "start": time.time(), "sigterm": False,
          "resume": flags.get("--resume", "")}
run_dir = tempfile.mkdtemp(prefix=flags["--run-name"] + "-", dir=flags["--log-dir"])


def value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


json.dump({key[2:].replace("-", "_"): value(text) for key, text in flags.items()},
          open(os.path.join(run_dir, "config.json"), "w"))


def finish(**changes):
    record.update(end=time.time(), **changes)
    with open(os.path.join(here, "records.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\\n")


def checkpoint():
    path = os.path.join(run_dir, "ckpt_step000001.pt")
    open(path, "w").close()
    return path


def stop(signum, frame):
    finish(sigterm=True)
    print("stopped by SIGTERM after step 1; resume with:")
    print("python train_gpt.py --resume " + checkpoint())
    sys.exit(143)


signal.signal(signal.SIGTERM, stop)
print("step:1/2 loss:10.0", flush=True)
time.sleep(plan["seconds"])
finish()
if plan.get("checkpoint"):
    checkpoint()
if plan.get("error"):
    print("error: " + plan["error"], flush=True)
    print(TORCHRUN_TAIL, flush=True)
    sys.exit(1)
json.dump({"val_loss": plan["val_loss"], "train_time_s": 1.0, "tokens_per_s": 1000.0, "run_name": flags["--run-name"],
           "window": int(flags["--window"]), "gate": flags["--gate"], "seed": int(flags["--seed"]),
           "lr": float(flags.get("--lr", "1e-3"))}, open(os.path.join(run_dir, "summary.json"), "w"))
"""


def fake_study(tmp_path, plan):
    """The fake trainer's command, and the flags for a study of it in a new directory under tmp_path; plan: run name
    -> seconds, error, checkpoint (after the run, before its error), val_loss."""
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    write_plan(tmp_path, plan)
    return [sys.executable, str(tmp_path / "fake_trainer.py")], ["--train-files", "none", "--log-dir", str(tmp_path)]


def write_plan(tmp_path, plan):
    write_json(tmp_path / "plan.json", {name: {"val_loss": 5.0, **p} for name, p in plan.items()})


def fake_records(tmp_path):
    """What each start of the fake trainer recorded, in the order they ended."""
    records = tmp_path / "records.jsonl"
    return [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []


def test_study_queue_starts_a_run_on_the_first_slot_to_free(tmp_path, monkeypatch, capsys):
    """One long run and three short ones on slots a and b: b trains the three short ones while a trains the long one,
    each starting as soon as the one before it ends, and no slot ever holds two runs."""
    trainer, flags = fake_study(tmp_path, {"baseline-seed0": {"seconds": 2.5}, "baseline-seed1": {"seconds": 0.2},
                                           "baseline-seed2": {"seconds": 0.2}, "baseline-seed3": {"seconds": 0.2}})
    monkeypatch.setenv("NGPU", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "a,b")
    assert driver.main(["compare", "--arms", "baseline", "--seeds", "0,1,2,3", *flags], trainer=trainer) == 0
    (out,) = tmp_path.glob("compare-*")
    records = {r["name"]: r for r in fake_records(tmp_path)}
    assert sorted(records) == [f"baseline-seed{s}" for s in range(4)]
    assert {name: r["slot"] for name, r in records.items()} == {"baseline-seed0": "a", "baseline-seed1": "b",
                                                                "baseline-seed2": "b", "baseline-seed3": "b"}
    on_b = sorted((r["start"], r["end"]) for r in records.values() if r["slot"] == "b")
    for (_, end), (start, _) in zip(on_b, on_b[1:]):
        assert end < start < end + 1.0  # one at a time, and the next soon after (the poll, a Python start-up)
    assert on_b[-1][1] < records["baseline-seed0"]["end"]
    assert "| baseline | full | none | 0.001 | 0,1,2,3 | 4 |" in (out / "table.md").read_text()
    output = out / "baseline-lr0.001-seed3" / "train.out"
    assert f"run 4/4: baseline, seed 3, CUDA_VISIBLE_DEVICES=b; output in {output}\n" in capsys.readouterr().out
    assert output.read_text().splitlines()[1:] == ["step:1/2 loss:10.0"]  # after the line giving its command


def test_study_reports_a_failed_run_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    """The report of the failed run is its worker's error, not torchrun's ChildFailedError after it."""
    error = "bad configuration:\n  --steps 0: must be positive\n  --lr -1.0: must be 0 or more"
    trainer, flags = fake_study(tmp_path, {"baseline-seed0": {"seconds": 0}, "gated-seed0": {"seconds": 0},
                                           "baseline-seed1": {"seconds": 0, "error": error},
                                           "gated-seed1": {"seconds": 0}})
    monkeypatch.setenv("NGPU", "1")
    assert driver.main(["compare", "--seeds", "0,1", *flags], trainer=trainer) == 1
    (out,) = tmp_path.glob("compare-*")
    assert len(fake_records(tmp_path)) == 4  # gated, seed 1 ran after baseline, seed 1 failed on the only slot
    stderr = capsys.readouterr().err
    output = out / "baseline-lr0.001-seed1" / "train.out"
    assert f"run baseline, seed 1 failed; from {output}:\nerror: {error}\ncompare: of 4 runs, 0 were done already, 3 " \
           f"finished, 1 failed, 0 stopped and 0 skipped (above)" in stderr
    assert "ChildFailedError" in output.read_text() and "ChildFailedError" not in stderr
    assert stderr.endswith(f"{os.path.relpath(driver.__file__)} compare --arms baseline,gated --seeds 0,1 --out {out} "
                           f"--train-files none\n")
    table = (out / "table.md").read_text()
    assert "| baseline | full | none | 0.001 | 0 | 1 |" in table and "| gated | 256 | head | 0.001 | 0,1 | 2 |" in table


def test_study_sigterm_stops_the_running_runs_and_the_same_command_picks_them_up(tmp_path, monkeypatch, capsys):
    trainer, flags = fake_study(tmp_path, {f"baseline-seed{s}": {"seconds": 60} for s in range(5)})
    env = {**os.environ, "NGPU": "2", "CUDA_VISIBLE_DEVICES": "0,1"}
    args = ["compare", "--arms", "baseline", "--seeds", "0,1,2,3,4", "--lrs", "1e-3", *flags]
    proc = subprocess.Popen([sys.executable, "-c", "import sys, study; sys.exit(study.main(sys.argv[2:], "
                             "trainer=sys.argv[1].split('|')))", "|".join(trainer), *args], cwd=HERE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while len(list(tmp_path.glob("compare-*/*/train.out"))) < 2 or any(
                "step:1/2" not in f.read_text() for f in tmp_path.glob("compare-*/*/train.out")):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert [line for line in stderr.splitlines() if line.startswith("skipped: ")] == \
        [f"skipped: baseline, seed {s}, lr 0.001" for s in (2, 3, 4)]
    (out,) = tmp_path.glob("compare-*")
    records = fake_records(tmp_path)
    assert sorted(r["name"] for r in records) == ["baseline-seed0", "baseline-seed1"]
    assert all(r["sigterm"] for r in records)
    output = out / "baseline-lr0.001-seed0" / "train.out"
    checkpoints = [next((out / f"baseline-lr0.001-seed{s}").glob("baseline-*/ckpt_step000001.pt")) for s in (0, 1)]
    assert f"run baseline, seed 0, lr 0.001 stopped; from {output}:\nstopped by SIGTERM after step 1; resume " \
           f"with:\npython train_gpt.py --resume {checkpoints[0]}\n" in stderr
    assert "of 5 runs, 0 were done already, 0 finished, 0 failed, 2 stopped and 3 skipped" in stderr
    assert not (out / "table.md").exists()

    pickup = shlex.split(stderr.splitlines()[-1])
    assert pickup[:2] == ["python3", os.path.relpath(driver.__file__)] and pickup[pickup.index("--out") + 1] == str(out)
    write_plan(tmp_path, {f"baseline-seed{s}": {"seconds": 0} for s in range(5)})
    monkeypatch.setenv("NGPU", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert driver.main(pickup[2:], trainer=trainer) == 0
    assert {r["name"]: r["resume"] for r in fake_records(tmp_path)[2:]} == {
        "baseline-seed0": str(checkpoints[0]), "baseline-seed1": str(checkpoints[1]), "baseline-seed2": "",
        "baseline-seed3": "", "baseline-seed4": ""}
    assert "| baseline | full | none | 0.001 | 0,1,2,3,4 | 5 |" in capsys.readouterr().out


def test_study_picks_up_where_it_stopped(tmp_path, monkeypatch, capsys):
    """First pass: baseline seed 1 fails after writing a checkpoint, gated seed 1 fails before one. The same command
    again trains only those two, baseline seed 1 from its checkpoint and gated seed 1 afresh beside its failed run,
    appending to their train.out; a third pass trains nothing."""
    plan = {"baseline-seed0": {"seconds": 0}, "gated-seed0": {"seconds": 0},
            "baseline-seed1": {"seconds": 0, "error": "out of memory", "checkpoint": True},
            "gated-seed1": {"seconds": 0, "error": "out of memory"}}
    trainer, _ = fake_study(tmp_path, plan)
    out = tmp_path / "study"
    command = ["compare", "--seeds", "0,1", "--out", str(out), "--train-files", "none"]
    monkeypatch.setenv("NGPU", "1")
    assert driver.main(command, trainer=trainer) == 1
    (checkpoint,) = (out / "baseline-lr0.001-seed1").glob("baseline-*/ckpt_step000001.pt")
    write_plan(tmp_path, {name: {"seconds": 0} for name in plan})
    capsys.readouterr()

    assert driver.main(command, trainer=trainer) == 0
    stdout = capsys.readouterr().out
    done = [next((out / f"{arm}-lr0.001-seed0").glob(f"{arm}-*")) for arm in ("baseline", "gated")]
    assert stdout.startswith(f"compare: 4 runs in {out}; done already, so not trained again:\n"
                             f"  baseline, seed 0: {done[0]}\n  gated, seed 0: {done[1]}\n"
                             f"run 1/2: baseline, seed 1, resuming {checkpoint}, CUDA_VISIBLE_DEVICES=0; ")
    assert [(r["name"], r["resume"]) for r in fake_records(tmp_path)[4:]] == [("baseline-seed1", str(checkpoint)),
                                                                               ("gated-seed1", "")]
    assert len(list((out / "gated-lr0.001-seed1").glob("gated-*"))) == 2  # the failed run stays, untouched
    lines = (out / "baseline-lr0.001-seed1" / "train.out").read_text().splitlines()
    assert sum(line.startswith("study.py ") for line in lines) == 2  # a line giving the command, for each attempt
    assert "error: out of memory" in lines and lines[-1] == "step:1/2 loss:10.0"
    assert "| baseline | full | none | 0.001 | 0,1 | 2 |" in (out / "table.md").read_text()
    assert f"{out / 'table.md'}: replaced by the table above" in stdout

    assert driver.main(command, trainer=trainer) == 0
    assert len(fake_records(tmp_path)) == 6


def test_study_refuses_a_finished_run_of_other_flags_before_starting_any(tmp_path, monkeypatch, capsys):
    """Flags that change no result (NOT_RESULTS) leave finished runs done; any other refuses the study."""
    trainer, _ = fake_study(tmp_path, {"baseline-seed0": {"seconds": 0}, "gated-seed0": {"seconds": 0}})
    out = tmp_path / "study"
    command = ["compare", "--seeds", "0", "--out", str(out), "--train-files", "none"]
    monkeypatch.setenv("NGPU", "1")
    assert driver.main(command, trainer=trainer) == 0
    assert driver.main([*command, "--val-every", "50", "--save-every", "100", "--keep-checkpoints", "0",
                        "--dist-timeout", "60"], trainer=trainer) == 0
    assert len(fake_records(tmp_path)) == 2
    outputs = {path: path.read_text() for path in out.glob("*/train.out")}
    capsys.readouterr()
    assert driver.main([*command, "--steps", "4800", "--seq-len", "512"], trainer=trainer) == 2
    stderr = capsys.readouterr().err.splitlines()
    runs = [next((out / f"{arm}-lr0.001-seed0").glob(f"{arm}-*")) for arm in ("baseline", "gated")]
    assert stderr == [f"error: {run} is a finished run with other flags (its -> this study's): --seq-len 1024 -> 512, "
                      f"--steps 5000 -> 4800; the study's {arm}, seed 0 would train beside it: pass the flags it ran "
                      f"with, move it out, or choose another --out" for run, arm in zip(runs, ("baseline", "gated"))]
    assert len(fake_records(tmp_path)) == 2 and {p: p.read_text() for p in out.glob("*/train.out")} == outputs
    os.remove(runs[0] / "config.json")
    assert driver.main(command, trainer=trainer) == 2
    assert capsys.readouterr().err.startswith(f"error: {runs[0]} is a finished run with no readable config.json; ")


def test_study_starts_afresh_beside_an_unfinished_run_of_other_flags(tmp_path, monkeypatch):
    trainer, _ = fake_study(tmp_path, {"baseline-seed0": {"seconds": 0, "error": "killed", "checkpoint": True}})
    out = tmp_path / "study"
    command = ["compare", "--arms", "baseline", "--seeds", "0", "--out", str(out), "--train-files", "none"]
    monkeypatch.setenv("NGPU", "1")
    assert driver.main(command, trainer=trainer) == 1
    write_plan(tmp_path, {"baseline-seed0": {"seconds": 0}})
    assert driver.main([*command, "--steps", "4800"], trainer=trainer) == 0
    assert [r["resume"] for r in fake_records(tmp_path)] == ["", ""]
    unfinished, finished = sorted((out / "baseline-lr0.001-seed0").glob("baseline-*"),
                                  key=lambda d: (d / "summary.json").exists())
    assert (unfinished / "ckpt_step000001.pt").exists() and (finished / "summary.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--seeds", "a"], "--seeds: 'a' is not a seed; use whole numbers 0 or more, e.g. --seeds 0,1,2"),
    (["--seeds", "-1"], "--seeds: '-1' is not a seed"),
    (["--seeds", ","], "--seeds ',': the list is empty; give one or more, comma-separated"),
    (["--seeds", "0,00"], "--seeds 0,00: lists 0 twice; give each once"),
    (["--lrs", "x"], "--lrs: 'x' is not a learning rate; use positive numbers, e.g. --lrs 1e-3,2e-3"),
    (["--lrs", "0"], "--lrs: '0' is not a learning rate"),
    (["--lrs", "1e-3,inf"], "--lrs: 'inf' is not a learning rate"),
    (["--lrs", "nan"], "--lrs: 'nan' is not a learning rate"),
    (["--lrs", "1e-3,0.001"], "--lrs 1e-3,0.001: lists 0.001 twice"),
    (["--arms", ""], "--arms '': the list is empty"),
    (["--arms", "gated,nope"], "unknown arm 'nope': use baseline, gated, window"),
    (["--resume", "logs/x"], "compare sets --resume itself for each run"),
    (["--lr", "1e-3", "--lrs", "2e-3"], "--lr and --lrs both set the learning rate: give one"),
    (["--out", "elsewhere"], "--out DIR is the study's folder and --log-dir DIR the parent of a new one: give one"),
    (["--steps", "0", "--lr", "-1"], "run baseline, seed 0: bad configuration: --steps 0: must be positive; --lr -1.0: "
                                     "must be 0 or more"),
    (["--steps", "x"], "run baseline, seed 0: train_gpt.py refuses the flags: argument --steps: invalid int value: "
                       "'x'"),
    (["--nope", "1"], "run baseline, seed 0: train_gpt.py refuses the flags: unrecognized arguments: --nope 1"),
    (["--arms", "gated,mix", "--seq-len", "128"], "run gated, seed 0: bad configuration: --window 256: a window of "
                                                  "--seq-len 128 tokens or more is full causal attention"),
])
def test_study_refuses_bad_arguments_before_any_run(tmp_path, monkeypatch, capsys, args, message):
    trainer, flags = fake_study(tmp_path, {})
    monkeypatch.setenv("NGPU", "1")
    assert driver.main(["compare", *args, *flags], trainer=trainer) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: {message}") and stderr.count("\n") == 1, stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fake_trainer.py", "plan.json"]


def test_study_help_is_its_docstring(capsys):
    assert driver.main(["compare", "--help"]) == 0
    assert capsys.readouterr().out == driver.__doc__ + "\n"


def test_study_error_lines_are_the_workers_last_error_not_torchruns():
    """A failed run's error lines, from torchrun's output as it is after a worker's error; a stopped run's are
    train_gpt.py's notice and its resume command."""
    tail = TORCHRUN_TAIL.splitlines()
    bad_flags = ["step:1/2", "error: bad configuration:", "  --steps 0: must be positive",
                 "  --lr -1.0: must be 0 or more", *tail]
    assert driver.run_error(bad_flags) == bad_flags[1:4]
    raised = ["[rank0]: Traceback (most recent call last):", '[rank0]:   File "train_gpt.py", line 9, in <module>',
              "[rank0]:     raise ValueError('early')", "[rank0]: torch.OutOfMemoryError: CUDA out of memory.",
              "[rank0]: Tried to allocate 2.00 GiB", *tail]
    assert driver.run_error(raised) == raised[3:5]
    chained = ["Traceback (most recent call last):", "ValueError: first", "",
               "During handling of the above exception, another exception occurred:", "",
               "Traceback (most recent call last):", "KeyError: 'lr'"]
    assert driver.run_error(chained) == ["KeyError: 'lr'"]
    killed = ["step:4/9", *TORCHRUN_TAIL.replace("exitcode  : 1", "exitcode  : -9").splitlines()]
    assert driver.run_error(killed) == killed[-5:] and "exitcode  : -9 (pid: 5147)" in killed[-4]
    assert driver.run_error([str(i) for i in range(8)]) == ["3", "4", "5", "6", "7"]
    stopped = ["step:4/9", "stopped by SIGTERM after step 4; resume with:", "python train_gpt.py --resume c.pt",
               "Traceback (most recent call last):", "SignalException: got signal: 15"]
    assert driver.run_error(stopped, "stopped") == stopped[1:3]
    assert driver.run_error(stopped, "failed") == stopped[4:]


@pytest.mark.parametrize("environ, gpus, slots", [
    ({"NGPU": "2"}, 2, ["0", "1"]),
    ({}, 3, ["0", "1", "2"]),  # every GPU
    ({"NGPU": "1"}, 0, ["0"]),  # one run on a machine without GPU: the CPU
    ({}, 0, ["0"]),
    ({"NGPU": "2", "CUDA_VISIBLE_DEVICES": "3,3,5"}, 1, ["3", "3"]),  # two runs on GPU 3
    ({"NGPU": "3", "CUDA_VISIBLE_DEVICES": ""}, 0, ["", "", ""]),  # three runs on the CPU
])
def test_study_slots(environ, gpus, slots):
    assert driver.parse_slots(environ, gpus) == slots


@pytest.mark.parametrize("environ, gpus, message", [
    ({"NGPU": "4"}, 1, "NGPU=4 runs at once, but torch.cuda.device_count() finds 1 GPU(s); set NGPU=1 or less, or "
                       "list GPUs in CUDA_VISIBLE_DEVICES (one listed twice trains two runs on it)"),
    ({"NGPU": "2"}, 0, "NGPU=2, but torch finds no GPU here; to train 2 runs at once on the CPU, set "
                       "CUDA_VISIBLE_DEVICES= (empty)"),
    ({"NGPU": "3", "CUDA_VISIBLE_DEVICES": "0,1"}, 8, "NGPU=3 runs at once, but CUDA_VISIBLE_DEVICES lists 2 GPU(s)"),
    ({"NGPU": "0"}, 1, "NGPU=0: expected how many runs go at once, 1 or more"),
])
def test_study_refuses_slots_of_gpus_that_do_not_exist(environ, gpus, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        driver.parse_slots(environ, gpus)


def test_study_plans_runs_by_lr_then_seed_then_arm(tmp_path):
    study = driver.parse_args(["compare", "--seeds", "0,1", "--lrs=1e-3,2e-3", "--out", str(tmp_path), "--steps",
                               "4800"])
    runs = driver.plan_runs(study)
    assert [str(r) for r in runs[:3]] == ["baseline, seed 0, lr 0.001", "gated, seed 0, lr 0.001",
                                          "baseline, seed 1, lr 0.001"]
    assert len(runs) == 8 and str(runs[4]) == "baseline, seed 0, lr 0.002"
    assert runs[4].output == os.path.join(str(tmp_path), "baseline-lr0.002-seed0", "train.out")
    assert runs[4].flags() == ["--window", "0", "--gate", "none", "--run-name", "baseline", "--seed", "0", "--lr",
                               "0.002"]
    assert (runs[4].config.lr, runs[4].config.steps, runs[5].config.window) == (0.002, 4800, 256)
    (run, _) = driver.plan_runs(driver.parse_args(["compare", "--seeds", "1", "--out", "o", "--lr", "3e-3"]))
    assert str(run) == "baseline, seed 1" and run.folder == os.path.join("o", "baseline-lr0.003-seed1")


# Constructs that bash 3.2 (macOS's /bin/bash) lacks: a run.sh using one fails there at the line that uses it.
BASH4_ONLY = {
    r"\b(declare|local|typeset)\s+-[a-zA-Z]*[An]": "associative arrays or namerefs (declare -A, declare -n)",
    r"\b(mapfile|readarray|coproc)\b": "mapfile, readarray or coproc",
    r"\$\{[^}]*(\^|,)\}|\$\{[^}]*(\^\^|,,)": "case modification (${x,,}, ${x^^})",
    r"\$\{[^}]*@[QEPAaUuLK]\}": "${x@Q} transformations",
    r"&>>|\|&": "&>> or |&",
    r";;&|;&": "case fall-through (;& and ;;&)",
    r"\[-[0-9]+\]": "negative array indices",
    r"\bwait\s+-n\b|\bdeclare\s+-g\b|\{[a-zA-Z_]+\}[<>]": "wait -n, declare -g or {fd}> redirections",
    r"\bshopt\s+-s\s+(globstar|lastpipe)\b|\$EPOCH(SECONDS|REALTIME)": "globstar, lastpipe or $EPOCHSECONDS",
}


def test_run_sh_uses_no_bash_4_constructs():
    """A grep, since no bash 3.2 is at hand; comments are left out, as they may name the constructs."""
    with open(os.path.join(HERE, "run.sh")) as f:
        code = [(n, re.sub(r"(^|\s)#.*", "", line)) for n, line in enumerate(f, 1)]
    found = [f"run.sh:{n}: {what}: {line.strip()}" for n, line in code for pattern, what in BASH4_ONLY.items()
             if re.search(pattern, line)]
    assert not found, "\n".join(found)
