"""The tutorial's pictures: the 4x4 grid of test digits after each epoch, the GIF of those
grids, and the 2D manifold of digits decoded from the latent plane; and the grid drawing
that every picture here shares."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cli  # first: it loads TensorFlow without its start-up logs

import imageio.v3 as iio
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from network import CVAE

NUM_EXAMPLES_TO_GENERATE = 16  # the 4x4 grid saved every epoch
MANIFOLD_SIZE = 20  # digits per side of the latent manifold


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


def grid_path(out_dir: Path, epoch: int) -> Path:
    return out_dir / f"image_at_epoch_{epoch:04d}.png"


def generate_and_save_images(model: CVAE, epoch: int, test_sample: tf.Tensor, eps: tf.Tensor,
                             out_dir: Path) -> None:
    """Encode, reparameterize (noise `eps`) and decode `test_sample`; save the pixel
    probabilities as a 4x4 grid, image_at_epoch_NNNN.png."""
    mean, logvar = model.encode(test_sample)
    z = model.reparameterize(mean, logvar, eps)
    predictions = model.sample(z)
    figure = Figure(figsize=(4, 4))
    image_grid(figure, predictions.numpy(), 4)
    save_figure(figure, grid_path(out_dir, epoch))


def prior_draws(count: int, latent_dim: int, seed: int) -> tf.Tensor:
    """`count` points from the prior p(z) = N(0, I), the same ones for the same seed."""
    return tf.random.stateless_normal((count, latent_dim), seed=(seed, 1))


def latent_walk(start: np.ndarray, end: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """`steps` evenly spaced latent points from `start` to `end`, both included, and how far
    along the line each one is (0 to 1)."""
    weights = np.linspace(0.0, 1.0, steps, dtype=np.float32)
    return (1 - weights[:, np.newaxis]) * start + weights[:, np.newaxis] * end, weights


def save_gif(frames: Sequence[Path], path: Path, seconds_per_frame: float = 0.5) -> None:
    """An animated GIF of the per-epoch grids, looping."""
    images = [iio.imread(frame)[..., 0] for frame in frames]  # grey: R = G = B
    with cli.atomic_path(path) as tmp:
        iio.imwrite(tmp, np.stack(images), duration=seconds_per_frame * 1000, loop=0)


def plot_latent_images(model: CVAE, n: int = MANIFOLD_SIZE, digit_size: int = 28) -> np.ndarray:
    """Decode an n x n grid of the latent plane, at the normal quantiles 0.05..0.95 (ndtri is
    the tutorial's Normal.quantile), into one image: z[0] by column, z[1] by row."""
    grid = tf.math.ndtri(tf.linspace(0.05, 0.95, n)).numpy()
    z_row, z_column = np.meshgrid(grid, grid, indexing="ij")
    z = np.stack([z_column.ravel(), z_row.ravel()], axis=1).astype(np.float32)
    digits = model.sample(tf.constant(z)).numpy().reshape(n, n, digit_size, digit_size)
    return digits.transpose(0, 2, 1, 3).reshape(n * digit_size, n * digit_size)


def save_latent_images(model: CVAE, path: Path, n: int = MANIFOLD_SIZE) -> None:
    """The manifold as a grey PNG, one pixel per decoded pixel (560 x 560 for n = 20)."""
    with cli.atomic_path(path) as tmp:
        iio.imwrite(tmp, np.round(plot_latent_images(model, n) * 255).astype(np.uint8))
