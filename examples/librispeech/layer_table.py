#!/usr/bin/env python3
"""The teacher-layer sweep in one table: per layer, the label quality of its k-means stream and the
phone-recognition PER of the student trained on it.

Reads what the sweep's steps wrote: ``dicehubert-labels quality --json`` (2_labels.sh with LAYERS
and ALIGN: ``$LABELS/quality_valid.json``, one result per stream ``it{ITER}_l{L}``) and
``dicehubert-probe --json`` per student (4_probe.sh: ``$WORK/probe/{ROW}_it{ITER}_l{L}.json``).
A layer whose file is missing gets ``-`` in its columns (a step not run yet) and a note on stderr.
Prints a Markdown table; ``--out`` also writes it, ``--json`` the rows.

    python examples/librispeech/layer_table.py --row dicehubert_narrow --layers 3 6 9 12 \\
        --quality $LABELS/quality_valid.json --probe-dir $WORK/probe [--out table.md] [--json rows.json]
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

COLUMNS = ["layer", "labels", "phone purity", "cluster purity", "PNMI", "student", "PER (test)", "PER (valid)"]


def read_json(path: str, what: str) -> Optional[dict]:
    """The JSON at ``path``, or None with a note on stderr if there is none."""
    if not os.path.isfile(path):
        print(f"layer_table: no {what} at {path} (not run yet?): '-' in its columns", file=sys.stderr)
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def layer_rows(row: str, layers: List[int], iteration: int, suffix: str, quality_path: str,
               probe_dir: str) -> List[Dict[str, object]]:
    """One dict per layer: the stream's quality measures and its student's probe PERs (None if missing)."""
    quality = read_json(quality_path, "label quality (2_labels.sh with ALIGN)") if quality_path else None
    by_name = {r["name"]: r for r in (quality or {}).get("results", [])}
    rows = []
    for layer in layers:
        labels = f"it{iteration}_l{layer}"
        q = by_name.get(labels, {})
        if quality is not None and not q:
            print(f"layer_table: {quality_path} has no stream {labels}", file=sys.stderr)
        student = f"{row}_{labels}{suffix}"
        probe = read_json(os.path.join(probe_dir, f"{student}.json"), f"probe result of {student}") or {}
        rows.append({"layer": layer, "labels": labels, "phone_purity": q.get("phone_purity"),
                     "cluster_purity": q.get("cluster_purity"), "pnmi": q.get("pnmi"), "student": student,
                     "per": probe.get("per"), "valid_per": probe.get("valid_per")})
    return rows


def markdown(rows: List[Dict[str, object]]) -> str:
    def cell(v):
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    keys = ["layer", "labels", "phone_purity", "cluster_purity", "pnmi", "student", "per", "valid_per"]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", required=True, help="the config row the students were trained with (dicehubert_narrow)")
    p.add_argument("--layers", type=int, nargs="+", required=True, help="the teacher layers of the sweep")
    p.add_argument("--iter", type=int, default=2,
                   help="the teacher's HuBERT iteration in the stream names (default: 2)")
    p.add_argument("--suffix", default="", help="after the stream in the students' names (the soft row: _t1)")
    p.add_argument("--quality", default=None, help="dicehubert-labels quality --json output")
    p.add_argument("--probe-dir", required=True, help="directory of the dicehubert-probe --json outputs")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    rows = layer_rows(a.row, a.layers, a.iter, a.suffix, a.quality, a.probe_dir)
    table = markdown(rows)
    print(table)
    for path, text in ((a.out, table + "\n"), (a.json, json.dumps(rows, indent=1) + "\n")):
        if path:
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
