"""Draw images (digits, for MNIST) from a trained model: decode points of its latent space.

    python generate.py --out-dir output                        # 16 digits, z ~ N(0, I)
    python generate.py --out-dir output --num 64 --seed 3 --npy
    python generate.py --out-dir output --z "0,0" --z "1.5,-0.5"     # the points you give
    python generate.py --out-dir output --interpolate "-2,0" "2,0" --steps 10

It reads the model the run exported (cvae.keras), not the data, and writes a grid of the
pixel probabilities (for the logistic likelihood, the pixels' medians), grey or colour as
the run's images, as a PNG (--out) and, with --npy, the values themselves.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from pathlib import Path

from machinery import cli, files, run_folder

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

import dataset
import export
import network
import pictures

MAX_IMAGES = 400  # in one picture; the SavedModel draws any number
OUT_NAME = "generated.png"


def latent_point(text: str) -> np.ndarray:
    """A latent point from the command line: numbers separated by commas, e.g. 0.5,-1.2."""
    try:
        point = np.array([float(number) for number in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not numbers separated by commas, "
                                         f"like 0.5,-1.2") from None
    if not np.all(np.abs(point) <= np.finfo(np.float32).max):  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not finite in float32")
    return point.astype(np.float32)


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description="Draw images from a trained model: from the prior, "
                                            "at given latent points, or along a line.")
    parser.add_argument("--out-dir", default=run_folder.OUT_DIR,
                        help=f"the run folder whose exported model ({files.KERAS_FILE}) draws")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--num", type=cli.int_between(1, MAX_IMAGES),
                      default=pictures.NUM_EXAMPLES_TO_GENERATE,
                      help="how many images to draw from the prior, z ~ N(0, I)")
    what.add_argument("--z", type=latent_point, action="append", metavar="Z",
                      help="decode this latent point, e.g. \"0.5,-1.2\" (quoted: PowerShell splits "
                           "a comma; repeat the flag for more)")
    what.add_argument("--interpolate", type=latent_point, nargs=2, metavar=("A", "B"),
                      help="decode a walk from latent point A to B, e.g. \"-2,0\" \"2,0\"")
    parser.add_argument("--label", default=None, metavar="L",
                        help="the class a conditional model draws: its index or name (default: "
                             "each class in turn)")
    parser.add_argument("--steps", type=cli.int_between(2, MAX_IMAGES), default=10,
                        help="points on the --interpolate walk, both ends included")
    parser.add_argument("--seed", type=cli.seed_int, default=0,
                        help="seed for the draws from the prior (--num)")
    parser.add_argument("--out", default=None,
                        help=f"the PNG to write (default: {OUT_NAME} in --out-dir)")
    parser.add_argument("--npy", action="store_true",
                        help="also write the pixel values, (N, H, W, C) float32, beside the "
                             "PNG as .npy")
    # A latent point may start with a minus: -2,0 is a value, not an unknown flag (argparse
    # takes only plain negative numbers for values; --z=-2,0 works everywhere).
    parser._negative_number_matcher = re.compile(r"^-\.?\d")
    return parser


def as_text(point: np.ndarray) -> str:
    return ",".join(f"{value:g}" for value in point)


def latent_points(args: argparse.Namespace, latent_dim: int) -> tuple[np.ndarray, list[str], str]:
    """The points the flags ask to decode, a title for each (or none), and what they are."""
    for flag, points in (("--z", args.z or []), ("--interpolate", args.interpolate or [])):
        for point in points:
            if len(point) != latent_dim:
                raise cli.UserError(f"{flag} {as_text(point)}: {len(point)} number(s), but the "
                                    f"model's latent space has {latent_dim} dimensions")
    if args.z:
        return np.stack(args.z), [as_text(point) for point in args.z], "the points given"
    if args.interpolate:
        start, end = args.interpolate
        z, weights = pictures.latent_walk(start, end, args.steps)
        about = f"a walk from z = {as_text(start)} to {as_text(end)}"
        return z, [f"{weight:.2f}" for weight in weights], about
    z = pictures.prior_draws(args.num, latent_dim, args.seed).numpy()
    return z, [], f"the prior N(0, I), seed {args.seed}"


def class_labels(label: str | None, model: network.CVAE, names: Sequence[str], count: int,
                 titles: list[str], about: str) -> tuple[tf.Tensor | None, list[str], str]:
    """The classes a conditional model draws: --label's (an index or a class name), else each
    class in turn, named in the titles; None for a model of no classes."""
    if not model.num_classes:
        if label is not None:
            raise cli.UserError("--label is for a conditional model (train.py --conditional); this one "
                                "takes no class")
        return None, titles, about
    names = list(names) if len(names) == model.num_classes else [str(i) for i in range(model.num_classes)]
    if label is None and titles:  # --z or --interpolate: one class for every point
        raise cli.UserError("a conditional model draws given points in one class: add --label")
    if label is None:
        classes = [i % model.num_classes for i in range(count)]
        return tf.constant(classes, tf.int32), titles or [names[i] for i in classes], about
    if label not in names and not (label.isdigit() and int(label) < model.num_classes):
        raise cli.UserError(f"--label {label}: the model's classes are 0 to {model.num_classes - 1}: "
                            f"{', '.join(names)}")
    index = names.index(label) if label in names else int(label)
    return tf.fill([count], index), titles, f"{about}, class {names[index]}"


def save_images(probabilities: np.ndarray, titles: Sequence[str], title: str, path: Path,
                columns: int) -> None:
    rows = math.ceil(len(probabilities) / columns)
    figure = Figure(figsize=(columns, rows * (1.2 if titles else 1.0) + 0.4))
    pictures.image_grid(figure, probabilities, columns, titles)
    figure.suptitle(title, fontsize=10)
    pictures.save_figure(figure, path, bbox_inches="tight")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = cli.explicit_flags(parser, argv)
    if "steps" in given and args.interpolate is None:
        raise cli.UserError("--steps is for --interpolate")
    if "seed" in given and (args.z or args.interpolate):
        raise cli.UserError("--seed is for draws from the prior (--num), not given points")
    out = Path(args.out) if args.out else Path(args.out_dir) / OUT_NAME
    if out.suffix.lower() != ".png":
        raise cli.UserError(f"--out {out}: the picture is a PNG; give a name ending in .png")
    written = [out, out.with_suffix(".npy")] if args.npy else [out]
    for path in written:
        if path.is_dir():
            raise cli.UserError(f"{path} is a folder; give --out a file name")
    model = network.load_model(args.out_dir)
    # The run's class names (of a run older than them: its --dataset's); none for a lone cvae.keras.
    has_config = (Path(args.out_dir) / "config.json").is_file()
    settings = export.read_settings(Path(args.out_dir)) if has_config else None
    names = tuple(settings.class_names or dataset.CLASS_NAMES[settings.dataset]) if settings else ()
    z, titles, about = latent_points(args, model.latent_dim)
    labels, titles, about = class_labels(args.label, model, names, len(z), titles, about)
    probabilities = model.sample(tf.constant(z), labels).numpy()  # what pictures show

    files.ensure_out_dir(out.parent, flag="--out's folder")
    columns = math.ceil(math.sqrt(len(z))) if not titles else min(len(z), 10)  # a square, or rows
    noun = pictures.noun(names)
    what = f"{len(z)} {noun if len(z) > 1 else noun[:-1]} decoded from {about}"
    save_images(probabilities, titles, what, out, columns)
    if args.npy:
        with files.atomic_path(written[-1]) as tmp:
            np.save(tmp, probabilities)
    print(f"Wrote {' and '.join(map(str, written))}: {what}")


if __name__ == "__main__":
    cli.run(main)
