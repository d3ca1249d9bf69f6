"""The project's Markdown documents point only inside the repository, at files that exist."""

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: README.md, docs/, examples/ and benchmarks/: every document a user reads.
DOCS = sorted({os.path.relpath(p, REPO) for pattern in ("README.md", "docs/**/*.md", "examples/**/*.md",
                                                         "benchmarks/**/*.md")
               for p in glob.glob(os.path.join(REPO, pattern), recursive=True)
               if "/work/" not in os.path.relpath(p, REPO).replace(os.sep, "/") + "/"})
LINK = re.compile(r"\]\(([^)\s]+)\)")               # [text](target)
RELATIVE_PATH = re.compile(r"`(\.\./[^`\s]+)`")    # `../somewhere` in running text


def local_targets(text):
    """Relative file targets of Markdown links and of backticked ``../`` paths (URLs and anchors skipped)."""
    targets = [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    return [t.split("#")[0] for t in targets + RELATIVE_PATH.findall(text)]


def test_the_documents_are_found():
    assert {"README.md", "docs/ablations.md", "examples/librispeech/README.md", "benchmarks/README.md"} <= set(DOCS)


def test_local_targets_are_parsed():
    text = "see [a](docs/a.md#x), [b](https://arxiv.org/abs/1), [c](#anchor) and `../../elsewhere/N.md`"
    assert local_targets(text) == ["docs/a.md", "../../elsewhere/N.md"]


@pytest.mark.parametrize("doc", DOCS)
def test_no_link_leaves_the_repository(doc):
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        text = f.read()
    for target in local_targets(text):
        path = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), target))
        assert os.path.commonpath([REPO, path]) == REPO, f"{doc}: {target} points outside the repository"
        assert os.path.exists(path), f"{doc}: {target} does not exist"


TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)((?:::\w+)?)`")   # `tests/x.py` or `tests/x.py::test_name`


@pytest.mark.parametrize("doc", DOCS)
def test_cited_tests_exist(doc):
    """A document that names a test (``tests/x.py::test_y``) names one that exists."""
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        text = f.read()
    for path, name in TEST_REFERENCE.findall(text):
        assert os.path.isfile(os.path.join(REPO, path)), f"{doc}: {path} does not exist"
        if name:
            with open(os.path.join(REPO, path), encoding="utf-8") as f:
                assert f"def {name[2:]}(" in f.read(), f"{doc}: {path}{name} does not exist"
