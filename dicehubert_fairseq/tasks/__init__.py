"""Tasks (fairseq imports every module here that does not start with ``_``)."""

from . import dicehubert  # noqa: F401
