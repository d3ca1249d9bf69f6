#!/usr/bin/env python3
"""The tiny DiceHuBERT pipeline after the corpus: labels, teachers, students, probes.

Every stage is one command of this project (``dicehubert-labels``, ``fairseq-hydra-train``,
``dicehubert-probe``), run from the repository root with one CPU thread, its output in
``WORKDIR/logs/{job}.log``.  The jobs form a graph (a student needs its labels, a probe its
model); up to ``--jobs`` of them run at once, so the two cores of a small machine both work
(one thread per process: small models scale badly across threads).

Resumable: a finished job leaves ``WORKDIR/.done/{job}.json`` (its command, wall and CPU
seconds); it is skipped when that file names the same command and nothing it depends on ran
again.  A training job that was interrupted resumes from its ``checkpoint_last.pt`` (same
command); one whose command changed starts over in a clean directory.

Usage (run.sh calls it; every option has an environment default, see run.sh)::

    python examples/tiny/pipeline.py WORKDIR [--teacher-updates N] [--student-updates N] ...
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)

#: the students of the paper's table, in the order of the report; name -> config row + overlays
STUDENTS = {
    "dicehubert_narrow": ["--config-name", "dicehubert_narrow", "model=tiny_narrow"],
    "dicehubert_narrow_soft": ["--config-name", "dicehubert_narrow_soft", "model=tiny_narrow"],
    "dicehubert_shallow": ["--config-name", "dicehubert_shallow_l6", "model=tiny_shallow"],
    "feat_narrow": ["--config-name", "feat_narrow", "model=tiny_narrow", "feat=tiny_layer_to_layer"],
    "scratch_narrow": ["--config-name", "scratch_narrow", "model=tiny_narrow"],
}
TEACHERS = ("teacher_n1", "teacher_n2")
MODELS = TEACHERS + tuple(STUDENTS)


@dataclass
class Job:
    """One command of the pipeline."""

    name: str
    cmd: List[str]
    deps: List[str] = field(default_factory=list)
    outdir: Optional[str] = None  # wiped when the command changes (training runs)
    kind: str = "labels"  # labels | train | probe (for the progress line)
    updates: int = 0

    @property
    def key(self) -> str:
        return shlex.join(resolve(self.cmd))


#: a command argument ``BEST_LAYER_PREFIX + path``: the best transformer layer on valid that
#: ``probe_layers.py`` wrote to ``path`` (``--layer-it1 auto``), filled in when the job starts
BEST_LAYER_PREFIX = "@best_layer:"


def resolve(cmd: List[str]) -> List[str]:
    """``cmd`` with every ``@best_layer:PATH`` replaced by the layer that ``PATH`` names (left as it
    is while ``PATH`` does not exist yet: the job that writes it has not run)."""
    out = []
    for arg in cmd:
        if arg.startswith(BEST_LAYER_PREFIX) and os.path.exists(arg[len(BEST_LAYER_PREFIX):]):
            with open(arg[len(BEST_LAYER_PREFIX):]) as f:
                arg = str(json.load(f)["best_transformer_layer"])
        out.append(arg)
    return out


def build_jobs(a: argparse.Namespace) -> List[Job]:
    w = a.workdir
    lab = lambda *p: os.path.join(w, "labels", *p)  # noqa: E731
    km = lambda name: os.path.join(w, "km", f"{name}.joblib")  # noqa: E731
    ckpt = lambda name: os.path.join(w, "models", name, "checkpoints", "checkpoint_last.pt")  # noqa: E731
    labels_cli = [os.path.join(BIN, "dicehubert-labels")]
    common_lab = ["--manifest-dir", w, "--split", "train", "--no-progress"]
    fit_opts = ["--seed", str(a.seed), "--n-init", str(a.n_init)]
    train_cli = [os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", "config/"]
    extra = shlex.split(a.extra_overrides)
    jobs: List[Job] = []
    layer_json = lambda name: os.path.join(w, "probe", f"{name}.layers.json")  # noqa: E731

    def layer_of(name, setting):
        """``setting`` (a layer) or, for ``auto``, the best layer of ``name`` on valid, and the jobs that needs."""
        if setting == "auto":
            return BEST_LAYER_PREFIX + layer_json(name), [f"probe_{name}.layers"]
        return str(setting), []

    probe_opts = [] if not a.probe_train_utterances else ["--max-train-utterances", str(a.probe_train_utterances)]

    def layer_probe(name):
        jobs.append(Job(f"probe_{name}.layers", [sys.executable, os.path.join(HERE, "probe_layers.py"),
                                                 "--checkpoint", ckpt(name), "--data", w, "--out", layer_json(name),
                                                 "--seed", str(a.seed), "--epochs", str(a.probe_epochs)] + probe_opts,
                        [name], kind="probe"))

    def train(name, row, deps, updates, seed, label_dir=None, more=()):
        run_dir = os.path.join(w, "models", name)
        cmd = train_cli + row + ["common.user_dir=dicehubert_fairseq", f"task.data={w}", "run=tiny",
                                 f"optimization.max_update={updates}", f"common.seed={seed}",
                                 f"hydra.run.dir={run_dir}"]
        if label_dir is not None:
            cmd.append(f"task.label_dir={label_dir}")
        jobs.append(Job(name, cmd + list(more) + extra, deps, outdir=run_dir, kind="train", updates=updates))

    # MFCC k-means labels (HuBERT iteration 1 targets; also the scratch student's)
    jobs.append(Job("km_mfcc", labels_cli + ["fit"] + common_lab + [
        "--mfcc", "--n-clusters", str(a.k_mfcc), "--out", km("mfcc")] + fit_opts))
    jobs.append(Job("labels_mfcc", labels_cli + ["dump"] + common_lab + [
        "--mfcc", "--km", km("mfcc"), "--label-dir", lab("mfcc"), "--name", "mfcc"], ["km_mfcc"]))
    # teacher iteration 1 on MFCC labels, fairseq's HuBERT objective (config/tiny_teacher.yaml)
    train("teacher_n1", ["--config-name", "tiny_teacher", "+data=mfcc"], ["labels_mfcc"], a.teacher_updates,
          a.seed, lab("mfcc"))
    # iteration-1 layer k-means -> teacher iteration 2 (layer "auto": the best on valid, probed alone)
    if "teacher_n1" in a.layer_probes:
        layer_probe("teacher_n1")
    layer1, need1 = layer_of("teacher_n1", a.layer_it1)
    jobs.append(Job("km_it1", labels_cli + ["fit"] + common_lab + [
        "--checkpoint", ckpt("teacher_n1"), "--layer", layer1, "--n-clusters", str(a.k),
        "--out", km("it1")] + fit_opts, ["teacher_n1"] + need1))
    jobs.append(Job("labels_it1", labels_cli + ["dump"] + common_lab + [
        "--checkpoint", ckpt("teacher_n1"), "--layer", layer1, "--km", km("it1"),
        "--label-dir", lab("it1"), "--name", "it1"], ["km_it1"]))
    train("teacher_n2", ["--config-name", "tiny_teacher", "task.labels=[it1]", "task.label_rate=50"],
          ["labels_it1"], a.teacher_updates2, a.seed, lab("it1"))
    # the students' targets: k-means of one teacher-N2 layer, hard + soft (stream name "km")
    if "teacher_n2" in a.layer_probes:
        layer_probe("teacher_n2")
    layer2, need2 = layer_of("teacher_n2", a.layer_it2)
    jobs.append(Job("km_it2", labels_cli + ["fit"] + common_lab + [
        "--checkpoint", ckpt("teacher_n2"), "--layer", layer2, "--n-clusters", str(a.k),
        "--out", km("it2")] + fit_opts, ["teacher_n2"] + need2))
    jobs.append(Job("labels_it2", labels_cli + ["dump"] + common_lab + [
        "--checkpoint", ckpt("teacher_n2"), "--layer", layer2, "--km", km("it2"),
        "--label-dir", lab("it2"), "--name", "km", "--soft", "--temperature", str(a.temperature),
        "--top-k", str(min(a.k, 10))],
        ["km_it2"]))
    # students, same update budget each
    # list order is start priority: the longest (feat_narrow) first, then the seeds of the
    # from-scratch student, which only need MFCC labels and fill the second core while the
    # teachers train
    order = ["feat_narrow", "scratch_narrow", "dicehubert_narrow", "dicehubert_narrow_soft", "dicehubert_shallow"]
    for r in range(a.replicas):
        suffix = "" if r == 0 else f".s{r + 1}"
        seed = a.seed + r
        for name in sorted(order, key=lambda n: n != "scratch_narrow") if r else order:
            row = STUDENTS[name]
            if r and name not in a.replicate:
                continue
            if name == "scratch_narrow":
                train(name + suffix, row, ["labels_mfcc"], a.student_updates, seed, lab("mfcc"))
            elif name == "feat_narrow":
                train(name + suffix, row, ["teacher_n2"], a.student_updates, seed,
                      more=[f"criterion.teacher_checkpoint={ckpt('teacher_n2')}"])
            else:
                train(name + suffix, row, ["labels_it2"], a.student_updates, seed, lab("it2"))
    # probes of every trained model (the teachers' hidden states are also probed one at a time,
    # above: which layer carries the phones)
    for job in [j for j in jobs if j.kind == "train"]:
        jobs.append(Job(f"probe_{job.name}", [os.path.join(BIN, "dicehubert-probe"), "--checkpoint", ckpt(job.name),
                                             "--data", w, "--json", os.path.join(w, "probe", f"{job.name}.json"),
                                             "--seed", str(a.seed), "--threads", "1", "--epochs",
                                             str(a.probe_epochs), "-q"] + probe_opts,
                        [job.name], kind="probe"))
    return jobs


# ---------------------------------------------------------------------------------------------


def fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def job_group(job: str) -> str:
    """The report's kind of a job name: labels, teachers, students or probes."""
    base = job.split(".")[0]
    if job.startswith("probe_"):
        return "probes"
    return "teachers" if base in TEACHERS else "students" if base in STUDENTS else "labels"


def timing(workdir: str) -> Dict[str, Dict]:
    """Wall and CPU seconds of the finished jobs of ``workdir`` (its ``.done`` markers), per
    :func:`job_group`; ``span_seconds``: first start to last end (jobs run in parallel)."""
    kinds: Dict[str, Dict] = {}
    done = os.path.join(workdir, ".done")
    for f in sorted(os.listdir(done)) if os.path.isdir(done) else []:
        if not f.endswith(".done.json"):
            continue
        with open(os.path.join(done, f)) as fh:
            info = json.load(fh)
        k = kinds.setdefault(job_group(f[: -len(".done.json")]),
                             {"jobs": 0, "wall_seconds": 0.0, "cpu_seconds": 0.0, "start": None, "end": None})
        k["jobs"] += 1
        k["wall_seconds"] += info["seconds"]
        k["cpu_seconds"] += info["cpu_seconds"]
        if "start" in info and "end" in info:
            k["start"] = info["start"] if k["start"] is None else min(k["start"], info["start"])
            k["end"] = info["end"] if k["end"] is None else max(k["end"], info["end"])
    order = ("labels", "teachers", "students", "probes")
    out = {}
    for kind in sorted(kinds, key=order.index):
        k = kinds[kind]
        out[kind] = {"jobs": k["jobs"], "wall_seconds": round(k["wall_seconds"], 1),
                     "cpu_seconds": round(k["cpu_seconds"], 1),
                     "span_seconds": None if k["start"] is None else round(k["end"] - k["start"], 1)}
    return out


class Runner:
    """Runs jobs in dependency order, at most ``slots`` at a time, skipping finished ones."""

    def __init__(self, workdir: str, jobs: List[Job], slots: int, status_every: float = 30.0):
        self.workdir = workdir
        self.jobs = {j.name: j for j in jobs}
        self.order = [j.name for j in jobs]
        self.slots = max(1, slots)
        self.status_every = status_every
        self.done_dir = os.path.join(workdir, ".done")
        self.log_dir = os.path.join(workdir, "logs")
        os.makedirs(self.done_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        self.rerun: set = set()
        self.started_at: Dict[str, float] = {}
        self.running: Dict[str, tuple] = {}
        self.t0 = time.time()

    def marker(self, name: str, what: str = "done") -> str:
        return os.path.join(self.done_dir, f"{name}.{what}.json")

    def up_to_date(self, job: Job) -> bool:
        try:
            with open(self.marker(job.name)) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return False
        return info.get("command") == job.key and not any(d in self.rerun for d in job.deps)

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = "1"
        env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        return env

    def start(self, job: Job) -> None:
        started = self.marker(job.name, "started")
        if job.outdir:
            try:
                with open(started) as f:
                    same = json.load(f).get("command") == job.key
            except (OSError, ValueError):
                same = False
            if not same or any(d in self.rerun for d in job.deps):
                shutil.rmtree(job.outdir, ignore_errors=True)  # another command's run: start clean
        with open(started, "w") as f:
            json.dump({"command": job.key}, f)
        log = open(os.path.join(self.log_dir, f"{job.name}.log"), "a")
        log.write(f"\n$ {job.key}\n")
        log.flush()
        proc = subprocess.Popen(resolve(job.cmd), cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.running[job.name] = (proc, log, time.time())
        self.started_at[job.name] = time.time()
        print(f"[{fmt(time.time() - self.t0):>6}] start  {job.name}", flush=True)

    def progress(self, job: Job) -> str:
        if job.kind != "train":
            return job.name
        path = os.path.join(self.log_dir, f"{job.name}.log")
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 8000))
                tail = f.read().decode("utf-8", "replace")
        except OSError:
            return job.name
        found = re.findall(r"num_updates[= ](\d+)", tail)
        return f"{job.name} {found[-1] if found else 0}/{job.updates} updates"

    def finish(self, name: str, status: int, rusage) -> None:
        proc, log, t_start = self.running.pop(name)
        log.close()
        wall = time.time() - t_start
        cpu = rusage.ru_utime + rusage.ru_stime
        if status != 0:
            self.fail(name, status)
        with open(self.marker(name), "w") as f:
            json.dump({"command": self.jobs[name].key, "seconds": wall, "cpu_seconds": cpu,
                       "start": self.started_at[name], "end": time.time()}, f)
        self.rerun.add(name)
        print(f"[{fmt(time.time() - self.t0):>6}] done   {name} in {fmt(wall)} (cpu {fmt(cpu)})", flush=True)

    def fail(self, name: str, status: int) -> None:
        log_path = os.path.join(self.log_dir, f"{name}.log")
        print(f"\nFAILED: {name} (exit status {status}); the end of {log_path}:", file=sys.stderr)
        with open(log_path, errors="replace") as f:
            print("".join(f.readlines()[-30:]), file=sys.stderr)
        self.stop_all()
        sys.exit(1)

    def stop_all(self) -> None:
        for proc, log, _ in self.running.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the job's own session (started by us)
            except ProcessLookupError:
                pass
        for proc, log, _ in self.running.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
        self.running.clear()

    def run(self) -> None:
        pending = list(self.order)
        finished = set()
        for name in list(pending):  # skip what is done, in dependency order
            job = self.jobs[name]
            if all(d in finished for d in job.deps) and self.up_to_date(job):
                print(f"[{fmt(0):>6}] skip   {name} (done: {os.path.relpath(self.marker(name), self.workdir)})")
                finished.add(name)
                pending.remove(name)
        last_status = time.time()
        while pending or self.running:
            for name in list(pending):
                if len(self.running) >= self.slots:
                    break
                if all(d in finished for d in self.jobs[name].deps):
                    pending.remove(name)
                    self.start(self.jobs[name])
            try:
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                time.sleep(0.5)
                if time.time() - last_status >= self.status_every and self.running:
                    last_status = time.time()
                    now = ", ".join(self.progress(self.jobs[n]) for n in self.running)
                    print(f"[{fmt(time.time() - self.t0):>6}] ...    {now}", flush=True)
                continue
            name = next((n for n, (p, _, _) in self.running.items() if p.pid == pid), None)
            if name is None:
                continue
            self.running[name][0].returncode = os.waitstatus_to_exitcode(status)
            self.finish(name, os.waitstatus_to_exitcode(status), rusage)
            finished.add(name)


def layer_setting(text: str):
    """argparse type: a 1-based layer or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer (1, 2, ...) or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a layer >= 1 or 'auto', got {text}")
    return value


def main(argv=None) -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir")
    p.add_argument("--teacher-updates", type=int, default=int(env("TINY_TEACHER_UPDATES", 600)),
                   help="updates of teacher iteration 1")
    p.add_argument("--teacher-updates2", type=int, default=None,
                   help="updates of teacher iteration 2 (default: --teacher-updates)")
    p.add_argument("--student-updates", type=int, default=int(env("TINY_STUDENT_UPDATES", 400)))
    p.add_argument("--k-mfcc", type=int, default=int(env("TINY_K_MFCC", 100)), help="K of the MFCC k-means")
    p.add_argument("--k", type=int, default=int(env("TINY_K", 50)), help="K of the teacher-layer k-means")
    p.add_argument("--layer-it1", type=layer_setting, default=layer_setting(env("TINY_LAYER_IT1", "2")),
                   help="teacher_n1 layer clustered for teacher_n2's targets; 'auto': its best layer on valid, "
                        "each layer probed alone (needs teacher_n1 in --layer-probes)")
    p.add_argument("--layer-it2", type=layer_setting, default=layer_setting(env("TINY_LAYER_IT2", "1")),
                   help="teacher_n2 layer clustered for the students' targets; 'auto' as --layer-it1")
    p.add_argument("--n-init", type=int, default=int(env("TINY_N_INIT", 3)),
                   help="k-means++ trials of every fit (fairseq's learn_kmeans: 20; 3 is within 1%% of its "
                        "objective here, 8 s faster per fit)")
    p.add_argument("--temperature", type=float, default=float(env("TINY_TEMPERATURE", 10)),
                   help="tau of the soft labels")
    p.add_argument("--seed", type=int, default=int(env("TINY_SEED", 1)))
    p.add_argument("--replicas", type=int, default=int(env("TINY_REPLICAS", 3)),
                   help="seeds of the --replicate students (seed, seed+1, ...)")
    p.add_argument("--replicate", default=env("TINY_REPLICATE", ",".join(STUDENTS)),
                   help="comma-separated students trained with several seeds (default: all five)")
    p.add_argument("--layer-probes", default=env("TINY_LAYER_PROBES", "teacher_n2"),
                   help="comma-separated teachers whose hidden states are also probed one at a time "
                        "(examples/tiny/probe_layers.py); empty: none")
    p.add_argument("--probe-epochs", type=int, default=int(env("TINY_PROBE_EPOCHS", 60)))
    p.add_argument("--probe-train-utterances", type=int, default=int(env("TINY_PROBE_TRAIN_UTTERANCES", 0)),
                   help="train every probe on the first N training utterances only (0: all of them)")
    p.add_argument("--jobs", type=int, default=int(env("TINY_JOBS", 2)), help="jobs at once (one thread each)")
    p.add_argument("--extra-overrides", default=env("TINY_OVERRIDES", ""),
                   help="hydra overrides added to every training command (quoted, shell syntax)")
    p.add_argument("--only", default=None, help="comma-separated jobs to run (with what they need)")
    a = p.parse_args(argv)
    a.workdir = os.path.abspath(a.workdir)
    if a.teacher_updates2 is None:
        a.teacher_updates2 = int(env("TINY_TEACHER_UPDATES2", a.teacher_updates))
    a.replicate = [s for s in a.replicate.split(",") if s]
    a.layer_probes = [s for s in a.layer_probes.split(",") if s]
    for names, known in ((a.replicate, STUDENTS), (a.layer_probes, TEACHERS)):
        for name in names:
            if name not in known:
                p.error(f"unknown model {name!r} (expected one of {', '.join(known)})")
    for option, setting, teacher in (("--layer-it1", a.layer_it1, "teacher_n1"), ("--layer-it2", a.layer_it2, "teacher_n2")):
        if setting == "auto" and teacher not in a.layer_probes:
            p.error(f"{option} auto needs {teacher}'s layers probed: add it to --layer-probes (TINY_LAYER_PROBES)")
    jobs = build_jobs(a)
    if a.only:
        by = {j.name: j for j in jobs}
        want, stack = set(), a.only.split(",")
        while stack:
            n = stack.pop()
            if n not in want:
                want.add(n)
                stack.extend(by[n].deps)
        jobs = [j for j in jobs if j.name in want]
    runner = Runner(a.workdir, jobs, a.jobs)

    def on_signal(signum, _frame):
        runner.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runner.run()
    print("\ntime per kind of job (wall and CPU summed over jobs; span: first start to last end):")
    for kind, k in timing(a.workdir).items():
        span = "" if k["span_seconds"] is None else f", span {fmt(k['span_seconds'])}"
        print(f"  {kind:<9} {k['jobs']:>3} jobs: wall {fmt(k['wall_seconds'])}, cpu {fmt(k['cpu_seconds'])}{span}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
