"""A short fp16 training run of the narrow preset on one GPU (``run=gpu``), timed and checked.

    python -m benchmarks.gpu.train [--workdir DIR] [--updates 150] [--utterances 800]
    python -m benchmarks.gpu.train --cpu --updates 6 --utterances 12   # a toy CPU run of this script

1. A synthetic corpus (``tests.helpers.data.write_corpus``: tones and noise, 2-5 s per utterance).
2. Labels the student can learn: ``dicehubert-labels fit`` + ``dump`` (``--device cuda --dtype
   float16``, in this process) on layer 4 of a randomly initialised fairseq ``hubert`` teacher (4 x 384, HuBERT's
   conv front end), K = 100.
3. ``fairseq-hydra-train --config-name dicehubert_narrow run=gpu`` (the narrow student, 12 x 384,
   fp16 with fairseq's dynamic loss scaler) at the recipe's per-GPU batch (``max_tokens``
   1.4M samples) but ``update_freq=[1]`` and a short warm-up, for ``--updates`` updates.

Recorded (``train.json`` in ``--workdir``, printed): updates per second (fairseq's ``ups`` per
logged interval, the first interval left out as warm-up; and updates over wall time), peak GPU
memory (fairseq's ``gb_free``: the device's memory minus ``torch.cuda.max_memory_allocated`` of
each update; and the largest ``memory.used`` that ``nvidia-smi`` reported, sampled every 0.5 s,
which also counts the CUDA context and the allocator's cache), the loss of every logged
interval, gradient overflows skipped by the loss scaler.  Checks: the run exits 0 and reaches
``--updates``, every logged loss is finite, and the mean loss of the last three logged intervals
is below that of the first three.  Exit status 1 when a check fails.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

from dicehubert_fairseq.labels.cli import main as labels_main
from tests.helpers.data import HUBERT_CONV, write_checkpoint, write_corpus, write_random_labels

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: the teacher whose layer gives the labels: HuBERT's conv front end, 4 transformer layers x 384
TEACHER = {"encoder_layers": 4, "encoder_embed_dim": 384, "encoder_ffn_embed_dim": 1536,
           "encoder_attention_heads": 6, "conv_feature_layers": HUBERT_CONV, "final_dim": 256,
           "conv_pos": 128, "conv_pos_groups": 16}


def timed(name, cmd, log, env=None):
    """Run ``cmd`` from the repository root, output to ``log``; returns ``(exit status, seconds)``."""
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    dt = time.time() - t0
    print(f"  {name:<10} {dt:7.1f} s  exit {rc}  ({log})", flush=True)
    return rc, dt


def json_rows(log, tag="train_inner"):
    """fairseq's ``common.log_format=json`` records of one kind, values as floats where they parse."""
    rows = []
    with open(log, errors="replace") as f:
        for line in f:
            if f"[{tag}]" in line and " - {" in line:
                row = json.loads(line.split(" - ", 1)[1])
                rows.append({k: _num(v) for k, v in row.items()})
    return rows


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def gpu_sampler(path):
    """``nvidia-smi`` sampling memory.used (MiB) and utilization (%) every 0.5 s, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    f = open(path, "w")
    return subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used,memory.total,utilization.gpu",
                             "--format=csv,noheader,nounits", "-lms", "500"], stdout=f, stderr=subprocess.DEVNULL)


def read_samples(path):
    out = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 3 and all(p.isdigit() for p in parts):
                    out.append(tuple(int(p) for p in parts))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/dicehubert_gpu_train")
    p.add_argument("--utterances", type=int, default=800, help="training utterances (2-5 s each)")
    p.add_argument("--updates", type=int, default=150)
    p.add_argument("--max-tokens", type=int, default=1_400_000, help="samples per update (the recipe's per GPU)")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--cpu", action="store_true", help="toy run on the CPU (fp32, run=cpu): checks this script only")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()

    work = os.path.abspath(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    data, labels, run_dir = (os.path.join(work, x) for x in ("data", "labels", "run"))
    py = sys.executable
    device = ["--device", "cpu"] if args.cpu else ["--device", "cuda", "--dtype", "float16"]
    result = {"args": vars(args), "checks": {}}

    t0 = time.time()
    sizes = write_corpus(data, {"train": args.utterances, "valid": 4}, seconds=(2.0, 5.0), seed=0)
    teacher = os.path.join(work, "teacher.pt")
    write_random_labels(os.path.join(work, "teacher_labels"), {}, n_clusters=100)
    write_checkpoint(teacher, data, os.path.join(work, "teacher_labels"), model_overrides=TEACHER, seed=0)
    audio_s = sum(sizes["train"]) / 16000
    result["corpus"] = {"utterances": args.utterances, "audio_s": audio_s, "seconds": time.time() - t0}
    print(f"corpus: {args.utterances} utterances, {audio_s / 60:.1f} min of audio ({time.time() - t0:.0f} s)",
          flush=True)

    src = ["--manifest-dir", data, "--checkpoint", teacher, "--layer", "4", *device, "--no-progress"]
    km = os.path.join(work, "km.joblib")
    steps = [("fit", ["fit", *src, "--split", "train", "--n-clusters", "100", "--percent", "0.1", "--out", km])]
    steps += [(f"dump_{s}", ["dump", *src, "--split", s, "--km", km, "--label-dir", labels])
              for s in ("train", "valid")]
    result["labels"] = {}
    for name, argv in steps:  # in this process: no start-up cost per step
        t1 = time.time()
        rc = labels_main(argv)
        result["labels"][name] = {"exit": rc, "seconds": time.time() - t1}
        print(f"  labels {name:<11} {time.time() - t1:7.1f} s  exit {rc}", flush=True)
        if rc != 0:
            result["checks"]["labels"] = False
            return finish(result, args, work)
    total_gib = None
    if not args.cpu:
        import torch

        torch.cuda.empty_cache()  # this process keeps its CUDA context: nvidia-smi's baseline below
        total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30  # fairseq's total_memory_in_GB

    overrides = [
        f"common.user_dir={os.path.join(REPO, 'dicehubert_fairseq')}", f"task.data={data}", f"task.label_dir={labels}",
        "run=cpu" if args.cpu else "run=gpu", "optimization.update_freq=[1]",
        f"optimization.max_update={args.updates}", f"dataset.max_tokens={args.max_tokens}",
        f"lr_scheduler.warmup_updates={max(1, args.updates // 10)}",
        "common.log_format=json", f"common.log_interval={args.log_interval}", "common.seed=1",
        "dataset.disable_validation=true", "checkpoint.save_interval=1000", f"hydra.run.dir={run_dir}",
    ]
    cmd = [py, "-m", "fairseq_cli.hydra_train", "--config-dir", os.path.join(REPO, "config"),
           "--config-name", "dicehubert_narrow", *overrides]
    result["command"] = " ".join(cmd[1:])
    samples_path = os.path.join(work, "nvidia_smi.csv")
    sampler = None if args.cpu else gpu_sampler(samples_path)
    log = os.path.join(work, "train.log")
    try:
        rc, dt = timed("train", cmd, log)
    finally:
        if sampler is not None:
            sampler.terminate()
            sampler.wait()
    rows = json_rows(log)
    text = open(log, errors="replace").read()
    losses = [(int(r["num_updates"]), r["loss"]) for r in rows if "loss" in r]
    ups = [r["ups"] for r in rows[1:] if isinstance(r.get("ups"), float)]
    walls = [(int(r["num_updates"]), r["wall"]) for r in rows if isinstance(r.get("wall"), float)]
    free = [r["gb_free"] for r in rows if isinstance(r.get("gb_free"), float)]
    smi = read_samples(samples_path)
    base = smi[0][0] if smi else None
    train = {
        "exit": rc, "seconds": dt, "num_updates": losses[-1][0] if losses else 0, "losses": losses,
        "ups_median": statistics.median(ups) if ups else None,
        "ups_wall": ((walls[-1][0] - walls[0][0]) / (walls[-1][1] - walls[0][1])
                     if len(walls) >= 2 and walls[-1][1] > walls[0][1] else None),
        "gb_free_min": min(free) if free else None,
        "loss_scale_last": rows[-1].get("loss_scale") if rows else None,
        "overflows": text.count("gradient overflow detected"),
        "nvidia_smi_peak_mib": max(s[0] for s in smi) if smi else None,
        "nvidia_smi_baseline_mib": base,
        "nvidia_smi_total_mib": smi[0][1] if smi else None,
        "gpu_util_mean": statistics.mean(s[2] for s in smi) if smi else None,
    }
    if train["gb_free_min"] is not None and total_gib is not None:
        # fairseq: gb_free = total_memory / 2**30 - torch.cuda.max_memory_allocated() / 2**30 (rounded to 0.1)
        train["peak_allocated_gb"] = total_gib - train["gb_free_min"]
    result["train"] = train
    values = [x for _, x in losses]
    result["checks"] = {
        "exit_0": rc == 0,
        "reached_updates": train["num_updates"] == args.updates,
        "losses_finite": bool(values) and all(isinstance(x, float) and math.isfinite(x) for x in values),
        "loss_decreased": len(values) >= 6 and statistics.mean(values[-3:]) < statistics.mean(values[:3]),
    }
    return finish(result, args, work)


def finish(result, args, work):
    ok = bool(result["checks"]) and all(result["checks"].values())
    result["ok"] = ok
    for path in filter(None, [os.path.join(work, "train.json"), args.json]):
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
    t = result.get("train", {})
    if t:
        print(f"updates {t['num_updates']}, ups median {t['ups_median']}, ups over wall {t['ups_wall']}, "
              f"peak allocated {t.get('peak_allocated_gb')} GB, nvidia-smi peak {t['nvidia_smi_peak_mib']} MiB, "
              f"overflows {t['overflows']}")
        print("losses:", " ".join(f"{u}:{x:.3f}" for u, x in t["losses"] if isinstance(x, float)))
    print("checks:", json.dumps(result["checks"]), "->", "OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
