"""Train the CVAE with the tutorial's recipe, and draw what it learned.

The defaults are the tutorial's: binarized MNIST, batch 32, latent_dim 2, Adam 1e-4,
10 epochs, the single-sample Monte Carlo ELBO and a custom tf.GradientTape step.
Everything a run writes goes into --out-dir:

  image_at_epoch_0000.png ..  16 fixed test digits encoded and decoded, before
                              training and after each epoch (a 4x4 grid)
  cvae.gif                    those grids, one frame an epoch
  latent_manifold.png         digits decoded from a 20x20 grid of the latent plane
  metrics.csv                 per epoch: train loss, test ELBO, seconds, images/s
  config.json                 the run's settings, and a fingerprint of its data
  checkpoints/                the last few epochs: weights, optimizer, random states
  tensorboard/                train loss, test ELBO, epoch time and the grid, for
                              `tensorboard --logdir OUT_DIR`

A run can be stopped at any moment (Ctrl-C, SIGTERM, even SIGKILL or a power cut) and
continued with --resume from its last complete epoch, with the same results as if it
had never stopped.

    python train.py                                  # the tutorial
    python train.py --data mnist.npz --epochs 1 --train-size 2000   # a quick look
    python train.py --out-dir output --resume        # continue a stopped run
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

import cli
import dataset
import network

# The tutorial's recipe: these are the flags' defaults.
EPOCHS = 10
LATENT_DIM = network.LATENT_DIM
BATCH_SIZE = 32
LEARNING_RATE = 1e-4
SEED = 42
OUT_DIR = "output"

NUM_EXAMPLES_TO_GENERATE = 16  # the 4x4 grid saved every epoch
MANIFOLD_SIZE = 20  # digits per side of the latent manifold
# The test ELBO is a mean over images, so its batching changes nothing but speed.
EVAL_BATCH_SIZE = 1000
KEEP_CHECKPOINTS = 3
LOG_EVERY_STEPS = 50  # how often the train loss goes to TensorBoard
# Training steps per tf.function call: fewer Python round trips, a progress update and a
# chance to stop (Ctrl-C) after each call.
STEPS_PER_CALL = 50
# Settings fixed for a run's life: --resume refuses a flag that contradicts them.
# (--epochs may change: resuming with more epochs trains a finished run further.)
RUN_SETTINGS = ("latent_dim", "batch_size", "learning_rate", "seed", "train_size", "test_size",
                "kl", "dataset", "precision")
# What runs from before a setting existed used, for --resume and evaluate.py.
SETTING_DEFAULTS = {"kl": "mc", "dataset": "mnist", "precision": "fp32"}
STRATEGIES = ("default", "mirrored", "multiworker")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description="Train the convolutional VAE on binarized MNIST.")
    parser.add_argument("--epochs", type=cli.non_negative_int, default=EPOCHS,
                        help="passes over the training set")
    parser.add_argument("--latent-dim", type=cli.positive_int, default=LATENT_DIM,
                        help="size of the latent space (the manifold needs 2)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=BATCH_SIZE,
                        help="images per training step")
    parser.add_argument("--learning-rate", type=cli.positive_float, default=LEARNING_RATE,
                        help="Adam's learning rate")
    parser.add_argument("--kl", choices=network.KL_ESTIMATORS, default="mc",
                        help="the ELBO's KL term: the tutorial's single-sample estimate (mc) or "
                             "its closed form (analytic)")
    parser.add_argument("--precision", choices=tuple(network.PRECISIONS), default="fp32",
                        help="bf16: Keras mixed_bfloat16 for the hidden layers (faster where the "
                             "hardware has bfloat16 maths), with the loss and sampling in float32")
    parser.add_argument("--strategy", choices=STRATEGIES, default="default",
                        help="default: one device (the GPU if there is one); mirrored: "
                             "tf.distribute.MirroredStrategy over --devices; multiworker: "
                             "MultiWorkerMirroredStrategy over the machines in $TF_CONFIG")
    parser.add_argument("--devices", default=None,
                        help="for --strategy mirrored, a comma-separated device list such as "
                             "GPU:0,GPU:1 (default: every local GPU, else the CPU)")
    parser.add_argument("--shards", type=cli.positive_int, default=None,
                        help="cut each batch into N pieces computed side by side, the cores "
                             "shared among them (default: 2 with --strategy default on a "
                             "machine with no GPU and 2 or more cores, else 1); the results "
                             "are the same to float rounding, and repeat bit for bit with 1 "
                             "or 2")
    parser.add_argument("--seed", type=cli.seed_int, default=SEED,
                        help="seed for weights, shuffling and noise: the same seed repeats a "
                             "run on the same machine")
    parser.add_argument("--out-dir", default=OUT_DIR,
                        help="folder for everything the run writes")
    parser.add_argument("--data", default=None,
                        help=f"Keras .npz or folder of MNIST IDX files; default "
                             f"${dataset.DATA_ENV_VAR}, else the Keras download")
    parser.add_argument("--dataset", choices=tuple(dataset.KERAS_DATASETS), default="mnist",
                        help="which Keras download to use when no --data is given")
    parser.add_argument("--train-size", type=cli.positive_int, default=None,
                        help="use only the first N training images (default: all)")
    parser.add_argument("--test-size", type=cli.positive_int, default=None,
                        help=f"use only the first N test images, at least "
                             f"{NUM_EXAMPLES_TO_GENERATE} (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its last complete epoch, "
                             "with the settings stored there")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out-dir (refused without this "
                             "or --resume)")
    return parser


# ----------------------------------------------------------------------------
# The train steps, and the test-set ELBO


def _slice(tensor: tf.Tensor, index: int | tf.Tensor, count: int) -> tf.Tensor:
    """The `index`-th of `count` consecutive, near-equal slices of `tensor`'s first axis."""
    size = tensor.shape[0] if tensor.shape[0] is not None else tf.shape(tensor)[0]
    return tensor[size * index // count:size * (index + 1) // count]


def elbo_sum(model: network.CVAE, x: tf.Tensor, eps: tf.Tensor, kl: str = "mc",
             shards: int = 1) -> tf.Tensor:
    """The single-sample ELBO of the images `x` (noise `eps`), summed, in `shards` pieces.

    The pieces do not depend on each other, so TensorFlow computes them at once, forward
    and backward: see `setup_shards`. With two, every sum of the step still adds two
    numbers at a time, so a run repeats bit for bit (network.py).
    """
    if x.shape[0] is not None:
        shards = max(1, min(shards, x.shape[0]))  # no empty piece (a small last batch)
    total = None
    for piece in range(shards):
        part = tf.reduce_sum(network.elbo_per_example(
            model, _slice(x, piece, shards), _slice(eps, piece, shards), kl))
        total = part if total is None else total + part
    return total


def make_train_function(model: network.CVAE, optimizer: tf.keras.optimizers.Optimizer,
                        rng: tf.random.Generator, *, kl: str = "mc",
                        strategy: tf.distribute.Strategy | None = None, shards: int = 1):
    """A compiled `train_steps(batches, first, count)` that takes `count` gradient steps on
    `batches[first]`, `batches[first + 1]`, .. and returns each step's loss (the negative
    single-sample ELBO, averaged over the batch). `batches` is (num_batches, batch_size,
    28, 28, 1): `epoch_losses` cuts an epoch's images into it.

    Several steps per call save the Python round trip of each step. Under a multi-device
    `strategy` each replica takes its share of every batch; the global batch stays the
    batch's size, and the noise is drawn for the global batch, as on one device. Each
    replica computes its share in `shards` pieces (`elbo_sum`).
    """
    strategy = strategy or tf.distribute.get_strategy()

    def replica_step(x: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
        # This replica's share of the batch. Its ELBO is summed and divided by the global
        # batch size: the optimizer sums the replicas' gradients, which makes them those of
        # the global batch's mean loss.
        context = tf.distribute.get_replica_context()
        replica, replicas = context.replica_id_in_sync_group, context.num_replicas_in_sync
        size = x.shape[0]  # static: train_steps slices its batches from a tensor of known shape
        if replicas > 1:
            known = tf.get_static_value(replica)  # static slices, where the id is known
            replica = int(known) if known is not None else replica
            x, eps = _slice(x, replica, replicas), _slice(eps, replica, replicas)
        with tf.GradientTape() as tape:
            loss = -elbo_sum(model, x, eps, kl, shards) / size
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def train_steps(batches: tf.Tensor, first: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
        losses = tf.TensorArray(tf.float32, size=count)
        for i in tf.range(count):
            # One step after the other (a loop may otherwise start the next iterations early).
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            x = batches[first + i]  # its shape is known when traced, as in a one-step function
            eps = rng.normal(shape=(tf.shape(x)[0], model.latent_dim))
            loss = strategy.run(replica_step, args=(x, eps))
            losses = losses.write(i, strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None))
        return losses.stack()

    return train_steps


def epoch_losses(train_steps, images: tf.Tensor, batch_size: int,
                 steps_per_call: int = STEPS_PER_CALL) -> Iterator[tuple[int, np.ndarray]]:
    """One step on each batch of `images`, in order, with `train_steps` (from
    `make_train_function`), `steps_per_call` steps a call; after each call, yield the
    index of its first step and its losses. The last batch may be smaller."""
    # Batches of static shape: the kernels, and so the results, are then those of a
    # function traced for one batch (a dynamic batch size rounds differently).
    full = len(images) // batch_size
    batches = tf.reshape(images[:full * batch_size], (full, batch_size, *images.shape[1:]))
    for first in range(0, full, steps_per_call):
        count = min(steps_per_call, full - first)
        yield first, train_steps(batches, tf.constant(first), tf.constant(count)).numpy()
    if full * batch_size < len(images):  # the smaller last batch: one call of its own shape
        yield full, train_steps(images[tf.newaxis, full * batch_size:], tf.constant(0),
                                tf.constant(1)).numpy()


@tf.function
def _test_elbo_sum(model: network.CVAE, rng: tf.random.Generator, x: tf.Tensor, kl: str,
                   shards: int) -> tf.Tensor:
    eps = rng.normal(shape=(tf.shape(x)[0], model.latent_dim))
    return elbo_sum(model, x, eps, kl, shards)


def evaluate(model: network.CVAE, batches: tf.data.Dataset, rng: tf.random.Generator,
             kl: str = "mc", shards: int = 1) -> float:
    """The test-set ELBO: the single-sample estimate averaged over every image in `batches`."""
    total, count = 0.0, 0
    for x in batches:
        total += float(_test_elbo_sum(model, rng, x, kl, shards))
        count += len(x)
    return total / count


# ----------------------------------------------------------------------------
# Pictures


def image_grid(figure: Figure, images: np.ndarray, columns: int, titles: Sequence[str] = ()) -> None:
    """Draw grey images of pixel probabilities in a grid of `columns`, titled if `titles`."""
    rows = -(-len(images) // columns)
    for i, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        axes.axis("off")
        if i < len(images):
            axes.imshow(np.asarray(images[i]).squeeze(), cmap="gray", vmin=0, vmax=1)
            if i < len(titles):
                axes.set_title(titles[i], fontsize=8)


def save_figure(figure: Figure, path: Path, **savefig_options) -> None:
    with cli.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", **savefig_options)


def save_sample_grid(model: network.CVAE, images: tf.Tensor, eps: tf.Tensor, path: Path) -> None:
    """Encode, reparameterize and decode `images`; save the probabilities as a 4x4 grid."""
    mean, logvar = model.encode(images)
    figure = Figure(figsize=(4, 4))
    image_grid(figure, model.sample(model.reparameterize(mean, logvar, eps)).numpy(), 4)
    save_figure(figure, path)


def save_gif(frames: Sequence[Path], path: Path, seconds_per_frame: float = 0.5) -> None:
    """An animated GIF of the per-epoch grids, looping."""
    images = [iio.imread(frame)[..., 0] for frame in frames]  # grey: R = G = B
    with cli.atomic_path(path) as tmp:
        iio.imwrite(tmp, np.stack(images), duration=seconds_per_frame * 1000, loop=0)


def latent_manifold(model: network.CVAE, n: int = MANIFOLD_SIZE, digit_size: int = 28) -> np.ndarray:
    """Decode an n x n grid of the 2-D latent plane into one (n * 28, n * 28) image.

    The grid steps through standard-normal quantiles 0.05..0.95 on each axis, so it
    covers the prior evenly in probability (tf.math.ndtri is the normal quantile).
    As in the tutorial, column j has z[0] = grid[j] and row i has z[1] = grid[i].
    """
    grid = tf.math.ndtri(tf.linspace(0.05, 0.95, n)).numpy()
    z_row, z_column = np.meshgrid(grid, grid, indexing="ij")
    z = np.stack([z_column.ravel(), z_row.ravel()], axis=1).astype(np.float32)
    digits = model.sample(tf.constant(z)).numpy().reshape(n, n, digit_size, digit_size)
    return digits.transpose(0, 2, 1, 3).reshape(n * digit_size, n * digit_size)


def save_latent_manifold(model: network.CVAE, path: Path, n: int = MANIFOLD_SIZE) -> None:
    """The manifold as a grey PNG, one pixel per decoded pixel (560 x 560 for n = 20)."""
    with cli.atomic_path(path) as tmp:
        iio.imwrite(tmp, np.round(latent_manifold(model, n) * 255).astype(np.uint8))


def grid_path(out_dir: Path, epoch: int) -> Path:
    return out_dir / f"image_at_epoch_{epoch:04d}.png"


METRIC_FIELDS = ("epoch", "train_loss", "test_elbo", "seconds", "images_per_second")


def save_metrics(rows: list[dict], path: Path) -> None:
    with cli.atomic_path(path) as tmp, open(tmp, "w", newline="") as file:
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


# ----------------------------------------------------------------------------
# The run folder: a new run, a resumed one, or a refusal before anything is written

# What a run (train.py, then evaluate.py) writes in its folder: --overwrite removes these alone.
RUN_OUTPUTS = ("config.json", "metrics.csv", "checkpoints", "tensorboard", "image_at_epoch_*.png",
               "cvae.gif", "latent_manifold.png", "evaluation.json", "reconstructions.png",
               "prior_samples.png", "latent_space.png", "interpolation.png", "training_curves.png",
               ".*.tmp.*")
CONFIG_TYPES = {"epochs": int, "latent_dim": int, "batch_size": int, "learning_rate": (int, float),
                "seed": int, "train_size": (int, type(None)), "test_size": (int, type(None)),
                "kl": str, "dataset": str, "precision": str, "data": (str, type(None)),
                "data_sha256": str}


def holds_run(out_dir: Path) -> bool:
    return any(any(out_dir.glob(pattern)) for pattern in RUN_OUTPUTS)


def load_config(out_dir: Path) -> dict:
    """The run's config.json, checked: every setting present, of the right type."""
    path = out_dir / "config.json"
    if not path.is_file():
        raise cli.UserError(f"no run in {out_dir} (no config.json); start one with "
                            f"python train.py --out-dir {out_dir}")
    try:
        config = {**SETTING_DEFAULTS, **json.loads(path.read_text())}
    except (ValueError, TypeError, OSError) as error:
        raise cli.UserError(f"{path} is damaged ({cli.first_line(error)})") from None
    for key, kinds in CONFIG_TYPES.items():
        if not isinstance(config.get(key), kinds) or isinstance(config.get(key), bool):
            raise cli.UserError(f"{path} is damaged: {key} is missing or of the wrong type")
    for key, known in (("kl", network.KL_ESTIMATORS), ("dataset", dataset.KERAS_DATASETS),
                       ("precision", network.PRECISIONS)):
        if config[key] not in known:
            raise cli.UserError(f"{path} is damaged: unknown {key} {config[key]!r}")
    return config


def load_run_data(config: dict, source: str | None, out_dir: Path, check: bool
                  ) -> tuple[dataset.Split, dataset.Split, str]:
    """The run's data as its config says, with its fingerprint; with `check`, refuse data
    whose fingerprint is not the one the run was trained on."""
    (train_images, train_labels), (test_images, test_labels) = dataset.load_mnist(
        source, config["train_size"], config["test_size"], config["dataset"])
    data_sha256 = dataset.fingerprint(train_images, train_labels, test_images, test_labels)
    if check and data_sha256 != config["data_sha256"]:
        raise cli.UserError(f"the data from {source or 'the Keras download'} is not the data the "
                            f"run in {out_dir} was trained on; pass that with --data")
    return (train_images, train_labels), (test_images, test_labels), data_sha256


@dataclasses.dataclass
class Run:
    config: dict  # the settings, as stored in config.json
    out_dir: Path
    train_images: np.ndarray  # binarized float32 (N, 28, 28, 1)
    test_images: np.ndarray
    train_labels: np.ndarray  # uint8 (N,): not for training, for pictures
    test_labels: np.ndarray
    resume_from: str | None  # the checkpoint to continue from, if any


def prepare_run(args: argparse.Namespace, given: set[str]) -> Run:
    """Settle the run's settings, data and starting point from the flags and the run folder.

    A new run takes the flags; --resume takes the settings stored in the run folder and
    refuses a flag or data that contradicts them. Every check comes before the first write,
    so bad input leaves the folder as it was.
    """
    if args.resume and args.overwrite:
        raise cli.UserError("--resume continues the run in --out-dir and --overwrite replaces it: "
                            "choose one")
    out_dir = cli.ensure_out_dir(args.out_dir)
    flags = {key: getattr(args, key) for key in ("epochs", *RUN_SETTINGS)}
    if args.resume:
        config = load_config(out_dir)
        for key in sorted(given & set(RUN_SETTINGS)):
            if flags[key] != config[key]:
                flag = "--" + key.replace("_", "-")
                raise cli.UserError(f"{flag} {flags[key]} contradicts the run in {out_dir}, which has "
                                    f"{flag} {config[key]}; drop the flag to resume it, or start a "
                                    f"new run in another --out-dir")
        if "epochs" in given:
            config["epochs"] = flags["epochs"]
        source = args.data or config["data"]
    else:
        if holds_run(out_dir) and not args.overwrite:
            raise cli.UserError(f"{out_dir} already holds a run; continue it with --resume, or "
                                f"replace it with --overwrite")
        source = dataset.data_source(args.data)
        config = dict(flags)
    config["data"] = str(Path(source).resolve()) if source else None  # where it is now

    (train_images, train_labels), (test_images, test_labels), config["data_sha256"] = load_run_data(
        config, source, out_dir, check=args.resume)
    if len(test_images) < NUM_EXAMPLES_TO_GENERATE:
        raise cli.UserError(f"the sample grid needs {NUM_EXAMPLES_TO_GENERATE} test images, got "
                            f"{len(test_images)}")
    resume_from, done = latest_intact_checkpoint(out_dir / "checkpoints") if args.resume else (None, 0)
    if resume_from and config["epochs"] < done:
        raise cli.UserError(f"--epochs {config['epochs']}: the run in {out_dir} has done {done} "
                            f"epochs already")

    if args.overwrite:
        for pattern in RUN_OUTPUTS:
            for path in out_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    with cli.atomic_path(out_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return Run(config, out_dir, dataset.binarize(train_images), dataset.binarize(test_images),
               train_labels, test_labels, resume_from)


# ----------------------------------------------------------------------------
# Checkpoints and stopping


def latest_intact_checkpoint(directory: Path) -> tuple[str | None, int]:
    """The newest checkpoint whose every tensor reads back (checksums included), skipping
    damaged ones with a note, and its epoch; (None, 0) if there is none yet."""
    paths = sorted(directory.glob("ckpt-*.index"), key=lambda path: int(path.stem.split("-")[1]))
    damaged = []
    for index in reversed(paths):
        prefix = str(index.with_suffix(""))
        try:
            reader = tf.train.load_checkpoint(prefix)
            tensors = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
        except (tf.errors.OpError, ValueError) as error:
            damaged.append(f"{index.stem} ({cli.first_line(error)[:100]})")
            continue
        for note in damaged:
            print(f"Checkpoint {note} is damaged; using {index.stem}, the one before it")
        return prefix, int(tensors["epoch/.ATTRIBUTES/VARIABLE_VALUE"])
    if damaged:
        raise cli.UserError(f"--resume: no intact checkpoint in {directory}: {'; '.join(damaged)}")
    return None, 0


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's outputs: always, but in a multi-worker run,
    where only the chief (or worker 0, if no task is named chief) does."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


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


# ----------------------------------------------------------------------------
# The loop


def fit(model: network.CVAE, optimizer: tf.keras.optimizers.Optimizer,
        train_images: np.ndarray, test_images: np.ndarray, *, epochs: int, batch_size: int,
        seed: int, out_dir: Path, resume_from: str | None = None, kl: str = "mc",
        strategy: tf.distribute.Strategy | None = None, shards: int = 1) -> list[dict]:
    """Train to `epochs`, saving the sample grid, metrics and a checkpoint every epoch;
    return the metrics. With `resume_from`, a checkpoint, continue after its epoch.
    Steps and evaluations compute each batch in `shards` pieces (`elbo_sum`).

    `train_images` and `test_images` are binarized float32 (N, 28, 28, 1). With a
    `strategy`, the model must have been made in its scope; only its chief writes.
    """
    strategy = strategy or tf.distribute.get_strategy()
    chief = is_chief(strategy)
    if not optimizer.built:  # its variables must exist before train_steps is traced
        with strategy.scope():
            optimizer.build(model.trainable_variables)
    rng = tf.random.Generator.from_seed(seed)  # all noise: training, evaluation, the grid
    train_steps = make_train_function(model, optimizer, rng, kl=kl, strategy=strategy,
                                      shards=shards)
    test_batches = dataset.make_batches(test_images, EVAL_BATCH_SIZE)
    train_tensor = tf.constant(train_images)  # converted once, permuted every epoch
    # The same 16 test digits and the same noise every epoch, so the frames differ only
    # by what the model learned.
    picks = np.sort(np.random.default_rng(seed).choice(len(test_images), NUM_EXAMPLES_TO_GENERATE,
                                                       replace=False))
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer, rng=rng, epoch=tf.Variable(0, dtype=tf.int64),
        sample_images=tf.Variable(test_images[picks], trainable=False),
        sample_eps=tf.Variable(rng.normal((NUM_EXAMPLES_TO_GENERATE, model.latent_dim)),
                               trainable=False))
    # Every worker of a multi-worker run must save its checkpoint; all but the chief's are
    # thrown away, and only the chief writes anything else.
    checkpoint_dir = out_dir / "checkpoints" if chief else Path(tempfile.mkdtemp(prefix="cvae-worker-"))
    manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir), max_to_keep=KEEP_CHECKPOINTS)
    tensorboard = (tf.summary.create_file_writer(str(out_dir / "tensorboard")) if chief
                   else tf.summary.create_noop_writer())

    def end_epoch(epoch: int, row: dict, loss_points: Sequence[tuple[int, float]] = ()) -> None:
        # Pictures, logs and metrics first, the checkpoint last: a checkpoint marks a complete
        # epoch. The loss points wait until here so that a stopped epoch logs none twice.
        metrics.append(row)
        if chief:
            save_sample_grid(model, checkpoint.sample_images, checkpoint.sample_eps,
                             grid_path(out_dir, epoch))
            for step, loss in loss_points:
                with tensorboard.as_default(step=step):
                    tf.summary.scalar("train/loss", loss)
            with tensorboard.as_default(step=epoch):
                tf.summary.scalar("test/elbo", row["test_elbo"])
                if row.get("seconds"):
                    tf.summary.scalar("epoch/seconds", row["seconds"])
                    tf.summary.scalar("epoch/images_per_second", row["images_per_second"])
                tf.summary.image("samples", iio.imread(grid_path(out_dir, epoch))[np.newaxis])
            tensorboard.flush()
            save_metrics(metrics, out_dir / "metrics.csv")
        checkpoint.epoch.assign(epoch)
        manager.save(checkpoint_number=epoch)

    if resume_from:
        checkpoint.restore(resume_from).assert_existing_objects_matched()
        done = int(checkpoint.epoch)
        metrics = [row for row in read_metrics(out_dir / "metrics.csv") if row["epoch"] <= done]
        print(f"Resuming {out_dir} after epoch {done}" if done < epochs
              else f"The run in {out_dir} has finished its {done} epochs")
    else:
        metrics, done = [], 0
        elbo = evaluate(model, test_batches, rng, kl, shards)
        print(f"Epoch 0 (untrained): test ELBO {elbo:.2f}")
        end_epoch(0, {"epoch": 0, "test_elbo": round(elbo, 4)})

    num_train = len(train_images)
    steps = -(-num_train // batch_size)
    with GracefulStop() as stop:
        for epoch in range(done + 1, epochs + 1):
            print(f"Epoch {epoch}/{epochs}")
            # A bar redrawn in place on a terminal; one line an epoch in a log file.
            progbar = tf.keras.utils.Progbar(steps, stateful_metrics=["loss"],
                                             verbose=1 if sys.stdout.isatty() else 2)
            start_time = time.perf_counter()
            images = dataset.epoch_images(train_tensor, seed, epoch)
            loss_sum, seen, loss_points = 0.0, 0, []
            steps_before = int(optimizer.iterations.numpy())
            for first, losses in epoch_losses(train_steps, images, batch_size):
                for step, loss in enumerate(losses.tolist(), first + 1):
                    if not math.isfinite(loss):
                        raise cli.ScriptError(
                            f"the loss is {loss} at epoch {epoch}, step {step}: training diverged; "
                            f"the checkpoint of epoch {epoch - 1} in {out_dir} is intact", exit_code=1)
                    batch = min(batch_size, num_train - (step - 1) * batch_size)
                    loss_sum += loss * batch
                    seen += batch
                    if step % LOG_EVERY_STEPS == 0 or step == steps:
                        loss_points.append((steps_before + step, loss))
                progbar.update(first + len(losses), [("loss", loss_sum / seen)])  # the running mean
                if stop.signal:
                    break
            seconds = time.perf_counter() - start_time
            if stop.signal and seen < num_train:
                print()
                raise stopped(stop.signal, f"during epoch {epoch} (step {seen // batch_size} of {steps})",
                              epoch - 1, out_dir)

            elbo = evaluate(model, test_batches, rng, kl, shards)
            print(f"Epoch {epoch}/{epochs}: test ELBO {elbo:.2f}, train loss {loss_sum / seen:.2f}, "
                  f"time for the epoch {seconds:.1f} s ({seen / seconds:,.0f} images/s)")
            end_epoch(epoch, {"epoch": epoch, "train_loss": round(loss_sum / seen, 4),
                              "test_elbo": round(elbo, 4), "seconds": round(seconds, 3),
                              "images_per_second": round(seen / seconds, 1)}, loss_points)
            if stop.signal and epoch < epochs:
                raise stopped(stop.signal, f"after epoch {epoch}", epoch, out_dir)
    if not chief:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return metrics


def stopped(signum: int, when: str, saved_epoch: int, out_dir: Path) -> cli.ScriptError:
    return cli.ScriptError(
        f"stopped by {signal.Signals(signum).name} {when}; epochs up to {saved_epoch} are saved. "
        f"Resume with: python train.py --out-dir {out_dir} --resume", exit_code=128 + signum)


def _device_key(name: str) -> tuple[str, int | None] | None:
    try:
        spec = tf.DeviceSpec.from_string(name)
    except ValueError:
        return None
    return (spec.device_type or "").upper(), spec.device_index


def make_strategy(name: str, devices: str | None = None) -> tf.distribute.Strategy:
    """The tf.distribute strategy for --strategy and --devices."""
    if devices and name != "mirrored":
        raise cli.UserError(f"--devices is for --strategy mirrored, not --strategy {name}")
    if name == "mirrored":
        here = {_device_key(device.name): device.name for device in tf.config.list_logical_devices()}
        names = [device.strip() for device in devices.split(",")] if devices else None
        for device in names or ():
            if _device_key(device) not in here:
                raise cli.UserError(f"--devices: no device {device!r} here; there are "
                                    f"{', '.join(sorted(here.values()))}")
        return tf.distribute.MirroredStrategy(names)
    if name == "multiworker":
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()  # the cluster: $TF_CONFIG
        except ValueError as error:
            raise cli.UserError(f"--strategy multiworker: $TF_CONFIG is not a usable cluster "
                                f"description ({cli.first_line(error)})") from None
    return tf.distribute.get_strategy()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def setup_shards(requested: int | None = None, strategy_name: str = "default") -> int:
    """How many shards to cut each batch into, with TensorFlow's threads set for them.

    `requested` is --shards; by default, 2 on one device where that is a CPU of 2 or more
    cores (no GPU), else 1. For more than one, TensorFlow runs that many ops at once, the
    cores shared among them. By default it runs as many ops at once as there are cores,
    and spreads each op over every core. But a train step is mostly one long chain of
    ops, each too small to split well: a convolution on two cores spends much of its time
    waiting for the other half. With the batch cut in two (`elbo_sum`) and one core an
    op, the halves run side by side, a core each: on 2 cores a step takes about a fifth
    less time. TensorFlow takes thread settings only before it starts; if it has started
    with others (a notebook's kernel, a test), the default falls back to 1 shard, which
    is faster than 2 with TensorFlow's default threads.
    """
    cores = available_cores()
    shards = requested or (2 if strategy_name == "default" and cores >= 2
                           and not tf.config.list_physical_devices("GPU") else 1)
    if shards == 1:
        return 1
    threads = (shards, max(1, cores // shards))  # inter-op, intra-op
    try:
        tf.config.threading.set_inter_op_parallelism_threads(threads[0])
        tf.config.threading.set_intra_op_parallelism_threads(threads[1])
    except RuntimeError:  # TensorFlow has started
        started_with = (tf.config.threading.get_inter_op_parallelism_threads(),
                        tf.config.threading.get_intra_op_parallelism_threads())
        if started_with != threads and requested is None:
            return 1
    return shards


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    shards = setup_shards(args.shards, args.strategy)  # before TensorFlow starts
    strategy = make_strategy(args.strategy, args.devices)
    run = prepare_run(args, cli.explicit_flags(parser, argv))
    config, out_dir = run.config, run.out_dir
    print(f"Training on {len(run.train_images):,} images, testing on {len(run.test_images):,}; "
          f"writing to {out_dir}/")

    # The same seed must give the same run: the initial weights come from it, and
    # deterministic kernels keep a resumed run bit-identical (on the CPU they are, with the
    # loss's gradients of network.py; on a GPU this picks deterministic convolutions).
    tf.config.experimental.enable_op_determinism()
    tf.keras.utils.set_random_seed(config["seed"])
    with strategy.scope():  # the variables live on the strategy's devices
        model = network.CVAE(config["latent_dim"], config["precision"])
        optimizer = tf.keras.optimizers.Adam(config["learning_rate"])
    fit(model, optimizer, run.train_images, run.test_images, epochs=config["epochs"],
        batch_size=config["batch_size"], seed=config["seed"], out_dir=out_dir,
        resume_from=run.resume_from, kl=config["kl"], strategy=strategy, shards=shards)
    if not is_chief(strategy):
        return

    frames = [grid_path(out_dir, epoch) for epoch in range(config["epochs"] + 1)]
    save_gif(frames, out_dir / "cvae.gif")
    print(f"Wrote {out_dir / 'cvae.gif'} ({len(frames)} frames)")
    if config["latent_dim"] == 2:
        save_latent_manifold(model, out_dir / "latent_manifold.png")
        print(f"Wrote {out_dir / 'latent_manifold.png'}")
    else:
        print(f"No latent manifold: it needs --latent-dim 2, not {config['latent_dim']}")
    if (peak := cli.peak_memory_gib()) is not None:
        print(f"Peak memory (RSS): {peak:.2f} GiB")


if __name__ == "__main__":
    cli.run(main)
