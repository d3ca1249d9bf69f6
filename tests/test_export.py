"""dicehubert-export: HF / fairseq / s3prl targets, equal hidden states, bad input, the probe on HF.

Tiny models are built in the exact format fairseq saves (``dicehubert_fairseq.testing``), with
every parameter perturbed (random LayerNorm/GroupNorm gains and biases, weight-norm gains,
BatchNorm statistics) so that a tensor mapped to the wrong place shows:

* ``narrow``: student, 3 layers x 32, GroupNorm front end (``extractor_mode=default``), post-LN,
  feature-distillation heads (dropped by every export), no projection (conv width = model width);
* ``shallow``: student, 2 layers x 64, HuBERT-Large layout (``layer_norm_first``, LayerNorm
  front end, conv bias, odd positional kernel), ``task.normalize=true``;
* ``teacher``: fairseq's own ``hubert`` with HuBERT Base's 7-layer front end (stride 320), 2 x 48;
* ``posbn``: student with ``conv_pos_batch_norm`` and ``activation_fn=gelu_accurate``;
* ``conformer``: student with ``layer_type=conformer`` (not representable in transformers).

Equivalence is checked in fresh processes: one that imports only transformers (never fairseq
nor this package) for ``--to hf``, one that imports fairseq but never this package for
``--to fairseq``, one that runs s3prl's own loading code for ``--to s3prl``.
"""

import json
import os
import re
import shlex
import stat
import subprocess
import sys

import pytest
import torch

import dicehubert_fairseq  # noqa: F401  (registers the plugin and the checkpoint allow-list)
from dicehubert_fairseq.export.cli import main
from dicehubert_fairseq.export.source import fairseq_hidden_states, load_source
from dicehubert_fairseq.testing import write_checkpoint, write_corpus, write_random_labels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TOL = 1e-4
SMALL_CONV = "[(32,10,5)] + [(32,3,2)] * 2 + [(32,2,2)]"  # stride 40, receptive field 60 samples

SPECS = {
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
}
HF_MODELS = ["narrow", "shallow", "teacher", "posbn"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env.pop("PYTHONPATH", None)
    return env


def _perturb(path, normalize=False, seed=0):
    """Add noise to every float tensor of a checkpoint (BatchNorm variances kept positive)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(seed)
    for k, v in state["model"].items():
        if v.is_floating_point():
            noise = 0.1 * torch.randn(v.shape, generator=g)
            v.copy_((v + noise).abs() + 0.5 if k.endswith("running_var") else v + noise)
    state["cfg"]["task"]["normalize"] = normalize
    torch.save(state, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    sizes = write_corpus(str(root / "data"), {"train": 2, "valid": 1})
    write_random_labels(str(root / "labels"), sizes)
    out = {"root": root}
    for i, (name, spec) in enumerate(SPECS.items()):
        spec = dict(spec)
        normalize = spec.pop("normalize", False)
        path = str(root / f"{name}.pt")
        write_checkpoint(path, str(root / "data"), str(root / "labels"), seed=i, **spec)
        _perturb(path, normalize=normalize, seed=i)
        out[name] = path
    return out


def _batch(source, seed=0):
    """Three utterances of different lengths (about 25, 19, 13 frames), zero-padded."""
    from dicehubert_fairseq.export.source import conv_layers

    stride = 1
    for _, s in conv_layers(source.model):
        stride *= s
    lengths = [25 * stride + 7, 19 * stride + 133 % stride, 13 * stride + 1]
    g = torch.Generator().manual_seed(seed)
    wavs = torch.zeros(len(lengths), max(lengths))
    for b, n in enumerate(lengths):
        wavs[b, :n] = 0.1 * torch.randn(n, generator=g)
    return wavs, lengths


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _export(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _max_abs(x, y, frames):
    return max(float((x[i, :n] - y[i, :n]).abs().max()) for i, n in enumerate(frames))


# ------------------------------------------------------------------------------------- hf


HF_SCRIPT = r"""
import json, sys, torch
from transformers import AutoFeatureExtractor, AutoModel, HubertModel, Wav2Vec2FeatureExtractor
torch.set_num_threads(1)
jobs = json.load(open(sys.argv[1]))
for job in jobs:
    fe = AutoFeatureExtractor.from_pretrained(job["dir"])
    assert type(fe) is Wav2Vec2FeatureExtractor, type(fe)
    auto = AutoModel.from_pretrained(job["dir"])
    assert type(auto) is HubertModel, type(auto)
    model = HubertModel.from_pretrained(job["dir"]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    wavs = torch.load(job["input"])
    lengths = job["lengths"]
    mask = (torch.arange(wavs.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    layers = [None] * len(model.encoder.layers)
    def hook(k):
        def f(_m, _a, out):
            layers[k] = out[0] if isinstance(out, tuple) else out
        return f
    handles = [l.register_forward_hook(hook(k)) for k, l in enumerate(model.encoder.layers)]
    with torch.inference_mode():
        out = model(wavs, attention_mask=mask, output_hidden_states=True)
    for h in handles:
        h.remove()
    with torch.inference_mode():
        a_out = auto.eval()(wavs, attention_mask=mask).last_hidden_state
        single = [model(wavs[b:b + 1, :n], output_hidden_states=True).hidden_states for b, n in enumerate(lengths)]
    torch.save({"layers": layers, "hidden_states": list(out.hidden_states), "last": out.last_hidden_state,
                "auto_last": a_out, "single": [list(s) for s in single],
                "extractor": {"sampling_rate": fe.sampling_rate, "do_normalize": fe.do_normalize,
                              "return_attention_mask": fe.return_attention_mask},
                "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("fairseq", "dicehubert_fairseq",
                                                                              "torchaudio"))}, job["output"])
"""


@pytest.fixture(scope="module")
def hf_exports(models, tmp_path_factory):
    """Each HF-representable model exported by the CLI; the export's printed report."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in HF_MODELS:
        d = root / f"{name}_hf"
        code = main([models[name], "--to", "hf", str(d)])
        assert code == 0
        out[name] = str(d)
    return out


def test_hf_layers_equal_fairseq_in_fresh_process(models, hf_exports, tmp_path, capsys):
    jobs, refs = [], {}
    for name in HF_MODELS:
        src = load_source(models[name])
        wavs, lengths = _batch(src)
        first = []
        handle = src.model.encoder.layers[0].register_forward_pre_hook(lambda _m, a: first.append(a[0]))
        ref = fairseq_hidden_states(src.model, wavs, lengths)
        handle.remove()
        ref["input"] = first[0].transpose(0, 1)  # what enters layer 1: pos conv (+ layer norm)
        ref["single"] = [fairseq_hidden_states(src.model, wavs[b:b + 1, :n]) for b, n in enumerate(lengths)]
        refs[name] = (src, ref, lengths)
        torch.save(wavs, tmp_path / f"{name}.in.pt")
        jobs.append({"dir": hf_exports[name], "input": str(tmp_path / f"{name}.in.pt"), "lengths": lengths,
                     "output": str(tmp_path / f"{name}.out.pt")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "hf.py").write_text(HF_SCRIPT)
    proc = subprocess.run([PY, str(tmp_path / "hf.py"), str(tmp_path / "jobs.json")], cwd=str(tmp_path),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = {}
    for name in HF_MODELS:
        src, ref, lengths = refs[name]
        got = torch.load(tmp_path / f"{name}.out.pt", weights_only=True)
        assert got["modules"] == [], got["modules"]  # transformers alone: no fairseq, no plugin, no torchaudio
        assert got["extractor"] == {"sampling_rate": 16000, "do_normalize": name == "shallow",
                                    "return_attention_mask": True}
        frames, L = ref["frames"], src.num_layers()
        # every layer's output (hooks), padded batch with attention mask, valid frames
        per_layer = [_max_abs(g, r, frames) for g, r in zip(got["layers"], ref["layers"])]
        # transformers' own hidden_states tuple: [0] = what enters layer 1, [i] = layer i, and for
        # do_stable_layer_norm models [L] = the final layer norm of layer L (= fairseq's output)
        hs = got["hidden_states"]
        assert len(hs) == L + 1
        tuple_diffs = [_max_abs(hs[0], ref["input"], frames)]
        tuple_diffs += [_max_abs(hs[i], ref["layers"][i - 1], frames) for i in range(1, L)]
        tuple_diffs.append(_max_abs(hs[L], ref["final"], frames))
        last = _max_abs(got["last"], ref["final"], frames)
        auto = _max_abs(got["auto_last"], got["last"], frames)
        # one utterance at a time, no padding: the same function
        single = max(float((a - b).abs().max()) for g, r in zip(got["single"], ref["single"])
                     for a, b in zip(g[1:], r["layers"][:L - 1] + [r["final"]]))
        report[name] = {"layers": per_layer, "hidden_states": tuple_diffs, "last": last, "unpadded": single}
        assert max(per_layer) < TOL, (name, per_layer)
        assert max(tuple_diffs) < TOL, (name, tuple_diffs)
        assert last < TOL and single < TOL and auto == 0.0, (name, last, single, auto)
        assert got["layers"][0].shape[1] == max(frames)
    with capsys.disabled():
        print("\nmax |HF - fairseq| per model: " + json.dumps(
            {k: {kk: ([float(f"{x:.2e}") for x in v] if isinstance(v, list) else float(f"{v:.2e}"))
                 for kk, v in r.items()} for k, r in report.items()}))


def test_hf_directory_contents_and_report(models, tmp_path, capsys):
    out = tmp_path / "narrow_hf"
    code, stdout, err = _export(capsys, models["narrow"], "--to", "hf", out)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hubert" and config["architectures"] == ["HubertModel"]
    assert (config["feat_extract_norm"], config["do_stable_layer_norm"], config["conv_bias"]) == ("group", False, False)
    assert (config["conv_dim"], config["conv_kernel"], config["conv_stride"]) == ([32] * 4, [10, 3, 3, 2], [5, 2, 2, 2])
    assert (config["num_conv_pos_embeddings"], config["num_conv_pos_embedding_groups"]) == (8, 4)
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (32, 3, 64)
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith(("feat_heads", "final_proj", "label_embs")) for k in tensors)
    params = sum(t.numel() for t in tensors.values())
    size = sum(os.path.getsize(out / f) for f in os.listdir(out))
    assert f"parameters: {params:,}" in stdout and f"on disk: {size:,} bytes" in stdout, stdout
    assert "feat_heads (4 tensors" in stdout and "final_proj (2 tensors" in stdout and "label_embs_concat" in stdout
    assert re.search(r"check: max \|difference\| .* layers 1\.\.3: ", stdout), stdout
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left


def test_hf_check_runs_and_can_fail(models, tmp_path, capsys, monkeypatch):
    """The export's own check compares the written model with the source; a failed check writes nothing."""
    import dicehubert_fairseq.export.check as check

    monkeypatch.setattr(check, "TOLERANCE", -1.0)
    out = tmp_path / "x_hf"
    code, _, err = _export(capsys, models["teacher"], "--to", "hf", out)
    assert code == 1 and "differs from the source by up to" in err and err.count("\n") == 1, err
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_activation_mapping_computes_the_same_function():
    from fairseq import utils
    from transformers.activations import ACT2FN

    from dicehubert_fairseq.export.to_hf import ACTIVATIONS

    x = torch.linspace(-6, 6, 2001)
    for fairseq_name, hf_name in ACTIVATIONS.items():
        a = utils.get_activation_fn(fairseq_name)(x)
        b = ACT2FN[hf_name](x)
        assert torch.allclose(a, b, atol=1e-6), (fairseq_name, hf_name, float((a - b).abs().max()))


# -------------------------------------------------------------------------------- fairseq


FAIRSEQ_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
jobs = json.load(open(sys.argv[1]))
for job in jobs:
    raw = torch.load(job["path"], map_location="cpu", weights_only=True)  # no allow-list: plain types only
    from fairseq import checkpoint_utils
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([job["path"]])
    model = models[0].eval()
    for p in model.parameters():
        p.requires_grad_(False)
    wavs = torch.load(job["input"])
    outs = []
    with torch.inference_mode():
        for b, n in enumerate(job["lengths"]):
            src = wavs[b:b + 1, :n]
            layers = [model.extract_features(src, padding_mask=None, mask=False, output_layer=k)[0]
                      for k in range(1, len(model.encoder.layers) + 1)]
            final = model.extract_features(src, padding_mask=None, mask=False)[0]
            outs.append({"layers": layers, "final": final})
    torch.save({"outs": outs, "class": type(model).__module__ + "." + type(model).__name__,
                "model": cfg.model._name, "task": cfg.task._name, "keys": sorted(raw["model"]),
                "user_dir": cfg.common.user_dir,
                "modules": sorted(m for m in sys.modules if m.split(".")[0] == "dicehubert_fairseq")}, job["output"])
"""


def test_fairseq_export_loads_without_the_plugin(models, tmp_path, capsys):
    jobs, refs = [], {}
    for name in ("narrow", "teacher", "conformer", "shallow"):
        path = tmp_path / f"{name}.hubert.pt"
        code, stdout, err = _export(capsys, models[name], "--to", "fairseq", path)
        assert code == 0, err
        src = load_source(models[name])
        wavs, lengths = _batch(src)
        refs[name] = (src, [fairseq_hidden_states(src.model, wavs[b:b + 1, :n]) for b, n in enumerate(lengths)])
        torch.save(wavs, tmp_path / f"{name}.in.pt")
        jobs.append({"path": str(path), "input": str(tmp_path / f"{name}.in.pt"), "lengths": lengths,
                     "output": str(tmp_path / f"{name}.out.pt")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "fs.py").write_text(FAIRSEQ_SCRIPT)
    proc = subprocess.run([PY, str(tmp_path / "fs.py"), str(tmp_path / "jobs.json")], cwd=str(tmp_path),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (src, ref) in refs.items():
        got = torch.load(tmp_path / f"{name}.out.pt", weights_only=True)
        assert got["modules"] == [], got["modules"]
        assert got["class"] == "fairseq.models.hubert.hubert.HubertModel"
        assert (got["model"], got["task"], got["user_dir"]) == ("hubert", "hubert_pretraining", None)
        assert not any(k.startswith("feat_heads") for k in got["keys"])
        assert "label_embs_concat" in got["keys"]  # fairseq's HubertModel loads strictly
        for g, r in zip(got["outs"], ref):
            for a, b in zip(g["layers"] + [g["final"]], r["layers"] + [r["final"]]):
                assert torch.equal(a, b), (name, float((a - b).abs().max()))


# ---------------------------------------------------------------------------------- s3prl


S3PRL_SCRIPT = r"""
import json, sys, types, torch
torch.set_num_threads(1)
jobs = json.load(open(sys.argv[1]))
# 1. without anything stubbed: s3prl's model module and the steps of load_converted_model
from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig
def keep(dc, cfg):
    return dc(**{k: v for k, v in cfg.items() if k in dc.__dataclass_fields__})
steps = {}
for job in jobs:
    state = torch.load(job["path"], map_location="cpu")
    assert all(k in state for k in ("task_cfg", "model_cfg", "model_weight", "dictionaries_symbols"))
    model = HubertModel(keep(HubertConfig, state["model_cfg"]), keep(HubertPretrainingConfig, state["task_cfg"]),
                        state["dictionaries_symbols"])
    model.load_state_dict(state["model_weight"])
    steps[job["path"]] = type(model).__module__
# 2. s3prl's own load_converted_model and UpstreamExpert (hubert_local's expert). Their modules import
# s3prl.util.pseudo_data, which imports torchaudio (used only to write pseudo wavs, never here); the
# torchaudio installed here does not load beside torch 2.13, so an empty module stands in for it:
# any use of torchaudio would fail with an AttributeError.
sys.modules["torchaudio"] = types.ModuleType("torchaudio")
from s3prl.upstream.hubert.convert import load_converted_model
from s3prl.upstream.hubert.expert import UpstreamExpert
for job in jobs:
    model, task_cfg = load_converted_model(job["path"])
    expert = UpstreamExpert(job["path"]).eval()
    for p in expert.parameters():
        p.requires_grad_(False)
    wavs = torch.load(job["input"])
    with torch.inference_mode():
        hs = [expert([wavs[b, :n]])["hidden_states"] for b, n in enumerate(job["lengths"])]
    torch.save({"hidden_states": hs, "steps_module": steps[job["path"]], "loaded": type(model).__module__,
                "normalize": task_cfg.normalize,
                "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("fairseq", "dicehubert_fairseq"))},
               job["output"])
"""


def test_s3prl_export_loads_through_s3prl(models, tmp_path, capsys):
    pytest.importorskip("s3prl.upstream.hubert.hubert_model")
    jobs, refs = [], {}
    for name in ("narrow", "shallow", "teacher", "conformer"):
        path = tmp_path / f"{name}.s3prl.pt"
        code, stdout, err = _export(capsys, models[name], "--to", "s3prl", path)
        assert code == 0, err
        assert "check: not run" not in stdout  # s3prl is installed: the export checked through its model
        src = load_source(models[name])
        wavs, lengths = _batch(src)
        ref = []
        for b, n in enumerate(lengths):
            first = []
            handle = src.model.encoder.layers[0].register_forward_pre_hook(lambda _m, a: first.append(a[0]))
            x = wavs[b:b + 1, :n]
            if name == "shallow":  # task.normalize: s3prl's expert layer-normalises the waveform, as fairseq
                x = torch.nn.functional.layer_norm(x, x.shape[1:])
            r = fairseq_hidden_states(src.model, x)
            handle.remove()
            T = r["final"].shape[1]  # the layers' input is padded to required_seq_len_multiple
            ref.append([first[0].transpose(0, 1)[:, :T]] + r["layers"][:-1] + [r["final"]])
        refs[name] = ref
        torch.save(wavs, tmp_path / f"{name}.in.pt")
        jobs.append({"path": str(path), "input": str(tmp_path / f"{name}.in.pt"), "lengths": lengths,
                     "output": str(tmp_path / f"{name}.out.pt")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "s3.py").write_text(S3PRL_SCRIPT)
    proc = subprocess.run([PY, str(tmp_path / "s3.py"), str(tmp_path / "jobs.json")], cwd=str(tmp_path),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = {}
    for name, ref in refs.items():
        got = torch.load(tmp_path / f"{name}.out.pt", weights_only=True)
        assert got["modules"] == [] and got["loaded"] == got["steps_module"] == "s3prl.upstream.hubert.hubert_model"
        assert got["normalize"] is (name == "shallow")
        for hs, r in zip(got["hidden_states"], ref):
            assert len(hs) == len(r)  # s3prl's hidden_states: input of each layer, then the encoder output
            diffs = [float((a - b).abs().max()) for a, b in zip(hs, r)]
            assert max(diffs) < TOL, (name, diffs)
            report[name] = max(report.get(name, 0.0), max(diffs))
    with capsys.disabled():
        print(f"\nmax |s3prl expert - fairseq| over hidden states: {report}")


# ------------------------------------------------------------------------------ bad input


def _refused(capsys, tmp_path, argv, expect, out):
    before = sorted(os.listdir(os.path.dirname(out)))
    code, stdout, err = _export(capsys, *argv)
    assert code == 1, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dicehubert-export: error: "), err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in err and stdout == ""
    assert sorted(os.listdir(os.path.dirname(out))) == before  # nothing written, no temporary left
    return lines[0]


def test_bad_input_refused_in_one_line(models, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # not HuBERT-family: fairseq checkpoint of another model
    other = tmp_path / "w2v.pt"
    state = torch.load(models["teacher"], weights_only=True)
    state["cfg"]["model"]["_name"] = "wav2vec2"
    torch.save(state, other)
    line = _refused(capsys, tmp_path, [other, "--to", "hf", out_dir / "a"], "is not a HuBERT-family model",
                    out_dir / "a")
    assert str(other) in line and "'wav2vec2'" in line
    # a Conformer student cannot become a transformers HubertModel
    line = _refused(capsys, tmp_path, [models["conformer"], "--to", "hf", out_dir / "c"],
                    "model.layer_type=conformer", out_dir / "c")
    assert models["conformer"] in line and "--to fairseq" in line
    # s3prl's HubertConfig has no conv_pos_batch_norm
    _refused(capsys, tmp_path, [models["posbn"], "--to", "s3prl", out_dir / "p.pt"], "model.conv_pos_batch_norm=True",
             out_dir / "p.pt")
    # unreadable: truncated, garbage, missing, a directory
    data = open(models["narrow"], "rb").read()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    _refused(capsys, tmp_path, [tmp_path / "trunc.pt", "--to", "fairseq", out_dir / "t.pt"],
             f"{tmp_path / 'trunc.pt'}: not a readable torch checkpoint", out_dir / "t.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint\n")
    line = _refused(capsys, tmp_path, [tmp_path / "junk.pt", "--to", "s3prl", out_dir / "j.pt"],
                    f"{tmp_path / 'junk.pt'}: ", out_dir / "j.pt")
    assert "checkpoint" in line
    _refused(capsys, tmp_path, [tmp_path / "missing.pt", "--to", "hf", out_dir / "m"],
             f"{tmp_path / 'missing.pt'}: checkpoint not found", out_dir / "m")
    _refused(capsys, tmp_path, [out_dir, "--to", "fairseq", tmp_path / "d.pt"], "is a directory", tmp_path / "d.pt")


def test_console_script_and_module_exit_1_in_one_line(tmp_path):
    """As processes: ``dicehubert-export`` and ``python -m dicehubert_fairseq.export`` (fairseq's own
    import-time INFO line about tensorboardX aside, which every fairseq program prints)."""
    script = os.path.join(os.path.dirname(PY), "dicehubert-export")
    for cmd in ([script], [PY, "-m", "dicehubert_fairseq.export"]):
        proc = subprocess.run(cmd + [str(tmp_path / "nope.pt"), "--to", "hf", str(tmp_path / "o")], env=_env(),
                              capture_output=True, text=True, timeout=300)
        ours = [line for line in proc.stderr.splitlines() if not line.startswith("INFO:fairseq")]
        assert proc.returncode == 1 and ours == [f"dicehubert-export: error: {tmp_path / 'nope.pt'}: checkpoint not found"], proc.stderr
        assert proc.stdout == "" and os.listdir(tmp_path) == []


def test_existing_output_needs_force(models, tmp_path, capsys):
    out = tmp_path / "n.pt"
    out.write_bytes(b"keep me")
    _refused(capsys, tmp_path, [models["narrow"], "--to", "fairseq", out], f"{out}: already exists (use --force",
             out)
    assert out.read_bytes() == b"keep me"
    hf = tmp_path / "n_hf"
    hf.mkdir()
    (hf / "mine.txt").write_text("x")
    _refused(capsys, tmp_path, [models["narrow"], "--to", "hf", hf], "already exists", hf)
    assert os.listdir(hf) == ["mine.txt"]
    _refused(capsys, tmp_path, [models["narrow"], "--to", "hf", out], "exists and is not a directory", out)
    # --force replaces, atomically (old directory gone, no temporaries)
    code, _, err = _export(capsys, models["narrow"], "--to", "hf", hf, "--force", "--no-check")
    assert code == 0, err
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    code, _, err = _export(capsys, models["narrow"], "--to", "fairseq", out, "--force", "--no-check")
    assert code == 0 and out.read_bytes()[:2] == b"PK", err  # a torch zip file now
    assert sorted(os.listdir(tmp_path)) == ["n.pt", "n_hf"]


def test_failed_write_leaves_nothing(models, tmp_path, capsys, monkeypatch):
    import dicehubert_fairseq.export.to_fairseq as to_fairseq

    def half_write(source, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(to_fairseq, "write_fairseq", half_write)
    code, _, err = _export(capsys, models["teacher"], "--to", "fairseq", tmp_path / "x.pt")
    assert code == 1 and "No space left on device" in err
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------- probe


@pytest.fixture(scope="module")
def tone_teacher(tmp_path_factory):
    """Tone corpus and a perturbed tiny hubert (2 x 32, stride 320) trained with task.normalize."""
    from dicehubert_fairseq.data.files import read_manifest
    from dicehubert_fairseq.probe.synthetic import write_tone_corpus

    root = tmp_path_factory.mktemp("tones")
    data = str(root / "data")
    write_tone_corpus(data, splits={"train": 24, "valid": 8, "test": 8}, seed=0)
    sizes = {s: read_manifest(os.path.join(data, f"{s}.tsv")).sizes for s in ("train", "valid")}
    write_random_labels(str(root / "labels"), sizes)
    ckpt = str(root / "hubert.pt")
    write_checkpoint(ckpt, data, str(root / "labels"), seed=0)
    _perturb(ckpt, normalize=True, seed=3)
    hf = str(root / "hubert_hf")
    assert main([ckpt, "--to", "hf", hf, "-q"]) == 0
    return {"data": data, "ckpt": ckpt, "hf": hf}


def test_probe_on_hf_directory_equals_fairseq(tone_teacher):
    from dicehubert_fairseq.checkpoint import load_model
    from dicehubert_fairseq.data.files import read_manifest
    from dicehubert_fairseq.export.hf_model import load_hf_model
    from dicehubert_fairseq.probe.probe import ProbeConfig, extract_hidden_states, read_audio, run_probe

    fs_model, _ = load_model(tone_teacher["ckpt"])
    hf_model, hf_cfg = load_hf_model(tone_teacher["hf"])
    assert hf_cfg["task"] == {"sample_rate": 16000, "normalize": True}
    manifest = read_manifest(os.path.join(tone_teacher["data"], "test.tsv"))
    diffs = []
    for i in range(4):
        wav = read_audio(manifest.audio_path(i))
        a = extract_hidden_states(fs_model, wav, normalize_waveform=True)
        b = extract_hidden_states(hf_model, wav, normalize_waveform=True)
        assert a.shape == b.shape == (3, a.shape[1], 32)
        diffs.append((a - b).abs().amax(dim=(1, 2)))
    per_state = torch.stack(diffs).amax(0).tolist()
    assert max(per_state) < TOL, per_state
    cfg = ProbeConfig(epochs=40, batch_size=4, seed=0)
    r_fs = run_probe(tone_teacher["ckpt"], tone_teacher["data"], cfg=cfg)
    r_hf = run_probe(tone_teacher["hf"], tone_teacher["data"], cfg=cfg)
    print(f"\nprobe: max |HF - fairseq| per hidden state {per_state}; PER fairseq {r_fs['per']:.4f}, "
          f"HF {r_hf['per']:.4f}")
    assert r_fs["per"] < 0.8  # the probe learned something: equal PERs are not both "all wrong"
    assert r_hf["per"] == r_fs["per"] and r_hf["valid_per"] == r_fs["valid_per"]
    assert r_hf["num_layers"] == r_fs["num_layers"] == 3 and r_hf["frames"] == r_fs["frames"]


def test_probe_cli_refuses_a_directory_that_is_not_a_model(tmp_path, capsys):
    from dicehubert_fairseq.probe.cli import main as probe_main
    from dicehubert_fairseq.probe.synthetic import write_tone_corpus

    data = tmp_path / "data"
    write_tone_corpus(str(data), splits={"train": 4, "valid": 2, "test": 2}, seed=0)
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    code = probe_main(["--checkpoint", str(empty), "--data", str(data), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and f"{empty}: a directory without config.json" in err, err


# ------------------------------------------------------------------------- docs and scripts


def _readme_section(title):
    text = open(os.path.join(REPO, "README.md")).read()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start: end if end > 0 else None]


def test_readme_transformers_snippet_runs(models, tmp_path, capsys):
    section = _readme_section("Use your student elsewhere")
    commands = re.findall(r"^dicehubert-export .*$", section, flags=re.M)
    hf_command = next(c for c in commands if "--to hf" in c)
    argv = shlex.split(hf_command)[1:]
    argv[0] = models["narrow"]
    code = main([os.path.join(str(tmp_path), a) if a.endswith("_hf") else a for a in argv])
    assert code == 0
    capsys.readouterr()
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    proc = subprocess.run([PY, "-c", snippet], cwd=str(tmp_path), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # what the snippet prints: hidden states (input + 3 layers) and the last one's shape
    assert re.search(r"^4 torch.Size\(\[2, \d+, 32\]\)$", proc.stdout.strip(), flags=re.M), proc.stdout


STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), os.getcwd()] + sys.argv[1:]) + "\\n")
"""


def _s3prl_options():
    """Option strings of the installed s3prl's run_downstream.py parser (read, not imported: it imports torchaudio)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("s3prl")
    path = os.path.join(os.path.dirname(spec.origin), "run_downstream.py")
    options = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            options |= {a.value for a in node.args if isinstance(a, ast.Constant)}
    return options, os.path.dirname(spec.origin)


def test_librispeech_superb_script(tmp_path):
    """5_superb.sh: exports with dicehubert-export --to s3prl, then s3prl's PR and ASR, train + evaluate."""
    pytest.importorskip("s3prl")
    script = os.path.join(REPO, "examples", "librispeech", "5_superb.sh")
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0 and "set -euo pipefail" in open(script).read()
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "dicehubert-export").write_text(STUB)
    s3prl = tmp_path / "s3prl" / "s3prl"
    (s3prl / "preprocess").mkdir(parents=True)
    for f in (stubs / "dicehubert-export", s3prl / "run_downstream.py", s3prl / "preprocess" / "generate_len_for_bucket.py"):
        f.write_text(STUB)
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.jsonl"
    env = _env()
    env.update(STUB_LOG=str(log), LIBRISPEECH=str(tmp_path / "LibriSpeech"), WORK=str(tmp_path / "work"),
               S3PRL_DIR=str(s3prl), S3PRL_PYTHON=PY, PATH=str(stubs) + os.pathsep + env["PATH"])
    ckpt = tmp_path / "work" / "runs" / "dicehubert_narrow" / "checkpoints" / "checkpoint_best.pt"
    proc = subprocess.run(["bash", script, str(ckpt)], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    calls = [json.loads(line) for line in open(log)]
    export = [c for c in calls if c[0] == "dicehubert-export"]
    assert len(export) == 1
    from dicehubert_fairseq.export.cli import build_parser

    ns = build_parser().parse_args(export[0][2:])
    assert ns.target == "s3prl" and ns.checkpoint == str(ckpt)
    options, package = _s3prl_options()
    runs = [c for c in calls if c[0] == "run_downstream.py"]
    trained = {}
    for call in runs:
        assert call[1] == str(s3prl)  # run from s3prl's source directory, where its configs live
        args = call[2:]
        assert {a for a in args if a.startswith("-")} <= options, args
        opts = dict(zip(args[::2], args[1::2]))
        if opts["-m"] == "train":
            assert opts["-u"] == "hubert_local" and opts["-k"] == ns.out, opts
            assert os.path.isdir(os.path.join(package, "downstream", opts["-d"])), opts["-d"]
            trained[opts["-d"]] = opts["-p"]
        else:
            assert opts["-m"] == "evaluate" and opts["-e"].startswith(tuple(trained.values())), opts
    assert set(trained) == {"ctc", "asr"} and len(runs) == 4
    import ast

    hubconf = ast.parse(open(os.path.join(package, "upstream", "hubert", "hubconf.py")).read())
    assert "hubert_local" in {n.name for n in hubconf.body if isinstance(n, ast.FunctionDef)}
