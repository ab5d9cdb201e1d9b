"""Faults: Ctrl-C or SIGTERM stop a run at the next step boundary with what is complete
kept; an error of the machine (a full disk, a folder gone, a GPU out of memory) or a lost
worker ends it in one line that says what is saved and how to resume."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from machinery import cli, run_folder

import tensorflow as tf

# Errors of the machine, not of the run: a full disk, a folder made read-only or gone
# (and a device's: cli.device_error).
MACHINE_ERRORS = (OSError, tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError,
                  tf.errors.NotFoundError, tf.errors.DataLossError)
ON_WINDOWS = os.name == "nt"  # where another program holding a file makes a write fail
# What a multi-worker run's collectives raise when a worker is gone, killed or silent.
LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                      tf.errors.AbortedError)


def ends_run(error: Exception) -> bool:
    """Whether `error` is the machine's, a lost worker's or a device's, not a bug's."""
    return isinstance(error, (*MACHINE_ERRORS, *LOST_WORKER_ERRORS)) or bool(cli.device_error(error))


def _cause(error: Exception) -> str:
    """An error's cause in a few words: the path and the reason, or the peer's last word."""
    if isinstance(error, OSError):
        path = error.filename2 or error.filename  # a rename's target, or the file written
        held = " (open in another program?)" if isinstance(error, PermissionError) and ON_WINDOWS else ""
        return f"{path}: {error.strerror}{held}" if path else str(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    aborted = [i for i, line in enumerate(lines) if "aborted by:" in line]  # a collective's peer
    text = lines[aborted[-1]].split("aborted by:")[-1] if aborted else lines[0]
    if aborted and text.endswith(":") and aborted[-1] + 1 < len(lines):
        text += " " + lines[aborted[-1] + 1]  # the task it names
    text = text.split("}} ")[-1].replace(" [Op:SaveV2]", "").strip()
    return text if len(text) <= 200 else "..." + text[-197:]  # a long path's end, and the reason after it


def interrupted(error: Exception, out_dir: Path, checkpoint_dir: Path) -> cli.ScriptError:
    """The one line that ends a run the machine stopped (exit code 1): the cause, what is
    saved, and how to go on. A checkpoint the error cut short is removed."""
    for unfinished in checkpoint_dir.glob("ckpt-*_temp"):
        shutil.rmtree(unfinished, ignore_errors=True)
    saved = [run_folder.checkpoint_epoch(index) for index in checkpoint_dir.glob("ckpt-*.index")]
    lost = isinstance(error, LOST_WORKER_ERRORS)
    what = (f"a worker of the run was lost ({_cause(error)})" if lost
            else (cli.device_error(error) or f"cannot write the run in {out_dir} ({_cause(error)})"))
    when = "on every worker" if lost else "once that is mended"
    if not saved:
        return cli.ScriptError(f"{what}; no epoch is saved yet: start the run again {when}", exit_code=1)
    return cli.ScriptError(f"{what}; epochs up to {max(saved)} are saved. {when.capitalize()}, "
                           f"resume with: python train.py --out-dir {out_dir} --resume", exit_code=1)


class GracefulStop:
    """Turns SIGINT (Ctrl-C), SIGTERM and on Windows SIGBREAK (Ctrl-Break) into a request
    that the loop honours at the next step boundary, so that what is complete stays complete.
    A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, *([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else []))

    def __enter__(self) -> GracefulStop:
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._request) for sig in self.SIGNALS}
        return self

    def _request(self, signum: int, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stopped(self, when: str, saved_epoch: int, out_dir: Path) -> cli.ScriptError:
        """The one line that ends a stopped run: what is saved, and how to resume."""
        return cli.ScriptError(
            f"stopped by {signal.Signals(self.signal).name} {when}; epochs up to {saved_epoch} are "
            f"saved. Resume with: python train.py --out-dir {out_dir} --resume",
            exit_code=128 + self.signal)
