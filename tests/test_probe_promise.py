"""dicehubert-probe keeps its promises: the test PER is the best-valid-epoch head's (not the last
epoch's), and ``--patience`` stops training early.

The probe is run through its CLI (``main(argv)`` with ``--json``) with the valid split also as
the test split: the reported test PER must then be the lowest valid PER of the history, which
a run whose last epoch is not its best tells apart from the last head's.
"""

import json
import logging
import os

import pytest
import torch

from dicehubert_fairseq.data.files import read_manifest
from dicehubert_fairseq.probe.cli import main
from dicehubert_fairseq.probe.synthetic import write_tone_corpus
from dicehubert_fairseq.testing import write_checkpoint, write_random_labels

EPOCHS = 25
#: a large learning rate: the valid PER goes up and down from epoch to epoch
OPTS = ["--epochs", str(EPOCHS), "--batch-size", "4", "--lr", "0.1", "--threads", "1", "-q",
        "--valid-split", "valid", "--test-split", "valid"]


@pytest.fixture(autouse=True)
def restore_process_state():
    """main() configures logging and torch threads, as a CLI does; undo it for the other tests."""
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    fairseq_level = logging.getLogger("fairseq").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("fairseq").setLevel(fairseq_level)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_promise")
    data = str(root / "data")
    write_tone_corpus(data, splits={"train": 40, "valid": 15, "test": 4}, seed=3)
    sizes = {s: read_manifest(os.path.join(data, f"{s}.tsv")).sizes for s in ("train", "valid")}
    write_random_labels(str(root / "labels"), sizes)
    ckpt = str(root / "hubert.pt")
    write_checkpoint(ckpt, data, str(root / "labels"), seed=3)
    return {"data": data, "ckpt": ckpt}


def _probe(tones, tmp_path, *extra):
    out = tmp_path / f"probe{len(list(tmp_path.iterdir()))}.json"
    assert main(["--checkpoint", tones["ckpt"], "--data", tones["data"], "--json", str(out), *OPTS, *extra]) == 0
    return json.loads(out.read_text())


def test_test_per_is_the_best_valid_epochs_and_patience_stops_early(tones, tmp_path):
    full = _probe(tones, tmp_path, "--patience", "0")
    history = [h["valid_per"] for h in full["history"]]
    assert full["epochs"] == len(history) == EPOCHS  # patience 0: every epoch
    best = min(history)
    assert history[-1] > best + 0.01, history  # the precondition: the last epoch is not the best
    assert full["best_epoch"] == history.index(best) + 1
    # test split == valid split: the test PER is the best epoch's valid PER, not the last epoch's
    assert full["per"] == pytest.approx(best, abs=1e-12)
    assert full["valid_per"] == best

    patience = 3
    early = _probe(tones, tmp_path, "--patience", str(patience))
    assert early["history"] == full["history"][: early["epochs"]]  # same seed: the same epochs so far
    assert early["epochs"] < EPOCHS, "the test needs a run that stops early"
    # stopped after `patience` epochs without a better valid PER (counted once it is below 1)
    assert early["epochs"] == early["best_epoch"] + patience
    tail = [h["valid_per"] for h in early["history"][early["best_epoch"]:]]
    assert len(tail) == patience and all(v >= early["valid_per"] for v in tail)
    assert early["per"] == pytest.approx(early["valid_per"], abs=1e-12)
