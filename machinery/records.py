"""What a training run keeps: the state a checkpoint holds (the weights, Adam's moments,
the run's random generator, the fixed test sample), the records written each epoch
(metrics.csv, TensorBoard), and the progress bar of an epoch."""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Callable
from pathlib import Path

from machinery import cli, distribute, files, run_folder

import imageio.v3 as iio
import numpy as np
import tensorflow as tf

KEEP_CHECKPOINTS = 3
LOG_EVERY_STEPS = 50  # how often the train loss goes to TensorBoard
# metrics.csv's columns: test_kl and active_units are the test images' KL health (evaluate.kl_health).
METRIC_FIELDS = ("epoch", "train_loss", "test_elbo", "seconds", "images_per_second", "test_kl",
                 "active_units")


def save_metrics(rows: list[dict], path: Path) -> None:
    with files.atomic_path(path) as tmp, open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv back as rows of numbers (None where epoch 0 has no training figures)."""
    if not path.exists():
        return []
    try:
        with open(path, newline="") as file:
            return [{key: (int(value) if key == "epoch" else float(value)) if value else None
                     for key, value in row.items()} for row in csv.DictReader(file)]
    except (ValueError, TypeError, csv.Error) as error:
        raise cli.UserError(f"{path} is damaged ({cli.first_line(error)})") from None


class RunState:
    """What a checkpoint holds and restores: the model, the optimizer, the epoch, the
    run's `rng` (all its noise), and the tutorial's `test_sample` of 16 test digits with
    the noise that draws them, fixed for the run so that the frames differ only by
    training. Each worker of a multi-worker run keeps its checkpoints in its own folder of
    the run folder (distribute.checkpoint_folder)."""

    def __init__(self, model: tf.keras.Model, optimizer: tf.keras.optimizers.Optimizer,
                 test_images: np.ndarray, seed: int, out_dir: Path,
                 strategy: tf.distribute.Strategy | None = None,
                 prepare: Callable[[np.ndarray], tf.Tensor] = tf.constant,
                 test_labels: np.ndarray | None = None, *, sample_size: int) -> None:
        self.out_dir, self.strategy = out_dir, strategy or tf.distribute.get_strategy()
        self.rng = tf.random.Generator.from_seed(seed)
        picks = np.sort(np.random.default_rng(seed).choice(
            len(test_images), sample_size, replace=False))
        self.test_sample = tf.Variable(prepare(test_images[picks]), trainable=False)
        # Their classes, which a conditional model is given (the test set is the run's own).
        self.sample_labels = None if test_labels is None or not model.num_classes else test_labels[picks]
        self.sample_eps = tf.Variable(self.rng.normal(
            (sample_size, model.latent_dim)), trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, rng=self.rng, epoch=tf.Variable(0, dtype=tf.int64),
            sample_images=self.test_sample, sample_eps=self.sample_eps)
        self.checkpoint_dir = out_dir / distribute.checkpoint_folder(self.strategy)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.checkpoint_dir),
                                                  max_to_keep=KEEP_CHECKPOINTS)

    def resume(self, checkpoint_path: str | None, epochs: int) -> int | None:
        """Restore `checkpoint_path` and return its epoch; None for a new run (no path). The
        workers of a multi-worker run first agree on the last epoch all of them have."""
        checkpoint_path = run_folder.agreed_checkpoint(checkpoint_path, distribute.from_every_worker(
            self.strategy, run_folder.checkpoint_epoch(checkpoint_path)), self.checkpoint_dir)
        if checkpoint_path is None:
            return None
        run_folder.restore(self.checkpoint, checkpoint_path)
        done = int(self.checkpoint.epoch)
        print(f"Resuming {self.out_dir} after epoch {done}" if done < epochs
              else f"The run in {self.out_dir} has finished its {done} epochs")
        return done

    def save(self, epoch: int) -> None:
        """Save the checkpoint of a complete epoch: what marks it complete."""
        self.checkpoint.epoch.assign(epoch)
        self.manager.save(checkpoint_number=epoch)


class EpochRecords:
    """metrics.csv, a row an epoch, and TensorBoard: the test ELBO, the KL health, the epoch's
    time, the train loss every LOG_EVERY_STEPS steps and the sample grid. Only the `chief` writes."""

    def __init__(self, out_dir: Path, chief: bool = True, done: int | None = None) -> None:
        """`done`: the epoch a resumed run restored, whose rows of metrics.csv it keeps."""
        self.out_dir, self.chief = out_dir, chief
        self.metrics = [] if done is None else [
            row for row in read_metrics(out_dir / "metrics.csv") if row["epoch"] <= done]
        self.tensorboard = (tf.summary.create_file_writer(str(out_dir / "tensorboard")) if chief
                            else tf.summary.create_noop_writer())

    def write(self, epoch: int, row: dict, grid: Path, loss_points: list[tuple[int, float]] = (),
              health: dict | None = None) -> None:
        """The epoch's row, its loss points, its `grid` (a PNG, drawn already) and its KL
        `health` (kl_per_dimension, active_units). The loss points wait until the epoch is
        complete, so that a stopped one logs none."""
        kl_per_dimension = (health or {}).get("kl_per_dimension", [])
        if health:
            row = {**row, "test_kl": round(sum(kl_per_dimension), 4), "active_units": health["active_units"]}
        self.metrics.append(row)
        if not self.chief:
            return
        for step, loss in loss_points:
            with self.tensorboard.as_default(step=step):
                tf.summary.scalar("train/loss", loss)
        with self.tensorboard.as_default(step=epoch):
            tf.summary.scalar("test/elbo", row["test_elbo"])
            if health:  # the closed-form KL of the test images, in all and per latent dimension
                tf.summary.scalar("test/kl", row["test_kl"])
                tf.summary.scalar("test/active_units", row["active_units"])
                for dimension, kl in enumerate(kl_per_dimension):
                    tf.summary.scalar(f"kl_per_dimension/z{dimension:02d}", kl)
            if row.get("seconds"):
                tf.summary.scalar("epoch/seconds", row["seconds"])
                tf.summary.scalar("epoch/images_per_second", row["images_per_second"])
            tf.summary.image("samples", iio.imread(grid)[np.newaxis])
        self.tensorboard.flush()
        save_metrics(self.metrics, self.out_dir / "metrics.csv")


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
                    f"the checkpoint of epoch {self.epoch - 1} in {self.out_dir} is intact. Try a new "
                    f"run with a lower --learning-rate, or --kl analytic (a KL term without a "
                    f"sample's noise)", exit_code=1)
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
