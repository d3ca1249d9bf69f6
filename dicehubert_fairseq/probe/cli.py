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
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from omegaconf import MISSING

from ..cli_args import add_arguments, from_args
from ..option_types import non_negative_int
from ..cli_errors import run_reporting_errors
from ..data.files import atomic_write
from ..errors import InputError
from .run import ProbeConfig, run_probe

PROG = "dicehubert-probe"


@dataclass
class ProbeCommand:
    """The options of ``dicehubert-probe`` besides :class:`~dicehubert_fairseq.probe.run.ProbeConfig`."""

    checkpoint: str = field(default=MISSING, metadata={
        "help": "fairseq hubert or dicehubert_student checkpoint, or a Hugging Face HuBERT directory "
                "(dicehubert-export --to hf)"})
    data: str = field(default=MISSING, metadata={
        "help": "directory with {split}.tsv (fairseq manifest) and {split}.phn (one line of space-separated "
                "phones per manifest row)"})
    train_split: str = field(default="train", metadata={"help": "training split"})
    valid_split: str = field(default="valid", metadata={"help": "early-stopping split"})
    test_split: str = field(default="test", metadata={"help": "split the PER is reported on"})
    json: Optional[str] = field(default=None, metadata={
        "help": "also write the result (per, valid_per, layer_weights, ...) to this JSON file (atomically)",
        "metavar": "OUT"})
    threads: int = field(default=1, metadata={
        "help": "CPU threads for torch; 0: torch's default. One thread is the safe choice on a shared machine: "
                "with other jobs on the cores, two OpenMP threads were measured 10x slower than one",
        "type": non_negative_int})
    quiet: bool = field(default=False, metadata={"help": "only warnings and the result", "argparse_alias": "-q"})
    debug: bool = field(default=False, metadata={"help": "debug logging; tracebacks for errors"})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Phoneme-recognition probe (SUPERB PR style): a frozen HuBERT/DiceHuBERT checkpoint, a "
                    "learnable softmax-weighted sum of all its hidden states, layer norm and a linear CTC "
                    "head over the phones of {train}.phn; early stopping on valid PER; prints the test PER.",
    )
    add_arguments(p, ProbeCommand)
    add_arguments(p, ProbeConfig)
    return p


def _check_device(device: str) -> None:
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
    if args.threads:
        torch.set_num_threads(args.threads)
    cmd, cfg = from_args(ProbeCommand, args), from_args(ProbeConfig, args)

    def work():
        if cmd.json and os.path.isdir(cmd.json):
            raise InputError([f"--json {cmd.json}: is a directory (expected a file name)"])
        _check_device(cfg.device)
        result = run_probe(cmd.checkpoint, cmd.data, cmd.train_split, cmd.valid_split, cmd.test_split, cfg)
        if cmd.json:
            with atomic_write(cmd.json) as f:
                json.dump(result, f, indent=1)
                f.write("\n")
        return result

    code, result = run_reporting_errors(PROG, cmd.debug, work)
    if code:
        return code
    weights = " ".join(f"{k}:{w:.3f}" for k, w in zip(result["layers"], result["layer_weights"]))
    print(f"PER {result['per']:.4f} on {cmd.test_split} ({result['utterances']['test']} utterances, "
          f"{result['num_phones']} phones); valid PER {result['valid_per']:.4f} at epoch "
          f"{result['best_epoch']}/{result['epochs']}; layer weights [{weights}]")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
