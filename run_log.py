"""What a training run records as it goes: the progress bar and the epoch's mean loss,
TensorBoard, metrics.csv, and a checkpoint that marks each epoch complete; and Ctrl-C or
SIGTERM, which stop at the next step boundary with what is complete kept."""

from __future__ import annotations

import math
import shutil
import signal
import sys
from pathlib import Path

import cli  # first: it loads TensorFlow without its start-up logs

import imageio.v3 as iio
import numpy as np
import tensorflow as tf

import pictures
import run_folder

KEEP_CHECKPOINTS = 3
LOG_EVERY_STEPS = 50  # how often the train loss goes to TensorBoard


class RunLog:
    """A run's `rng` (all its noise), the tutorial's `test_sample` and its noise, and its
    checkpoints, TensorBoard and metrics.csv. Every worker of a multi-worker run saves its
    checkpoints, in `checkpoint_folder` of its run folder; only the chief writes more."""

    def __init__(self, model: tf.keras.Model, optimizer: tf.keras.optimizers.Optimizer,
                 test_images: np.ndarray, seed: int, out_dir: Path, chief: bool = True,
                 checkpoint_folder: str = "checkpoints") -> None:
        self.out_dir, self.chief, self.metrics = out_dir, chief, []
        self.rng = tf.random.Generator.from_seed(seed)
        # The same 16 test digits and noise every epoch: the frames differ only by training.
        picks = np.sort(np.random.default_rng(seed).choice(
            len(test_images), pictures.NUM_EXAMPLES_TO_GENERATE, replace=False))
        self.test_sample = tf.Variable(test_images[picks], trainable=False)
        self.sample_eps = tf.Variable(self.rng.normal(
            (pictures.NUM_EXAMPLES_TO_GENERATE, model.latent_dim)), trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, rng=self.rng, epoch=tf.Variable(0, dtype=tf.int64),
            sample_images=self.test_sample, sample_eps=self.sample_eps)
        self.checkpoint_dir = out_dir / checkpoint_folder
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.checkpoint_dir),
                                                  max_to_keep=KEEP_CHECKPOINTS)
        self.tensorboard = (tf.summary.create_file_writer(str(out_dir / "tensorboard")) if chief
                            else tf.summary.create_noop_writer())

    def restore(self, checkpoint_path: str, epochs: int) -> int:
        """Load a checkpoint and the metrics up to its epoch; return that epoch."""
        self.checkpoint.restore(checkpoint_path).assert_existing_objects_matched()
        done = int(self.checkpoint.epoch)
        self.metrics = [row for row in run_folder.read_metrics(self.out_dir / "metrics.csv")
                        if row["epoch"] <= done]
        print(f"Resuming {self.out_dir} after epoch {done}" if done < epochs
              else f"The run in {self.out_dir} has finished its {done} epochs")
        return done

    def end_epoch(self, epoch: int, row: dict, loss_points: list[tuple[int, float]] = ()) -> None:
        """TensorBoard and metrics.csv first, the checkpoint last: it marks a complete epoch.
        The loss points wait until here, so that a stopped epoch logs none twice."""
        self.metrics.append(row)
        if self.chief:
            for step, loss in loss_points:
                with self.tensorboard.as_default(step=step):
                    tf.summary.scalar("train/loss", loss)
            with self.tensorboard.as_default(step=epoch):
                tf.summary.scalar("test/elbo", row["test_elbo"])
                if row.get("seconds"):
                    tf.summary.scalar("epoch/seconds", row["seconds"])
                    tf.summary.scalar("epoch/images_per_second", row["images_per_second"])
                grid = iio.imread(pictures.grid_path(self.out_dir, epoch))
                tf.summary.image("samples", grid[np.newaxis])
            self.tensorboard.flush()
            run_folder.save_metrics(self.metrics, self.out_dir / "metrics.csv")
        self.checkpoint.epoch.assign(epoch)
        self.manager.save(checkpoint_number=epoch)


class EpochProgress:
    """An epoch's progress bar (redrawn on a terminal, a line an epoch in a log), its running
    mean loss and its TensorBoard loss points; a non-finite loss stops the run."""

    def __init__(self, epoch: int, num_images: int, batch_size: int, steps_before: int,
                 out_dir: Path) -> None:
        self.epoch, self.num_images, self.batch_size = epoch, num_images, batch_size
        self.steps_before, self.out_dir = steps_before, out_dir
        self.steps = -(-num_images // batch_size)
        self.bar = tf.keras.utils.Progbar(self.steps, stateful_metrics=["loss"],
                                          verbose=1 if sys.stdout.isatty() else 2)
        self.loss_sum, self.seen, self.loss_points = 0.0, 0, []

    def update(self, first: int, losses: np.ndarray) -> None:
        """Count the losses of the steps from `first` (0-based) on."""
        for step, loss in enumerate(losses.tolist(), first + 1):
            if not math.isfinite(loss):
                raise cli.ScriptError(
                    f"the loss is {loss} at epoch {self.epoch}, step {step}: training diverged; "
                    f"the checkpoint of epoch {self.epoch - 1} in {self.out_dir} is intact", exit_code=1)
            batch = min(self.batch_size, self.num_images - (step - 1) * self.batch_size)
            self.loss_sum += loss * batch
            self.seen += batch
            if step % LOG_EVERY_STEPS == 0 or step == self.steps:
                self.loss_points.append((self.steps_before + step, loss))
        self.bar.update(first + len(losses), [("loss", self.mean_loss)])

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.seen

    def row(self, test_elbo: float, seconds: float) -> dict:
        """The epoch's row of metrics.csv."""
        return {"epoch": self.epoch, "train_loss": round(self.mean_loss, 4),
                "test_elbo": round(test_elbo, 4), "seconds": round(seconds, 3),
                "images_per_second": round(self.seen / seconds, 1)}

    @property
    def complete(self) -> bool:
        return self.seen == self.num_images


# Errors of the machine, not of the run: a full disk, a folder made read-only or gone.
MACHINE_ERRORS = (OSError, tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError,
                  tf.errors.NotFoundError, tf.errors.DataLossError)
# What a multi-worker run's collectives raise when a worker is gone, killed or silent.
LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                      tf.errors.AbortedError)


def _cause(error: Exception) -> str:
    """An error's cause in a few words: the path and the reason, or the peer's last word."""
    if isinstance(error, OSError):
        path = error.filename2 or error.filename  # a rename's target, or the file written
        return f"{path}: {error.strerror}" if path else str(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    aborted = [i for i, line in enumerate(lines) if "aborted by:" in line]  # a collective's peer
    text = lines[aborted[-1]].split("aborted by:")[-1] if aborted else lines[0]
    if aborted and text.endswith(":") and aborted[-1] + 1 < len(lines):
        text += " " + lines[aborted[-1] + 1]  # the task it names
    return text.split("}} ")[-1].replace(" [Op:SaveV2]", "").strip()[:200]


def interrupted(error: Exception, out_dir: Path, checkpoint_dir: Path) -> cli.ScriptError:
    """The one line that ends a run the machine stopped (exit code 1): the cause, what is
    saved, and how to go on. A checkpoint the error cut short is removed."""
    for unfinished in checkpoint_dir.glob("ckpt-*_temp"):
        shutil.rmtree(unfinished, ignore_errors=True)
    saved = [run_folder.checkpoint_epoch(index) for index in checkpoint_dir.glob("ckpt-*.index")]
    lost = isinstance(error, LOST_WORKER_ERRORS)
    what = (f"a worker of the run was lost ({_cause(error)})" if lost
            else f"cannot write the run in {out_dir} ({_cause(error)})")
    when = "on every worker" if lost else "once that is mended"
    if not saved:
        return cli.ScriptError(f"{what}; no epoch is saved yet: start the run again {when}", exit_code=1)
    return cli.ScriptError(f"{what}; epochs up to {max(saved)} are saved. {when.capitalize()}, "
                           f"resume with: python train.py --out-dir {out_dir} --resume", exit_code=1)


class GracefulStop:
    """Turns SIGINT (Ctrl-C) and SIGTERM into a request that the loop honours at the next
    step boundary, so that what is complete stays complete. A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

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
