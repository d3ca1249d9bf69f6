"""Shared fixtures: synthetic corpora, tiny checkpoints and thread limits (no network, nothing committed).

Unit tests are ``tests/test_<module>.py``; end-to-end tests (subprocesses, real training runs) are in
``tests/e2e/`` and marked ``e2e``; long ones are also marked ``slow`` (run with ``--runslow``); tests that
need a GPU are marked ``cuda`` and skip themselves without one (``tests/test_cuda.py``).
"""

import logging
import os

import pytest
import soundfile as sf
import torch
from threadpoolctl import threadpool_limits

from dicehubert_fairseq.labels.cli import main as labels_main
from tests.helpers.data import perturb_checkpoint, write_checkpoint, write_corpus, write_random_labels
from tests.helpers.tones import write_tone_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end test, run with --runslow (make test-all)")
    config.addinivalue_line("markers", "e2e: end-to-end test (tests/e2e: subprocesses, real training runs)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one (benchmarks/gpu/run.sh runs them)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Synthetic corpus (train 8 / valid 4 utterances) with random 50 Hz labels 'km' (K=20)."""
    root = tmp_path_factory.mktemp("corpus")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data)
    write_random_labels(labels, sizes)
    return {"data": data, "labels": labels, "sizes": sizes}


@pytest.fixture(scope="session")
def tiny_teacher(tiny_corpus, tmp_path_factory):
    """A randomly initialised fairseq `hubert` checkpoint (2 x 32) in fairseq's saved format."""
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    write_checkpoint(path, tiny_corpus["data"], tiny_corpus["labels"])
    return path


@pytest.fixture
def corpus(tmp_path):
    """A private corpus (train 6 / valid 2) with random 50 Hz labels 'km' (K=12): tests may mutate it."""
    sizes = write_corpus(str(tmp_path / "data"), {"train": 6, "valid": 2}, seed=3)
    write_random_labels(str(tmp_path / "labels"), sizes, "km", 12, 50, seed=3)
    return str(tmp_path / "data"), str(tmp_path / "labels"), sizes


@pytest.fixture
def flawed(tmp_path):
    """Train split (5 utterances, labels 'km' K=12) with two flaws: utterance 2 is 8 kHz audio (its
    header), utterance 3's label line is 10 labels (0.2 s) too long."""
    data, labels = tmp_path / "data", tmp_path / "labels"
    sizes = write_corpus(str(data), {"train": 5, "valid": 2}, seconds=(0.8, 1.2), seed=71)
    write_random_labels(str(labels), sizes, "km", 12, 50, seed=71)
    wav = data / "wav" / "train_0002.wav"
    audio, _ = sf.read(str(wav), dtype="float32")
    sf.write(str(wav), audio, 8000, subtype="PCM_16")  # same samples, wrong rate in the header
    lines = (labels / "train.km").read_text().splitlines()
    lines[3] += " 1" * 10
    (labels / "train.km").write_text("\n".join(lines) + "\n")
    return {"data": str(data), "labels": str(labels), "wav": str(wav), "km": str(labels / "train.km")}


@pytest.fixture(scope="module")
def feat_world(tmp_path_factory):
    """A corpus, labels 'km' (K=20) and two random hubert teachers (12 x 32 and 2 x 32) for L_feat."""
    root = tmp_path_factory.mktemp("feat")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data, {"train": 6, "valid": 2}, seconds=(0.6, 1.4), seed=5)
    write_random_labels(labels, sizes, "km", 20, 50)
    deep, shallow = str(root / "teacher12.pt"), str(root / "teacher2.pt")
    write_checkpoint(deep, data, labels, model_overrides={"encoder_layers": 12}, seed=1)
    write_checkpoint(shallow, data, labels, model_overrides={"encoder_layers": 2}, seed=2)
    return {"root": root, "data": data, "labels": labels, "sizes": sizes, "teacher": deep, "shallow": shallow}


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    """Tone corpus (60/15/15 utterances, 4 tones) and a random tiny hubert checkpoint (2 x 32)."""
    return write_tone_world(str(tmp_path_factory.mktemp("tones") / "data"),
                            {"train": 60, "valid": 15, "test": 15}, seed=0)


@pytest.fixture(scope="module")
def mfcc_km(tiny_corpus, tmp_path_factory):
    """K=12 k-means fitted on the MFCC of the tiny train split."""
    path = str(tmp_path_factory.mktemp("km") / "mfcc.joblib")
    assert labels_main(["fit", "--manifest-dir", tiny_corpus["data"], "--split", "train", "--mfcc", "--n-clusters",
                        "12", "--out", path, "--n-init", "3", "--no-progress"]) == 0
    return path


@pytest.fixture(scope="module")
def one_openmp_thread():
    """sklearn's OpenMP loops spin badly on 2 shared cores; one thread is much faster there."""
    with threadpool_limits(limits=1):
        yield


@pytest.fixture
def restore_process_state():
    """The CLIs' main() configure logging and torch threads, as a CLI does; undo it for the other tests."""
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    levels = {name: logging.getLogger(name).level for name in ("fairseq", "fairseq.tasks", "fairseq.models")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """Tiny models: a second torch thread mostly spin-waits on a shared 2-core machine (measured 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: A small conv front end for the export's models: stride 40, receptive field 60 samples.
SMALL_CONV = "[(32,10,5)] + [(32,3,2)] * 2 + [(32,2,2)]"
#: The shapes dicehubert-export handles (tests/test_export_*.py, tests/e2e/test_export.py):
#: narrow student (GroupNorm front end, post-LN, feature-distillation heads, no projection);
#: shallow student in HuBERT-Large layout (layer_norm_first, LayerNorm front end, conv bias,
#: odd positional kernel, task.normalize); fairseq's own hubert with HuBERT Base's 7-layer front
#: end; a student with conv_pos_batch_norm and gelu_accurate; a Conformer student; a convolution-only
#: student (layer_type=conv: no attention).
EXPORT_SPECS = {
    "narrow": dict(model="dicehubert_student", task="dicehubert", model_overrides=dict(
        _name="dicehubert_student", encoder_layers=3, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
        conv_feature_layers=SMALL_CONV, conv_pos=8, conv_pos_groups=4, feat_target_layers=[1, 3],
        feat_teacher_dim=48)),
    "shallow": dict(model="dicehubert_student", task="dicehubert", model_overrides=dict(
        _name="dicehubert_student", encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
        encoder_attention_heads=4, conv_feature_layers=SMALL_CONV, conv_pos=9, conv_pos_groups=8,
        layer_norm_first=True, extractor_mode="layer_norm", conv_bias=True), normalize=True),
    "teacher": dict(model="hubert", task="hubert_pretraining", model_overrides=dict(
        encoder_layers=2, encoder_embed_dim=48, encoder_ffn_embed_dim=96, conv_pos=16, conv_pos_groups=4)),
    "posbn": dict(model="dicehubert_student", task="dicehubert", model_overrides=dict(
        _name="dicehubert_student", encoder_layers=2, encoder_embed_dim=32, conv_feature_layers=SMALL_CONV,
        conv_pos=8, conv_pos_groups=4, conv_pos_batch_norm=True, activation_fn="gelu_accurate")),
    "conformer": dict(model="dicehubert_student", task="dicehubert", model_overrides=dict(
        _name="dicehubert_student", encoder_layers=2, encoder_embed_dim=32, conv_feature_layers=SMALL_CONV,
        conv_pos=8, conv_pos_groups=4, layer_type="conformer", depthwise_conv_kernel_size=7, attn_type="",
        pos_enc_type="abs")),
    "conv": dict(model="dicehubert_student", task="dicehubert", model_overrides=dict(
        _name="dicehubert_student", encoder_layers=3, encoder_embed_dim=32, conv_feature_layers=SMALL_CONV,
        conv_pos=8, conv_pos_groups=4, layer_type="conv", depthwise_conv_kernel_size=5,
        conv_encoder_dilations=[1, 2], feat_target_layers=[1, 3], feat_teacher_dim=48)),
}


@pytest.fixture(scope="session")
def export_models(tmp_path_factory):
    """One perturbed checkpoint per :data:`EXPORT_SPECS` shape: ``{name: path, "root": dir}``."""
    root = tmp_path_factory.mktemp("export")
    sizes = write_corpus(str(root / "data"), {"train": 2, "valid": 1})
    write_random_labels(str(root / "labels"), sizes)
    out = {"root": root}
    for i, (name, spec) in enumerate(EXPORT_SPECS.items()):
        spec = dict(spec)
        normalize = spec.pop("normalize", False)
        path = str(root / f"{name}.pt")
        write_checkpoint(path, str(root / "data"), str(root / "labels"), seed=i, **spec)
        perturb_checkpoint(path, normalize=normalize, seed=i)
        out[name] = path
    return out
