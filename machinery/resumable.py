"""Long work in numbered batches, kept as it goes: each finished batch's results are saved
(whole, machinery.files), so that the same work asked for again after a stop (Ctrl-C, a
kill) goes on from the last finished batch, with the same results; and a progress bar
with its ETA on a terminal (Keras' Progbar), a plain line every PROGRESS_SECONDS in a log."""

from __future__ import annotations

import json
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from machinery import files

import numpy as np
import tensorflow as tf

PROGRESS_SECONDS = 30.0  # how often a log (not a terminal) gets a progress line


class BatchResults:
    """The results of the batches of one piece of work, kept in `path`. `key` says what the
    work is (its settings): results kept for another key are not this work's, and are
    replaced."""

    def __init__(self, path: Path | None, key: dict, total: int) -> None:
        """`path`: where to keep them (None: nowhere); `total`: the work to do, for the bar."""
        self.path, self.key = path, json.dumps(key, sort_keys=True)
        self.results: dict[int, np.ndarray] = {}
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as kept:
                    if str(kept["key"]) == self.key:
                        self.results = {int(name.split("_")[1]): kept[name] for name in kept.files
                                        if name.startswith("batch_")}
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                pass  # not a file this could have written whole: the work starts afresh
        self.total, self.kept_work = total, 0
        self.started = self.last_line = time.monotonic()
        self.bar: tf.keras.utils.Progbar | None = None

    @property
    def resumed(self) -> int:
        """How many batches were kept from before."""
        return len(self.results)

    def batch(self, index: int, compute: Callable[[], np.ndarray], done: int) -> None:
        """Batch `index`'s results: kept from before, or computed now and kept at once.
        `done`: the work done once this batch is, for the bar. The kept batches come first
        (batches finish in order), so the ETA counts only the work done after them."""
        if index in self.results:
            self.kept_work, self.started = done, time.monotonic()
            return
        if sys.stdout.isatty() and self.bar is None:  # its clock starts now, before this batch
            self.bar = tf.keras.utils.Progbar(self.total - self.kept_work, unit_name="image")
        self.results[index] = np.asarray(compute())
        if self.path is not None:
            with files.atomic_path(self.path) as tmp:
                np.savez(tmp, key=np.array(self.key),
                         **{f"batch_{i}": values for i, values in self.results.items()})
        self.show_progress(done)

    def show_progress(self, done: int) -> None:
        """On a terminal Keras' Progbar over the work left after the kept batches; in a log a
        line every PROGRESS_SECONDS with the whole work's count."""
        if self.bar is not None:
            self.bar.update(done - self.kept_work)
        elif time.monotonic() - self.last_line >= PROGRESS_SECONDS or done == self.total:
            self.last_line, seconds = time.monotonic(), time.monotonic() - self.started
            eta = seconds / (done - self.kept_work) * (self.total - done)
            print(f"{done:,}/{self.total:,} images, {seconds:.0f} s, ETA {eta:.0f} s", flush=True)

    def all(self) -> np.ndarray:
        """Every batch's results in order, once the work is complete; its file is removed."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        return np.concatenate([self.results[i] for i in sorted(self.results)])
