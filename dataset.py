"""MNIST (or Fashion-MNIST) for the CVAE: load it, check it, binarize it, batch it.

Where the data comes from, first match wins:
  --data PATH (or the CVAE_DATA variable): a Keras-format .npz (x_train, y_train,
  x_test, y_test) or a folder with the four MNIST IDX files, plain or .gz;
  otherwise tf.keras.datasets.mnist.load_data(), which downloads once.

    python dataset.py                    # inspect the data, write a preview PNG
    python dataset.py --data mnist.npz   # the same, offline
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from machinery import cli, files
from machinery.cli import UserError

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

import pictures

IMAGE_SIZE = 28
NUM_CLASSES = 10
DATA_ENV_VAR = "CVAE_DATA"
EVAL_BATCH_SIZE = 1000  # test images a batch of the test ELBO (the noise is drawn a batch at a time)
# Keras' array names and the IDX files that LeCun's site and its mirrors ship.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
KERAS_DATASETS = {"mnist": tf.keras.datasets.mnist, "fashion_mnist": tf.keras.datasets.fashion_mnist}
TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes; 3 dims for images, 1 for labels

Split = tuple[np.ndarray, np.ndarray]  # (images uint8 (N, 28, 28), labels uint8 (N,))


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """--data and --dataset: where the data comes from."""
    parser.add_argument("--data", default=None,
                        help=f"Keras .npz or folder of MNIST IDX files (default: ${DATA_ENV_VAR}, "
                             f"else the Keras download)")
    parser.add_argument("--dataset", choices=tuple(KERAS_DATASETS), default="mnist",
                        help="which Keras download to use when no --data is given")


# ----------------------------------------------------------------------------
# Loading and checking


def load_mnist(
    path: str | None = None, train_size: int | None = None, test_size: int | None = None,
    name: str = "mnist",
) -> tuple[Split, Split]:
    """Return (x_train, y_train), (x_test, y_test), checked, as uint8 arrays.

    `path` is a .npz file or an IDX folder; None means $CVAE_DATA, then the Keras
    download of `name` (mnist or fashion_mnist, which has MNIST's format and file names).
    `train_size` / `test_size` keep only the first N images of a split.
    """
    path = data_source(path)
    if path is None:
        arrays, source = _download(name), "the Keras download"
    else:
        source = path
        if not Path(path).exists():
            raise UserError(f"{path}: no such file or folder")
        arrays = _read_idx_folder(Path(path)) if Path(path).is_dir() else _read_npz(Path(path))
    splits = []
    for split, size in (("train", train_size), ("test", test_size)):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        _check_split(images, labels, f"{source}: {split} split")
        if size is not None:
            if size > len(images):
                raise UserError(
                    f"--{split}-size {size} is larger than the {len(images)} {split} images in {source}"
                )
            images, labels = images[:size], labels[:size]
        splits.append((images, labels.astype(np.uint8)))
    return splits[0], splits[1]


def data_source(path: str | None = None) -> str | None:
    """Where load_mnist(path) reads from: `path`, else $CVAE_DATA, else None (download)."""
    return path or os.environ.get(DATA_ENV_VAR) or None


def fingerprint(*arrays: np.ndarray) -> str:
    """A SHA-256 of the arrays' shapes and bytes: the same data, wherever it was read from."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _download(name: str) -> dict[str, np.ndarray]:
    try:
        (x_train, y_train), (x_test, y_test) = KERAS_DATASETS[name].load_data()
    except Exception as error:  # noqa: BLE001 - any network or cache failure ends the same way
        reason = cli.first_line(error)
        raise UserError(
            f"could not download {TITLES[name]} ({reason}); pass a local copy with --data PATH "
            f"or {DATA_ENV_VAR}=PATH (a Keras .npz or a folder of IDX files)"
        ) from None
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise UserError(f"{path}: a single .npy array, not an .npz archive of MNIST")
        with archive:
            missing = [key for key in IDX_FILES if key not in archive.files]
            if missing:
                raise UserError(
                    f"{path}: missing {', '.join(missing)} (a Keras MNIST .npz holds "
                    f"{', '.join(IDX_FILES)})"
                )
            return {key: archive[key] for key in IDX_FILES}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        # np.load says "pickled data" for any file that is neither .npy nor .npz.
        reason = "not an .npz or zip file" if "pickle" in str(error) else cli.first_line(error)
        raise UserError(f"{path}: cannot read it as .npz ({reason})") from None


def _read_idx_folder(folder: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for key, name in IDX_FILES.items():
        candidates = [folder / name, folder / f"{name}.gz"]
        found = next((file for file in candidates if file.is_file()), None)
        if found is None:
            raise UserError(f"{folder}: no {name} (or {name}.gz); an MNIST IDX folder holds "
                            f"{', '.join(IDX_FILES.values())}")
        arrays[key] = read_idx(found, ndim=3 if key.startswith("x") else 1)
    return arrays


def read_idx(file: Path, ndim: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes (plain or gzipped) with `ndim` dimensions."""
    try:
        with (gzip.open if file.suffix == ".gz" else open)(file, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{file}: cannot read it ({cli.first_line(error)})") from None
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise UserError(f"{file}: truncated: {len(data)} bytes, shorter than an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != IDX_MAGIC[ndim]:
        raise UserError(
            f"{file}: wrong magic number 0x{magic:08x}, expected 0x{IDX_MAGIC[ndim]:08x} "
            f"({'images' if ndim == 3 else 'labels'} of unsigned bytes)"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_size + int(np.prod(shape))
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise UserError(f"{file}: {problem}: {len(data)} bytes, but its header {shape} "
                        f"needs {expected}")
    return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def _check_split(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise UserError(f"{where}: images have shape {images.shape}, expected (N, 28, 28)")
    if images.dtype != np.uint8:
        raise UserError(f"{where}: images are {images.dtype}, expected uint8 pixels 0..255")
    if len(images) == 0:
        raise UserError(f"{where}: no images")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{where}: {labels.shape} labels for {len(images)} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{where}: labels are {labels.dtype}, expected integers 0..9")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise UserError(f"{where}: labels range {labels.min()}..{labels.max()}, expected 0..9")


# ----------------------------------------------------------------------------
# Preprocessing and batching


def binarize(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1): 1.0 where pixel / 255 > 0.5, else 0.0.

    The tutorial's static binarization, compared in uint8 (pixel > 127.5) to skip
    its float64 copy of the whole set.
    """
    return (images[..., np.newaxis] > 127.5).astype(np.float32)


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The order of one epoch: a uniform permutation, as the tutorial's
    shuffle(train_size), but a function of (seed, epoch) alone, so any epoch
    can be replayed without replaying the ones before it."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def epoch_images(images: tf.Tensor, seed: int, epoch: int) -> tf.Tensor:
    """`images` in the order of `epoch`: one permuted copy, whose consecutive slices are
    that epoch's batches. Pass a tensor made once (tf.constant): the copy is then one
    fast gather, with no conversion of the whole set from numpy."""
    return tf.gather(images, epoch_order(len(images), seed, epoch))


def make_batches(images: tf.Tensor | np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Batches of `images` as stored; the last may be smaller."""
    # In memory, a batch is a slice: the autotuner has nothing to tune, and its thread
    # stalls the iterator's shutdown (docs/speed.md#in-memory-batches).
    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.from_tensor_slices(images).batch(batch_size).with_options(options)


# ----------------------------------------------------------------------------
# python dataset.py: what is in the data


def save_preview(images: np.ndarray, labels: np.ndarray, path: Path, columns: int = 8) -> None:
    """A grid of binarized digits, each titled with its label."""
    figure = Figure(figsize=(columns * 1.1, -(-len(images) // columns) * 1.3))
    pictures.image_grid(figure, images, columns, [str(label) for label in labels])
    figure.suptitle("Binarized training images (label above each)")
    pictures.save_figure(figure, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(description="Inspect MNIST as the CVAE sees it.")
    add_data_flags(parser)
    parser.add_argument("--batch-size", type=cli.positive_int, default=32,
                        help="batch size for the batches-per-epoch count")
    parser.add_argument("--out-dir", default="output", help="folder for the preview PNG")
    args = parser.parse_args(argv)

    out_dir = files.ensure_out_dir(args.out_dir)
    print(f"Source: {data_source(args.data) or f'tf.keras.datasets.{args.dataset}.load_data()'}")
    splits = dict(zip(("train", "test"), load_mnist(args.data, name=args.dataset)))

    print("\nAs loaded:")
    for name, (images, labels) in splits.items():
        print(f"  {name:5s} images {str(images.shape):16s} {images.dtype}  "
              f"values {images.min()}..{images.max()}   "
              f"labels {labels.shape} {labels.dtype} {labels.min()}..{labels.max()}")
    print("\nAfter binarization (pixel / 255 > 0.5):")
    binarized = {name: binarize(images) for name, (images, _) in splits.items()}
    for name, images in binarized.items():
        values = ", ".join(f"{v:g}" for v in np.unique(images))
        print(f"  {name:5s} images {str(images.shape):19s} {images.dtype}  values {{{values}}}  "
              f"mean {images.mean():.3f}")

    print("\nImages per class:")
    print("  label " + "".join(f"{name:>8s}" for name in splits))
    counts = {name: np.bincount(labels, minlength=NUM_CLASSES) for name, (_, labels) in splits.items()}
    for digit in range(NUM_CLASSES):
        print(f"  {digit:5d} " + "".join(f"{counts[name][digit]:8d}" for name in splits))
    print("  total " + "".join(f"{len(labels):8d}" for _, labels in splits.values()))

    print(f"\nBatches per epoch at batch size {args.batch_size}: " + ", ".join(
        f"{name} {-(-len(labels) // args.batch_size)}" for name, (_, labels) in splits.items()))

    preview = out_dir / "dataset_preview.png"
    save_preview(binarized["train"][:32], splits["train"][1][:32], preview)
    print(f"\nPreview of 32 binarized training digits written to {preview}")


if __name__ == "__main__":
    cli.run(main)
