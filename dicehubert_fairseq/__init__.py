"""DiceHuBERT as a fairseq user-dir plugin.

Importing this package registers, with fairseq:

* task ``dicehubert`` (:mod:`dicehubert_fairseq.tasks.dicehubert`),
* model ``dicehubert_student`` (:mod:`dicehubert_fairseq.models.dicehubert_student`),
* criteria ``dicehubert`` and ``dicehubert_feat`` (:mod:`dicehubert_fairseq.criterions`),

and allow-lists the few Python objects that fairseq checkpoints pickle, so that
``torch.load`` (``weights_only=True`` since torch 2.6) reads HuBERT teachers, students and
``checkpoint_last.pt`` without any environment variable. fairseq's import-time advice to install
tensorboardX (for a task this plugin never runs) is kept out of the output
(:mod:`~dicehubert_fairseq._import_chatter`).
"""

from . import _import_chatter  # noqa: F401  (first: before anything imports fairseq)
from . import _compat  # noqa: F401  (must come before anything loads a checkpoint)
from . import _distributed  # noqa: F401  (fairseq's CUDA-only all_gather_list, made to work under gloo)
from . import criterions, models, tasks  # noqa: F401  (fairseq never scans criterions/)

__version__ = "0.1.0"
