"""The plugin package: registration with fairseq, and the torch.load allow-list for fairseq checkpoints (_compat)."""

import os

import numpy as np
import pytest
import torch

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.errors import InputError


def test_registration():
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    from dicehubert_fairseq.criterions.dicehubert import DiceHubertCriterion
    from dicehubert_fairseq.models.dicehubert_student import DiceHubertStudent
    from dicehubert_fairseq.tasks.dicehubert import DiceHubertTask

    assert TASK_REGISTRY["dicehubert"] is DiceHubertTask
    assert MODEL_REGISTRY["dicehubert_student"] is DiceHubertStudent
    assert CRITERION_REGISTRY["dicehubert"] is DiceHubertCriterion
    # fairseq's own names stay fairseq's
    assert TASK_REGISTRY["hubert_pretraining"] is not DiceHubertTask
    assert MODEL_REGISTRY["hubert"] is not DiceHubertStudent


def test_allow_list_covers_fairseq_checkpoint_contents(tmp_path):
    import argparse

    from fairseq.data import Dictionary

    d = Dictionary()
    d.add_symbol("0")
    state = {"args": argparse.Namespace(arch="hubert", lr=[0.0005]), "task_state": {"dictionaries": [d]},
             "extra_state": {"val_loss": np.float64(1.5), "best": np.float32(2.0), "arr": np.arange(3)}}
    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["args"].arch == "hubert" and loaded["task_state"]["dictionaries"][0].index("0") == 4
    assert float(loaded["extra_state"]["val_loss"]) == 1.5
    assert loaded["extra_state"]["arr"].tolist() == [0, 1, 2]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_allow_list_still_refuses_arbitrary_code(tmp_path):
    import pickle

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    from dicehubert_fairseq.checkpoint import load_state

    with pytest.raises(InputError, match="cannot be loaded safely"):
        load_state(str(path))
