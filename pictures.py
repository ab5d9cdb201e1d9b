"""The tutorial's pictures: the 4x4 grid of test digits after each epoch, the GIF of those
grids, and the 2D manifold of digits decoded from the latent plane; the grid drawing that
every picture here shares; and evaluate.py's pictures of a trained model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from machinery import files

import imageio.v3 as iio
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from network import CVAE

NUM_EXAMPLES_TO_GENERATE = 16  # the 4x4 grid saved every epoch
DIGITS = tuple("0123456789")  # the class names of MNIST, the default
MANIFOLD_SIZE = 20  # digits per side of the latent manifold
ENCODE_BATCH = 1000  # test images encoded a call, for the latent space
ANALOGY_ROWS = 10  # test images in a conditional model's analogies.png
FRAME_POINTS = 2000  # test images in each epoch's frame of latent_means.gif
FRAME_LIMIT = 4.  # the frames' axes, -4..4: fixed, so that the means are seen to move


def image_grid(figure: Figure, images: np.ndarray, columns: int, titles: Sequence[str] = ()) -> None:
    """Draw images of pixel values 0..1 (grey, or colour with 3 channels) in a grid of
    `columns`, titled if `titles`."""
    rows = -(-len(images) // columns)
    for i, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        axes.axis("off")
        if i < len(images):
            image = np.asarray(images[i])
            if image.shape[-1] == 3:
                axes.imshow(np.clip(image, 0, 1))
            else:
                axes.imshow(image.squeeze(), cmap="gray", vmin=0, vmax=1)
            if i < len(titles):
                axes.set_title(titles[i], fontsize=8)


def save_figure(figure: Figure, path: Path, **savefig_options) -> None:
    with files.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", **savefig_options)


def grid_path(out_dir: Path, epoch: int) -> Path:
    return out_dir / f"image_at_epoch_{epoch:04d}.png"


def frame_path(out_dir: Path, epoch: int) -> Path:
    """A frame of latent_means.gif: the test images' latent means after `epoch` epochs."""
    return out_dir / f"latent_means_epoch_{epoch:04d}.png"


def save_preview(images: np.ndarray, labels: Sequence[int], path: Path, title: str,
                 names: Sequence[str] = DIGITS, columns: int = 8) -> None:
    """A grid of images as the model sees them, each titled with its class (if `labels`)."""
    figure = Figure(figsize=(columns * 1.1, -(-len(images) // columns) * 1.3))
    image_grid(figure, images, columns, [names[label] for label in labels])
    figure.suptitle(title)
    save_figure(figure, path)


def generate_and_save_images(model: CVAE, epoch: int, test_sample: tf.Tensor, eps: tf.Tensor,
                             out_dir: Path, labels: np.ndarray | None = None) -> None:
    """Encode, reparameterize (noise `eps`) and decode `test_sample`; save the pixel
    probabilities (for the logistic, medians) as a 4x4 grid, image_at_epoch_NNNN.png."""
    y = classes(model, labels)
    mean, logvar = model.encode(test_sample, y)
    z = model.reparameterize(mean, logvar, eps)
    predictions = model.sample(z, y)
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
    """An animated GIF of the per-epoch grids, looping: grey where they are grey."""
    images = [iio.imread(frame)[..., :3] for frame in frames]
    if all(np.array_equal(image[..., 0], image[..., 2]) for image in images):
        images = [image[..., 0] for image in images]  # R = G = B
    with files.atomic_path(path) as tmp:
        iio.imwrite(tmp, np.stack(images), duration=seconds_per_frame * 1000, loop=0)


def latent_manifold(model: CVAE, n: int = MANIFOLD_SIZE) -> np.ndarray:
    """The tutorial's plot_latent_images, returning its image: an n x n grid of the latent
    plane decoded at the normal quantiles 0.05..0.95 (ndtri is the tutorial's Normal.quantile),
    z[0] by column, z[1] by row."""
    grid = tf.math.ndtri(tf.linspace(0.05, 0.95, n)).numpy()
    z_row, z_column = np.meshgrid(grid, grid, indexing="ij")
    z = np.stack([z_column.ravel(), z_row.ravel()], axis=1).astype(np.float32)
    height, width, channels = model.image_shape
    digits = model.sample(tf.constant(z)).numpy().reshape(n, n, height, width, channels)
    manifold = digits.transpose(0, 2, 1, 3, 4).reshape(n * height, n * width, channels)
    return manifold[..., 0] if channels == 1 else manifold


def save_latent_manifold(model: CVAE, path: Path, n: int = MANIFOLD_SIZE) -> None:
    """The manifold as a PNG, one pixel per decoded pixel (560 x 560 for n = 20)."""
    with files.atomic_path(path) as tmp:
        iio.imwrite(tmp, np.round(latent_manifold(model, n) * 255).astype(np.uint8))


# ----------------------------------------------------------------------------
# evaluate.py's pictures of a trained model


def noun(class_names: Sequence[str]) -> str:
    """What the pictures call the images: digits where the classes are MNIST's, else images."""
    return "digits" if tuple(class_names) == DIGITS else "images"


def classes(model: CVAE, labels: np.ndarray | None) -> tf.Tensor | None:
    """The classes a conditional model is given (as int32); None for the tutorial's CVAE."""
    return tf.constant(labels, tf.int32) if model.num_classes and labels is not None else None


def save_reconstructions(model: CVAE, images: np.ndarray, path: Path, what: str = "digits",
                         count: int = 32, columns: int = 8, labels: np.ndarray | None = None) -> None:
    """Test images (`what`), each row of them above a row of their reconstructions (decoded means)."""
    originals = images[:count]
    y = classes(model, None if labels is None else labels[:count])
    mean, _ = model.encode(originals, y)
    reconstructions = model.sample(mean, y).numpy()
    rows = []
    for start in range(0, len(originals), columns):
        rows += [originals[start:start + columns], reconstructions[start:start + columns]]
    figure = Figure(figsize=(columns, len(rows) * 1.05))
    image_grid(figure, np.concatenate(rows), columns)
    figure.suptitle(f"Test {what} (odd rows) and their reconstructions (even rows)")
    save_figure(figure, path, bbox_inches="tight")


def save_prior_samples(model: CVAE, path: Path, seed: int, count: int = 64) -> None:
    z = prior_draws(count, model.latent_dim, seed)
    figure = Figure(figsize=(8, 8.4))
    y = classes(model, np.arange(count) % max(1, model.num_classes))  # each class in turn
    image_grid(figure, model.sample(z, y).numpy(), 8)
    figure.suptitle(f"{count} samples from the prior, z ~ N(0, I)")
    save_figure(figure, path, bbox_inches="tight")


def latent_posteriors(model: CVAE, images: np.ndarray, labels: np.ndarray | None = None,
                      prepare: Callable[[np.ndarray], tf.Tensor] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's q(z|x) of `images` (given their classes, for a conditional model): means
    and log-variances, (N, latent_dim) each, ENCODE_BATCH images a call. `prepare` turns stored
    images into the model's input, a call's at a time (default: `images` are the input)."""
    prepare = prepare or tf.convert_to_tensor
    batches = range(0, len(images), ENCODE_BATCH)
    y = [None if labels is None else labels[start:start + ENCODE_BATCH] for start in batches]
    parts = [model.encode(prepare(images[start:start + ENCODE_BATCH]), classes(model, part))
             for start, part in zip(batches, y)]
    return tuple(np.concatenate([part[i].numpy() for part in parts]) for i in (0, 1))


def latent_means(model: CVAE, images: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """The encoder's means of `images`, (N, latent_dim)."""
    return latent_posteriors(model, images, labels)[0]


def principal_axes(means: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The means' centre, their principal axes (the columns, all of them) and the share of the
    variance along each: the plane of the first two shows the most of a latent space."""
    centre = means.mean(axis=0)
    _, singular_values, components = np.linalg.svd(means - centre, full_matrices=False)
    return centre, components.T, singular_values**2 / (singular_values**2).sum()


def save_latent_space(means: np.ndarray, labels: np.ndarray, path: Path,
                      names: Sequence[str] = DIGITS, epoch: int | None = None) -> None:
    """The test set's latent means, coloured by class (`names`: of the labels 0, 1, ..); the
    first two principal components when the latent space has more than two dimensions. With
    an `epoch`, a frame of latent_means.gif: fixed axes, and a fixed size."""
    if means.shape[1] == 1:
        points = np.stack([means[:, 0], labels + np.random.default_rng(0).uniform(-0.3, 0.3, len(labels))], 1)
        title, axis_labels = "Latent means (1-D), spread by label", ("z", "label")
    elif means.shape[1] == 2:
        points, title, axis_labels = means, "Latent means of the test set", ("z[0]", "z[1]")
    else:
        centre, axes, shares = principal_axes(means)
        points, explained = (means - centre) @ axes[:, :2], shares[:2].sum()
        title = (f"Latent means of the test set: first two principal components of "
                 f"{means.shape[1]} dimensions ({explained:.0%} of the variance)")
        axis_labels = ("PC 1", "PC 2")
    figure = Figure(figsize=(8, 7))
    axes = figure.add_subplot()
    classes = len(names)
    scatter = axes.scatter(points[:, 0], points[:, 1], c=labels, s=3, alpha=0.7, vmin=-0.5,
                           vmax=classes - 0.5, cmap="tab10" if classes <= 10 else "turbo")
    if classes > 1:
        ticks = range(0, classes, max(1, classes // 20))  # at most about 20 names
        colorbar = figure.colorbar(scatter, ax=axes, ticks=ticks, label="class")
        colorbar.ax.set_yticklabels([names[tick] for tick in ticks])
    axes.set(title=title, xlabel=axis_labels[0], ylabel=axis_labels[1])
    if epoch is None:
        save_figure(figure, path, bbox_inches="tight")
        return
    limits = (-FRAME_LIMIT, FRAME_LIMIT)
    axes.set(title=f"{title}, epoch {epoch}", xlim=limits, ylim=limits)
    save_figure(figure, path, dpi=60)


def save_interpolation(model: CVAE, images: np.ndarray, labels: np.ndarray, path: Path,
                       names: Sequence[str] = DIGITS, steps: int = 10) -> None:
    """Decode evenly spaced points on the line between the latent means of two test
    images of different classes (the first test image and the first of another label; the
    first two where there is one class)."""
    first, others = 0, np.flatnonzero(labels != labels[0])
    other = int(others[0]) if len(others) else 1
    mean, _ = model.encode(images[[first, other]])
    path_z, weights = latent_walk(mean[0].numpy(), mean[1].numpy(), steps)
    decoded = model.sample(tf.constant(path_z)).numpy()
    row = np.concatenate([images[[first]], decoded, images[[other]]])
    start, end = (names[labels[i]] if len(names) > 1 else "image" for i in (first, other))
    titles = [f"test {start}"] + [f"{w:.2f}" for w in weights] + [f"test {end}"]
    figure = Figure(figsize=(len(row) * 1.0, 1.6))
    image_grid(figure, row, len(row), titles)
    article = {name: "an" if name[0].lower() in "aeiou" else "a" for name in (start, end)}
    figure.suptitle(f"From {article[start]} {start} to {article[end]} {end} in latent space"
                    if len(names) > 1 else "From one test image to another in latent space")
    save_figure(figure, path, bbox_inches="tight")


def save_analogies(model: CVAE, images: np.ndarray, labels: np.ndarray, path: Path,
                   names: Sequence[str]) -> None:
    """A conditional model's analogies (Kingma et al. 2014, Fig. 1): a row per test image, its
    style z (the encoder's mean, given its class) decoded with every class in turn."""
    count = model.num_classes
    mean, _ = model.encode(images, classes(model, labels[:len(images)]))
    z = np.repeat(mean.numpy(), count, axis=0)
    y = np.tile(np.arange(count, dtype=np.int32), len(images))
    decoded = model.sample(tf.constant(z), tf.constant(y)).numpy()
    decoded = decoded.reshape(len(images), count, *images.shape[1:])
    grid = np.concatenate([images[:, np.newaxis], decoded], axis=1).reshape(-1, *images.shape[1:])
    figure = Figure(figsize=(count + 1, len(images) * 1.05 + 0.5))
    image_grid(figure, grid, count + 1, ["test image", *names] if len(names) == count else [])
    figure.suptitle("Each test image's style z, decoded with every class")
    save_figure(figure, path, bbox_inches="tight")


def save_training_curves(metrics: list[dict], path: Path) -> None:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    trained = [row for row in metrics if row["train_loss"] is not None]
    axes.plot([r["epoch"] for r in trained], [-r["train_loss"] for r in trained], "o-",
              label="train ELBO (minus the epoch's mean loss)")
    axes.plot([r["epoch"] for r in metrics if r["epoch"] > 0],
              [r["test_elbo"] for r in metrics if r["epoch"] > 0], "s-", label="test ELBO")
    axes.set(xlabel="epoch", ylabel="ELBO (nats per image)", title="Training curves")
    axes.grid(alpha=0.3)
    axes.legend()
    save_figure(figure, path, bbox_inches="tight")
