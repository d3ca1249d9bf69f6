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
same command whose model file carries the same inputs and settings skips the fit (the plan finds
it: :attr:`~.plan.FitPlan.done`; nothing is cached and the sample is recomputed, to the same
bits), and the dump resumes from its finished blocks. One process only: the labels need the model, which needs the whole sample; to
spread the dump over machines, ``fit`` once and ``dump --nshard N --rank R`` (then ``merge``).
"""

import logging
import time
from typing import Dict

from .dump import dump
from .fit import fit

logger = logging.getLogger(__name__)


def run(plan) -> Dict[str, object]:
    """Fit k-means on (a sample of) a manifest, then write its labels, with one feature reader.

    Args:
        plan: a ``run`` :class:`~.plan.LabelPlan`: the fit's model file is the dump's model, one
            shard, the features source (with a cache of the sample's features where they are
            computed one utterance at a time) shared by both.

    Returns:
        dict: ``fit`` (the model's metadata, or None when a finished fit was found), ``dump``
        (:func:`~.dump.dump`'s summary), ``reused_frames`` / ``reused_utterances`` (sample
        features taken from memory by the dump and the fit's second pass), ``cached_frames``,
        ``cache_capacity``, ``reuse`` (False when features are batched), ``resumed_fit``, ``seconds``.
    """
    t0 = time.time()
    cache, reuse = plan.source.cache, plan.source.alone
    fit_meta = None
    if plan.fit.done:
        logger.info(f"{plan.fit.cfg.out}: fitted already with these inputs and settings; dumping")
    else:
        if not reuse:
            logger.info("features are computed in batches (--max-batch-seconds > 0): batched features depend on "
                        "their batch, so the sample is recomputed in the dump's batches (nothing reused)")
        _, fit_meta = fit(plan)
    served_in_fit = cache.served_frames if cache is not None else 0
    if cache is not None:
        cache.freeze()
        logger.info(f"reusing the features of {len(cache)} sampled utterances ({cache.frames} frames, "
                    f"{cache.frames * plan.source.reader.dim * 4 / 2**20:.0f} MiB; capacity {cache.capacity} frames)")
    summary = dump(plan.with_model())
    return {"fit": fit_meta, "dump": summary, "resumed_fit": plan.fit.done, "reuse": reuse,
            "cache_capacity": plan.fit.pool_size if reuse else 0,
            "cached_frames": cache.frames if cache is not None else 0,
            "cached_utterances": len(cache) if cache is not None else 0,
            "reused_frames": cache.served_frames if cache is not None else 0,
            "reused_utterances": cache.served_rows if cache is not None else 0,
            "reused_in_fit_frames": served_in_fit, "seconds": time.time() - t0}
