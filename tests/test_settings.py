"""One settings object: RunSettings is what train.py's flags give, what config.json holds
(checked field by field, a later setting taking its default in an older run), and what
builds the run's CVAE, as CVAE.get_config gives it back."""

from __future__ import annotations

import dataclasses
import json

from machinery import cli, image_folder, settings
from machinery.settings import RunSettings

import pytest
from conftest import train_settings

import export
import network
import train

# What config.json must hold: what every run has held since the first version.
FIRST_VERSION = [field.name for field in dataclasses.fields(RunSettings) if field.metadata["required"]]


def test_every_flag_setting_is_a_train_flag_with_the_settings_default():
    flags = vars(train.build_parser().parse_args([]))
    for field in dataclasses.fields(RunSettings):
        if not field.metadata["flag"]:
            assert field.name not in flags, field.name
            continue
        assert field.name in flags, field.name
        # The exceptions: likelihood's None is the data's; split_seed's None, an older run's --seed.
        if field.default is not dataclasses.MISSING and field.name not in ("likelihood", "split_seed"):
            assert flags[field.name] == field.default, field.name
    assert flags["likelihood"] is None and flags["split_seed"] == image_folder.SPLIT_SEED
    recipe = train_settings()
    assert (recipe.epochs, recipe.batch_size, recipe.latent_dim, recipe.learning_rate) == (10, 32, 2, 1e-4)


def test_the_model_is_built_from_the_settings_and_gives_them_back():
    run = train_settings("--filters", "8", "--latent-dim", "3", "--conditional", "--precision", "bf16")
    run.class_names, run.likelihood, run.image_shape = ["a", "b", "c"], "logistic", [16, 16, 3]
    model = export.new_model(run)
    assert model.get_config() == run.model_options()
    assert (model.num_classes, model.latent_dim, model.image_shape) == (3, 3, (16, 16, 3))
    assert network.CVAE(**model.get_config()).get_config() == run.model_options()


def write_config(folder, **values) -> None:
    (folder / settings.CONFIG_FILE).write_text(json.dumps(values))


def first_version(run: RunSettings) -> dict:
    return {name: getattr(run, name) for name in FIRST_VERSION}


def test_an_older_config_takes_the_defaults_of_later_settings(tmp_path):
    run = train_settings("--latent-dim", "4")
    write_config(tmp_path, **first_version(run))
    loaded = export.read_settings(tmp_path)
    assert loaded.latent_dim == 4 and loaded.epochs == 10
    assert (loaded.kl, loaded.beta, loaded.precision, loaded.likelihood, loaded.conditional) == (
        "mc", 1.0, "fp32", "bernoulli", False)
    assert loaded.image_shape == [28, 28, 1] and loaded.class_names is None


@pytest.mark.parametrize("change, expected", [
    ({"beta": "2"}, "beta is missing or of the wrong type"),
    ({"latent_dim": True}, "latent_dim is missing or of the wrong type"),
    ({"learning_rate": None}, "learning_rate is missing or of the wrong type"),
    ({"image_shape": [28, 28.5, 1]}, "image_shape is missing or of the wrong type"),
    ({"class_names": ["a", 2]}, "class_names is missing or of the wrong type"),
    ({"kl": "exact"}, "unknown kl 'exact'"),
    ({"precision": "fp16"}, "unknown precision 'fp16'"),
    ({"image_shape": [28, 28]}, "is not (height, width, channels)"),
])
def test_a_config_of_another_type_or_value_is_damaged(tmp_path, change, expected):
    write_config(tmp_path, **{**first_version(train_settings()), **change})
    with pytest.raises(cli.UserError, match="is damaged") as error:
        export.read_settings(tmp_path)
    assert expected in str(error.value)


def test_the_first_versions_settings_are_required():
    assert FIRST_VERSION == ["epochs", "latent_dim", "batch_size", "learning_rate", "seed", "train_size",
                             "test_size", "data", "data_sha256"]


@pytest.mark.parametrize("name", FIRST_VERSION)
def test_a_config_without_a_first_version_setting_is_damaged(tmp_path, name):
    values = first_version(train_settings())
    del values[name]
    write_config(tmp_path, **values)
    with pytest.raises(cli.UserError, match=f"is damaged: {name} is missing"):
        export.read_settings(tmp_path)


def test_a_config_of_unknown_settings_or_no_settings_is_refused(tmp_path):
    write_config(tmp_path, **first_version(train_settings()), warmup_epochs=3)
    with pytest.raises(cli.UserError, match="unknown settings warmup_epochs"):
        export.read_settings(tmp_path)
    write_config(tmp_path, **first_version(train_settings()), conditional=True)
    with pytest.raises(cli.UserError, match="a conditional run without its class_names"):
        export.read_settings(tmp_path)
    (tmp_path / settings.CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(cli.UserError, match="holds no settings"):
        export.read_settings(tmp_path)


def test_a_saved_run_loads_back_equal(tmp_path):
    run = train_settings("--beta", "0.5", "--kl", "analytic", "--image-size", "16,24")
    run.class_names, run.data_sha256 = ["x", "y"], "ab" * 32
    run.likelihood = "logistic"
    run.save(tmp_path)
    assert export.read_settings(tmp_path) == run


def test_json_values_fit_the_type_hints():
    assert settings.fits(1, float) and settings.fits(1.5, float) and not settings.fits(True, float)
    assert not settings.fits(True, int) and settings.fits(True, bool) and not settings.fits(1, bool)
    assert settings.fits(None, int | None) and not settings.fits("1", int | None)
    assert settings.fits([1, 2], list[int]) and not settings.fits([1, "2"], list[int])
    assert settings.fits(None, list[str] | None) and not settings.fits("ab", list[str] | None)
