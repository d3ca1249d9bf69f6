"""The console scripts as separate processes: exit status and one-line errors, a killed dump that resumes,
fairseq's own dump_km_label.py on our k-means model."""

import glob
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dicehubert_fairseq.labels.cli import main
from dicehubert_fairseq.labels.mfcc import MfccFeatureReader
from tests.helpers.tones import copy_data
from tests.test_labels_dump import SIMPLE_KMEANS, _features, _lines
from tests.test_probe_cli import FAST, _short_phn

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_openmp_thread")]


def test_console_script_exit_status_and_message(tones, tmp_path):
    """The installed entry point (a separate process): bad input -> status 1, no traceback."""
    d = copy_data(tones["data"], str(tmp_path))
    _short_phn(d)
    exe = shutil.which("dicehubert-probe") or os.path.join(os.path.dirname(sys.executable), "dicehubert-probe")
    proc = subprocess.run([exe, "--checkpoint", tones["ckpt"], "--data", d, *FAST],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"dicehubert-probe: error: {os.path.join(d, 'test.phn')}: 13 lines, but" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_python_m_one_line_no_traceback(tmp_path, tiny_corpus, mfcc_km):
    p = subprocess.run([sys.executable, "-m", "dicehubert_fairseq.labels", "dump", "--manifest-dir",
                        tiny_corpus["data"], "--split", "train", "--mfcc", "--km", mfcc_km, "--label-dir",
                        str(tmp_path), "--nshard", "2", "--rank", "5"], capture_output=True, text=True)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert [line for line in p.stderr.splitlines() if "error" in line] == [
        "dicehubert-labels dump: error: --rank 5 out of range: ranks are 0-based, expected 0..1 for --nshard 2"]


SLOW_DUMP = """
import sys, time
from dicehubert_fairseq.labels import dump
write = dump.write_block
def slow_write(*args, **kwargs):
    write(*args, **kwargs)
    time.sleep(0.7)
dump.write_block = slow_write
from dicehubert_fairseq.labels.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_dump_resumes_to_identical_bytes(tiny_corpus, mfcc_km, tmp_path):
    data = tiny_corpus["data"]
    args = ["dump", "--manifest-dir", data, "--split", "train", "--mfcc", "--km", mfcc_km, "--soft", "--top-k", "3",
            "--block-size", "1", "--no-progress"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    assert main(args + ["--label-dir", ref]) == 0
    proc = subprocess.Popen([sys.executable, "-c", SLOW_DUMP, *args, "--label-dir", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = os.path.join(out, "train.km.parts")
    deadline = time.time() + 120
    while len(glob.glob(os.path.join(parts, "block_*.npz"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "dump ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(glob.glob(os.path.join(parts, "block_*.npz")))
    assert 3 <= done < 8
    finals = ["train.km", "train.km.soft_ids.npy", "train.km.soft_probs.npy", "train.km.soft_offsets.npy",
              "train.km.soft.json", "dict.km.txt"]
    assert not any(os.path.exists(os.path.join(out, f)) for f in finals)  # nothing truncated under a final name
    assert main(args + ["--label-dir", out]) == 0
    for f in finals:
        with open(os.path.join(ref, f), "rb") as a, open(os.path.join(out, f), "rb") as b:
            assert a.read() == b.read(), f
    assert sorted(os.listdir(out)) == sorted(finals)  # parts and temporaries cleaned up


def test_fairseq_dump_km_label_agrees_on_our_model(tiny_corpus, mfcc_km, tmp_path):
    """fairseq's own dump_km_label.py (subprocess) and its ApplyKmeans read our joblib model."""
    data = tiny_corpus["data"]
    feats = _features(data, "train", MfccFeatureReader())
    feat_dir, lab_dir, ours = tmp_path / "feat", tmp_path / "fairseq_lab", str(tmp_path / "ours")
    feat_dir.mkdir()
    np.save(feat_dir / "train_0_1.npy", np.concatenate(feats))  # fairseq's feature layout
    (feat_dir / "train_0_1.len").write_text("".join(f"{len(f)}\n" for f in feats))
    subprocess.run([sys.executable, os.path.join(SIMPLE_KMEANS, "dump_km_label.py"), str(feat_dir), "train", mfcc_km,
                    "1", "0", str(lab_dir)], check=True, capture_output=True)
    assert main(["dump", "--manifest-dir", data, "--split", "train", "--mfcc", "--km", mfcc_km, "--label-dir", ours,
                 "--no-progress"]) == 0
    theirs = _lines(lab_dir / "train_0_1.km")
    mine = _lines(os.path.join(ours, "train.km"))
    assert [len(x) for x in theirs] == [len(x) for x in mine]
    agree = np.mean(np.concatenate(theirs) == np.concatenate(mine))
    assert agree == 1.0
    spec = importlib.util.spec_from_file_location("fairseq_dump_km_label", os.path.join(SIMPLE_KMEANS, "dump_km_label.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    apply = mod.ApplyKmeans(mfcc_km)
    assert apply(feats[0]).tolist() == mine[0]
    assert apply(torch.from_numpy(feats[1])).tolist() == mine[1]
