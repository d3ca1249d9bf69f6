"""Property tests (hypothesis) of the parsers and the preflight check.

For random, mostly malformed input:

* nothing but :class:`InputError` (or a list of problems) ever comes out -- no crash;
* whatever passes as valid is read by fairseq's own readers (``load_audio``,
  ``Dictionary.load``, ``HubertDataset`` + ``LabelEncoder`` as our task builds it) without error
  and *exactly* as an independent reading of the bytes says: never a silent wrong result.

Example counts are modest: this is part of the fast suite.
"""

import json
import logging
import os
import shutil
import tempfile

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.data.files import (
    FAIRSEQ_SPECIAL_SYMBOLS, SoftLabels, read_dictionary_symbols, read_manifest, soft_label_paths,
)
from dicehubert_fairseq.data.preflight import check_labels, check_split
from dicehubert_fairseq.errors import InputError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

logging.getLogger("fairseq").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def scratch():
    d = tempfile.mkdtemp(prefix="fuzz")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------- text generators

# characters that matter to line/field splitting, plus ordinary ones
WEIRD = ["\t", " ", "\r", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2028", "\ufeff", "\x00", "#"]
ASCII = st.text(alphabet="ab0123456789._-/", min_size=0, max_size=8)
PIECE = st.one_of(ASCII, st.sampled_from(WEIRD), st.text(max_size=3))


def lines_text(min_lines=0, max_lines=6, piece=PIECE):
    line = st.lists(piece, max_size=6).map("".join)
    end = st.sampled_from(["\n", "\n", "\n", "\r\n", "\r", ""])
    return st.lists(st.tuples(line, end), min_size=min_lines, max_size=max_lines).map(
        lambda ls: "".join(a + b for a, b in ls))


def as_bytes(text_strategy):
    """Encoded text, sometimes with an invalid UTF-8 byte spliced in; or raw bytes."""
    spliced = st.tuples(text_strategy, st.integers(0, 200), st.sampled_from([b"\xff", b"\xe9", b"\xc3", b"\x80"])).map(
        lambda t: t[0].encode("utf-8")[: t[1]] + t[2] + t[0].encode("utf-8")[t[1]:])
    return st.one_of(text_strategy.map(lambda s: s.encode("utf-8")), spliced, st.binary(max_size=64))


# ----------------------------------------------------------------------------- manifests


def manifest_text():
    size = st.one_of(st.integers(-5, 100000).map(str), st.sampled_from(["", "1e3", "0x10", " 12", "12 ", "1_000",
                                                                         "٣", "+5", "nan"]))
    name = st.one_of(ASCII, st.text(max_size=6))
    row = st.tuples(name, st.sampled_from(["\t", "\t\t", " ", ""]), size, st.sampled_from(["", " ", "\t", "\r"])).map(
        "".join)
    good_row = st.tuples(st.text(alphabet="abc/._-", min_size=1, max_size=6), st.integers(1, 99999)).map(
        lambda t: f"{t[0]}\t{t[1]}")
    end = st.sampled_from(["\n", "\n", "\r\n", "\r"])
    good_end = st.sampled_from(["\n", "\n", "\r\n"])
    root = st.one_of(st.just("/audio/root"), ASCII, st.text(max_size=6))
    random = st.tuples(root, end, st.lists(st.tuples(st.one_of(good_row, row), end), max_size=5), st.booleans())
    plausible = st.tuples(st.just("/audio/root"), good_end,
                          st.lists(st.tuples(st.one_of(good_row, good_row, good_row, row), good_end), min_size=1,
                                   max_size=4),
                          st.just(False))
    return st.one_of(random, plausible, plausible, plausible).map(
        lambda t: t[0] + t[1] + "".join(a + b for a, b in t[2]) + ("\n" if t[3] else ""))


@FUZZ
@given(data=st.one_of(manifest_text().map(str.encode), manifest_text().map(str.encode), as_bytes(manifest_text()),
                      as_bytes(lines_text())))
@example(data=b"/audio/root\r\r\nu0.wav\t4000\r\r\n")  # found: fairseq reads the 2nd CR as a line break
@example(data=b"/audio/root\r\n a.wav\t12 \r\n")  # row whitespace stripped, as fairseq does
def test_read_manifest_raises_only_input_error_and_agrees_with_fairseq(scratch, data):
    from fairseq.data.audio.hubert_dataset import load_audio

    path = os.path.join(scratch, "m.tsv")
    _write(path, data)
    try:
        m = read_manifest(path, check_root=False)
    except InputError as e:
        assert e.problems and all(p.startswith(path) for p in e.problems), e.problems
        return
    event("accepted")
    # accepted: fairseq's reader must see exactly the same rows
    assert len(m) >= 1 and all(s > 0 for s in m.sizes)
    root, names, inds, tot, sizes = load_audio(path, None, None)
    assert (root, names, sizes, inds, tot) == (m.root, m.names, m.sizes, list(range(len(m))), len(m))


# ----------------------------------------------------------------------------- dictionaries


def dict_text():
    sym = st.one_of(st.integers(0, 6).map(str), st.sampled_from(list(FAIRSEQ_SPECIAL_SYMBOLS) + ["a b", ""]), ASCII)
    count = st.one_of(st.integers(-3, 9).map(str), st.sampled_from(["", "x", "1.5", "1 #fairseq:overwrite",
                                                                    "#fairseq:overwrite"]))
    sep = st.sampled_from([" ", " ", "\t", "  ", ""])
    line = st.tuples(sym, sep, count, st.sampled_from(["", " ", "\t", "\r"])).map("".join)
    good_line = st.tuples(st.integers(0, 9), st.integers(0, 99)).map(lambda t: f"{t[0]} {t[1]}")
    end = st.sampled_from(["\n", "\n", "\r\n", "\r"])
    random = st.lists(st.tuples(st.one_of(good_line, line), end), max_size=6)
    plausible = st.lists(st.tuples(st.one_of(good_line, good_line, good_line, line),
                                   st.sampled_from(["\n", "\r\n"])), min_size=1, max_size=6)
    return st.one_of(random, plausible, plausible, plausible).map(lambda ls: "".join(a + b for a, b in ls))


@FUZZ
@given(data=st.one_of(dict_text().map(str.encode), dict_text().map(str.encode), as_bytes(dict_text()),
                      as_bytes(lines_text())))
@example(data=b"0 0\n0 1 #fairseq:overwrite\n")  # found: fairseq appends an overwritten symbol again
@example(data=b"0 1\n1 1\n\n")  # found: a blank line makes Dictionary.load raise
@example(data=b"<unk> 1\n")  # found: fairseq's special symbols are duplicates
def test_read_dictionary_symbols_agrees_with_fairseq_dictionary(scratch, data):
    from fairseq.data import Dictionary

    path = os.path.join(scratch, "dict.km.txt")
    _write(path, data)
    try:
        symbols = read_dictionary_symbols(path)
    except InputError as e:
        assert e.problems and all(p.startswith(path) for p in e.problems), e.problems
        return
    assert symbols
    event("accepted")
    d = Dictionary.load(path)  # must not raise
    assert d.symbols[d.nspecial:] == symbols


# ----------------------------------------------------------------------------- label files

SIZES = [4000, 8000, 1600]  # 12.5, 25 and 5 labels at 50 Hz (tolerance 0.1 s = 5 labels)
DICT = [str(i) for i in range(5)]


@pytest.fixture(scope="module")
def label_world(scratch):
    d = os.path.join(scratch, "labels")
    os.makedirs(d)
    with open(os.path.join(d, "train.tsv"), "w") as f:
        f.write(d + "\n" + "".join(f"u{i}.wav\t{n}\n" for i, n in enumerate(SIZES)))
    with open(os.path.join(d, "dict.km.txt"), "w") as f:
        f.write("".join(f"{s} 1\n" for s in DICT))
    return d


def _independent_reading(data: bytes):
    """Lines split at b'\\n' (one CR before it dropped), whitespace-split tokens; None if unreadable."""
    pieces = data.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    out = []
    for p in pieces:
        p = p[:-1] if p.endswith(b"\r") else p
        try:
            s = p.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\r" in s:
            return None
        out.append(s.split())
    return out


def _valid_by_spec(lines):
    if lines is None or len(lines) != len(SIZES):
        return False
    for toks, size in zip(lines, SIZES):
        if not toks or any(t not in DICT for t in toks) or abs(size / 16000 - len(toks) / 50) > 0.1:
            return False
    return True


def label_text():
    token = st.one_of(st.sampled_from(DICT), st.sampled_from(["5", "-1", "01", "1.0", "x", "٣", "<unk>", "0\x00"]))
    sep = st.sampled_from([" ", " ", " ", "  ", "\t", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2028", "\r"])
    line = st.lists(st.tuples(token, sep), max_size=30).map(lambda ts: "".join(a + b for a, b in ts))

    def good_line(i):  # about the right number of labels for utterance i, separated by spaces
        n = round(SIZES[i] / 320)
        return st.lists(st.sampled_from(DICT), min_size=max(1, n - 4), max_size=n + 4).map(" ".join)

    end = st.sampled_from(["\n", "\n", "\n", "\r\n", "\r\n", "\r", ""])
    any_good = st.integers(0, len(SIZES) - 1).flatmap(good_line)
    random = st.lists(st.tuples(st.one_of(any_good, line), end), min_size=1, max_size=5)
    # the right number of lines, mostly plausible, occasionally an odd one
    plausible = st.tuples(*[st.tuples(st.one_of(good_line(i), good_line(i), good_line(i), line),
                                      st.sampled_from(["\n", "\n", "\r\n"])) for i in range(len(SIZES))])
    return st.one_of(random, plausible, plausible, plausible).map(lambda ls: "".join(a + b for a, b in ls))


@FUZZ
@given(data=st.one_of(as_bytes(label_text()), label_text().map(str.encode), label_text().map(str.encode)))
@example(data=("1 2 3 4 0 " * 3 + "1 2\r\n" + "0 1 2 3 4 " * 5 + "\r\n" + "4 3 2 1 0\r\n").encode())  # CRLF
def test_check_labels_valid_iff_the_spec_says_so_and_training_reads_exactly_that(label_world, data):
    from fairseq.data import Dictionary
    from fairseq.tasks.hubert_pretraining import LabelEncoder

    from dicehubert_fairseq.data.dataset import DiceHubertDataset

    path = os.path.join(label_world, "train.km")
    _write(path, data)
    manifest = read_manifest(os.path.join(label_world, "train.tsv"))
    problems = check_labels(manifest, label_world, "train", "km", 50)
    assert all(isinstance(p, str) and p.startswith(label_world) for p in problems)
    lines = _independent_reading(data)
    assert (problems == []) == _valid_by_spec(lines), (problems, lines)
    event("valid" if not problems else "rejected")
    if problems:
        return
    # valid: the task's dataset reads exactly these labels (no drift, no <unk>)
    d = Dictionary.load(os.path.join(label_world, "dict.km.txt"))
    ds = DiceHubertDataset(os.path.join(label_world, "train.tsv"), sample_rate=16000, label_paths=[path],
                           label_rates=50.0, pad_list=[d.pad()], eos_list=[d.eos()],
                           label_processors=[LabelEncoder(d)], store_labels=False)
    for i, toks in enumerate(lines):
        assert ds.get_label(i, 0).tolist() == [d.index(t) for t in toks]
        assert d.unk() not in ds.get_label(i, 0).tolist()


# ----------------------------------------------------------------------------- soft labels

NPY_DTYPES = st.sampled_from([np.int16, np.int32, np.int64, np.uint8, np.float32, np.float64, np.bool_])


@st.composite
def soft_files(draw):
    n = draw(st.integers(0, 6))
    k = draw(st.integers(1, 3))
    K = draw(st.one_of(st.integers(-1, 6), st.sampled_from([None, "5", 2.0, True, [3]])))
    meta = draw(st.one_of(
        st.fixed_dictionaries({"n_clusters": st.just(K)}),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        st.lists(st.integers(), max_size=2),
    ))
    meta_bytes = draw(st.one_of(st.just(json.dumps(meta).encode()), st.binary(max_size=12)))
    shape = draw(st.sampled_from([(n, k), (n, k), (n, k), (n,), (n, k + 1), (k, n, 1)]))

    def arr(dtype_strategy, elements=None):
        dt = draw(dtype_strategy)
        return draw(hnp.arrays(dt, shape, elements=elements(dt) if elements else None))

    ids = arr(NPY_DTYPES, lambda dt: st.integers(-1, 6) if np.issubdtype(dt, np.signedinteger) else None)
    # probabilities: often a proper distribution, sometimes anything
    if draw(st.booleans()) and len(shape) == 2 and shape[1] >= 1:
        p = draw(hnp.arrays(np.float64, shape, elements=st.floats(0.01, 1)))
        probs = (p / p.sum(1, keepdims=True)).astype(draw(st.sampled_from([np.float32, np.float64])))
    else:
        probs = arr(NPY_DTYPES)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    offsets = np.asarray([0] + cuts + [n], dtype=draw(st.sampled_from([np.int64, np.int32, np.float64])))
    if draw(st.integers(0, 5)) == 0:
        offsets = draw(hnp.arrays(np.int64, draw(st.integers(0, 4)), elements=st.integers(-2, 8)))
    truncate = draw(st.sampled_from([None, None, None, "ids", "probs", "offsets"]))
    return meta_bytes, ids, probs, offsets, truncate


@st.composite
def valid_soft_files(draw):
    """A valid soft-label stream, then (usually) one corruption."""
    n, k, K = draw(st.integers(0, 6)), draw(st.integers(1, 3)), draw(st.integers(3, 6))
    rng = np.random.default_rng(draw(st.integers(0, 9)))
    ids = np.asarray([rng.permutation(K)[:k] for _ in range(n)], dtype=np.int64).reshape(n, k)
    p = draw(hnp.arrays(np.float64, (n, k), elements=st.floats(0.01, 1)))
    probs = (p / p.sum(1, keepdims=True)).astype(np.float32) if n else np.zeros((0, k), np.float32)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    offsets = np.asarray([0] + cuts + [n], dtype=np.int64)
    meta = {"n_clusters": K}
    bad = draw(st.sampled_from(["none", "id>=K", "id<0", "nan", "sum", "neg", "offsets", "K", "dtype"]))
    if n and bad == "id>=K":
        ids[draw(st.integers(0, n - 1)), 0] = K
    elif n and bad == "id<0":
        ids[draw(st.integers(0, n - 1)), -1] = -1
    elif n and bad == "nan":
        probs[draw(st.integers(0, n - 1)), 0] = np.nan
    elif n and bad == "sum":
        probs[draw(st.integers(0, n - 1))] *= draw(st.sampled_from([0.5, 1.01, 2.0, 0.0]))
    elif n and k > 1 and bad == "neg":
        probs[draw(st.integers(0, n - 1))] = [2.0, -1.0] + [0.0] * (k - 2)
    elif bad == "offsets":
        offsets = offsets.copy()
        offsets[-1] += draw(st.sampled_from([-1, 1]))
    elif bad == "K":
        meta["n_clusters"] = draw(st.sampled_from([0, -1, 1.5, "3", None]))
    elif bad == "dtype":
        ids = ids.astype(np.float32)
    return json.dumps(meta).encode(), ids, probs, offsets, None


@FUZZ
@given(files=st.one_of(soft_files(), valid_soft_files()))
def test_soft_labels_raise_only_input_error_and_valid_means_valid(scratch, files):
    meta_bytes, ids, probs, offsets, truncate = files
    d = os.path.join(scratch, "soft")
    os.makedirs(d, exist_ok=True)
    paths = soft_label_paths(d, "train", "km")
    _write(paths["meta"], meta_bytes)
    for key, a in (("ids", ids), ("probs", probs), ("offsets", offsets)):
        np.save(paths[key], a)
        if truncate == key:
            data = open(paths[key], "rb").read()
            _write(paths[key], data[: len(data) // 2])
    try:
        sl = SoftLabels(d, "train", "km")
        problems = sl.validate()
    except InputError as e:
        assert e.problems and all(p.startswith(d) for p in e.problems), e.problems
        return
    assert all(p.startswith(d) for p in problems)
    event("valid" if not problems else "rejected by validate")
    if problems:
        return
    # accepted: everything the dataset will index into is sound
    K = json.loads(meta_bytes)["n_clusters"]
    assert isinstance(K, int) and K >= 1
    assert ids.ndim == 2 and ids.dtype.kind in "iu" and probs.shape == ids.shape and probs.dtype.kind == "f"
    assert ((ids >= 0) & (ids < K)).all()
    assert np.isfinite(probs).all() and (probs >= 0).all() and np.allclose(probs.sum(1), 1, atol=1e-3)
    assert offsets[0] == 0 and offsets[-1] == len(ids) and (np.diff(offsets) >= 0).all()
    assert np.issubdtype(sl.offsets.dtype, np.integer)


# ----------------------------------------------------------------------------- the whole preflight


@pytest.fixture(scope="module")
def corpus_bytes(scratch):
    """A valid 3-utterance corpus (manifest, labels, dict) as bytes, wavs on disk."""
    d = os.path.join(scratch, "corpus")
    os.makedirs(os.path.join(d, "wav"))
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for i, n in enumerate(SIZES):
        sf.write(os.path.join(d, "wav", f"u{i}.wav"), (0.1 * rng.standard_normal(n)).astype(np.float32), 16000,
                 subtype="PCM_16")
        rows.append(f"u{i}.wav\t{n}")
        labels.append(" ".join(str(x) for x in rng.integers(0, 5, (n - 400) // 320 + 1)))
    files = {
        "train.tsv": (os.path.join(d, "wav") + "\n" + "\n".join(rows) + "\n").encode(),
        "train.km": ("\n".join(labels) + "\n").encode(),
        "dict.km.txt": "".join(f"{s} 1\n" for s in DICT).encode(),
    }
    return d, files


MUTATIONS = ["delete_line", "duplicate_line", "insert_line", "replace_byte", "insert_bytes", "truncate", "crlf",
             "swap_lines", "crlf", "nothing"]


@st.composite
def mutated(draw, files):
    files = dict(files)
    for _ in range(draw(st.integers(1, 2))):
        name = draw(st.sampled_from(sorted(files)))
        data = files[name]
        op = draw(st.sampled_from(MUTATIONS))
        lines = data.split(b"\n")
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        junk = draw(st.one_of(st.binary(max_size=4), st.sampled_from(WEIRD + ["5", "0", "x", " 1"]).map(str.encode)))
        if op == "delete_line":
            del lines[i]
        elif op == "duplicate_line":
            lines.insert(i, lines[i])
        elif op == "insert_line":
            lines.insert(i, junk)
        elif op == "swap_lines" and len(lines) > 2:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        data = b"\n".join(lines)
        pos = draw(st.integers(0, len(data)))
        if op == "replace_byte" and data:
            data = data[: max(0, pos - 1)] + junk + data[pos:]
        elif op == "insert_bytes":
            data = data[:pos] + junk + data[pos:]
        elif op == "truncate":
            data = data[:pos]
        elif op == "crlf":
            data = data.replace(b"\n", b"\r\n")
        files[name] = data
    return files


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_check_split_on_mutated_corpora(corpus_bytes, data):
    """Random edits of a valid corpus: problems or nothing; 'nothing' means fairseq trains on the same data."""
    from fairseq.data import Dictionary
    from fairseq.data.audio.hubert_dataset import load_audio
    from fairseq.tasks.hubert_pretraining import LabelEncoder

    from dicehubert_fairseq.data.dataset import DiceHubertDataset

    d, good = corpus_bytes
    files = data.draw(mutated(good))
    for name, content in files.items():
        _write(os.path.join(d, name), content)
    problems = check_split(d, "train", d, ["km"], 50, audio_headers=True)
    assert isinstance(problems, list) and all(isinstance(p, str) and p.startswith(d) for p in problems)
    event("valid" if not problems else "rejected")
    if problems:
        return
    # valid: fairseq's readers agree with an independent reading of the bytes
    root, names, inds, tot, sizes = load_audio(os.path.join(d, "train.tsv"), None, None)
    assert [sf.info(os.path.join(root, n)).frames for n in names] == sizes
    dictionary = Dictionary.load(os.path.join(d, "dict.km.txt"))
    symbols = dictionary.symbols[dictionary.nspecial:]
    lines = _independent_reading(files["train.km"])
    assert lines is not None and len(lines) == tot == len(names)
    ds = DiceHubertDataset(os.path.join(d, "train.tsv"), sample_rate=16000, label_paths=[os.path.join(d, "train.km")],
                           label_rates=50.0, pad_list=[dictionary.pad()], eos_list=[dictionary.eos()],
                           label_processors=[LabelEncoder(dictionary)], store_labels=False)
    for i, toks in enumerate(lines):
        assert all(t in symbols for t in toks)
        assert ds.get_label(i, 0).tolist() == [dictionary.index(t) for t in toks]
        assert abs(sizes[i] / 16000 - len(toks) / 50) <= 0.1
