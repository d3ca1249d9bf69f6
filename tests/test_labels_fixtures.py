"""Nothing changes for users: ``dicehubert-labels`` writes the files committed in ``tests/fixtures/labels``.

Those were written by the code of commit 756c0cf (``python -m tests.fixtures.make_label_fixtures``):
hard and soft labels, shards and their merge, a dump resumed after SIGKILL, ``run`` (one pass),
a model fitted on L2-normalised features, concatenated layers, MFCC, and the k-means models
(centroids and metadata). The same script writes them again here, in a separate process, with
the code under test; the dumps read the committed models, so a change of fit does not hide
behind them.

Bytes are compared where they can be equal: on the platform that wrote the fixtures
(``platform.json``: torch build and CPU kernels, corpus and teacher; scikit-learn too for
what a fit writes). Elsewhere float arithmetic may differ in the last bits, and the files are
compared in form only (names, shapes, dtypes, utterances and frames per utterance, JSON keys).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.fixtures.make_label_fixtures import FITS, HERE, SCENARIOS
from tests.helpers.runs import REPO, subprocess_env


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("label_fixtures") / "labels")
    proc = subprocess.run([sys.executable, "-m", "tests.fixtures.make_label_fixtures", "--out", out, "--models", HERE],
                          cwd=REPO, env=subprocess_env(PYTHONPATH=REPO), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(os.path.join(HERE, "platform.json")) as f, open(os.path.join(out, "platform.json")) as g:
        committed, here = json.load(f), json.load(g)
    return out, committed, here


def _files(directory):
    return sorted(os.path.relpath(os.path.join(d, n), directory) for d, _, ns in os.walk(directory) for n in ns)


def _same_form(expected: str, got: str) -> None:
    """What does not depend on float rounding: array shapes and dtypes, frames per line, JSON keys."""
    if expected.endswith(".npy"):
        a, b = np.load(expected), np.load(got)
        assert (a.shape, a.dtype) == (b.shape, b.dtype), got
        if a.dtype.kind in "iu" and a.ndim == 1:  # soft offsets: frames per utterance
            assert np.array_equal(a, b), got
    elif expected.endswith(".json"):
        with open(expected) as f, open(got) as g:
            assert sorted(json.load(f)) == sorted(json.load(g)), got
    else:
        with open(expected) as f, open(got) as g:
            assert [len(line.split()) for line in f] == [len(line.split()) for line in g], got


def _fitted(scenario: str) -> bool:
    """Whether the scenario's bytes come from a k-means fit (they depend on scikit-learn's version)."""
    return scenario in FITS or scenario == "run"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_files_are_those_of_today(written, scenario):
    out, committed, here = written
    expected, got = os.path.join(HERE, scenario), os.path.join(out, scenario)
    names = _files(expected)
    assert names and _files(got) == names
    keys = ["torch", "cpu_capability", "inputs_sha1"] + (["sklearn"] if _fitted(scenario) else [])
    exact = all(committed[k] == here[k] for k in keys)
    for name in names:
        if exact:
            with open(os.path.join(expected, name), "rb") as f, open(os.path.join(got, name), "rb") as g:
                assert f.read() == g.read(), f"{scenario}/{name} differs from the committed file"
        else:
            _same_form(os.path.join(expected, name), os.path.join(got, name))


def test_the_fixtures_were_written_on_this_kind_of_platform_or_are_compared_in_form(written):
    """Say which: a run elsewhere (another CPU's kernels) compares forms only, which this test makes visible."""
    _, committed, here = written
    assert set(committed) == set(here) == {"torch", "cpu_capability", "inputs_sha1", "sklearn"}
    if any(committed[k] != here[k] for k in ("torch", "cpu_capability", "inputs_sha1")):
        pytest.skip(f"fixtures written on {committed}, this is {here}: label files compared in form only")
