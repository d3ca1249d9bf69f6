"""Soft-target entropy per temperature and label quality per teacher layer, raw and L2-normalised k-means.

    python -m benchmarks.labels.soft_targets --data CORPUS --checkpoint CKPT --layers 1,2,3 --out OUT.json
        [--n-clusters 100] [--temperatures 0.01,0.03,0.1,0.3,1,5,10,30] [--modes raw,normalized] [--n-init 3]
        [--percent 1.0] [--seed 0] [--threads 1] [--eval-split valid] [--random-base-teacher]

For each layer (``6,9,12`` in one ``--layers`` item: those layers concatenated; ``mfcc``: 39-dim
MFCC at 100 Hz, no teacher) and each k-means
mode, ``dicehubert-labels fit`` on the train split (its report: typical squared distances and the
mean entropy of the top-10 soft label at each temperature, on up to 10000 fitted frames), then,
if ``CORPUS/{eval-split}.align`` exists (``examples/tiny/synth_corpus.py --align``), ``dump`` of
that split and ``quality`` against those phone alignments.  Writes ``OUT.json`` and prints
Markdown tables.  ``--random-base-teacher`` writes a randomly initialised fairseq ``hubert``
checkpoint of HuBERT Base's shape (12 x 768, 7-layer conv front end) to ``--checkpoint``'s path
first (what that can and cannot show: docs/ablations.md).
"""

import argparse
import json
import os
import tempfile
import time

import torch
from threadpoolctl import threadpool_limits

from dicehubert_fairseq.labels.config import Corpus, FeatureConfig
from dicehubert_fairseq.labels.dump import DumpConfig, dump
from dicehubert_fairseq.labels.fit import FitConfig, fit
from dicehubert_fairseq.labels.plan import make_plan
from dicehubert_fairseq.labels.quality import QualityConfig, measure_quality

BASE = {"encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12,
        "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2", "final_dim": 256,
        "conv_pos": 128, "conv_pos_groups": 16}


def write_random_base_teacher(path: str, data: str) -> None:
    """A randomly initialised HuBERT-Base-shaped ``hubert`` checkpoint in fairseq's saved format."""
    from dicehubert_fairseq.data.files import write_dictionary
    from tests.helpers.data import write_checkpoint  # the tests' checkpoint writer (fairseq's saved format)

    labels = tempfile.mkdtemp(prefix="labels_")
    write_dictionary(os.path.join(labels, "dict.km.txt"), 100)
    write_checkpoint(path, data, labels, model_overrides=BASE, seed=0)


def run(a) -> dict:
    rows, quality = [], []
    temps = [float(t) for t in a.temperatures.split(",")]
    work = tempfile.mkdtemp(prefix="soft_targets_")
    align = os.path.join(a.data, f"{a.eval_split}.align")
    for item in a.layers.split(";"):
        mfcc = item == "mfcc"
        layers = None if mfcc else [int(v) for v in item.split(",")]
        for mode in a.modes.split(","):
            tag = f"{item.replace(',', '_')}_{mode}"
            km = os.path.join(work, f"{tag}.joblib")
            feats = FeatureConfig(mfcc=True) if mfcc else FeatureConfig(checkpoint=a.checkpoint, layer=layers)
            t0 = time.time()
            _, meta = fit(make_plan("fit", Corpus(a.data, "train"), feats, fit=FitConfig(
                n_clusters=a.n_clusters, out=km, percent=a.percent, seed=a.seed, n_init=a.n_init,
                normalize=mode == "normalized", report_temperatures=temps), progress=False))
            d = meta["distances"]
            rows.append({"layer": item, "mode": mode, "frames": d["frames"], "nearest_p50": d["nearest"]["p50"],
                         "gap_p10": d["gap"]["p10"], "gap_p50": d["gap"]["p50"], "gap_p90": d["gap"]["p90"],
                         "entropy_bits": d["entropy_bits"], "top1": d["top1"], "top_k": d["top_k"],
                         "entropy_bits_gap": d["entropy_bits_gap"], "top1_gap": d["top1_gap"],
                         "fit_s": round(time.time() - t0, 1)})
            if os.path.isfile(align):
                dump(make_plan("dump", Corpus(a.data, a.eval_split), feats, dump=DumpConfig(km=km, label_dir=work, name=tag),
                               progress=False))
                q = measure_quality(QualityConfig(label_dir=work, labels=[tag], split=a.eval_split, align=align,
                                                  label_rate=100.0 if mfcc else 50.0))[0]
                quality.append({"layer": item, "mode": mode, **{k: q[k] for k in (
                    "phone_purity", "cluster_purity", "pnmi", "frames", "phones", "clusters")}})
            print(f"done {tag} in {time.time() - t0:.0f}s", flush=True)
    return {"checkpoint": os.path.abspath(a.checkpoint), "data": os.path.abspath(a.data), "n_clusters": a.n_clusters,
            "temperatures": temps, "eval_split": a.eval_split, "seed": a.seed, "n_init": a.n_init,
            "percent": a.percent, "threads": a.threads,
            "entropy": rows, "quality": quality}


def tables(res: dict) -> str:
    temps = [f"{t:g}" for t in res["temperatures"]]
    gaps = list(res["entropy"][0]["entropy_bits_gap"]) if res["entropy"] else []
    out = ["| layer | k-means | median d1 | gap p10 / p50 / p90 | " + " | ".join(f"T={t}" for t in temps) + " | "
           + " | ".join(f"T={g} x gap" for g in gaps) + " |", "|---|---|---|---|" + "---|" * (len(temps) + len(gaps))]
    for r in res["entropy"]:
        out.append(f"| {r['layer']} | {r['mode']} | {r['nearest_p50']:.3g} | {r['gap_p10']:.3g} / {r['gap_p50']:.3g} / "
                   f"{r['gap_p90']:.3g} | " + " | ".join(f"{r['entropy_bits'][t]:.2f}" for t in temps) + " | "
                   + " | ".join(f"{r['entropy_bits_gap'][g]:.2f}" for g in gaps) + " |")
    if res["quality"]:
        out += ["", "| layer | k-means | phone purity | cluster purity | PNMI |", "|---|---|---|---|---|"]
        for q in res["quality"]:
            out.append(f"| {q['layer']} | {q['mode']} | {q['phone_purity']:.3f} | {q['cluster_purity']:.3f} | "
                       f"{q['pnmi']:.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="corpus: train.tsv, valid.tsv (and valid.align for quality)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--layers", required=True, help="';'-separated items, each a layer or comma-joined layers")
    p.add_argument("--n-clusters", type=int, default=100)
    p.add_argument("--temperatures", default="0.01,0.03,0.1,0.3,1,5,10,30")
    p.add_argument("--modes", default="raw,normalized")
    p.add_argument("--n-init", type=int, default=3)
    p.add_argument("--percent", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-split", default="valid", help="split whose labels are measured against {split}.align")
    p.add_argument("--random-base-teacher", action="store_true")
    p.add_argument("--out", required=True, help="JSON results")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.random_base_teacher:
        write_random_base_teacher(a.checkpoint, a.data)
    with threadpool_limits(limits=a.threads):
        res = run(a)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(tables(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
