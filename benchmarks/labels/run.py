"""Benchmark: ``dicehubert-labels fit + dump`` against fairseq's simple_kmeans recipe, side by side.

Same corpus, same teacher (HuBERT Base size, random weights), same layer, K and sample, this
machine's CPU; each step runs in its own process under ``measure.py`` (wall time, peak RSS, bytes
written).  fairseq: ``dump_hubert_feature.py`` -> ``learn_kmeans.py`` -> ``dump_km_label.py`` (the
installed copies, run with ``measure.py --fairseq-shim``; needs ``pip install npy-append-array``).
Ours: ``dicehubert-labels fit`` -> ``dicehubert-labels dump``, and ``dicehubert-labels run`` (both
in one process; its files are checked equal to fit + dump's); ``--bf16`` adds both in bfloat16;
on the largest corpus, rows beyond the pool (``--pool-size``: k-means on every utterance, the
sample >= 20x the pool, against learn_kmeans in memory).  Clustering quality: the k-means
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
    print(f"  {name:<26} {m['wall_s']:7.1f} s  {m['cpu_s']:7.1f} s CPU  {m['peak_rss_mb']:7.0f} MB  "
          f"{m['write_bytes'] / 1e6:9.2f} MB written{gpu}  load {m['load_start']:.1f}-{m['load_end']:.1f}", flush=True)
    return m


def dir_bytes(*paths):
    total = 0
    for p in paths:
        if os.path.isfile(p):
            total += os.path.getsize(p)
        for root, _, files in os.walk(p):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def run_scale(n, args, teacher, work, beyond_pool=False):
    d = os.path.join(work, f"n{n}")
    shutil.rmtree(d, ignore_errors=True)
    data = os.path.join(d, "data")
    sizes = write_corpus(data, {"train": n}, seconds=tuple(args.seconds), seed=0)["train"]
    seconds = sum(sizes) / 16000
    print(f"{n} utterances, {seconds / 60:.1f} min of audio", flush=True)
    sk = simple_kmeans_dir()
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    # fairseq's scripts: the user's torch.load workaround, and their own directory importable
    # (they import their sibling feature_utils.py, as `python SCRIPT` would allow)
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", **threads,
               PYTHONPATH=os.pathsep.join(filter(None, [sk, os.environ.get("PYTHONPATH")])))
    our_env = dict(os.environ, **threads)
    L, K, P = str(args.layer), str(args.n_clusters), str(args.percent)
    m = os.path.join(d, "metrics")
    # on the CPU, fairseq's .cuda() calls are made no-ops; on a GPU its script runs as written
    shim = {"shim": True} if args.device == "cpu" else {"sox_stub": True}

    def learn_kmeans(name, km, percent, n_clusters=args.n_clusters):
        return measured(name, m, [os.path.join(sk, "learn_kmeans.py"), os.path.join(d, "fs_feat"), "train", "1", km,
                                  str(n_clusters), "--percent", percent, "--seed", str(args.seed)], **shim, env=env)

    def dump_km_label(name, km, out):
        return measured(name, m, [os.path.join(sk, "dump_km_label.py"), os.path.join(d, "fs_feat"), "train", km,
                                  "1", "0", out], **shim, env=env)

    fs = {
        "dump_hubert_feature": measured("fairseq_dump_feature", m, [os.path.join(sk, "dump_hubert_feature.py"), data,
                                        "train", teacher, L, "1", "0", os.path.join(d, "fs_feat")], **shim, env=env),
        "learn_kmeans": learn_kmeans("fairseq_learn_kmeans", os.path.join(d, "fs_km.bin"), P),
        "dump_km_label": dump_km_label("fairseq_dump_km_label", os.path.join(d, "fs_km.bin"), os.path.join(d, "fs_lab")),
    }
    device = ["--device", args.device, "--dtype", args.dtype]
    variants = {"ours": device} if not args.bf16 else {"ours": device, "ours_bf16": ["--dtype", "bfloat16"]}
    ours = {}

    def ours_step(name, argv):
        return measured(name, m, argv, module="dicehubert_fairseq.labels", env=our_env)

    source = ["--manifest-dir", data, "--checkpoint", teacher, "--layer", L, "--split", "train"]
    common = source + ["--seed", str(args.seed)]
    for tag, extra in variants.items():
        ours[tag] = {
            "fit": ours_step(f"{tag}_fit", ["fit", *common, *extra, "--n-clusters", K, "--percent", P,
                                            "--out", os.path.join(d, f"{tag}_km.joblib")]),
            "dump": ours_step(f"{tag}_dump", ["dump", *source, *extra, "--km", os.path.join(d, f"{tag}_km.joblib"),
                                              "--label-dir", os.path.join(d, f"{tag}_lab")]),
        }
    # one process: fit + dump, the sample's features reused (same model and label bytes as fit + dump)
    ours["ours_run"] = {"run": ours_step("ours_run", ["run", *common, *device, "--n-clusters", K, "--percent", P,
                                                     "--out", os.path.join(d, "ours_run_km.joblib"),
                                                     "--label-dir", os.path.join(d, "ours_run_lab")])}
    bf16_agreement = None
    if args.bf16:  # bfloat16 changes the features: its labels under fairseq's model, against fairseq's
        ours["ours_run_bf16"] = {"run": ours_step("ours_run_bf16", [
            "run", *common, "--dtype", "bfloat16", "--n-clusters", K, "--percent", P,
            "--out", os.path.join(d, "ours_run_bf16_km.joblib"), "--label-dir", os.path.join(d, "ours_run_bf16_lab")])}
        ours_step("ours_bf16_dump_fairseq_km", ["dump", *source, "--dtype", "bfloat16", "--km",
                                                os.path.join(d, "fs_km.bin"), "--label-dir",
                                                os.path.join(d, "ours_bf16_fskm_lab")])
        bf16_agreement = label_agreement(os.path.join(d, "ours_bf16_fskm_lab", "train.km"),
                                         os.path.join(d, "fs_lab", "train_0_1.km"))
    agreement = None
    if args.agreement:  # our features, fairseq's centroids: labels comparable frame by frame
        ours_step("ours_dump_fairseq_km", ["dump", "--manifest-dir", data, "--checkpoint", teacher, "--layer", L,
                                           *device, "--split", "train", "--km", os.path.join(d, "fs_km.bin"),
                                           "--label-dir", os.path.join(d, "ours_fskm_lab")])
        agreement = label_agreement(os.path.join(d, "ours_fskm_lab", "train.km"),
                                    os.path.join(d, "fs_lab", "train_0_1.km"))

    # clustering quality on the same features: fairseq's dump of the whole corpus
    feats = np.load(os.path.join(d, "fs_feat", "train_0_1.npy"), mmap_mode="r")

    def objective(path):
        return objective_of(load_kmeans(path)[0].cluster_centers_, feats)

    objectives = {"fairseq": objective(os.path.join(d, "fs_km.bin"))}
    for tag in ours:
        objectives[tag] = objective(os.path.join(d, f"{tag}_km.joblib"))
    # our features vs fairseq's (first utterances), and label files side by side
    with open(os.path.join(d, "fs_lab", "train_0_1.km")) as f:
        fs_frames = [len(line.split()) for line in f]
    with open(os.path.join(d, "ours_lab", "train.km")) as f:
        our_frames = [len(line.split()) for line in f]
    result = {
        "utterances": n, "audio_seconds": seconds, "frames": int(feats.shape[0]), "feature_dim": int(feats.shape[1]),
        "fairseq": summed(fs, os.path.join(d, "fs_feat"), os.path.join(d, "fs_km.bin"), os.path.join(d, "fs_lab")),
        "objective": objectives,
        "same_frame_counts": fs_frames == our_frames,
        "run_same_as_fit_dump": same_files(os.path.join(d, "ours_lab"), os.path.join(d, "ours_run_lab"))
        and same_model(os.path.join(d, "ours_km.joblib"), os.path.join(d, "ours_run_km.joblib")),
        "label_agreement": agreement, "bf16_label_agreement": bf16_agreement,
    }
    for tag, steps in ours.items():
        result[tag] = summed(steps, os.path.join(d, f"{tag}_km.joblib"), os.path.join(d, f"{tag}_lab"))
    if beyond_pool:
        result["beyond_pool"] = [run_beyond_pool(args, k, d, feats, learn_kmeans, dump_km_label, ours_step, common,
                                                 device, fs["dump_hubert_feature"]) for k in args.pool_n_clusters]
    return result


def run_beyond_pool(args, k, d, feats, learn_kmeans, dump_km_label, ours_step, common, device, fs_dump_feature):
    """K = ``k`` on every utterance with a pool of ``args.pool_size`` frames (the sample >= 20x the
    pool): ours streams it (``run --percent 1 --pool-size``), fairseq's learn_kmeans fits it in memory."""
    pool, batch = args.pool_size, args.pool_batch_size or args.pool_size // 2
    km_fs, km_ours = os.path.join(d, f"fs_km_all_k{k}.bin"), os.path.join(d, f"ours_run_pool_k{k}_km.joblib")
    fs = {"dump_hubert_feature": fs_dump_feature,
          "learn_kmeans": learn_kmeans(f"fairseq_learn_kmeans_all_k{k}", km_fs, "1", n_clusters=k),
          "dump_km_label": dump_km_label(f"fairseq_dump_km_label_all_k{k}", km_fs, os.path.join(d, f"fs_lab_all_k{k}"))}
    ours = {"run": ours_step(f"ours_run_pool_k{k}", ["run", *common, *device, "--n-clusters", str(k),
                                                     "--percent", "1", "--pool-size", str(pool), "--batch-size", str(batch),
                                                     "--out", km_ours, "--label-dir",
                                                     os.path.join(d, f"ours_run_pool_k{k}_lab")])}
    _, meta = load_kmeans(km_ours)
    obj_fs = objective_of(load_kmeans(km_fs)[0].cluster_centers_, feats)
    obj_ours = objective_of(load_kmeans(km_ours)[0].cluster_centers_, feats)
    return {"n_clusters": k, "pool_size": pool, "batch_size": batch, "sample_frames": int(meta["frames"]),
            "sample_over_pool": meta["frames"] / pool, "passes": meta["passes"],
            "fairseq": summed(fs), "ours_run": summed(ours),
            "objective": {"fairseq": obj_fs, "ours_run": obj_ours}, "objective_ratio": obj_ours / obj_fs}


def summed(steps, *outputs):
    """Totals of a pipeline's steps (wall and CPU time summed, peak RSS the largest)."""
    out = {"steps": steps, "wall_s": sum(s["wall_s"] for s in steps.values()),
           "cpu_s": sum(s.get("cpu_s", float("nan")) for s in steps.values()),
           "peak_rss_mb": max(s["peak_rss_mb"] for s in steps.values()),
           "write_bytes": sum(s["write_bytes"] for s in steps.values()),
           "load": [s.get("load_start") for s in steps.values()] + [list(steps.values())[-1].get("load_end")]}
    if outputs:
        out["final_bytes"] = dir_bytes(*outputs)
    return out


def same_files(a, b):
    """Every file of directory ``a`` has the same bytes in ``b`` (the soft sidecar JSON: but its
    ``km`` path)."""
    for name in sorted(os.listdir(a)):
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        if name.endswith(".json"):
            with open(pa) as f, open(pb) as g:
                x, y = json.load(f), json.load(g)
            x.pop("km", None), y.pop("km", None)
            if x != y:
                return False
        elif not os.path.isfile(pb) or open(pa, "rb").read() != open(pb, "rb").read():
            return False
    return True


def same_model(a, b):
    ka, kb = load_kmeans(a)[0], load_kmeans(b)[0]
    return bool(np.array_equal(ka.cluster_centers_, kb.cluster_centers_))


def label_agreement(ours, theirs):
    """Fraction of frames with the same label in two label files of the same utterances."""
    with open(ours) as f, open(theirs) as g:
        a, b = [line.split() for line in f], [line.split() for line in g]
    if [len(x) for x in a] != [len(x) for x in b]:
        raise SystemExit(f"{ours} and {theirs}: different numbers of frames per utterance")
    same = sum(x == y for u, v in zip(a, b) for x, y in zip(u, v))
    return same / max(sum(len(x) for x in a), 1)


def _load(x):
    loads = [v for v in x["load"] if v is not None]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"


def table(results, args):
    tags = [t for t in ("fairseq", "ours", "ours_bf16", "ours_run", "ours_run_bf16") if t in results[0]]
    on = "" if args.device == "cpu" and args.dtype == "float32" else f", --device {args.device} --dtype {args.dtype}"
    names = {"fairseq": "fairseq simple_kmeans (3 scripts)" + (", GPU" if args.device != "cpu" else ""),
             "ours": "dicehubert-labels fit + dump" + on, "ours_bf16": "dicehubert-labels fit + dump, --dtype bfloat16",
             "ours_run": "dicehubert-labels run (one process)" + on,
             "ours_run_bf16": "dicehubert-labels run (one process), --dtype bfloat16"}
    lines = ["| pipeline | utterances (audio) | wall time | CPU time | wall / fairseq | CPU / fairseq | peak RSS | "
             "bytes written | k-means objective | load average |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fs = r["fairseq"]
        for t in tags:
            x = r[t]
            lines.append(f"| {names[t]} | {r['utterances']} ({r['audio_seconds'] / 60:.1f} min) | {x['wall_s']:.1f} s | "
                         f"{x['cpu_s']:.1f} s | {x['wall_s'] / fs['wall_s']:.2f} | {x['cpu_s'] / fs['cpu_s']:.2f} | "
                         f"{x['peak_rss_mb']:.0f} MB | {x['write_bytes'] / 1e6:.2f} MB | {r['objective'][t]:.2f} | "
                         f"{_load(x)} |")
    lines += ["", "`run` wrote the k-means model and label files of `fit` + `dump`: "
              + ", ".join(f"{r['utterances']} utterances: {'identical' if r['run_same_as_fit_dump'] else 'DIFFERENT'}"
                          for r in results)]
    if len(results) >= 2:
        a, b = results[0], results[-1]
        lines += ["", f"Growth from {a['utterances']} to {b['utterances']} utterances "
                      f"({b['audio_seconds'] / a['audio_seconds']:.1f}x audio):", "",
                  "| pipeline | wall time | CPU time | peak RSS | bytes written |", "|---|---|---|---|---|"]
        for t in tags:
            lines.append(f"| {names[t]} | {b[t]['wall_s'] / a[t]['wall_s']:.2f}x | {b[t]['cpu_s'] / a[t]['cpu_s']:.2f}x | "
                         f"{b[t]['peak_rss_mb'] / a[t]['peak_rss_mb']:.2f}x | "
                         f"{b[t]['write_bytes'] / a[t]['write_bytes']:.2f}x |")
    if any(r.get("bf16_label_agreement") is not None for r in results):
        lines += ["", "Labels of our bfloat16 features with fairseq's k-means model against fairseq's labels "
                      "(float32 features): " + ", ".join(f"{r['utterances']} utterances: "
                                                          f"{100 * r['bf16_label_agreement']:.2f} % identical"
                                                          for r in results)]
    if any(r.get("label_agreement") is not None for r in results):
        lines += ["", f"Labels of our features{on or ' (float32)'} with fairseq's k-means model against "
                      "fairseq's labels (float32 features):", "",
                  "| utterances | frames | identical labels |", "|---|---|---|"]
        lines += [f"| {r['utterances']} | {r['frames']} | {100 * r['label_agreement']:.2f} % |" for r in results]
    r = results[-1]
    lines += ["", "Per step (largest corpus):", "",
              "| step | wall time | CPU time | peak RSS | bytes written | load average (start, end) |",
              "|---|---|---|---|---|---|"]
    for t in tags:
        for s, x in r[t]["steps"].items():
            lines.append(f"| {t} {s} | {x['wall_s']:.1f} s | {x.get('cpu_s', float('nan')):.1f} s | "
                         f"{x['peak_rss_mb']:.0f} MB | {x['write_bytes'] / 1e6:.2f} MB | "
                         f"{x.get('load_start', float('nan')):.1f}, {x.get('load_end', float('nan')):.1f} |")
    if r.get("beyond_pool"):
        bp0 = r["beyond_pool"][0]
        lines += ["", f"k-means on every utterance ({bp0['sample_frames']} frames), our pool {bp0['pool_size']} frames "
                      f"({bp0['sample_over_pool']:.1f}x smaller than the sample; mini-batch {bp0['batch_size']}): "
                      "ours streams it in two passes, fairseq's learn_kmeans (batch 10000) holds it in memory. "
                      "Objective on every frame:", "",
                  "| pipeline | K | pool frames per cluster | wall time | CPU time | peak RSS | k-means objective | "
                  "ours / fairseq |", "|---|---|---|---|---|---|---|---|"]
        for bp in r["beyond_pool"]:
            for t, name in (("fairseq", "fairseq simple_kmeans, learn_kmeans --percent 1"),
                            ("ours_run", f"dicehubert-labels run --percent 1 --pool-size {bp['pool_size']}")):
                x = bp[t]
                ratio = f"{100 * (bp['objective_ratio'] - 1):+.2f} %" if t == "ours_run" else ""
                lines.append(f"| {name} | {bp['n_clusters']} | {bp['pool_size'] / bp['n_clusters']:.0f} | "
                             f"{x['wall_s']:.1f} s | {x['cpu_s']:.1f} s | {x['peak_rss_mb']:.0f} MB | "
                             f"{bp['objective'][t]:.2f} | {ratio} |")
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
    p.add_argument("--bf16", action="store_true",
                   help="also run ours (fit + dump, and run) with --dtype bfloat16 (autocast on CPU), and label "
                        "with bfloat16 features under fairseq's k-means model (agreement with fairseq's labels)")
    p.add_argument("--device", default="cpu", help="ours: dicehubert-labels --device; cuda also runs fairseq's "
                                                  "dump_hubert_feature.py on the GPU (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="ours: dicehubert-labels --dtype (default float32)")
    p.add_argument("--agreement", action="store_true",
                   help="also label with fairseq's k-means model and report agreement with fairseq's labels")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every step, fairseq's and ours (default: unset, torch uses every core)")
    p.add_argument("--pool-size", type=int, default=700,
                   help="the row beyond the pool (largest corpus): k-means on every utterance with this pool "
                        "(default 700 frames; 0: no such row)")
    p.add_argument("--pool-batch-size", type=int, default=None, help="its mini-batch (default: half the pool)")
    p.add_argument("--pool-n-clusters", type=int, nargs="+", default=[100, 25],
                   help="K of the rows beyond the pool (default 100 25: 7 and 28 pool frames per cluster)")
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
    t0, load0 = time.time(), os.getloadavg()
    results = [run_scale(n, args, teacher, args.workdir, beyond_pool=bool(args.pool_size) and i == len(args.scales) - 1)
               for i, n in enumerate(args.scales)]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if args.device != "cpu":
        import torch

        machine += f", {torch.cuda.get_device_name(torch.device(args.device))}"
    info = {"machine": machine, "load_average_at_start": load0,
            "load_average_at_end": os.getloadavg(), "total_s": time.time() - t0, "args": vars(args)}
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"info": info, "results": results}, f, indent=1)
    md = table(results, args)
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"\n{info['machine']}, load average at the start {info['load_average_at_start']}, at the end "
          f"{info['load_average_at_end']}, "
          f"benchmark took {info['total_s']:.0f} s; results in {args.workdir}/results.json")


if __name__ == "__main__":
    main()
