"""``dicehubert-export``: a student (or teacher) checkpoint for transformers, s3prl or plain fairseq.

Examples::

    dicehubert-export outputs/narrow/checkpoints/checkpoint_best.pt --to hf narrow_hf/
    dicehubert-export checkpoint_best.pt --to s3prl narrow.s3prl.pt     # s3prl's hubert_local upstream
    dicehubert-export checkpoint_best.pt --to fairseq narrow.hubert.pt  # fairseq, without this plugin

Exit status: 0 on success, 1 for bad input (one line, naming the file; the traceback only with
``--debug``), 2 for bad command-line usage.  Nothing is written unless everything succeeded.
"""

import argparse
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from ..cli_args import add_arguments, from_args
from ..cli_errors import run_reporting_errors
from .api import TARGETS, export_checkpoint

PROG = "dicehubert-export"


@dataclass
class ExportCommand:
    """The options of ``dicehubert-export``."""

    checkpoint: str = field(default=MISSING, metadata={
        "help": "dicehubert_student or fairseq hubert checkpoint (checkpoint_best.pt, ...)", "positional": True,
        "metavar": "CHECKPOINT"})
    target: str = field(default=MISSING, metadata={
        "help": "hf: a transformers HubertModel directory (config.json, model.safetensors, preprocessor_config.json); "
                "fairseq: a plain fairseq 'hubert' checkpoint that loads without this plugin; s3prl: s3prl's "
                "converted HuBERT checkpoint (upstream hubert_local)", "flag": "--to", "choices": sorted(TARGETS)})
    out: str = field(default=MISSING, metadata={"help": "output directory (hf) or file (fairseq, s3prl)",
                                                "positional": True, "metavar": "OUT"})
    force: bool = field(default=False, metadata={"help": "replace OUT if it exists"})
    check: bool = field(default=True, metadata={
        "help": "skip loading the result back and comparing its layer outputs with the source's on random audio",
        "flag": "--no-check"})
    quiet: bool = field(default=False, metadata={"help": "print nothing on success", "argparse_alias": "-q"})
    debug: bool = field(default=False, metadata={"help": "debug logging; tracebacks for errors"})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, ExportCommand)
    return p


def _quiet_transformers() -> None:
    """No progress bars for transformers' one-shard save/load (only when it is installed)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def main(argv: Optional[List[str]] = None) -> int:
    args = from_args(ExportCommand, build_parser().parse_args(argv))
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
        force=True,  # importing fairseq already configured the root logger
    )
    if not args.debug:
        logging.getLogger("fairseq").setLevel(logging.WARNING)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        if args.target == "hf":
            _quiet_transformers()
        warnings.filterwarnings("ignore", message=r".*torch\.nn\.utils\.weight_norm.* is deprecated")

    code, r = run_reporting_errors(
        PROG, args.debug,
        lambda: export_checkpoint(args.checkpoint, args.target, args.out, force=args.force, check=args.check))
    if code:
        return code
    if not args.quiet:
        print(f"{PROG}: {args.checkpoint} ({r.source}) -> {r.target}: {r.out}")
        print(f"  parameters: {r.parameters:,} ({r.parameters / 1e6:.2f}M); on disk: {r.bytes:,} bytes "
              f"({r.bytes / 1e6:.2f} MB) in {', '.join(r.files)}")
        print(f"  dropped: {r.dropped}" + (f"; {r.dropped_parameters:,} parameters" if r.dropped_parameters else ""))
        if r.check is None:
            print("  check: not run" + (" (s3prl is not installed here)" if args.check else ""))
        else:
            layers = " ".join(f"{d:.1e}" for d in r.check["max_abs"][:-1])
            print(f"  check: max |difference| to the source on random audio, layers 1..{len(r.check['max_abs']) - 1}: "
                  f"{layers}; final output: {r.check['max_abs'][-1]:.1e}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
