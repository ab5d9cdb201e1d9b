"""Run one of the project's scripts as native Windows would meet it, on Linux or macOS:
no fcntl (msvcrt's byte-range locks instead), fsync refused on a handle opened read-only,
os.open refused on a folder, and every rename refused once, as while another program has
its target open. `python tests/windows_like.py train.py ARGS...` counts on stderr, at the
end, what it refused."""

from __future__ import annotations

import atexit
import errno
import importlib
import os
import runpy
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _locking(fd: int, mode: int, nbytes: int) -> None:
    """msvcrt.locking: lock `nbytes` from the file's position; EACCES where another holds them."""
    if mode != msvcrt.LK_NBLCK:
        raise NotImplementedError(mode)
    try:
        flags = _posix_fcntl.LOCK_EX | _posix_fcntl.LOCK_NB
        _posix_fcntl.lockf(fd, flags, nbytes, os.lseek(fd, 0, os.SEEK_CUR))
    except BlockingIOError:
        raise PermissionError(errno.EACCES, "Permission denied") from None


msvcrt = types.ModuleType("msvcrt")  # a stand-in for Windows' module, with what files.py uses
msvcrt.LK_NBLCK, msvcrt.locking = 2, _locking
_posix_fcntl = importlib.import_module("fcntl")  # the real one, which the scripts will not find


def simulate_windows() -> dict[str, int]:
    """Make this process meet what Windows refuses; return the counts of what was refused."""
    for module in ("asyncio", "getpass", "multiprocessing", "subprocess"):  # these take an
        importlib.import_module(module)  # importable msvcrt for Windows: loaded before it is
    sys.modules["msvcrt"] = msvcrt
    sys.modules["fcntl"] = None  # import fcntl: ModuleNotFoundError, as on Windows
    refused = {"fsync": 0, "open a folder": 0, "replace": 0}
    read_only: set[int] = set()
    replaced: set[str] = set()
    real_open, real_close, real_fsync, real_replace = os.open, os.close, os.fsync, os.replace

    def open_(path, flags, *args, **kwargs) -> int:
        if os.path.isdir(path):  # Windows cannot open a folder
            refused["open a folder"] += 1
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        fd = real_open(path, flags, *args, **kwargs)
        read_only.add(fd) if flags & (os.O_WRONLY | os.O_RDWR) == 0 else read_only.discard(fd)
        return fd

    def close(fd: int) -> None:
        read_only.discard(fd)
        real_close(fd)

    def fsync(fd) -> None:
        if isinstance(fd, int) and fd in read_only:  # Windows' _commit needs a handle that may write
            refused["fsync"] += 1
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_fsync(fd)

    def replace(source, target, **kwargs) -> None:
        if str(target) not in replaced:  # once for each target: a virus scanner had it open
            replaced.add(str(target))
            refused["replace"] += 1
            raise PermissionError(errno.EACCES, "Access is denied", str(source), None, str(target))
        real_replace(source, target, **kwargs)

    os.open, os.close, os.fsync, os.replace = open_, close, fsync, replace
    return refused


if __name__ == "__main__":
    refusals = simulate_windows()
    atexit.register(lambda: print(f"windows_like refused: {refusals}", file=sys.stderr))
    script = ROOT / sys.argv[1]
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path[0] = str(ROOT)
    runpy.run_path(str(script), run_name="__main__")
