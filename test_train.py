"""Training, data loading, configuration and logging on the CPU, on the shipped Jane Austen sample.

    python -m pytest -q test_train.py
"""
import dataclasses
import glob
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import sample
import train_gpt as tg

CPU = torch.device("cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_TRAIN = os.path.join(HERE, "data/sample/austen_train_*.bin")
SAMPLE_VAL = os.path.join(HERE, "data/sample/austen_val_*.bin")
# run.sh's allocator settings (its demo's; conftest.py sets them in this process), for the subprocesses that
# train: on the CPU they about halve a tiny model's step time and change nothing else
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "2000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000",
              "MALLOC_TOP_PAD_": "1000000000"}


def subprocess_env(**extra):
    """The environment of a subprocess that trains: this one's as it is now (monkeypatch included), one thread,
    MALLOC_ENV, and `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **MALLOC_ENV, **extra}
TINY = ["--n-layer", "2", "--d-model", "64", "--n-head", "4", "--n-kv-head", "2", "--head-dim", "16",
        "--mlp-hidden", "128", "--seq-len", "128", "--micro-batch-tokens", "1024", "--compile", "false"]


def tiny_run(tmp_path, *extra):
    return ["--train-files", SAMPLE_TRAIN, "--val-files", SAMPLE_VAL, "--log-dir", str(tmp_path), *TINY,
            "--batch-tokens", "2048", "--val-tokens", "8192", "--warmup-steps", "2", "--cooldown-steps", "4",
            "--lr", "3e-3", *extra]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def only_run_dir(parent):
    (name,) = os.listdir(parent)
    return os.path.join(parent, name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the fused loss's wrapper loads the compiler at import")
def test_importing_train_gpt_leaves_the_compiler_unloaded():
    """A CPU run never compiles, so importing train_gpt.py must not load torch's compiler: it would add about 3 s to
    every process that trains on the CPU (each of these tests' subprocesses too)."""
    code = "import sys, train_gpt; print([m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_tiny_gated_model_learns_and_logs(tmp_path):
    """Starts at ln(vocab) and clearly learns; the run directory holds everything the README promises.
    Steps of 256 tokens (2 sequences) and evaluations on 1024: 40 steps take the validation loss down by about 3.8
    (seeds 0, 1, 2: 3.75 to 3.81), well past the 2.5 asked for, at an eighth of the tokens of steps of 2048."""
    summary = tg.main(tiny_run(tmp_path, "--steps", "40", "--val-every", "20", "--window", "32", "--gate", "head",
                               "--batch-tokens", "256", "--micro-batch-tokens", "256", "--val-tokens", "1024"))
    run_dir = only_run_dir(tmp_path)
    evals = [m["val_loss"] for m in read_metrics(run_dir) if "val_loss" in m]
    assert len(evals) == 3
    assert abs(evals[0] - math.log(50304)) < 0.3, evals
    assert evals[-1] < evals[0] - 2.5, evals
    assert summary["val_loss"] == evals[-1]
    timed = [(m["eval_s"], m["probe_s"]) for m in read_metrics(run_dir) if "val_loss" in m]  # where eval time goes
    rounding = 0.0005 * 2 * len(timed)  # the metrics' times are rounded to the millisecond, the summary's not
    assert all(e > 0 and p > 0 for e, p in timed) and sum(map(sum, timed)) <= summary["eval_time_s"] + rounding, timed
    for key in ("val_loss", "train_time_s", "tokens", "tokens_per_s", "mfu", "peak_mem_gb", "params", "window", "gate"):
        assert key in summary
    assert summary["tokens"] == 40 * 256 and summary["window"] == 32 and summary["gate"] == "head"
    for name in ("train_gpt.py", "fa4_ops.py"):  # the code that ran, the file train_gpt.py imports included
        with open(os.path.join(run_dir, name)) as f, open(os.path.join(HERE, name)) as g:
            assert f.read() == g.read()
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["window"] == 32
    with open(os.path.join(run_dir, "env.json")) as f:
        assert json.load(f)["torch"] == torch.__version__
    with open(os.path.join(run_dir, "log.txt")) as f:
        log = f.read()
    assert "step:40/40 loss:" in log and "tok/s:" in log and "val_loss:" in log


def test_run_directories_are_never_reused(tmp_path):
    first = tg.make_run_dir(str(tmp_path), "same")
    second = tg.make_run_dir(str(tmp_path), "same")
    assert first != second and os.path.isdir(first) and os.path.isdir(second)


@pytest.mark.parametrize("flags, message", [
    (["--gate", "both"], "--gate 'both'"),
    (["--mix-full", "true", "--gate", "head"], "--mix-full mixes a window with full causal attention: give it a "
                                               "--window between 1 and --seq-len 1024, not 0"),
    (["--mix-full", "true", "--window", "256"], "--mix-full mixes by the gate: give it a --gate other than none"),
    (["--window", "-1"], "--window -1"),
    (["--n-head", "6", "--n-kv-head", "4"], "--n-head 6 is not a multiple of --n-kv-head 4"),
    (["--micro-batch-tokens", "1000", "--seq-len", "128"], "--micro-batch-tokens 1000 is not a multiple"),
    (["--batch-tokens", "3072", "--micro-batch-tokens", "2048"], "--batch-tokens 3072"),
    (["--val-tokens", "100"], "--val-tokens 100"),
    (["--steps", "10", "--warmup-steps", "8", "--cooldown-steps", "8"], "exceed --steps 10"),
])
def test_config_errors_name_the_flag(flags, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        tg.check_config(tg.parse_args(flags), world_size=1)


def test_unknown_flag_is_an_error():
    with pytest.raises(SystemExit):
        tg.parse_args(["--windw", "3"])


def test_help_shows_every_flags_comment_default_and_accepted_values(capsys):
    """--help gives each flag the comment on its Hyperparameters field (meaning and unit) and its default, the names
    the name-valued flags accept (as check_config checks them), and the fields' group headings."""
    with pytest.raises(SystemExit) as stopped:
        tg.given_flags(["--help"])
    assert stopped.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # without argparse's line wrapping
    docs = tg.field_docs()
    for field in dataclasses.fields(tg.Hyperparameters):
        assert docs[field.name][1], f"{field.name} has no comment for --help"
        assert "".join(docs[field.name][1].split()) in text, field.name
    for expected in ("--batch-tokensBATCH_TOKENStokensperoptimizerstep,overallGPUsandaccumulationsteps(default:524288)",
                     "--gate" + "|".join(tg.GATES), "--attention-backendauto|flex|fa4", "--lossplain|fused",
                     "--compiletrue|falsetorch.compilethemodel(CUDAonly)(default:true)",
                     "--dist-timeoutDIST_TIMEOUTseconds(default:900)", "distributed:arankthatwaitslonger"):
        assert expected in text


def test_missing_data_points_to_the_downloader(tmp_path):
    with pytest.raises(ValueError, match="data/fineweb.py"):
        tg.find_shards(str(tmp_path / "nothing_*.bin"), "train-files")


def test_weight_decay_reaches_the_matrices_and_the_embedding_only():
    model = tg.GPT(tg.ModelConfig(n_layer=1, d_model=32, n_head=2, n_kv_head=1, head_dim=16, mlp_hidden=64,
                                  seq_len=32, gate="head"))
    args = tg.Hyperparameters(lr=2e-3, weight_decay=0.3, beta1=0.8, beta2=0.9)
    decay, no_decay = tg.make_optimizer(model, args).param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "blocks.0.attn.gate.bias", "blocks.0.attn.k_norm.weight", "blocks.0.attn.q_norm.weight",
        "blocks.0.input_norm.weight", "blocks.0.mlp_norm.weight", "final_norm.weight"]
    assert "embed.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.3, 0.0)
    assert decay["lr"] == 2e-3 and decay["betas"] == (0.8, 0.9)


def test_lr_schedule_warmup_constant_cooldown():
    args = tg.Hyperparameters(lr=1.0, steps=10, warmup_steps=2, cooldown_steps=4)
    assert [tg.get_lr(s, args) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]


def make_shards(tmp_path, lengths):
    """Shards whose token values are all distinct, so a value identifies its place in the data."""
    files, offset = [], 0
    for i, n in enumerate(lengths):
        files.append(str(tmp_path / f"t_train_{i:06d}.bin"))
        tg.write_shard(files[-1], np.arange(offset, offset + n))
        offset += n
    return files


def window_starts(inputs, T):
    """Which windows a batch holds: make_shards' token values are stream offsets, and window w starts at w * T."""
    return [int(row[0]) // T for row in inputs]


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_ranks_read_every_window_once_per_epoch_and_as_one_process_does(tmp_path, world_size):
    """Over all ranks, each epoch reads every window of T + 1 tokens once (the windows span shard boundaries), in
    an order that differs from epoch to epoch; one process reading the same micro-steps in turn gets the same
    batches as the ranks, so the number of GPUs changes nothing of the data."""
    lengths, B, T = [5000, 3000, 701], 2, 16
    files = make_shards(tmp_path, lengths)
    windows = (sum(lengths) - 1) // T
    single = tg.DataLoader(files, B, T, 0, 1, 50304, CPU, seed=1)
    ranks = [tg.DataLoader(files, B, T, r, world_size, 50304, CPU, seed=1) for r in range(world_size)]
    read = []
    for _ in range(3 * windows // (world_size * B)):  # about three epochs
        for loader in ranks:
            inputs, targets = loader.next_batch()
            assert all(torch.equal(a, b) for a, b in zip((inputs, targets), single.next_batch()))
            assert torch.equal(inputs[:, 1:], targets[:, :-1])
            starts = window_starts(inputs, T)
            assert torch.equal(inputs, torch.tensor([[s * T + t for t in range(T)] for s in starts]))
            read += starts
    epochs = [read[e * windows : (e + 1) * windows] for e in range(len(read) // windows)]
    assert len(epochs) >= 2
    for epoch in epochs:
        assert sorted(epoch) == list(range(windows))
    assert epochs[0] != epochs[1]


def test_data_seed_sets_the_order_and_validation_reads_in_order(tmp_path):
    """Two seeds read different first batches, one seed the same each time; unseeded (validation), the windows come
    in order: the stream itself, the same tokens as the shards end to end."""
    files, T = make_shards(tmp_path, [3000, 2000]), 16

    def first(seed):
        return tg.DataLoader(files, 4, T, 0, 1, 50304, CPU, seed=seed).next_batch()[0]

    assert torch.equal(first(0), first(0))
    assert not torch.equal(first(0), first(1))
    validation = tg.DataLoader(files, 4, T, 0, 1, 50304, CPU)
    for step in range(3):
        assert torch.equal(validation.next_batch()[0].flatten(), torch.arange(step * 4 * T, (step + 1) * 4 * T))


def test_train_gpt_data_seed_defaults_to_seed(tmp_path):
    """--data-seed changes the training data and leaves the initial weights; -1 (the default) reads as --seed does.
    Only the first step's loss is read: one micro-batch a step, and the least validation (the run's final one)."""
    first_losses = {}
    for name, extra in {"seed0": [], "data1": ["--data-seed", "1"], "same": ["--data-seed", "0"]}.items():
        tg.main(tiny_run(tmp_path / name, "--steps", "1", "--warmup-steps", "0", "--cooldown-steps", "0", "--val-every", "0",
                            "--batch-tokens", "1024", "--val-tokens", "1024", *extra))
        first_losses[name] = read_metrics(only_run_dir(tmp_path / name))[0]["train_loss"]
    assert first_losses["seed0"] == first_losses["same"] != first_losses["data1"]


def test_loader_targets_are_inputs_shifted_by_one(tmp_path):
    files = make_shards(tmp_path, [4000])
    inputs, targets = tg.DataLoader(files, 3, 10, 0, 1, 50304, torch.device("cpu")).next_batch()
    assert inputs.shape == targets.shape == (3, 10)
    assert torch.equal(inputs.flatten()[1:], targets.flatten()[:-1])


def test_loader_refuses_shards_smaller_than_a_batch(tmp_path):
    files = make_shards(tmp_path, [60, 60])
    with pytest.raises(ValueError, match="hold 120 tokens, fewer than the 129 of one batch"):
        tg.DataLoader(files, 2, 64, 0, 1, 50304, torch.device("cpu"))


def test_ddp_on_two_cpu_processes_matches_one_process_and_only_rank_0_logs(tmp_path):
    """torchrun with 2 gloo ranks and 1 process with 2 accumulation steps train on the same tokens: same losses.
    Under torchrun only rank 0 prints and writes: one run directory, and stdout is its log, each line once.
    3 steps (the update of each step feeds the next) and a final evaluation of 2048 tokens, one micro-batch a rank.
    The two runs start together: each mostly imports torch on one core at first."""
    flags = tiny_run(tmp_path, "--steps", "3", "--warmup-steps", "1", "--cooldown-steps", "1", "--val-tokens", "2048",
                     "--val-every", "0", "--window", "32", "--gate", "head")
    env = subprocess_env()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    runs = {name: subprocess.Popen([*command, os.path.join(HERE, "train_gpt.py"), *flags, "--run-name", name],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, command in (("ddp", launch), ("single", [sys.executable]))}
    stdout = {}
    try:
        for name, process in runs.items():
            stdout[name], stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr[-3000:]
    finally:
        for process in runs.values():
            process.kill()
    run_dirs = {name: [os.path.join(tmp_path, d) for d in os.listdir(tmp_path) if d.startswith(name)]
                for name in ("ddp", "single")}
    assert [len(dirs) for dirs in run_dirs.values()] == [1, 1]
    with open(os.path.join(run_dirs["ddp"][0], "log.txt")) as f:
        assert stdout["ddp"] == f.read()
    losses = {name: [m.get("train_loss", m.get("val_loss")) for m in read_metrics(dirs[0])]
              for name, dirs in run_dirs.items()}
    assert len(losses["ddp"]) == 4  # 3 steps and the final evaluation
    np.testing.assert_allclose(losses["ddp"], losses["single"], rtol=1e-5)


def run_sh(tmp_path, *args, ngpu="1"):
    env = subprocess_env(NGPU=ngpu)
    return subprocess.run(["bash", os.path.join(HERE, "run.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_run_sh_help_prints_its_presets(tmp_path, flag):
    done = run_sh(tmp_path, flag)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("Presets for train_gpt.py:  ./run.sh [PRESET] [ARGS...]")
    for preset in ("demo", "baseline", "gated", "window", "gate", "compare", "ablate"):
        assert f"\n  {preset} " in done.stdout
    assert "#" not in done.stdout and "set -euo" not in done.stdout


def test_run_sh_train_files_with_an_equals_sign_fetches_no_fineweb(tmp_path):
    """--train-files=X, like --train-files X, is the user's data: no download (offline here, so one would fail at
    once), and train_gpt.py gets the pattern."""
    env = {**os.environ, "NGPU": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", os.path.join(HERE, "run.sh"), "gated", f"--train-files={tmp_path}/mine_*.bin",
                           "--log-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"--train-files '{tmp_path}/mine_*.bin' matches no files" in done.stdout + done.stderr
    assert "shards of" not in done.stdout and not os.path.exists(os.path.join(HERE, "data", "fineweb10B", ".download"))


def study_flags(tmp_path, *extra):
    """tiny_run's flags for 2 short steps, without --log-dir, which a study takes as the parent of its directory;
    sequences of 512, longer than the arms' 256-token window."""
    flags = tiny_run(tmp_path, "--steps", "2", "--warmup-steps", "1", "--cooldown-steps", "1", "--batch-tokens",
                     "1024", "--val-tokens", "1024", "--val-every", "0", "--seq-len", "512", *extra)
    at = flags.index("--log-dir")
    return flags[:at] + flags[at + 2:]


def study_summaries(tmp_path):
    (study,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    runs = [json.loads(f.read_text()) for f in study.glob("*/*/summary.json")]
    return study, sorted((r["run_name"], r["seed"]) for r in runs)


PRESETS = [("baseline", 0, "none"), ("gated", 256, "head")]


@pytest.fixture(scope="module")
def preset_runs(tmp_path_factory):
    """{preset: (its --log-dir, its ./run.sh PRESET process)} for each of PRESETS, all started together when the first
    test asks: each run is mostly torchrun's and its worker's imports, on one core. Each test waits for its own."""
    runs = {}
    for preset, _, _ in PRESETS:
        log_dir = tmp_path_factory.mktemp(f"preset-{preset}")
        env = subprocess_env(NGPU="1")  # run_sh's
        runs[preset] = log_dir, subprocess.Popen(
            ["bash", os.path.join(HERE, "run.sh"), preset, *study_flags(log_dir), "--log-dir", str(log_dir)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield runs
    for _, process in runs.values():  # a run no test waited for (one preset selected) still finishes, not orphaned
        process.communicate(timeout=600)


@pytest.mark.parametrize("preset, window, gate", PRESETS)
def test_run_sh_single_run_presets_train_their_attention(preset_runs, preset, window, gate):
    log_dir, process = preset_runs[preset]
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    (run_dir,) = log_dir.glob(f"{preset}-*")
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["run_name"], config["window"], config["gate"]) == (preset, window, gate)


@pytest.mark.parametrize("preset, flags", [("window", "--window 256 --gate none"), ("gate", "--window 0 --gate head")])
def test_run_sh_other_presets_take_their_flags_from_study_py(preset, flags):
    """run.sh's four presets share one line, which reads the preset's flags from study.py (the two above train)."""
    done = subprocess.run([sys.executable, os.path.join(HERE, "study.py"), "--flags", preset], capture_output=True,
                          text=True, cwd=HERE)
    assert done.returncode == 0 and done.stdout.split() == flags.split(), done.stderr
    with open(os.path.join(HERE, "run.sh")) as f:
        assert "    baseline|gated|window|gate)\n" in f.read()


def test_run_sh_compare_trains_each_arm_for_each_seed_two_at_once_and_writes_the_table(tmp_path, monkeypatch):
    """Real runs of both arms for the --seeds given (one, not compare's default three), two at once on 2 slots. The
    arms x seeds x rates plan, the queue's later runs and a table over several seeds are test_study.py's, with a fake
    trainer (test_study_reports_a_failed_run_and_the_others_go_on: both arms x seeds 0,1), and the run.sh SIGTERM
    test below plans --seeds 0,1 through run.sh."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # two runs at once on the CPU, whatever GPUs there are
    tiny = study_flags(tmp_path)
    done = run_sh(tmp_path, "compare", "--seeds", "0", "--log-dir", str(tmp_path), *tiny, ngpu="2")
    assert done.returncode == 0, done.stderr
    study, runs = study_summaries(tmp_path)
    assert study.name.startswith("compare-")
    assert runs == [("baseline", 0), ("gated", 0)]
    table = (study / "table.md").read_text()
    assert table in done.stdout
    assert "| baseline | full | none |" in table and "| gated | 256 | head |" in table and "4.6498" in table


def test_run_sh_ablate_runs_the_chosen_arms_including_mix(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the two arms at once on the CPU (each run takes one core)
    tiny = study_flags(tmp_path)
    done = run_sh(tmp_path, "ablate", "--arms", "gated-64,mix", "--log-dir", str(tmp_path), *tiny, ngpu="2")
    assert done.returncode == 0, done.stderr
    study, runs = study_summaries(tmp_path)
    assert runs == [("gated-64", 0), ("mix", 0)]
    mix = read_metrics(next(study.glob("mix-*/mix-*")))[-1]
    assert len(mix["gates"]["mean"]) == 2 and len(mix["sinks"]["first_token"]) == 2


@pytest.mark.parametrize("args, message", [
    (["compare", "--arms", "gated,nope"], "unknown arm 'nope'"),
    (["ablate", "--window", "64"], "ablate sets --window itself"),
    (["compare", "--seeds"], "--seeds needs a value"),
])
def test_run_sh_study_refuses_bad_arguments(tmp_path, args, message):
    done = run_sh(tmp_path, *args, "--log-dir", str(tmp_path)) if args[-1] != "--seeds" else run_sh(tmp_path, *args)
    assert done.returncode == 2 and message in done.stderr
    assert not any(tmp_path.iterdir())


def test_run_sh_study_needs_a_gpu_for_each_run_at_once(tmp_path):
    env = {**os.environ, "NGPU": "3", "CUDA_VISIBLE_DEVICES": "0,1"}
    done = subprocess.run(["bash", os.path.join(HERE, "run.sh"), "compare", "--log-dir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "NGPU=3 runs at once, but CUDA_VISIBLE_DEVICES lists 2 GPU(s)" in done.stderr
    assert not any(tmp_path.iterdir())


def test_run_sh_study_sigterm_stops_the_run_with_a_checkpoint_and_skips_the_rest(tmp_path):
    flags = study_flags(tmp_path)
    flags[flags.index("--steps") + 1] = "1000"
    env = subprocess_env(NGPU="1")
    study = subprocess.Popen(["bash", os.path.join(HERE, "run.sh"), "compare", "--seeds", "0,1", "--log-dir",
                              str(tmp_path), *flags, "--cooldown-steps", "1"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list(tmp_path.glob("compare-*/baseline-*/baseline-*/log.txt")) or \
                "step:2/" not in next(tmp_path.glob("compare-*/baseline-*/baseline-*/log.txt")).read_text():
            assert time.time() < deadline and study.poll() is None
            time.sleep(0.5)
        study.send_signal(signal.SIGTERM)
        _, stderr = study.communicate(timeout=300)
    finally:
        study.kill()
    assert study.returncode == 1
    assert "stopped" in stderr and stderr.count("skipped: ") == 3, stderr
    (run,) = tmp_path.glob("compare-*/baseline-*/baseline-*/")
    assert list(run.glob("ckpt_step*.pt")) and not (run / "summary.json").exists()
    assert not list(tmp_path.glob("compare-*/gated-*/"))


def test_run_sh_study_stops_with_the_failed_runs_output(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # both runs at once on the CPU (each run takes one core)
    tiny = study_flags(tmp_path)
    done = run_sh(tmp_path, "compare", "--seeds", "0", "--log-dir", str(tmp_path), *tiny, "--val-files",
                  str(tmp_path / "none_*.bin"), ngpu="2")
    assert done.returncode == 1
    assert "run baseline, seed 0 failed" in done.stderr and "none_*.bin' matches no files" in done.stderr


def test_evaluation_at_other_lengths_cuts_the_same_validation_tokens(tmp_path):
    """--eval-seq-lens evaluates the trained model on the same validation tokens cut into longer (or shorter)
    sequences, with rotary tables continued past the training length: each loss equals the mean loss of the model
    computed here by hand on those sequences, and is recorded in summary.json and metrics.jsonl. Two steps of 1024
    tokens move the weights off their initial values; 2048 validation tokens are two micro-batches at every length."""
    val_tokens = 2048
    summary = tg.main(tiny_run(tmp_path, "--steps", "2", "--warmup-steps", "1", "--cooldown-steps", "1",
                               "--batch-tokens", "1024", "--val-tokens", str(val_tokens), "--val-every", "0",
                               "--window", "32", "--gate", "head", "--eval-seq-lens", "64,512"))
    run_dir = only_run_dir(tmp_path)
    losses = summary["val_loss_by_seq_len"]
    assert list(losses) == ["128", "64", "512"] and losses["128"] == summary["val_loss"]
    assert summary["wall_time_s"] > summary["train_time_s"] + summary["eval_time_s"] and summary["eval_time_s"] > 0
    assert read_metrics(run_dir)[-1]["val_loss_by_seq_len"] == losses
    assert 0 < read_metrics(run_dir)[-1]["eval_s"] < summary["eval_time_s"]
    with open(os.path.join(run_dir, "env.json")) as f:
        recorded = json.load(f)["provenance"]
    assert summary["provenance"] == {**recorded, "train_data": recorded["train_data"]["sha256"],
                                     "val_data": recorded["val_data"]["sha256"]}
    model = sample.load_model(run_dir, CPU)
    tokens = torch.from_numpy(tg.load_shard(glob.glob(SAMPLE_VAL)[0], 50304)[:val_tokens + 1].astype(np.int64))
    for length in (64, 512):
        inputs, targets = tokens[:-1].view(-1, length), tokens[1:].view(-1, length)
        with torch.no_grad():
            by_hand = torch.stack([model(i, t, model.masks(length, CPU))
                                   for i, t in zip(inputs.split(1024 // length), targets.split(1024 // length))])
        assert math.isclose(losses[str(length)], by_hand.mean().item(), rel_tol=1e-5)
    cos, sin = tg.rotary_tables(16, 512, 10000.0)
    assert torch.equal(cos[:128], model.rope_cos) and torch.equal(sin[:128], model.rope_sin)


@pytest.mark.parametrize("lengths, message", [("300", "300 does not divide --micro-batch-tokens 1024"),
                                              ("2k", "give comma-separated lengths in tokens")])
def test_eval_seq_lens_are_checked(lengths, message):
    with pytest.raises(ValueError, match=message):
        tg.check_config(tg.parse_args(tiny_run("/nonexistent", "--eval-seq-lens", lengths)), world_size=1)


def test_provenance_names_the_commit_the_code_and_the_data(tmp_path):
    """A run records the git commit with whether tracked files differ from it, this train_gpt.py's sha256, and per
    data split its shards, token counts and a sha256 of the tokens; another shard changes the fingerprint."""
    files = make_shards(tmp_path, [3000, 2000])
    loader = tg.DataLoader(files, 2, 16, 0, 1, 50304, CPU)
    found = tg.provenance(loader, loader)
    head = subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True, text=True)
    assert found["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert found["git_dirty"] in ((True, False) if head.returncode == 0 else (None,))
    with open(os.path.join(HERE, "train_gpt.py"), "rb") as f, open(os.path.join(HERE, "fa4_ops.py"), "rb") as g:
        assert found["code_sha256"] == hashlib.sha256(f.read() + g.read()).hexdigest()
    tokens = np.arange(5000, dtype=np.uint16).tobytes()
    assert found["train_data"] == {"shards": [["t_train_000000.bin", 3000], ["t_train_000001.bin", 2000]],
                                   "sha256": hashlib.sha256(tokens).hexdigest()}
    (tmp_path / "other").mkdir()
    other = tg.DataLoader(make_shards(tmp_path / "other", [3000, 2001]), 2, 16, 0, 1, 50304, CPU)
    assert tg.provenance(other, other)["train_data"]["sha256"] != found["train_data"]["sha256"]
