"""The reference results that benchmarks/reference_results.py measured (docs/results.md): a
recipe's test ELBO by epoch over several seeds, which train.py quotes at the end of a run of
the same recipe, so that its user knows whether the run is typical."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from machinery.settings import RunSettings

RESULTS_FILE = Path(__file__).with_name("reference_results.json")
# What may differ between a run and its recipe's reference: the seed, how far it trained, where
# its data was read (the data itself is its fingerprint, data_sha256), and the names that come with it.
NOT_COMPARED = ("epochs", "seed", "data", "class_names")


def comparable(settings: dict) -> dict:
    """A config.json's settings that make a recipe: those two runs must share to be compared."""
    return {name: value for name, value in settings.items() if name not in NOT_COMPARED}


def reference_for(settings: RunSettings, path: Path = RESULTS_FILE) -> dict | None:
    """The reference row of the recipe `settings` follows, if one reaches its epoch; None
    otherwise. A setting a row predates is compared with its default, the value it then had."""
    rows = json.loads(path.read_text()).values() if path.is_file() else ()
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
    reference = row["test_elbo_by_epoch"][settings.epochs]
    return (f"{row['title']} gives {reference['mean']:.2f} +- {reference['sd']:.2f} at epoch "
            f"{settings.epochs} (mean and sd over {len(row['seeds'])} seeds, docs/results.md)")
