"""The compare and ablate studies: every arm x seed x learning rate, one GPU per run, then the table of finished runs.

    python3 study.py compare [--arms baseline,gated] [--seeds 0,1,2] [--lrs 1e-3,2e-3] [--out DIR] [FLAGS...]
    python3 study.py ablate  [...]         # by default every arm of ARMS, seed 0
    python3 study.py --flags gated         # an arm's attention flags (run.sh's single-run presets read them here)

FLAGS go on to every run's train_gpt.py. Before any run starts, each run's config is resolved and checked by
train_gpt.py's own parse_args and check_config, so a bad flag or list stops the study with one line and exit
status 2. The study's folder is --out DIR, or without it a new LOG_DIR/NAME-<time> (--log-dir, default logs).
Each run has its own folder there, <arm>-lr<lr>-seed<seed>/, holding its run directory (train_gpt.py's
<arm>-<time>/) and its console output, train.out. The same command with the same --out picks a study up where
it stopped: a run whose folder holds a finished run (summary.json) of the config it would get is done and not
trained again; else one holding a checkpoint of an unfinished run of that config resumes from it; else it
starts afresh beside what is there. A finished run of another config in a run's folder is refused before
anything starts: runs are never overwritten or mixed. Configs are compared without NOT_RESULTS.

Each run trains on one GPU, NGPU of them at once: at this model size that is faster than spreading every run
over all GPUs. The GPUs ("slots") are the entries of CUDA_VISIBLE_DEVICES if it is set (list one twice to train
two runs on it at once; set but empty: NGPU runs at once on the CPU), else 0 .. NGPU-1, which must exist. A
queue hands the next run to whichever slot frees first, so a slow run never holds the others back, and a failed
run is reported while the rest go on. SIGTERM or SIGINT stops the running runs after their step with a
checkpoint and starts no new one. The table is written in every case, from every finished run in the folder;
the exit status is 1 if any run failed, was stopped or was skipped, and the report ends with the command that
trains the rest.
"""
import collections
import contextlib
import dataclasses
import glob
import io
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Optional

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
    # the gated arm's controls: is it the gate's dependence on the token, or only a scale per head, that helps?
    "const": "--window 256 --gate const",
    "scalar": "--window 256 --gate scalar",
}
# Each study's default arms and seeds.
STUDIES = {"compare": ("baseline,gated", "0,1,2"), "ablate": (",".join(ARMS), "0")}
STUDY_OPTIONS = ("--arms", "--seeds", "--lrs", "--out", "--log-dir")
SET_PER_RUN = ("--run-name", "--seed", "--window", "--gate", "--resume")
# train_gpt.py fields left out when a finished run's config.json is compared with the config a run would get: they
# say where a run is written and how it got there, and what they change (when evaluations, checkpoints, a
# collective's timeout happen) is outside the timed steps, the weights and the data order, so no number of its
# summary.json. A picked-up study may change them; every other field must match.
NOT_RESULTS = ("log_dir", "resume", "val_every", "save_every", "keep_checkpoints", "dist_timeout")
TRAINER = ["torchrun", "--standalone", "--nproc_per_node=1", os.path.join(HERE, "train_gpt.py")]
POLL_S = 0.1  # how often the queue looks for a finished run: a slot idles at most this long


# -----------------------------------------------------------------------------
# Parse


@dataclasses.dataclass
class Study:
    name: str
    arms: list
    seeds: list
    lrs: list  # [None] without --lrs: every run at the flags' learning rate (train_gpt.py's default)
    out: str  # the study's folder
    new: bool  # out is a new LOG_DIR/NAME-<time>, not --out
    passed: list  # the flags for every run's train_gpt.py


def split_list(text):
    return [item for item in text.split(",") if item]


def arm(text):
    if text not in ARMS:
        raise ValueError(f"unknown arm '{text}': use {', '.join(ARMS)}")
    return text


def seed(text):
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError(f"--seeds: {text!r} is not a seed; use whole numbers 0 or more, e.g. --seeds 0,1,2")
    return int(text)


def learning_rate(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--lrs: {text!r} is not a learning rate; use positive numbers, e.g. --lrs 1e-3,2e-3")
    return value


def parse_list(option, text, convert):
    values = [convert(item) for item in split_list(text)]
    if not values:
        raise ValueError(f"{option} {text!r}: the list is empty; give one or more, comma-separated")
    twice = [value for value in values if values.count(value) > 1]
    if twice:  # the same run twice would count its seed twice in the table
        raise ValueError(f"{option} {text}: lists {twice[0]} twice; give each once")
    return values


def parse_args(argv) -> Study:
    """The study's own options, read by hand because every other flag (known only to train_gpt.py) passes on."""
    name, argv = argv[0], argv[1:]
    arms, seeds = STUDIES[name]
    values, passed = {"--arms": arms, "--seeds": seeds}, []
    i = 0
    while i < len(argv):
        key, has_value, value = argv[i].partition("=")  # --seeds=0,1 as well as --seeds 0,1
        if key in SET_PER_RUN:
            raise ValueError(f"{name} sets {key} itself for each run: choose the runs with --arms, --seeds and "
                             f"--lrs (the same --out picks up unfinished ones)")
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
    if "--out" in values and "--log-dir" in values:
        raise ValueError("--out DIR is the study's folder and --log-dir DIR the parent of a new one: give one")
    if values.get("--out") == "":
        raise ValueError("--out needs a folder")
    if "--lrs" in values and any(flag == "--lr" or flag.startswith("--lr=") for flag in passed):
        raise ValueError("--lr and --lrs both set the learning rate: give one")
    out = values.get("--out") or os.path.join(values.get("--log-dir", "logs"),
                                              f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return Study(name, parse_list("--arms", values["--arms"], arm), parse_list("--seeds", values["--seeds"], seed),
                 parse_list("--lrs", values["--lrs"], learning_rate) if "--lrs" in values else [None], out,
                 "--out" not in values, passed)


def parse_slots(environ, gpu_count=None) -> list:
    """The CUDA_VISIBLE_DEVICES value of each slot, NGPU of them; checked before anything is written. gpu_count:
    the GPUs torch sees here (by default torch.cuda.device_count(), asked only where it is needed)."""
    if gpu_count is None and ("NGPU" not in environ or "CUDA_VISIBLE_DEVICES" not in environ):
        import torch  # only here: it takes seconds to import, and --flags needs none
        gpu_count = torch.cuda.device_count()
    if "NGPU" in environ:
        ngpu = environ["NGPU"]
        if not ngpu.isdigit() or int(ngpu) < 1:
            raise ValueError(f"NGPU={ngpu}: expected how many runs go at once, 1 or more")
        ngpu = int(ngpu)
    else:  # run.sh's default: every visible GPU, or one run on the CPU
        ngpu = max(gpu_count, 1)
    if "CUDA_VISIBLE_DEVICES" not in environ:
        if gpu_count == 0 and ngpu > 1:
            raise ValueError(f"NGPU={ngpu}, but torch finds no GPU here; to train {ngpu} runs at once on the CPU, "
                             f"set CUDA_VISIBLE_DEVICES= (empty)")
        if ngpu > max(gpu_count, 1):
            raise ValueError(f"NGPU={ngpu} runs at once, but torch.cuda.device_count() finds {gpu_count} GPU(s); "
                             f"set NGPU={gpu_count} or less, or list GPUs in CUDA_VISIBLE_DEVICES (one listed twice "
                             f"trains two runs on it)")
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
    seed: int
    lr: Optional[float]  # None for the flags' learning rate
    config: object = None  # train_gpt.Hyperparameters, as train_gpt.py will resolve this run's flags
    folder: str = ""  # its place in the study: STUDY/<arm>-lr<lr>-seed<seed>
    done: str = ""  # a finished run directory of this config in folder: nothing to train
    resume: str = ""  # else the checkpoint it resumes from, if any

    def __str__(self):
        return f"{self.arm}, seed {self.seed}" + (f", lr {self.lr:g}" if self.lr is not None else "")

    @property
    def output(self):
        return os.path.join(self.folder, "train.out")

    def flags(self):
        """The flags study.py sets for this run, after the study's own."""
        return [*ARMS[self.arm].split(), "--run-name", self.arm, "--seed", str(self.seed),
                *(["--lr", repr(self.lr)] if self.lr is not None else [])]


def resolve_config(flags):
    """train_gpt.py's config for these flags, checked as train_gpt.py checks it before training on one GPU; its
    refusal as a one-line ValueError."""
    import train_gpt  # here, not at the top: it imports torch (seconds), which --flags needs not
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            config = train_gpt.parse_args(flags)
    except SystemExit:  # argparse printed its usage, then "PROG: error: MESSAGE"
        message = printed.getvalue().strip().splitlines()[-1].partition("error: ")[2]
        raise ValueError(f"train_gpt.py refuses the flags: {message}") from None
    try:
        train_gpt.check_config(config, 1)
    except ValueError as error:  # "bad configuration:" and a problem a line
        first, *problems = str(error).splitlines()
        raise ValueError(" ".join([first, "; ".join(problem.strip() for problem in problems)])) from None
    return config


def plan_runs(study) -> list:
    """Learning rate, then seed, then arm: the arms of one seed finish close together, so a table made halfway
    through already compares them. Each run's config is resolved here, before any run starts."""
    runs = [Run(arm, seed, lr) for lr in study.lrs for seed in study.seeds for arm in study.arms]
    for run in runs:
        try:
            run.config = resolve_config([*study.passed, *run.flags()])
        except ValueError as error:
            raise ValueError(f"run {run}: {error}") from None
        # repr: the shortest text that reads back as this float, so two learning rates never share a folder
        run.folder = os.path.join(study.out, f"{run.arm}-lr{run.config.lr!r}-seed{run.seed}")
    return runs


# -----------------------------------------------------------------------------
# Pick up: what a run's folder already holds


def config_differences(saved, config) -> list:
    """'--flag saved -> config' for each field outside NOT_RESULTS where a run's config.json differs from config.
    A field it lacks (added to train_gpt.py after the run) counts as the field's default, as a new flag's default
    keeps the old behaviour."""
    import train_gpt
    return [f"{train_gpt.flag(f.name)} {saved.get(f.name, f.default)!r} -> {getattr(config, f.name)!r}"
            for f in dataclasses.fields(config)
            if f.name not in NOT_RESULTS and saved.get(f.name, f.default) != getattr(config, f.name)]


def find_earlier(run):
    """Sets run.done to a finished run of run.config in run.folder, else run.resume to the newest checkpoint of its
    unfinished runs of that config (a killed or stopped run). A finished run of another config is a ValueError
    naming it and the flags that differ; unfinished runs of another config stay where they are, untouched."""
    import train_gpt
    checkpoints = []
    for run_dir in sorted(os.scandir(run.folder) if os.path.isdir(run.folder) else [], key=lambda e: e.name):
        if not run_dir.is_dir():
            continue
        finished = os.path.exists(os.path.join(run_dir.path, "summary.json"))
        try:
            differences = config_differences(compare.read_json(os.path.join(run_dir.path, "config.json")), run.config)
        except (OSError, ValueError):
            differences = None
        if finished and differences != []:
            found = ("no readable config.json" if differences is None else
                     "other flags (its -> this study's): " + ", ".join(differences))
            raise ValueError(f"{run_dir.path} is a finished run with {found}; the study's {run} would train "
                             f"beside it: pass the flags it ran with, move it out, or choose another --out")
        if finished:
            run.done = run_dir.path
        elif differences == []:
            checkpoints += train_gpt.run_checkpoints(run_dir.path)
    if checkpoints and not run.done:  # the furthest along, by the step in its name
        run.resume = max(checkpoints, key=lambda path: int(train_gpt.CHECKPOINT_NAME.fullmatch(
            os.path.basename(path))[1]))


def make_study_dir(study):
    """The study's folder: --out, made if need be, or LOG_DIR/NAME-<time>, new, so two studies never share it."""
    if not study.new:
        os.makedirs(study.out, exist_ok=True)
        return
    os.makedirs(os.path.dirname(study.out) or ".", exist_ok=True)
    try:
        os.mkdir(study.out)
    except FileExistsError:
        raise FileExistsError(f"{study.out} exists; start the study again in a second") from None


def pickup_command(study) -> str:
    """The command that trains what this study has not finished: the same study, with its folder as --out."""
    lrs = ["--lrs", ",".join(map(repr, study.lrs))] if study.lrs != [None] else []
    return shlex.join(["python3", os.path.relpath(__file__), study.name, "--arms", ",".join(study.arms),
                       "--seeds", ",".join(map(str, study.seeds)), *lrs, "--out", study.out, *study.passed])


def fetch_fineweb(passed):
    """The FineWeb shards the flags' defaults read, unless --train-files points elsewhere."""
    if any(flag == "--train-files" or flag.startswith("--train-files=") for flag in passed):
        return 0
    return subprocess.run([sys.executable, os.path.join(HERE, "data", "fineweb.py")]).returncode


# -----------------------------------------------------------------------------
# Queue


@dataclasses.dataclass
class Running:
    run: Run
    process: subprocess.Popen
    since: int  # where this attempt's output starts in run.output, after any earlier attempt's
    stopped: bool = False  # sent SIGTERM by the driver


def start(run, number, total, slot, passed, trainer) -> Running:
    """Launch one run on its slot, its stdout and stderr appended to its train.out under a line giving its command.
    It gets a session of its own so that a Ctrl-C in the terminal reaches only the driver, which forwards one
    SIGTERM: a second signal would cut short torchrun's wait for its worker's checkpoint, and torchrun would exit
    while the worker still writes it."""
    os.makedirs(run.folder, exist_ok=True)
    resume = ["--resume", run.resume] if run.resume else []
    command = [*trainer, *passed, *run.flags(), "--log-dir", run.folder, *resume]
    resuming = f", resuming {run.resume}" if run.resume else ""
    print(f"run {number}/{total}: {run}{resuming}, CUDA_VISIBLE_DEVICES={slot}; output in {run.output}", flush=True)
    with open(run.output, "ab") as f:
        f.write(f"study.py {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n".encode())
        f.flush()
        since = f.tell()  # before the run starts: it shares this file's offset
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT,
                                   env={**os.environ, "CUDA_VISIBLE_DEVICES": slot}, start_new_session=True)
    return Running(run, process, since)


def run_queue(runs, slots, passed, trainer=TRAINER) -> collections.Counter:
    """Every run, each on the first slot to free, polled from this one thread. Returns how many runs finished,
    failed, were stopped and were skipped."""
    # train_gpt.py's StopSignals only notes a signal, as the queue needs: this loop forwards it between polls, so a
    # handler never runs in the middle of starting or reaping a run; train_gpt is imported by now (plan_runs)
    import train_gpt
    outcome = collections.Counter()
    queued = collections.deque(enumerate(runs, 1))
    free = collections.deque(range(len(slots)))  # indices, as a GPU listed twice is two slots
    running = {}  # slot index -> Running
    stop = train_gpt.StopSignals()
    try:
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
                    report_run(job, kind)
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
                    running[slot] = start(run, number, len(runs), slots[slot], passed, trainer)
                except OSError as error:  # no torchrun, say: the run fails, the next one tries
                    free.appendleft(slot)
                    print(f"run {run} failed; it could not start: {error}", file=sys.stderr, flush=True)
                    outcome["failed"] += 1
            if not running:  # then nothing is queued either: a free slot would have taken it
                return outcome
            time.sleep(POLL_S)
    finally:
        stop.restore()


# -----------------------------------------------------------------------------
# Report

# The worker's own error: train_gpt.py's "error: ..." line, or an exception's "Type: message" line, which torchrun's
# workers prefix with "[rank0]: " once the process group is up
ERROR_LINE = re.compile(r"^(\[rank\d+\]: ?)?(error: |[A-Za-z_.]*(Error|Exception)\b)")
# What torchrun prints after a worker fails: its log lines ("E1203 09:15:12.579000 5101 .../api.py:1002] failed
# (exitcode: 1) ...") and its own traceback, which ends in ChildFailedError
LAUNCHER_LINE = re.compile(r"^[EWI]\d{4} |^Traceback |ChildFailedError")
STOPPED_LINE = re.compile(r"^stopped by ")  # train_gpt.py's, followed by the command that resumes the run


def run_error(lines, kind="failed") -> list:
    """The lines that say why a run ended. Failed: its last error line that is not torchrun's, and the lines of the
    same message after it (up to 3, until torchrun's). Stopped: the line saying so and the resume command. Else
    (no such line) its last 5 lines."""
    if kind == "failed":
        errors = [i for i, line in enumerate(lines) if ERROR_LINE.search(line) and not LAUNCHER_LINE.search(line)]
        if errors:
            end = errors[-1] + 1
            while end < min(len(lines), errors[-1] + 4) and not LAUNCHER_LINE.search(lines[end]):
                end += 1
            return lines[errors[-1] : end]
    else:
        for i, line in enumerate(lines):
            if STOPPED_LINE.search(line):
                return lines[i : i + 2]
    return lines[-5:]


def report_run(job, kind):
    """A run that failed or stopped, with run_error's lines of this attempt's output."""
    with open(job.run.output, "rb") as f:
        f.seek(job.since)
        lines = f.read().decode(errors="replace").splitlines()
    print(f"run {job.run} {kind}; from {job.run.output}:", *run_error(lines, kind), sep="\n", file=sys.stderr,
          flush=True)


def write_table(out) -> bool:
    """compare.py --paper's table of every finished run in the study's folder, printed and written to OUT/table.md
    (replacing an earlier pass's, from fewer runs); False if the runs could not be tabled (compare's error is
    printed)."""
    if not glob.glob(os.path.join(out, "**", "summary.json"), recursive=True):
        return True
    try:
        text = compare.table(compare.load_runs([out]), paper=True)
    except ValueError as error:
        print(f"error: table: {error}", file=sys.stderr)
        return False
    path = os.path.join(out, "table.md")
    replaced = os.path.exists(path)
    with open(path, "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    if replaced:
        print(f"{path}: replaced by the table above", flush=True)
    return True


def main(argv=None, trainer=TRAINER) -> int:
    """The exit status: 0 if every run finished, 1 if any failed, was stopped or skipped, 2 for bad arguments or a
    folder holding other runs. trainer is the command each run's flags follow (tests substitute a small script)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--flags"]:
        if len(argv) == 2 and argv[1] in ARMS:
            print(ARMS[argv[1]])
            return 0
        print(f"--flags takes one arm: {', '.join(ARMS)}", file=sys.stderr)
        return 2
    if "-h" in argv or "--help" in argv:  # before train_gpt.py's parser would take it as one of the FLAGS
        print(__doc__)
        return 0
    if not argv or argv[0] not in STUDIES:
        print(f"usage: study.py {{{','.join(STUDIES)}}} [--arms A,B] [--seeds 0,1] [--lrs LR,LR] [--out DIR | "
              f"--log-dir DIR] [FLAGS...], or study.py --flags {{{','.join(ARMS)}}}", file=sys.stderr)
        return 2
    try:
        study = parse_args(argv)
        slots = parse_slots(os.environ)
        runs = plan_runs(study)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    clashes = []
    for run in runs:
        try:
            find_earlier(run)
        except ValueError as error:
            clashes.append(f"error: {error}")
    if clashes:
        print(*clashes, sep="\n", file=sys.stderr)
        return 2
    done = [run for run in runs if run.done]
    print(f"{study.name}: {len(runs)} runs in {study.out}" + ("; done already, so not trained again:" if done else ""),
          *(f"  {run}: {run.done}" for run in done), sep="\n", flush=True)
    todo = [run for run in runs if not run.done]
    if todo:
        status = fetch_fineweb(study.passed)
        if status:
            return status
    try:
        make_study_dir(study)
    except FileExistsError as error:
        print(error, file=sys.stderr)
        return 1
    outcome = run_queue(todo, slots, study.passed, trainer)
    tabled = write_table(study.out)
    if len(done) + outcome["finished"] < len(runs) or not tabled:
        print(f"{study.name}: of {len(runs)} runs, {len(done)} were done already, {outcome['finished']} finished, "
              f"{outcome['failed']} failed, {outcome['stopped']} stopped and {outcome['skipped']} skipped (above); the "
              f"finished ones are in {study.out}. To train the rest (stopped runs resume from their checkpoints):\n"
              f"{pickup_command(study)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
