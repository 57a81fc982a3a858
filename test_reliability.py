"""Checkpoints, exact resume, stop signals, the non-finite guard and input checks, on the CPU.

    python -m pytest -q test_reliability.py
"""
import contextlib
import errno
import fcntl
import glob
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train_gpt as tg
from test_train import (HERE, SAMPLE_TRAIN, make_shards, only_run_dir, read_metrics, subprocess_env,
                        tiny_run)

CPU = torch.device("cpu")
# run.sh's allocator settings: without them glibc hands the logits' memory back to the OS after every step
ENV = subprocess_env()
SCRIPT = os.path.join(HERE, "train_gpt.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
STEPS = 16


def flags(log_dir, *extra):
    """A tiny model on the Austen sample, 2 micro-batches of 256 tokens a step."""
    return tiny_run(log_dir, "--micro-batch-tokens", "256", "--batch-tokens", "512", "--val-tokens", "512",
                    "--steps", str(STEPS), "--val-every", "4", *extra)


def run(command):
    """Runs command with one thread per process, so every run sums in the same order; returns its stdout."""
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def train(*args, launcher=(sys.executable,)):
    return run([*launcher, SCRIPT, *args])


def train_here(*args):
    """train_gpt.main(args) in this process, with one thread as run() gives its subprocesses, so it sums in the same
    order as they do; returns its stdout. For runs whose process is not what a test tests (no signal, no torchrun):
    it saves a subprocess's imports."""
    threads, stdout = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout):
            tg.main(list(args))
    finally:
        torch.set_num_threads(threads)
    return stdout.getvalue()


def run_dir_in(output):
    return re.search(r"^run (\S+):", output, re.M)[1]


def losses(run_dir):
    """{(step, "train" or "val"): loss} from a run's metrics.jsonl."""
    return {(m["step"], "train" if "train_loss" in m else "val"): m.get("train_loss", m.get("val_loss"))
            for m in read_metrics(run_dir)}


def stop_with_sigterm(command, output_file, pick_pid=lambda pid: pid):
    """Starts command, sends SIGTERM (to pick_pid(its pid)) once step 1 is logged; returns (exit code, output)."""
    with open(output_file, "w") as out:
        process = subprocess.Popen(command, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while "\nstep:1/" not in output_file.read_text():
        assert process.poll() is None and time.time() < deadline, output_file.read_text()[-3000:]
        time.sleep(0.05)
    os.kill(pick_pid(process.pid), signal.SIGTERM)
    code = process.wait(timeout=120)
    return code, output_file.read_text()


def resume_command(output):
    """The command a stopped run prints, with this Python as `python` and `torchrun`."""
    command = shlex.split(re.search(r"resume with:\n(.+)", output)[1])
    launcher = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    return [*launcher[command[0]], *command[1:]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run directory of a run that never stops, with a checkpoint every 3 steps, all kept (trained in this
    process: the subprocesses that resume its checkpoints compute bit for bit the same losses)."""
    return run_dir_in(train_here(*flags(tmp_path_factory.mktemp("uninterrupted"), "--save-every", "3",
                                   "--keep-checkpoints", "0")))


# -----------------------------------------------------------------------------
# Resume


def test_loader_seek_continues_the_stream_exactly(tmp_path):
    """A loader put at position p by seek reads the same batches as one that read its way to p: mid-shard, on
    shard and epoch boundaries, epochs later, for every rank."""
    files = make_shards(tmp_path, [500, 300, 70])
    for world_size in (1, 2):
        for rank in range(world_size):
            reader = tg.DataLoader(files, 2, 8, rank, world_size, 50304, CPU, seed=3)
            for _ in range(200):  # several epochs of 870 tokens, in steps of 16 or 32 tokens
                seeker = tg.DataLoader(files, 2, 8, rank, world_size, 50304, CPU, seed=3)
                seeker.seek(reader.position)
                for _ in range(3):
                    assert all(torch.equal(a, b) for a, b in zip(seeker.next_batch(), reader.next_batch()))
            assert reader.epoch >= 4 and reader.position == seeker.position


def test_resume_gives_the_losses_of_the_run_that_never_stopped(uninterrupted):
    """Resumed from its step-3 checkpoint, into the same log directory, a run computes bit for bit the train and
    val losses of every later step; it writes a new run directory and leaves the old one as it was."""
    log_dir = os.path.dirname(uninterrupted)
    def files():
        return {name: os.stat(os.path.join(uninterrupted, name)).st_mtime_ns for name in os.listdir(uninterrupted)}

    before = files()
    checkpoint = tg.checkpoint_path(uninterrupted, 3)
    resumed = run_dir_in(train_here(*flags(log_dir, "--resume", checkpoint)))
    assert resumed != uninterrupted and os.path.dirname(resumed) == log_dir
    assert files() == before
    full, after = losses(uninterrupted), losses(resumed)
    assert sorted(after) == sorted(k for k in full if k[0] > 3)
    assert after == {k: full[k] for k in after}
    with open(os.path.join(resumed, "log.txt")) as f:
        assert f"resumed from {checkpoint} at step 3" in f.read()
    with open(os.path.join(resumed, "config.json")) as f:
        assert f'"resume": "{checkpoint}"' in f.read()


def test_checkpoints_hold_the_whole_state_and_only_the_newest_are_kept(tmp_path):
    """Checkpoints of a run are ckpt_step<N>.pt in its directory, the newest --keep-checkpoints of them; they
    load with weights_only and hold the uncompiled model's weights, AdamW's state, data position, RNG, config."""
    tg.main(flags(tmp_path, "--steps", "5", "--cooldown-steps", "2", "--save-every", "2", "--keep-checkpoints", "2",
                  "--val-every", "0"))
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    assert tg.run_checkpoints(run_dir) == [tg.checkpoint_path(run_dir, 4), tg.checkpoint_path(run_dir, 5)]
    checkpoint = torch.load(tg.checkpoint_path(run_dir, 5), weights_only=True)
    assert checkpoint.keys() == tg.CHECKPOINT_KEYS | {"data_order"} and checkpoint["data_order"] == tg.DATA_ORDER
    assert checkpoint["step"] == 5 and checkpoint["data_position"] == 5 * 512
    assert checkpoint["config"]["d_model"] == 64 and checkpoint["world_size"] == 1
    assert checkpoint["train_shards"] == [["austen_train_000001.bin", 850000]]
    assert "embed.weight" in checkpoint["model"] and not any("_orig_mod" in k for k in checkpoint["model"])
    assert all(int(s["step"]) == 5 for s in checkpoint["optimizer"]["state"].values())
    assert checkpoint["rng_cpu"].dtype == torch.uint8 and checkpoint["rng_cuda"] is None


class Killed(BaseException):
    """The process dying mid-write (SIGKILL, a lost node): nothing of write_checkpoint's runs after it."""


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A write that dies halfway leaves only a .tmp file: the earlier checkpoint stays, whole and newest."""
    first = tg.checkpoint_path(str(tmp_path), 1)
    tg.write_checkpoint(first, {"weights": torch.ones(1000)}, keep=1)

    def crash_halfway(state, f):
        f.write(b"PK\x03\x04 half a zip")
        raise Killed

    monkeypatch.setattr(tg.torch, "save", crash_halfway)
    with pytest.raises(Killed):
        tg.write_checkpoint(tg.checkpoint_path(str(tmp_path), 2), {"weights": torch.zeros(1000)}, keep=1)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_step000001.pt", "ckpt_step000002.pt.tmp"]
    assert tg.find_checkpoint(str(tmp_path)) == first
    assert torch.equal(torch.load(first, weights_only=True)["weights"], torch.ones(1000))


def test_a_full_disk_during_a_checkpoint_write_removes_the_partial_file_and_says_how_much_space_it_needs(
        tmp_path, monkeypatch):
    first = tg.checkpoint_path(str(tmp_path), 1)
    tg.write_checkpoint(first, {"weights": torch.ones(1000)}, keep=1)

    def fill_the_disk(state, f):
        f.write(b"x" * 3000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tg.torch, "save", fill_the_disk)
    second = tg.checkpoint_path(str(tmp_path), 2)
    with pytest.raises(ValueError, match=rf"^checkpoint {re.escape(second)}: the write failed after 3,000 bytes "
                                         rf"\(\[Errno 28\] No space left on device\); the checkpoint needs about 8,000 "
                                         rf"bytes and its disk has [\d,]+ free\. The partial file is removed and the "
                                         rf"earlier checkpoints are whole: free space, then resume from {tmp_path}$"):
        tg.write_checkpoint(second, {"weights": torch.zeros(1000, dtype=torch.float64), "step": 2}, keep=1)
    assert os.listdir(tmp_path) == ["ckpt_step000001.pt"]
    assert torch.equal(torch.load(first, weights_only=True)["weights"], torch.ones(1000))


def test_a_write_that_fails_part_way_inside_torch_save_is_reported_the_same(tmp_path):
    """torch.save itself, stopped part-way by the file size limit (as by a full disk), reports "unexpected pos", not
    the OSError; that is caught too."""
    script = (f"import resource, signal, sys, torch; sys.path.insert(0, {HERE!r}); import train_gpt as tg; "
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY)); "
              "tg.write_checkpoint(sys.argv[1], {'weights': torch.ones(100_000)}, keep=1)")
    path = tg.checkpoint_path(str(tmp_path), 1)
    done = subprocess.run([sys.executable, "-c", script, path], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert re.search(rf"ValueError: checkpoint {re.escape(path)}: the write failed after 100,000 bytes \(.*unexpected "
                     r"pos .*\); the checkpoint needs about 400,000 bytes", done.stderr), done.stderr[-3000:]
    assert os.listdir(tmp_path) == []


def test_a_resumed_run_removes_the_partial_checkpoints_of_killed_writes_beside_its_checkpoint(uninterrupted, tmp_path):
    """Files of killed writes go, and the log says so; a write still going on (it holds its lock) and every other
    file stay."""
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(tg.checkpoint_path(uninterrupted, 3), killed)
    (killed / "ckpt_step000004.pt.tmp").write_bytes(b"PK\x03\x04 half a zip")
    (killed / "notes.tmp").write_bytes(b"the user's")
    with open(killed / "ckpt_step000005.pt.tmp", "wb") as live:
        fcntl.flock(live, fcntl.LOCK_EX)
        tg.main(["--resume", str(killed), "--steps", "6", "--log-dir", str(tmp_path / "logs")])
    assert sorted(os.listdir(killed)) == ["ckpt_step000003.pt", "ckpt_step000005.pt.tmp", "notes.tmp"]
    with open(os.path.join(only_run_dir(tmp_path / "logs"), "log.txt")) as f:
        assert f"removed {killed / 'ckpt_step000004.pt.tmp'} (15 bytes): a checkpoint whose write was killed\n" in f.read()


def test_resume_finds_the_newest_checkpoint_and_rejects_bad_paths(tmp_path):
    for name in ("ckpt_step000002.pt", "ckpt_step000010.pt", "ckpt_step000011.pt.tmp", "other.pt"):
        (tmp_path / name).write_bytes(b"")
    assert tg.find_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt_step000010.pt")
    assert tg.find_checkpoint(str(tmp_path / "ckpt_step000002.pt")) == str(tmp_path / "ckpt_step000002.pt")
    with pytest.raises(ValueError, match="no such file or directory"):
        tg.find_checkpoint(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        tg.find_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        tg.load_checkpoint(str(tmp_path / "ckpt_step000010.pt"))
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by train_gpt.py"):
        tg.load_checkpoint(str(tmp_path / "foreign.pt"))


def test_resume_refuses_another_model_batch_or_data_and_lists_every_difference(uninterrupted, tmp_path):
    """Nothing is created: the check runs before the run directory."""
    other_data = tmp_path / "data"
    other_data.mkdir()
    shutil.copy(SAMPLE_TRAIN.replace("*", "000001"), other_data / "books_train_000001.bin")
    changed = ["--d-model", "32", "--batch-tokens", "1024", "--seed", "1", "--beta2", "0.99",
               "--train-files", str(other_data / "*.bin"), "--resume", uninterrupted]
    with pytest.raises(ValueError) as error:
        tg.main(flags(tmp_path / "logs", "--steps", "8", "--warmup-steps", "0", *changed))
    message = str(error.value)
    for difference in ("--d-model 64 -> 32", "--batch-tokens 512 -> 1024", "--seed 0 -> 1", "--beta2 0.95 -> 0.99",
                       "--train-files: the checkpoint read 1 shard(s) (austen_train_000001.bin",
                       "--steps 8 ends before the checkpoint's step 16"):
        assert difference in message
    assert "--warmup-steps" not in message and "ckpt_step000016.pt" in message
    assert not (tmp_path / "logs").exists()


def test_resume_refuses_a_checkpoint_of_another_data_order(uninterrupted, tmp_path):
    """A checkpoint from before the loader read windows (no data_order, no --data-seed) cannot continue its data
    stream, so resuming it is refused, saying why; nothing is created."""
    checkpoint = torch.load(tg.run_checkpoints(uninterrupted)[-1], weights_only=True)
    del checkpoint["data_order"], checkpoint["config"]["data_seed"]
    old = tmp_path / "ckpt_step000016.pt"
    torch.save(checkpoint, old)
    with pytest.raises(ValueError, match="read the training data in another order") as error:
        tg.main(["--resume", str(old), "--steps", "20", "--log-dir", str(tmp_path / "logs")])
    assert "--data-seed None -> -1" in str(error.value)
    assert not (tmp_path / "logs").exists()


def test_resuming_a_finished_run_says_so_and_how_to_extend_it(uninterrupted, tmp_path):
    """A finished run resumed as it is would train no step; it is refused before any directory exists, and the
    --steps it names continues the run."""
    with pytest.raises(ValueError, match=rf"--resume .*ckpt_step0000{STEPS}.pt: the run is finished, at step {STEPS} "
                                         rf"of --steps {STEPS}; to train it further, pass --steps M with M > {STEPS}"):
        tg.main(["--resume", uninterrupted, "--log-dir", str(tmp_path / "logs")])
    assert not (tmp_path / "logs").exists()
    tg.main(["--resume", uninterrupted, "--steps", str(STEPS + 2), "--log-dir", str(tmp_path / "logs")])
    steps = [m["step"] for m in read_metrics(only_run_dir(tmp_path / "logs"))]
    assert steps == [STEPS, STEPS + 1, STEPS + 2, STEPS + 2]  # an evaluation at the start (--val-every 4), 2 steps, the end


def test_resume_allows_a_longer_schedule_and_another_micro_batch_or_world_size(uninterrupted):
    checkpoint = tg.load_checkpoint(tg.checkpoint_path(uninterrupted, 3))
    args = tg.parse_args(flags("elsewhere", "--steps", "40", "--lr", "1e-3", "--micro-batch-tokens", "512"))
    shards = [["austen_train_000001.bin", 850000]]
    changes = tg.check_resume(checkpoint, args, shards, world_size=2)
    assert "--steps 16 -> 40" in changes and "--micro-batch-tokens 256 -> 512" in changes
    assert "world size 1 -> 2" in changes


# -----------------------------------------------------------------------------
# Stop signals


def test_sigterm_stops_after_a_step_with_a_checkpoint_that_resumes_exactly(uninterrupted, tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, the process exits 143 and prints the command
    that resumes; that command finishes the run with every loss equal to the uninterrupted run's (train_gpt.main()
    with its arguments, in this process: the resume is no signal's business, and the stopped run is a process)."""
    code, output = stop_with_sigterm([sys.executable, SCRIPT, *flags(tmp_path)], tmp_path / "stopped.txt")
    assert code == 128 + signal.SIGTERM, output[-3000:]
    stop_step = int(re.search(r"stopped by SIGTERM after step (\d+)", output)[1])
    stopped = run_dir_in(output)
    assert 1 <= stop_step < STEPS and tg.run_checkpoints(stopped) == [tg.checkpoint_path(stopped, stop_step)]
    command = resume_command(output)
    assert command == [sys.executable, os.path.relpath(SCRIPT), "--resume", tg.checkpoint_path(stopped, stop_step)]
    resumed = run_dir_in(train_here("--resume", stopped))  # the run directory alone: its config is in the checkpoint
    full = losses(uninterrupted)
    assert resumed != stopped and {**losses(stopped), **losses(resumed)} == full


def test_resume_takes_the_checkpoints_config_and_only_flags_that_may_change(uninterrupted, tmp_path):
    """--resume with a flag that may change (--lr) continues the run with it and logs the change; one that may not
    (--n-layer) is refused, naming it."""
    checkpoint = tg.checkpoint_path(uninterrupted, 3)
    tg.main(["--resume", checkpoint, "--lr", "2e-3", "--steps", "6", "--log-dir", str(tmp_path)])
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    with open(os.path.join(run_dir, "log.txt")) as f:
        assert f"resumed from {checkpoint} at step 3; changed: --steps 16 -> 6, --lr 0.003 -> 0.002" in f.read()
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["lr"] == 2e-3 and config["d_model"] == 64 and config["train_files"] == tg.Hyperparameters(
        **tg.load_checkpoint(checkpoint)["config"]).train_files
    with pytest.raises(ValueError, match=r"where it must not:\n  --n-layer 2 -> 3\nuse the checkpoint's values"):
        tg.main(["--resume", uninterrupted, "--n-layer", "3", "--log-dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


def test_sigint_is_noted_like_sigterm_and_the_handlers_are_given_back():
    """Ctrl-C raises no KeyboardInterrupt mid-step; it is read, like SIGTERM, at the end of the step."""
    before = signal.getsignal(signal.SIGINT)
    stop = tg.StopSignals()
    signal.raise_signal(signal.SIGINT)
    assert stop.agreed(CPU) == signal.SIGINT
    stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def rank_1_worker(agent_pid):
    """The pid of the torchrun worker with RANK=1, from /proc."""
    children = []
    for path in glob.glob(f"/proc/{agent_pid}/task/*/children"):
        with open(path) as f:
            children += f.read().split()
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if b"\0RANK=1\0" in b"\0" + f.read():
                return int(pid)
    raise AssertionError(f"no worker with RANK=1 among {children}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path):
    """Under torchrun with 2 gloo ranks, SIGTERM to rank 1 alone stops both ranks after the same step with a
    checkpoint (torchrun's own SIGTERM reaches every worker: the easier case); the resume, again under torchrun,
    computes bit for bit the losses of an uninterrupted torchrun run, which trains meanwhile (the stopped run still
    gets its SIGTERM after step 1 of 16, only later)."""
    uninterrupted = subprocess.Popen([*TORCHRUN, SCRIPT, *flags(tmp_path / "full")], env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
    try:
        code, output = stop_with_sigterm([*TORCHRUN, SCRIPT, *flags(tmp_path / "stopped")], tmp_path / "stopped.txt",
                                         pick_pid=rank_1_worker)
        stdout, stderr = uninterrupted.communicate(timeout=300)
    finally:
        uninterrupted.kill()
    assert uninterrupted.returncode == 0, stdout[-3000:] + stderr[-3000:]
    full = losses(run_dir_in(stdout))
    assert code != 0 and "exitcode  : 143" in output, output[-3000:]
    stop_step = int(re.search(r"stopped by SIGTERM after step (\d+)", output)[1])
    stopped = run_dir_in(output)
    assert tg.run_checkpoints(stopped) == [tg.checkpoint_path(stopped, stop_step)]
    command = resume_command(output)
    assert command[:5] == TORCHRUN
    resumed = run_dir_in(run(command))
    assert {**losses(stopped), **losses(resumed)} == full


def test_torchrun_passes_its_sigterm_to_every_rank_which_stop_with_a_checkpoint(tmp_path):
    """SIGTERM to torchrun itself, as a scheduler sends it: torchrun passes it on to the workers and waits
    (--shutdown-timeout, 30 s by default) while they finish the step and write the checkpoint."""
    code, output = stop_with_sigterm([*TORCHRUN, SCRIPT, *flags(tmp_path)], tmp_path / "stopped.txt")
    assert code != 0, output[-3000:]
    stop_step = int(re.search(r"stopped by SIGTERM after step (\d+)", output)[1])
    assert tg.load_checkpoint(tg.checkpoint_path(run_dir_in(output), stop_step))["step"] == stop_step


# -----------------------------------------------------------------------------
# Non-finite guard


def nan_on_forward_call(monkeypatch, bad_call):
    """Makes the bad_call-th forward pass (counting from 1) return NaN, as an overflow would."""
    forward, calls = tg.GPT.forward, []

    def patched(self, *args):
        calls.append(1)
        loss = forward(self, *args)
        return loss * float("nan") if len(calls) == bad_call else loss

    monkeypatch.setattr(tg.GPT, "forward", patched)


def test_nonfinite_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_on_forward_call(monkeypatch, bad_call=6)  # the second micro-batch of step 3
    with pytest.raises(FloatingPointError, match=r"^step 3: loss nan or gradient norm nan is not finite") as error:
        tg.main(flags(tmp_path, "--save-every", "2", "--val-every", "0"))
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    assert f"the last good checkpoint is {tg.checkpoint_path(run_dir, 2)}" in str(error.value)
    assert tg.run_checkpoints(run_dir) == [tg.checkpoint_path(run_dir, 2)]
    assert tg.load_checkpoint(tg.checkpoint_path(run_dir, 2))["step"] == 2


def test_skip_nonfinite_skips_only_that_update(tmp_path, monkeypatch):
    """With --skip-nonfinite 1 the bad step leaves weights and AdamW's state untouched and the run goes on."""
    nan_on_forward_call(monkeypatch, bad_call=5)
    tg.main(flags(tmp_path, "--steps", "4", "--cooldown-steps", "2", "--skip-nonfinite", "1", "--save-every", "1",
                  "--keep-checkpoints", "0", "--val-every", "0"))
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    second, third, fourth = (tg.load_checkpoint(tg.checkpoint_path(run_dir, s)) for s in (2, 3, 4))
    for name, weight in second["model"].items():
        assert torch.equal(weight, third["model"][name]) and not torch.equal(weight, fourth["model"][name])
    assert [c["optimizer"]["state"][0]["step"].item() for c in (second, third, fourth)] == [2, 2, 3]
    assert third["nonfinite_skipped"] == 1
    with open(os.path.join(run_dir, "log.txt")) as f:
        assert "step:3/4 skipped: no update from a non-finite loss or gradient norm (1 of --skip-nonfinite 1)" \
            in f.read()


# -----------------------------------------------------------------------------
# Input checks


@pytest.mark.parametrize("bad, message", [
    (["--n-kv-head", "0"], "--n-kv-head 0: must be positive"),
    (["--d-model", "-8"], "--d-model -8: must be positive"),
    (["--micro-batch-tokens", "0"], "--micro-batch-tokens 0: must be positive"),
    (["--steps", "0", "--warmup-steps", "0", "--cooldown-steps", "0"], "--steps 0: must be positive"),
    (["--rope-base", "0"], "--rope-base 0.0: must be positive"),
    (["--lr", "-0.1"], "--lr -0.1: must be 0 or more"),
    (["--save-every", "-1"], "--save-every -1: must be 0 or more"),
    (["--keep-checkpoints", "-2"], "--keep-checkpoints -2: must be 0 or more"),
    (["--skip-nonfinite", "-1"], "--skip-nonfinite -1: must be 0 or more"),
    (["--dist-timeout", "0"], "--dist-timeout 0: must be positive"),
    (["--beta2", "1.0"], r"--beta2 1.0: must lie in \[0, 1\)"),
    (["--peak-tflops", "0"], "--peak-tflops 0.0: must be positive"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay nan: must be a finite number"),
    (["--grad-clip", "inf"], "--grad-clip inf: must be a finite number"),
    (["--window", "128", "--seq-len", "128"], "--window 128: a window of --seq-len 128 tokens or more is full causal "
                                              "attention; use --window 0 for that, or a window below 128"),
    (["--window", "4096"], "--window 4096: a window of --seq-len 1024 tokens or more"),
    (["--run-name", "../../x"], "--run-name '../../x': a name, not a path; pass the directory as --log-dir"),
])
def test_config_checks_name_the_flag(bad, message):
    with pytest.raises(ValueError, match=message):
        tg.check_config(tg.parse_args(bad), world_size=1)


def test_a_window_below_seq_len_and_a_run_name_with_dots_are_fine():
    """--window seq_len - 1 still leaves out the oldest key of the last query; a name with dots stays a name (the
    run directory is the name plus a time stamp)."""
    tg.check_config(tg.parse_args(["--window", "1023", "--run-name", ".."]), world_size=1)


def damaged_copy(tmp_path):
    path = tmp_path / "cut_train_000001.bin"
    shutil.copy(SAMPLE_TRAIN.replace("*", "000001"), path)
    with open(path, "r+b") as f:
        f.truncate(5000)
    return str(path)


def foreign_shard(tmp_path):
    """A shard that another tokenizer made: one id past the vocabulary, deep in it."""
    path = tmp_path / "other_train_000001.bin"
    tokens = np.full(300_000, 50256)
    tokens[123_456] = 60_000
    tg.write_shard(str(path), tokens)
    return str(path)


@pytest.mark.parametrize("bad, message", [
    (lambda d: ["--train-files", foreign_shard(d)],
     r"other_train_000001.bin: token id 60000 at position 123456 is >= the vocabulary size 50304"),
    (lambda d: ["--train-files", str(d / "none_*.bin")],
     r"--train-files '.*none_\*.bin' matches no files; .*data/fineweb.py"),
    (lambda d: ["--val-files", str(d / "none_*.bin")], r"--val-files '.*none_\*.bin' matches no files"),
    (lambda d: ["--train-files", damaged_copy(d)], r"cut_train_000001.bin: 5000 bytes, .* truncated or damaged"),
    (lambda d: ["--val-tokens", "1048576"], r"holds 100000 tokens, fewer than --val-tokens 1048576 \+ 1"),
    (lambda d: ["--micro-batch-tokens", "1048576", "--batch-tokens", "1048576", "--val-tokens", "1048576"],
     r"hold 850000 tokens, fewer than the 1048577 of one batch"),
    (lambda d: ["--resume", str(d / "nothing")], r"--resume .*nothing: no such file or directory"),
    (lambda d: ["--log-dir", SAMPLE_TRAIN.replace("*", "000001")], r"--log-dir .*: cannot make a run directory"),
    (lambda d: ["--lr", "nan"], "--lr nan: must be a finite number"),
    (lambda d: ["--run-name", "../escaped"], "--run-name '../escaped': a name, not a path"),
])
def test_input_errors_stop_the_run_before_it_makes_a_directory(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        tg.main(flags(tmp_path / "logs", *bad(tmp_path)))
    assert not [path for path in tmp_path.iterdir() if path.is_dir()]


# -----------------------------------------------------------------------------
# The other scripts' bad input (export_hf.py and sample.py: test_ecosystem.py; data/fineweb.py: test_data.py)


def test_plot_out_that_is_a_file_or_cannot_be_made_is_one_line(tmp_path):
    import plot
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"run_name": "run", "seed": 0, "lr": 1e-3, "window": 0,
                                                     "gate": "none", "batch_tokens": 512}))
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n{"step": 1, "val_loss": 4.0}\n')
    (tmp_path / "a_file").write_text("the user's")
    with pytest.raises(SystemExit, match=rf"^error: --out {tmp_path / 'a_file'} is a file, not a folder; pass a folder "
                                         r"for the figures$"):
        plot.main([str(run_dir), "--out", str(tmp_path / "a_file")])
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit, match=rf"^error: --out {tmp_path / 'a_file' / 'figures'}: cannot write the figures "
                                         r"there \(.*\); pass a folder you can write to$"):
        plot.main([str(run_dir), "--out", str(tmp_path / "a_file" / "figures")])
    assert (tmp_path / "a_file").read_text() == "the user's"
