#!/usr/bin/env python3
"""Collect the tiny pipeline's models and probes into results.json, results.md and results.png.

``results.json``::

    {"models": [...], "claims": [...], "verdict_rule": "...", "teacher_layers": {...},
     "timing": {...}, "setup": {...}}

``models``: one entry per row that ``WORKDIR/rows.json`` (pipeline.py) lists, teachers first:
``kind`` (teacher or student), ``params`` (without the pretraining heads: label embeddings,
final projection, L_feat heads, as the presets are quoted), ``layers``, ``dim``, ``updates``;
per run, ``seeds``, ``teachers`` (the teacher pair a student learned from), ``per_seeds`` (test
PER of the probe), ``valid_per_seeds`` and ``seconds_seeds`` (training wall time; None for a
shipped teacher); ``per`` / ``valid_per`` / ``seconds`` their means, ``per_std`` the standard
deviation (None with one run); ``layer_weights`` the probe's layer weights averaged over runs.

``claims``: the comparisons of :data:`CLAIMS` whose two rows were run, each with the rows
(``better``: expected better, ``worse``), their means and deviations, the paired differences
``diffs`` (PER of ``worse`` minus PER of ``better``, by seed: :func:`pairs`), their mean
``mean_diff``, ``se``, paired 95% interval ``ci95`` and p-value ``p``, Holm-adjusted ``p_holm``,
the ``welch`` comparison, ``rel_diff`` and ``rel_ci95`` (over the worse row's mean PER), the
paper's ``paper_size`` and ``paper_size_verdict``, the ``verdict`` (Holm) and
``verdict_uncorrected``, and ``valid``: the same on the valid split.  The rule: :data:`VERDICT_RULE`.

``teacher_layers``: per teacher probed layer by layer on this corpus, the valid and test PER of
each hidden state alone and the best one on valid.  ``timing``: wall and CPU seconds per kind of
job (corpus synthesis, labels, teachers, students, probes).
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
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import stats  # noqa: E402  beside this script (python puts its directory first on the path)
from pipeline import MODELS, TEACHERS, timing  # noqa: E402

HEADS = ("label_embs_concat", "final_proj.", "target_glu.", "feat_heads.")

#: (id, what is compared, the row expected better, the other row, the paper's relative size of
#: effect or None, kind). Kinds: 'claim' (a claim of the paper, or a check of one the issue tracker
#: asked for: the family Holm's correction counts), 'reference' (not a claim: what compression costs)
CLAIMS = [
    ("distillation", "distilling helps: the distilled narrow student beats the same student trained from scratch",
     "dicehubert_narrow", "scratch_narrow", None, "claim"),
    ("ssl_vs_feat", "L_SSL beats L_feat on the same narrow student (the paper: over 21% relative on phone "
     "recognition)", "dicehubert_narrow", "feat_narrow", 0.21, "claim"),
    ("narrow_vs_shallow", "the narrow student (teacher depth, half width) beats the shallow one (teacher width, "
     "1/6 depth)", "dicehubert_narrow", "dicehubert_shallow", None, "claim"),
    ("narrow_vs_shallow_l4", "the narrow student beats the shallow one of 1/4 depth", "dicehubert_narrow",
     "dicehubert_shallow_l4", None, "claim"),
    ("hard_vs_soft", "hard labels (the paper's default objective) are at least as good as soft labels of the same "
     "layer", "dicehubert_narrow", "dicehubert_narrow_soft", None, "claim"),
    ("student_vs_n1_teacher", "a student can beat its weaker N=1 teacher (narrow student on teacher_n1's labels vs "
     "teacher_n1)", "dicehubert_narrow_n1", "teacher_n1", None, "claim"),
    ("upper_vs_first_layer", "labels of the teacher's chosen layer beat labels of its first layer",
     "dicehubert_narrow", "dicehubert_narrow_l1", None, "claim"),
    ("depth_at_narrow_width", "at the narrow width, the teacher's depth beats one layer", "dicehubert_narrow",
     "dicehubert_narrow_1layer", None, "claim"),
    ("ssl_vs_feat_10x", "L_SSL beats L_feat on a student over 10x smaller than its teacher",
     "dicehubert_narrow_10x", "feat_narrow_10x", 0.21, "claim"),
    ("ssl_vs_maskdistil", "L_SSL beats masking distillation (MaskHuBERT) on the same narrow student",
     "dicehubert_narrow", "maskdistil_narrow", None, "claim"),
    ("attention_vs_conv", "reference, not a claim of the paper: the narrow transformer student vs a "
     "convolution-only student on the same labels", "dicehubert_narrow", "dicehubert_conv", None, "reference"),
    ("loss_departure", "reference, not a claim: the tiny recipe's loss (masked and unmasked frames) vs the "
     "paper's (masked frames only) on the same student, labels and seeds", "dicehubert_narrow",
     "dicehubert_narrow_masked", None, "reference"),
    ("teacher_vs_student", "reference, not a claim: the teacher vs its distilled narrow student (what compression "
     "costs)", "teacher_n2", "dicehubert_narrow", None, "reference"),
]
CONFIDENCE = stats.CONFIDENCE
VERDICT_RULE = (
    "Per claim, d = PER of the row expected worse minus PER of the row expected better (positive: the paper's "
    "direction), paired by student seed (a student and a teacher: the student's own teacher; students of different "
    "seeds learn from different teachers when a preset trains several, so the pairs span the teachers' spread). "
    "Paired: mean d with its two-sided 95% t interval and p-value (H0: mean d = 0). Welch: the two rows' means "
    "compared as independent samples, 95% interval. Verdict: Holm's correction over the claims of this table "
    "(kind 'claim'; reference rows are not counted) of the paired p-values, at a family-wise 5%: 'holds' (the "
    "paper's direction), 'reversed', 'within noise'; 'too few seeds' under 2 pairs. The same on the valid split "
    "beside it. Paper's size (where the paper gives one): the paired 95% interval of d over the worse row's mean "
    "PER, against it: 'rules out the paper's size' if entirely below, 'consistent with' if it contains it."
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
    """One entry per row of ``WORKDIR/rows.json`` (written by pipeline.py), in :data:`MODELS` order,
    with every run's numbers (see the module doc)."""
    manifest = _read(os.path.join(workdir, "rows.json"))
    models = []
    for name in [m for m in MODELS if m in manifest["rows"]]:
        row = manifest["rows"][name]
        entries = []
        for run in row["runs"]:
            probe = _read(run["probe"])
            done = os.path.join(workdir, ".done", f"{run['run']}.done.json")
            timing_ = _read(done) if run["trained"] else {"seconds": None, "cpu_seconds": None}
            if not os.path.isfile(run["checkpoint"]):
                raise SystemExit(f"report: error: {run['checkpoint']}: missing (did the pipeline finish?)")
            entries.append({**model_facts(run["checkpoint"]), "per": probe["per"], "valid_per": probe["valid_per"],
                            "layer_weights": probe["layer_weights"], "seconds": timing_["seconds"],
                            "cpu_seconds": timing_["cpu_seconds"], "seed": run["seed"], "teacher": run["teacher"]})
        first = entries[0]
        pers = [e["per"] for e in entries]
        valid = [e["valid_per"] for e in entries]
        weights = [statistics.fmean(ws) for ws in zip(*(e["layer_weights"] for e in entries))]
        secs = [e["seconds"] for e in entries if e["seconds"] is not None]
        cpus = [e["cpu_seconds"] for e in entries if e["cpu_seconds"] is not None]
        models.append({
            "name": name, "kind": row["kind"], "what": row["what"], "trained_here": bool(secs),
            "params": first["params"], "layers": first["layers"], "dim": first["dim"], "updates": first["updates"],
            "seeds": [e["seed"] for e in entries], "teachers": [e["teacher"] for e in entries],
            "per_seeds": pers, "valid_per_seeds": valid,
            "seconds_seeds": [None if e["seconds"] is None else round(e["seconds"], 1) for e in entries],
            "per": statistics.fmean(pers), "per_std": _std(pers), "valid_per": statistics.fmean(valid),
            "valid_per_std": _std(valid),
            "seconds": round(statistics.fmean(secs), 1) if secs else None,
            "cpu_seconds": round(statistics.fmean(cpus), 1) if cpus else None,
            "layer_weights": weights,
        })
    return models


def pairs(better: Dict, worse: Dict, key: str = "per_seeds"):
    """Aligned values of two rows: ``(labels, better values, worse values)``.

    Two student rows pair by seed.  A teacher row (one run per teacher) pairs with each seed of
    the student row, through the teacher that seed learned from (``teachers``).
    """
    def by_seed(row):
        return dict(zip(row["seeds"], row[key]))

    def by_teacher(row):
        return dict(zip(row["teachers"], row[key]))

    kb, kw = better.get("kind", "student"), worse.get("kind", "student")
    if kb == "teacher" and kw != "teacher":
        tv = by_teacher(better)
        seeds = [s for s, t in zip(worse["seeds"], worse["teachers"]) if t in tv or len(tv) == 1]
        teach = dict(zip(worse["seeds"], worse["teachers"]))
        w = by_seed(worse)
        return seeds, [tv.get(teach[s], next(iter(tv.values()))) for s in seeds], [w[s] for s in seeds]
    if kw == "teacher" and kb != "teacher":
        seeds, wv, bv = pairs(worse, better, key)
        return seeds, bv, wv
    b, w = by_seed(better), by_seed(worse)
    seeds = sorted(set(b) & set(w))
    return seeds, [b[s] for s in seeds], [w[s] for s in seeds]


def compare(better: Dict, worse: Dict, key: str = "per_seeds", paper_size: Optional[float] = None) -> Dict:
    """Paired and Welch comparison of two rows of :func:`collect` (``key``: test or valid PERs).

    Returns:
        ``{"seeds", "diffs", "n", "mean_diff", "se", "ci95", "p", "welch", "rel_diff", "rel_ci95",
        "paper_size", "paper_size_verdict", "verdict_uncorrected"}``; ``diffs`` per pair: PER of ``worse``
        minus PER of ``better`` (positive: the paper's direction).  ``verdict`` is set by :func:`claims`
        (Holm's correction needs the whole table).
    """
    seeds, bv, wv = pairs(better, worse, key)
    diffs = [y - x for x, y in zip(bv, wv)]
    pt = stats.paired(diffs)
    worse_vals, better_vals = worse[key], better[key]
    worse_mean = statistics.fmean(worse_vals)
    wl = stats.welch(better_vals, worse_vals)
    out = {"seeds": seeds, "diffs": diffs, "n": pt["n"], "mean_diff": pt["mean"], "se": pt["se"], "ci95": pt["ci"],
           "p": pt["p"], "welch": {"mean_diff": wl["mean"], "se": wl["se"], "df": wl["df"], "ci95": wl["ci"],
                                   "p": wl["p"]},
           "rel_diff": pt["mean"] / worse_mean if worse_mean else math.nan,
           "rel_ci95": None if pt["ci"] is None else [c / worse_mean for c in pt["ci"]],
           "paper_size": paper_size,
           "paper_size_verdict": stats.against_paper_size(pt["ci"], worse_mean, paper_size)}
    out["verdict_uncorrected"] = ("too few seeds" if pt["ci"] is None else "holds" if pt["ci"][0] > 0 else
                                  "reversed" if pt["ci"][1] < 0 else "within noise")
    return out


def claims(models: List[Dict]) -> List[Dict]:
    """One entry per claim of :data:`CLAIMS` whose rows were run, test and valid, Holm-corrected."""
    by = {m["name"]: m for m in models}
    out = []
    for cid, text, better, worse, size, kind in CLAIMS:
        if better not in by or worse not in by:
            continue
        b, w = by[better], by[worse]
        entry = {"id": cid, "claim": text, "kind": kind, "better": better, "worse": worse,
                 "better_mean": b["per"], "better_sd": b["per_std"], "worse_mean": w["per"],
                 "worse_sd": w["per_std"], **compare(b, w, "per_seeds", size)}
        entry["valid"] = compare(b, w, "valid_per_seeds", size)
        out.append(entry)
    for get in (lambda c: c, lambda c: c["valid"]):
        family = [c for c in out if c["kind"] == "claim"]
        for c, adj in zip(family, stats.holm([get(c)["p"] for c in family])):
            get(c)["p_holm"] = adj
            get(c)["verdict"] = stats.verdict(get(c)["mean_diff"], adj)
        for c in out:
            if c["kind"] != "claim":
                get(c)["p_holm"] = None
                get(c)["verdict"] = get(c)["verdict_uncorrected"]
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


def _ci(ci: Optional[Sequence[float]]) -> str:
    return "" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _secs(m: Dict) -> str:
    return "shipped" if m["seconds"] is None else f"{m['seconds']:.0f} s"


def _rel(c: Dict) -> str:
    """A claim's relative difference with its paired interval: '+9.5% [+6%, +13%]'."""
    rel = f"{100 * c['rel_diff']:+.1f}%"
    if c["rel_ci95"] is not None:
        rel += f" [{100 * c['rel_ci95'][0]:+.0f}%, {100 * c['rel_ci95'][1]:+.0f}%]"
    return rel


def markdown(results: Dict) -> str:
    models, setup = results["models"], results["setup"]
    lines = ["| model | what it learned from | layers x dim | params | updates | train time | test PER "
             "(mean ± sd) | test PER per seed | valid PER |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        seeds = ", ".join(f"{p:.3f}" for p in m["per_seeds"])
        lines.append(f"| {m['name']} | {m['what']} | {m['layers']} x {m['dim']} | {m['params'] / 1e6:.2f}M | "
                     f"{m['updates']} | {_secs(m)} | {_pm(m['per'], m['per_std'])} | {seeds} | "
                     f"{_pm(m['valid_per'], m['valid_per_std'])} |")
    lines += ["", "Claims (test PER; valid beside it; computed by report.py):", "",
              "| claim | expected better | other | difference (other - better), paired 95% CI | Welch 95% CI | "
              "relative [CI] | pairs | verdict, test (Holm) | verdict, valid (Holm) | paper's size |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["claims"]:
        size = "" if c["paper_size"] is None else f"{100 * c['paper_size']:.0f}%: {c['paper_size_verdict']}"
        lines.append(f"| {c['claim']} | {c['better']} {_pm(c['better_mean'], c['better_sd'])} | {c['worse']} "
                     f"{_pm(c['worse_mean'], c['worse_sd'])} | {c['mean_diff']:+.3f}{_ci(c['ci95'])} | "
                     f"{_ci(c['welch']['ci95']).strip()} | {_rel(c)} | {c['n']} | **{c['verdict']}** | "
                     f"{c['valid']['verdict']} | {size} |")
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
    palette = plt.get_cmap("tab20").colors
    colors = ["#7f7f7f", "#4d4d4d"][: sum(m["kind"] == "teacher" for m in models)]
    colors += [palette[i % len(palette)] for i in range(len(models) - len(colors))]
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
            c = ["#7f7f7f", "#4d4d4d"][TEACHERS.index(name)]
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


def _claim_cell(c: Dict) -> str:
    """One claim of one run in a cell: relative difference [paired CI], pairs, verdicts, paper's size."""
    cell = f"{_rel(c)}, n={c['n']}: **{c['verdict']}** (valid: {c['valid']['verdict']})"
    if c["paper_size_verdict"]:
        cell += f"; {c['paper_size_verdict']}"
    return cell


def side_by_side(runs: Sequence[Tuple[str, Dict]]) -> str:
    """The claims of several runs' results.json in one table: a row per claim, a column per run."""
    by_id = [{c["id"]: c for c in results["claims"]} for _, results in runs]
    text: Dict[str, str] = {}  # claim id -> its row's name, in the order first seen
    for claims_of_run in by_id:
        for cid, c in claims_of_run.items():
            ref = " (reference)" if c["kind"] != "claim" else ""
            text.setdefault(cid, f"{c['better']} vs {c['worse']}{ref}")
    lines = ["| claim (better row vs other row) | " + " | ".join(label for label, _ in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for cid in text:
        cells = [_claim_cell(run[cid]) if cid in run else "not run" for run in by_id]
        lines.append(f"| {text[cid]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _labelled_json(spec: str) -> Tuple[str, Dict]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected LABEL=RESULTS_JSON (e.g. 'corpus A=work/results.json')")
    try:
        with open(path) as f:
            return label, json.load(f)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{path}: cannot read a results.json: {e}") from e


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", nargs="?", help="a finished run.sh/pipeline.py work directory to report on")
    p.add_argument("--side-by-side", nargs="+", type=_labelled_json, metavar="LABEL=RESULTS_JSON",
                   help="instead: print the claims of these runs' results.json side by side (markdown)")
    args = p.parse_args(argv)
    if args.side_by_side:
        print(side_by_side(args.side_by_side), end="")
        return 0
    if args.workdir is None:
        p.error("give a WORKDIR, or --side-by-side LABEL=RESULTS_JSON ...")
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
    manifest = _read(os.path.join(w, "rows.json"))
    setup["teachers"] = (f"shipped ({os.path.relpath(manifest['teacher_dir'], REPO)})" if manifest["teachers"] == "shipped"
                         else f"trained here, {manifest['teacher_replicas']} of each")
    for job, what in (("km_it1", "teacher_n1 layer clustered for teacher_n2"),
                      ("km_it2", "teacher_n2 layer clustered for the students"),
                      ("km_n1", "teacher_n1 layer clustered for the N=1 student")):
        layer = target_layer(w, job)
        if layer is not None:
            setup[what] = layer
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
