"""Export one checkpoint to one target, atomically, checked."""

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..checkpoint import load_source
from ..errors import InputError
from . import check as checks, to_fairseq, to_hf, to_s3prl
from .output import atomic_output, check_output, count_parameters, describe_dropped, disk_size

logger = logging.getLogger(__name__)

#: target -> whether it writes a directory (hf) rather than one file
TARGETS = {"hf": True, "fairseq": False, "s3prl": False}


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote.

    Attributes:
        target: ``hf``, ``fairseq`` or ``s3prl``.
        out: the file or directory written.
        source: the source description (model name, layers x width).
        parameters: parameters of the exported model.
        bytes: size on disk of ``out``.
        dropped: human-readable list of the source tensors left out.
        dropped_parameters: how many parameters those hold.
        check: ``{"max_abs": [per layer, then final], "ok": bool}``, or None if not checked.
    """

    target: str
    out: str
    source: str
    parameters: int
    bytes: int
    dropped: str
    dropped_parameters: int
    check: Optional[Dict[str, object]] = None
    files: List[str] = field(default_factory=list)


def export_checkpoint(checkpoint: str, target: str, out: str, force: bool = False, check: bool = True) -> ExportResult:
    """Export a HuBERT-family checkpoint for use outside this plugin.

    Args:
        checkpoint: a ``dicehubert_student`` or fairseq ``hubert`` checkpoint.
        target: ``hf`` (a transformers directory), ``fairseq`` (a plain ``hubert`` checkpoint) or
            ``s3prl`` (s3prl's converted HuBERT checkpoint).
        out: the directory (hf) or file to write.
        force: replace an existing ``out``.
        check: load what was written and compare every layer's output with the source on
            random audio (see :mod:`dicehubert_fairseq.export.check`) before it gets its name.

    Returns:
        an :class:`ExportResult`.

    Raises:
        InputError: bad checkpoint, existing output without ``force``, a model the target
            cannot represent, or an export whose check fails.  Nothing is left under ``out``.
    """
    if target not in TARGETS:
        raise InputError([f"--to {target}: unknown target (expected one of {sorted(TARGETS)})"])
    directory = TARGETS[target]
    check_output(out, force, directory)
    source = load_source(checkpoint)
    if target == "hf":
        to_hf.hf_config_kwargs(source)  # refuse what HubertModel cannot represent before writing anything
        write = to_hf.write_hf
    elif target == "fairseq":
        write = to_fairseq.write_fairseq
    else:
        problems = to_s3prl.refusals(source)
        if problems:
            raise InputError(problems)
        write = to_s3prl.write_s3prl
    result = None
    with atomic_output(out, directory) as tmp:
        info = write(source, tmp)
        if check:
            result = checks.run_check(target, source, tmp)
            if result is not None and not result["ok"]:
                worst = max(result["max_abs"])
                raise InputError([f"{checkpoint}: the exported {target} model differs from the source by up to "
                                  f"{worst:.3g} (more than {checks.TOLERANCE:g}) on random audio; nothing written to {out}"])
        files = sorted(os.listdir(tmp)) if directory else [os.path.basename(out)]
    dropped = info["dropped"]
    return ExportResult(target=target, out=out, source=source.describe(), parameters=int(info["parameters"]),
                        bytes=disk_size(out), dropped=describe_dropped(dropped),
                        dropped_parameters=count_parameters(dropped), check=result, files=files)
