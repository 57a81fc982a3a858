"""Several processes under torchrun on the CPU (gloo): a rank that fails or hangs ends the job, and two "nodes"
on this machine train as one job.

    python -m pytest -q test_distributed.py

Each test runs train_gpt.main() through a small script written into tmp_path, which changes one thing on one rank
(a failing or hanging data read) or records the weights each rank ends with.
"""
import contextlib
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import torch

from test_reliability import ENV
from test_train import HERE, tiny_run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def write_script(tmp_path, body):
    """tmp_path/launch.py: imports train_gpt as tg, then runs body, which calls tg.main()."""
    path = tmp_path / "launch.py"
    path.write_text(f"import os, sys, time\nsys.path.insert(0, {HERE!r})\nimport torch\nimport train_gpt as tg\n{body}")
    return str(path)


def on_rank_1s_third_batch(action):
    """A script body: rank 1 runs `action` instead of reading its third training batch (step 3 of a run with
    --val-every 0 and one micro-batch a step), after printing the time."""
    return f"""
if os.environ["RANK"] == "1":
    next_batch, calls = tg.DataLoader.next_batch, []

    def patched(self):
        calls.append(1)
        if len(calls) == 3:
            print(f"rank 1 at {{time.time()}}", flush=True)
            {action}
        return next_batch(self)

    tg.DataLoader.next_batch = patched
tg.main()
"""


def finish(*torchruns, timeout=300):
    """The torchrun processes' exit codes. Past timeout (a hang: the test fails), kills them and their workers, which
    torchrun starts in sessions of their own, so none outlives the test."""
    deadline = time.time() + timeout
    try:
        return [torchrun.wait(timeout=max(deadline - time.time(), 0)) for torchrun in torchruns]
    except subprocess.TimeoutExpired:
        for torchrun in torchruns:
            workers = []
            for path in glob.glob(f"/proc/{torchrun.pid}/task/*/children"):
                with open(path) as f:
                    workers += f.read().split()
            for worker in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(worker), signal.SIGKILL)
            torchrun.kill()
        raise


def run_two_ranks(tmp_path, body, *extra):
    """torchrun with 2 ranks on one node, one micro-batch of 256 tokens a step on each; returns (exit code, stdout
    and stderr, time of its exit)."""
    flags = tiny_run(tmp_path / "logs", "--steps", "6", "--val-every", "0", "--batch-tokens", "512",
                     "--micro-batch-tokens", "256", "--val-tokens", "512", *extra)
    with open(tmp_path / "output.txt", "w") as out:
        torchrun = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc-per-node=2", write_script(tmp_path, body),
                                     *flags], env=ENV, stdout=out, stderr=subprocess.STDOUT)
    (code,) = finish(torchrun)
    return code, (tmp_path / "output.txt").read_text(), time.time()


def rank_1_time(output):
    return float(re.search(r"^rank 1 at (\S+)$", output, re.M)[1])


def root_cause_rank(output):
    """The rank that torchrun's summary names as the first failure."""
    return int(re.search(r"Root Cause.*?rank\s*: (\d+)", output, re.S)[1])


def test_a_rank_that_fails_ends_the_job_with_its_error(tmp_path):
    """Rank 1 raises in step 3: torchrun exits non-zero within seconds, not after torchrun's 30 s grace period
    (rank 0, waiting for rank 1 in a collective, gets gloo's error as rank 1's connection closes), and its output
    carries rank 1's error, which its summary names as the root cause."""
    code, output, end = run_two_ranks(tmp_path, on_rank_1s_third_batch(
        'raise RuntimeError("rank 1 could not read its batch")'))
    assert code != 0, output[-3000:]
    assert "RuntimeError: rank 1 could not read its batch" in output and root_cause_rank(output) == 1, output[-3000:]
    assert "step:2/6 loss:" in output and "step:3/6" not in output
    assert end - rank_1_time(output) < 30, output[-3000:]


def test_a_rank_that_hangs_ends_the_job_after_the_timeout(tmp_path):
    """Rank 1 sleeps instead of reading its batch: rank 0 waits in its next collective for --dist-timeout seconds,
    then fails with gloo's timeout error, and torchrun ends the job. Rank 1 only notes torchrun's SIGTERM (that is
    StopSignals' job) and sleeps on, so torchrun kills it 30 s later (its grace period for the failure path,
    which torch 2.13's --shutdown-timeout does not change): the job ends within timeout + 30 s + exit time."""
    timeout = 5
    code, output, end = run_two_ranks(tmp_path, on_rank_1s_third_batch("time.sleep(3600)"),
                                      "--dist-timeout", str(timeout))
    assert code != 0, output[-3000:]
    assert re.search(r"\[rank0\]:.*Timed out waiting", output) and root_cause_rank(output) == 0, output[-3000:]
    # 15 s for rank 0's exit and torchrun's polling on a busy machine
    assert timeout <= end - rank_1_time(output) < timeout + 30 + 15, output[-3000:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RECORD_WEIGHTS = """
models = []


class RecordedGPT(tg.GPT):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        models.append(self)


tg.GPT = RecordedGPT
tg.main()
where = {k: int(os.environ[k]) for k in ("RANK", "GROUP_RANK", "LOCAL_RANK", "WORLD_SIZE")}
torch.save({"where": where, "model": models[0].state_dict()},
           os.path.join(os.path.dirname(__file__), f"rank{where['RANK']}.pt"))
"""


def test_two_nodes_train_one_model_and_only_rank_0_writes(tmp_path):
    """Two torchrun processes of one rank each, joined by a c10d rendezvous on localhost as two nodes would be: both
    exit 0, the ranks end with identical weights (those of rank 0's last checkpoint), there is one run directory,
    and the two outputs together hold each log line once."""
    script = write_script(tmp_path, RECORD_WEIGHTS)
    port, steps = free_port(), 3
    launch = [*TORCHRUN, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=two-nodes-{port}"]
    flags = tiny_run(tmp_path / "logs", "--steps", str(steps), "--warmup-steps", "1", "--cooldown-steps", "1",
                     "--val-every", "0", "--batch-tokens", "512", "--micro-batch-tokens", "256", "--val-tokens", "512")
    nodes = []
    for node in range(2):
        with open(tmp_path / f"node{node}.out", "w") as out, open(tmp_path / f"node{node}.err", "w") as err:
            nodes.append(subprocess.Popen([*launch, script, *flags], env=ENV, stdout=out, stderr=err))
    codes = finish(*nodes)
    outputs = [(tmp_path / f"node{node}.out").read_text() for node in range(2)]
    assert codes == [0, 0], [(tmp_path / f"node{node}.err").read_text()[-3000:] for node in range(2)]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["where"] for r in ranks] == [{"RANK": r, "GROUP_RANK": r, "LOCAL_RANK": 0, "WORLD_SIZE": 2}
                                           for r in range(2)]
    (run_name,) = os.listdir(tmp_path / "logs")
    run_dir = tmp_path / "logs" / run_name
    final = torch.load(run_dir / f"ckpt_step{steps:06d}.pt", weights_only=True)["model"]
    for name, weight in final.items():
        assert torch.equal(ranks[0]["model"][name], weight) and torch.equal(ranks[1]["model"][name], weight), name
    log = (run_dir / "log.txt").read_text()
    assert f"step:{steps}/{steps} val_loss:" in log
    assert sorted(outputs[0].splitlines() + outputs[1].splitlines()) == sorted(log.splitlines())
