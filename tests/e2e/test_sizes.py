"""docs/ablations.md's "Sizes" table is what ``benchmarks/sizes/param_counts.py`` computes from the configs:
the rows the README and the issue compare (narrow, narrow_small, L/6, the convolution-only student, masking
distillation, HuBERT Base) against freshly built models; the whole table with ``--runslow``."""

import re

import pytest

from benchmarks.sizes import param_counts

pytestmark = pytest.mark.e2e

#: The rows whose sizes the README and docs/ablations.md argue from.
COMPARED = ["dicehubert_narrow", "dicehubert_narrow_small", "dicehubert_shallow_l6", "dicehubert_conv_narrow",
            "maskdistil_narrow", "hubert_base_scratch"]


def doc_table():
    """``{config as typed: (parameters, L_feat heads)}`` of the table in docs/ablations.md."""
    with open(param_counts.DOC, encoding="utf-8") as f:
        text = f.read()
    table = text[text.index(param_counts.BEGIN):text.index(param_counts.END)]
    rows = {}
    for m in re.finditer(r"^\| `([^`]+)` \| [^|]+ \| ([\d.]+)M \| ([\d.]+M|-) \|", table, re.M):
        rows[m.group(1)] = (m.group(2) + "M", m.group(3))
    return rows


def test_table_lists_every_experiment_and_the_tiny_presets():
    rows = doc_table()
    expected = set(param_counts.experiments()) | {f"{n} {ov}" for n, ov in param_counts.TINY}
    assert set(rows) == expected


@pytest.mark.parametrize("name", COMPARED)
def test_compared_rows_are_the_built_models(name):
    c = param_counts.count(name)
    heads = param_counts.millions(c["feat_heads"]) if c["feat_heads"] else "-"
    assert doc_table()[name] == (param_counts.millions(c["student"]), heads)


def test_narrow_small_is_at_most_l6_and_narrow_is_not():
    rows = {k: float(v[0][:-1]) for k, v in doc_table().items()}
    assert rows["dicehubert_narrow_small"] <= rows["dicehubert_shallow_l6"] < rows["dicehubert_narrow"]


@pytest.mark.slow
def test_whole_table_is_what_the_script_writes():
    with open(param_counts.DOC, encoding="utf-8") as f:
        assert param_counts.markdown() in f.read()
