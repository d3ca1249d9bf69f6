"""Where the label dumper's time goes: the teacher forward of ``dicehubert-labels`` on CPU, taken apart.

On the label benchmark's teacher (HuBERT Base size, 12 x 768, random weights, layer 9) and a
synthetic corpus (2-5 s utterances), in one process:

* **stages**: reading audio (soundfile), MFCC (the ``--mfcc`` features, for scale), the conv front
  end (``forward_features``: 7 convolutions, GroupNorm over time, run per utterance under
  ``exact_padding``), the transformer up to layer 9;
* **operators** (``torch.profiler``, one utterance at a time): convolutions, linear layers,
  attention (which kernel fairseq's ``MultiheadAttention`` reaches), GELU, norms, copies;
* **batching x threads**: one utterance at a time against length-sorted padded batches of
  25/50/100 s, with 1 and 2 torch threads, in interleaved rounds; CPU time (all threads of the
  process) and wall time;
* **other paths**, each checked against the default's features (max abs difference, cosine):
  ``torch.no_grad`` instead of ``inference_mode``, attention forced to SDPA's math kernel,
  bfloat16 autocast (when the CPU has bf16 instructions), and with ``--compile``
  ``torch.compile`` of the encoder layers (compile time reported apart).

    python -m benchmarks.labels.profile_teacher [--utterances 12] [--rounds 2] [--compile] [--json OUT]

The machine may be shared: the 1-minute load average is printed with every figure; CPU time is
the robust one.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import time

import numpy as np
import torch

from dicehubert_fairseq.data.audio import read_audio
from dicehubert_fairseq.data.files import read_manifest
from dicehubert_fairseq.hidden_states import hidden_states
from dicehubert_fairseq.labels.features import length_sorted_batches
from dicehubert_fairseq.labels.mfcc import mfcc_39
from dicehubert_fairseq.labels.teacher import TeacherFeatureReader, cpu_has_bf16
from tests.helpers.data import write_checkpoint, write_corpus, write_random_labels

from .run import HUBERT_BASE

CATEGORIES = (  # profiler operator -> stage (first match)
    ("convolution", "conv (front end + positional conv)"), ("group_norm", "GroupNorm (front end)"),
    ("addmm", "linear layers (QKV, out, FFN)"), ("scaled_dot_product", "attention (SDPA kernel)"),
    ("gelu", "GELU"), ("layer_norm", "LayerNorm"), ("weight_norm", "weight norm (positional conv)"),
    ("copy_", "copies"), ("add", "residual adds"),
)


def cpu_s():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


@contextlib.contextmanager
def timed(out, key):
    t0, c0, l0 = time.time(), cpu_s(), os.getloadavg()[0]
    yield
    out[key] = {"wall_s": time.time() - t0, "cpu_s": cpu_s() - c0, "load": [l0, os.getloadavg()[0]]}


def corpus(workdir, n):
    data = os.path.join(workdir, f"data{n}")
    if not os.path.isfile(os.path.join(data, "train.tsv")):
        write_corpus(data, {"train": n}, seconds=(2.0, 5.0), seed=0)
    teacher = os.path.join(workdir, "hubert_base_random.pt")
    if not os.path.isfile(teacher):
        write_random_labels(os.path.join(workdir, "teacher_labels"), {}, n_clusters=100)
        write_checkpoint(teacher, data, os.path.join(workdir, "teacher_labels"), model_overrides=HUBERT_BASE)
    return data, teacher


def forward_all(reader, wavs, batch_seconds):
    if batch_seconds == 0:
        return [reader.features_torch([w])[0] for w in wavs]
    out = [None] * len(wavs)
    for b in length_sorted_batches([len(w) for w in wavs], int(batch_seconds * reader.sample_rate)):
        for i, f in zip(b, reader.features_torch([wavs[i] for i in b])):
            out[i] = f
    return out


def compare(ref, other):
    a, b = torch.cat(ref), torch.cat(other)
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
    return {"max_abs_diff": float((a - b).abs().max()), "max_abs": float(a.abs().max()), "min_cosine": float(cos.min())}


def stages(reader, manifest, wavs, out):
    with timed(out, "read audio"):
        for i in range(len(manifest)):
            read_audio(manifest, i, 16000)
    with torch.inference_mode():
        with timed(out, "MFCC (39 dims)"):
            for w in wavs:
                mfcc_39(torch.from_numpy(w))
        feats = []
        with timed(out, "conv front end (forward_features)"):
            for w in wavs:
                feats.append(reader.model.forward_features(torch.from_numpy(w)[None]))
        with timed(out, "full forward to layer 9 (reader, one at a time)"):
            for w in wavs:
                hidden_states(reader.model, torch.from_numpy(w)[None], None, output_layer=reader.layer, exact_padding=True)
    out["transformer to layer 9 (difference)"] = {
        k: out["full forward to layer 9 (reader, one at a time)"][k] - out["conv front end (forward_features)"][k]
        for k in ("wall_s", "cpu_s")}


def operators(reader, wavs):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward_all(reader, wavs, 0)
    totals, names = {}, set()
    for e in prof.key_averages():
        if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
            cat = next((c for k, c in CATEGORIES if k in e.key), "other")
            totals[cat] = totals.get(cat, 0.0) + e.self_cpu_time_total / 1e6
            if "attention" in e.key:
                names.add(e.key)
    return {"seconds": totals, "attention_ops": sorted(names)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/dicehubert_profile_teacher")
    p.add_argument("--utterances", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", type=float, nargs="+", default=[0, 25, 50, 100], help="seconds per batch (0: alone)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--compile", action="store_true", help="also torch.compile the encoder layers")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    data, teacher = corpus(args.workdir, args.utterances)
    manifest = read_manifest(os.path.join(data, "train.tsv"))
    wavs = [read_audio(manifest, i, 16000) for i in range(len(manifest))]
    audio_s = sum(len(w) for w in wavs) / 16000
    reader = TeacherFeatureReader(teacher, 9)
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, bf16 "
                      f"instructions: {cpu_has_bf16()}", "torch": torch.__version__, "audio_s": audio_s,
           "utterances": len(wavs), "stages": {}, "batching": {}, "paths": {}}
    print(f"{len(wavs)} utterances, {audio_s:.1f} s of audio; {res['machine']}", flush=True)

    torch.set_num_threads(1)
    forward_all(reader, wavs[:1], 0)  # warm-up
    stages(reader, manifest, wavs, res["stages"])
    for k, v in res["stages"].items():
        print(f"  {k:<48} {v['cpu_s']:6.2f} s CPU  {v['wall_s']:6.2f} s wall  ({audio_s / v['cpu_s']:.1f}x real time "
              f"per CPU second)", flush=True)
    res["operators"] = operators(reader, wavs)
    total = sum(res["operators"]["seconds"].values())
    for cat, s in sorted(res["operators"]["seconds"].items(), key=lambda kv: -kv[1]):
        print(f"  op {cat:<45} {s:6.2f} s  {100 * s / total:5.1f} %", flush=True)
    print(f"  attention kernels: {res['operators']['attention_ops']}", flush=True)

    for r in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            order = args.batches if r % 2 == 0 else args.batches[::-1]
            for b in order:
                key = f"threads {threads}, {'one utterance at a time' if b == 0 else f'batches of {b:g} s'}"
                m = {}
                with timed(m, "x"):
                    forward_all(reader, wavs, b)
                res["batching"].setdefault(key, []).append(m["x"])
                print(f"  round {r + 1} {key:<40} {m['x']['cpu_s']:6.2f} s CPU  {m['x']['wall_s']:6.2f} s wall  "
                      f"load {m['x']['load'][0]:.1f}", flush=True)

    torch.set_num_threads(1)
    ref = forward_all(reader, wavs, 0)
    batched = forward_all(reader, wavs, 50)
    res["paths"]["batches of 50 s against one at a time"] = {"equality": compare(ref, batched)}

    def path(name, fn):
        m = {}
        with timed(m, "x"):
            out = fn()
        res["paths"][name] = {**m["x"], "equality": compare(ref, out)}
        e = res["paths"][name]["equality"]
        print(f"  {name:<48} {m['x']['cpu_s']:6.2f} s CPU  max |diff| {e['max_abs_diff']:.2e} of max |x| "
              f"{e['max_abs']:.1f}, min cosine {e['min_cosine']:.6f}", flush=True)

    path("default (inference_mode, SDPA default kernel)", lambda: forward_all(reader, wavs, 0))

    def no_grad():
        with torch.no_grad():
            return [reader._forward([reader._prepare(w)])[0] for w in wavs]

    path("torch.no_grad instead of inference_mode", no_grad)

    def math_sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return forward_all(reader, wavs, 0)

    path("attention forced to SDPA's math kernel", math_sdpa)
    if cpu_has_bf16():
        reader.autocast_dtype = torch.bfloat16
        forward_all(reader, wavs[:1], 0)
        path("bfloat16 autocast (changes the features)", lambda: forward_all(reader, wavs, 0))
        reader.autocast_dtype = None
    if args.compile:
        m = {}
        with timed(m, "x"):
            for layer in reader.model.encoder.layers:
                layer.compile(dynamic=True)
            forward_all(reader, wavs[:2], 0)
        res["paths"]["torch.compile: compile + 2 utterances"] = m["x"]
        print(f"  torch.compile: compile + 2 utterances {m['x']['cpu_s']:.1f} s CPU", flush=True)
        path("torch.compile(dynamic=True) of the encoder layers", lambda: forward_all(reader, wavs, 0))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
