"""What every script shares: flags with their defaults in --help, and one-line errors
(exit code 2 for bad input; 1 for a device's error, such as a GPU out of memory)."""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from machinery import TF_LOG_LEVEL

# What TensorFlow's messages say when a GPU's cuDNN fails (often for want of memory).
CUDNN_FAILURES = ("cudnn", "dnn library", "no algorithm worked", "convolution algorithm")


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
non_negative_float = _number(float, 0, "a finite number >= 0", maximum=sys.float_info.max)
positive_float = _number(float, sys.float_info.min, "a finite number > 0", maximum=sys.float_info.max)
fraction = _number(float, sys.float_info.min, "a number between 0 and 1", maximum=1 - sys.float_info.epsilon)


def int_between(low: int, high: int) -> Callable[[str], int | float]:
    """A flag's type: a whole number from `low` to `high`."""
    return _number(int, low, f"a whole number from {low} to {high}", maximum=high)


def run(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a script's main(); a ScriptError ends it in one line, with its exit code (2 for
    a UserError, bad input), a device's error (out of memory) with 1 and Ctrl-C with 130."""
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
    except Exception as error:
        if not (problem := device_error(error)):
            raise
        print(f"{prog}: error: {problem}", file=sys.stderr)
        sys.exit(1)


def device_error(error: BaseException) -> str | None:
    """What a device's error means, in one line with what to try: out of memory, or the GPU's
    cuDNN failing; None for any other error."""
    import tensorflow as tf  # imported here, where a script has loaded it, not to load it first

    if not isinstance(error, tf.errors.OpError):
        return None
    text = " ".join(str(error).split())
    lowered = text.lower()
    where = "the GPU" if re.search(r"device:GPU|GPU_\d", text) else "the machine"
    out_of_memory = re.search(r"\bOOM\b", text) or "out of memory" in lowered
    if isinstance(error, tf.errors.ResourceExhaustedError) and out_of_memory:
        return (f"{where} ran out of memory ({text[:120]}); free it (another notebook or script may "
                f"hold it), or train with a smaller --batch-size")
    if any(words in lowered for words in CUDNN_FAILURES):
        return (f"the GPU's cuDNN failed ({text[:120]}); often its memory is short (free it, or train "
                f"with a smaller --batch-size) or CUDA and cuDNN do not match this TensorFlow")
    return None


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _flush_every_line() -> None:
    """Let progress reach a log file or a pipe as it happens, not in 8 KiB blocks."""
    if hasattr(sys.stdout, "reconfigure"):  # a notebook's stdout has no such method
        sys.stdout.reconfigure(line_buffering=True)


def hide_native_logs() -> None:
    """From now on, keep Python's stderr (our lines, a traceback) but send what C++ writes to
    fd 2 to /dev/null: a multi-worker run logs its cluster, and a lost worker in pages of
    gRPC errors. Not where TF_CPP_MIN_LOG_LEVEL is 0 or 1."""
    if os.environ[TF_LOG_LEVEL] in ("0", "1"):
        return
    sys.stderr.flush()
    sys.stderr = open(os.dup(2), "w", buffering=1, errors="backslashreplace")  # noqa: SIM115
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)


def peak_memory_gib() -> float | None:
    """This process's peak resident memory (RSS) so far, in GiB; None where unknown."""
    try:
        import resource  # Unix only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes there, KiB here
