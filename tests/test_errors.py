"""One limit on reported problems (dicehubert_fairseq.errors.Problems)."""

import pytest

from dicehubert_fairseq.errors import MAX_REPORTED, InputError, Problems


def test_problems_are_listed_up_to_the_limit_per_file_then_counted():
    p = Problems()
    for i in range(MAX_REPORTED + 5):
        p.add("a.txt", f"a.txt:{i + 1}: bad")
    p.add("b.txt", "b.txt:1: bad")
    lines = p.lines()
    assert lines[:MAX_REPORTED] == [f"a.txt:{i + 1}: bad" for i in range(MAX_REPORTED)]
    assert "b.txt:1: bad" in lines
    assert lines[-1] == "a.txt: ... and 5 more problems in this file"
    assert len(lines) == MAX_REPORTED + 2
    with pytest.raises(InputError) as e:
        p.raise_if_any()
    assert e.value.problems == lines
    Problems().raise_if_any()  # nothing recorded: no error
