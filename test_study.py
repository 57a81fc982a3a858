"""compare.py's table and plot.py's figures, on run directories written here by hand (no training).

    python -m pytest -q test_study.py
"""
import json
import os
import subprocess
import sys

import pytest

import compare
import plot

HERE = os.path.dirname(os.path.abspath(__file__))


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def write_summary(parent, dir_name, run_name, val_loss, seed, window=0, gate="none", lr=1e-3, train_time_s=100.0,
                  tokens_per_s=1000.0, tokens=1_000_000, params=1_000):
    run_dir = os.path.join(parent, dir_name)
    os.makedirs(run_dir)
    write_json(os.path.join(run_dir, "summary.json"),
               {"val_loss": val_loss, "train_time_s": train_time_s, "tokens": tokens, "tokens_per_s": tokens_per_s,
                "mfu": None, "peak_mem_gb": None, "params": params, "window": window, "gate": gate,
                "run_name": run_name, "seed": seed, "lr": lr, "device": "cpu", "world_size": 1})
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
