"""The reference results that benchmarks/reference_results.py measured (docs/results.md): a
recipe's test ELBO by epoch over its seeds, which train.py quotes at the end of a run of the
same recipe, so that its user knows whether the run is typical."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from machinery.settings import RunSettings

RESULTS_FILE = Path(__file__).with_name("reference_results.json")
# What may differ between a run and its recipe's reference: the seed, how far it trained, where
# its data was read, and what comes with the data (its fingerprint, data_sha256, covers a folder's
# split and the class names).
NOT_COMPARED = ("epochs", "seed", "data", "class_names", "split_seed")


def comparable(settings: dict) -> dict:
    """A config.json's settings that make a recipe: those two runs must share to be compared."""
    return {name: value for name, value in settings.items() if name not in NOT_COMPARED}


def saved_rows(path: Path = RESULTS_FILE) -> dict:
    """The rows benchmarks/reference_results.py saved, by recipe; none without the file."""
    return json.loads(path.read_text()) if path.is_file() else {}


def reference_for(settings: RunSettings, path: Path = RESULTS_FILE) -> dict | None:
    """The reference row of the recipe `settings` follows, if one reaches its epoch; None
    otherwise. A setting a row predates is compared with its default, the value it then had."""
    rows = saved_rows(path).values()
    defaults = comparable({field.name: field.default for field in dataclasses.fields(RunSettings)
                           if field.default is not dataclasses.MISSING})
    mine = comparable(dataclasses.asdict(settings))
    for row in rows:
        if mine == {**defaults, **row["settings"]} and settings.epochs < len(row["test_elbo_by_epoch"]):
            return row
    return None


def reference_line(settings: RunSettings, path: Path = RESULTS_FILE) -> str | None:
    """What the reference of the recipe `settings` follows gives at its last epoch, in words;
    None without one."""
    row = reference_for(settings, path)
    if row is None:
        return None
    reference, seeds = row["test_elbo_by_epoch"][settings.epochs], len(row["seeds"])
    if seeds == 1:
        return (f"{row['title']} gives {reference['mean']:.2f} at epoch {settings.epochs} (one seed, "
                f"docs/results.md)")
    return (f"{row['title']} gives {reference['mean']:.2f} +- {reference['sd']:.2f} at epoch "
            f"{settings.epochs} (mean and sd over {seeds} seeds, docs/results.md)")


def advice(settings: RunSettings, path: Path = RESULTS_FILE) -> str | None:
    """For pictures in colour or larger than MNIST's with the tutorial's latent 2: one line on
    what to expect and the recipe to try, with what each gave in docs/results.md; else None."""
    height, width, channels = settings.image_shape
    if settings.latent_dim != 2 or (channels == 1 and max(height, width) <= 28):
        return None
    rows = saved_rows(path)
    recipe, tutorial = rows.get("colour-folder"), rows.get("colour-folder-tutorial")
    start = (f"Images of {height}x{width}x{channels} in a latent space of 2 (the tutorial's, for MNIST): "
             f"expect reconstructions that look alike, a blur of a few average pictures. ")
    if not (recipe and tutorial):
        return start + "For recognisable ones try a larger --latent-dim (docs/results.md)"
    flags = recipe["flags"]
    if "--image-size" in flags:  # the run's own size, not the reference folder's
        at = flags.index("--image-size")
        flags = flags[:at] + flags[at + 2:]
    return (start + f"For recognisable ones try {' '.join(flags)}: on a colour folder at 32x32 it gave "
            f"{recipe['bits_per_dim']['mean']:.2f} bits/dim, against {tutorial['bits_per_dim']['mean']:.2f} "
            f"with latent 2 (docs/results.md)")
