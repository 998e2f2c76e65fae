"""data.atomic: files are replaced whole or not at all, with plain file permissions."""
from __future__ import annotations

import os
import re

from pathlib import Path

import pytest

from data import readers
from data.atomic import atomic_save


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "f.bin"
    with readers.atomic_write(target, "wb") as handle:
        handle.write(b"one")
    with readers.atomic_write(target, "wb") as handle:
        handle.write(b"two")
    assert target.read_bytes() == b"two" and list(target.parent.iterdir()) == [target]


def test_atomic_save_gives_plain_file_permissions_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "weights.bin"
    atomic_save(lambda temp: temp.write_bytes(b"tensor"), target)
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_bytes() == b"tensor"
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def half_written(temp):
        temp.write_bytes(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_save(half_written, target)
    assert target.read_bytes() == b"tensor" and list(tmp_path.iterdir()) == [target]


def test_a_failed_write_names_the_file_and_leaves_nothing_behind(tmp_path):
    def disk_full(temp):
        Path(temp).write_bytes(b"part")
        raise OSError(28, "No space left on device")

    target = tmp_path / "checkpoint.pt"
    with pytest.raises(OSError, match=rf"\[Errno 28\] cannot write {re.escape(str(target))}: No space left on device"):
        atomic_save(disk_full, target)
    assert list(tmp_path.iterdir()) == []
