"""What every script here shares: a quiet start, flags with their defaults in --help,
one-line errors (exit code 2 for bad input, no traceback), and files written whole.

Import it before TensorFlow (ruff's isort keeps it first): it loads TensorFlow quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

TF_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: C++ libraries write there, not to sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    _fd2_to_devnull()
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _fd2_to_devnull() -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)


def hide_native_logs() -> None:
    """From now on, keep Python's stderr (our lines, a traceback) but send what C++ writes to
    fd 2 to /dev/null: a multi-worker run logs its cluster, and a lost worker in pages of
    gRPC errors. Not where TF_CPP_MIN_LOG_LEVEL is 0 or 1."""
    if os.environ[TF_LOG_LEVEL] in ("0", "1"):
        return
    sys.stderr.flush()
    sys.stderr = open(os.dup(2), "w", buffering=1, errors="backslashreplace")  # noqa: SIM115
    _fd2_to_devnull()


def _load_tensorflow_quietly() -> None:
    """Load TensorFlow and find its devices without its C++ start-up logs (oneDNN and
    CUDA notices), and log only its errors from then on; TF_CPP_MIN_LOG_LEVEL=0 or 1
    keeps every line."""
    os.environ.setdefault(TF_LOG_LEVEL, "2")
    if os.environ[TF_LOG_LEVEL] in ("0", "1"):
        return
    with _stderr_silenced():
        import tensorflow as tf

        tf.config.list_physical_devices()
    tf.get_logger().setLevel("WARNING")  # where Python is interactive (Jupyter) it says INFO too


_load_tensorflow_quietly()


class ScriptError(Exception):
    """Ends a script with one line on stderr and `exit_code`, without a traceback."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    def _render_traceback_(self) -> list[str]:
        """What a Jupyter kernel (IPython) shows for it: the one line, not a traceback."""
        return [f"{type(self).__name__}: {self}"]


class UserError(ScriptError):
    """A problem with what the user gave us (a path, a file, a flag), not a bug."""

    exit_code = 2


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        # A help that explains its own default keeps it, rather than "(default: None)".
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that shows defaults in --help and reports a bad flag in one line."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the flags typed on the command line, as opposed to defaults."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:  # argparse has no public way to tell the two apart
        action.default = argparse.SUPPRESS
    probe._defaults.clear()  # set_defaults() values are not typed flags either
    return set(vars(probe.parse_known_args(argv)[0]))


def _number(kind: type, minimum: float, what: str,
            maximum: float = math.inf) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not minimum <= value <= maximum:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


positive_int = _number(int, 1, "a whole number >= 1")
non_negative_int = _number(int, 0, "a whole number >= 0")
seed_int = _number(int, 0, "a whole number from 0 to 2**32 - 1", maximum=2**32 - 1)
positive_float = _number(float, sys.float_info.min, "a finite number > 0", maximum=sys.float_info.max)


def int_between(low: int, high: int) -> Callable[[str], int | float]:
    """A flag's type: a whole number from `low` to `high`."""
    return _number(int, low, f"a whole number from {low} to {high}", maximum=high)


def run(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a script's main(); a ScriptError (bad input: exit code 2) ends it in one line."""
    prog = Path(sys.argv[0]).name
    _flush_every_line()
    try:
        main(argv)
    except ScriptError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _flush_every_line() -> None:
    """Let progress reach a log file or a pipe as it happens, not in 8 KiB blocks."""
    if hasattr(sys.stdout, "reconfigure"):  # a notebook's stdout has no such method
        sys.stdout.reconfigure(line_buffering=True)


def setup_script_without_main() -> None:
    """What run() gives a main(), for a script with none to wrap (the notebook): output
    that reaches a log as it happens, and a ScriptError ends it with one line on stderr
    (exit code 1) instead of a traceback."""
    _flush_every_line()
    default_hook = sys.excepthook

    def hook(kind, error, traceback) -> None:
        if issubclass(kind, ScriptError):
            print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        else:
            default_hook(kind, error, traceback)

    sys.excepthook = hook


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


def peak_memory_gib() -> float | None:
    """This process's peak resident memory (RSS) so far, in GiB; None where unknown."""
    try:
        import resource  # Unix only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes there, KiB here
