"""dicehubert-export end to end, in fresh processes: the HF directory in transformers alone, the fairseq
file without this plugin, the s3prl file through s3prl's own loading code; the console script; the
README's snippet; examples/librispeech/5_superb.sh.

Models: the perturbed tiny checkpoints of ``tests/conftest.py`` (``EXPORT_SPECS``): narrow, shallow,
teacher-shaped, conv_pos_batch_norm, Conformer, convolution-only.  The reference is fairseq's model through
:func:`dicehubert_fairseq.hidden_states.hidden_states`.
"""

import ast
import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import sys

import pytest
import torch

from dicehubert_fairseq.export.check import batch_padding_mask, frames_of
from dicehubert_fairseq.export.cli import build_parser, main
from dicehubert_fairseq.checkpoint import load_source
from dicehubert_fairseq.frames import conv_layers, frame_stride
from dicehubert_fairseq.hidden_states import hidden_states

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_torch_thread")]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable
TOL = 1e-4
HF_MODELS = ["narrow", "shallow", "teacher", "posbn"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env.pop("PYTHONPATH", None)
    return env


def _batch(model, seed=0):
    """Three utterances of different lengths (about 25, 19, 13 frames), zero-padded."""
    stride = frame_stride(conv_layers(model))
    lengths = [25 * stride + 7, 19 * stride + 133 % stride, 13 * stride + 1]
    g = torch.Generator().manual_seed(seed)
    wavs = torch.zeros(len(lengths), max(lengths))
    for b, n in enumerate(lengths):
        wavs[b, :n] = 0.1 * torch.randn(n, generator=g)
    return wavs, lengths


def _job(tmp_path, name, wavs, lengths, **paths):
    """A job for a fresh process: ``wavs`` saved beside ``tmp_path``'s outputs."""
    torch.save(wavs, tmp_path / f"{name}.in.pt")
    return dict(paths, input=str(tmp_path / f"{name}.in.pt"), lengths=lengths, output=str(tmp_path / f"{name}.out.pt"))


def _run_fresh(tmp_path, script, jobs):
    """Run ``script`` on ``jobs`` in a fresh Python process; each job's output, loaded."""
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "fresh.py").write_text(script)
    proc = subprocess.run([PY, str(tmp_path / "fresh.py"), str(tmp_path / "jobs.json")], cwd=str(tmp_path),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(job["output"], weights_only=True) for job in jobs]


def _max_abs(x, y, frames):
    return max(float((x[i, :n] - y[i, :n]).abs().max()) for i, n in enumerate(frames))


def _alone(model, wavs, lengths, normalize=False):
    """Each utterance alone (no padding): the states and what enters layer 1 (layers' input is padded to
    required_seq_len_multiple, so cut to the frames)."""
    out = []
    for b, n in enumerate(lengths):
        first = []
        handle = model.encoder.layers[0].register_forward_pre_hook(lambda _m, a: first.append(a[0]))
        x = wavs[b:b + 1, :n]
        if normalize:
            x = torch.nn.functional.layer_norm(x, x.shape[1:])
        with torch.inference_mode():
            h = hidden_states(model, x)
        handle.remove()
        out.append((h, first[0].transpose(0, 1)[:, :h.x.shape[1]]))
    return out


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
def hf_exports(export_models, tmp_path_factory):
    """Each HF-representable model exported by the CLI."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in HF_MODELS:
        d = root / f"{name}_hf"
        assert main([export_models[name], "--to", "hf", str(d), "-q"]) == 0
        out[name] = str(d)
    return out


def test_hf_layers_equal_fairseq_in_fresh_process(export_models, hf_exports, tmp_path, capsys):
    jobs, refs = [], {}
    for name in HF_MODELS:
        src = load_source(export_models[name])
        wavs, lengths = _batch(src.model)
        first = []
        handle = src.model.encoder.layers[0].register_forward_pre_hook(lambda _m, a: first.append(a[0]))
        with torch.inference_mode():
            # the padded batch as transformers computes it: conv front end on the batch, exact frame mask
            batch = hidden_states(src.model, wavs, batch_padding_mask(src.model, lengths, wavs.shape[1]))
        handle.remove()
        # each utterance alone (what transformers gives one utterance without padding)
        alone = [h for h, _ in _alone(src.model, wavs, lengths)]
        refs[name] = (src, batch, first[0].transpose(0, 1), alone, lengths)
        jobs.append(_job(tmp_path, name, wavs, lengths, dir=hf_exports[name]))
    report = {}
    for name, got in zip(HF_MODELS, _run_fresh(tmp_path, HF_SCRIPT, jobs)):
        src, ref, ref_input, alone, lengths = refs[name]
        assert got["modules"] == [], got["modules"]  # transformers alone: no fairseq, no plugin, no torchaudio
        assert got["extractor"] == {"sampling_rate": 16000, "do_normalize": name == "shallow",
                                    "return_attention_mask": True}
        frames, L = frames_of(src.model, lengths), src.num_layers()
        # every layer's output (hooks), padded batch with attention mask, valid frames
        per_layer = [_max_abs(g, r, frames) for g, r in zip(got["layers"], ref.layers)]
        # transformers' own hidden_states tuple: [0] = what enters layer 1, [i] = layer i, and for
        # do_stable_layer_norm models [L] = the final layer norm of layer L (= fairseq's output)
        hs = got["hidden_states"]
        assert len(hs) == L + 1
        tuple_diffs = [_max_abs(hs[0], ref_input, frames)]
        tuple_diffs += [_max_abs(hs[i], ref.layers[i - 1], frames) for i in range(1, L)]
        tuple_diffs.append(_max_abs(hs[L], ref.x, frames))
        last = _max_abs(got["last"], ref.x, frames)
        auto = _max_abs(got["auto_last"], got["last"], frames)
        # one utterance at a time, no padding, on both sides
        single = max(float((a - b).abs().max()) for g, r in zip(got["single"], alone)
                     for a, b in zip(g[1:], r.layers[:L - 1] + [r.x]))
        report[name] = {"layers": per_layer, "hidden_states": tuple_diffs, "last": last, "alone": single}
        assert max(per_layer) < TOL, (name, per_layer)
        assert max(tuple_diffs) < TOL, (name, tuple_diffs)
        assert last < TOL and single < TOL and auto == 0.0, (name, last, single, auto)
        assert got["layers"][0].shape[1] == max(frames)
    with capsys.disabled():
        print("\nmax |HF - fairseq| per model: " + json.dumps(
            {k: {kk: ([float(f"{x:.2e}") for x in v] if isinstance(v, list) else float(f"{v:.2e}"))
                 for kk, v in r.items()} for k, r in report.items()}))


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


def test_fairseq_export_loads_without_the_plugin(export_models, tmp_path):
    jobs, refs = [], {}
    for name in ("narrow", "teacher", "conformer", "shallow"):
        path = tmp_path / f"{name}.hubert.pt"
        assert main([export_models[name], "--to", "fairseq", str(path), "-q"]) == 0
        src = load_source(export_models[name])
        wavs, lengths = _batch(src.model)
        refs[name] = [h for h, _ in _alone(src.model, wavs, lengths)]
        jobs.append(_job(tmp_path, name, wavs, lengths, path=str(path)))
    for (name, ref), got in zip(refs.items(), _run_fresh(tmp_path, FAIRSEQ_SCRIPT, jobs)):
        assert got["modules"] == [], got["modules"]
        assert got["class"] == "fairseq.models.hubert.hubert.HubertModel"
        assert (got["model"], got["task"], got["user_dir"]) == ("hubert", "hubert_pretraining", None)
        assert not any(k.startswith("feat_heads") for k in got["keys"])
        assert "label_embs_concat" in got["keys"]  # fairseq's HubertModel loads strictly
        for g, r in zip(got["outs"], ref):
            for a, b in zip(g["layers"] + [g["final"]], r.layers + [r.x]):
                assert torch.equal(a, b), (name, float((a - b).abs().max()))


def test_conv_student_exports_to_fairseq_and_loads_with_the_plugin(export_models, tmp_path, capsys,
                                                                  restore_process_state):
    """A convolution-only student is beyond fairseq's ``hubert``: the file keeps ``dicehubert_student``
    (plain types, no feature heads, task ``hubert_pretraining``), says so, passes the export's own
    check, and fairseq's loader rebuilds it here (plugin imported) with bit-identical layer outputs."""
    from fairseq import checkpoint_utils

    from dicehubert_fairseq.models._conv_encoder import ConvBlock

    path = tmp_path / "conv.hubert.pt"
    assert main([export_models["conv"], "--to", "fairseq", str(path)]) == 0
    stdout, err = capsys.readouterr()
    assert "check: max |difference|" in stdout and "dropped: feat_heads" in stdout, stdout
    assert "keeps model 'dicehubert_student'" in err and "import dicehubert_fairseq" in err, err
    raw = torch.load(path, map_location="cpu", weights_only=True)  # no allow-list: plain types only
    assert raw["cfg"]["model"]["_name"] == "dicehubert_student" and raw["cfg"]["model"]["layer_type"] == "conv"
    assert raw["cfg"]["model"]["conv_encoder_dilations"] == [1, 2]
    assert not any(k.startswith("feat_") or k == "init_from_teacher" for k in raw["cfg"]["model"])
    assert raw["cfg"]["task"]["_name"] == "hubert_pretraining" and raw["cfg"]["common"]["user_dir"] is None
    assert not any(k.startswith("feat_heads") for k in raw["model"])
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    model = models[0].eval()
    for p in model.parameters():  # as the source: some kernels differ when parameters require grad
        p.requires_grad_(False)
    assert all(isinstance(layer, ConvBlock) for layer in model.encoder.layers) and len(model.encoder.layers) == 3
    src = load_source(export_models["conv"])
    wavs, lengths = _batch(src.model)
    for (ref, _), (got, _) in zip(_alone(src.model, wavs, lengths), _alone(model, wavs, lengths)):
        for a, b in zip(got.layers + [got.x], ref.layers + [ref.x]):
            assert torch.equal(a, b), float((a - b).abs().max())


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


def test_s3prl_export_loads_through_s3prl(export_models, tmp_path, capsys):
    pytest.importorskip("s3prl.upstream.hubert.hubert_model")
    jobs, refs = [], {}
    for name in ("narrow", "shallow", "teacher", "conformer"):
        path = tmp_path / f"{name}.s3prl.pt"
        code = main([export_models[name], "--to", "s3prl", str(path)])
        stdout, err = capsys.readouterr()
        assert code == 0, err
        assert "check: not run" not in stdout  # s3prl is installed: the export checked through its model
        src = load_source(export_models[name])
        wavs, lengths = _batch(src.model)
        # task.normalize (shallow): s3prl's expert layer-normalises the waveform, as fairseq's dataset
        refs[name] = [[first] + h.layers[:-1] + [h.x] for h, first in _alone(src.model, wavs, lengths,
                                                                            normalize=name == "shallow")]
        jobs.append(_job(tmp_path, name, wavs, lengths, path=str(path)))
    report = {}
    for (name, ref), got in zip(refs.items(), _run_fresh(tmp_path, S3PRL_SCRIPT, jobs)):
        assert got["modules"] == [] and got["loaded"] == got["steps_module"] == "s3prl.upstream.hubert.hubert_model"
        assert got["normalize"] is (name == "shallow")
        for hs, r in zip(got["hidden_states"], ref):
            assert len(hs) == len(r)  # s3prl's hidden_states: input of each layer, then the encoder output
            diffs = [float((a - b).abs().max()) for a, b in zip(hs, r)]
            assert max(diffs) < TOL, (name, diffs)
            report[name] = max(report.get(name, 0.0), max(diffs))
    with capsys.disabled():
        print(f"\nmax |s3prl expert - fairseq| over hidden states: {report}")


# ------------------------------------------------------------------------ the console script


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


# ------------------------------------------------------------------------- docs and scripts


def _readme_section(title):
    text = open(os.path.join(REPO, "README.md")).read()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start: end if end > 0 else None]


def test_readme_transformers_snippet_runs(export_models, tmp_path, capsys):
    section = _readme_section("Use your student elsewhere")
    commands = re.findall(r"^dicehubert-export .*$", section, flags=re.M)
    hf_command = next(c for c in commands if "--to hf" in c)
    argv = shlex.split(hf_command)[1:]
    argv[0] = export_models["narrow"]
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
    hubconf = ast.parse(open(os.path.join(package, "upstream", "hubert", "hubconf.py")).read())
    assert "hubert_local" in {n.name for n in hubconf.body if isinstance(n, ast.FunctionDef)}
