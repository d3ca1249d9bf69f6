"""dicehubert-labels quality: phone purity, cluster purity and PNMI (HuBERT's definitions) on hand-made cases,
against fairseq's measure_teacher_quality.py, and the command's input checks."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.labels.cli import main
from dicehubert_fairseq.labels.quality import (
    QualityConfig, joint_counts, measure_quality, pair_frames, quality_from_counts,
)

MEASURE_TEACHER_QUALITY = os.path.join(os.path.dirname(importlib.util.find_spec("fairseq").origin), "examples",
                                       "hubert", "measure_teacher_quality.py")


def test_hand_made_count_matrices():
    # one cluster per phone and one phone per cluster: everything is 1
    q = quality_from_counts(np.diag([5, 3, 2]))
    assert (q["phone_purity"], q["cluster_purity"], q["pnmi"]) == pytest.approx((1.0, 1.0, 1.0))
    # clusters independent of phones (every pair equally often): PNMI 0, purities 1 / count
    q = quality_from_counts(np.ones((4, 5)))
    assert (q["phone_purity"], q["cluster_purity"], q["pnmi"]) == pytest.approx((0.25, 0.2, 0.0), abs=1e-12)
    # phone a split over clusters 0 and 1, phone b is cluster 2: every cluster is pure and tells the phone
    # (phone purity 1, PNMI 1), but phone a's frames are not one cluster: cluster purity 2/4 + 1/4
    q = quality_from_counts(np.array([[2, 1, 0], [0, 0, 1]]))
    assert (q["phone_purity"], q["cluster_purity"], q["pnmi"]) == pytest.approx((1.0, 0.75, 1.0))
    assert q["phone_entropy_bits"] == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    # [[3, 1], [1, 3]]: H(y) = 1 bit, I = 1 - H(3/4, 1/4) = 0.18872 bits
    q = quality_from_counts(np.array([[3, 1], [1, 3]]))
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert q["pnmi"] == pytest.approx(1 - h) and q["mi_bits"] == pytest.approx(0.188722, abs=1e-6)
    assert (q["phone_purity"], q["cluster_purity"]) == pytest.approx((0.75, 0.75))


def test_frames_paired_on_the_finer_grid():
    # 50 Hz labels, 100 Hz phones: each label covers two phone frames (fairseq's --upsample 2)
    p, lab, left = pair_frames(["0", "1", "2"], list("aabbccd"), 50, 100)
    assert (p, lab, left) == (list("aabbcc"), ["0", "0", "1", "1", "2", "2"], 1)
    # 100 Hz labels, 50 Hz phones; labels longer than the phones
    p, lab, left = pair_frames(list("0123456"), ["a", "b", "c"], 100, 50)
    assert (p, lab, left) == (list("aabbcc"), list("012345"), 1)
    # same rate: frame by frame, the longer tail left out
    assert pair_frames(["0", "1"], ["a", "b", "c"], 50, 50) == (["a", "b"], ["0", "1"], 1)


def test_joint_counts_by_hand_and_exclude():
    counts, phones, clusters, stats = joint_counts([["1", "1", "2"], ["2"]], [list("aabbss"), list("cc")], 50, 100,
                                                   tolerance=0.1, exclude=["s"])
    # pairs: a-1 a-1 b-1 b-1 s-2 s-2 | c-2 c-2; s excluded
    assert phones == ["a", "b", "c"] and clusters == ["1", "2"]
    assert counts.tolist() == [[2, 0], [2, 0], [0, 2]]
    assert stats == {"frames": 6, "excluded": 2, "unpaired": 0}


def _fairseq_measure():
    spec = importlib.util.spec_from_file_location("fairseq_measure_teacher_quality", MEASURE_TEACHER_QUALITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agrees_with_fairseqs_measure_teacher_quality():
    """fairseq's own script (its ref pur / hyp pur / MI/H(ref)), on labels at 50 Hz against phones at 100 Hz
    (--upsample 2), with rows of slightly different lengths."""
    fq = _fairseq_measure()
    rng = np.random.default_rng(0)
    phones = [f"p{i}" for i in range(12)]
    refs, hyps = {}, {}
    label_rows, phone_rows = [], []
    for u in range(30):
        n = int(rng.integers(40, 80))
        ph = [phones[i] for i in np.repeat(rng.integers(0, 12, n // 2 + 2), 4)[: 2 * n + int(rng.integers(-2, 3))]]
        # labels correlated with the phone of their first frame, with noise
        lab = [str(int(phones.index(ph[min(2 * t, len(ph) - 1)])) * 3 % 17 if rng.random() < 0.7
                   else int(rng.integers(0, 17))) for t in range(n)]
        refs[str(u)], hyps[str(u)] = ph, np.array(lab).repeat(2)
        label_rows.append(lab)
        phone_rows.append(ph)
    p_xy, *_ = fq.comp_joint_prob(refs, hyps)
    _, phone_pur = fq.comp_purity(p_xy, axis=0)
    _, cluster_pur = fq.comp_purity(p_xy, axis=1)
    _, pnmi, _, _, _ = fq.comp_norm_mutual_info(p_xy)
    counts, _, _, _ = joint_counts(label_rows, phone_rows, 50, 100, tolerance=0.1)
    q = quality_from_counts(counts)
    assert 0.1 < q["pnmi"] < 0.9
    assert q["phone_purity"] == pytest.approx(phone_pur, rel=1e-9)
    assert q["cluster_purity"] == pytest.approx(cluster_pur, rel=1e-9)
    assert q["pnmi"] == pytest.approx(pnmi, rel=1e-5)  # fairseq adds 1e-8 inside its logs


def _write(path, rows):
    path.write_text("".join(" ".join(r) + "\n" for r in rows))
    return str(path)


def test_quality_command_ranks_label_streams(tmp_path, capsys):
    """Two label streams against the same alignments: the one that follows the phones ranks first."""
    rng = np.random.default_rng(1)
    phone_rows, good, noise = [], [], []
    for _ in range(5):
        ph = list(np.repeat(rng.choice(list("abcde"), 10), 6))  # 60 frames at 100 Hz
        phone_rows.append(ph)
        good.append(["abcde".index(p) for p in ph[::2]])  # 30 labels at 50 Hz
        noise.append(rng.integers(0, 5, 30).tolist())
    align = _write(tmp_path / "valid.align", phone_rows)
    _write(tmp_path / "valid.good", [map(str, r) for r in good])
    _write(tmp_path / "valid.noise", [map(str, r) for r in noise])
    out_json = str(tmp_path / "q.json")
    assert main(["quality", "--label-dir", str(tmp_path), "--labels", "good", "noise", "--align", align,
                 "--json", out_json]) == 0
    table = capsys.readouterr().out
    assert "| good | 300 | 5 | 5 | 1.0000 | 1.0000 | 1.0000 |" in table  # 60 phone frames x 5, each paired
    res = json.load(open(out_json))["results"]
    assert [r["name"] for r in res] == ["good", "noise"] and res[1]["pnmi"] < 0.2 < res[0]["pnmi"]


def test_quality_bad_input(tmp_path, capsys):
    align = _write(tmp_path / "valid.align", [list("aabb"), list("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")])
    _write(tmp_path / "valid.km", [["1", "1"], ["0"]])
    code = main(["quality", "--label-dir", str(tmp_path), "--align", align])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"{align}:2: 39 phones at 100 Hz (0.390 s), but line 2 of" in err and "within 0.1 s" in err
    _write(tmp_path / "valid.km", [["1", "1"]])
    with pytest.raises(InputError, match="1 lines, but .* has 2|2 lines, but .* has 1"):
        measure_quality(QualityConfig(label_dir=str(tmp_path), align=align))
    with pytest.raises(InputError, match="label file not found"):
        measure_quality(QualityConfig(label_dir=str(tmp_path), labels=["nope"], align=align))
