"""The images for the CVAE: load them, check them, binarize them (or scale their 8 bits), batch them.

--data PATH (or $CVAE_DATA) names a Keras .npz (x_train, y_train, x_test, y_test), a folder of
the four MNIST IDX files or a folder of images; without it, tf.keras.datasets.<--dataset> downloads.

    python dataset.py                              # inspect the data, write a preview PNG
    python dataset.py --data photos --image-size 32   # a folder of images, a subfolder per class
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from machinery import cli, data_files, files, image_folder
from machinery.cli import UserError
from machinery.settings import RunSettings

import numpy as np
import tensorflow as tf

import network
import pictures

DATA_ENV_VAR = "CVAE_DATA"
SEED = 42  # train.py's default --seed
LEVELS_8BIT = np.arange(256, dtype=np.float32) / 255.  # a pixel's value for the logistic likelihood
INSPECTED = 10_000  # images of a split that python dataset.py looks at pixel by pixel
EVAL_BATCH_SIZE = 1000  # 28x28 test images a batch of the test ELBO (its noise is drawn a batch at a time)
KERAS_DATASETS = {"mnist": tf.keras.datasets.mnist, "fashion_mnist": tf.keras.datasets.fashion_mnist,
                  "cifar10": tf.keras.datasets.cifar10}
TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}
CLASS_NAMES = {  # what the labels 0..9 mean, for the pictures
    "mnist": pictures.DIGITS,
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
}

Split = tuple[np.ndarray, np.ndarray]  # (images uint8 (N, H, W) or (N, H, W, C), labels uint8 (N,))


def add_data_flags(parser: argparse.ArgumentParser, datasets: Sequence[str] = tuple(KERAS_DATASETS),
                   pictures: bool = True, folders: bool = True) -> None:
    """--data and --dataset: where the data comes from (`datasets`: which downloads it may name;
    `pictures`: whether the script draws pictures that the class names label); with
    `folders`, the flags of a folder of images."""
    parser.add_argument("--data", default=None,
                        help=f"Keras .npz, folder of MNIST IDX files"
                             f"{', or folder of images (a subfolder per class)' if folders else ''} "
                             f"(default: ${DATA_ENV_VAR}, else the Keras download)")
    parser.add_argument("--dataset", choices=datasets, default=RunSettings.dataset,
                        help="which Keras download to use when no --data is given"
                             + (", and whose class names label the pictures" if pictures else ""))
    if folders:
        image_folder.add_flags(parser)


# ----------------------------------------------------------------------------
# Loading and checking


@dataclasses.dataclass
class Data:
    """The images, checked: uint8 (N, H, W[, C]) with uint8 labels, per split."""

    train: Split
    test: Split
    class_names: tuple[str, ...]  # what the labels 0, 1, .. mean
    fingerprint: str  # SHA-256 of the images and labels (of a folder: its files and settings)
    folder_report: dict | None = None  # for a folder of images: what was found and done
    source: str | None = None  # the file or folder read; None for the Keras download

    @property
    def splits(self) -> tuple[Split, Split]:
        return self.train, self.test

    @property
    def default_likelihood(self) -> str:
        """The 8-bit logistic for a folder of images or colour ones, else the tutorial's Bernoulli."""
        colour = data_files.image_shape(self.train[0])[2] == 3
        return "logistic" if self.folder_report or colour else "bernoulli"


def load_data(
    path: str | None = None, train_size: int | None = None, test_size: int | None = None,
    name: str = "mnist", folder: image_folder.Settings | None = None, expected: str | None = None,
) -> Data:
    """The data at `path`: a .npz file, an IDX folder or a folder of images (read as
    `folder` says); None means $CVAE_DATA, then the Keras download of `name` (mnist,
    fashion_mnist or cifar10). `train_size` / `test_size` keep only the first N images of a split.
    A folder whose fingerprint is not `expected` is refused before it is decoded.
    """
    path, folder = data_source(path), folder or image_folder.Settings()
    arrays, source = None, path or "the Keras download"
    if path is not None and not Path(path).exists():
        raise UserError(f"{path}: no such file or folder")
    if path is not None and Path(path).is_dir() and image_folder.is_image_folder(Path(path)):
        arrays = image_folder.load(Path(path), folder, expected, (train_size, test_size))
    elif folder.image_size or folder.channels:
        raise UserError("--image-size and --channels are for a folder of images; "
                        f"{source} is not one")
    elif path is None:
        arrays = _download(name)
    else:
        arrays = (data_files.read_idx_folder if Path(path).is_dir() else data_files.read_npz)(Path(path))
    # The file's own class names, else --dataset's: as many as its labels use (8 for 0..7).
    used = 1 + max(int(np.max(arrays[f"y_{split}"], initial=0)) for split in ("train", "test"))
    class_names = tuple(arrays.get("class_names", CLASS_NAMES[name][:used]))
    splits = []
    for split, size in (("train", train_size), ("test", test_size)):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if labels.ndim == 2 and labels.shape[1:] == (1,):  # CIFAR-10's labels are (N, 1)
            labels = labels[:, 0]
        data_files.check_split(images, labels, f"{source}: {split} split", len(class_names))
        if size is not None:
            data_files.check_size(split, size, len(images), source)
            images, labels = images[:size], labels[:size]
        splits.append((images, labels.astype(np.uint8)))
    train_shape, test_shape = (data_files.image_shape(images) for images, _ in splits)
    if train_shape != test_shape:
        raise UserError(f"{source}: train images are {train_shape}, test images {test_shape}: "
                        f"both splits need one shape")
    digest = arrays.get("fingerprint") or data_files.fingerprint(*splits[0], *splits[1])
    return Data(splits[0], splits[1], class_names, digest, arrays.get("report"), path)


def load_run_data(settings: RunSettings, source: str | None, check: bool) -> Data:
    """The data a run's settings ask for, from `source` (as load_data's `path`); with `check`,
    refused unless it is the data the run was trained on (its fingerprint)."""
    try:
        data = load_data(source, settings.train_size, settings.test_size, settings.dataset,
                         image_folder.settings(settings), settings.data_sha256 if check else None)
    except image_folder.Changed:
        data = None
    if check and (data is None or data.fingerprint != settings.data_sha256):
        raise UserError(f"the data from {source or 'the Keras download'} is not the data the run was "
                        f"trained on (a file added, removed or changed?); pass that with --data")
    return data


def data_source(path: str | None = None) -> str | None:
    """Where load_data(path) reads from: `path`, else $CVAE_DATA, else None (download)."""
    return path or os.environ.get(DATA_ENV_VAR) or None


def refuse_two_sources(args: argparse.Namespace, given: set[str]) -> None:
    """A typed --dataset with $CVAE_DATA set and no --data names two sources: refuse it in one
    line that says what to do, rather than label the file's images with another's classes."""
    if "dataset" in given and not args.data and (path := os.environ.get(DATA_ENV_VAR)):
        raise UserError(f"--dataset {args.dataset} asks for a Keras download, but {DATA_ENV_VAR} names "
                        f"{path}: pass that file with --data (--dataset then names its classes), or "
                        f"clear {DATA_ENV_VAR} to download {args.dataset} (bash: unset {DATA_ENV_VAR}; "
                        f"PowerShell: Remove-Item Env:{DATA_ENV_VAR})")


def _download(name: str) -> dict[str, np.ndarray]:
    try:
        (x_train, y_train), (x_test, y_test) = KERAS_DATASETS[name].load_data()
    except Exception as error:  # noqa: BLE001 - any network or cache failure ends the same way
        raise UserError(f"could not download {TITLES[name]} ({cli.first_line(error)}); pass a local "
                        f"copy with --data PATH or {DATA_ENV_VAR}=PATH (a Keras .npz or a folder of "
                        f"IDX files)") from None
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


# ----------------------------------------------------------------------------
# Preprocessing and batching


def binarize(images: np.ndarray | tf.Tensor) -> tf.Tensor:
    """uint8 (N, H, W[, C]) -> float32 (N, H, W, C): 1.0 where pixel / 255 > 0.5, else 0.0,
    the tutorial's static binarization compared in uint8 (pixel > 127), a batch at a time."""
    return tf.cast(_with_channel_axis(images) > 127, tf.float32)


def scale_8bit(images: np.ndarray | tf.Tensor) -> tf.Tensor:
    """uint8 (N, H, W[, C]) -> float32 (N, H, W, C), pixel / 255: the 256 levels the discretized logistic
    models, looked up (a compiled x / 255 becomes x * (1 / 255), which rounds differently)."""
    return tf.gather(LEVELS_8BIT, tf.cast(_with_channel_axis(images), tf.int32))


def _with_channel_axis(images: np.ndarray | tf.Tensor) -> tf.Tensor:
    images = tf.convert_to_tensor(images)
    return images[..., tf.newaxis] if images.shape.rank == 3 else images


def preprocess(images: np.ndarray | tf.Tensor, likelihood: str) -> tf.Tensor:
    """The images as the model takes them: binarized for the Bernoulli, scaled for the logistic."""
    return binarize(images) if likelihood == "bernoulli" else scale_8bit(images)


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The order of one epoch: a uniform permutation, as the tutorial's
    shuffle(train_size), but a function of (seed, epoch) alone, so any epoch
    can be replayed without replaying the ones before it."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def eval_batch_size(shape: Sequence[int]) -> int:
    """EVAL_BATCH_SIZE for 28x28 images, fewer for larger ones: a batch's memory stays that of MNIST's."""
    height, width, _ = shape
    return max(1, EVAL_BATCH_SIZE * 28 * 28 // (height * width))


def make_batches(images: tf.Tensor | np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Batches of `images` as stored; the last may be smaller."""
    # In memory, a batch is a slice: the autotuner has nothing to tune, and its thread stalls
    # the iterator's shutdown (docs/speed.md#several-steps-per-call-in-memory-batches-the-test-elbo).
    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.from_tensor_slices(images).batch(batch_size).with_options(options)


# ----------------------------------------------------------------------------
# python dataset.py: what is in the data


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(description="Inspect the images as the CVAE sees them.")
    add_data_flags(parser)
    parser.add_argument("--likelihood", choices=network.LIKELIHOODS, default=None,
                        help="show the images as this p(x|z) takes them: binarized (bernoulli) "
                             "or 8-bit (logistic) (default: bernoulli for grey, logistic for colour)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=32,
                        help="batch size for the batches-per-epoch count")
    parser.add_argument("--out-dir", default="output", help="folder for the preview PNG")
    args = parser.parse_args(argv)
    refuse_two_sources(args, cli.explicit_flags(parser, argv))

    out_dir = files.ensure_out_dir(args.out_dir)
    print(f"Source: {data_source(args.data) or f'tf.keras.datasets.{args.dataset}.load_data()'}")
    data = load_data(args.data, name=args.dataset, folder=image_folder.settings(args))
    splits = dict(zip(("train", "test"), data.splits))
    for line in image_folder.report_lines(data.folder_report or {}):
        print(f"  {line}")

    print("\nAs loaded:")
    for name, (images, labels) in splits.items():
        print(f"  {name:5s} images {str(images.shape):19s} {images.dtype}   "
              f"labels {labels.shape} {labels.dtype} {labels.min()}..{labels.max()}")
    likelihood = args.likelihood or data.default_likelihood
    print("\nAfter binarization (pixel / 255 > 0.5), for the Bernoulli likelihood"
          if likelihood == "bernoulli" else
          "\nAs 8-bit levels (pixel / 255), for the discretized logistic likelihood", end="")
    print(f" (up to {INSPECTED:,} images of each split):")
    prepared = {name: preprocess(data_files.with_channels(images[:INSPECTED]), likelihood).numpy()
                for name, (images, _) in splits.items()}
    for name, images in prepared.items():
        levels = np.unique(images)
        values = ("{" + ", ".join(f"{v:g}" for v in levels) + "}" if len(levels) <= 4
                  else f"{len(levels)} levels {levels.min():g}..{levels.max():g}")
        print(f"  {name:5s} images {str(images.shape[1:]):15s} {images.dtype}  values {values}  "
              f"mean {images.mean():.3f}")

    names = data.class_names
    print("\nImages per class:")
    width = max(12, *(len(name) + 4 for name in names))
    print(f"  {'class':{width}s}" + "".join(f"{name:>8s}" for name in splits))
    counts = {name: np.bincount(labels, minlength=len(names)) for name, (_, labels) in splits.items()}
    numbered = names != pictures.DIGITS[:len(names)]  # MNIST's class names are its labels: once is enough
    for label in range(len(names)):
        row = f"{label} {names[label]}" if numbered else names[label]
        print(f"  {row:{width}s}" + "".join(f"{counts[split][label]:8d}" for split in splits))
    print(f"  {'total':{width}s}" + "".join(f"{len(labels):8d}" for _, labels in splits.values()))

    print(f"\nBatches per epoch at batch size {args.batch_size}: " + ", ".join(
        f"{name} {-(-len(labels) // args.batch_size)}" for name, (_, labels) in splits.items()))

    preview = out_dir / "dataset_preview.png"
    how = "Binarized" if likelihood == "bernoulli" else "8-bit"
    titled = len(names) > 1  # a flat folder's images have no classes to show
    pictures.save_preview(prepared["train"][:32], splits["train"][1][:32] if titled else [], preview,
                 f"{how} training images" + (" (class above each)" if titled else ""), names)
    print(f"\nPreview of 32 {how.lower()} training images written to {preview}")


if __name__ == "__main__":
    cli.run(main)
