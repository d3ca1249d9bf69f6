import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end test, run with --runslow (make test-all)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Synthetic corpus (train 8 / valid 4 utterances) with random 50 Hz labels 'km' (K=20)."""
    from tests.helpers.data import write_corpus, write_random_labels

    root = tmp_path_factory.mktemp("corpus")
    data, labels = str(root / "data"), str(root / "labels")
    sizes = write_corpus(data)
    write_random_labels(labels, sizes)
    return {"data": data, "labels": labels, "sizes": sizes}


@pytest.fixture(scope="session")
def tiny_teacher(tiny_corpus, tmp_path_factory):
    """A randomly initialised fairseq `hubert` checkpoint (2 x 32) in fairseq's saved format."""
    from tests.helpers.data import write_checkpoint

    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    write_checkpoint(path, tiny_corpus["data"], tiny_corpus["labels"])
    return path


@pytest.fixture(scope="module")
def one_openmp_thread():
    """sklearn's OpenMP loops spin badly on 2 shared cores; one thread is much faster there."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield
