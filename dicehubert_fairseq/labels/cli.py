"""``dicehubert-labels``: k-means labels from a teacher layer (or MFCC), for DiceHuBERT.

Subcommands (``dicehubert-labels SUBCOMMAND -h`` for every option)::

  fit    --manifest-dir D --split train (--checkpoint CKPT --layer L[,L...] | --mfcc) --n-clusters K --out KM.joblib
         [--normalize]
  dump   --manifest-dir D --split SPLIT (--checkpoint CKPT --layer L[,L...] | --mfcc) --km KM.joblib --label-dir OUT
         [--name km] [--soft (--temperature T | --temperature-gap G) --top-k N] [--nshard N --rank R]
  run    --manifest-dir D --split train (--checkpoint CKPT --layer L[,L...] | --mfcc) --n-clusters K --out KM.joblib
         --label-dir OUT [fit's and dump's options but --km/--nshard/--rank]: fit + dump in one process, same files
  merge  --label-dir OUT --split SPLIT --nshard N [--name km] [--manifest-dir D]
  check  --manifest-dir D --label-dir OUT --labels km [--label-rate R]
  quality --label-dir OUT --labels km [km2 ...] --split SPLIT --align SPLIT.align [--align-rate 100] [--label-rate 50]

Bad input gives one line per problem on stderr and exit status 1 (``--debug``: the traceback).
"""

import argparse
import contextlib
import glob
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from omegaconf import MISSING
from threadpoolctl import threadpool_limits

from ..cli_args import add_arguments, from_args
from ..cli_errors import run_reporting_errors
from ..data.files import soft_label_paths
from ..data.preflight import check_split
from ..errors import InputError
from ..option_types import positive_int
from .blocks import MergeConfig, merge
from .config import Corpus, FeatureConfig, FitCorpus
from .dump import DumpConfig, dump
from .fit import FitConfig, fit
from .onepass import run
from .plan import make_plan
from .quality import QualityConfig, format_table, measure_quality

logger = logging.getLogger(__name__)

PROG = "dicehubert-labels"


@dataclass
class Common:
    """Options of every subcommand."""

    debug: bool = field(default=False, metadata={"help": "show tracebacks for bad input"})
    verbose: bool = field(default=False, metadata={"help": "also show fairseq's own INFO logs"})
    progress: bool = field(default=True, metadata={"help": "no tqdm progress bar", "flag": "--no-progress"})


@dataclass
class Threads:
    """The CPU threads of ``fit``, ``dump`` and ``run``."""

    threads: Optional[int] = field(default=None, metadata={
        "help": "CPU threads for torch and sklearn/OpenMP (default: their own defaults); on a shared machine "
                "fewer threads than cores avoids OpenMP spinning", "type": positive_int})


@dataclass
class CheckArgs:
    manifest_dir: str = field(default=MISSING, metadata={"help": "directory with {split}.tsv"})
    label_dir: Optional[str] = field(default=None, metadata={"help": "default: --manifest-dir"})
    labels: List[str] = field(default_factory=lambda: ["km"], metadata={"help": "label names"})
    label_rate: float = field(default=50.0, metadata={
        "help": "labels per second (50 for HuBERT layers, 100 for MFCC)"})
    split: Optional[List[str]] = field(default=None, metadata={
        "help": "split(s) to check, repeatable (default: every *.tsv in --manifest-dir)", "action": "append"})
    sample_rate: int = field(default=16000, metadata={"help": "audio sample rate"})
    tolerance: float = field(default=0.1, metadata={"help": "seconds labels may differ from the audio"})
    audio_headers: bool = field(default=True, metadata={
        "help": "only check that audio files exist", "flag": "--no-audio-headers"})


#: subcommand -> (help, option dataclasses)
SUBCOMMANDS = {
    "fit": ("fit k-means on teacher-layer (or MFCC) features, streamed", (FitCorpus, Threads, FeatureConfig, FitConfig)),
    "dump": ("write hard (and soft) labels of a split or shard", (Corpus, Threads, FeatureConfig, DumpConfig)),
    "run": ("fit, then dump the split's labels, in one process (the files of fit + dump)",
            (Corpus, Threads, FeatureConfig, FitConfig, DumpConfig)),
    "merge": ("join the shards of a split into {split}.{name}", (MergeConfig,)),
    "check": ("validate manifests, audio and label files; report every problem", (CheckArgs,)),
    "quality": ("phone purity, cluster purity and PNMI of label files against frame-level phone alignments",
                (QualityConfig,)),
}


#: (subcommand, config) -> fields that get no option there: ``run`` dumps with the model it fits
#: (in the mode fit's ``--normalize`` stored in it), in one process, in fit's blocks
SKIPPED = {("run", DumpConfig): ("km", "nshard", "rank", "block_size", "normalize")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for command, (help_text, configs) in SUBCOMMANDS.items():
        p = sub.add_parser(command, help=help_text)
        for config in configs + (Common,):
            add_arguments(p, config, exclusive=[("checkpoint", "mfcc")] if config is FeatureConfig else (),
                          skip=SKIPPED.get((command, config), ()))
    return parser


def _limit_threads(threads: Optional[int]):
    """``--threads`` for torch and for sklearn's OpenMP/BLAS pools (a context manager)."""
    if not threads:
        return contextlib.nullcontext()
    torch.set_num_threads(threads)
    return threadpool_limits(limits=threads)


def _print_fit(cfg: FitConfig, meta: dict) -> None:
    print(f"wrote {cfg.out}: K={cfg.n_clusters}, fitted on {meta['frames']} frames of {meta['utterances']} "
          f"utterances, objective {meta['init_objective']:.4f} on the {meta['init_frames']} frames of the "
          f"initial fit" + (f", {meta['stream_objective']:.4f} held-out on {meta['partial_fit_steps']} streamed batches"
                            if meta["partial_fit_steps"] else "")
          + (", on L2-normalised features" if meta["normalize"] else ""))
    d = meta.get("distances")
    if d:
        print(f"squared distance to the nearest centroid (10/50/90th percentile over {d['frames']} frames): "
              f"{d['nearest']['p10']:.4g} / {d['nearest']['p50']:.4g} / {d['nearest']['p90']:.4g}")
        print(f"gap to the second nearest: {d['gap']['p10']:.4g} / {d['gap']['p50']:.4g} / {d['gap']['p90']:.4g} "
              f"(--temperature equal to the median gap gives the runner-up 0.37 of the winner's probability "
              f"on the median frame)")
        print(f"mean entropy of the top-{d['top_k']} soft label (one-hot 0 bits, uniform "
              f"{d['max_entropy_bits']:.3f}) and the nearest centroid's mean probability:")
        for t, h in d["entropy_bits"].items():
            print(f"  --soft --temperature {t}: {h:.3f} bits, {d['top1'][t]:.3f}")
        for m, h in d.get("entropy_bits_gap", {}).items():
            print(f"  --soft --temperature-gap {m} (T = {float(m) * d['gap']['p50']:.4g}): {h:.3f} bits, "
                  f"{d['top1_gap'][m]:.3f}")


def _print_dump(cfg: DumpConfig, s: dict) -> None:
    extra = (f", soft top-{cfg.top_k} at T={s['temperature']:.4g} (mean kept mass {s['mean_kept_mass']:.3f})"
             if cfg.soft else "")
    resumed = f" (resumed: {s['resumed_blocks']} of {s['blocks']} blocks were done)" if s["resumed_blocks"] else ""
    print(f"wrote {s['label_path']}: {s['utterances']} utterances, {s['frames']} frames{extra}{resumed}")


def cmd_fit(args, progress: bool) -> int:
    plan = make_plan("fit", from_args(FitCorpus, args), from_args(FeatureConfig, args), fit=from_args(FitConfig, args),
                     progress=progress)
    _, meta = fit(plan)
    _print_fit(plan.fit.cfg, meta)
    return 0


def cmd_dump(args, progress: bool) -> int:
    plan = make_plan("dump", from_args(Corpus, args), from_args(FeatureConfig, args),
                     dump=from_args(DumpConfig, args), progress=progress)
    _print_dump(plan.dump.cfg, dump(plan))
    return 0


def cmd_run(args, progress: bool) -> int:
    fit_cfg = from_args(FitConfig, args)
    dump_cfg = from_args(DumpConfig, args, km=fit_cfg.out, nshard=1, rank=0, block_size=fit_cfg.block_size,
                         normalize=None)
    r = run(make_plan("run", from_args(Corpus, args), from_args(FeatureConfig, args), fit=fit_cfg, dump=dump_cfg,
                      progress=progress))
    if r["fit"] is None:
        print(f"{fit_cfg.out}: already fitted with these inputs and settings")
    else:
        _print_fit(fit_cfg, r["fit"])
    _print_dump(dump_cfg, r["dump"])
    if r["reuse"]:
        print(f"reused the features of {r['cached_utterances']} sampled utterances ({r['cached_frames']} frames kept, "
              f"at most {r['cache_capacity']}): {r['reused_frames']} frames not computed again")
    else:
        print("features computed in batches: the sample's were computed again for the labels")
    return 0


def cmd_merge(args, progress: bool) -> int:
    s = merge(make_plan("merge", merge=from_args(MergeConfig, args), progress=progress))
    print(f"wrote {s['label_path']}: {s['utterances']} utterances, {s['frames']} frames"
          + (" (+ soft labels)" if s["soft"] else ""))
    return 0


def cmd_check(args, progress: bool) -> int:
    a = from_args(CheckArgs, args)
    label_dir = a.label_dir or a.manifest_dir
    if not os.path.isdir(a.manifest_dir):
        raise InputError([f"{a.manifest_dir}: manifest directory not found"])
    splits = a.split or sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(a.manifest_dir, "*.tsv")))
    if not splits:
        raise InputError([f"{a.manifest_dir}: no *.tsv manifests found"])
    problems: List[str] = []
    for split in splits:
        soft = [lab for lab in a.labels
                if any(os.path.exists(p) for p in soft_label_paths(label_dir, split, lab).values())]
        problems += check_split(a.manifest_dir, split, label_dir, a.labels, a.label_rate,
                                sample_rate=a.sample_rate, soft_labels=soft,
                                audio_headers=a.audio_headers, tolerance=a.tolerance)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{PROG} check: {len(problems)} problem(s) in {', '.join(splits)}", file=sys.stderr)
        return 1
    print(f"OK: {', '.join(splits)} x labels {', '.join(a.labels)} in {label_dir} "
          f"(label rate {a.label_rate:g} Hz)")
    return 0


def cmd_quality(args, progress: bool) -> int:
    results = measure_quality(from_args(QualityConfig, args))
    print(format_table(results))
    return 0


COMMANDS = {"fit": cmd_fit, "dump": cmd_dump, "run": cmd_run, "merge": cmd_merge, "check": cmd_check,
            "quality": cmd_quality}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    common = from_args(Common, args)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", level=logging.INFO, stream=sys.stderr, force=True)
    if not common.verbose:
        for noisy in ("fairseq", "fairseq.tasks", "fairseq.models"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning)

    def work():
        with _limit_threads(getattr(args, "threads", None)):
            return COMMANDS[args.command](args, common.progress)

    code, result = run_reporting_errors(f"{PROG} {args.command}", common.debug, work,
                                        interrupted="interrupted (rerun the same command to resume)")
    return result if code == 0 else code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
