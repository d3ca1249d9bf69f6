"""The convolution-only encoder (``model.layer_type=conv``): no attention, the dilated receptive field
it claims, padding that changes nothing, its settings checked, presets about the narrow students'
size, and the probe on it."""

import json

import pytest
import torch
from fairseq.modules import MultiheadAttention

import dicehubert_fairseq  # noqa: F401
from dicehubert_fairseq.errors import InputError
from dicehubert_fairseq.models._conv_encoder import ConvBlock, ConvEncoder, receptive_field
from dicehubert_fairseq.probe.cli import main as probe_main
from tests.helpers.config import build, compose, tiny_student_cfg
from tests.helpers.data import write_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def block(kernel=3, dilation=2, layer_norm_first=False, seed=0):
    torch.manual_seed(seed)
    return ConvBlock(8, 16, kernel, dilation, dropout=0.0, activation_dropout=0.0, activation_fn="gelu",
                     layer_norm_first=layer_norm_first).eval()


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_a_block_sees_its_dilated_kernel_and_nothing_else(layer_norm_first):
    """Kernel 3, dilation 2: frame t's output depends on input frames t - 2, t, t + 2 only."""
    b = block(layer_norm_first=layer_norm_first)
    x = torch.randn(15, 1, 8)
    y = x.clone()
    y[7] += torch.randn(8)  # not a constant: a layer norm would remove it
    with torch.no_grad():
        changed = ((b(y)[0] - b(x)[0]).abs().amax(dim=(1, 2)) > 1e-6).nonzero().flatten().tolist()
    assert changed == [5, 7, 9]


def test_padding_changes_no_real_frame():
    """A padded batch gives each utterance the states it gets alone (padded frames are zeroed before
    the depthwise convolution, whatever they hold)."""
    b = block(kernel=5, dilation=1)
    a, c = torch.randn(12, 1, 8), torch.randn(7, 1, 8)
    batch = torch.cat([a, torch.cat([c, 100 * torch.randn(5, 1, 8)])], dim=1)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 7:] = True
    with torch.no_grad():
        out = b(batch, self_attn_padding_mask=pad)[0]
        torch.testing.assert_close(out[:, 0:1], b(a)[0])
        torch.testing.assert_close(out[:7, 1:2], b(c)[0])
        assert not torch.allclose(b(batch)[0][:7, 1], out[:7, 1])  # without the mask the padding leaks in


@pytest.mark.parametrize("model,layers,width", [("conv_narrow", 12, 384), ("tiny_conv", 12, 96)])
def test_presets_have_no_attention_and_about_the_narrow_students_size(corpus, model, layers, width):
    data, labels, _ = corpus
    narrow = "narrow" if model == "conv_narrow" else "tiny_narrow"
    counts = {}
    for name in (model, narrow):
        cfg = compose("dicehubert_narrow",
                      [f"task.data={data}", f"task.label_dir={labels}", "run=cpu", f"model={name}"])
        _, student, _ = build(cfg)
        counts[name] = sum(p.numel() for k, p in student.named_parameters()
                           if not k.startswith(("label_embs_concat", "final_proj")))
        if name == model:
            assert isinstance(student.encoder, ConvEncoder) and len(student.encoder.layers) == layers
            assert all(isinstance(layer, ConvBlock) for layer in student.encoder.layers)
            assert not any(isinstance(m, MultiheadAttention) for m in student.modules())
            assert student.encoder.embedding_dim == width
            assert [layer.depthwise.dilation[0] for layer in student.encoder.layers] == [1, 2, 4, 8, 16] * 2 + [1, 2]
            assert receptive_field(cfg.model) == 1 + 30 * 65 + cfg.model.conv_pos - 1
    assert 0.9 < counts[model] / counts[narrow] <= 1.0, counts


def test_conv_narrow_sees_the_whole_training_crop():
    """The preset's claim: every frame of a recipe crop (max_sample_size 250000 samples at 50 Hz) lies
    within the receptive field of every other frame of the crop (half the field on either side)."""
    cfg = compose("dicehubert_conv_narrow", ["task.data=D", "task.label_dir=L"])
    crop_frames = cfg.task.max_sample_size // 320
    assert (receptive_field(cfg.model) - 1) // 2 >= crop_frames - 1


@pytest.mark.parametrize("extra,fragment", [
    (["++model.depthwise_conv_kernel_size=4"], "must be odd"),
    (["++model.conv_encoder_dilations=[1,0]"], "dilations >= 1"),
    (["++model.conv_encoder_dilations=[]"], "dilations >= 1"),
])
def test_bad_settings_are_refused_when_built(corpus, extra, fragment):
    data, labels, _ = corpus
    with pytest.raises(InputError, match=fragment):
        build(tiny_student_cfg(data, labels, ["++model.layer_type=conv"] + extra))


def test_trains_on_the_ssl_loss(corpus):
    data, labels, _ = corpus
    task, model, crit = build(tiny_student_cfg(data, labels, ["++model.layer_type=conv"]))
    task.load_dataset("train")
    ds = task.datasets["train"]
    batch = ds.collater([ds[i] for i in range(2)])
    loss, sample_size, log = crit(model.train(), batch)
    loss.backward()
    assert torch.isfinite(loss) and sample_size > 0 and "loss_m_0" in log
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.layers.parameters())


def test_the_probe_runs_on_a_conv_student(tones, tmp_path, capsys, restore_process_state):
    """dicehubert-probe weighs the conv student's hidden states (transformer input + its 3 blocks)."""
    ckpt = str(tmp_path / "conv.pt")
    write_checkpoint(ckpt, tones["data"], tones["labels"], model="dicehubert_student", task="dicehubert",
                     model_overrides={"layer_type": "conv", "encoder_layers": 3, "depthwise_conv_kernel_size": 5,
                                      "conv_encoder_dilations": [1, 2]})
    out = tmp_path / "probe.json"
    code = probe_main(["--checkpoint", ckpt, "--data", tones["data"], "--json", str(out), "--epochs", "2",
                       "--max-train-utterances", "8", "--threads", "1", "-q"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["num_layers"] == 3 + 1 and len(result["layer_weights"]) == 4
    assert 0.0 <= result["per"] <= 1.5
