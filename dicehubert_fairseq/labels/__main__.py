"""``python -m dicehubert_fairseq.labels`` == ``dicehubert-labels``."""

import sys

from .cli import main

sys.exit(main())
