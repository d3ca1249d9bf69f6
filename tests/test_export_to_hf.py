"""``--to hf``: the directory transformers loads, the config it maps, the report; the activation table."""

import json
import os
import re

import pytest
import torch
from fairseq import utils
from safetensors.torch import load_file
from transformers.activations import ACT2FN

from dicehubert_fairseq.export.cli import main
from dicehubert_fairseq.export.to_hf import ACTIVATIONS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_hf_directory_contents_and_report(export_models, tmp_path, capsys):
    out = tmp_path / "narrow_hf"
    code = main([export_models["narrow"], "--to", "hf", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hubert" and config["architectures"] == ["HubertModel"]
    assert (config["feat_extract_norm"], config["do_stable_layer_norm"], config["conv_bias"]) == ("group", False, False)
    assert (config["conv_dim"], config["conv_kernel"], config["conv_stride"]) == ([32] * 4, [10, 3, 3, 2], [5, 2, 2, 2])
    assert (config["num_conv_pos_embeddings"], config["num_conv_pos_embedding_groups"]) == (8, 4)
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (32, 3, 64)
    tensors = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith(("feat_heads", "final_proj", "label_embs")) for k in tensors)
    params = sum(t.numel() for t in tensors.values())
    size = sum(os.path.getsize(out / f) for f in os.listdir(out))
    assert f"parameters: {params:,}" in stdout and f"on disk: {size:,} bytes" in stdout, stdout
    assert "feat_heads (4 tensors" in stdout and "final_proj (2 tensors" in stdout and "label_embs_concat" in stdout
    assert re.search(r"check: max \|difference\| .* layers 1\.\.3: ", stdout), stdout
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left


def test_activation_mapping_computes_the_same_function():
    x = torch.linspace(-6, 6, 2001)
    for fairseq_name, hf_name in ACTIVATIONS.items():
        a = utils.get_activation_fn(fairseq_name)(x)
        b = ACT2FN[hf_name](x)
        assert torch.allclose(a, b, atol=1e-6), (fairseq_name, hf_name, float((a - b).abs().max()))
