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
