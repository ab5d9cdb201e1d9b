"""Files and folders written whole: a kill, a full disk or a power cut while writing
leaves the old file (or none), never half of one; and output folders checked first."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from machinery.cli import UserError


def ensure_out_dir(path: str | os.PathLike, flag: str = "--out-dir") -> Path:
    """Create the output folder, or say in one line why it cannot be used (named as `flag`)."""
    out_dir = Path(path)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{flag} {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test.{os.getpid()}"  # os.access would not see a read-only mount
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UserError(f"{flag} {out_dir} is not writable ({error.strerror})") from None
    return out_dir


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only once written.

    A crash, a kill or a power cut while writing leaves the old file (or none), never
    half a file: the data is synced to disk before the rename, and the rename after it.
    """
    path = Path(path)
    # Keep the real suffix last so that writers which go by it (savefig, imageio) still can.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """atomic_path for a folder: yield a temporary folder beside `path`; once written and
    synced, it takes the place of the old one, which is then deleted (or put back, if the
    new one cannot take its place). A kill in between leaves the old one as .*.tmp.old."""
    path = Path(path)
    tmp, old = (path.with_name(f".{path.name}.{os.getpid()}.tmp.{end}") for end in ("new", "old"))
    try:
        yield tmp
        for written in sorted(tmp.rglob("*"), reverse=True):  # files, then their folders
            _fsync(written)
        _fsync(tmp)
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():
                os.replace(old, path)
            raise
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
