"""Labels in parallel: concurrent ``dicehubert-labels dump`` shard processes, merged, equal one process.

* N shard processes started at once, then ``merge``: the same bytes as one process, hard labels
  and soft labels (every file, the soft sidecar's statistics included), teacher features, with
  shard boundaries inside a block and on block boundaries;
* one shard killed (SIGKILL) mid-way while the others run: rerun alone, it resumes from its
  finished blocks, and the merge is still the same bytes;
* ``examples/librispeech/2_labels.sh`` with ``LAUNCH=slurm`` (Slurm array jobs), run with a stub
  ``sbatch`` that records its arguments: every command it submits is one the CLI accepts, one
  array task per shard, and the jobs wait for the right ones; and (slow) with a stub ``sbatch``
  that runs the jobs here, with the real CLI: the same labels as one process.
"""

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

from dicehubert_fairseq.labels.cli import build_parser, main
from tests.helpers.data import write_checkpoint, write_corpus, write_random_labels
from tests.helpers.runs import REPO, subprocess_env

pytestmark = pytest.mark.e2e

LABELS_SH = os.path.join(REPO, "examples", "librispeech", "2_labels.sh")
N_UTT = 10   # 3 shards: fairseq's ranges [0, 3) [3, 7) [7, 10)
NSHARD = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Utterances of 0.8-3 s (batches of several lengths), a 2-layer teacher, k-means of its layer 2."""
    root = tmp_path_factory.mktemp("labels_parallel")
    data = str(root / "data")
    sizes = write_corpus(data, {"train": N_UTT, "valid": 2}, seconds=(0.8, 3.0), seed=41)
    write_random_labels(str(root / "random_labels"), sizes)
    teacher = str(root / "teacher.pt")
    write_checkpoint(teacher, data, str(root / "random_labels"), seed=4)
    # batches of several utterances (on CPU the default is one at a time, which no batch can change)
    features = ["--checkpoint", teacher, "--layer", "2", "--threads", "1", "--no-progress", "--max-batch-seconds", "50"]
    km = str(root / "km.joblib")
    assert main(["fit", "--manifest-dir", data, "--split", "train", *features, "--n-clusters", "8", "--out", km]) == 0
    return {"root": root, "data": data, "teacher": teacher, "km": km,
            "dump": ["dump", "--manifest-dir", data, "--split", "train", *features, "--km", km]}


def _same_bytes(whole, merged):
    names = sorted(os.listdir(whole))
    assert names and not any(n.endswith(".parts") for n in names), names
    for name in names:
        with open(os.path.join(whole, name), "rb") as a, open(os.path.join(merged, name), "rb") as b:
            assert a.read() == b.read(), name
    return names


SLOW_DUMP = """
import sys, time
from dicehubert_fairseq.labels import cli, features
read = features.FeatureSource.read
def slow(*args, **kwargs):  # a slow machine: every utterance takes a second
    for item in read(*args, **kwargs):
        yield item
        time.sleep(1.0)
features.FeatureSource.read = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_concurrent_shards_merge_to_one_process_bytes(world, tmp_path):
    """6 processes at once: 3 hard shards (one block each), 3 soft shards (blocks of 2
    utterances: shard boundaries 3 and 7 fall inside blocks); soft shard 1 killed mid-way."""
    hard = world["dump"] + ["--name", "km"]
    soft = world["dump"] + ["--name", "kms", "--soft", "--temperature", "5", "--top-k", "3", "--block-size", "2"]
    whole, shards = str(tmp_path / "whole"), str(tmp_path / "shards")
    assert main(hard + ["--label-dir", whole]) == 0
    assert main(soft + ["--label-dir", whole]) == 0

    cli = [sys.executable, "-m", "dicehubert_fairseq.labels"]
    slow = tmp_path / "slow_dump.py"
    slow.write_text(SLOW_DUMP)
    procs = {}
    for rank in range(NSHARD):
        shard = ["--label-dir", shards, "--nshard", str(NSHARD), "--rank", str(rank)]
        procs[("km", rank)] = subprocess.Popen(cli + hard + shard, env=subprocess_env(), stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True)
        runner = [sys.executable, str(slow)] if rank == 1 else cli
        procs[("kms", rank)] = subprocess.Popen(runner + soft + shard, env=subprocess_env(), stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True)
    # kill soft shard 1 (rows 3..6: blocks {3}, {4, 5}, {6}) once its first block is written
    parts = os.path.join(shards, f"train_1_{NSHARD}.kms.parts")
    victim, deadline = procs[("kms", 1)], time.time() + 300
    finished = re.compile(r"block_\d+\.npz$")  # not block_*.npz.*.tmp, still being written
    while not (os.path.isdir(parts) and any(finished.match(f) for f in os.listdir(parts))):
        assert victim.poll() is None and time.time() < deadline, victim.communicate()[0][-3000:]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    for key, proc in procs.items():
        if key != ("kms", 1):
            out = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, (key, out[-3000:])
    assert not os.path.exists(os.path.join(shards, f"train_1_{NSHARD}.kms"))  # no partial file under its name

    # the killed shard reruns alone, from its finished blocks
    rerun = subprocess.run(cli + soft + ["--label-dir", shards, "--nshard", str(NSHARD), "--rank", "1"],
                           env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    m = re.search(r"resumed: (\d+) of (\d+) blocks were done", rerun.stdout)
    assert m and 1 <= int(m.group(1)) < int(m.group(2)), rerun.stdout + rerun.stderr

    merged = str(tmp_path / "merged")
    for name in ("km", "kms"):
        assert main(["merge", "--label-dir", shards, "--split", "train", "--nshard", str(NSHARD), "--name", name,
                     "--manifest-dir", world["data"], "--out-dir", merged]) == 0
    names = _same_bytes(whole, merged)
    assert {"train.km", "train.kms", "train.kms.soft_probs.npy", "train.kms.soft.json", "dict.kms.txt"} <= set(names)
    # the soft sidecar's statistic is the whole split's, not shard 0's
    with open(os.path.join(shards, f"train_0_{NSHARD}.kms.soft.json")) as f0, \
            open(os.path.join(merged, "train.kms.soft.json")) as fm:
        assert json.load(f0)["mean_kept_mass"] != json.load(fm)["mean_kept_mass"]


# ----------------------------------------------------------------------------- 2_labels.sh, LAUNCH=slurm


SBATCH_STUB = r'''#!/usr/bin/env python3
"""Stub sbatch: records its arguments, prints a job id; STUB_RUN=1 also runs the job (an array's
tasks at once, SLURM_ARRAY_TASK_ID set) before returning, so dependencies hold in order."""
import json, os, subprocess, sys
args = sys.argv[1:]
log = os.environ["STUB_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(args) + "\n")
job_id = sum(1 for _ in open(log)) + 1000
wrap = next(a.split("=", 1)[1] for a in args if a.startswith("--wrap=")) if any(a.startswith("--wrap=") for a in args) \
    else args[args.index("--wrap") + 1]
array = [a.split("=", 1)[1] for a in args if a.startswith("--array=")]
if os.environ.get("STUB_RUN"):
    tasks = [None]
    if array:
        tasks = []
        for part in array[0].split(","):
            lo, _, hi = part.partition("-")
            tasks += list(range(int(lo), int(hi or lo) + 1))
    procs = []
    for t in tasks:
        env = dict(os.environ, SLURM_JOB_ID=str(job_id))
        if t is not None:
            env["SLURM_ARRAY_TASK_ID"] = str(t)
        procs.append(subprocess.Popen(["bash", "-c", wrap], env=env))
    if any(p.wait() != 0 for p in procs):
        sys.exit(f"stub sbatch: job {job_id} failed: {wrap}")
print(f"{job_id};cluster")
'''


def _slurm_env(tmp, log, **extra):
    stubs = tmp / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "sbatch").write_text(SBATCH_STUB)
    (stubs / "sbatch").chmod((stubs / "sbatch").stat().st_mode | stat.S_IEXEC)
    settings = dict(STUB_LOG=str(log), LAUNCH="slurm", NSHARD=str(NSHARD), WORK=str(tmp / "work"),
                    TEACHER=str(tmp / "hubert_base_ls960.pt"), SBATCH_OPTS="--partition=gpu --account=dice")
    env = subprocess_env(**dict(settings, **extra))
    env["PATH"] = str(stubs) + os.pathsep + env["PATH"]
    env.pop("NGPU", None)
    return env


def _submissions(log):
    jobs = []
    with open(log) as f:
        for i, line in enumerate(f):
            args = json.loads(line)
            opts = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}
            jobs.append({"id": str(1000 + i + 1), "args": args, "opts": opts, "wrap": args[args.index("--wrap") + 1]})
    return jobs


def _array_ranks(spec):
    ranks = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        ranks += list(range(int(lo), int(hi or lo) + 1))
    return ranks


def test_slurm_array_variant_submits_what_the_cli_accepts(tmp_path):
    log = tmp_path / "sbatch.jsonl"
    proc = subprocess.run(["bash", LABELS_SH], cwd=str(tmp_path), env=_slurm_env(tmp_path, log),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _submissions(log)
    by_name = {j["opts"]["--job-name"]: j for j in jobs}
    parser = build_parser()
    dumps = [j for j in jobs if j["opts"]["--job-name"].startswith("dump_")]
    # km, 3 soft streams, mfcc: train and valid each
    assert sorted(j["opts"]["--job-name"] for j in dumps) == sorted(
        f"dump_{s}_{n}" for s in ("train", "valid") for n in ("km", "it2_l9_t1", "it2_l9_t5", "it2_l9_t10", "mfcc"))
    for j in jobs:
        assert "--partition=gpu" in j["args"] and "--account=dice" in j["args"], j
        assert j["opts"]["--output"].endswith("/slurm/%x_%A_%a.log")
        words = shlex.split(j["wrap"])
        assert words[0] == "dicehubert-labels", j["wrap"]
        if j in dumps:
            assert j["opts"]["--array"] == f"0-{NSHARD - 1}" and j["opts"]["--gres"] == "gpu:1"
            assert words[-2:] == ["--rank", "$SLURM_ARRAY_TASK_ID"], j["wrap"]
            ranks = []
            for task in _array_ranks(j["opts"]["--array"]):
                ns = parser.parse_args([w.replace("$SLURM_ARRAY_TASK_ID", str(task)) for w in words[1:]])
                assert ns.command == "dump" and ns.nshard == NSHARD
                ranks.append(ns.rank)
            assert ranks == list(range(NSHARD))
            fit = "fit_mfcc" if "--mfcc" in words else "fit_l9"
            assert j["opts"]["--dependency"] == f"afterok:{by_name[fit]['id']}"
            if "--mfcc" not in words:
                assert words[words.index("--device") + 1] == "cuda"
        else:
            ns = parser.parse_args(words[1:])
            assert "--array" not in j["opts"]
            if ns.command == "merge":   # after every task of its array
                split, name = j["opts"]["--job-name"][len("merge_"):].split("_", 1)
                assert (ns.split, ns.name, ns.nshard) == (split, name, NSHARD)
                assert j["opts"]["--dependency"] == f"afterok:{by_name[f'dump_{split}_{name}']['id']}"
                assert "--gres" not in j["opts"]
            elif ns.command == "check":  # after every merge
                merges = [m["id"] for m in jobs if m["opts"]["--job-name"].startswith("merge_")]
                assert sorted(j["opts"]["--dependency"][len("afterok:"):].split(":")) == sorted(merges)
            else:
                assert ns.command == "fit" and "--dependency" not in j["opts"]
    assert "submitted" in proc.stdout


def test_slurm_rerun_of_one_shard(tmp_path):
    log = tmp_path / "sbatch.jsonl"
    env = _slurm_env(tmp_path, log, STAGES="dump", SPLITS="train", ARRAY="1")
    proc = subprocess.run(["bash", LABELS_SH], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dump, merge = _submissions(log)
    assert dump["opts"]["--array"] == "1" and "--dependency" not in dump["opts"]
    assert merge["opts"]["--job-name"] == "merge_train_km" and merge["opts"]["--dependency"] == f"afterok:{dump['id']}"


@pytest.mark.slow
def test_slurm_array_jobs_run_give_one_process_labels(world, tmp_path):
    """The array jobs run (stub sbatch executing them, 3 shards at once) with the real CLI on CPU."""
    log = tmp_path / "sbatch.jsonl"
    work = tmp_path / "work"
    env = _slurm_env(tmp_path, log, STUB_RUN="1", STAGES="fit dump", SPLITS="train", MANIFESTS=world["data"],
                     TEACHER=world["teacher"], LAYER="2", K="8", PERCENT="1", DEVICE="cpu", DTYPE="float32")
    proc = subprocess.run(["bash", LABELS_SH], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    labels = work / "labels"
    whole = tmp_path / "whole"
    km = str(work / "km" / "l2_k8.joblib")
    one = subprocess.run([sys.executable, "-m", "dicehubert_fairseq.labels", "dump", "--manifest-dir", world["data"],
                          "--split", "train", "--checkpoint", world["teacher"], "--layer", "2", "--device", "cpu",
                          "--dtype", "float32", "--km", km, "--label-dir", str(whole), "--name", "km"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    _same_bytes(str(whole), str(labels))
    assert sorted(f for f in os.listdir(labels) if f.startswith("train_")) == [
        f"train_{r}_{NSHARD}.km" for r in range(NSHARD)]
