"""The probe's head module: phone error rate (editdistance), greedy CTC decoding, CTC feasibility."""

import numpy as np
import pytest
import torch

from dicehubert_fairseq.probe.head import ctc_feasible, ctc_greedy_decode, phone_error_rate
from dicehubert_fairseq.probe.transcripts import UNK_ID


@pytest.mark.parametrize("ref,hyp,expected", [
    ("kitten", "sitting", 3),             # 2 substitutions + 1 insertion
    ([1, 2, 3], [1, 2, 3], 0),
    ([], [1, 2], 2),                      # 2 insertions
    ([1, 2], [], 2),                      # 2 deletions
    ([1, 2, 3], [3, 2, 1], 2),            # 2 substitutions
    ([1, 2, 3, 4], [1, 3, 4, 5], 2),      # delete 2, insert 5
    ([5, 5, 5], [5], 2),
])
def test_edit_distance_hand_computed(ref, hyp, expected):
    """The PER's Levenshtein distance, read back through phone_error_rate (one extra correct phone
    keeps the reference length non-zero)."""
    ref, hyp = [ord(c) if isinstance(c, str) else c for c in ref], [ord(c) if isinstance(c, str) else c for c in hyp]
    assert phone_error_rate([ref, [99]], [hyp, [99]]) * (len(ref) + 1) == pytest.approx(expected)
    assert phone_error_rate([hyp, [99]], [ref, [99]]) * (len(hyp) + 1) == pytest.approx(expected)


def test_phone_error_rate_is_corpus_level():
    # (1 deletion) + (1 insertion) over 4 + 2 reference phones
    assert phone_error_rate([[1, 2, 3, 4], [5, 6]], [[1, 3, 4], [5, 6, 7]]) == pytest.approx(2 / 6)
    assert phone_error_rate([[1, 2]], [[1, 2]]) == 0.0
    assert phone_error_rate([[1, 2]], [[]]) == 1.0
    assert phone_error_rate([[1]], [[2, 3, 4]]) == 3.0  # insertions can push PER above 1
    # a phone unseen in training (UNK_ID) can never be produced: always an error
    assert phone_error_rate([[1, UNK_ID, 2]], [[1, 2]]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no phones"):
        phone_error_rate([[], []], [[1], []])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        phone_error_rate([[1], [2]], [[1]])


@pytest.mark.parametrize("frames,expected", [
    ([0, 3, 3, 0, 3, 5, 5], [3, 3, 5]),   # a blank separates a repeated phone; repeats collapse
    ([1, 1, 1], [1]),
    ([0, 0, 0], []),
    ([], []),
    ([2, 0, 0, 2, 2, 1, 0, 1], [2, 2, 1, 1]),
])
def test_ctc_greedy_decode_collapses_then_drops_blanks(frames, expected):
    assert ctc_greedy_decode(frames) == expected
    assert ctc_greedy_decode(torch.tensor(frames, dtype=torch.long)) == expected
    assert ctc_greedy_decode(np.asarray(frames, dtype=np.int64)) == expected


def test_ctc_feasible_counts_blanks_between_repeats():
    assert ctc_feasible(3, [1, 2, 3])
    assert not ctc_feasible(3, [1, 1, 2])   # needs 1 0 1 2
    assert ctc_feasible(4, [1, 1, 2])
    assert ctc_feasible(0, [])
