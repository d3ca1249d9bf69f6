"""Benchmark: ``dicehubert-labels fit + dump`` against fairseq's simple_kmeans recipe, side by side.

Same corpus, same teacher (HuBERT Base size, random weights), same layer, K and sample, this
machine's CPU; each step runs in its own process under ``measure.py`` (wall time, peak RSS, bytes
written).  fairseq: ``dump_hubert_feature.py`` -> ``learn_kmeans.py`` -> ``dump_km_label.py`` (the
installed copies, run with ``measure.py --fairseq-shim``; needs ``pip install npy-append-array``).
Ours: ``dicehubert-labels fit`` -> ``dicehubert-labels dump``.  Clustering quality: the k-means
objective (mean squared distance of every frame to its nearest centroid) of both models on the
same features, fairseq's dumped features of the whole corpus.

    python -m benchmarks.labels.run [--scales 20 80] [--layer 9] [--n-clusters 100] [--percent 0.1]
    python -m benchmarks.labels.run --device cuda --dtype float16 --agreement   # on a GPU

On ``--device cuda`` ours runs with ``--device cuda --dtype DTYPE`` and fairseq's
``dump_hubert_feature.py`` runs on the GPU as written (its own ``.cuda()``; only the
``torchaudio.sox_effects`` stub, ``measure.py --sox-stub``).  ``--agreement`` also dumps our
labels with fairseq's k-means model and reports the fraction of frames whose label equals
fairseq's (same centroids: the difference is the features, e.g. our fp16 against its fp32).

Writes ``results.json`` and ``results.md`` in ``--workdir`` and prints the table.
"""

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

from dicehubert_fairseq.labels.fit import load_kmeans
from dicehubert_fairseq.labels.kmeans import objective_of
from tests.helpers.data import write_checkpoint, write_corpus, write_random_labels

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

HUBERT_BASE = {
    "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12,
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2", "final_dim": 256,
    "conv_pos": 128, "conv_pos_groups": 16,
}


def simple_kmeans_dir() -> str:
    return os.path.join(os.path.dirname(importlib.util.find_spec("fairseq").origin), "examples", "hubert",
                        "simple_kmeans")


def measured(name, out_dir, argv, shim=False, module=None, env=None, sox_stub=False):
    """Run one step under measure.py; returns its metrics."""
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{name}.json")
    cmd = [sys.executable, os.path.join(HERE, "measure.py"), "--out", out]
    if shim:
        cmd.append("--fairseq-shim")
    if sox_stub:
        cmd.append("--sox-stub")
    cmd += (["--module", module] if module else [argv[0]]) + ["--"] + (argv if module else argv[1:])
    log = os.path.join(out_dir, f"{name}.log")
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"step {name} failed (exit {p.returncode}); see {log}")
    with open(out) as f:
        m = json.load(f)
    gpu = f"  {m['cuda_peak_mb']:7.0f} MB GPU" if m.get("cuda_peak_mb") is not None else ""
    print(f"  {name:<22} {m['wall_s']:7.1f} s  {m['peak_rss_mb']:7.0f} MB  {m['write_bytes'] / 1e6:9.2f} MB written"
          f"{gpu}", flush=True)
    return m


def dir_bytes(*paths):
    total = 0
    for p in paths:
        if os.path.isfile(p):
            total += os.path.getsize(p)
        for root, _, files in os.walk(p):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def run_scale(n, args, teacher, work):
    d = os.path.join(work, f"n{n}")
    shutil.rmtree(d, ignore_errors=True)
    data = os.path.join(d, "data")
    sizes = write_corpus(data, {"train": n}, seconds=tuple(args.seconds), seed=0)["train"]
    seconds = sum(sizes) / 16000
    print(f"{n} utterances, {seconds / 60:.1f} min of audio", flush=True)
    sk = simple_kmeans_dir()
    # fairseq's scripts: the user's torch.load workaround, and their own directory importable
    # (they import their sibling feature_utils.py, as `python SCRIPT` would allow)
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
               PYTHONPATH=os.pathsep.join(filter(None, [sk, os.environ.get("PYTHONPATH")])))
    L, K, P = str(args.layer), str(args.n_clusters), str(args.percent)
    m = os.path.join(d, "metrics")
    # on the CPU, fairseq's .cuda() calls are made no-ops; on a GPU its script runs as written
    shim = {"shim": True} if args.device == "cpu" else {"sox_stub": True}
    fs = {
        "dump_hubert_feature": measured("fairseq_dump_feature", m, [os.path.join(sk, "dump_hubert_feature.py"), data,
                                        "train", teacher, L, "1", "0", os.path.join(d, "fs_feat")], **shim, env=env),
        "learn_kmeans": measured("fairseq_learn_kmeans", m, [os.path.join(sk, "learn_kmeans.py"),
                                 os.path.join(d, "fs_feat"), "train", "1", os.path.join(d, "fs_km.bin"), K,
                                 "--percent", P, "--seed", str(args.seed)], **shim, env=env),
        "dump_km_label": measured("fairseq_dump_km_label", m, [os.path.join(sk, "dump_km_label.py"),
                                  os.path.join(d, "fs_feat"), "train", os.path.join(d, "fs_km.bin"), "1", "0",
                                  os.path.join(d, "fs_lab")], **shim, env=env),
    }
    device = ["--device", args.device, "--dtype", args.dtype]
    variants = {"ours": device} if not args.bf16 else {"ours": device, "ours_bf16": ["--dtype", "bfloat16"]}
    ours = {}
    for tag, extra in variants.items():
        common = ["--manifest-dir", data, "--checkpoint", teacher, "--layer", L, *extra]
        ours[tag] = {
            "fit": measured(f"{tag}_fit", m, ["fit", *common, "--split", "train", "--n-clusters", K, "--percent", P,
                                              "--seed", str(args.seed), "--out", os.path.join(d, f"{tag}_km.joblib")],
                            module="dicehubert_fairseq.labels"),
            "dump": measured(f"{tag}_dump", m, ["dump", *common, "--split", "train", "--km",
                                                os.path.join(d, f"{tag}_km.joblib"), "--label-dir",
                                                os.path.join(d, f"{tag}_lab")], module="dicehubert_fairseq.labels"),
        }
    agreement = None
    if args.agreement:  # our features, fairseq's centroids: labels comparable frame by frame
        measured("ours_dump_fairseq_km", m, ["dump", "--manifest-dir", data, "--checkpoint", teacher, "--layer", L,
                                             *device, "--split", "train", "--km", os.path.join(d, "fs_km.bin"),
                                             "--label-dir", os.path.join(d, "ours_fskm_lab")],
                 module="dicehubert_fairseq.labels")
        agreement = label_agreement(os.path.join(d, "ours_fskm_lab", "train.km"),
                                    os.path.join(d, "fs_lab", "train_0_1.km"))

    # clustering quality on the same features: fairseq's dump of the whole corpus

    feats = np.load(os.path.join(d, "fs_feat", "train_0_1.npy"), mmap_mode="r")
    objective = {"fairseq": objective_of(load_kmeans(os.path.join(d, "fs_km.bin"))[0].cluster_centers_, feats)}
    for tag in ours:
        objective[tag] = objective_of(load_kmeans(os.path.join(d, f"{tag}_km.joblib"))[0].cluster_centers_, feats)
    # our features vs fairseq's (first utterances), and label files side by side
    with open(os.path.join(d, "fs_lab", "train_0_1.km")) as f:
        fs_frames = [len(line.split()) for line in f]
    with open(os.path.join(d, "ours_lab", "train.km")) as f:
        our_frames = [len(line.split()) for line in f]
    result = {
        "utterances": n, "audio_seconds": seconds, "frames": int(feats.shape[0]), "feature_dim": int(feats.shape[1]),
        "fairseq": {"steps": fs, "wall_s": sum(s["wall_s"] for s in fs.values()),
                    "peak_rss_mb": max(s["peak_rss_mb"] for s in fs.values()),
                    "write_bytes": sum(s["write_bytes"] for s in fs.values()),
                    "final_bytes": dir_bytes(os.path.join(d, "fs_feat"), os.path.join(d, "fs_km.bin"),
                                             os.path.join(d, "fs_lab"))},
        "objective": objective,
        "same_frame_counts": fs_frames == our_frames,
        "label_agreement": agreement,
    }
    for tag, steps in ours.items():
        result[tag] = {"steps": steps, "wall_s": sum(s["wall_s"] for s in steps.values()),
                       "peak_rss_mb": max(s["peak_rss_mb"] for s in steps.values()),
                       "write_bytes": sum(s["write_bytes"] for s in steps.values()),
                       "final_bytes": dir_bytes(os.path.join(d, f"{tag}_km.joblib"), os.path.join(d, f"{tag}_lab"))}
    return result


def label_agreement(ours, theirs):
    """Fraction of frames with the same label in two label files of the same utterances."""
    with open(ours) as f, open(theirs) as g:
        a, b = [line.split() for line in f], [line.split() for line in g]
    if [len(x) for x in a] != [len(x) for x in b]:
        raise SystemExit(f"{ours} and {theirs}: different numbers of frames per utterance")
    same = sum(x == y for u, v in zip(a, b) for x, y in zip(u, v))
    return same / max(sum(len(x) for x in a), 1)


def table(results, args):
    tags = [t for t in ("fairseq", "ours", "ours_bf16") if t in results[0]]
    on = "" if args.device == "cpu" and args.dtype == "float32" else f", --device {args.device} --dtype {args.dtype}"
    names = {"fairseq": "fairseq simple_kmeans (3 scripts)" + (", GPU" if args.device != "cpu" else ""),
             "ours": "dicehubert-labels fit+dump" + on, "ours_bf16": "dicehubert-labels fit+dump, --dtype bfloat16"}
    lines = ["| pipeline | utterances (audio) | wall time | peak RSS | bytes written | k-means objective |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for t in tags:
            x = r[t]
            lines.append(f"| {names[t]} | {r['utterances']} ({r['audio_seconds'] / 60:.1f} min) | {x['wall_s']:.1f} s | "
                         f"{x['peak_rss_mb']:.0f} MB | {x['write_bytes'] / 1e6:.2f} MB | {r['objective'][t]:.2f} |")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        lines += ["", f"Growth from {a['utterances']} to {b['utterances']} utterances "
                      f"({b['audio_seconds'] / a['audio_seconds']:.1f}x audio):", "",
                  "| pipeline | wall time | peak RSS | bytes written |", "|---|---|---|---|"]
        for t in tags:
            lines.append(f"| {names[t]} | {b[t]['wall_s'] / a[t]['wall_s']:.2f}x | "
                         f"{b[t]['peak_rss_mb'] / a[t]['peak_rss_mb']:.2f}x | "
                         f"{b[t]['write_bytes'] / max(a[t]['write_bytes'], 1):.2f}x |")
    if any(r.get("label_agreement") is not None for r in results):
        lines += ["", f"Labels of our features{on or ' (float32)'} with fairseq's k-means model against "
                      "fairseq's labels (float32 features):", "",
                  "| utterances | frames | identical labels |", "|---|---|---|"]
        lines += [f"| {r['utterances']} | {r['frames']} | {100 * r['label_agreement']:.2f} % |" for r in results]
    lines += ["", "Per step (largest corpus):", "", "| step | wall time | peak RSS | bytes written |", "|---|---|---|---|"]
    r = results[-1]
    for t in tags:
        for s, x in r[t]["steps"].items():
            lines.append(f"| {t} {s} | {x['wall_s']:.1f} s | {x['peak_rss_mb']:.0f} MB | {x['write_bytes'] / 1e6:.2f} MB |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/dicehubert_labels_bench")
    p.add_argument("--scales", type=int, nargs="+", default=[20, 80], help="utterances per corpus (default 20 80)")
    p.add_argument("--seconds", type=float, nargs=2, default=[2.0, 5.0], help="utterance length range")
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--n-clusters", type=int, default=100)
    p.add_argument("--percent", type=float, default=0.1, help="fraction of utterances k-means is fitted on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="also run ours with --dtype bfloat16 (autocast on CPU)")
    p.add_argument("--device", default="cpu", help="ours: dicehubert-labels --device; cuda also runs fairseq's "
                                                  "dump_hubert_feature.py on the GPU (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="ours: dicehubert-labels --dtype (default float32)")
    p.add_argument("--agreement", action="store_true",
                   help="also label with fairseq's k-means model and report agreement with fairseq's labels")
    args = p.parse_args()
    try:
        import npy_append_array  # noqa: F401
    except ImportError:
        raise SystemExit("fairseq's dump_hubert_feature.py needs npy-append-array: pip install npy-append-array")
    os.makedirs(args.workdir, exist_ok=True)
    teacher = os.path.join(args.workdir, "hubert_base_random.pt")
    if not os.path.isfile(teacher):
        lab = os.path.join(args.workdir, "teacher_labels")
        write_random_labels(lab, {}, n_clusters=100)
        write_checkpoint(teacher, os.path.join(args.workdir, "n20", "data"), lab, model_overrides=HUBERT_BASE)
    t0 = time.time()
    results = [run_scale(n, args, teacher, args.workdir) for n in args.scales]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if args.device != "cpu":
        import torch

        machine += f", {torch.cuda.get_device_name(torch.device(args.device))}"
    info = {"machine": machine,
            "load_average_at_end": os.getloadavg(), "total_s": time.time() - t0, "args": vars(args)}
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"info": info, "results": results}, f, indent=1)
    md = table(results, args)
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"\n{info['machine']}, load average at the end {info['load_average_at_end']}, "
          f"benchmark took {info['total_s']:.0f} s; results in {args.workdir}/results.json")


if __name__ == "__main__":
    main()
