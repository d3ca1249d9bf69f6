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
from typing import List, Optional

from ..cli_errors import run_reporting_errors
from .api import TARGETS

PROG = "dicehubert-export"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="dicehubert_student or fairseq hubert checkpoint (checkpoint_best.pt, ...)")
    p.add_argument("--to", required=True, choices=sorted(TARGETS), dest="target",
                   help="hf: a transformers HubertModel directory (config.json, model.safetensors, "
                        "preprocessor_config.json); fairseq: a plain fairseq 'hubert' checkpoint that loads "
                        "without this plugin; s3prl: s3prl's converted HuBERT checkpoint (upstream hubert_local)")
    p.add_argument("out", help="output directory (hf) or file (fairseq, s3prl)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-check", action="store_true",
                   help="skip loading the result back and comparing its layer outputs with the source's "
                        "on random audio")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--debug", action="store_true", help="debug logging; tracebacks for errors")
    return p


def _quiet_transformers() -> None:
    """No progress bars for transformers' one-shard save/load (only when it is installed)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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

    from .api import export_checkpoint

    code, r = run_reporting_errors(
        PROG, args.debug,
        lambda: export_checkpoint(args.checkpoint, args.target, args.out, force=args.force, check=not args.no_check))
    if code:
        return code
    if not args.quiet:
        print(f"{PROG}: {args.checkpoint} ({r.source}) -> {r.target}: {r.out}")
        print(f"  parameters: {r.parameters:,} ({r.parameters / 1e6:.2f}M); on disk: {r.bytes:,} bytes "
              f"({r.bytes / 1e6:.2f} MB) in {', '.join(r.files)}")
        print(f"  dropped: {r.dropped}" + (f"; {r.dropped_parameters:,} parameters" if r.dropped_parameters else ""))
        if r.check is None:
            print("  check: not run" + ("" if args.no_check else " (s3prl is not installed here)"))
        else:
            layers = " ".join(f"{d:.1e}" for d in r.check["max_abs"][:-1])
            print(f"  check: max |difference| to the source on random audio, layers 1..{len(r.check['max_abs']) - 1}: "
                  f"{layers}; final output: {r.check['max_abs'][-1]:.1e}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
