"""Two versions of our label code side by side: several ``benchmarks.labels.run`` work directories
per version, each run measured against fairseq's simple_kmeans in that same run.

Timings on a shared or busy machine drift between runs (fairseq's own three scripts varied by 15 %
between two runs minutes apart on this project's machine), so a version is compared with another
through its ratios to fairseq's time in the same run, repeated; the median over runs is reported
beside every run's value.

    python -m benchmarks.labels.compare before=/tmp/b_old1,/tmp/b_old2 after=/tmp/b_new1,/tmp/b_new2 \
        [--json OUT.json]

Each work directory is one ``python -m benchmarks.labels.run --workdir DIR ...`` (its
``results.json``; the largest corpus of the run is used).  Prints a markdown table.
"""

import argparse
import json
import os
import statistics
from typing import Dict, List, Tuple

#: our pipelines in a run's results, and how the table names them
PIPELINES = {"ours": "fit + dump", "ours_run": "run (one process)"}


def _peak_rss(pipeline: Dict) -> float:
    return max(step["peak_rss_mb"] for step in pipeline["steps"].values())


def measure(workdir: str) -> Dict[str, Dict[str, float]]:
    """Per pipeline of one run: wall, CPU, peak RSS, their ratios to fairseq's, the k-means objective."""
    path = os.path.join(workdir, "results.json")
    try:
        with open(path) as f:
            run = json.load(f)["results"][-1]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise SystemExit(f"compare: error: {path}: not a finished benchmarks.labels.run ({e})")
    fs = run["fairseq"]
    out = {}
    for key in PIPELINES:
        p, rss = run[key], _peak_rss(run[key])
        out[key] = {"utterances": run["utterances"], "wall_s": p["wall_s"], "cpu_s": p["cpu_s"],
                    "peak_rss_mb": rss, "wall_vs_fairseq": p["wall_s"] / fs["wall_s"],
                    "cpu_vs_fairseq": p["cpu_s"] / fs["cpu_s"], "rss_vs_fairseq": rss / _peak_rss(fs),
                    "fairseq_wall_s": fs["wall_s"], "objective": run["objective"][key],
                    "fairseq_objective": run["objective"]["fairseq"]}
    return out


def _version(spec: str) -> Tuple[str, List[str]]:
    label, sep, dirs = spec.partition("=")
    if not sep or not label or not dirs:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected LABEL=WORKDIR[,WORKDIR...]")
    return label, dirs.split(",")


def table(versions: Dict[str, List[Dict[str, Dict[str, float]]]]) -> str:
    lines = ["| version | pipeline | runs | wall / fairseq (median; each run) | CPU / fairseq | peak RSS (MB) | "
             "peak RSS / fairseq | k-means objective (fairseq's) |", "|---|---|---|---|---|---|---|---|"]
    for label, runs in versions.items():
        for key, name in PIPELINES.items():
            ms = [r[key] for r in runs]

            def col(field, fmt):
                vals = [m[field] for m in ms]
                return f"{statistics.median(vals):{fmt}} ({', '.join(f'{v:{fmt}}' for v in vals)})"

            objective = f"{ms[0]['objective']:.3f} ({ms[0]['fairseq_objective']:.3f})"
            lines.append(f"| {label} | {name} | {len(ms)} | {col('wall_vs_fairseq', '.2f')} | "
                         f"{col('cpu_vs_fairseq', '.2f')} | {col('peak_rss_mb', '.0f')} | "
                         f"{col('rss_vs_fairseq', '.2f')} | {objective} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("versions", nargs="+", type=_version, metavar="LABEL=WORKDIR[,WORKDIR...]")
    p.add_argument("--json", help="also write every run's figures here")
    args = p.parse_args(argv)
    versions = {label: [measure(d) for d in dirs] for label, dirs in args.versions}
    print(table(versions))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(versions, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
