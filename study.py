"""The compare and ablate studies: every arm x seed x learning rate, one GPU per run, then the table of finished runs.

    python3 study.py compare [--arms baseline,gated] [--seeds 0,1,2] [--lrs 1e-3,2e-3] [--log-dir logs] [FLAGS...]
    python3 study.py ablate  [...]         # by default every arm of ARMS, seed 0
    python3 study.py --flags gated         # an arm's attention flags (run.sh's single-run presets read them here)

FLAGS go on to every run's train_gpt.py. Each run trains on one GPU, NGPU of them at once: at this model size that
is faster than spreading every run over all GPUs. The GPUs ("slots") are the entries of CUDA_VISIBLE_DEVICES if it
is set (list one twice to train two runs on it at once; set but empty: NGPU runs at once on the CPU), else 0 ..
NGPU-1. A queue hands the next run to whichever slot frees first, so a slow run never holds the others back, and
a failed run is reported while the rest go on. SIGTERM or SIGINT stops the running runs after their step with a
checkpoint and starts no new one. The table is written in every case, from the runs that finished; the exit
status is 1 if any run failed, was stopped or was skipped.
"""
import collections
import dataclasses
import glob
import os
import re
import signal
import subprocess
import sys
import time

import compare

HERE = os.path.dirname(os.path.abspath(__file__))

# The arms: name, then its attention flags. The single-run presets of run.sh take theirs from here too.
ARMS = {
    "baseline": "--window 0 --gate none",
    "gated": "--window 256 --gate head",
    "window": "--window 256 --gate none",
    "gate": "--window 0 --gate head",
    "gated-64": "--window 64 --gate head",
    "gated-128": "--window 128 --gate head",
    "gated-512": "--window 512 --gate head",
    "mix": "--window 256 --gate head --mix-full true",
}
# Each study's default arms and seeds.
STUDIES = {"compare": ("baseline,gated", "0,1,2"), "ablate": (",".join(ARMS), "0")}
STUDY_OPTIONS = ("--arms", "--seeds", "--lrs", "--log-dir")
SET_PER_RUN = ("--run-name", "--seed", "--window", "--gate")
TRAINER = ["torchrun", "--standalone", "--nproc_per_node=1", os.path.join(HERE, "train_gpt.py")]
POLL_S = 0.1  # how often the queue looks for a finished run: a slot idles at most this long


# -----------------------------------------------------------------------------
# Parse


@dataclasses.dataclass
class Study:
    name: str
    arms: list
    seeds: list
    lrs: list  # [""] without --lrs: every run at the flags' learning rate (train_gpt.py's default)
    log_dir: str
    passed: list  # the flags for every run's train_gpt.py


def split_list(text):
    return [item for item in text.split(",") if item]


def parse_args(argv) -> Study:
    """The study's own options, read by hand because every other flag (known only to train_gpt.py) passes on."""
    name, argv = argv[0], argv[1:]
    arms, seeds = STUDIES[name]
    values, passed = {"--arms": arms, "--seeds": seeds, "--lrs": "", "--log-dir": "logs"}, []
    i = 0
    while i < len(argv):
        key, has_value, value = argv[i].partition("=")  # --seeds=0,1 as well as --seeds 0,1
        if key in SET_PER_RUN:
            raise ValueError(f"{name} sets {key} itself for each run: use --arms, --seeds and --lrs")
        if key not in STUDY_OPTIONS:
            passed.append(argv[i])
            i += 1
            continue
        if not has_value:
            if i + 1 == len(argv):
                raise ValueError(f"{key} needs a value")
            value, i = argv[i + 1], i + 1
        values[key] = value
        i += 1
    study = Study(name, split_list(values["--arms"]), split_list(values["--seeds"]),
                  split_list(values["--lrs"]) or [""], values["--log-dir"], passed)
    for arm in study.arms:
        if arm not in ARMS:
            raise ValueError(f"unknown arm '{arm}': use {', '.join(ARMS)}")
    return study


def parse_slots(environ) -> list:
    """The CUDA_VISIBLE_DEVICES value of each slot, NGPU of them; checked before anything is written."""
    if "NGPU" in environ:
        ngpu = environ["NGPU"]
        if not ngpu.isdigit() or int(ngpu) < 1:
            raise ValueError(f"NGPU={ngpu}: expected how many runs go at once, 1 or more")
        ngpu = int(ngpu)
    else:  # run.sh's default: every visible GPU, or one run on the CPU
        import torch  # only here: it takes seconds to import, and run.sh passes NGPU
        ngpu = max(torch.cuda.device_count(), 1)
    if "CUDA_VISIBLE_DEVICES" not in environ:
        return [str(i) for i in range(ngpu)]
    listed = split_list(environ["CUDA_VISIBLE_DEVICES"])
    if not listed:
        return [""] * ngpu
    if ngpu > len(listed):
        raise ValueError(f"NGPU={ngpu} runs at once, but CUDA_VISIBLE_DEVICES lists {len(listed)} GPU(s); "
                         f"list one for each")
    return listed[:ngpu]


# -----------------------------------------------------------------------------
# Plan runs


@dataclasses.dataclass
class Run:
    arm: str
    seed: str
    lr: str  # "" for the flags' learning rate

    def __str__(self):
        return f"{self.arm}, seed {self.seed}" + (f", lr {self.lr}" if self.lr else "")

    def output(self, out):
        return os.path.join(out, f"{self.arm}-seed{self.seed}" + (f"-lr{self.lr}" if self.lr else "") + ".out")

    def flags(self, out):
        return [*ARMS[self.arm].split(), "--run-name", self.arm, "--seed", self.seed,
                *(["--lr", self.lr] if self.lr else []), "--log-dir", out]


def plan_runs(study) -> list:
    """Learning rate, then seed, then arm: the arms of one seed finish close together, so a table made halfway
    through already compares them."""
    return [Run(arm, seed, lr) for lr in study.lrs for seed in study.seeds for arm in study.arms]


def make_study_dir(study) -> str:
    """LOG_DIR/NAME-<time>, new: two studies never share a directory."""
    out = os.path.join(study.log_dir, f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(study.log_dir, exist_ok=True)
    try:
        os.mkdir(out)
    except FileExistsError:
        raise FileExistsError(f"{out} exists; start the study again in a second") from None
    return out


def fetch_fineweb(passed):
    """The FineWeb shards the flags' defaults read, unless --train-files points elsewhere."""
    if any(flag == "--train-files" or flag.startswith("--train-files=") for flag in passed):
        return 0
    return subprocess.run([sys.executable, os.path.join(HERE, "data", "fineweb.py")]).returncode


# -----------------------------------------------------------------------------
# Queue


class StopSignals:
    """SIGTERM and SIGINT are only noted: the queue loop forwards them between polls, so a handler never runs in
    the middle of starting or reaping a run."""

    def __enter__(self):
        self.received = 0
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _note(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


@dataclasses.dataclass
class Running:
    run: Run
    process: subprocess.Popen
    stopped: bool = False  # sent SIGTERM by the driver


def start(run, number, total, slot, out, passed, trainer):
    """Launch one run on its slot, its stdout and stderr to its .out file. It gets a session of its own so that a
    Ctrl-C in the terminal reaches only the driver, which forwards one SIGTERM: a second signal would cut short
    torchrun's wait for its worker's checkpoint, and torchrun would exit while the worker still writes it."""
    output = run.output(out)
    print(f"run {number}/{total}: {run}, CUDA_VISIBLE_DEVICES={slot}; output in {output}", flush=True)
    with open(output, "w") as f:
        return subprocess.Popen([*trainer, *passed, *run.flags(out)], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": slot}, start_new_session=True)


def run_queue(runs, slots, out, passed, trainer=TRAINER) -> collections.Counter:
    """Every run, each on the first slot to free, polled from this one thread. Returns how many runs finished,
    failed, were stopped and were skipped."""
    outcome = collections.Counter()
    queued = collections.deque(enumerate(runs, 1))
    free = collections.deque(range(len(slots)))  # indices, as a GPU listed twice is two slots
    running = {}  # slot index -> Running
    with StopSignals() as stop:
        while True:
            for slot, job in list(running.items()):
                status = job.process.poll()
                if status is None:
                    continue
                del running[slot]
                free.append(slot)
                kind = "finished" if status == 0 else "stopped" if job.stopped else "failed"
                outcome[kind] += 1
                if kind != "finished":
                    report_run(job.run, kind, job.run.output(out))
            if stop.received:
                while queued:
                    print(f"skipped: {queued.popleft()[1]}", file=sys.stderr, flush=True)
                    outcome["skipped"] += 1
                for job in running.values():
                    if not job.stopped:
                        job.process.send_signal(signal.SIGTERM)
                        job.stopped = True
            while queued and free and not stop.received:
                number, run = queued.popleft()
                slot = free.popleft()
                try:
                    running[slot] = Running(run, start(run, number, len(runs), slots[slot], out, passed, trainer))
                except OSError as error:  # no torchrun, say: the run fails, the next one tries
                    free.appendleft(slot)
                    print(f"run {run} failed; it could not start: {error}", file=sys.stderr, flush=True)
                    outcome["failed"] += 1
            if not running:  # then nothing is queued either: a free slot would have taken it
                return outcome
            time.sleep(POLL_S)


# -----------------------------------------------------------------------------
# Report

ERROR_LINE = re.compile(r"^error: |^[A-Za-z.]*(Error|Exception)\b")  # the worker's own error; torchrun's follows
STOPPED_LINE = re.compile(r"^stopped by ")  # train_gpt.py's, followed by the command that resumes the run


def run_error(lines, kind="failed") -> list:
    """The lines that say why a run ended. Failed: its first error line and the 3 after it. Stopped: the line
    saying so and the resume command. Else (no such line) its last 5 lines."""
    pattern, n = (ERROR_LINE, 4) if kind == "failed" else (STOPPED_LINE, 2)
    for i, line in enumerate(lines):
        if pattern.search(line):
            return lines[i : i + n]
    return lines[-5:]


def report_run(run, kind, output):
    with open(output, errors="replace") as f:
        lines = f.read().splitlines()
    print(f"run {run} {kind}; from {output}:", *run_error(lines, kind), sep="\n", file=sys.stderr, flush=True)


def write_table(out) -> bool:
    """compare.py --paper's table of the runs that finished, printed and written to OUT/table.md; False if the
    runs could not be tabled (compare's error is printed)."""
    if not glob.glob(os.path.join(out, "*", "summary.json")):
        return True
    try:
        text = compare.table(compare.load_runs([out]), paper=True)
    except ValueError as error:
        print(f"error: table: {error}", file=sys.stderr)
        return False
    with open(os.path.join(out, "table.md"), "x") as f:
        f.write(text + "\n")
    print(text, flush=True)
    return True


def main(argv=None, trainer=TRAINER) -> int:
    """The exit status: 0 if every run finished, 1 if any failed, was stopped or skipped, 2 for bad arguments.
    trainer is the command each run's flags follow (tests substitute a small script)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--flags"]:
        if len(argv) == 2 and argv[1] in ARMS:
            print(ARMS[argv[1]])
            return 0
        print(f"--flags takes one arm: {', '.join(ARMS)}", file=sys.stderr)
        return 2
    if not argv or argv[0] not in STUDIES:
        print(f"usage: study.py {{{','.join(STUDIES)}}} [--arms A,B] [--seeds 0,1] [--lrs LR,LR] [--log-dir DIR] "
              f"[FLAGS...], or study.py --flags {{{','.join(ARMS)}}}", file=sys.stderr)
        return 2
    try:
        study = parse_args(argv)
        slots = parse_slots(os.environ)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    status = fetch_fineweb(study.passed)
    if status:
        return status
    try:
        out = make_study_dir(study)
    except FileExistsError as error:
        print(error, file=sys.stderr)
        return 1
    runs = plan_runs(study)
    outcome = run_queue(runs, slots, out, study.passed, trainer)
    tabled = write_table(out)
    if outcome["finished"] < len(runs) or not tabled:
        print(f"{study.name}: of {len(runs)} runs, {outcome['finished']} finished, {outcome['failed']} failed, "
              f"{outcome['stopped']} stopped and {outcome['skipped']} skipped (above); the finished ones are in "
              f"{out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
