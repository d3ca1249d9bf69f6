"""``dicehubert-probe``: phone error rate of a frozen HuBERT-family checkpoint (SUPERB PR style).

Example::

    dicehubert-probe --checkpoint work/teacher_n1/checkpoint_best.pt --data work/corpus --json work/probe.json

Exit status: 0 on success, 1 for bad input (one line per problem, naming file and line; the
traceback only with ``--debug``), 2 for bad command-line usage.
"""

import argparse
import json
import logging
import os
import sys
import warnings
from typing import List, Optional

from ..cli_errors import run_reporting_errors
from ..errors import InputError
from .probe import UNK, UNSEEN_CHOICES, ProbeConfig

PROG = "dicehubert-probe"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _layer_list(text: str) -> List[int]:
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, e.g. 0,3,6; got {text!r}")
    if any(k < 0 for k in layers):
        raise argparse.ArgumentTypeError(f"layer indices must be >= 0, got {text}")
    if len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"layer indices must be distinct, got {text}")
    return layers


def build_parser() -> argparse.ArgumentParser:
    d = ProbeConfig()
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Phoneme-recognition probe (SUPERB PR style): a frozen HuBERT/DiceHuBERT checkpoint, a "
                    "learnable softmax-weighted sum of all its hidden states, layer norm and a linear CTC "
                    "head over the phones of {train}.phn; early stopping on valid PER; prints the test PER.",
    )
    p.add_argument("--checkpoint", required=True, help="fairseq hubert or dicehubert_student checkpoint")
    p.add_argument("--data", required=True,
                   help="directory with {split}.tsv (fairseq manifest) and {split}.phn (one line of "
                        "space-separated phones per manifest row)")
    p.add_argument("--train-split", default="train", help="training split (default: %(default)s)")
    p.add_argument("--valid-split", default="valid", help="early-stopping split (default: %(default)s)")
    p.add_argument("--test-split", default="test", help="split the PER is reported on (default: %(default)s)")
    p.add_argument("--json", metavar="OUT", help="also write the result (per, valid_per, layer_weights, ...) "
                                                 "to this JSON file (atomically)")
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help="maximum epochs (default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=d.lr, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help="utterances per update (default: %(default)s)")
    p.add_argument("--patience", type=_non_negative_int, default=d.patience,
                   help="stop after this many epochs without a better valid PER; 0: never "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default: %(default)s)")
    p.add_argument("--device", default=d.device, help="torch device (default: %(default)s)")
    p.add_argument("--threads", type=_non_negative_int, default=1,
                   help="CPU threads for torch; 0: torch's default. One thread is the safe choice on a "
                        "shared machine: with other jobs on the cores, two OpenMP threads were measured "
                        "10x slower than one (default: %(default)s)")
    p.add_argument("--max-train-utterances", type=_positive_int, default=None, metavar="N",
                   help="train on the first N utterances of the training split only")
    p.add_argument("--unseen-phones", choices=UNSEEN_CHOICES, default=d.unseen,
                   help=f"a valid/test phone that never occurs in train: 'unk' scores it as {UNK}, always "
                        f"an error, with a warning naming file and line; 'error' stops (default: %(default)s)")
    p.add_argument("--max-cache-gb", type=_positive_float, default=None, metavar="GB",
                   help="the hidden states of all utterances are cached in memory (float32, all layers); "
                        "refuse to start if they would exceed this (default: half the physical memory)")
    p.add_argument("--layers", type=_layer_list, default=None, metavar="K[,K...]",
                   help="hidden states the probe weighs (0 = transformer input, k = transformer layer k); "
                        "one index probes that layer alone (default: all)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result")
    p.add_argument("--debug", action="store_true", help="debug logging; tracebacks for errors")
    return p


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InputError([f"--device {device}: not a torch device ({e})"]) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError([f"--device {device}: CUDA is not available on this machine (use --device cpu)"])


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # force: importing fairseq already configured the root logger (at DEBUG level)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    if not args.debug:  # fairseq logs whole configs when it builds a model
        logging.getLogger("fairseq").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*torch\.nn\.utils\.weight_norm.* is deprecated")
    import torch

    from .probe import run_probe

    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ProbeConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, patience=args.patience,
                      seed=args.seed, device=args.device, max_train_utterances=args.max_train_utterances,
                      unseen=args.unseen_phones, max_cache_gb=args.max_cache_gb,
                      layers=args.layers)
    def work():
        if args.json and os.path.isdir(args.json):
            raise InputError([f"--json {args.json}: is a directory (expected a file name)"])
        _check_device(args.device)
        result = run_probe(args.checkpoint, args.data, args.train_split, args.valid_split, args.test_split, cfg)
        if args.json:
            from ..data.files import atomic_write

            with atomic_write(args.json) as f:
                json.dump(result, f, indent=1)
                f.write("\n")
        return result

    code, result = run_reporting_errors(PROG, args.debug, work)
    if code:
        return code
    weights = " ".join(f"{k}:{w:.3f}" for k, w in zip(result["layers"], result["layer_weights"]))
    print(f"PER {result['per']:.4f} on {args.test_split} ({result['utterances']['test']} utterances, "
          f"{result['num_phones']} phones); valid PER {result['valid_per']:.4f} at epoch "
          f"{result['best_epoch']}/{result['epochs']}; layer weights [{weights}]")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
