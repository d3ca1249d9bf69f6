#!/usr/bin/env python3
"""Check a corpus for the tiny pipeline before anything is trained.

``DIR`` must hold, for each of the splits (default train, valid, test), a fairseq manifest
``{split}.tsv`` with at least one utterance whose audio exists, and ``{split}.phn`` with one
line of space-separated phones per manifest row.  Every problem is listed, one line each,
naming the file (and line); exit status 1 if there is any.

Example::

    python examples/tiny/check_corpus.py work/ --splits train,valid,test
"""

import argparse
import os
import sys
from typing import List


def check(directory: str, splits: List[str]) -> List[str]:
    """Every problem of the corpus in ``directory``, one message each (empty: fine)."""
    from dicehubert_fairseq.data.files import read_manifest
    from dicehubert_fairseq.errors import InputError
    from dicehubert_fairseq.probe.transcripts import read_transcripts

    problems: List[str] = []
    for split in splits:
        tsv = os.path.join(directory, f"{split}.tsv")
        phn = os.path.join(directory, f"{split}.phn")
        try:
            manifest = read_manifest(tsv)
        except InputError as e:
            problems.extend(e.problems)
            if not os.path.isfile(phn):
                problems.append(f"{phn}: phone transcripts not found (expected one line of space-separated "
                                f"phones per row of {tsv})")
            continue
        if len(manifest) == 0:
            problems.append(f"{tsv}: split '{split}' is empty (the manifest lists no utterances; "
                            f"expected at least one)")
        missing = [n for n in manifest.names if not os.path.isfile(os.path.join(manifest.root, n))]
        for name in missing[:5]:
            problems.append(f"{tsv}: audio file {os.path.join(manifest.root, name)} not found")
        if len(missing) > 5:
            problems.append(f"{tsv}: ... and {len(missing) - 5} more missing audio files")
        try:
            read_transcripts(phn, manifest)
        except InputError as e:
            problems.extend(e.problems)
    return problems


def main(argv=None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)  # before fairseq's import logs its optional packages
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory")
    p.add_argument("--splits", default="train,valid,test")
    args = p.parse_args(argv)
    problems = check(args.directory, [s for s in args.splits.split(",") if s])
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"error: {args.directory}: not a usable corpus ({len(problems)} problem(s)); nothing was trained",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
