"""Phoneme-recognition probe (SUPERB PR style) of frozen HuBERT-family checkpoints.

Library: :mod:`dicehubert_fairseq.probe.probe`; command line: ``dicehubert-probe``
(:mod:`dicehubert_fairseq.probe.cli`).
"""

from .probe import (  # noqa: F401
    BLANK,
    UNK,
    FeatureCache,
    PhoneSplit,
    ProbeConfig,
    WeightedLayerCTCHead,
    ctc_greedy_decode,
    edit_distance,
    extract_hidden_states,
    phone_error_rate,
    run_probe,
)
