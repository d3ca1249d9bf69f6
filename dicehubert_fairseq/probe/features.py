"""The probe's upstream features: every hidden state of a frozen HuBERT-family model, cached.

The upstream (a fairseq ``hubert`` or our ``dicehubert_student`` checkpoint) is frozen, so the
hidden states of every utterance are extracted once, in one forward pass
(:func:`~dicehubert_fairseq.hidden_states.hidden_states`; for a Hugging Face directory its
counterpart :func:`~dicehubert_fairseq.export.hf_model.hf_hidden_states`), and cached in memory:

* hidden state 0: the conv front end's features after its layer norm and ``post_extract_proj``
  (the transformer's input, as s3prl's HuBERT upstream takes it);
* hidden states 1..L: the output of every transformer layer.

Each hidden state is layer-normalised (no affine; s3prl's ``Featurizer(normalize=True)``) when
cached, in the project's :class:`~dicehubert_fairseq.feature_cache.FeatureCache` (one row per
utterance, ``L + 1`` states per frame).
"""

import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..data.audio import read_audio
from ..data.files import Manifest
from ..errors import InputError, where
from ..feature_cache import FeatureCache
from ..export.hf_model import hf_hidden_states, hidden_dim, is_hf_model
from ..frames import conv_layers, conv_output_length
from ..hidden_states import hidden_states


def num_hidden_states(model: nn.Module) -> int:
    """Hidden states the probe weighs: the transformer input plus one per transformer layer."""
    return len(model.encoder.layers) + 1


def cache_bytes(model: nn.Module, manifests: Sequence[Manifest], num_states: Optional[int] = None) -> int:
    """Bytes of float32 hidden states :func:`extract_split` would cache for ``manifests``
    (``num_states`` of them per frame; default: all of the model's)."""
    layers = conv_layers(model)
    frames = sum(conv_output_length(size, layers) for m in manifests for size in m.sizes)
    states = num_hidden_states(model) if num_states is None else num_states
    return frames * states * hidden_dim(model) * 4


def extract_split(
    model: nn.Module,
    manifest: Manifest,
    device: str = "cpu",
    normalize_waveform: bool = False,
    sample_rate: int = 16000,
    limit: Optional[int] = None,
    desc: str = "",
    layers: Optional[Sequence[int]] = None,
) -> FeatureCache:
    """Extract and cache the layer-normalised hidden states of every utterance of a manifest.

    Args:
        model: frozen HuBERT-family model on ``device`` (fairseq, or a transformers ``HubertModel``).
        manifest: the split (audio checked: readable, mono, as long as the manifest says).
        device: where the model runs.
        normalize_waveform: layer-normalise each waveform first (the task's ``normalize``, as
            fairseq's ``HubertDataset`` does for models trained with it).
        sample_rate: the rate every file must have.
        limit: only the first ``limit`` utterances.
        desc: progress-bar label.
        layers: the hidden states to keep (indices ``0..L``, 0 = transformer input); None: all.

    Returns:
        a :class:`FeatureCache` on the CPU, ``feats`` ``(len(layers), N, D)`` (``(L + 1, N, D)``
        when ``layers`` is None) allocated once.
    """
    n = len(manifest) if limit is None else min(limit, len(manifest))
    conv = conv_layers(model)
    lengths = [conv_output_length(size, conv) for size in manifest.sizes[:n]]
    keep = list(range(num_hidden_states(model))) if layers is None else list(layers)
    cache = FeatureCache(sum(lengths), hidden_dim(model), len(keep))
    states = hf_hidden_states if is_hf_model(model) else hidden_states
    for i in tqdm(range(n), desc=f"features {desc}".strip(), unit="utt", leave=False, disable=None):
        wav = torch.from_numpy(read_audio(manifest, i, sample_rate)).to(device)[None]
        if normalize_waveform:
            wav = F.layer_norm(wav, wav.shape)
        with torch.inference_mode():
            out = states(model, wav)
        states_all = [out.features[0]] + [layer[0] for layer in out.layers]  # L + 1 of (T, D)
        h = torch.stack([states_all[k] for k in keep])
        if h.shape[1] != lengths[i]:
            raise InputError([f"{where(manifest.path, i + 2)}: {manifest.audio_path(i)} gave {h.shape[1]} frames, "
                              f"expected {lengths[i]} for the {manifest.sizes[i]} samples the manifest lists"])
        cache.add(i, F.layer_norm(h.float(), h.shape[-1:]).cpu())
    return cache


def physical_memory_bytes() -> Optional[int]:
    """Physical memory of this machine, if the OS says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
