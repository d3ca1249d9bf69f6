"""fairseq's import-time chatter, kept out of this project's output.

Importing fairseq imports every task module it ships. ``fairseq/tasks/text_to_speech.py`` then
logs "Please install tensorboardX: pip install tensorboardX" at INFO, after
``fairseq/models/wav2vec/wav2vec2_classification.py`` has called ``logging.basicConfig`` at DEBUG,
so every command that imports fairseq printed that line first. tensorboardX is an optional
dependency of fairseq's text-to-speech task, which this plugin never runs. A filter on that one
logger drops that one message at INFO and below; everything else it logs, warnings and errors
included, passes.

The package imports this module before anything imports fairseq.
"""

import logging

#: The fairseq logger, and the start of the message dropped from it.
LOGGER, MESSAGE = "fairseq.tasks.text_to_speech", "Please install tensorboardX"


class DropChatter(logging.Filter):
    """Drops the records at INFO or below whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and record.getMessage().startswith(self.prefix))


def install() -> None:
    """Add the filter to fairseq's logger (idempotent)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, DropChatter) for f in logger.filters):
        logger.addFilter(DropChatter(MESSAGE))


install()
