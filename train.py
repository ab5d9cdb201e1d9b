"""Train the CVAE with the tutorial's recipe, and draw what it learned.

The defaults are the tutorial's: binarized MNIST, batch 32, latent_dim 2, Adam 1e-4,
10 epochs, the single-sample Monte Carlo ELBO and a custom tf.GradientTape step.
Everything a run writes goes into --out-dir:

  image_at_epoch_0000.png ..  16 fixed test digits encoded and decoded, before
                              training and after each epoch (a 4x4 grid)
  cvae.gif                    those grids, one frame an epoch
  latent_manifold.png         digits decoded from a 20x20 grid of the latent plane
  metrics.csv                 per epoch: train loss, test ELBO, seconds, images/s

    python train.py                                  # the tutorial
    python train.py --data mnist.npz --epochs 1 --train-size 2000   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
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
    parser.add_argument("--seed", type=int, default=SEED,
                        help="seed for weights, shuffling and noise: the same seed repeats a "
                             "run on the same machine")
    parser.add_argument("--out-dir", default=OUT_DIR,
                        help="folder for everything the run writes")
    parser.add_argument("--data", default=None,
                        help=f"Keras .npz or folder of MNIST IDX files; default "
                             f"${dataset.DATA_ENV_VAR}, else the Keras download")
    parser.add_argument("--train-size", type=cli.positive_int, default=None,
                        help="use only the first N training images (default: all)")
    parser.add_argument("--test-size", type=cli.positive_int, default=None,
                        help=f"use only the first N test images, at least "
                             f"{NUM_EXAMPLES_TO_GENERATE} (default: all)")
    return parser


# ----------------------------------------------------------------------------
# One step, and the test-set ELBO


@tf.function
def train_step(model: network.CVAE, optimizer: tf.keras.optimizers.Optimizer,
               rng: tf.random.Generator, x: tf.Tensor) -> tf.Tensor:
    """One gradient step on the negative single-sample ELBO; returns the batch loss."""
    eps = rng.normal(shape=(tf.shape(x)[0], model.latent_dim))
    with tf.GradientTape() as tape:
        loss = network.compute_loss(model, x, eps)
    gradients = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return loss


@tf.function
def _elbo_sum(model: network.CVAE, rng: tf.random.Generator, x: tf.Tensor) -> tf.Tensor:
    eps = rng.normal(shape=(tf.shape(x)[0], model.latent_dim))
    return tf.reduce_sum(network.elbo_per_example(model, x, eps))


def evaluate(model: network.CVAE, batches: tf.data.Dataset, rng: tf.random.Generator) -> float:
    """The test-set ELBO: the single-sample estimate averaged over every image in `batches`."""
    total, count = 0.0, 0
    for x in batches:
        total += float(_elbo_sum(model, rng, x))
        count += len(x)
    return total / count


# ----------------------------------------------------------------------------
# Pictures


def save_sample_grid(model: network.CVAE, images: tf.Tensor, eps: tf.Tensor, path: Path) -> None:
    """Encode, reparameterize and decode `images`; save the probabilities as a 4x4 grid."""
    mean, logvar = model.encode(images)
    predictions = model.sample(model.reparameterize(mean, logvar, eps))
    figure = Figure(figsize=(4, 4))
    for i, axes in enumerate(figure.subplots(4, 4).flat):
        axes.imshow(predictions[i, :, :, 0], cmap="gray", vmin=0, vmax=1)
        axes.axis("off")
    with cli.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


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


def save_metrics(rows: list[dict], path: Path) -> None:
    with cli.atomic_path(path) as tmp, open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------
# The loop


def fit(model: network.CVAE, optimizer: tf.keras.optimizers.Optimizer,
        train_images: np.ndarray, test_images: np.ndarray, *, epochs: int, batch_size: int,
        seed: int, out_dir: Path) -> list[dict]:
    """Train for `epochs`, saving the sample grid and metrics each epoch; return the metrics.

    `train_images` and `test_images` are binarized float32 (N, 28, 28, 1).
    """
    if len(test_images) < NUM_EXAMPLES_TO_GENERATE:
        raise cli.UserError(f"the sample grid needs {NUM_EXAMPLES_TO_GENERATE} test images, "
                            f"got {len(test_images)}")
    if not optimizer.built:  # its variables must exist before train_step is traced
        optimizer.build(model.trainable_variables)
    rng = tf.random.Generator.from_seed(seed)  # all noise: training, evaluation, the grid
    test_batches = dataset.make_batches(test_images, EVAL_BATCH_SIZE)
    train_tensor = tf.constant(train_images)  # converted once, permuted every epoch
    # The same 16 test digits and the same noise every epoch, so the frames differ only
    # by what the model learned.
    picks = np.random.default_rng(seed).choice(len(test_images), NUM_EXAMPLES_TO_GENERATE,
                                               replace=False)
    sample_images = test_images[np.sort(picks)]
    sample_eps = rng.normal(shape=(NUM_EXAMPLES_TO_GENERATE, model.latent_dim))

    save_sample_grid(model, sample_images, sample_eps, grid_path(out_dir, 0))
    elbo = evaluate(model, test_batches, rng)
    print(f"Epoch 0 (untrained): test ELBO {elbo:.2f}")
    metrics = [{"epoch": 0, "train_loss": "", "test_elbo": round(elbo, 4), "seconds": "",
                "images_per_second": ""}]
    save_metrics(metrics, out_dir / "metrics.csv")

    num_train = len(train_images)
    steps = -(-num_train // batch_size)
    for epoch in range(1, epochs + 1):
        print(f"Epoch {epoch}/{epochs}")
        # A bar redrawn in place on a terminal; one line an epoch in a log file.
        progbar = tf.keras.utils.Progbar(steps, stateful_metrics=["loss"],
                                         verbose=1 if sys.stdout.isatty() else 2)
        order = dataset.epoch_order(num_train, seed, epoch)
        loss_sum, seen = 0.0, 0
        start_time = time.perf_counter()
        for step, x in enumerate(dataset.make_batches(train_tensor, batch_size, order), 1):
            loss = float(train_step(model, optimizer, rng, x))
            loss_sum += loss * len(x)
            seen += len(x)
            progbar.update(step, [("loss", loss_sum / seen)])  # the epoch's running mean
        seconds = time.perf_counter() - start_time

        elbo = evaluate(model, test_batches, rng)
        save_sample_grid(model, sample_images, sample_eps, grid_path(out_dir, epoch))
        print(f"Epoch {epoch}/{epochs}: test ELBO {elbo:.2f}, train loss {loss_sum / seen:.2f}, "
              f"time for the epoch {seconds:.1f} s ({seen / seconds:,.0f} images/s)")
        metrics.append({"epoch": epoch, "train_loss": round(loss_sum / seen, 4),
                        "test_elbo": round(elbo, 4), "seconds": round(seconds, 3),
                        "images_per_second": round(seen / seconds, 1)})
        save_metrics(metrics, out_dir / "metrics.csv")
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out_dir = cli.ensure_out_dir(args.out_dir)
    (train_images, _), (test_images, _) = dataset.load_mnist(
        args.data, args.train_size, args.test_size)
    train_images, test_images = dataset.binarize(train_images), dataset.binarize(test_images)
    print(f"Training on {len(train_images):,} images, testing on {len(test_images):,}; "
          f"writing to {out_dir}/")

    tf.keras.utils.set_random_seed(args.seed)  # the initial weights
    model = network.CVAE(args.latent_dim)
    optimizer = tf.keras.optimizers.Adam(args.learning_rate)
    fit(model, optimizer, train_images, test_images, epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed, out_dir=out_dir)

    frames = [grid_path(out_dir, epoch) for epoch in range(args.epochs + 1)]
    save_gif(frames, out_dir / "cvae.gif")
    print(f"Wrote {out_dir / 'cvae.gif'} ({len(frames)} frames)")
    if args.latent_dim == 2:
        save_latent_manifold(model, out_dir / "latent_manifold.png")
        print(f"Wrote {out_dir / 'latent_manifold.png'}")
    else:
        print(f"No latent manifold: it needs --latent-dim 2, not {args.latent_dim}")


if __name__ == "__main__":
    cli.run(main)
