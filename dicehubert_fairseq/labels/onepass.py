"""``dicehubert-labels run``: fit k-means and dump the labels of a split in one process.

The same files as ``fit`` then ``dump`` with the same options (the same k-means model file, the
same label bytes, hard and soft), with one teacher load, and the k-means sample's features
computed once where memory allows:

* while fitting, the features of the sampled utterances are kept in a
  :class:`~.features.FeatureCache` of at most ``--pool-size`` frames (the k-means pool's bound,
  so memory stays bounded whatever the corpus size), whole utterances in the order k-means reads
  them; the dump takes them from there instead of running the teacher again. A sample that fits
  the pool is therefore computed once; a larger one (two passes: a uniform reservoir, then every
  frame streamed) computes its cached utterances once and the others in both passes and again
  for the labels, as ``fit`` + ``dump`` do;
* reuse is exact only where an utterance's features do not depend on the other utterances of
  its batch: one utterance at a time (the CPU default, ``--max-batch-seconds 0``) or MFCC.
  Batched features change in the last bits with their batch mates, so with batches (the CUDA
  default) nothing is cached and the sample is recomputed in the dump's batches: the files stay
  those of ``fit`` + ``dump``.

Every feature and k-means option of ``fit`` and ``dump`` applies: ``--layer 6,9,12`` (the
cache keeps the concatenated features), ``--normalize`` (fit's: the mode is stored in the model
and the labels follow it, as ``dump`` does), ``--soft --temperature-gap G`` (the gap is read from
the model the fit has just written).

Resumable like ``dump``: the model is written atomically at the end of the fit; a rerun of the
same command whose model file carries the same inputs and settings skips the fit (its cache is
then empty and the sample is recomputed, to the same bits), and the dump resumes from its
finished blocks. One process only: the labels need the model, which needs the whole sample; to
spread the dump over machines, ``fit`` once and ``dump --nshard N --rank R`` (then ``merge``).
"""

import logging
import os
import time
from typing import Dict, Optional

from ..data.files import read_manifest
from ..data.preflight import check_audio, require_valid
from ..errors import InputError
from .dump import DumpConfig, check_dump_config, dump_labels
from .features import FeatureCache, FeatureConfig, computed_alone, make_reader, max_batch_samples
from .fit import FitConfig, check_fit_config, fit_kmeans, fit_settings, load_kmeans
from .kmeans import pool_frames

logger = logging.getLogger(__name__)


def _finished_fit(path: str, manifest_path: str, description: Dict[str, object],
                  settings: Dict[str, object]) -> Optional[tuple]:
    """``(model, meta)`` of a model file left by a fit with these inputs and settings, else None."""
    if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(manifest_path):
        return None
    try:
        km, meta = load_kmeans(path)
    except InputError:
        return None
    same = (meta.get("settings") == settings and meta.get("features") == description
            and meta.get("manifest") == os.path.abspath(manifest_path))
    return (km, meta) if same else None


def run_labels(manifest_path: str, split: str, features: FeatureConfig, fit_cfg: FitConfig, dump_cfg: DumpConfig,
               check_headers: bool = True, progress: bool = True) -> Dict[str, object]:
    """Fit k-means on (a sample of) a manifest, then write its labels, with one feature reader.

    Args:
        manifest_path: ``{split}.tsv``.
        split: split name of the label files.
        features: teacher layer or MFCC (one reader serves both stages).
        fit_cfg: k-means settings; the model is written to ``fit_cfg.out``.
        dump_cfg: label settings; ``km`` must be ``fit_cfg.out``, ``block_size`` that of the fit,
            one shard (``nshard`` 1).
        check_headers: check every utterance's audio header first.
        progress: tqdm bars.

    Returns:
        dict: ``fit`` (the model's metadata, or None when a finished fit was found), ``dump``
        (:func:`~.dump.dump_labels`' summary), ``reused_frames`` / ``reused_utterances`` (sample
        features taken from memory by the dump and the fit's second pass), ``cached_frames``,
        ``cache_capacity``, ``reuse`` (False when features are batched), ``resumed_fit``, ``seconds``.

    Raises:
        InputError: every problem ``fit`` and ``dump`` refuse, before the teacher is loaded where
            they do; a shard requested, or ``km`` other than the fit's output.
    """
    t0 = time.time()
    if dump_cfg.nshard != 1 or dump_cfg.rank != 0:
        raise InputError(["dicehubert-labels run writes one process's labels; for shards, 'fit' once, then "
                          "'dump --nshard N --rank R' and 'merge'"])
    if os.path.abspath(dump_cfg.km) != os.path.abspath(fit_cfg.out):
        raise InputError([f"run: the labels must use the model it fits ({fit_cfg.out}), not {dump_cfg.km}"])
    check_fit_config(fit_cfg)
    check_dump_config(dump_cfg, fit_cfg.n_clusters)
    manifest = read_manifest(manifest_path)
    reader = make_reader(features)
    if check_headers:
        require_valid(check_audio(manifest, reader.sample_rate, headers=True), manifest.path)
    batch_samples = max_batch_samples(features, reader)
    reuse = computed_alone(reader, batch_samples)
    capacity = pool_frames(fit_cfg.n_clusters, fit_cfg.batch_size, fit_cfg.pool_size)
    cache = FeatureCache(capacity) if reuse else None
    done = _finished_fit(fit_cfg.out, manifest.path, reader.description, fit_settings(fit_cfg, batch_samples))
    fit_meta = None
    if done is not None:
        logger.info(f"{fit_cfg.out}: fitted already with these inputs and settings; dumping")
        cache = None
    else:
        if not reuse:
            logger.info("features are computed in batches (--max-batch-seconds > 0): batched features depend on "
                        "their batch, so the sample is recomputed in the dump's batches (nothing reused)")
        _, fit_meta = fit_kmeans(manifest_path, features, fit_cfg, check_headers=False, progress=progress,
                                 reader=reader, cache=cache)
    served_in_fit = (cache.served_frames, cache.served_rows) if cache is not None else (0, 0)
    if cache is not None:
        cache.freeze()
        logger.info(f"reusing the features of {len(cache)} sampled utterances ({cache.frames} frames, "
                    f"{cache.frames * reader.dim * 4 / 2**20:.0f} MiB; capacity {capacity} frames)")
    summary = dump_labels(manifest_path, split, features, dump_cfg, check_headers=False, progress=progress,
                          reader=reader, cache=cache)
    return {"fit": fit_meta, "dump": summary, "resumed_fit": done is not None, "reuse": reuse,
            "cache_capacity": capacity if reuse else 0,
            "cached_frames": cache.frames if cache is not None else 0,
            "cached_utterances": len(cache) if cache is not None else 0,
            "reused_frames": cache.served_frames if cache is not None else 0,
            "reused_utterances": cache.served_rows if cache is not None else 0,
            "reused_in_fit_frames": served_in_fit[0], "seconds": time.time() - t0}
