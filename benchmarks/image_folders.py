"""Folders of image files for trying and timing --data FOLDER.

    python benchmarks/image_folders.py photos PHOTOS       # scikit-image's 11 photographs
    python benchmarks/image_folders.py crops PHOTOS OUT    # classes of crops cut from photos
    python benchmarks/image_folders.py synthetic OUT --count 50000 --size 64

photos: the photographs that ship with scikit-image (pip install scikit-image; public domain
or CC0), as PNG files; crops: for every photo in PHOTOS, a class folder of crops of mixed sizes, saved as PNG
(some with an alpha channel), JPEG or grey PNG, and a stray text file; synthetic: smooth
random colour images of one size, as PNG, to time the decoding of many files.
"""

from __future__ import annotations

import argparse
import concurrent.futures
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "brick", "grass",
                  "gravel", "stereo_motorcycle", "retina", "immunohistochemistry")


def photos(out: Path) -> None:
    """scikit-image's photographs, a PNG each (the motorcycle: the left image of its stereo pair)."""
    import skimage.data  # only here: a benchmark's dependency, not the project's

    out.mkdir(parents=True, exist_ok=True)
    for name in SKIMAGE_PHOTOS:
        image = getattr(skimage.data, name)()
        Image.fromarray(image[0] if name == "stereo_motorcycle" else image).save(out / f"{name}.png")


def crops(photos: Path, out: Path, per_class: int, seed: int) -> None:
    """A class folder per photo, of `per_class` square crops of 40 to 120 pixels."""
    rng = np.random.default_rng(seed)
    for photo in sorted(p for p in photos.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")):
        image = Image.open(photo).convert("RGB")
        folder = out / photo.stem
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(rng.integers(40, min(121, *image.size)))
            left, top = (int(rng.integers(0, extent - side + 1)) for extent in image.size)
            crop = image.crop((left, top, left + side, top + side))
            kind = i % 4
            if kind == 0:
                crop.save(folder / f"{i:04d}.jpg", quality=90)
            elif kind == 1:
                crop.convert("L").save(folder / f"{i:04d}.png")
            elif kind == 2:  # with an alpha channel, opaque but for one corner pixel
                rgba = crop.convert("RGBA")
                rgba.putpixel((0, 0), (0, 0, 0, 0))
                rgba.save(folder / f"{i:04d}.png")
            else:
                crop.save(folder / f"{i:04d}.png")
    (out / photos.name).with_suffix(".txt").write_text("crops of the photos in " + str(photos) + "\n")


def synthetic(out: Path, count: int, size: int, seed: int) -> None:
    """`count` PNGs of size x size: random 8x8 colour fields, smoothly upscaled."""
    out.mkdir(parents=True, exist_ok=True)

    def write(start: int) -> None:
        rng = np.random.default_rng([seed, start])
        for i in range(start, min(start + 1000, count)):
            small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            small.resize((size, size), Image.Resampling.BILINEAR).save(out / f"{i:06d}.png")

    with concurrent.futures.ThreadPoolExecutor() as pool:
        list(pool.map(write, range(0, count, 1000)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True)
    seed = argparse.ArgumentParser(add_help=False)
    seed.add_argument("--seed", type=int, default=0, help="seed for the crops or the images")
    photo_parser = kinds.add_parser("photos", help="scikit-image's photographs, as PNG files")
    photo_parser.add_argument("out", type=Path, help="the folder to make")
    crop_parser = kinds.add_parser("crops", help="classes of crops cut from photos", parents=[seed])
    crop_parser.add_argument("photos", type=Path, help="a folder of photos (PNG or JPEG)")
    crop_parser.add_argument("out", type=Path, help="the folder to make")
    crop_parser.add_argument("--per-class", type=int, default=300, help="crops per photo")
    many = kinds.add_parser("synthetic", help="many PNGs of one size", parents=[seed])
    many.add_argument("out", type=Path, help="the folder to make")
    many.add_argument("--count", type=int, default=50_000, help="how many images")
    many.add_argument("--size", type=int, default=64, help="their side, in pixels")
    args = parser.parse_args(argv)
    if args.kind == "photos":
        photos(args.out)
    elif args.kind == "crops":
        crops(args.photos, args.out, args.per_class, args.seed)
    else:
        synthetic(args.out, args.count, args.size, args.seed)


if __name__ == "__main__":
    main()
