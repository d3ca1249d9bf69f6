#!/usr/bin/env python3
"""Collect the tiny pipeline's models and probes into results.json, results.md and results.png.

``results.json``::

    {"models": [{"name", "params", "per", "updates", "seconds", ...}, ...], "setup": {...}}

one entry per model of the paper's table (``teacher_n1``, ``teacher_n2`` and the students),
in that order.  ``params``: parameters without the pretraining heads (label embeddings, final
projection, L_feat heads), as the presets are quoted; ``per``: the probe's phone error rate on
the test split (the mean over seeds when a model was trained with several: ``per_seeds``
lists them); ``updates``: training updates; ``seconds``: training wall time (``cpu_seconds``
beside it).  ``results.png``: PER by model (one dot per seed) and the probe's layer weights.

Example::

    python examples/tiny/report.py WORKDIR
"""

import argparse
import json
import os
import re
import statistics
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pipeline import MODELS, STUDENTS  # noqa: E402

WHAT = {
    "teacher_n1": "HuBERT iteration 1 (HuBERT's objective), MFCC k-means labels",
    "teacher_n2": "HuBERT iteration 2 (HuBERT's objective), k-means of a teacher_n1 layer",
    "dicehubert_narrow": "DiceHuBERT L_SSL, hard labels of a teacher_n2 layer",
    "dicehubert_narrow_soft": "DiceHuBERT L_SSL, soft labels of the same layer",
    "dicehubert_shallow": "DiceHuBERT L_SSL, hard labels (teacher width, 1/6 depth)",
    "feat_narrow": "L_feat from teacher_n2, layer to layer (FitHuBERT style)",
    "scratch_narrow": "no teacher: MFCC k-means labels (HuBERT iteration 1)",
}
HEADS = ("label_embs_concat", "final_proj.", "target_glu.", "feat_heads.")


def model_facts(path: str) -> Dict:
    """Parameters without pretraining heads, updates and architecture of a checkpoint."""
    from dicehubert_fairseq.checkpoint import load_state

    state = load_state(path)
    params = sum(v.numel() for k, v in state["model"].items() if not k.startswith(HEADS))
    cfg = state["cfg"]["model"]
    hist = state.get("optimizer_history") or [{}]
    return {"params": int(params), "updates": int(hist[-1].get("num_updates", 0)),
            "layers": int(cfg["encoder_layers"]), "dim": int(cfg["encoder_embed_dim"])}


def collect(workdir: str) -> List[Dict]:
    models = []
    for name in MODELS:
        runs = sorted((n for n in os.listdir(os.path.join(workdir, "models"))
                       if n == name or re.fullmatch(re.escape(name) + r"\.s\d+", n)),
                      key=lambda n: (n != name, n))
        if not runs:
            raise SystemExit(f"report: error: {workdir}/models/{name}: missing (did the pipeline finish?)")
        entries = []
        for run in runs:
            probe_path = os.path.join(workdir, "probe", f"{run}.json")
            done_path = os.path.join(workdir, ".done", f"{run}.done.json")
            ckpt = os.path.join(workdir, "models", run, "checkpoints", "checkpoint_last.pt")
            for p in (probe_path, done_path, ckpt):
                if not os.path.isfile(p):
                    raise SystemExit(f"report: error: {p}: missing (did the pipeline finish?)")
            with open(probe_path) as f:
                probe = json.load(f)
            with open(done_path) as f:
                done = json.load(f)
            seed = re.search(r"common\.seed=(\d+)", done["command"])
            entries.append({**model_facts(ckpt), "per": probe["per"], "valid_per": probe["valid_per"],
                            "layer_weights": probe["layer_weights"], "seconds": done["seconds"],
                            "cpu_seconds": done["cpu_seconds"], "seed": int(seed.group(1)) if seed else None})
        first = entries[0]
        pers = [e["per"] for e in entries]
        m = {"name": name, "params": first["params"], "per": statistics.fmean(pers), "updates": first["updates"],
             "seconds": round(first["seconds"], 1), "cpu_seconds": round(first["cpu_seconds"], 1),
             "layers": first["layers"], "dim": first["dim"], "valid_per": first["valid_per"],
             "layer_weights": first["layer_weights"], "what": WHAT[name]}
        if len(entries) > 1:
            m.update({"per_seeds": pers, "seeds": [e["seed"] for e in entries],
                      "per_std": statistics.stdev(pers)})
        models.append(m)
    return models


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def markdown(models: List[Dict], setup: Dict) -> str:
    lines = ["| model | what it learned from | layers x dim | params | updates | train time | test PER |",
             "|---|---|---|---|---|---|---|"]
    for m in models:
        per = f"{m['per']:.3f}"
        if "per_seeds" in m:
            per += f" ± {m['per_std']:.3f} (seeds: {', '.join(f'{p:.3f}' for p in m['per_seeds'])})"
        lines.append(f"| {m['name']} | {m['what']} | {m['layers']} x {m['dim']} | {m['params'] / 1e6:.2f}M | "
                     f"{m['updates']} | {m['seconds']:.0f} s | {per} |")
    by = {m["name"]: m for m in models}
    d, s = by["dicehubert_narrow"], by["scratch_narrow"]
    gap = s["per"] - d["per"]
    lines += ["", f"Distilled narrow student vs the same student from scratch: PER {d['per']:.3f} vs {s['per']:.3f} "
              f"({'better' if gap > 0 else 'worse'} by {abs(gap):.3f}, {100 * gap / s['per']:+.1f}% relative)."]
    lines += ["", "Setup: " + ", ".join(f"{k} {v}" for k, v in setup.items())]
    return "\n".join(lines) + "\n"


def plot(models: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.1, 1]})
    names = [m["name"] for m in models]
    colors = ["#7f7f7f", "#4d4d4d"] + ["#1f77b4", "#5fa2d4", "#2ca02c", "#ff7f0e", "#d62728"]
    ax1.bar(range(len(models)), [m["per"] for m in models], color=colors[: len(models)])
    for i, m in enumerate(models):
        for p in m.get("per_seeds", []):
            ax1.plot(i, p, "k.", ms=6)
        ax1.text(i, m["per"] + 0.01, f"{m['per']:.3f}", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(models)), names, rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel("test phone error rate (lower is better)")
    lo = min(min(m.get("per_seeds", [m["per"]])) for m in models)
    hi = max(max(m.get("per_seeds", [m["per"]])) for m in models)
    ax1.set_ylim(max(0.0, lo - 0.1), hi + 0.06)
    ax1.set_title("Phone recognition probe (frozen models)")
    for m, c in zip(models, colors):
        w = m["layer_weights"]
        ax2.plot(range(len(w)), w, "o-", color=c, label=m["name"], ms=3)
    ax2.set_xlabel("hidden state (0 = transformer input, k = layer k)")
    ax2.set_ylabel("probe's softmax layer weight")
    ax2.set_title("What the probe uses")
    ax2.legend(fontsize=7)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.24, top=0.92, wspace=0.2)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, force=True)  # fairseq's import sets the root to DEBUG
    w = os.path.abspath(args.workdir)
    models = collect(w)
    logging.getLogger().setLevel(logging.WARNING)
    setup = {}
    corpus = os.path.join(w, "corpus.json")
    if os.path.isfile(corpus):
        with open(corpus) as f:
            info = json.load(f)
        setup["corpus"] = "; ".join(f"{s} {v['utterances']} utts / {v['seconds'] / 60:.1f} min"
                                    for s, v in info["splits"].items())
    results = {"models": models, "setup": setup}
    write_json(os.path.join(w, "results.json"), results)
    md = markdown(models, setup)
    with open(os.path.join(w, "results.md"), "w") as f:
        f.write(md)
    plot(models, os.path.join(w, "results.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
