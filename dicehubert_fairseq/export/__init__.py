"""``dicehubert-export``: students (and teachers) out of the plugin.

Targets (:func:`~dicehubert_fairseq.export.api.export_checkpoint`, one module each):

* ``hf`` (:mod:`.to_hf`): a ``transformers`` ``HubertModel`` directory;
* ``fairseq`` (:mod:`.to_fairseq`): a plain fairseq ``hubert`` checkpoint, loadable without
  this plugin and with ``torch.load(weights_only=True)``;
* ``s3prl`` (:mod:`.to_s3prl`): s3prl's converted HuBERT checkpoint (``hubert_local`` upstream).

Shared: :mod:`.source` (loading the source, plain configs, atomic output), :mod:`.check`
(every export is loaded back and compared layer by layer, the fairseq side through
:func:`dicehubert_fairseq.hidden_states.hidden_states`), :mod:`.hf_model` (HF directories as
upstreams, also for ``dicehubert-probe``).
Command line: :mod:`.cli`.
"""
