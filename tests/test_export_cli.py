"""dicehubert-export's command line in-process: bad input refused in one line, --force, nothing half-written.

(The console script and ``python -m`` as processes: tests/e2e/test_export.py.)
"""

import os

import pytest
import torch

from dicehubert_fairseq.export import to_fairseq
from dicehubert_fairseq.export.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _export(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(capsys, argv, expect, out):
    before = sorted(os.listdir(os.path.dirname(out)))
    code, stdout, err = _export(capsys, *argv)
    assert code == 1, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dicehubert-export: error: "), err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in err and stdout == ""
    assert sorted(os.listdir(os.path.dirname(out))) == before  # nothing written, no temporary left
    return lines[0]


def test_bad_input_refused_in_one_line(export_models, tmp_path, capsys):
    models = export_models
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # not HuBERT-family: fairseq checkpoint of another model
    other = tmp_path / "w2v.pt"
    state = torch.load(models["teacher"], weights_only=True)
    state["cfg"]["model"]["_name"] = "wav2vec2"
    torch.save(state, other)
    line = _refused(capsys, [other, "--to", "hf", out_dir / "a"], "is not a HuBERT-family model", out_dir / "a")
    assert str(other) in line and "'wav2vec2'" in line
    # a Conformer student cannot become a transformers HubertModel
    line = _refused(capsys, [models["conformer"], "--to", "hf", out_dir / "c"], "model.layer_type=conformer",
                    out_dir / "c")
    assert models["conformer"] in line and "--to fairseq" in line
    # nor can a convolution-only student, which s3prl's HubertModel cannot build either
    for target, out, who in (("hf", out_dir / "v", "transformers' HubertModel"), ("s3prl", out_dir / "v.pt",
                                                                                  "s3prl's HubertModel")):
        line = _refused(capsys, [models["conv"], "--to", target, out], "model.layer_type=conv", out)
        assert who in line and line.endswith("(export this model with --to fairseq)"), line
    # s3prl's HubertConfig has no conv_pos_batch_norm
    _refused(capsys, [models["posbn"], "--to", "s3prl", out_dir / "p.pt"], "model.conv_pos_batch_norm=True",
             out_dir / "p.pt")
    # unreadable: truncated, garbage, missing, a directory
    data = open(models["narrow"], "rb").read()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    _refused(capsys, [tmp_path / "trunc.pt", "--to", "fairseq", out_dir / "t.pt"],
             f"{tmp_path / 'trunc.pt'}: not a readable torch checkpoint", out_dir / "t.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint\n")
    line = _refused(capsys, [tmp_path / "junk.pt", "--to", "s3prl", out_dir / "j.pt"], f"{tmp_path / 'junk.pt'}: ",
                    out_dir / "j.pt")
    assert "checkpoint" in line
    _refused(capsys, [tmp_path / "missing.pt", "--to", "hf", out_dir / "m"],
             f"{tmp_path / 'missing.pt'}: checkpoint not found", out_dir / "m")
    _refused(capsys, [out_dir, "--to", "fairseq", tmp_path / "d.pt"], "is a directory", tmp_path / "d.pt")


def test_existing_output_needs_force(export_models, tmp_path, capsys):
    narrow = export_models["narrow"]
    out = tmp_path / "n.pt"
    out.write_bytes(b"keep me")
    _refused(capsys, [narrow, "--to", "fairseq", out], f"{out}: already exists (use --force", out)
    assert out.read_bytes() == b"keep me"
    hf = tmp_path / "n_hf"
    hf.mkdir()
    (hf / "mine.txt").write_text("x")
    _refused(capsys, [narrow, "--to", "hf", hf], "already exists", hf)
    assert os.listdir(hf) == ["mine.txt"]
    _refused(capsys, [narrow, "--to", "hf", out], "exists and is not a directory", out)
    # --force replaces, atomically (old directory gone, no temporaries)
    code, _, err = _export(capsys, narrow, "--to", "hf", hf, "--force", "--no-check")
    assert code == 0, err
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    code, _, err = _export(capsys, narrow, "--to", "fairseq", out, "--force", "--no-check")
    assert code == 0 and out.read_bytes()[:2] == b"PK", err  # a torch zip file now
    assert sorted(os.listdir(tmp_path)) == ["n.pt", "n_hf"]


def test_failed_write_leaves_nothing(export_models, tmp_path, capsys, monkeypatch):
    def half_write(source, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(to_fairseq, "write_fairseq", half_write)
    code, _, err = _export(capsys, export_models["teacher"], "--to", "fairseq", tmp_path / "x.pt")
    assert code == 1 and "No space left on device" in err
    assert os.listdir(tmp_path) == []
