"""A folder of image files as a data set, in the layout of Keras'
image_dataset_from_directory: a subfolder per class (their names, sorted, are the classes)
or a flat folder of unlabelled images, optionally inside train/ and test/ folders; its
split, its fingerprint, and the flags that say how its files become arrays."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from machinery import cli, data_files, image_decoding
from machinery.cli import UserError

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # those Keras' loader takes
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")  # Pillow's modes without colour
MAX_CLASSES = 100  # class subfolders; more is more likely a flat folder of folders
DEFAULT_TEST_FRACTION = 0.1
SPLIT_SEED = 42  # --split-seed's default: the runs of every --seed share one test set (and cache)
SPLIT_STREAM = 30  # the random stream of the split, apart from the seed's other uses


@dataclasses.dataclass
class Settings:
    """How the files become arrays: `image_size` (height, width) or None to keep the one
    size they share; `channels` 1, 3 or None for 3 if any image has colour."""

    image_size: tuple[int, int] | None = None
    channels: int | None = None
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = 0  # of the split and of each split's order


@dataclasses.dataclass
class Listing:
    files: list[Path]  # the images, train split first, each split in an order drawn from the seed
    labels: np.ndarray  # uint8, a class index per file
    num_train: int
    class_names: list[str]
    split: str  # how the test set was chosen
    left_out: list[str]  # files that are not images (by extension), as Keras leaves them out


def add_flags(parser: argparse.ArgumentParser) -> None:
    """--image-size, --channels, --test-fraction and --split-seed: how a folder's files
    become arrays."""
    parser.add_argument("--image-size", type=image_size, default=None, metavar="N or H,W",
                        help="centre-crop and resize a folder's images to N x N (or H x W), sides "
                             "multiples of 4 (default: the size they all have)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="grey (1) or colour (3) for a folder's images (default: 3 if any "
                             "image has colour, else 1)")
    parser.add_argument("--test-fraction", type=cli.fraction, default=DEFAULT_TEST_FRACTION,
                        help="share of a folder's images held out for testing, drawn with "
                             "--split-seed (unless the folder has train/ and test/ folders)")
    parser.add_argument("--split-seed", type=cli.seed_int, default=SPLIT_SEED,
                        help="seed of a folder's test split and of its images' order, apart from "
                             "--seed: runs of any --seed share one test set")


def image_size(text: str) -> list[int]:
    """--image-size: N for N x N, or H,W; sides the CVAE can take."""
    try:
        sides = [int(side) for side in text.split(",")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} is not N or H,W (whole numbers of pixels)")
    height, width = sides * 2 if len(sides) == 1 else sides
    if problem := data_files.image_shape_problem((height, width, 1)):
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return [height, width]


def settings(given: argparse.Namespace | dict) -> Settings:
    """The Settings that flags, or a run's config.json, ask for. A run made before
    --split-seed drew its split with its --seed."""
    get = given.get if isinstance(given, dict) else lambda key: getattr(given, key, None)
    split_seed = get("split_seed") if get("split_seed") is not None else get("seed")
    return Settings(tuple(get("image_size")) if get("image_size") else None, get("channels"),
                    get("test_fraction") or DEFAULT_TEST_FRACTION, split_seed or 0)


def report_lines(report: dict) -> list[str]:
    """What python dataset.py says of a folder: the files found, and what became of them."""
    if not report:
        return []
    (width, height), (big_width, big_height) = report["smallest"], report["largest"]
    lines = [f"{report['images']:,} images ({report['colour_files']:,} in colour), split by "
             f"{report['split']}",
             f"sizes found: {report['sizes_found']:,} (from {width}x{height} to {big_width}x{big_height}); "
             f"as the model takes them: {'x'.join(map(str, report['image_size']))}, "
             f"{report['channels']} channel{'s' * (report['channels'] > 1)}"]
    if report["resized"]:
        lines.append(f"{report['resized']:,} centre-cropped and resized, {report['upscaled']:,} of "
                     f"them upscaled (smaller than the size asked for)")
    if left_out := report["left_out"]:
        lines.append(f"{len(left_out):,} file{'s' * (len(left_out) > 1)} left out, not images by "
                     f"their extension: {', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}")
    return lines


def is_image_folder(folder: Path) -> bool:
    """A folder that holds image files (at any depth), as opposed to MNIST's IDX files."""
    return any(path.suffix.lower() in IMAGE_EXTENSIONS for path in folder.rglob("*"))


def _walk(folder: Path, left_out: list[Path]) -> list[Path]:
    """The image files under `folder`, sorted; hidden files (.DS_Store, ._x.png) skipped."""
    found, others = [], []
    for parent, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            if not name.startswith("."):
                is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                (found if is_image else others).append(os.path.join(parent, name))
    left_out += map(Path, sorted(others))
    return [Path(path) for path in sorted(found)]  # sorted as text: fast for many files


def _classes(folder: Path, left_out: list[str]) -> tuple[list[str], list[list[Path]]]:
    """Class subfolders and their images, or the folder itself as one class."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        images = _walk(folder, left_out)
        if not images:
            raise UserError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return [folder.name], [images]
    if len(subfolders) > MAX_CLASSES:
        raise UserError(f"{folder} has {len(subfolders)} class folders; at most {MAX_CLASSES} are "
                        f"supported (for unlabelled images, put them all in one folder)")
    left_out += [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    per_class = []
    for subfolder in subfolders:
        if not (images := _walk(subfolder, left_out)):
            raise UserError(f"class folder {subfolder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        per_class.append(images)
    return [p.name for p in subfolders], per_class


def list_images(folder: Path, settings: Settings) -> Listing:
    """The folder's images and labels, split: by its train/ and test/ folders where it has
    them, else a test_fraction drawn from the seed. Each split is in an order drawn from
    the seed, so that its first images (--train-size, the pictures) mix the classes."""
    left_out: list[Path] = []
    rng = np.random.default_rng([settings.seed, SPLIT_STREAM])
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        names, train = _classes(folder / "train", left_out)
        test_names, test = _classes(folder / "test", left_out)
        if (names, test_names) == (["train"], ["test"]):  # both flat: one class, the folder's
            names = test_names = [folder.name]
        if test_names != names:
            raise UserError(f"{folder}: train/ has the classes {', '.join(names)}, test/ has "
                            f"{', '.join(test_names)}; both need the same class folders")
        train, test = ([(path, label) for label, paths in enumerate(split) for path in paths]
                       for split in (train, test))
        split = "its train/ and test/ folders"
    else:
        names, per_class = _classes(folder, left_out)
        everything = [(path, label) for label, paths in enumerate(per_class) for path in paths]
        num_test = round(len(everything) * settings.test_fraction)
        if not 0 < num_test < len(everything):
            raise UserError(f"--test-fraction {settings.test_fraction} of {len(everything)} images "
                            f"leaves no {'test' if num_test == 0 else 'training'} images")
        order = rng.permutation(len(everything))
        test, train = ([everything[i] for i in np.sort(picks)] for picks in np.split(order, [num_test]))
        split = f"a test fraction of {settings.test_fraction:g} drawn with seed {settings.seed}"
    pairs = [train[i] for i in rng.permutation(len(train))] + [test[i] for i in rng.permutation(len(test))]
    paths, labels = zip(*pairs)
    return Listing(list(paths), np.array(labels, np.uint8), len(train), names, split,
                   [str(p.relative_to(folder)) for p in left_out])


def _describe(path: Path) -> tuple[str, tuple[int, int], str]:
    """The file's SHA-256, its size (width, height) as shown (a photo turned upright by its
    EXIF orientation) and Pillow's mode, from its header."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            return hashlib.sha256(data).hexdigest(), image_decoding.upright_size(image), image.mode
    except image_decoding.UNREADABLE as error:
        raise UserError(f"{path}: cannot read it as an image ({cli.first_line(error)})") from None


def _settle_shape(folder: Path, sizes: list[tuple[int, int]], modes: Iterable[str],
                  settings: Settings) -> tuple[tuple[int, int], int]:
    """(height, width) and channels of the arrays, from the flags or from the images."""
    channels = settings.channels or (3 if any(mode not in GREY_MODES for mode in modes) else 1)
    if settings.image_size:
        return settings.image_size, channels
    found = Counter(sizes)
    if len(found) > 1:
        examples = ", ".join(f"{w}x{h}" for (w, h), _ in found.most_common(3))
        raise UserError(f"{folder}: the images have {len(found)} sizes ({examples}, ...); pass "
                        f"--image-size N (or H,W) to centre-crop and resize them all")
    (width, height), = found
    return (height, width), channels


class Changed(UserError):
    """The folder's fingerprint is not the one expected (a run's): found before decoding."""


def load(folder: Path, settings: Settings, expected: str | None = None,
         split_sizes: tuple[int | None, int | None] = (None, None)) -> dict:
    """The folder as arrays: x_train, y_train, x_test, y_test (uint8, images memory-mapped
    from the cache), with class_names, fingerprint and a report of what was found.
    `split_sizes`, the --train-size and --test-size asked for, are checked before decoding."""
    folder = folder.resolve()  # its name (a flat folder's class) as config.json records it
    listing = list_images(folder, settings)
    for split, size, available in zip(("train", "test"), split_sizes,
                                      (listing.num_train, len(listing.files) - listing.num_train)):
        data_files.check_size(split, size, available, str(folder))
    # The headers are parsed in Python, which holds the GIL: one thread is the faster.
    described = image_decoding.in_parallel(_describe, listing.files, "file", workers=1)
    digests, sizes, modes = zip(*described)
    (height, width), channels = _settle_shape(folder, list(sizes), modes, settings)
    if settings.image_size is None and (problem := data_files.image_shape_problem((height, width, channels))):
        raise UserError(f"{folder}: {problem}; pass --image-size N to resize them")
    # The fingerprint: every file's name and bytes, in split order, and how they are decoded.
    digest = hashlib.sha256(json.dumps([height, width, channels, listing.split, listing.class_names,
                                        image_decoding.DECODING_VERSION]).encode())
    for path, label, file_digest in zip(listing.files, listing.labels.tolist(), digests):
        digest.update(f"{path.relative_to(folder)}\0{label}\0{file_digest}\n".encode())
    fingerprint = digest.hexdigest()
    if expected and fingerprint != expected:
        raise Changed(f"{folder} has changed")
    images = image_decoding.decoded(listing.files, fingerprint, (height, width), channels)

    pixels = sorted(sizes, key=lambda size: size[0] * size[1])
    report = {"images": len(listing.files), "split": listing.split, "channels": channels,
              "image_size": [height, width], "sizes_found": len(set(sizes)),
              "smallest": pixels[0], "largest": pixels[-1],
              "resized": sum(size != (width, height) for size in sizes),
              "upscaled": sum(min(w / width, h / height) < 1 for w, h in sizes),
              "colour_files": sum(mode not in GREY_MODES for mode in modes),
              "left_out": listing.left_out}
    n = listing.num_train
    return {"x_train": images[:n], "y_train": listing.labels[:n], "x_test": images[n:],
            "y_test": listing.labels[n:], "class_names": listing.class_names,
            "fingerprint": fingerprint, "report": report}
