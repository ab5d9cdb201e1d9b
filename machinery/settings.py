"""A run's settings in one dataclass: train.py's flags fill it, config.json stores it,
--resume checks the flags against it, and export.new_model builds the run's CVAE from it.
A new setting is a field here, its flag, and its use."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path

from machinery import cli, data_files, files, image_folder

CONFIG_FILE = "config.json"


def setting(default: object = dataclasses.MISSING, *, flag: bool = True, fixed: bool = True,
            required: bool = False, **options) -> dataclasses.Field:
    """A field of RunSettings. `flag`: train.py has a flag of its name (--latent-dim for
    latent_dim); `fixed`: --resume refuses that flag where it contradicts the run; `required`:
    config.json must hold it, as every run has (a field without a default is required too)."""
    required = required or (default is dataclasses.MISSING and "default_factory" not in options)
    return dataclasses.field(default=default, metadata={"flag": flag, "fixed": flag and fixed,
                                                        "required": required}, **options)


@dataclasses.dataclass
class RunSettings:
    """What config.json holds, in its order. The first version's settings are required (train.py's
    flags give the tutorial's recipe); a later setting's default is what an older run had."""

    epochs: int = setting(fixed=False)  # --resume --epochs N trains a finished run further
    latent_dim: int = setting()
    batch_size: int = setting()
    learning_rate: float = setting()
    seed: int = setting()
    train_size: int | None = setting()
    test_size: int | None = setting()
    kl: str = setting("mc")
    dataset: str = setting("mnist")
    precision: str = setting("fp32")
    filters: int | None = setting(None)
    likelihood: str = setting("bernoulli")  # (the flag's None: the data's, dataset.default_likelihood)
    image_size: list[int] | None = setting(None)
    channels: int | None = setting(None)
    test_fraction: float = setting(image_folder.DEFAULT_TEST_FRACTION)
    beta: float = setting(1.0)
    conditional: bool = setting(False)
    kl_warmup: float = setting(0.0)  # epochs; 0: the KL term's weight is --beta from the start
    kl_cycle: float = setting(0.0)
    split_seed: int | None = setting(None)  # a folder's split (the flag's 42); None: an older run's, --seed
    # Found when the run starts: where its data was read (it may move since), the data's
    # fingerprint, its class names and image shape (the model's; MNIST's before other images).
    data: str | None = setting(None, fixed=False, required=True)
    data_sha256: str = setting("", flag=False, required=True)
    class_names: list[str] | None = setting(None, flag=False)
    image_shape: list[int] = setting(flag=False, default_factory=lambda: [28, 28, 1])

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> RunSettings:
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)
                      if field.metadata["flag"]})

    def contradicted(self, args: argparse.Namespace, given: set[str]) -> str | None:
        """The first fixed setting whose flag was typed (`given`) with another value; None if none."""
        return next((field.name for field in dataclasses.fields(self) if field.metadata["fixed"]
                     and field.name in given and getattr(args, field.name) != getattr(self, field.name)),
                    None)

    def model_options(self) -> dict:
        """network.CVAE's keyword arguments for this run (those CVAE.get_config gives back)."""
        return {"latent_dim": self.latent_dim, "precision": self.precision, "filters": self.filters,
                "image_shape": list(self.image_shape), "likelihood": self.likelihood,
                "num_classes": len(self.class_names) if self.conditional else 0}

    def save(self, out_dir: Path) -> None:
        with files.atomic_path(out_dir / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def load_settings(out_dir: Path, choices: Mapping[str, Collection[str]]) -> RunSettings:
    """The run's config.json, checked: every setting of the right type, a setting with
    `choices` one of them (a later setting that it lacks: its default)."""
    path = out_dir / CONFIG_FILE
    if not path.is_file():
        raise cli.UserError(f"no run in {out_dir} (no {CONFIG_FILE}); start one with "
                            f"python train.py --out-dir {out_dir}")
    try:
        stored = json.loads(path.read_text())
    except (ValueError, TypeError, OSError) as error:
        raise cli.UserError(f"{path} is damaged ({cli.first_line(error)})") from None
    if not isinstance(stored, dict):
        raise cli.UserError(f"{path} is damaged: it holds no settings")
    kinds = typing.get_type_hints(RunSettings)
    for field in dataclasses.fields(RunSettings):
        if field.name in stored and not fits(stored[field.name], kinds[field.name]) or (
                field.name not in stored and field.metadata["required"]):
            raise cli.UserError(f"{path} is damaged: {field.name} is missing or of the wrong type")
    if unknown := sorted(stored.keys() - kinds.keys()):
        raise cli.UserError(f"{path}: unknown settings {', '.join(unknown)} (a run of a newer "
                            f"version of this project?)")
    settings = RunSettings(**stored)
    if settings.conditional and not settings.class_names:
        raise cli.UserError(f"{path} is damaged: a conditional run without its class_names")
    for name, values in choices.items():
        if getattr(settings, name) not in values:
            raise cli.UserError(f"{path} is damaged: unknown {name} {getattr(settings, name)!r}")
    shape = settings.image_shape
    if len(shape) != 3:
        raise cli.UserError(f"{path} is damaged: image_shape {shape!r} is not (height, width, channels)")
    if problem := data_files.image_shape_problem(shape):
        raise cli.UserError(f"{path} is damaged: image_shape {shape!r}: {problem}")
    return settings


def fits(value: object, kind: object) -> bool:
    """Whether a JSON value is of a type hint: int, float (an int too), str, bool, None,
    list[...] and unions of them; a bool is no number."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(fits(value, option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(fits(item, typing.get_args(kind)[0]) for item in value)
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, (int, float) if kind is float else kind)
