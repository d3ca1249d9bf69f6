"""``dicehubert-labels``: k-means labels from a teacher layer (or MFCC), for DiceHuBERT.

Subcommands (``dicehubert-labels SUBCOMMAND -h`` for every option)::

  fit    --manifest-dir D --split train (--checkpoint CKPT --layer L | --mfcc) --n-clusters K --out KM.joblib
  dump   --manifest-dir D --split SPLIT (--checkpoint CKPT --layer L | --mfcc) --km KM.joblib --label-dir OUT
         [--name km] [--soft --temperature T --top-k N] [--normalize] [--nshard N --rank R]
  merge  --label-dir OUT --split SPLIT --nshard N [--name km] [--manifest-dir D]
  check  --manifest-dir D --label-dir OUT --labels km [--label-rate R]

Bad input gives one line per problem on stderr and exit status 1 (``--debug``: the traceback).
"""

import argparse
import glob
import logging
import os
import sys
from typing import List, Optional

from ..cli_errors import run_reporting_errors
from ..errors import InputError

logger = logging.getLogger(__name__)

PROG = "dicehubert-labels"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    p.add_argument("--verbose", action="store_true", help="also show fairseq's own INFO logs")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _add_features(p: argparse.ArgumentParser, split_default: Optional[str]) -> None:
    p.add_argument("--manifest-dir", required=True, help="directory with {split}.tsv")
    p.add_argument("--split", default=split_default, required=split_default is None,
                   help="manifest split to read" + (f" (default {split_default})" if split_default else ""))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="fairseq hubert / dicehubert_student checkpoint (teacher)")
    src.add_argument("--mfcc", action="store_true", help="39-dim Kaldi MFCC at 100 Hz instead of a teacher")
    p.add_argument("--layer", type=int, help="1-based transformer layer of --checkpoint (as fairseq's dump_hubert_feature)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="teacher compute precision: float16 on CUDA only; bfloat16 via autocast (default float32)")
    p.add_argument("--sample-rate", type=int, default=16000, help="audio sample rate for --mfcc (default 16000)")
    p.add_argument("--max-batch-seconds", type=float, default=50.0,
                   help="padded audio per inference batch, in seconds (default 50)")
    p.add_argument("--max-chunk", type=int, default=1_600_000,
                   help="longer utterances are cut into chunks of this many samples (fairseq's default)")
    p.add_argument("--no-header-check", action="store_true",
                   help="skip reading every audio header before starting")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and sklearn/OpenMP (default: their own defaults); on a shared "
                        "machine fewer threads than cores avoids OpenMP spinning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,dump,merge,check}")

    p = sub.add_parser("fit", help="fit k-means on teacher-layer (or MFCC) features, streamed")
    _add_features(p, "train")
    p.add_argument("--n-clusters", type=int, required=True, help="K")
    p.add_argument("--out", required=True, help="k-means model to write (joblib; fairseq's dump_km_label reads it)")
    p.add_argument("--percent", type=float, default=1.0,
                   help="fraction of utterances to fit on, as fairseq's --percent (default 1.0 = all; -1 = all)")
    p.add_argument("--batch-size", type=int, default=10000, help="k-means mini-batch in frames (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sample and k-means (default 0)")
    p.add_argument("--pool-size", type=int, default=None,
                   help="frames of the initial fit and of the shuffle pool (default max(3*batch, 3*K))")
    p.add_argument("--n-init", type=int, default=20, help="k-means++ trials (default 20, as fairseq)")
    p.add_argument("--max-iter", type=int, default=100, help="epochs of the initial fit (default 100, as fairseq)")
    p.add_argument("--block-size", type=int, default=200, help="utterances length-sorted together (default 200)")
    _add_common(p)

    p = sub.add_parser("dump", help="write hard (and soft) labels of a split or shard")
    _add_features(p, None)
    p.add_argument("--km", required=True, help="k-means model (from fit, or fairseq's learn_kmeans)")
    p.add_argument("--label-dir", required=True, help="output directory")
    p.add_argument("--name", default="km", help="label name: {split}.{name}, dict.{name}.txt (default km)")
    p.add_argument("--soft", action="store_true", help="also write soft labels (top-k ids + probabilities)")
    p.add_argument("--temperature", type=float, default=1.0, help="T of softmax(-d^2/T) (default 1)")
    p.add_argument("--top-k", type=int, default=10, help="clusters kept per frame for --soft (default 10)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise features and centroids first")
    p.add_argument("--nshard", type=int, default=1, help="number of shards (default 1)")
    p.add_argument("--rank", type=int, default=0, help="0-based shard to write (default 0)")
    p.add_argument("--block-size", type=int, default=200,
                   help="utterances per resumable block (default 200); keep it equal when resuming")
    _add_common(p)

    p = sub.add_parser("merge", help="join the shards of a split into {split}.{name}")
    p.add_argument("--label-dir", required=True, help="directory with {split}_{rank}_{nshard}.{name}")
    p.add_argument("--split", required=True)
    p.add_argument("--nshard", type=int, required=True)
    p.add_argument("--name", default="km")
    p.add_argument("--manifest-dir", help="if given, check the line count against {split}.tsv")
    p.add_argument("--out-dir", help="where to write (default --label-dir)")
    _add_common(p)

    p = sub.add_parser("check", help="validate manifests, audio and label files; report every problem")
    p.add_argument("--manifest-dir", required=True)
    p.add_argument("--label-dir", help="default: --manifest-dir")
    p.add_argument("--labels", nargs="+", default=["km"], help="label names (default km)")
    p.add_argument("--label-rate", type=float, default=50.0, help="labels per second (50 for HuBERT layers, 100 for MFCC)")
    p.add_argument("--split", action="append", help="split(s) to check (default: every *.tsv in --manifest-dir)")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--tolerance", type=float, default=0.1, help="seconds labels may differ from the audio (default 0.1)")
    p.add_argument("--no-audio-headers", action="store_true", help="only check that audio files exist")
    _add_common(p)
    return parser


def _reader(args):
    from .features import make_reader

    if args.checkpoint and args.layer is None:
        raise InputError(["--checkpoint needs --layer L (1-based transformer layer)"])
    if args.mfcc and args.layer is not None:
        raise InputError(["--layer applies to --checkpoint, not --mfcc"])
    return make_reader(args.checkpoint, args.layer, args.mfcc, args.device,
                       None if args.dtype == "float32" else args.dtype, args.sample_rate, args.max_chunk)


def _limit_threads(args):
    """Apply ``--threads`` to torch and to sklearn's OpenMP/BLAS pools (a context manager)."""
    import contextlib

    if not getattr(args, "threads", None):
        return contextlib.nullcontext()
    if args.threads < 1:
        raise InputError([f"--threads must be at least 1, found {args.threads}"])
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    return threadpool_limits(limits=args.threads)


def _manifest_path(args) -> str:
    return os.path.join(args.manifest_dir, f"{args.split}.tsv")


def cmd_fit(args) -> int:
    from ..data.files import read_manifest
    from ..data.preflight import require_valid
    from .dump import check_audio_rows
    from .kmeans import fit_kmeans, sample_rows, save_kmeans

    if args.n_clusters < 1:
        raise InputError([f"--n-clusters must be at least 1, found {args.n_clusters}"])
    if args.batch_size < 1:
        raise InputError([f"--batch-size must be at least 1, found {args.batch_size}"])
    if args.percent == 0 or args.percent > 1:
        raise InputError([f"--percent is a fraction in (0, 1] (or -1 for all), found {args.percent}"])
    manifest = read_manifest(_manifest_path(args))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    reader = _reader(args)
    if not args.no_header_check:
        rows = sorted(int(r) for r in sample_rows(len(manifest), args.percent, args.seed))
        require_valid(check_audio_rows(manifest, reader.sample_rate, rows), manifest.path)
    km, stats = fit_kmeans(reader, manifest, args.n_clusters, percent=args.percent, seed=args.seed,
                           batch_size=args.batch_size, pool_size=args.pool_size,
                           max_batch_samples=int(args.max_batch_seconds * reader.sample_rate),
                           block_size=args.block_size, progress=not args.no_progress,
                           n_init=args.n_init, max_iter=args.max_iter)
    meta = {"features": reader.description, "manifest": os.path.abspath(manifest.path), "n_clusters": args.n_clusters,
            "seed": args.seed, "percent": args.percent, "batch_size": args.batch_size, **stats}
    save_kmeans(km, args.out, meta)
    print(f"wrote {args.out}: K={args.n_clusters}, fitted on {stats['frames']} frames of {stats['utterances']} "
          f"utterances, objective {stats['init_objective']:.4f} on the {stats['init_frames']} frames of the "
          f"initial fit" + (f", {stats['stream_objective']:.4f} held-out on {stats['partial_fit_steps']} streamed batches"
                       if stats["partial_fit_steps"] else ""))
    return 0


def cmd_dump(args) -> int:
    from .dump import dump_labels

    from ..data.files import read_manifest
    from .dump import shard_range
    from .kmeans import load_kmeans

    # cheap checks first, before a teacher is loaded
    manifest = read_manifest(_manifest_path(args))
    shard_range(len(manifest), args.nshard, args.rank, manifest.path)
    load_kmeans(args.km)
    reader = _reader(args)
    s = dump_labels(reader, _manifest_path(args), args.km, args.label_dir, args.split, name=args.name,
                    soft=args.soft, temperature=args.temperature, top_k=args.top_k, normalize=args.normalize,
                    nshard=args.nshard, rank=args.rank, block_size=args.block_size,
                    max_batch_samples=int(args.max_batch_seconds * reader.sample_rate),
                    check_headers=not args.no_header_check, progress=not args.no_progress)
    extra = f", soft top-{args.top_k} at T={args.temperature:g} (mean kept mass {s['mean_kept_mass']:.3f})" if args.soft else ""
    resumed = f" (resumed: {s['resumed_blocks']} of {s['blocks']} blocks were done)" if s["resumed_blocks"] else ""
    print(f"wrote {s['label_path']}: {s['utterances']} utterances, {s['frames']} frames{extra}{resumed}")
    return 0


def cmd_merge(args) -> int:
    from .dump import merge_shards

    manifest = os.path.join(args.manifest_dir, f"{args.split}.tsv") if args.manifest_dir else None
    if args.nshard < 1:
        raise InputError([f"--nshard must be at least 1, found {args.nshard}"])
    s = merge_shards(args.label_dir, args.split, args.name, args.nshard, manifest_path=manifest, out_dir=args.out_dir)
    print(f"wrote {s['label_path']}: {s['utterances']} utterances, {s['frames']} frames"
          + (" (+ soft labels)" if s["soft"] else ""))
    return 0


def cmd_check(args) -> int:
    from ..data.files import soft_label_paths
    from ..data.preflight import check_split

    label_dir = args.label_dir or args.manifest_dir
    if not os.path.isdir(args.manifest_dir):
        raise InputError([f"{args.manifest_dir}: manifest directory not found"])
    splits = args.split or sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(args.manifest_dir, "*.tsv")))
    if not splits:
        raise InputError([f"{args.manifest_dir}: no *.tsv manifests found"])
    problems: List[str] = []
    for split in splits:
        soft = [lab for lab in args.labels
                if any(os.path.exists(p) for p in soft_label_paths(label_dir, split, lab).values())]
        problems += check_split(args.manifest_dir, split, label_dir, args.labels, args.label_rate,
                                sample_rate=args.sample_rate, soft_labels=soft,
                                audio_headers=not args.no_audio_headers, tolerance=args.tolerance)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{PROG} check: {len(problems)} problem(s) in {', '.join(splits)}", file=sys.stderr)
        return 1
    print(f"OK: {', '.join(splits)} x labels {', '.join(args.labels)} in {label_dir} "
          f"(label rate {args.label_rate:g} Hz)")
    return 0


COMMANDS = {"fit": cmd_fit, "dump": cmd_dump, "merge": cmd_merge, "check": cmd_check}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO, stream=sys.stderr, force=True)
    if not args.verbose:
        for noisy in ("fairseq", "fairseq.tasks", "fairseq.models"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
    def work():
        with _limit_threads(args):
            return COMMANDS[args.command](args)

    code, result = run_reporting_errors(f"{PROG} {args.command}", args.debug, work,
                                        interrupted="interrupted (rerun the same command to resume)")
    return result if code == 0 else code

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
