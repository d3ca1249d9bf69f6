"""dicehubert_fairseq.checkpoint: a checkpoint with a ``.sha256`` file beside it is verified at load."""

import hashlib
import shutil

import pytest

from dicehubert_fairseq.checkpoint import load_state, sha256_file, verify_checksum
from dicehubert_fairseq.errors import InputError


@pytest.fixture
def checked(tmp_path, tiny_teacher):
    path = tmp_path / "teacher.pt"
    shutil.copy(tiny_teacher, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "teacher.pt.sha256").write_text(f"{digest}  teacher.pt\n")
    return path, digest


def test_sha256_file_is_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(str(path)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_matching_checksum_loads(checked):
    path, digest = checked
    assert verify_checksum(str(path)) == digest
    assert "model" in load_state(str(path))


def test_no_checksum_file_loads_unverified(tiny_teacher):
    assert verify_checksum(tiny_teacher) is None
    assert "model" in load_state(tiny_teacher)


def test_a_changed_byte_stops_the_load_naming_both_files(checked):
    path, digest = checked
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch might still load it, the checksum does not
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as e:
        load_state(str(path))
    msg = str(e.value)
    assert f"{path}: SHA-256 " in msg and f"{path}.sha256 ({digest})" in msg and "corrupt" in msg


def test_a_malformed_checksum_file_names_its_line(checked):
    path, _ = checked
    (path.parent / "teacher.pt.sha256").write_text("not-a-digest teacher.pt\n")
    with pytest.raises(InputError, match=r"teacher\.pt\.sha256:1: expected a SHA-256 checksum .*'not-a-digest"):
        load_state(str(path))
