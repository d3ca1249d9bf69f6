"""The statistics of examples/tiny's claims table: paired and Welch intervals, Holm's correction,
and whether an interval rules out the paper's size of effect.

Pure functions over lists of per-seed phone error rates (PER); report.py applies them to the
pipeline's rows.  A difference ``d`` is always PER of the row the paper says is worse minus PER
of the row it says is better: positive is the paper's direction.
"""

import math
import statistics
from typing import Dict, List, Optional, Sequence

from scipy import stats as _sp

CONFIDENCE = 0.95
ALPHA = 0.05  # the family-wise error rate of the verdicts (1 - CONFIDENCE)


def paired(diffs: Sequence[float], confidence: float = CONFIDENCE) -> Dict:
    """One-sample t on per-seed differences.

    Returns:
        ``{"n", "mean", "se", "ci", "p"}``: ``se``, ``ci`` (two-sided ``confidence`` t interval of the
        mean) and ``p`` (two-sided, mean = 0) are None with fewer than 2 differences; with a zero
        spread ``p`` is 0 (or 1 when the mean is 0 too).
    """
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else math.nan
    out = {"n": n, "mean": mean, "se": None, "ci": None, "p": None}
    if n < 2:
        return out
    se = statistics.stdev(diffs) / math.sqrt(n)
    half = float(_sp.t.ppf(0.5 + confidence / 2, n - 1)) * se
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * _sp.t.sf(abs(mean) / se, n - 1))
    out.update(se=se, ci=[mean - half, mean + half], p=p)
    return out


def welch(better: Sequence[float], worse: Sequence[float], confidence: float = CONFIDENCE) -> Dict:
    """Welch's unpaired t on two samples (mean of ``worse`` minus mean of ``better``).

    Returns:
        ``{"mean", "se", "df", "ci", "p"}`` (Welch-Satterthwaite degrees of freedom); all but
        ``mean`` None unless both samples have 2+ values.  A row trained once (one value) has no
        variance of its own: with one value on one side the interval is the other side's
        one-sample interval around the difference.
    """
    nb, nw = len(better), len(worse)
    mean = statistics.fmean(worse) - statistics.fmean(better) if nb and nw else math.nan
    out = {"mean": mean, "se": None, "df": None, "ci": None, "p": None}
    vb = statistics.variance(better) / nb if nb > 1 else 0.0
    vw = statistics.variance(worse) / nw if nw > 1 else 0.0
    if max(nb, nw) < 2 or (vb == 0 and vw == 0):
        return out
    se = math.sqrt(vb + vw)
    terms = [(v, n) for v, n in ((vb, nb), (vw, nw)) if n > 1 and v > 0]
    df = (vb + vw) ** 2 / sum(v * v / (n - 1) for v, n in terms)
    half = float(_sp.t.ppf(0.5 + confidence / 2, df)) * se
    p = float(2 * _sp.t.sf(abs(mean) / se, df))
    out.update(se=se, df=df, ci=[mean - half, mean + half], p=p)
    return out


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjusted p-values (None stays None and does not count as a test).

    The ``m`` tested p-values sorted ascending, ``p_(i)`` becomes ``max_{j<=i} min(1, (m - j + 1) p_(j))``
    (1-based); a family's error rate stays at most ``alpha`` when each test rejects at adjusted p < alpha.
    """
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(tested)
    out: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(mean: float, p_adjusted: Optional[float], alpha: float = ALPHA) -> str:
    """'holds' (the paper's direction), 'reversed' or 'within noise' by an adjusted p-value;
    'too few seeds' without one."""
    if p_adjusted is None:
        return "too few seeds"
    if p_adjusted >= alpha:
        return "within noise"
    return "holds" if mean > 0 else "reversed"


def against_paper_size(ci: Optional[Sequence[float]], worse_mean: float, size: Optional[float]) -> Optional[str]:
    """Whether an interval of the difference rules out the paper's relative size of effect.

    ``size`` is the paper's relative improvement (0.21: the better row's PER 21% below the other's);
    the interval, divided by ``worse_mean``, is compared with it: 'rules out the paper's size'
    (entirely below it), 'beyond the paper's size' (entirely above), 'consistent with the paper's
    size' (contains it).  None without a size or an interval.
    """
    if size is None or ci is None or not worse_mean:
        return None
    lo, hi = ci[0] / worse_mean, ci[1] / worse_mean
    if hi < size:
        return "rules out the paper's size"
    if lo > size:
        return "beyond the paper's size"
    return "consistent with the paper's size"
