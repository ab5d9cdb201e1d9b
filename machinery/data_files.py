"""The files the data may come in: a Keras-format .npz, or a folder of the four MNIST IDX
files (plain or gzipped), read and checked for their format, with one clear line for
anything wrong; then their arrays checked, and fingerprinted."""

from __future__ import annotations

import gzip
import hashlib
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from machinery import cli
from machinery.cli import UserError

import numpy as np

# Keras' array names and the IDX files that LeCun's site and its mirrors ship.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes; 3 dims for images, 1 for labels


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise UserError(f"{path}: a single .npy array, not an .npz archive of images")
        with archive:
            missing = [key for key in IDX_FILES if key not in archive.files]
            if missing:
                raise UserError(
                    f"{path}: missing {', '.join(missing)} (a Keras-format .npz holds "
                    f"{', '.join(IDX_FILES)})"
                )
            return {key: archive[key] for key in IDX_FILES}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        # np.load says "pickled data" for any file that is neither .npy nor .npz.
        reason = "not an .npz or zip file" if "pickle" in str(error) else cli.first_line(error)
        raise UserError(f"{path}: cannot read it as .npz ({reason})") from None


def read_idx_folder(folder: Path) -> dict[str, np.ndarray]:
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


def image_shape(images: np.ndarray) -> tuple[int, int, int]:
    """(height, width, channels) of uint8 images (N, H, W) or (N, H, W, C)."""
    return (*images.shape[1:3], images.shape[3] if images.ndim == 4 else 1)


def with_channels(images: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, H, W, 1); (N, H, W, C) as it is (a view: no copy)."""
    return images.reshape(len(images), *image_shape(images))


def image_shape_problem(shape: Sequence[int]) -> str | None:
    """Why the CVAE cannot take images of `shape` (height, width, channels); None if it can."""
    height, width, channels = shape
    if height % 4 or width % 4 or min(height, width) < 8:
        return (f"images of {height}x{width} pixels: the CVAE needs sides that are multiples "
                f"of 4, at least 8 (its decoder doubles a quarter-size start twice)")
    if channels not in (1, 3):
        return f"images of {channels} channels: the CVAE draws 1 (grey) or 3 (colour)"
    return None


def check_size(split: str, size: int | None, available: int, source: str) -> None:
    """Refuse a --train-size or --test-size (`size`, of the `split`) larger than the images there."""
    if size is not None and size > available:
        raise UserError(f"--{split}-size {size} is larger than the {available} {split} images in {source}")


def check_split(images: np.ndarray, labels: np.ndarray, where: str, num_classes: int) -> None:
    """One clear line for images or labels that the model cannot take."""
    if images.ndim not in (3, 4):
        raise UserError(f"{where}: images have shape {images.shape}, expected (N, H, W) or "
                        f"(N, H, W, C)")
    if problem := image_shape_problem(image_shape(images)):
        raise UserError(f"{where}: {problem}")
    if images.dtype != np.uint8:
        raise UserError(f"{where}: images are {images.dtype}, expected uint8 pixels 0..255")
    if len(images) == 0:
        raise UserError(f"{where}: no images")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{where}: {labels.shape} labels for {len(images)} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{where}: labels are {labels.dtype}, expected integers 0..{num_classes - 1}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"{where}: labels range {labels.min()}..{labels.max()}, expected "
                        f"0..{num_classes - 1}")


def fingerprint(*arrays: np.ndarray) -> str:
    """A SHA-256 of the arrays' shapes and bytes: the same data, wherever it was read from."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))  # no copy of the bytes
    return digest.hexdigest()
