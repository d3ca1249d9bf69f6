"""examples/tiny/stats.py: the claims table's statistics, against scipy and hand-computed numbers."""

import importlib
import os

import pytest
from scipy import stats as sp

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "tiny")


@pytest.fixture
def stats(monkeypatch):
    monkeypatch.syspath_prepend(TINY)  # as the example's scripts import each other
    return importlib.import_module("stats")


def test_paired_is_scipys_one_sample_t(stats):
    d = [0.03, 0.01, 0.04, -0.01, 0.02]
    out = stats.paired(d)
    ref = sp.ttest_1samp(d, 0.0)
    assert out["n"] == 5 and out["mean"] == pytest.approx(0.018)
    assert out["p"] == pytest.approx(ref.pvalue)
    lo, hi = ref.confidence_interval(0.95)
    assert out["ci"] == pytest.approx([lo, hi])
    assert stats.paired([0.1]) == {"n": 1, "mean": 0.1, "se": None, "ci": None, "p": None}
    assert stats.paired([0.02, 0.02, 0.02])["p"] == 0.0  # no spread, a non-zero mean
    assert stats.paired([0.0, 0.0])["p"] == 1.0


def test_welch_is_scipys_unequal_variance_t(stats):
    better, worse = [0.40, 0.42, 0.41, 0.45], [0.47, 0.44, 0.52]
    out = stats.welch(better, worse)
    ref = sp.ttest_ind(worse, better, equal_var=False)
    assert out["mean"] == pytest.approx(sum(worse) / 3 - sum(better) / 4)
    assert out["p"] == pytest.approx(ref.pvalue) and out["df"] == pytest.approx(ref.df)
    assert out["ci"] == pytest.approx(list(ref.confidence_interval(0.95)))
    # a row trained once has no spread of its own: the other side's one-sample interval around the difference
    one = stats.welch([0.40], [0.47, 0.44, 0.52])
    ref1 = sp.ttest_1samp([0.47, 0.44, 0.52], 0.40)
    assert one["p"] == pytest.approx(ref1.pvalue) and one["df"] == pytest.approx(2)
    assert stats.welch([0.4], [0.5])["ci"] is None


def test_holm_by_hand(stats):
    # m = 4 tested (None is not a test): sorted 0.01, 0.02, 0.04, 0.30 -> x4, x3, x2, x1, running max, cap 1
    assert stats.holm([0.04, None, 0.01, 0.30, 0.02]) == pytest.approx([0.08, None, 0.04, 0.30, 0.06], nan_ok=True)
    assert stats.holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # running maximum keeps the order
    assert stats.holm([]) == []


def test_verdicts(stats):
    assert stats.verdict(0.02, 0.01) == "holds" and stats.verdict(-0.02, 0.01) == "reversed"
    assert stats.verdict(0.02, 0.05) == "within noise" and stats.verdict(0.02, None) == "too few seeds"


def test_against_paper_size(stats):
    # worse row at PER 0.50: a 21% improvement is a difference of 0.105
    assert stats.against_paper_size([0.01, 0.10], 0.5, 0.21) == "rules out the paper's size"
    assert stats.against_paper_size([0.01, 0.11], 0.5, 0.21) == "consistent with the paper's size"
    assert stats.against_paper_size([0.11, 0.20], 0.5, 0.21) == "beyond the paper's size"
    assert stats.against_paper_size([-0.05, -0.01], 0.5, 0.21) == "rules out the paper's size"
    assert stats.against_paper_size(None, 0.5, 0.21) is None and stats.against_paper_size([0, 1], 0.5, None) is None
