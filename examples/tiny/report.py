#!/usr/bin/env python3
"""Collect the tiny pipeline's models and probes into results.json, results.md and results.png.

``results.json``::

    {"models": [...], "claims": [...], "verdict_rule": "...", "teacher_layers": {...},
     "timing": {...}, "setup": {...}}

``models``: one entry per row of the paper's table (``teacher_n1``, ``teacher_n2`` and the
students), in that order: ``params`` (without the pretraining heads: label embeddings, final
projection, L_feat heads, as the presets are quoted), ``layers``, ``dim``, ``updates``;
``seeds`` and, per seed, ``per_seeds`` (test PER of the probe), ``valid_per_seeds`` and
``seconds_seeds`` (training wall time); ``per`` / ``valid_per`` / ``seconds`` their means,
``per_std`` the standard deviation over seeds (None with one seed); ``layer_weights`` the
probe's layer weights averaged over seeds.

``claims``: the paper's comparisons (:data:`CLAIMS`), each with the two rows compared
(``better``: the row the paper says is better, ``worse``), their means and standard deviations,
the paired per-seed differences ``diffs`` (PER of ``worse`` minus PER of ``better``, seed by
seed; a row trained once, a teacher, is compared with every seed of the other), their mean
``mean_diff``, standard error ``se``, the 95% t interval ``ci95``, the relative difference
``rel_diff`` (``mean_diff`` over the mean PER of ``worse``) and the ``verdict`` by
:data:`VERDICT_RULE`.

``teacher_layers``: per teacher probed layer by layer, the valid and test PER of each hidden
state alone and the best one on valid.  ``timing``: wall and CPU seconds per kind of job
(corpus synthesis, labels, teachers, students, probes).
``results.png`` (needs matplotlib; skipped with a message otherwise): PER by model (bar: mean,
line: one standard deviation, dots: seeds), the probe's layer weights, and the teachers' PER
layer by layer.

Example::

    python examples/tiny/report.py WORKDIR
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
from typing import Dict, List, Optional, Sequence

from pipeline import MODELS, TEACHERS, timing  # beside this script (python puts its directory first on the path)

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

#: (id, the paper's claim, the row the paper says is better, the other row)
CLAIMS = [
    ("distillation", "distilling helps: the distilled narrow student beats the same student trained from scratch",
     "dicehubert_narrow", "scratch_narrow"),
    ("ssl_vs_feat", "L_SSL beats L_feat on the same narrow student (the paper: over 21% relative on phone "
     "recognition)", "dicehubert_narrow", "feat_narrow"),
    ("narrow_vs_shallow", "at about the same size, the narrow student (teacher depth, half width) beats the shallow "
     "one (teacher width, 1/6 depth)", "dicehubert_narrow", "dicehubert_shallow"),
    ("hard_vs_soft", "hard labels (the paper's default objective) beat soft labels of the same layer",
     "dicehubert_narrow", "dicehubert_narrow_soft"),
    ("teacher_vs_student", "the teacher beats its distilled narrow student (compression costs accuracy)",
     "teacher_n2", "dicehubert_narrow"),
]
CONFIDENCE = 0.95
VERDICT_RULE = (
    "Paired over seeds: d_s = test PER of the row the paper says is worse minus test PER of the row it says is "
    "better, for every seed s both rows were trained with (a row trained once, a teacher, is compared with every "
    "seed of the other). With n such differences, mean d and standard error SE = sd(d) / sqrt(n), the two-sided "
    f"{CONFIDENCE:.0%} t interval d +- t(n-1) * SE decides: 'holds' if it lies above 0 (the paper's row is better), "
    "'reversed' if it lies below 0, 'within noise' if it contains 0; 'too few seeds' with n < 2. With 3 seeds, "
    "t(2) = 4.30: a difference must exceed 4.3 standard errors."
)


def model_facts(path: str) -> Dict:
    """Parameters without pretraining heads, updates and architecture of a checkpoint."""
    from dicehubert_fairseq.checkpoint import load_state

    state = load_state(path)
    params = sum(v.numel() for k, v in state["model"].items() if not k.startswith(HEADS))
    cfg = state["cfg"]["model"]
    hist = state.get("optimizer_history") or [{}]
    return {"params": int(params), "updates": int(hist[-1].get("num_updates", 0)),
            "layers": int(cfg["encoder_layers"]), "dim": int(cfg["encoder_embed_dim"])}


def _read(path: str) -> Dict:
    if not os.path.isfile(path):
        raise SystemExit(f"report: error: {path}: missing (did the pipeline finish?)")
    with open(path) as f:
        return json.load(f)


def _std(xs: Sequence[float]) -> Optional[float]:
    return statistics.stdev(xs) if len(xs) > 1 else None


def collect(workdir: str) -> List[Dict]:
    """One entry per model of :data:`MODELS`, with every seed's numbers (see the module doc)."""
    models = []
    for name in MODELS:
        runs = sorted((n for n in os.listdir(os.path.join(workdir, "models"))
                       if n == name or re.fullmatch(re.escape(name) + r"\.s\d+", n)),
                      key=lambda n: (n != name, int(n.rsplit(".s", 1)[1]) if n != name else 0))
        if not runs:
            raise SystemExit(f"report: error: {workdir}/models/{name}: missing (did the pipeline finish?)")
        entries = []
        for run in runs:
            probe = _read(os.path.join(workdir, "probe", f"{run}.json"))
            done = _read(os.path.join(workdir, ".done", f"{run}.done.json"))
            ckpt = os.path.join(workdir, "models", run, "checkpoints", "checkpoint_last.pt")
            if not os.path.isfile(ckpt):
                raise SystemExit(f"report: error: {ckpt}: missing (did the pipeline finish?)")
            seed = re.search(r"common\.seed=(\d+)", done["command"])
            entries.append({**model_facts(ckpt), "per": probe["per"], "valid_per": probe["valid_per"],
                            "layer_weights": probe["layer_weights"], "seconds": done["seconds"],
                            "cpu_seconds": done["cpu_seconds"], "seed": int(seed.group(1)) if seed else None})
        first = entries[0]
        pers = [e["per"] for e in entries]
        valid = [e["valid_per"] for e in entries]
        weights = [statistics.fmean(ws) for ws in zip(*(e["layer_weights"] for e in entries))]
        models.append({
            "name": name, "what": WHAT[name], "params": first["params"], "layers": first["layers"],
            "dim": first["dim"], "updates": first["updates"],
            "seeds": [e["seed"] for e in entries], "per_seeds": pers, "valid_per_seeds": valid,
            "seconds_seeds": [round(e["seconds"], 1) for e in entries],
            "per": statistics.fmean(pers), "per_std": _std(pers), "valid_per": statistics.fmean(valid),
            "valid_per_std": _std(valid),
            "seconds": round(statistics.fmean(e["seconds"] for e in entries), 1),
            "cpu_seconds": round(statistics.fmean(e["cpu_seconds"] for e in entries), 1),
            "layer_weights": weights,
        })
    return models


def t_quantile(p: float, dof: int) -> float:
    """Quantile ``p`` of Student's t distribution with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def compare(better: Dict, worse: Dict, confidence: float = CONFIDENCE) -> Dict:
    """Paired comparison of two rows of :func:`collect` by :data:`VERDICT_RULE`.

    Args:
        better: the row the paper says has the lower PER.
        worse: the other row.
        confidence: of the two-sided t interval.

    Returns:
        ``{"seeds", "diffs", "n", "mean_diff", "se", "ci95", "rel_diff", "verdict"}``; ``diffs``
        per seed: PER of ``worse`` minus PER of ``better`` (positive: the paper's direction).
    """
    b = dict(zip(better["seeds"], better["per_seeds"]))
    w = dict(zip(worse["seeds"], worse["per_seeds"]))
    if len(b) == 1 and len(w) > 1:  # a row trained once (a teacher) against every seed of the other
        (only,) = b.values()
        seeds = sorted(w)
        diffs = [w[s] - only for s in seeds]
    elif len(w) == 1 and len(b) > 1:
        (only,) = w.values()
        seeds = sorted(b)
        diffs = [only - b[s] for s in seeds]
    else:
        seeds = sorted(set(b) & set(w))
        diffs = [w[s] - b[s] for s in seeds]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    out = {"seeds": seeds, "diffs": diffs, "n": n, "mean_diff": mean, "se": None, "ci95": None,
           "rel_diff": mean / worse["per"] if worse["per"] else math.nan}
    if n < 2:
        out["verdict"] = "too few seeds"
        return out
    se = statistics.stdev(diffs) / math.sqrt(n)
    half = t_quantile(0.5 + confidence / 2, n - 1) * se
    out.update(se=se, ci95=[mean - half, mean + half])
    out["verdict"] = "holds" if mean - half > 0 else "reversed" if mean + half < 0 else "within noise"
    return out


def claims(models: List[Dict]) -> List[Dict]:
    """One entry per claim of :data:`CLAIMS` (rows absent from ``models`` are skipped)."""
    by = {m["name"]: m for m in models}
    out = []
    for cid, text, better, worse in CLAIMS:
        if better not in by or worse not in by:
            continue
        b, w = by[better], by[worse]
        out.append({"id": cid, "claim": text, "better": better, "worse": worse,
                    "better_mean": b["per"], "better_sd": b["per_std"], "worse_mean": w["per"],
                    "worse_sd": w["per_std"], **compare(b, w)})
    return out


def teacher_layers(workdir: str) -> Dict[str, Dict]:
    """Per teacher probed hidden state by hidden state (``probe/{teacher}.layers.json``, written by
    probe_layers.py): each state's valid and test PER and the best one on valid."""
    out = {}
    for name in TEACHERS:
        path = os.path.join(workdir, "probe", f"{name}.layers.json")
        if os.path.isfile(path):
            r = _read(path)
            out[name] = {"layers": [{k: row[k] for k in ("layer", "valid_per", "per")} for row in r["layers"]],
                         "best_layer": r["best_layer"]}
    return out


def target_layer(workdir: str, job: str) -> Optional[int]:
    """The teacher layer the k-means job ``job`` (``km_it1``, ``km_it2``) was fitted on, from the
    command its ``.done`` marker records (``--layer auto`` resolved to the layer chosen on valid)."""
    path = os.path.join(workdir, ".done", f"{job}.done.json")
    if not os.path.isfile(path):
        return None
    found = re.search(r"--layer (\d+)", _read(path)["command"])
    return int(found.group(1)) if found else None


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _pm(mean: float, sd: Optional[float]) -> str:
    return f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f}"


def markdown(results: Dict) -> str:
    models, setup = results["models"], results["setup"]
    lines = ["| model | what it learned from | layers x dim | params | updates | train time | test PER "
             "(mean ± sd) | test PER per seed | valid PER |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        seeds = ", ".join(f"{p:.3f}" for p in m["per_seeds"])
        lines.append(f"| {m['name']} | {m['what']} | {m['layers']} x {m['dim']} | {m['params'] / 1e6:.2f}M | "
                     f"{m['updates']} | {m['seconds']:.0f} s | {_pm(m['per'], m['per_std'])} | {seeds} | "
                     f"{_pm(m['valid_per'], m['valid_per_std'])} |")
    lines += ["", "Claims (test PER; computed by report.py):", "",
              "| claim | paper's better row | other row | difference (other - better), 95% CI | relative | "
              "seeds | verdict |", "|---|---|---|---|---|---|---|"]
    for c in results["claims"]:
        ci = "" if c["ci95"] is None else f" [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
        lines.append(f"| {c['claim']} | {c['better']} {_pm(c['better_mean'], c['better_sd'])} | {c['worse']} "
                     f"{_pm(c['worse_mean'], c['worse_sd'])} | {c['mean_diff']:+.3f}{ci} | "
                     f"{100 * c['rel_diff']:+.1f}% | {c['n']} | **{c['verdict']}** |")
    lines += ["", "Verdict rule: " + results["verdict_rule"]]
    for name, t in results["teacher_layers"].items():
        lines += ["", f"{name}, each hidden state probed alone (0 = transformer input): best on valid: "
                      f"layer {t['best_layer']}", "",
                  "| hidden state | " + " | ".join(str(r["layer"]) for r in t["layers"]) + " |",
                  "|---|" + "---|" * len(t["layers"]),
                  "| valid PER | " + " | ".join(f"{r['valid_per']:.3f}" for r in t["layers"]) + " |",
                  "| test PER | " + " | ".join(f"{r['per']:.3f}" for r in t["layers"]) + " |"]
    if results["timing"]:
        lines += ["", "| jobs | count | wall (sum) | CPU (sum) | span (first start to last end) |",
                  "|---|---|---|---|---|"]
        for kind, k in results["timing"].items():
            span = "" if k["span_seconds"] is None else f"{k['span_seconds']:.0f} s"
            cpu = "" if k["cpu_seconds"] is None else f"{k['cpu_seconds']:.0f} s"
            lines.append(f"| {kind} | {k['jobs']} | {k['wall_seconds']:.0f} s | {cpu} | {span} |")
    lines += ["", "Setup: " + ", ".join(f"{k} {v}" for k, v in setup.items())]
    return "\n".join(lines) + "\n"


def plot(results: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, layers = results["models"], results["teacher_layers"]
    panels = 3 if layers else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8))
    ax1, ax2 = axes[0], axes[1]
    names = [m["name"] for m in models]
    colors = ["#7f7f7f", "#4d4d4d"] + ["#1f77b4", "#5fa2d4", "#2ca02c", "#ff7f0e", "#d62728"]
    ax1.bar(range(len(models)), [m["per"] for m in models], color=colors[: len(models)],
            yerr=[m["per_std"] or 0.0 for m in models], capsize=4, ecolor="#333333")
    for i, m in enumerate(models):
        for p in m["per_seeds"]:
            ax1.plot(i, p, "k.", ms=6)
        ax1.text(i, max(m["per_seeds"]) + 0.01, f"{m['per']:.3f}", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(models)), names, rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel("test phone error rate (lower is better)")
    lo = min(min(m["per_seeds"]) for m in models)
    hi = max(max(m["per_seeds"]) for m in models)
    ax1.set_ylim(max(0.0, lo - 0.1), hi + 0.06)
    ax1.set_title("Phone probe: mean, ± 1 sd, one dot per seed")
    for m, c in zip(models, colors):
        w = m["layer_weights"]
        ax2.plot(range(len(w)), w, "o-", color=c, label=m["name"], ms=3)
    ax2.set_xlabel("hidden state (0 = transformer input, k = layer k)")
    ax2.set_ylabel("probe's softmax layer weight (mean over seeds)")
    ax2.set_title("What the weighted-sum probe uses")
    ax2.legend(fontsize=7)
    if layers:
        ax3 = axes[2]
        for name, t in layers.items():
            c = colors[TEACHERS.index(name)]
            ks = [r["layer"] for r in t["layers"]]
            ax3.plot(ks, [r["valid_per"] for r in t["layers"]], "o-", color=c, label=f"{name} valid", ms=4)
            ax3.plot(ks, [r["per"] for r in t["layers"]], "s--", color=c, label=f"{name} test", ms=3, alpha=0.7)
        ax3.set_xlabel("hidden state probed alone (0 = transformer input)")
        ax3.set_ylabel("phone error rate")
        ax3.set_title("Teachers, layer by layer")
        ax3.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


PLOT_HINT = ("results.png skipped: matplotlib is not installed (install it with: pip install -e '.[plot]', "
             "or pip install 'matplotlib>=3.7'; then run python examples/tiny/report.py WORKDIR again)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, force=True)  # fairseq's import sets the root to DEBUG
    w = os.path.abspath(args.workdir)
    models = collect(w)
    logging.getLogger().setLevel(logging.WARNING)
    setup, times = {}, {}
    corpus = os.path.join(w, "corpus.json")
    if os.path.isfile(corpus):
        with open(corpus) as f:
            info = json.load(f)
        setup["corpus"] = "; ".join(f"{s} {v['utterances']} utts / {v['seconds'] / 60:.1f} min"
                                    for s, v in info["splits"].items())
        if info.get("voice_set"):
            setup["voices"] = info["voice_set"]
        if info.get("synthesis_seconds") is not None:
            times["corpus"] = {"jobs": 1, "wall_seconds": info["synthesis_seconds"], "cpu_seconds": None,
                               "span_seconds": info["synthesis_seconds"]}
    for job, teacher in (("km_it1", "teacher_n1"), ("km_it2", "teacher_n2")):
        layer = target_layer(w, job)
        if layer is not None:
            setup[f"{teacher} layer clustered"] = layer
    times.update(timing(w))
    results = {"models": models, "claims": claims(models), "verdict_rule": VERDICT_RULE,
               "teacher_layers": teacher_layers(w), "timing": times, "setup": setup}
    write_json(os.path.join(w, "results.json"), results)
    md = markdown(results)
    write_text(os.path.join(w, "results.md"), md)
    print(md)
    png = os.path.join(w, "results.png")
    if have_matplotlib():
        plot(results, png)
    else:
        if os.path.exists(png):
            os.unlink(png)  # an older run's plot would not show these results
        print(PLOT_HINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
