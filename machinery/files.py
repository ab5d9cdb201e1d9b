"""Files and folders written whole: a kill, a full disk or a power cut while writing
leaves the old file (or none), never half of one; output folders checked first, and held
by one run at a time. The same on Linux, macOS and Windows."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
import typing
import zipfile
from collections.abc import Iterator
from pathlib import Path

from machinery import cli
from machinery.cli import UserError

import tensorflow as tf

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range locks instead
    fcntl = None
    import msvcrt

# Where a run exports its trained model (export.py): Keras' own format, and a SavedModel.
KERAS_FILE = "cvae.keras"
SAVEDMODEL_DIR = "cvae_savedmodel"
LOCK_FILE = ".run.lock"  # holds the PID of the process that holds the folder (hold_folder)
LOCKED_BYTE = 4096  # where Windows' lock sits: past the PID, which other processes then can read
REPLACE_WAITS = (0.05, 0.1, 0.2, 0.5, 1, 2)  # seconds to wait, in turn, while Windows refuses a rename
_HELD: dict[Path, typing.IO] = {}  # the folders this process holds, and their open lock files


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
        _sync_file(tmp)
        replace(tmp, path)
        _sync_folder(path.parent)
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
            _sync_folder(written) if written.is_dir() else _sync_file(written)
        _sync_folder(tmp)
        if path.exists():
            replace(path, old)
        try:
            replace(tmp, path)
        except OSError:
            if old.exists():
                replace(old, path)
            raise
        _sync_folder(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def replace(source: Path, target: Path) -> None:
    """os.replace, tried again for a few seconds while it is refused: on Windows, another
    program that has the target open (a spreadsheet, a virus scanner) blocks it for a while."""
    for wait in (*REPLACE_WAITS, None):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if wait is None:
                raise
            time.sleep(wait)


def _sync_file(path: Path) -> None:
    """Flush a file's data to disk, through a handle that may write (Windows needs one)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(path: Path) -> None:
    """Flush a folder's entries (a rename) to disk; skipped on Windows, which cannot open a
    folder and whose file system (NTFS) journals renames itself."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    except OSError as error:  # some file systems (WSL2's /mnt/c, SMB) cannot sync a folder
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _read_start(file: typing.IO) -> bytes:
    """The first bytes of an open file, read past Python's buffer."""
    os.lseek(file.fileno(), 0, os.SEEK_SET)
    return os.read(file.fileno(), 32)


def hold_folder(folder: Path) -> str | None:
    """Hold `folder` for the rest of this process: a lock on its .run.lock, which the system
    lets go of when the process ends, even killed. None once held; else the PID of the
    process that holds it ("?" if unknown)."""
    if folder.resolve() in _HELD:  # a notebook run again, in the same kernel
        return None
    lock = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 (kept open: it is the lock)
    try:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(lock.fileno(), LOCKED_BYTE, os.SEEK_SET)
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
    except (BlockingIOError, PermissionError):  # held: PermissionError on Windows
        try:  # the first bytes alone: Windows refuses a read of the locked one
            holder = _read_start(lock)
        except OSError:
            holder = b""
        lock.close()
        return holder.decode(errors="replace").strip() or "?"
    lock.truncate(0)
    lock.seek(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _HELD[folder.resolve()] = lock
    return None


def load_keras_model(path: str | os.PathLike, file_name: str, kind: type) -> typing.Any:
    """The `kind` of Keras model saved in `path`, a run folder holding `file_name` or the file
    itself; or one line (UserError) saying why it cannot be had."""
    path = Path(path)
    file = path / file_name if path.is_dir() else path
    if not file.is_file():
        where = f"{path} holds no {file_name}" if path.is_dir() else f"{path}: no such file or folder"
        raise UserError(f"{where}; a run exports one at its end, and python export.py "
                        f"--out-dir RUN exports one from a run's checkpoints")
    try:
        model = tf.keras.models.load_model(file)
    except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as error:
        raise UserError(f"{file} is not a Keras .keras archive of a model "
                        f"({cli.first_line(error)})") from None
    if not isinstance(model, kind):
        raise UserError(f"{file} holds a {type(model).__name__}, not a {kind.__name__}")
    return model
