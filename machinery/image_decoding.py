"""Image files into pixels: Pillow decodes them on every core into a .npy file in the
cache folder, which later runs on the same files and settings map into memory instead of
decoding them again (an image's uint8 pixels stay on disk until a batch needs them). A
checksum beside each cached file, checked by reading it whole when a run starts, catches
damage, which is decoded again."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from machinery import cli, files
from machinery.cli import UserError

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps

CACHE_ENV_VAR = "CVAE_CACHE"
# How files become pixels, in a folder's fingerprint: 2 since EXIF orientation and JPEG drafts, so
# that a run decoded the older way is refused by --resume rather than trained on other pixels.
DECODING_VERSION = 2
WORKERS = os.cpu_count() or 1
CHUNK = 250  # files a task: fewer tasks, less of the thread pool's overhead
EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a photo is turned; 5 to 8 swap its sides
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)  # Pillow's errors


def cache_folder() -> Path:
    """Where decoded folders are kept: $CVAE_CACHE, else ~/.cache/cvae-tensorflow."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "cvae-tensorflow")


def in_parallel(job: Callable, items: Sequence, progress: str | None = None,
                workers: int = WORKERS) -> list:
    """[job(item) for item in items] in `workers` threads (Pillow's decoders let go of the
    GIL), in chunks, with a progress bar where there is much to do."""
    chunks = [items[start:start + CHUNK] for start in range(0, len(items), CHUNK)]
    bar = None
    if progress and len(items) >= 2000:
        bar = tf.keras.utils.Progbar(len(items), verbose=1 if sys.stdout.isatty() else 2,
                                     unit_name=progress)
    results = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        try:
            for chunk_results in pool.map(lambda chunk: [job(item) for item in chunk], chunks):
                results += chunk_results
                if bar:
                    bar.update(len(results))
        except BaseException:  # the first error (or Ctrl-C) stops the chunks not yet started
            pool.shutdown(cancel_futures=True)
            raise
    return results


def upright_size(image: Image.Image) -> tuple[int, int]:
    """The image's (width, height) once turned upright by its EXIF orientation, from its header."""
    return image.size[::-1] if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else image.size


def decode(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """One image as uint8 (height, width, channels): the first frame, turned upright by its
    EXIF orientation, transparency composited on white, centre-cropped to the aspect ratio
    of `size` (height, width) and resized. A large JPEG is decoded at the smallest of its
    scales (1/2, 1/4, 1/8) that still covers `size`: a phone photo in a fifth of the time."""
    try:
        with Image.open(path) as image:
            turned = upright_size(image) != image.size
            image.draft(None, size if turned else size[::-1])  # (width, height); its mode kept
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: its top 8 bits (convert clips)
                image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8))
            if image.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in image.info:
                image = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
            image = image.convert("L" if channels == 1 else "RGB")
            height, width = size
            if image.size != (width, height):
                image = ImageOps.fit(image, (width, height), Image.Resampling.BILINEAR)
            return np.asarray(image).reshape(height, width, channels)
    except UNREADABLE as error:
        raise UserError(f"{path}: cannot decode it ({cli.first_line(error)})") from None


def decoded(paths: Sequence[Path], fingerprint: str, size: tuple[int, int], channels: int) -> np.ndarray:
    """The images at `paths` as uint8 (N, height, width, channels), mapped from the cache
    file of their `fingerprint`; decoded into it first if it is not there."""
    path = cache_folder() / f"{fingerprint[:32]}.npy"
    checksum = path.with_name(path.name + ".sha256")
    shape = (len(paths), *size, channels)
    if path.is_file():
        try:
            images = np.load(path, mmap_mode="r")
            intact = checksum.is_file() and checksum.read_text().strip() == file_sha256(path)
            if images.shape == shape and images.dtype == np.uint8 and intact:
                print(f"Images decoded by an earlier run, from {path}")
                return images
        except (OSError, ValueError):
            pass  # damaged: decode again
        print(f"The images cached in {path} do not match their checksum (damaged, or cached by "
              f"an older version): decoding them again")
    files.ensure_out_dir(path.parent, flag=f"the cache folder (${CACHE_ENV_VAR})")
    print(f"Decoding {len(paths):,} images into {path} (kept for later runs)")
    with files.atomic_path(path) as tmp:
        _decode_into(tmp, paths, size, channels)
    with files.atomic_path(checksum) as tmp:  # after the images: a file without one is decoded again
        tmp.write_text(file_sha256(path) + "\n")
    return np.load(path, mmap_mode="r")


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """The SHA-256 of a file, read a chunk at a time (a cache file may be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _decode_into(file: Path, paths: Sequence[Path], size: tuple[int, int], channels: int) -> None:
    """Decode `paths` on every core into a new .npy `file`, closed once written."""
    images = np.lib.format.open_memmap(file, mode="w+", dtype=np.uint8, shape=(len(paths), *size, channels))

    def into_place(index: int) -> None:
        images[index] = decode(paths[index], size, channels)

    in_parallel(into_place, range(len(paths)), "image")
    images.flush()
