#!/usr/bin/env python3
"""Phone error rate of every hidden state of one model, each probed alone.

Runs ``dicehubert-probe --layers k`` for every hidden state ``k`` (0 = the transformer's input,
``k`` = transformer layer ``k``) of ``--checkpoint`` and collects the valid and test PER of each:
which layer carries the most phonetic information (the weighted-sum probe's softmax weights
do not say that: they also reflect how the layers' scales and redundancy suit the head).
The best layer is chosen on the valid split; the test PER is only reported.

Writes ``--out`` (JSON)::

    {"checkpoint", "data", "layers": [{"layer", "valid_per", "per", "seconds"}, ...],
     "best_layer", "best_transformer_layer", "probe_args"}

(``best_transformer_layer``: the best of layers 1..L, the layers a k-means can be fitted on.)

With ``--pnmi-k K``, every transformer layer's K-means labels are also measured against the
frame-level phone alignments of the valid split (``{data}/valid.align``, synth_corpus.py
``--align``): a k-means with K clusters is fitted on the layer's features of the train split
(``dicehubert-labels fit``), the valid split is labelled with it (``dump``), and
``dicehubert-labels quality`` gives each row ``pnmi`` and ``phone_purity`` (HuBERT's measures
of label quality).

and prints one line per layer.  Example::

    python examples/tiny/probe_layers.py --checkpoint work/models/teacher_n2/checkpoints/checkpoint_last.pt \\
        --data work --out work/probe/teacher_n2.layers.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def num_layers(checkpoint: str) -> int:
    """Transformer layers of a fairseq hubert / dicehubert_student checkpoint (from its config)."""
    from dicehubert_fairseq.checkpoint import load_state

    return int(load_state(checkpoint)["cfg"]["model"]["encoder_layers"])


def label_quality(checkpoint: str, data: str, layer: int, k: int, seed: int, tmp: str) -> dict:
    """PNMI and phone purity on valid of a K-means (fitted on train) of one layer's features."""
    labels = os.path.join(os.path.dirname(sys.executable), "dicehubert-labels")
    km, out = os.path.join(tmp, f"km{layer}.joblib"), os.path.join(tmp, f"quality{layer}.json")
    common = ["--manifest-dir", data, "--checkpoint", checkpoint, "--layer", str(layer), "--no-progress"]
    for cmd in ([labels, "fit", "--split", "train", "--n-clusters", str(k), "--seed", str(seed), "--out", km] + common,
                [labels, "dump", "--split", "valid", "--km", km, "--label-dir", tmp, "--name", f"l{layer}"] + common,
                [labels, "quality", "--label-dir", tmp, "--labels", f"l{layer}", "--split", "valid",
                 "--align", os.path.join(data, "valid.align"), "--json", out, "--no-progress"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"probe_layers: error: {' '.join(cmd[:2])} failed on layer {layer} "
                             f"(exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(out) as f:
        row = json.load(f)["results"][0]
    return {"pnmi": row["pnmi"], "phone_purity": row["phone_purity"], "pnmi_k": k}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="directory with {split}.tsv and {split}.phn")
    p.add_argument("--out", required=True, help="JSON file to write (atomically)")
    p.add_argument("--layers", default=None, help="comma-separated hidden states (default: all, 0..L)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-train-utterances", type=int, default=None,
                   help="train each probe on the first N training utterances only (default: all)")
    p.add_argument("--pnmi-k", type=int, default=0,
                   help="also the PNMI of each transformer layer's K-means labels on valid (needs "
                        "{data}/valid.align; 0: off, the default)")
    args = p.parse_args(argv)
    if args.pnmi_k and not os.path.isfile(os.path.join(args.data, "valid.align")):
        p.error(f"--pnmi-k needs frame-level phone alignments: {os.path.join(args.data, 'valid.align')} not found "
                f"(synth_corpus.py --align writes them)")
    import logging

    logging.basicConfig(level=logging.WARNING, force=True)  # fairseq's import sets the root to DEBUG
    layers = (list(range(num_layers(args.checkpoint) + 1)) if args.layers is None
              else [int(x) for x in args.layers.split(",")])
    probe = os.path.join(os.path.dirname(sys.executable), "dicehubert-probe")
    probe_args = ["--epochs", str(args.epochs), "--seed", str(args.seed), "--threads", "1", "-q"]
    if args.max_train_utterances:
        probe_args += ["--max-train-utterances", str(args.max_train_utterances)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in layers:
            out = os.path.join(tmp, f"{k}.json")
            t0 = time.time()
            proc = subprocess.run([probe, "--checkpoint", args.checkpoint, "--data", args.data, "--layers", str(k),
                                   "--json", out] + probe_args, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                print(f"probe_layers: error: dicehubert-probe failed on layer {k} (exit status {proc.returncode})",
                      file=sys.stderr)
                return 1
            with open(out) as f:
                r = json.load(f)
            rows.append({"layer": k, "valid_per": r["valid_per"], "per": r["per"], "seconds": time.time() - t0})
            pnmi = ""
            if args.pnmi_k and k >= 1:
                rows[-1].update(label_quality(args.checkpoint, args.data, k, args.pnmi_k, args.seed, tmp))
                pnmi = f"  PNMI {rows[-1]['pnmi']:.4f}"
            print(f"layer {k}: valid PER {r['valid_per']:.4f}  test PER {r['per']:.4f}{pnmi}  "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)
    best = min(rows, key=lambda r: r["valid_per"])["layer"]
    # the best transformer layer (k >= 1): what a k-means of teacher features can be fitted on
    best_transformer = min((r for r in rows if r["layer"] >= 1), key=lambda r: r["valid_per"], default=None)
    print(f"best layer on valid: {best}")
    result = {"checkpoint": os.path.abspath(args.checkpoint), "data": os.path.abspath(args.data), "layers": rows,
              "best_layer": best,
              "best_transformer_layer": None if best_transformer is None else best_transformer["layer"],
              "probe_args": probe_args}
    tmp = args.out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
