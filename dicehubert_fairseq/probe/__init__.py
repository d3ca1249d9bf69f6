"""Phoneme-recognition probe (SUPERB PR style) of frozen HuBERT-family checkpoints.

* :mod:`.transcripts` -- ``{split}.phn`` files: read, checked, encoded as phone ids;
* :mod:`.features` -- every hidden state of the frozen upstream, extracted once and cached;
* :mod:`.head` -- the weighted-layer CTC head: training, greedy decoding, phone error rate;
* :mod:`.run` -- :func:`~.run.run_probe`, the whole probe, and its :class:`~.run.ProbeConfig`;
* :mod:`.cli` -- the ``dicehubert-probe`` command (``python -m dicehubert_fairseq.probe``).
"""
