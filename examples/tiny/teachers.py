#!/usr/bin/env python3
"""The tiny example's pretrained teachers: pack them once, verify them before every run.

``examples/tiny/teachers/`` holds two fairseq ``hubert`` checkpoints (HuBERT iterations 1 and
2, trained by ``train_teachers.sh``), each with a ``.sha256`` file that
``dicehubert_fairseq.checkpoint.load_state`` checks at every load, and ``teachers.json``: the
command and commit that trained them, their training curves (masked and unmasked accuracy),
and their layer-by-layer probe PER and PNMI on the tuning corpus's valid split.

Subcommands::

    python examples/tiny/teachers.py verify [--dir examples/tiny/teachers]
        both checkpoints present and matching their checksums; exit 1 with a message otherwise
    python examples/tiny/teachers.py pack WORKDIR [--dir examples/tiny/teachers]
        from a finished train_teachers.sh WORKDIR: dicehubert-export --to fairseq, weights in
        float16, checksums, teachers.json (written last, atomically)
    python examples/tiny/teachers.py layer {teacher_n1,teacher_n2} [--dir ...]
        the transformer layer chosen on the tuning corpus's valid split (what run.sh clusters)
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_DIR = os.path.join(HERE, "teachers")
NAMES = ("teacher_n1", "teacher_n2")
#: each teacher's targets in a train_teachers.sh WORKDIR: labels/NAME/dict.NAME.txt
LABELS = {"teacher_n1": "mfcc", "teacher_n2": "it1"}
CURVE = re.compile(r"\[train_inner\].* - epoch \d+:.*")


def checkpoint_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.pt")


def verify(directory: str) -> List[str]:
    """Problems with the shipped teachers in ``directory`` (empty: both present and intact)."""
    from dicehubert_fairseq.checkpoint import CHECKSUM_SUFFIX, verify_checksum
    from dicehubert_fairseq.errors import InputError

    problems = []
    for name in NAMES:
        path = checkpoint_path(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing (the pretrained teacher is committed with the repository: "
                            f"git checkout -- {os.path.relpath(path, REPO)}; or retrain with TINY_TEACHER=train)")
            continue
        if not os.path.isfile(path + CHECKSUM_SUFFIX):
            problems.append(f"{path + CHECKSUM_SUFFIX}: missing (the checksum the teacher is verified against)")
            continue
        try:
            verify_checksum(path)
        except InputError as e:
            problems.append(str(e))
    return problems


def curves(log_path: str) -> List[Dict[str, float]]:
    """Training curve of a fairseq log: per ``train_inner`` line, the update, the masked and
    unmasked accuracy (``correct_m_0``, ``correct_u_0``) and the masked loss (bits)."""
    out = []
    with open(log_path, errors="replace") as f:
        for line in f:
            if not CURVE.search(line):
                continue
            fields = dict(re.findall(r"(\w+)=([-0-9.e]+)", line))
            if "num_updates" in fields and "correct_m_0" in fields:
                out.append({"update": int(fields["num_updates"]), "masked_acc": float(fields["correct_m_0"]),
                            "unmasked_acc": float(fields.get("correct_u_0", "nan")),
                            "loss_m": float(fields.get("loss_m_0", "nan"))})
    return out


def pack_one(src: str, dst: str) -> Dict:
    """``dicehubert-export --to fairseq`` of ``src``, float tensors cast to float16, to ``dst`` + checksum."""
    import torch

    from dicehubert_fairseq.checkpoint import CHECKSUM_SUFFIX, sha256_file

    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "plain.pt")
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "dicehubert-export"), src, "--to", "fairseq",
                        plain], check=True, capture_output=True, text=True)
        state = torch.load(plain, weights_only=True)
    state["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    for key in ("data", "label_dir"):  # where it was trained: provenance, not needed to load it
        state["cfg"]["task"][key] = os.path.basename(str(state["cfg"]["task"][key]))
    tmp_dst = dst + ".tmp"
    torch.save(state, tmp_dst)
    os.replace(tmp_dst, dst)
    digest = sha256_file(dst)
    with open(dst + CHECKSUM_SUFFIX + ".tmp", "w") as f:
        f.write(f"{digest}  {os.path.basename(dst)}\n")
    os.replace(dst + CHECKSUM_SUFFIX + ".tmp", dst + CHECKSUM_SUFFIX)
    model = state["cfg"]["model"]
    return {"file": os.path.basename(dst), "sha256": digest, "bytes": os.path.getsize(dst),
            "params": sum(v.numel() for v in state["model"].values() if v.is_floating_point()),
            "layers": model["encoder_layers"], "dim": model["encoder_embed_dim"],
            "updates": state["optimizer_history"][-1]["num_updates"]}


def pack(workdir: str, directory: str) -> Dict:
    """Pack the two teachers of a finished ``train_teachers.sh`` WORKDIR into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    info = {"trained_by": "examples/tiny/train_teachers.sh WORKDIR", "packed_by": "examples/tiny/teachers.py pack WORKDIR",
            "packed_at_commit": subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
            "date": datetime.date.today().isoformat(), "teachers": {}}
    for name in NAMES:
        ckpt = os.path.join(workdir, name, "checkpoints", "checkpoint_last.pt")
        entry = pack_one(ckpt, checkpoint_path(directory, name))
        with open(os.path.join(workdir, "probe", f"{name}.layers.json")) as f:
            layers = json.load(f)
        entry["layers_on_tune_valid"] = [{k: row[k] for k in ("layer", "valid_per", "per", "pnmi", "phone_purity")
                                          if k in row} for row in layers["layers"]]
        entry["best_layer"] = layers["best_layer"]
        entry["best_transformer_layer"] = layers["best_transformer_layer"]
        entry["curve"] = curves(os.path.join(workdir, "logs", f"{name}.log"))
        with open(os.path.join(workdir, "labels", LABELS[name], f"dict.{LABELS[name]}.txt")) as f:
            entry["target_clusters"] = sum(1 for line in f if line.strip())
        with open(os.path.join(workdir, ".done", name)) as f:
            entry["train_seconds"] = int(f.read().strip())
        info["teachers"][name] = entry
    tmp = os.path.join(directory, "teachers.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(directory, "teachers.json"))
    with open(os.path.join(directory, "README.md.tmp"), "w") as f:
        f.write(markdown(info))
    os.replace(os.path.join(directory, "README.md.tmp"), os.path.join(directory, "README.md"))
    return info


def markdown(info: Dict) -> str:
    """``teachers/README.md``: what the teachers are, how they were made, their curves and layers."""
    t1, t2 = (info["teachers"][n] for n in NAMES)
    lines = [
        "# The tiny example's pretrained teachers",
        "",
        "Written by `examples/tiny/teachers.py pack` from a finished `examples/tiny/train_teachers.sh` run "
        f"(packed at commit `{info['packed_at_commit'][:10]}`, {info['date']}; the commits each stage ran at, and the runs "
        "that failed on the way, are in [EXPERIMENTS.md](../EXPERIMENTS.md), T0); every figure below is in "
        "[teachers.json](teachers.json). Retrain them from scratch: `examples/tiny/train_teachers.sh WORKDIR` "
        "(then `python examples/tiny/teachers.py pack WORKDIR`), or let `run.sh` train its own: `TINY_TEACHER=train`.",
        "",
        "| teacher | what | layers x dim | parameters | updates | time to train | file (float16) | SHA-256 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    what = {"teacher_n1": f"HuBERT iteration 1: MFCC k-means (K={t1['target_clusters']}, 100 Hz) targets",
            "teacher_n2": f"HuBERT iteration 2: K={t2['target_clusters']} k-means of teacher_n1's layer "
                          f"{t1['best_transformer_layer']} (50 Hz)"}
    for name in NAMES:
        t = info["teachers"][name]
        lines.append(f"| {name} | {what[name]} | {t['layers']} x {t['dim']} | {t['params'] / 1e6:.2f}M | "
                     f"{t['updates']} | {t['train_seconds'] / 60:.0f} min (one thread) | `{t['file']}` "
                     f"{t['bytes'] / 1e6:.1f} MB | `{t['sha256'][:16]}...` |")
    lines += ["", "`dicehubert_fairseq.checkpoint.load_state` checks each file against its `.sha256` at every "
              "load; `run.sh` checks both before any work (`python examples/tiny/teachers.py verify`).", "",
              "## Training curves", "",
              "Accuracy of the masked-prediction head on the training batches (fairseq's `correct_m_0`: masked "
              "frames, the loss; `correct_u_0`: unmasked frames, logged but not in the loss):", "",
              "| update | " + " | ".join(f"{n} masked | {n} unmasked" for n in NAMES) + " |",
              "|---|" + "---|---|" * len(NAMES)]
    curves_ = {n: {p["update"]: p for p in info["teachers"][n]["curve"]} for n in NAMES}
    last = max(max(c) for c in curves_.values() if c)
    step = 1000 if last > 4000 else max(100, last // 4 // 100 * 100)
    for u in range(step, last + 1, step):
        cells = []
        for n in NAMES:
            p = curves_[n].get(u)
            cells.append(" | " if p is None else f"{p['masked_acc']:.3f} | {p['unmasked_acc']:.3f}")
        lines.append(f"| {u} | " + " | ".join(cells) + " |")
    lines += ["", "## Layer by layer, on the tuning corpus's valid split", "",
              "Each hidden state probed alone (`probe_layers.py`: frozen model, linear CTC head over espeak-ng "
              "phones, 60 epochs, best epoch on valid) and, for transformer layers, the PNMI of its K=100 "
              "k-means labels against the frame alignments (`dicehubert-labels quality`). 0 is the "
              "transformer's input. The layer chosen (best valid PER among layers 1..12) is what the next "
              "stage clusters.", ""]
    for name in NAMES:
        t = info["teachers"][name]
        rows = t["layers_on_tune_valid"]
        lines += [f"**{name}** (chosen: layer {t['best_transformer_layer']})", "",
                  "| hidden state | " + " | ".join(str(r["layer"]) for r in rows) + " |",
                  "|---|" + "---|" * len(rows),
                  "| valid PER | " + " | ".join(f"{r['valid_per']:.3f}" for r in rows) + " |",
                  "| PNMI | " + " | ".join(f"{r['pnmi']:.3f}" if "pnmi" in r else "" for r in rows) + " |", ""]
    return "\n".join(lines)


def chosen_layer(directory: str, name: str) -> int:
    with open(os.path.join(directory, "teachers.json")) as f:
        return int(json.load(f)["teachers"][name]["best_transformer_layer"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="both teachers present and matching their checksums")
    pk = sub.add_parser("pack", help="pack a finished train_teachers.sh WORKDIR")
    pk.add_argument("workdir")
    ly = sub.add_parser("layer", help="print the layer chosen on the tuning corpus's valid split")
    ly.add_argument("name", choices=NAMES)
    for s in (v, pk, ly):
        s.add_argument("--dir", default=DEFAULT_DIR, help="the teachers' directory (default: %(default)s)")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, force=True)  # fairseq's import sets the root to DEBUG
    if args.command == "verify":
        problems = verify(args.dir)
        for msg in problems:
            print(f"teachers: error: {msg}", file=sys.stderr)
        if not problems:
            print(f"teachers: {', '.join(NAMES)} in {args.dir}: checksums match")
        return 1 if problems else 0
    if args.command == "layer":
        print(chosen_layer(args.dir, args.name))
        return 0
    info = pack(os.path.abspath(args.workdir), args.dir)
    for name, t in info["teachers"].items():
        print(f"{name}: {t['file']} {t['bytes'] / 1e6:.1f} MB, {t['params'] / 1e6:.2f}M parameters, "
              f"{t['updates']} updates, sha256 {t['sha256'][:12]}..., best layer on tune valid {t['best_transformer_layer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
