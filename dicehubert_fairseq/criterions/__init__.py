"""Criteria. fairseq never scans a user dir's criterions/: the package imports them explicitly."""

from . import dicehubert  # noqa: F401
from . import dicehubert_feat  # noqa: F401
