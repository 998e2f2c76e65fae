"""Atomic file writes, used for every checkpoint, adapter, log and prediction file this project writes.

The data goes to a temporary file beside the target, is flushed to disk, and is then renamed over the
target in one step: a reader (or a run interrupted half-way) sees the old file or the new one, never part
of one. On error the temporary file is removed and the target is untouched.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; when the block ends without error the file is fsynced,
    given the permissions a plainly created file would have, and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb") as file:
            os.fsync(file.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp creates 0600; the result should be readable like any file
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        if str(path) in str(error) or error.errno is None:
            raise
        raise naming(error, f"cannot write {path}") from error
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


@contextmanager
def atomic_write(path: PathLike, mode: str = "w") -> Iterator:
    """An open handle on the temporary file: "w" is UTF-8 text with "\\n" line ends, "wb" is binary."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
    with atomic_path(path) as temp, open(temp, mode, **text) as handle:
        yield handle


def check_writable(directory: PathLike) -> None:
    """Creates `directory` if needed and checks that a file can be written in it, so that a read-only or
    impossible output location is found before hours of work go into what would be written there."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise naming(error, f"cannot write in {directory}") from None


def naming(error: OSError, what: str) -> OSError:
    """The same OSError (same errno, same subclass) saying what failed: "[Errno 28] No space left on device"
    alone does not say which file."""
    return OSError(error.errno, f"{what}: {error.strerror or error}")


def atomic_save(write: Callable[[Path], object], path: PathLike) -> None:
    """Calls write(temp_path), for writers that take a path (torch.save, safetensors), then renames into place."""
    with atomic_path(path) as temp:
        write(temp)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory, which is harmless.
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
