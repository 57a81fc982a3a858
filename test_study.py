"""study.py's queue of runs, compare.py's table and plot.py's figures, on fake runs and on run directories written
here by hand (no training); and that run.sh keeps to bash 3.2.

    python -m pytest -q test_study.py
"""
import json
import os
import re
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
                  **provenance(commit="9f8e7d6c5b4a", dirty=True, train="0" * 64))
    text = compare.table(compare.load_runs([str(tmp_path)]))
    assert ("Caution: these runs were not trained from the same code and data; commit: 1a2b3c4 (baseline seeds 0,1; "
            "gated seed 0), 9f8e7d6 (gated seed 1); uncommitted changes: no (baseline seeds 0,1; gated seed 0), "
            "yes (gated seed 1); train data: tttttttttttt (baseline seeds 0,1; gated seed 0), 000000000000 (gated "
            "seed 1).") in text
    assert "unknown" not in text
    write_summary(tmp_path, "g2", "gated", 5.0, 2, window=256, gate="head")
    text = compare.table(compare.load_runs([str(tmp_path)]))
    assert "Provenance unknown (no commit, code or data fingerprints in summary.json): gated seed 2." in text


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


# study.py's queue, with a fake trainer: a script that sleeps, records when and where it ran, and fails or writes a
# summary.json as a plan file says.
FAKE_TRAINER = """
import json, os, signal, sys, time

flags = dict(zip(sys.argv[1::2], sys.argv[2::2]))  # every flag here comes with a value
name = f"{flags['--run-name']}-seed{flags['--seed']}"
plan = json.load(open(flags["--plan"]))[name]
record = {"name": name, "slot": os.environ["CUDA_VISIBLE_DEVICES"], "start": time.time(), "sigterm": False}

def stop(signum, frame):
    record.update(sigterm=True, end=time.time())
    json.dump(record, open(os.path.join(flags["--log-dir"], name + ".json"), "w"))
    print("stopped by SIGTERM after step 1; resume with:")
    print("python train_gpt.py --resume ckpt.pt")
    sys.exit(143)

signal.signal(signal.SIGTERM, stop)
print("step:1/2 loss:10.0", flush=True)
time.sleep(plan["seconds"])
record["end"] = time.time()
json.dump(record, open(os.path.join(flags["--log-dir"], name + ".json"), "w"))
if plan.get("error"):
    print("Traceback (most recent call last):", flush=True)
    print("error: " + plan["error"], flush=True)
    sys.exit(1)
run_dir = os.path.join(flags["--log-dir"], name)
os.makedirs(run_dir)
json.dump({"val_loss": plan["val_loss"], "train_time_s": 1.0, "tokens_per_s": 1000.0, "run_name": flags["--run-name"],
           "window": int(flags["--window"]), "gate": flags["--gate"], "seed": int(flags["--seed"]),
           "lr": float(flags.get("--lr", "1e-3"))}, open(os.path.join(run_dir, "summary.json"), "w"))
"""


def fake_study(tmp_path, plan):
    """The fake trainer's command and the flags that point it at its plan: run name -> seconds, error, val_loss."""
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    write_json(tmp_path / "plan.json", {name: {"val_loss": 5.0, **p} for name, p in plan.items()})
    return [sys.executable, str(tmp_path / "fake_trainer.py")], ["--plan", str(tmp_path / "plan.json"),
                                                                 "--train-files", "none", "--log-dir", str(tmp_path)]


def fake_records(tmp_path):
    (out,) = tmp_path.glob("compare-*")
    return out, {r["name"]: r for r in (json.loads(f.read_text()) for f in out.glob("*.json"))}


def test_study_queue_starts_a_run_on_the_first_slot_to_free(tmp_path, monkeypatch, capsys):
    """One long run and three short ones on slots a and b: b trains the three short ones while a trains the long one,
    each starting as soon as the one before it ends, and no slot ever holds two runs."""
    trainer, flags = fake_study(tmp_path, {"baseline-seed0": {"seconds": 2.5}, "baseline-seed1": {"seconds": 0.2},
                                           "baseline-seed2": {"seconds": 0.2}, "baseline-seed3": {"seconds": 0.2}})
    monkeypatch.setenv("NGPU", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "a,b")
    assert driver.main(["compare", "--arms", "baseline", "--seeds", "0,1,2,3", *flags], trainer=trainer) == 0
    out, records = fake_records(tmp_path)
    assert sorted(records) == [f"baseline-seed{s}" for s in range(4)]
    assert {name: r["slot"] for name, r in records.items()} == {"baseline-seed0": "a", "baseline-seed1": "b",
                                                                "baseline-seed2": "b", "baseline-seed3": "b"}
    on_b = sorted((r["start"], r["end"]) for r in records.values() if r["slot"] == "b")
    for (_, end), (start, _) in zip(on_b, on_b[1:]):
        assert end < start < end + 1.0  # one at a time, and the next soon after (the poll, a Python start-up)
    assert on_b[-1][1] < records["baseline-seed0"]["end"]
    assert "| baseline | full | none | 0.001 | 0,1,2,3 | 4 |" in (out / "table.md").read_text()
    assert "run 4/4: baseline, seed 3, CUDA_VISIBLE_DEVICES=b; output in " in capsys.readouterr().out


def test_study_reports_a_failed_run_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    trainer, flags = fake_study(tmp_path, {"baseline-seed0": {"seconds": 0}, "gated-seed0": {"seconds": 0},
                                           "baseline-seed1": {"seconds": 0, "error": "--lr -1.0: must be 0 or more"},
                                           "gated-seed1": {"seconds": 0}})
    monkeypatch.setenv("NGPU", "1")
    assert driver.main(["compare", "--seeds", "0,1", *flags], trainer=trainer) == 1
    out, records = fake_records(tmp_path)
    assert len(records) == 4  # gated, seed 1 ran after baseline, seed 1 failed on the only slot
    stderr = capsys.readouterr().err
    assert f"run baseline, seed 1 failed; from {out / 'baseline-seed1.out'}:\nerror: --lr -1.0: must be 0 or more\n" \
        in stderr
    assert "compare: of 4 runs, 3 finished, 1 failed, 0 stopped and 0 skipped (above)" in stderr
    table = (out / "table.md").read_text()
    assert "| baseline | full | none | 0.001 | 0 | 1 |" in table and "| gated | 256 | head | 0.001 | 0,1 | 2 |" in table


def test_study_sigterm_stops_the_running_runs_and_skips_the_queued_ones(tmp_path):
    trainer, flags = fake_study(tmp_path, {f"baseline-seed{s}": {"seconds": 60} for s in range(5)})
    env = {**os.environ, "NGPU": "2", "CUDA_VISIBLE_DEVICES": "0,1"}
    proc = subprocess.Popen([sys.executable, "-c", "import sys, study; sys.exit(study.main(sys.argv[2:], "
                             "trainer=sys.argv[1].split('|')))", "|".join(trainer), "compare", "--arms", "baseline",
                             "--seeds", "0,1,2,3,4", "--lrs", "1e-3", *flags], cwd=HERE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while len(list(tmp_path.glob("compare-*/*.out"))) < 2 or any(
                "step:1/2" not in f.read_text() for f in tmp_path.glob("compare-*/*.out")):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert [line for line in stderr.splitlines() if line.startswith("skipped: ")] == \
        [f"skipped: baseline, seed {s}, lr 1e-3" for s in (2, 3, 4)]
    out, records = fake_records(tmp_path)
    assert sorted(records) == ["baseline-seed0", "baseline-seed1"]
    assert all(r["sigterm"] for r in records.values())
    assert f"run baseline, seed 0, lr 1e-3 stopped; from {out / 'baseline-seed0-lr1e-3.out'}:" in stderr
    assert "lr1e-3.out:\nstopped by SIGTERM after step 1; resume with:\npython train_gpt.py --resume ckpt.pt\n" \
        in stderr
    assert "of 5 runs, 0 finished, 0 failed, 2 stopped and 3 skipped" in stderr
    assert not (out / "table.md").exists()


def test_study_error_lines_are_the_first_error_and_three_after_else_the_last_five():
    """A failed run's error lines; a stopped run's are train_gpt.py's notice and its resume command."""
    lines = ["a", "b", "Traceback (most recent call last):", "ValueError: bad", "c", "d", "e", "f", "error: later"]
    assert driver.run_error(lines) == ["ValueError: bad", "c", "d", "e"]
    assert driver.run_error(["x", "error: --steps 0", "y"]) == ["error: --steps 0", "y"]
    assert driver.run_error([str(i) for i in range(8)]) == ["3", "4", "5", "6", "7"]
    stopped = ["step:4/9", "stopped by SIGTERM after step 4; resume with:", "python train_gpt.py --resume c.pt",
               "Traceback (most recent call last):", "SignalException: got signal: 15"]
    assert driver.run_error(stopped, "stopped") == stopped[1:3]
    assert driver.run_error(stopped, "failed") == stopped[4:]


@pytest.mark.parametrize("environ, slots", [
    ({"NGPU": "2"}, ["0", "1"]),
    ({"NGPU": "2", "CUDA_VISIBLE_DEVICES": "3,3,5"}, ["3", "3"]),  # two runs on GPU 3
    ({"NGPU": "3", "CUDA_VISIBLE_DEVICES": ""}, ["", "", ""]),  # three runs on the CPU
])
def test_study_slots(environ, slots):
    assert driver.parse_slots(environ) == slots


def test_study_plans_runs_by_lr_then_seed_then_arm():
    runs = driver.plan_runs(driver.parse_args(["compare", "--seeds", "0,1", "--lrs=1e-3,2e-3"]))
    assert [str(r) for r in runs[:3]] == ["baseline, seed 0, lr 1e-3", "gated, seed 0, lr 1e-3",
                                          "baseline, seed 1, lr 1e-3"]
    assert len(runs) == 8 and str(runs[4]) == "baseline, seed 0, lr 2e-3"
    assert runs[4].output("out") == os.path.join("out", "baseline-seed0-lr2e-3.out")
    assert runs[4].flags("out") == ["--window", "0", "--gate", "none", "--run-name", "baseline", "--seed", "0", "--lr",
                                    "2e-3", "--log-dir", "out"]


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
