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

TEACHER_DIR = os.path.join(HERE, "teachers")
#: the seed of teacher replica t is TEACHER_SEED + t (TINY_TEACHER=train); students use 1, 2, ...
TEACHER_SEED = 1000

#: the student rows: name -> (config row + overlays, targets). Targets: ``it2`` the k-means of
#: teacher_n2's chosen layer (hard and soft), ``it2_l1`` of its first layer, ``it1`` of
#: teacher_n1's chosen layer (a student of the N=1 teacher), ``mfcc`` MFCC k-means (no
#: teacher), ``teacher`` the teacher_n2 checkpoint itself (feature distillation).
STUDENTS = {
    "dicehubert_narrow": (["--config-name", "dicehubert_narrow", "model=tiny_narrow"], "it2"),
    "dicehubert_shallow": (["--config-name", "dicehubert_shallow_l6", "model=tiny_shallow"], "it2"),
    "feat_narrow": (["--config-name", "feat_narrow", "model=tiny_narrow", "feat=tiny_layer_to_layer"], "teacher"),
    "scratch_narrow": (["--config-name", "scratch_narrow", "model=tiny_narrow"], "mfcc"),
    "dicehubert_narrow_soft": (["--config-name", "dicehubert_narrow_soft", "model=tiny_narrow"], "it2"),
    "dicehubert_narrow_n1": (["--config-name", "dicehubert_narrow", "model=tiny_narrow"], "it1"),
    "dicehubert_shallow_l4": (["--config-name", "dicehubert_shallow_l4", "model=tiny_shallow_l4"], "it2"),
    "dicehubert_narrow_l1": (["--config-name", "dicehubert_narrow", "model=tiny_narrow"], "it2_l1"),
    "dicehubert_narrow_1layer": (["--config-name", "dicehubert_narrow", "model=tiny_narrow",
                                  "model.encoder_layers=1"], "it2"),
    "dicehubert_narrow_10x": (["--config-name", "dicehubert_narrow", "model=tiny_narrow_10x"], "it2"),
    "feat_narrow_10x": (["--config-name", "feat_narrow", "model=tiny_narrow_10x", "feat=tiny_layer_to_layer"],
                        "teacher"),
    # the paper's loss (HuBERT's: masked frames only) at the best of the masked-only learning rates
    # measured on the tuning corpus (EXPERIMENTS.md, T1); every other row counts unmasked frames too
    "dicehubert_narrow_masked": (["--config-name", "dicehubert_narrow", "model=tiny_narrow",
                                  "criterion.pred_nomask_weight=0", "optimization.lr=[0.0005]"], "it2"),
    "maskdistil_narrow": (["--config-name", "maskdistil_narrow", "model=tiny_narrow",
                           "feat=tiny_mask_layer_to_layer"], "teacher"),
    "dicehubert_conv": (["--config-name", "dicehubert_conv_narrow", "model=tiny_conv"], "it2"),
}
#: what each row is (the report's "what it learned from")
WHAT = {
    "teacher_n1": "HuBERT iteration 1 (masked prediction), MFCC k-means labels",
    "teacher_n2": "HuBERT iteration 2 (masked prediction), k-means of a teacher_n1 layer",
    "dicehubert_narrow": "DiceHuBERT L_SSL, hard labels of teacher_n2's chosen layer",
    "dicehubert_shallow": "DiceHuBERT L_SSL, hard labels (teacher width, 1/6 depth)",
    "feat_narrow": "L_feat from teacher_n2, layer to layer (FitHuBERT style)",
    "scratch_narrow": "no teacher: MFCC k-means labels (HuBERT iteration 1)",
    "dicehubert_narrow_soft": "DiceHuBERT L_SSL, soft labels of the same layer",
    "dicehubert_narrow_n1": "DiceHuBERT L_SSL, hard labels of teacher_n1's chosen layer (an N=1 teacher)",
    "dicehubert_shallow_l4": "DiceHuBERT L_SSL, hard labels (teacher width, 1/4 depth)",
    "dicehubert_narrow_l1": "DiceHuBERT L_SSL, hard labels of teacher_n2's first layer",
    "dicehubert_narrow_1layer": "DiceHuBERT L_SSL, hard labels (one layer of the narrow width)",
    "dicehubert_narrow_10x": "DiceHuBERT L_SSL, hard labels (12 x 48: over 10x smaller than the teacher)",
    "feat_narrow_10x": "L_feat from teacher_n2, layer to layer (12 x 48)",
    "dicehubert_narrow_masked": "DiceHuBERT L_SSL with the paper's loss (masked frames only), hard labels",
    "maskdistil_narrow": "masking distillation (MaskHuBERT) from teacher_n2, layer to layer",
    "dicehubert_conv": "DiceHuBERT L_SSL, hard labels (12 convolution blocks of the narrow width, no attention)",
}
TEACHERS = ("teacher_n1", "teacher_n2")
MODELS = TEACHERS + tuple(STUDENTS)
#: the rows of the presets (run.sh): the paper's main comparisons
DEFAULT_ROWS = ("dicehubert_narrow", "dicehubert_shallow", "feat_narrow", "scratch_narrow")


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


def replica(name: str, r: int, tag: str) -> str:
    """Run name of replica ``r`` (0-based) of ``name``: ``name``, ``name.{tag}2``, ..."""
    return name if r == 0 else f"{name}.{tag}{r + 1}"


def teacher_recipe(updates: int) -> List[str]:
    """HuBERT's recipe for the tiny teachers (as examples/tiny/train_teachers.sh): masked frames
    only, peak learning rate 5e-4, 10% warm-up."""
    return ["optimization.lr=[0.0005]", f"lr_scheduler.warmup_updates={max(1, updates // 10)}",
            "criterion.pred_nomask_weight=0"]


def build_jobs(a: argparse.Namespace) -> List[Job]:
    """The job graph of one run, and ``WORKDIR/rows.json`` (which runs make each row)."""
    w = a.workdir
    lab = lambda *p: os.path.join(w, "labels", *p)  # noqa: E731
    km = lambda name: os.path.join(w, "km", f"{name}.joblib")  # noqa: E731
    run_ckpt = lambda name: os.path.join(w, "models", name, "checkpoints", "checkpoint_last.pt")  # noqa: E731
    labels_cli = [os.path.join(BIN, "dicehubert-labels")]
    common_lab = ["--manifest-dir", w, "--split", "train", "--no-progress"]
    fit_opts = ["--seed", str(a.seed), "--n-init", str(a.n_init)]
    train_cli = [os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", "config/"]
    extra = shlex.split(a.extra_overrides)
    jobs: List[Job] = []
    rows: Dict[str, Dict] = {}
    layer_json = lambda name: os.path.join(w, "probe", f"{name}.layers.json")  # noqa: E731
    probe_opts = [] if not a.probe_train_utterances else ["--max-train-utterances", str(a.probe_train_utterances)]
    n_teachers = 1 if a.teachers == "shipped" else a.teacher_replicas

    def add_run(row, run, seed, teacher, ckpt, trained, kind):
        rows.setdefault(row, {"kind": kind, "what": WHAT[row], "runs": []})["runs"].append(
            {"run": run, "seed": seed, "teacher": teacher, "checkpoint": ckpt,
             "probe": os.path.join(w, "probe", f"{run}.json"), "trained": trained})

    def layer_of(name, setting):
        """``setting`` (a layer) or, for ``auto``, the best layer of ``name`` on valid, and the jobs that needs."""
        if setting == "auto":
            return BEST_LAYER_PREFIX + layer_json(name), [f"probe_{name}.layers"]
        return str(setting), []

    def layer_probe(name, ckpt, deps):
        which = ["--layers", a.layer_probe_layers] if a.layer_probe_layers else []
        jobs.append(Job(f"probe_{name}.layers", [sys.executable, os.path.join(HERE, "probe_layers.py"),
                                                 "--checkpoint", ckpt, "--data", w, "--out", layer_json(name),
                                                 "--seed", str(a.seed), "--epochs", str(a.probe_epochs)]
                        + which + probe_opts, deps, kind="probe"))

    def train(name, row, deps, updates, seed, label_dir=None, more=()):
        run_dir = os.path.join(w, "models", name)
        cmd = train_cli + row + ["common.user_dir=dicehubert_fairseq", f"task.data={w}", "run=tiny",
                                 f"optimization.max_update={updates}", f"common.seed={seed}",
                                 f"hydra.run.dir={run_dir}"]
        if label_dir is not None:
            cmd.append(f"task.label_dir={label_dir}")
        jobs.append(Job(name, cmd + list(more) + extra, deps, outdir=run_dir, kind="train", updates=updates))

    def labels(name, ckpt, layer, deps, soft=False):
        """k-means of one teacher layer on the corpus's train split, then its labels (stream ``km``)."""
        jobs.append(Job(f"km_{name}", labels_cli + ["fit"] + common_lab + [
            "--checkpoint", ckpt, "--layer", layer, "--n-clusters", str(a.k), "--out", km(name)] + fit_opts, deps))
        dump = ["--soft", "--temperature", str(a.temperature), "--top-k", str(min(a.k, 10))] if soft else []
        jobs.append(Job(f"labels_{name}", labels_cli + ["dump"] + common_lab + [
            "--checkpoint", ckpt, "--layer", layer, "--km", km(name), "--label-dir", lab(name), "--name", "km"]
            + dump, [f"km_{name}"]))

    # MFCC k-means labels (HuBERT iteration 1 targets; the scratch student's), where needed
    shipped = a.teachers == "shipped"
    if not shipped or any(STUDENTS[r][1] == "mfcc" for r in a.rows):
        jobs.append(Job("km_mfcc", labels_cli + ["fit"] + common_lab + [
            "--mfcc", "--n-clusters", str(a.k_mfcc), "--out", km("mfcc")] + fit_opts))
        jobs.append(Job("labels_mfcc", labels_cli + ["dump"] + common_lab + [
            "--mfcc", "--km", km("mfcc"), "--label-dir", lab("mfcc"), "--name", "mfcc"], ["km_mfcc"]))

    # the teachers: the shipped, pretrained ones (verified first), or trained here, n_teachers of each
    teacher_ckpt, teacher_deps = {}, {}
    if shipped:
        jobs.append(Job("verify_teachers", [sys.executable, os.path.join(HERE, "teachers.py"), "verify",
                                            "--dir", a.teacher_dir]))
    for t in range(n_teachers):
        n1, n2 = replica("teacher_n1", t, "t"), replica("teacher_n2", t, "t")
        if shipped:
            ckpt1, ckpt2 = (os.path.join(a.teacher_dir, f"{n}.pt") for n in TEACHERS)
            deps1 = deps2 = ["verify_teachers"]
        else:
            ckpt1, ckpt2, deps1, deps2 = run_ckpt(n1), run_ckpt(n2), [n1], [n2]
            train(n1, ["--config-name", "tiny_teacher", "+data=mfcc"], ["labels_mfcc"], a.teacher_updates,
                  TEACHER_SEED + t, lab("mfcc"), teacher_recipe(a.teacher_updates))
        # layer-by-layer probes: the first pair's (the report's table), every pair's where 'auto' needs them
        if "teacher_n1" in a.layer_probes and (t == 0 or a.layer_it1 == "auto"):
            layer_probe(n1, ckpt1, deps1)
        layer1, need1 = layer_of(n1, a.layer_it1)
        if not shipped:  # iteration 2 on the k-means of teacher_n1's chosen layer
            labels(replica("it1", t, "t"), ckpt1, layer1, deps1 + need1)
            train(n2, ["--config-name", "tiny_teacher", "task.labels=[km]", "task.label_rate=50"],
                  [f"labels_{replica('it1', t, 't')}"], a.teacher_updates2, TEACHER_SEED + t,
                  lab(replica("it1", t, "t")), teacher_recipe(a.teacher_updates2))
        if "teacher_n2" in a.layer_probes and (t == 0 or a.layer_it2 == "auto"):
            layer_probe(n2, ckpt2, deps2)
        layer2, need2 = layer_of(n2, a.layer_it2)
        # the students' targets, K=a.k: teacher_n2's chosen layer (hard + soft), its first layer, and
        # teacher_n1's chosen layer; each made only if a row needs it
        targets = {STUDENTS[r][1] for r in a.rows}
        if "it2" in targets:
            labels(replica("it2", t, "t"), ckpt2, layer2, deps2 + need2, soft=True)
        if "it2_l1" in targets:
            labels(replica("it2_l1", t, "t"), ckpt2, "1", deps2)
        if "it1" in targets:
            labels(replica("n1", t, "t"), ckpt1, layer1, deps1 + need1)
        teacher_ckpt[t], teacher_deps[t] = {"it1": ckpt1, "it2": ckpt2}, {"it1": deps1, "it2": deps2}
        for name, ckpt, trained in ((n1, ckpt1, not shipped), (n2, ckpt2, not shipped)):
            add_run(name.split(".")[0], name, TEACHER_SEED + t, t, ckpt, trained, "teacher")

    # students: every row a.replicas times, seed r + 1 for replica r, on teacher (r mod n_teachers);
    # start order: the longest kind (feature distillation) first
    order = sorted(a.rows, key=lambda n: STUDENTS[n][1] != "teacher")
    for r in range(a.replicas):
        seed, t = a.seed + r, r % n_teachers
        for name in order:
            row, target = STUDENTS[name]
            run = replica(name, r, "s")
            if target == "mfcc":
                train(run, row, ["labels_mfcc"], a.student_updates, seed, lab("mfcc"))
            elif target == "teacher":
                train(run, row, teacher_deps[t]["it2"], a.student_updates, seed,
                      more=[f"criterion.teacher_checkpoint={teacher_ckpt[t]['it2']}"])
            else:
                label = replica({"it2": "it2", "it2_l1": "it2_l1", "it1": "n1"}[target], t, "t")
                train(run, row, [f"labels_{label}"], a.student_updates, seed, lab(label))
            add_run(name, run, seed, t if target != "mfcc" else None, run_ckpt(run), True, "student")
    # probes of every model on this corpus
    for row in rows.values():
        for entry in row["runs"]:
            deps = [entry["run"]] if entry["trained"] else (["verify_teachers"] if shipped else [])
            jobs.append(Job(f"probe_{entry['run']}", [os.path.join(BIN, "dicehubert-probe"), "--checkpoint",
                                                      entry["checkpoint"], "--data", w, "--json", entry["probe"],
                                                      "--seed", str(a.seed), "--threads", "1", "--epochs",
                                                      str(a.probe_epochs), "-q"] + probe_opts,
                            deps, kind="probe"))
    a.rows_manifest = {"teachers": a.teachers, "teacher_dir": a.teacher_dir if shipped else None,
                       "teacher_replicas": n_teachers, "rows": rows}
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
    return "teachers" if base in TEACHERS or base == "verify_teachers" else "students" if base in STUDENTS else "labels"


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


def shipped_layer(teacher_dir: str, name: str) -> Optional[int]:
    """The layer of a shipped teacher chosen on the tuning corpus's valid split (teachers.json), if any."""
    try:
        with open(os.path.join(teacher_dir, "teachers.json")) as f:
            return int(json.load(f)["teachers"][name]["best_transformer_layer"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main(argv=None) -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir")
    p.add_argument("--teachers", choices=("shipped", "train"), default=env("TINY_TEACHER", "shipped"),
                   help="'shipped': the pretrained teachers of --teacher-dir (checksums verified first); "
                        "'train': train --teacher-replicas pairs of teachers on this corpus (default %(default)s)")
    p.add_argument("--teacher-dir", default=env("TINY_TEACHER_DIR", TEACHER_DIR),
                   help="the shipped teachers (teacher_n1.pt, teacher_n2.pt, their .sha256, teachers.json)")
    p.add_argument("--teacher-replicas", type=int, default=int(env("TINY_TEACHERS", 2)),
                   help="with --teachers train: teacher pairs trained (seeds 1000, 1001, ...); student seed s "
                        "learns from pair (s - 1) mod N, so that the students' spread includes the teachers'")
    p.add_argument("--teacher-updates", type=int, default=int(env("TINY_TEACHER_UPDATES", 1000)),
                   help="with --teachers train: updates of teacher iteration 1")
    p.add_argument("--teacher-updates2", type=int, default=None,
                   help="updates of teacher iteration 2 (default: --teacher-updates)")
    p.add_argument("--student-updates", type=int, default=int(env("TINY_STUDENT_UPDATES", 400)))
    p.add_argument("--rows", default=env("TINY_ROWS", ",".join(DEFAULT_ROWS)),
                   help="comma-separated student rows (default %(default)s; all: " + ", ".join(STUDENTS) + ")")
    p.add_argument("--k-mfcc", type=int, default=int(env("TINY_K_MFCC", 100)), help="K of the MFCC k-means")
    p.add_argument("--k", type=int, default=int(env("TINY_K", 100)),
                   help="K of the teacher-layer k-means (the paper's: 100)")
    p.add_argument("--layer-it1", type=layer_setting, default=None,
                   help="teacher_n1 layer clustered (teacher_n2's targets with --teachers train; the N=1 "
                        "student's targets); default: the shipped teacher_n1's layer chosen on the tuning "
                        "corpus (teachers.json); 'auto': its best layer on this corpus's valid split, each "
                        "layer probed alone (needs teacher_n1 in --layer-probes)")
    p.add_argument("--layer-it2", type=layer_setting, default=None,
                   help="teacher_n2 layer clustered for the students' targets; default and 'auto' as "
                        "--layer-it1")
    p.add_argument("--n-init", type=int, default=int(env("TINY_N_INIT", 3)),
                   help="k-means++ trials of every fit (fairseq's learn_kmeans: 20; 3 is within 1%% of its "
                        "objective here, 8 s faster per fit)")
    p.add_argument("--temperature", type=float, default=float(env("TINY_TEMPERATURE", 10)),
                   help="tau of the soft labels")
    p.add_argument("--seed", type=int, default=int(env("TINY_SEED", 1)),
                   help="the first student seed (replica r: seed + r); the teachers' seeds are 1000 + t")
    p.add_argument("--replicas", type=int, default=int(env("TINY_REPLICAS", 5)),
                   help="seeds of every student row (seed, seed+1, ...)")
    p.add_argument("--layer-probes", default=env("TINY_LAYER_PROBES", ""),
                   help="comma-separated teachers whose hidden states are also probed one at a time on this "
                        "corpus (examples/tiny/probe_layers.py); empty: none")
    p.add_argument("--layer-probe-layers", default=env("TINY_LAYER_PROBE_LAYERS", ""),
                   help="comma-separated hidden states the --layer-probes probe (default: all, 0..L)")
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
    a.rows = [s for s in a.rows.split(",") if s]
    a.layer_probes = [s for s in a.layer_probes.split(",") if s]
    for names, known in ((a.rows, STUDENTS), (a.layer_probes, TEACHERS)):
        for name in names:
            if name not in known:
                p.error(f"unknown model {name!r} (expected one of {', '.join(known)})")
    if a.teacher_replicas < 1 or a.replicas < 1:
        p.error("--teacher-replicas and --replicas must be >= 1")
    for option, attr, teacher in (("--layer-it1", "layer_it1", "teacher_n1"), ("--layer-it2", "layer_it2", "teacher_n2")):
        setting = getattr(a, attr)
        if setting is None:
            setting = env("TINY_" + attr.upper())
            setting = layer_setting(setting) if setting else shipped_layer(a.teacher_dir, teacher)
            if setting is None:
                p.error(f"{option}: no layer given and none recorded in {a.teacher_dir}/teachers.json")
            setattr(a, attr, setting)
        if setting == "auto" and teacher not in a.layer_probes:
            p.error(f"{option} auto needs {teacher}'s layers probed: add it to --layer-probes (TINY_LAYER_PROBES)")
    jobs = build_jobs(a)
    os.makedirs(a.workdir, exist_ok=True)
    with open(os.path.join(a.workdir, "rows.json.tmp"), "w") as f:
        json.dump(a.rows_manifest, f, indent=1)
    os.replace(os.path.join(a.workdir, "rows.json.tmp"), os.path.join(a.workdir, "rows.json"))
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
