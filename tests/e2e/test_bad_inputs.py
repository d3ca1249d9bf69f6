"""The bad-input matrix (docs/bad_inputs.md), case by case, through the real entry points.

Training side: the ``dicehubert`` task as ``fairseq-hydra-train`` builds it (composed config,
``setup_task`` / ``build_model`` / ``build_criterion`` / ``load_dataset``) raises ``InputError``
naming file and line; a few cases also as a real ``fairseq-hydra-train`` subprocess (exit 1, the
message, no traceback).  Label side: ``dicehubert-labels check`` (and ``dump`` / ``fit`` where
the input is theirs) exits 1 with the same message, no traceback.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import dicehubert_fairseq  # noqa: F401
from tests.helpers.config import build, compose
from dicehubert_fairseq.data.files import SoftLabelWriter
from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.labels.cli import main as labels_main
from tests.helpers.data import (
    num_frames, tiny_model_overrides, write_checkpoint, write_corpus, write_random_labels,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
K = 12
ROW = 1  # the row the mutations hit: manifest line 3, label line 2


pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_openmp_thread")]


class World:
    """A good corpus (train 4 / valid 2, 50 Hz labels, K=12) under ``root``, then mutated."""

    def __init__(self, root):
        self.root = str(root)
        self.data, self.labels = os.path.join(self.root, "data"), os.path.join(self.root, "labels")
        self.sizes = write_corpus(self.data, {"train": 4, "valid": 2}, seconds=(0.8, 1.2), seed=2)
        write_random_labels(self.labels, self.sizes, "km", K, 50, seed=2)
        self.tsv = os.path.join(self.data, "train.tsv")
        self.km = os.path.join(self.labels, "train.km")
        self.dict = os.path.join(self.labels, "dict.km.txt")
        self.wav = os.path.join(self.data, "wav", f"train_{ROW:04d}.wav")
        self.soft = False

    def lines(self, path):
        with open(path, encoding="utf-8", newline="") as f:
            return f.read().split("\n")[:-1]

    def write(self, path, lines, end="\n"):
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write("".join(line + end for line in lines))

    def set_row(self, name, size):
        lines = self.lines(self.tsv)
        lines[ROW + 1] = f"{name}\t{size}"
        self.write(self.tsv, lines)

    def set_label_line(self, text):
        lines = self.lines(self.km)
        lines[ROW] = text
        self.write(self.km, lines)

    def write_soft(self, n_clusters=K, id_offset=0, prob_scale=1.0):
        rng = np.random.default_rng(0)
        hard = []
        w = SoftLabelWriter(self.labels, "train", "km", n_clusters=n_clusters, top_k=3, meta={"temperature": 1.0})
        for size in self.sizes["train"]:
            T = num_frames(size, 50)
            ids = np.stack([rng.permutation(min(n_clusters, K))[:3] for _ in range(T)]) + id_offset
            p = np.sort(rng.dirichlet(np.ones(3), size=T), axis=1)[:, ::-1] * prob_scale
            w.add(ids, p)
            hard.append(" ".join(str(min(i, K - 1)) for i in ids[:, 0]))
        w.close()
        self.write(self.km, hard)
        self.soft = True

    def fmt(self, fragment):
        return fragment.format(tsv=self.tsv, km=self.km, dict=self.dict, wav=self.wav, line=ROW + 2, lab=ROW + 1,
                               soft=os.path.join(self.labels, "train.km.soft"))


# ----------------------------------------------------------------------------- mutations


def _audio(w, samples, rate=16000, channels=1):
    shape = (samples,) if channels == 1 else (samples, channels)
    sf.write(w.wav, (0.1 * np.random.default_rng(0).standard_normal(shape)).astype(np.float32), rate,
             subtype="PCM_16")


def m_empty_manifest(w):
    open(w.tsv, "w").close()


def m_manifest_root_only(w):
    w.write(w.tsv, w.lines(w.tsv)[:1])


def m_manifest_root_missing(w):
    lines = w.lines(w.tsv)
    lines[0] = os.path.join(w.root, "no_such_dir")
    w.write(w.tsv, lines)


def m_manifest_row_malformed(w):
    lines = w.lines(w.tsv)
    lines[ROW + 1] = lines[ROW + 1].replace("\t", " ")
    w.write(w.tsv, lines)


def m_manifest_not_utf8(w):
    data = open(w.tsv, "rb").read().split(b"\n")
    data[ROW + 1] = b"caf\xe9.wav\t16000"
    open(w.tsv, "wb").write(b"\n".join(data))


def m_audio_missing(w):
    os.unlink(w.wav)


def m_audio_truncated(w):
    data = open(w.wav, "rb").read()
    open(w.wav, "wb").write(data[: len(data) // 2])


def m_audio_not_audio(w):
    open(w.wav, "w").write("this is not a wav file\n" * 100)


def m_audio_8khz(w):
    _audio(w, 8000, rate=8000)
    w.set_row(os.path.basename(w.wav), 8000)


def m_audio_stereo(w):
    _audio(w, w.sizes["train"][ROW], channels=2)


def m_audio_zero_length_file(w):
    _audio(w, 0)


def m_audio_zero_length_row(w):
    _audio(w, 0)
    w.set_row(os.path.basename(w.wav), 0)


def m_audio_shorter_than_receptive_field(w):
    _audio(w, 300)
    w.set_row(os.path.basename(w.wav), 300)
    w.set_label_line("")


def m_labels_fewer_lines(w):
    w.write(w.km, w.lines(w.km)[:-1])


def m_labels_more_lines(w):
    lines = w.lines(w.km)
    w.write(w.km, lines + [lines[-1]])


def m_label_line_too_long(w):
    w.set_label_line(w.lines(w.km)[ROW] + " 3" * 20)


def m_label_line_too_short(w):
    w.set_label_line(" ".join(w.lines(w.km)[ROW].split()[:-20]))


def m_label_id_ge_k(w):
    toks = w.lines(w.km)[ROW].split()
    toks[5] = str(K)
    w.set_label_line(" ".join(toks))


def m_label_non_integer(w):
    toks = w.lines(w.km)[ROW].split()
    toks[5] = "7.5"
    w.set_label_line(" ".join(toks))


def m_label_not_utf8(w):
    data = open(w.km, "rb").read().split(b"\n")
    data[ROW] = data[ROW] + b" \xff"
    open(w.km, "wb").write(b"\n".join(data))


def m_label_stray_cr(w):
    toks = w.lines(w.km)[ROW].split()
    w.set_label_line(" ".join(toks[:10]) + "\r" + " ".join(toks[10:]))


def m_dict_missing(w):
    os.unlink(w.dict)


def m_dict_empty(w):
    open(w.dict, "w").close()


def m_dict_duplicated(w):
    w.write(w.dict, w.lines(w.dict) + ["0 1"])


def m_dict_blank_line(w):
    w.write(w.dict, w.lines(w.dict) + [""])


def m_dict_special_symbol(w):
    w.write(w.dict, w.lines(w.dict) + ["<unk> 1"])


def m_soft_wrong_k(w):
    w.write_soft(n_clusters=10)


def m_soft_ids_ge_k(w):
    w.write_soft(id_offset=K - 2)


def m_soft_probs_not_summing_to_1(w):
    w.write_soft(prob_scale=0.5)


# name -> (mutation, fragments of the message; {tsv} {km} {dict} {wav} {line} {lab} {soft} are filled in)
CASES = {
    "empty manifest": (m_empty_manifest, ["{tsv}:1: manifest is empty"]),
    "manifest with only the root line": (m_manifest_root_only, ["{tsv}: manifest lists no audio"]),
    "manifest root missing": (m_manifest_root_missing, ["{tsv}:1: audio root directory", "no_such_dir' does not exist"]),
    "manifest row without a TAB": (m_manifest_row_malformed, ["{tsv}:{line}: expected '<relative path><TAB><num samples>'"]),
    "manifest not UTF-8": (m_manifest_not_utf8, ["{tsv}:{line}: not UTF-8 text"]),
    "audio missing": (m_audio_missing, ["{tsv}:{line}: audio file {wav} not found"]),
    "audio truncated": (m_audio_truncated, ["{tsv}:{line}: {wav} has ", " samples, the manifest says "]),
    "audio not audio": (m_audio_not_audio, ["{tsv}:{line}: {wav} is not readable audio"]),
    "audio 8 kHz": (m_audio_8khz, ["{tsv}:{line}: {wav} has sample rate 8000 Hz, expected 16000 Hz"]),
    "audio stereo": (m_audio_stereo, ["{tsv}:{line}: {wav} has 2 channels, expected mono"]),
    "audio zero-length file": (m_audio_zero_length_file, ["{tsv}:{line}: {wav} has 0 samples, the manifest says"]),
    "audio zero-length row": (m_audio_zero_length_row, ["{tsv}:{line}: num samples must be positive, found 0"]),
    "audio shorter than the receptive field": (m_audio_shorter_than_receptive_field,
                                               ["{tsv}:{line}: train_0001.wav has 300 samples, shorter than the "
                                                "model's receptive field (400 samples)"]),
    "labels: fewer lines than the manifest": (m_labels_fewer_lines, ["{km}: 3 lines, but {tsv} lists 4 utterances"]),
    "labels: more lines than the manifest": (m_labels_more_lines, ["{km}: 5 lines, but {tsv} lists 4 utterances"]),
    "label line too long": (m_label_line_too_long, ["{km}:{lab}: ", "labels for train_0001.wav", "at label_rate 50 Hz"]),
    "label line too short": (m_label_line_too_short, ["{km}:{lab}: ", "labels for train_0001.wav", "at label_rate 50 Hz"]),
    "label id >= K": (m_label_id_ge_k, ["{km}:{lab}: label(s) ['12'] not in {dict} (12 symbols)"]),
    "label not an integer": (m_label_non_integer, ["{km}:{lab}: label(s) ['7.5'] not in {dict}"]),
    "label file not UTF-8": (m_label_not_utf8, ["{km}:{lab}: not UTF-8 text"]),
    "label line with a stray CR": (m_label_stray_cr, ["{km}:{lab}: carriage return (\\r) inside the line"]),
    "dict missing": (m_dict_missing, ["{dict}: label dictionary not found"]),
    "dict empty": (m_dict_empty, ["{dict}: label dictionary is empty"]),
    "dict duplicated": (m_dict_duplicated, ["{dict}:13: duplicate symbol '0' (first on line 1)"]),
    "dict with a blank line": (m_dict_blank_line, ["{dict}:13: expected '<symbol> <count>', blank line"]),
    "dict lists a fairseq special symbol": (m_dict_special_symbol, ["{dict}:13: '<unk>' is one of fairseq's special"]),
    "soft labels with the wrong K": (m_soft_wrong_k, ["{soft}.json: soft labels have K=10 clusters, but {dict} has 12"]),
    "soft label id >= K": (m_soft_ids_ge_k, ["{soft}_ids.npy: frame 0: cluster id outside 0..11"]),
    "soft probabilities not summing to 1": (m_soft_probs_not_summing_to_1,
                                            ["{soft}_probs.npy: frame 0: probabilities must be >= 0 and sum to 1, "
                                             "found sum 0.5000"]),
}
AUDIO_CASES = [name for name in CASES if name.startswith(("audio", "manifest", "empty manifest"))]


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


_COMPOSED = {}


def _task_cfg(w, extra=()):
    """The composed ``dicehubert_narrow`` config (tiny student, CPU) for ``w``'s directories."""
    key = (w.soft, tuple(extra))
    if key not in _COMPOSED:  # composing is the slow part: once per variant, then swap the paths
        _COMPOSED[key] = compose("dicehubert_narrow", ["task.data=DATA", "task.label_dir=LABELS", "run=cpu",
                                                       "task.min_sample_size=8000"] + tiny_model_overrides()
                                 + (["task.soft_labels=[km]"] if w.soft else []) + list(extra))
    cfg = _COMPOSED[key].copy()
    cfg.task.data, cfg.task.label_dir = w.data, w.labels
    return cfg


def _load_train(w, extra=()):
    """What fairseq-hydra-train does before the first update: task, model, criterion, datasets."""
    task, _model, _criterion = build(_task_cfg(w, extra))
    task.load_dataset("train")
    return task


def _labels(capsys, *argv):
    code = labels_main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize("case", list(CASES))
def test_training_preflight(world, case):
    mutate, fragments = CASES[case]
    mutate(world)
    with pytest.raises(InputError) as e:
        _load_train(world)
    msg = str(e.value)
    for frag in fragments:
        assert world.fmt(frag) in msg, msg
    # every problem line names one of the user's files (the head line counts them)
    head, *problems = msg.splitlines()
    assert "problem(s) found" in head or not problems
    assert all(p.strip().startswith(world.root) for p in (problems or [head])), msg


@pytest.mark.parametrize("case", list(CASES))
def test_labels_check(world, case, capsys):
    mutate, fragments = CASES[case]
    mutate(world)
    code, out, err = _labels(capsys, "check", "--manifest-dir", world.data, "--label-dir", world.labels,
                             "--labels", "km", "--split", "train")
    assert code == 1, out + err
    for frag in fragments:
        assert world.fmt(frag) in err, err


@pytest.fixture(scope="module")
def mfcc_km(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("km"))
    path = os.path.join(w.root, "km.joblib")
    assert labels_main(["fit", "--manifest-dir", w.data, "--mfcc", "--n-clusters", "4", "--out", path,
                        "--n-init", "1", "--no-progress"]) == 0
    return path


@pytest.mark.parametrize("case", AUDIO_CASES)
def test_labels_dump(world, case, mfcc_km, capsys):
    mutate, fragments = CASES[case]
    mutate(world)
    out_dir = os.path.join(world.root, "dumped")
    code, out, err = _labels(capsys, "dump", "--manifest-dir", world.data, "--split", "train", "--mfcc",
                             "--km", mfcc_km, "--label-dir", out_dir, "--no-progress")
    assert code == 1, out + err
    errors = [line for line in err.splitlines() if line.startswith("dicehubert-labels dump: error: ")]
    for frag in fragments:
        assert any(world.fmt(frag) in e for e in errors), err
    assert not os.path.exists(os.path.join(out_dir, "train.km"))  # nothing under a final name


# ----------------------------------------------------------------------------- CRLF: accepted, same result


def _crlf(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data.replace(b"\n", b"\r\n"))


def test_crlf_files_are_read_exactly_as_lf(tmp_path, capsys):
    """CRLF manifests, label files and dictionaries: accepted, and the training data is identical.

    (fairseq's own label reader measures lines after newline translation: on a CRLF file every
    label sequence after the first drifted by a byte per line -- silently wrong labels.)"""
    lf, crlf = World(tmp_path / "lf"), World(tmp_path / "crlf")
    for path in (crlf.tsv, crlf.km, crlf.dict):
        _crlf(path)
    assert b"\r\n" in open(crlf.km, "rb").read()
    ds_lf, ds_crlf = _load_train(lf).datasets["train"], _load_train(crlf).datasets["train"]
    assert len(ds_lf) == len(ds_crlf) == 4
    for i in range(len(ds_lf)):
        assert torch.equal(ds_lf.get_label(i, 0), ds_crlf.get_label(i, 0)), i
        assert torch.equal(ds_lf.get_audio(i), ds_crlf.get_audio(i)), i
    code, out, err = _labels(capsys, "check", "--manifest-dir", crlf.data, "--label-dir", crlf.labels,
                             "--labels", "km", "--split", "train")
    assert code == 0, err
    assert out.startswith("OK: train")


# ----------------------------------------------------------------------------- teacher checkpoints, K


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("teachers"))
    good = os.path.join(w.root, "teacher.pt")
    write_checkpoint(good, w.data, w.labels, labels=("km",))
    truncated = os.path.join(w.root, "truncated.pt")
    data = open(good, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    not_hubert = os.path.join(w.root, "not_hubert.pt")  # a fairseq checkpoint of another model
    state = torch.load(good, weights_only=True)
    state["cfg"]["model"]["_name"] = "wav2vec2"
    torch.save(state, not_hubert)
    bare = os.path.join(w.root, "bare_state_dict.pt")  # weights only, not saved by fairseq's trainer
    torch.save({"model": {"encoder.layers.0.weight": torch.zeros(2)}}, bare)
    return {"world": w, "good": good, "truncated": truncated, "not_hubert": not_hubert, "bare": bare,
            "missing": os.path.join(w.root, "missing.pt")}


TEACHER_CASES = {
    "teacher checkpoint missing": ("missing", "{path}: checkpoint not found"),
    "teacher checkpoint truncated": ("truncated", "{path}: not a readable torch checkpoint (truncated or corrupt?)"),
    "teacher checkpoint not a HuBERT model": ("not_hubert", "{path}: model 'wav2vec2' is not a HuBERT-family model"),
    "teacher checkpoint not a fairseq checkpoint": ("bare", "{path}: not a fairseq checkpoint (expected one saved by "
                                                            "fairseq's trainer"),
}


@pytest.mark.parametrize("case", list(TEACHER_CASES))
def test_training_teacher_checkpoint(teachers, case):
    """``model.init_from_teacher`` (and the teacher of ``dicehubert_feat``) is checked at build time."""
    key, fragment = TEACHER_CASES[case]
    path = teachers[key]
    cfg = _task_cfg(teachers["world"], ["++model.init_from_teacher=TEACHER"])
    cfg.model.init_from_teacher = path
    with pytest.raises(InputError, match="^" + re.escape(fragment.format(path=path))):
        build(cfg)
    cfg = _feat_cfg(teachers["world"], path)
    with pytest.raises(InputError, match=re.escape(fragment.format(path=path))):
        build(cfg)


def _feat_cfg(w, teacher):
    if "feat" not in _COMPOSED:
        _COMPOSED["feat"] = compose("feat_shallow_l6", ["task.data=DATA", "criterion.teacher_checkpoint=TEACHER",
                                                        "run=cpu", "++model.feat_teacher_dim=32"]
                                    + tiny_model_overrides())
    cfg = _COMPOSED["feat"].copy()
    cfg.task.data, cfg.criterion.teacher_checkpoint = w.data, teacher
    # the criterion's own check: the row's default init from the same teacher (checked above as
    # model.init_from_teacher) is off, or it would report the checkpoint first
    cfg.model.init_from_teacher = None
    return cfg


@pytest.mark.parametrize("case", list(TEACHER_CASES))
def test_labels_dump_teacher_checkpoint(teachers, mfcc_km, case, capsys, tmp_path):
    key, fragment = TEACHER_CASES[case]
    path = teachers[key]
    code, out, err = _labels(capsys, "dump", "--manifest-dir", teachers["world"].data, "--split", "train",
                             "--checkpoint", path, "--layer", "1", "--km", mfcc_km, "--label-dir", str(tmp_path),
                             "--no-progress")
    assert code == 1
    assert f"dicehubert-labels dump: error: {fragment.format(path=path)}" in err, err


def test_teacher_layer_out_of_range(teachers, mfcc_km, capsys, tmp_path):
    w, path = teachers["world"], teachers["good"]  # 2 transformer layers
    code, out, err = _labels(capsys, "dump", "--manifest-dir", w.data, "--split", "train", "--checkpoint", path,
                             "--layer", "9", "--km", mfcc_km, "--label-dir", str(tmp_path), "--no-progress")
    assert code == 1
    assert f"dicehubert-labels dump: error: {path}: layer 9 out of range (the model has transformer layers 1..2)" in err
    code, out, err = _labels(capsys, "fit", "--manifest-dir", w.data, "--checkpoint", path, "--layer", "0",
                             "--n-clusters", "3", "--out", str(tmp_path / "km.joblib"), "--no-progress")
    assert code == 1 and f"{path}: layer 0 out of range" in err
    # training: the L_feat criterion's teacher must have the target layers
    with pytest.raises(InputError, match=r"the teacher has transformer layers 1\.\.2, it cannot serve target layer"):
        build(_feat_cfg(w, path))


def test_k_larger_than_frames(world, capsys, tmp_path):
    code, out, err = _labels(capsys, "fit", "--manifest-dir", world.data, "--mfcc", "--n-clusters", "100000",
                             "--out", str(tmp_path / "km.joblib"), "--no-progress")
    assert code == 1
    assert f"dicehubert-labels fit: error: {world.tsv}: K=100000 clusters but" in err and "frames" in err
    assert not os.path.exists(tmp_path / "km.joblib")


def test_missing_data_and_label_dirs(world):
    with pytest.raises(InputError, match=r"task.data=.*nowhere: directory not found"):
        build(compose("dicehubert_narrow", [f"task.data={world.root}/nowhere", f"task.label_dir={world.labels}",
                                            "run=cpu"] + tiny_model_overrides()))[0].load_dataset("train")
    with pytest.raises(InputError, match=r"task.label_dir=.*nolabels: directory not found"):
        build(compose("dicehubert_narrow", [f"task.data={world.data}", f"task.label_dir={world.root}/nolabels",
                                            "run=cpu"] + tiny_model_overrides()))


# ----------------------------------------------------------------------------- the real CLI


def _hydra_train(w, *extra):
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1")
    cmd = [os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", "config/", "--config-name", "dicehubert_narrow",
           "common.user_dir=dicehubert_fairseq", f"task.data={w.data}", f"task.label_dir={w.labels}", "run=cpu",
           "task.min_sample_size=8000", "optimization.max_update=2", f"hydra.run.dir={w.root}/run",
           ] + tiny_model_overrides() + list(extra)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["audio 8 kHz", "dict with a blank line", "teacher"])
def test_fairseq_hydra_train_exits_1_with_the_message(world, teachers, case):
    extra = []
    if case == "teacher":
        path = teachers["truncated"]
        expected = f"{path}: not a readable torch checkpoint (truncated or corrupt?)"
        extra = [f"++model.init_from_teacher={path}"]
    else:
        mutate, fragments = CASES[case]
        mutate(world)
        expected = world.fmt(fragments[0])
    p = _hydra_train(world, *extra)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    assert "dicehubert: bad input, nothing was trained:" in out and expected in out, out[-3000:]
    assert "Traceback" not in out and "begin training epoch" not in out
    assert not os.path.exists(os.path.join(world.root, "run", "checkpoints", "checkpoint_last.pt"))


# ----------------------------------------------------------------------------- the documented matrix


def test_docs_matrix_names_every_case_and_only_existing_tests():
    """docs/bad_inputs.md: every case above has a row, and every test it names exists."""
    doc = open(os.path.join(REPO, "docs", "bad_inputs.md"), encoding="utf-8").read()
    rows = [line.split(" | ") for line in doc.splitlines() if line.startswith("| ") and line.count(" | ") >= 3]
    cases = {r[2].strip("` ") for r in rows if r[2].startswith("`")}
    assert set(CASES) | set(TEACHER_CASES) == cases
    sources = ""
    for directory, _, names in os.walk(os.path.join(REPO, "tests")):
        for name in names:
            if name.endswith(".py"):
                sources += open(os.path.join(directory, name), encoding="utf-8").read()
    named = set(re.findall(r"`(?:tests/\S+::)?(test_\w+)", doc)) | set(re.findall(r"::(test_\w+)", doc))
    assert len(named) > 20
    missing = [t for t in named if f"def {t}(" not in sources]
    assert not missing, missing
