"""HF model directories as upstreams: hf_hidden_states equals hidden_states, and dicehubert-probe on an
exported directory gives the source's features and PER."""

import os

import pytest
import torch

from dicehubert_fairseq.checkpoint import load_model
from dicehubert_fairseq.data.audio import read_audio
from dicehubert_fairseq.data.files import read_manifest
from dicehubert_fairseq.export.cli import main
from dicehubert_fairseq.export.hf_model import hf_hidden_states, load_hf_model
from dicehubert_fairseq.hidden_states import hidden_states
from dicehubert_fairseq.probe.cli import main as probe_main
from dicehubert_fairseq.probe.run import ProbeConfig, run_probe
from tests.helpers.data import perturb_checkpoint
from tests.helpers.tones import write_tone_corpus, write_tone_world

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-4


@pytest.fixture(scope="module")
def tone_teacher(tmp_path_factory):
    """Tone corpus and a perturbed tiny hubert (2 x 32, stride 320) with task.normalize, exported to HF."""
    root = tmp_path_factory.mktemp("tones")
    world = write_tone_world(str(root / "data"), {"train": 24, "valid": 8, "test": 8})
    data, ckpt = world["data"], world["ckpt"]
    perturb_checkpoint(ckpt, normalize=True, seed=3)
    hf = str(root / "hubert_hf")
    assert main([ckpt, "--to", "hf", hf, "-q"]) == 0
    return {"data": data, "ckpt": ckpt, "hf": hf}


def test_hf_hidden_states_equal_fairseq(tone_teacher):
    """What the probe (and the export's check) reads, one utterance as the probe runs it: features (hidden
    state 0), every layer, x, the frame padding, features_pen."""
    fs_model, _ = load_model(tone_teacher["ckpt"])
    hf_model, hf_cfg = load_hf_model(tone_teacher["hf"])
    assert hf_cfg["task"] == {"sample_rate": 16000, "normalize": True}
    manifest = read_manifest(os.path.join(tone_teacher["data"], "test.tsv"))
    diffs = []
    for i in range(4):
        wav = torch.from_numpy(read_audio(manifest, i, 16000))[None]
        wav = torch.nn.functional.layer_norm(wav, wav.shape)
        with torch.inference_mode():
            a, b = hidden_states(fs_model, wav), hf_hidden_states(hf_model, wav)
        assert len(a.layers) == len(b.layers) == 2 and a.features.shape == b.features.shape == (1, a.x.shape[1], 32)
        assert torch.equal(a.padding_mask, b.padding_mask) and not b.padding_mask.any()
        diffs.append([float((x - y).abs().max()) for x, y in zip([a.features, *a.layers, a.x], [b.features, *b.layers, b.x])])
        assert abs(float(a.features_pen - b.features_pen)) <= 1e-5 * float(a.features_pen)
    per_state = torch.tensor(diffs).amax(0).tolist()
    print(f"\nmax |HF - fairseq| per hidden state (features, layers, x): {per_state}")
    assert max(per_state) < TOL, per_state


def test_probe_on_hf_directory_equals_fairseq(tone_teacher):
    cfg = ProbeConfig(epochs=40, batch_size=4, seed=0)
    r_fs = run_probe(tone_teacher["ckpt"], tone_teacher["data"], cfg=cfg)
    r_hf = run_probe(tone_teacher["hf"], tone_teacher["data"], cfg=cfg)
    print(f"\nprobe PER fairseq {r_fs['per']:.4f}, HF {r_hf['per']:.4f}")
    assert r_fs["per"] < 0.8  # the probe learned something: equal PERs are not both "all wrong"
    assert r_hf["per"] == r_fs["per"] and r_hf["valid_per"] == r_fs["valid_per"]
    assert r_hf["num_layers"] == r_fs["num_layers"] == 3 and r_hf["frames"] == r_fs["frames"]


def test_probe_cli_refuses_a_directory_that_is_not_a_model(tmp_path, capsys):
    data = tmp_path / "data"
    write_tone_corpus(str(data), splits={"train": 4, "valid": 2, "test": 2}, seed=0)
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    code = probe_main(["--checkpoint", str(empty), "--data", str(data), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and f"{empty}: a directory without config.json" in err, err
