"""Collect the results of ``benchmarks/gpu/run.sh`` into ``gpu_results.json`` and ``gpu_results.md``.

    python -m benchmarks.gpu.report --work WORK --out OUT

Reads what run.sh's steps left in ``WORK``: ``steps.tsv`` (name, exit status, seconds, limit),
``env.json``, ``tests.xml`` (pytest's JUnit XML), ``labels/results.json`` (and ``results.md``) of
``benchmarks.labels.run``, ``train/train.json`` of ``benchmarks.gpu.train``.  A missing file is a
step that did not run or did not finish: reported as such, never invented.
"""

import argparse
import datetime
import json
import os
import sys
import xml.etree.ElementTree as ET


def _load(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_steps(path):
    steps = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                name, rc, seconds, limit, what = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
                steps.append({"name": name, "exit": int(rc), "seconds": int(seconds), "limit_s": int(limit),
                              "what": what})
    return steps


def read_junit(path):
    """Per-test outcome (passed / failed / error / skipped with reason) and seconds."""
    if not os.path.isfile(path):
        return None
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                detail = (el.get("message") or "").splitlines()[0][:200] if el.get("message") else ""
                break
        tests.append({"test": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}",
                      "outcome": outcome, "seconds": float(case.get("time") or 0), "detail": detail})
    return tests


def _fmt(x, spec=".2f", unit=""):
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def markdown(res):
    env, steps = res.get("env") or {}, res["steps"]
    head = (f"{env.get('gpu', 'no GPU')}, driver {env.get('driver', '?')}, torch {env.get('torch', '?')} "
            f"(CUDA {env.get('torch_cuda', '?')}), Python {env.get('python', '?')}, fairseq {env.get('fairseq', '?')}")
    lines = [f"### GPU checks: {res['date']}", "", head, "",
             f"Mode: {res['mode']}. Command: `bash benchmarks/gpu/run.sh`.", "", "| step | what | result | time (limit) |", "|---|---|---|---|"]
    for s in steps:
        verdict = "ok" if s["exit"] == 0 else ("timed out" if s["exit"] in (124, 137) else f"FAILED (exit {s['exit']})")
        lines.append(f"| {s['name']} | {s['what']} | {verdict} | {s['seconds']} s ({s['limit_s']} s) |")
    tests = res.get("tests")
    if tests is not None:
        counts = {}
        for t in tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        lines += ["", "CUDA tests (`pytest -m cuda tests/test_cuda.py`): "
                  + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), "",
                  "| test | outcome | time |", "|---|---|---|"]
        for t in tests:
            note = f" ({t['detail']})" if t["detail"] and t["outcome"] != "passed" else ""
            lines.append(f"| `{t['test']}` | {t['outcome']}{note} | {t['seconds']:.1f} s |")
    lab = res.get("labels")
    if lab is not None:
        lines += ["", "Label dumping, `python -m benchmarks.labels.run " + " ".join(res.get("labels_argv", [])) + "`"
                  + f" ({lab['info']['machine']}):", "", lab.get("markdown", "").rstrip()]
        gpu = [(r["utterances"], t, s, x.get("cuda_peak_mb")) for r in lab["results"]
               for t in ("fairseq", "ours") for s, x in r[t]["steps"].items() if x.get("cuda_peak_mb") is not None]
        if gpu:
            lines += ["", "Peak GPU memory per step (`torch.cuda.max_memory_allocated`):", "",
                      "| utterances | step | peak GPU memory |", "|---|---|---|"]
            lines += [f"| {n} | {t} {s} | {mb:.0f} MB |" for n, t, s, mb in gpu]
    tr = res.get("train")
    if tr is not None and tr.get("train"):
        t, a = tr["train"], tr["args"]
        losses = [x for _, x in t["losses"] if isinstance(x, float)]
        loss = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "n/a"
        run = "run=cpu`, fp32" if a.get("cpu") else "run=gpu`, fp16"
        lines += ["", f"Training, `python -m benchmarks.gpu.train` (`dicehubert_narrow {run}, "
                      f"max_tokens {a['max_tokens']}, update_freq [1], {tr['corpus']['utterances']} utterances / "
                      f"{tr['corpus']['audio_s'] / 60:.0f} min of synthetic audio, K = 100 teacher labels):", "",
                  "| updates | updates/s (median of intervals) | updates/s (wall) | "
                  "peak allocated | nvidia-smi peak (baseline) | GPU util | overflows skipped | loss (first -> last) |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {t['num_updates']} | {_fmt(t['ups_median'])} | {_fmt(t['ups_wall'])} "
                  f"| {_fmt(t.get('peak_allocated_gb'), '.1f', ' GB')} "
                  f"| {_fmt(t['nvidia_smi_peak_mib'], '.0f', ' MiB')} "
                  f"({_fmt(t['nvidia_smi_baseline_mib'], '.0f', ' MiB')}) | {_fmt(t['gpu_util_mean'], '.0f', ' %')} "
                  f"| {t['overflows']} | {loss} |",
                  "", "Checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in tr["checks"].items())]
    elif tr is not None:
        lines += ["", "Training: did not start; checks " + json.dumps(tr["checks"])]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="gpu")
    p.add_argument("--labels-argv", default="", help="the arguments the label benchmark was run with")
    args = p.parse_args()
    w = args.work
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "mode": args.mode,
           "env": _load(os.path.join(w, "env.json")), "steps": read_steps(os.path.join(w, "steps.tsv")),
           "tests": read_junit(os.path.join(w, "tests.xml")), "labels_argv": args.labels_argv.split(),
           "labels": _load(os.path.join(w, "labels", "results.json")),
           "train": _load(os.path.join(w, "train", "train.json"))}
    md_path = os.path.join(w, "labels", "results.md")
    if res["labels"] is not None and os.path.isfile(md_path):
        with open(md_path) as f:
            res["labels"]["markdown"] = f.read()
    res["ok"] = bool(res["steps"]) and all(s["exit"] == 0 for s in res["steps"])
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("gpu_results.json", json.dumps(res, indent=1)), ("gpu_results.md", markdown(res))):
        path = os.path.join(args.out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
