"""KL health in training (metrics.csv, the collapse warning, the run's last line), the KL
weight's schedules (--kl-warmup, --kl-cycle), and the reference results a run is held against."""

from __future__ import annotations

import dataclasses
import json
import sys

from machinery import data_files, references

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, assert_one_line_error, make_mnist_arrays, run_main, run_script, train_settings

import dataset
import evaluate
import network
import train

sys.path.insert(0, str(ROOT / "benchmarks"))
import reference_results  # noqa: E402


@pytest.mark.parametrize("flags, beta_by_step", [
    (("--kl-warmup", "2"), {0: 0., 5: .25, 10: .5, 15: .75, 20: 1., 35: 1.}),
    (("--kl-warmup", "2", "--beta", "4"), {0: 0., 5: 1., 20: 4., 35: 4.}),
    (("--kl-cycle", "2"), {0: 0., 5: .5, 10: 1., 19: 1., 20: 0., 25: .5, 30: 1., 45: .5}),
    (("--kl-cycle", "0.5"), {0: 0., 1: .4, 4: 1., 5: 0.}),  # a cycle of 5 steps: it rises over 2.5
])
def test_the_kl_weight_rises_from_zero_as_its_schedule_says(flags, beta_by_step):
    settings = train_settings(*flags)
    for step, beta in beta_by_step.items():
        assert float(train.kl_weight(tf.constant(step), settings, 10)) == pytest.approx(beta), step


def beta_as_loss(model, x, optimizer, eps=None, y=None, *, kl="mc", beta=1., shards=1):
    """train.train_step, returning the KL weight it trained with in place of its loss."""
    train.train_step(model, x, optimizer, eps, y, kl=kl, beta=beta, shards=shards)
    return tf.cast(beta, tf.float32)


@pytest.mark.parametrize("flags, mean_beta_by_epoch", [
    ((), [1., 1., 1.]),
    (("--kl-warmup", "2"), [.1875, .6875, 1.]),  # steps 0-3 at 0, 1/8, 2/8, 3/8; then 4/8 to 7/8
    (("--kl-cycle", "1", "--beta", "2"), [1.25, 1.25, 1.25]),  # 0, 1 (2 * 2/4), 2, 2 each epoch
])
def test_each_training_step_takes_its_scheduled_weight(tmp_path, flags, mean_beta_by_epoch):
    arrays = make_mnist_arrays(num_train=128, num_test=16, seed=1)  # 4 steps of 32 an epoch
    train_images, test_images = (data_files.with_channels(arrays[key]) for key in ("x_train", "x_test"))
    tf.keras.utils.set_random_seed(1)
    settings = train_settings("--epochs", "3", *flags)
    metrics = train.fit(network.CVAE(2), tf.keras.optimizers.Adam(1e-3), settings, train_images, test_images,
                        out_dir=tmp_path, train_step=beta_as_loss)
    assert [row["train_loss"] for row in metrics[1:]] == pytest.approx(mean_beta_by_epoch)


def test_a_schedule_weighs_the_training_loss_and_leaves_the_test_elbo_the_elbo(tmp_path):
    """The same model, kept as it is by a learning rate of almost nothing, trained with and
    without a warm-up: the train losses differ by the KL the warm-up leaves out, and the
    test ELBOs, compute_loss at B = 1 with the same noise, are the same."""
    arrays = make_mnist_arrays(num_train=128, num_test=32, seed=2)
    train_images, test_images = (data_files.with_channels(arrays[key]) for key in ("x_train", "x_test"))
    metrics = {}
    for flags in ((), ("--kl-warmup", "1000")):
        tf.keras.utils.set_random_seed(2)
        model = network.CVAE(2)
        codes = model.encoder.layers[-1]
        codes.kernel.assign(codes.kernel * 30)  # posteriors away from the prior: a KL of many nats
        settings = train_settings("--epochs", "2", *flags)
        metrics[flags] = train.fit(model, tf.keras.optimizers.Adam(1e-12), settings, train_images,
                                   test_images, out_dir=tmp_path / str(len(flags)))
    plain, warmed = metrics.values()
    assert [row["test_elbo"] for row in plain] == pytest.approx([row["test_elbo"] for row in warmed],
                                                                abs=1e-3)
    for epoch in (1, 2):  # a KL of some nats, weighed by less than 1/1000 in the warm-up
        assert plain[epoch]["train_loss"] - warmed[epoch]["train_loss"] > 1


def test_metrics_hold_the_kl_health_of_every_epoch_and_a_collapse_is_said_once(tmp_path, capsys):
    arrays = make_mnist_arrays(num_train=64, num_test=32, seed=3)
    train_images, test_images = (data_files.with_channels(arrays[key]) for key in ("x_train", "x_test"))
    tf.keras.utils.set_random_seed(3)
    model = network.CVAE(2)
    codes = model.encoder.layers[-1]
    codes.kernel.assign(codes.kernel * 30)  # means that vary with the image from the start
    metrics = train.fit(model, tf.keras.optimizers.Adam(1e-3), train_settings("--epochs", "1"),
                        train_images, test_images, out_dir=tmp_path / "healthy")
    means, logvars = model.encode(dataset.binarize(test_images))
    kl = 0.5 * (np.exp(logvars) + means**2 - 1 - logvars)
    assert metrics[-1]["test_kl"] == pytest.approx(kl.numpy().mean(axis=0).sum(), abs=1e-3)
    assert metrics[-1]["active_units"] == int(np.sum(np.var(means, axis=0) > evaluate.ACTIVE_VARIANCE)) == 2
    assert evaluate.POSTERIOR_COLLAPSE not in capsys.readouterr().out

    # An encoder whose means are one point for every image, kept there by a learning rate of
    # almost nothing: no dimension is active, and training says so once, at its first epoch.
    codes = model.encoder.layers[-1]
    codes.kernel.assign(tf.zeros_like(codes.kernel))
    metrics = train.fit(model, tf.keras.optimizers.Adam(1e-12), train_settings("--epochs", "3"),
                        train_images, test_images, out_dir=tmp_path / "collapsed")
    assert [row["active_units"] for row in metrics] == [0, 0, 0, 0]
    assert capsys.readouterr().out.count(evaluate.POSTERIOR_COLLAPSE) == 1


def reference_file(tmp_path, settings: dict, elbos=((-500., 1.), (-160., .5), (-156., .4))):
    row = {"title": "the tutorial's recipe", "seeds": [42, 43, 44],
           "settings": references.comparable(settings),
           "test_elbo_by_epoch": [{"mean": mean, "sd": sd} for mean, sd in elbos]}
    path = tmp_path / "reference_results.json"
    path.write_text(json.dumps({"tutorial": row}))
    return path


def test_a_run_is_held_against_its_recipes_reference_and_no_other(tmp_path):
    recipe = train_settings("--epochs", "2")
    recipe.data_sha256 = "ab" * 32
    older = dataclasses.asdict(recipe)
    del older["kl_cycle"]  # a row measured before a setting existed: compared with its default
    path = reference_file(tmp_path, older)
    for flags, epoch in ((("--epochs", "2"), 2), (("--epochs", "1", "--seed", "7", "--split-seed", "7"), 1)):
        run = train_settings(*flags)
        run.data_sha256, run.data = recipe.data_sha256, "elsewhere/mnist.npz"
        assert references.reference_for(run, path)["title"] == "the tutorial's recipe"
        line = references.reference_line(run, path)
        expected = {2: "-156.00 +- 0.40 at epoch 2", 1: "-160.00 +- 0.50 at epoch 1"}[epoch]
        assert line.startswith(f"the tutorial's recipe gives {expected} (mean and sd over 3 seeds"), line
    for flags in (("--epochs", "3"), ("--latent-dim", "4", "--epochs", "2"),
                  ("--kl-cycle", "1", "--epochs", "2"), ("--train-size", "100", "--epochs", "2")):
        run = train_settings(*flags)
        run.data_sha256 = recipe.data_sha256
        assert references.reference_for(run, path) is None, flags
    other_data = train_settings("--epochs", "2")
    other_data.data_sha256 = "cd" * 32
    assert references.reference_line(other_data, path) is None


def test_the_runs_last_line_says_where_it_stands(tmp_path, monkeypatch):
    settings = train_settings("--epochs", "2", "--latent-dim", "3")
    last = {"epoch": 2, "test_elbo": -170.123, "test_kl": 7.456, "active_units": 2}
    assert train.where_it_stands(settings, last) == (
        "At epoch 2: test ELBO -170.12, KL 7.46 nats, 2 of 3 latent dimensions active")
    monkeypatch.setattr(references, "RESULTS_FILE", reference_file(tmp_path, dataclasses.asdict(settings)))
    monkeypatch.setattr(references.reference_line, "__defaults__", (references.RESULTS_FILE,))
    assert train.where_it_stands(settings, last).endswith(
        "active; the tutorial's recipe gives -156.00 +- 0.40 at epoch 2 (mean and sd over 3 seeds, "
        "docs/results.md)")
    old_run = {"epoch": 2, "test_elbo": -170.123, "test_kl": None, "active_units": None}  # before the columns
    assert train.where_it_stands(settings, old_run).startswith("At epoch 2: test ELBO -170.12; the")


def test_two_kl_schedules_are_refused(capsys, monkeypatch):
    code, stderr = run_main(train.main, ["--kl-warmup", "2", "--kl-cycle", "2"], "train.py", capsys,
                            monkeypatch)
    assert_one_line_error(stderr, "train.py", "--kl-warmup and --kl-cycle", 2, code)


def test_the_reference_benchmark_runs_a_recipe_as_a_user_would(tmp_path, capsys):
    """benchmarks/reference_results.py on small data: a seed trained and evaluated by the
    scripts, its row saved and printed as docs/results.md's table, and the row is what a
    run of that recipe is then held against."""
    data = tmp_path / "mnist.npz"
    np.savez(data, **make_mnist_arrays(num_train=64, num_test=16))
    results = tmp_path / "results.json"
    result = run_script("benchmarks/reference_results.py", "tutorial", "--data", data, "--seeds", "1",
                        "--epochs", "1", "--train-size", "64", "--iw-samples", "5", "--iw-images", "8",
                        "--work", tmp_path / "runs", "--results", results, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(results.read_text())["tutorial"]
    assert row["seeds"] == [42] and row["iw_samples"] == 5 and row["iwae_test_images"] == 8
    run = json.loads((tmp_path / "runs" / "tutorial" / "seed_42" / "reference_run.json").read_text())
    evaluation = json.loads((tmp_path / "runs" / "tutorial" / "seed_42" / "evaluation.json").read_text())
    assert run["iwae_log_likelihood"] == evaluation["iwae_log_likelihood"]["mean"]
    assert row["test_elbo_by_epoch"] == [{"mean": round(elbo, 3), "sd": 0.0} for elbo in run["test_elbo"]]
    assert len(run["test_elbo"]) == 2 and "saved in" in result.stdout

    reference_results.main(["--table", "--results", str(results)])
    last = row["test_elbo_by_epoch"][-1]["mean"]
    assert f"| tutorial: `(the defaults)` | 1 | {last:.2f} | " in capsys.readouterr().out  # no spread
    recipe = train_settings("--epochs", "1", "--train-size", "64", "--data", str(data))
    recipe.data_sha256 = run["settings"]["data_sha256"]
    recipe.likelihood = "bernoulli"  # as the run found it from the data
    assert references.reference_for(recipe, results) == row


def test_a_recipes_row_is_each_figures_mean_and_sd_over_its_seeds():
    runs = [{"seed": seed, "test_elbo": elbos, "settings": {"seed": seed, "latent_dim": 2},
             "iwae_test_images": 8, "elbo": -150. - seed, "kl": 5., "iwae_log_likelihood": -148. - seed,
             "bits_per_dim": .2, "active_units": active, "train_seconds": 60. * seed, "evaluate_seconds": 30.}
            for seed, elbos, active in ((1, [-500., -160.], 2), (3, [-510., -150.], 1))]
    row = reference_results.summary("tutorial", reference_results.RECIPES["tutorial"], runs, 5)
    assert row["settings"] == {"latent_dim": 2} and row["seeds"] == [1, 3]
    assert row["test_elbo_by_epoch"] == [{"mean": -505., "sd": round(np.std([-500, -510], ddof=1), 3)},
                                         {"mean": -155., "sd": round(np.std([-160, -150], ddof=1), 3)}]
    assert row["iwae_log_likelihood"]["mean"] == -150. and row["active_units"]["mean"] == 1.5
    assert row["train_minutes"] == {"mean": 2., "sd": round(np.std([1, 3], ddof=1), 3)}


def test_colour_or_larger_pictures_in_two_dimensions_are_told_what_to_expect(tmp_path):
    colour = train_settings()
    colour.image_shape = [32, 32, 3]
    line = references.advice(colour, tmp_path / "none.json")
    assert line.startswith("Images of 32x32x3 in a latent space of 2") and "a larger --latent-dim" in line
    larger = train_settings()
    larger.image_shape = [64, 64, 1]
    assert references.advice(larger, tmp_path / "none.json").startswith("Images of 64x64x1")
    for flags, shape in (((), [28, 28, 1]), (("--latent-dim", "16"), [32, 32, 3])):
        settings = train_settings(*flags)
        settings.image_shape = shape
        assert references.advice(settings, tmp_path / "none.json") is None, flags
    rows = {"colour-folder": {"flags": ["--image-size", "32", "--latent-dim", "32", "--epochs", "60"],
                              "bits_per_dim": {"mean": 5.9}},
            "colour-folder-tutorial": {"flags": [], "bits_per_dim": {"mean": 6.43}}}
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert references.advice(colour, tmp_path / "rows.json").endswith(
        "try --latent-dim 32 --epochs 60: on a colour folder at 32x32 it gave 5.90 bits/dim, against 6.43 "
        "with latent 2 (docs/results.md)")
