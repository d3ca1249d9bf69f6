"""The console scripts start without fairseq's import chatter, and still show what fairseq warns about.

``import fairseq`` prints "Please install tensorboardX" (its text-to-speech task, on a root
logger its wav2vec2 classification module configured at DEBUG); the package drops exactly that
message (:mod:`dicehubert_fairseq._import_chatter`), before anything imports fairseq.
"""

import logging
import subprocess
import sys

from dicehubert_fairseq._import_chatter import LOGGER, MESSAGE, DropChatter
from tests.helpers.runs import REPO, subprocess_env


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=300)


def test_fairseq_alone_prints_it():
    """Why the filter exists: if fairseq stops printing it, the filter can go."""
    assert MESSAGE in _python("import fairseq").stderr


def test_console_scripts_start_without_it_and_fairseq_still_warns():
    """``dicehubert-labels`` as a process prints its help and nothing else; in one process, the
    probe's and the export's CLIs too, and fairseq's text-to-speech logger still gets through with
    anything else: another message, a warning, an error."""
    proc = subprocess.run([sys.executable, "-m", "dicehubert_fairseq.labels", "--help"], cwd=REPO,
                          env=subprocess_env(PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "usage: dicehubert-labels" in proc.stdout and proc.stderr == ""
    code = ("import contextlib, io, logging, sys\n"
            "from dicehubert_fairseq.probe.cli import main as probe\n"
            "from dicehubert_fairseq.export.cli import main as export\n"
            "for main in (probe, export):\n"
            "    out = io.StringIO()\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):\n"
            "        main(['--help'])\n"
            "    print(out.getvalue().splitlines()[0])\n"
            "sys.stderr.write('--- after the imports\\n')\n"
            f"log = logging.getLogger({LOGGER!r})\n"
            f"log.info({MESSAGE!r} + ': again')\n"
            "log.info('another message')\n"
            f"log.warning({MESSAGE!r} + ': as a warning')\n"
            "log.error('a real error')\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe_usage, export_usage = proc.stdout.splitlines()
    assert probe_usage.startswith("usage: dicehubert-probe") and export_usage.startswith("usage: dicehubert-export")
    before, after = proc.stderr.split("--- after the imports\n")
    assert before == ""  # nothing printed while importing
    assert MESSAGE + ": again" not in after
    assert "another message" in after and MESSAGE + ": as a warning" in after and "a real error" in after


def test_filter_by_hand():
    f = DropChatter("Please install")

    def record(level, msg):
        return logging.LogRecord("x", level, __file__, 1, msg, None, None)

    assert not f.filter(record(logging.INFO, "Please install it"))
    assert not f.filter(record(logging.DEBUG, "Please install it"))
    assert f.filter(record(logging.WARNING, "Please install it"))
    assert f.filter(record(logging.INFO, "Something else"))
