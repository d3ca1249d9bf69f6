"""run_probe: deterministic, one layer weight per hidden state of any HuBERT-family upstream."""

import pytest

from dicehubert_fairseq.probe.run import ProbeConfig, run_probe
from tests.helpers.data import write_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_probe_is_deterministic(tones):
    cfg = ProbeConfig(epochs=3, max_train_utterances=12)
    a, b = (run_probe(tones["ckpt"], tones["data"], cfg=cfg) for _ in range(2))
    for r in (a, b):
        r.pop("seconds")
    assert a == b


def test_probe_on_dicehubert_student_has_one_weight_per_hidden_state(tones, tmp_path):
    ckpt = str(tmp_path / "student.pt")
    write_checkpoint(ckpt, tones["data"], tones["labels"], model="dicehubert_student", task="dicehubert",
                     model_overrides={"encoder_layers": 3})
    result = run_probe(ckpt, tones["data"], cfg=ProbeConfig(epochs=1, max_train_utterances=8))
    assert len(result["layer_weights"]) == result["num_layers"] == 3 + 1
    assert sum(result["layer_weights"]) == pytest.approx(1.0, abs=1e-6)
