"""The train step, the loop and its outputs, on tiny data, in process."""

from __future__ import annotations

import csv
import functools
from statistics import NormalDist

from machinery import data_files, steps

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf
from conftest import epoch_losses, make_mnist_arrays, train_settings

import dataset
import network
import pictures
import train


def test_train_steps_have_finite_gradients_and_lower_the_loss():
    tf.keras.utils.set_random_seed(3)
    model = network.CVAE(2)
    x = tf.constant((np.random.default_rng(3).random((32, 28, 28, 1)) < 0.2).astype(np.float32))
    eps = tf.random.stateless_normal((32, 2), seed=(1, 2))

    with tf.GradientTape() as tape:
        before = network.compute_loss(model, x, eps)
    gradients = tape.gradient(before, model.trainable_variables)
    assert len(gradients) == len(model.trainable_variables) == 14
    assert all(g is not None and bool(tf.reduce_all(tf.math.is_finite(g))) for g in gradients)

    optimizer = tf.keras.optimizers.Adam(1e-3)
    rng = tf.random.Generator.from_seed(3)
    first_eps = tf.random.Generator.from_seed(3).normal((32, 2))  # what rng draws first
    weights_before = [w.numpy() for w in model.trainable_variables]
    first_loss = network.compute_loss(model, x, first_eps)
    train_steps = steps.compiled_train_steps(train.train_step, model, optimizer, rng)
    losses = epoch_losses(train_steps, tf.concat([x] * 5, 0))
    assert losses.shape == (5,)
    np.testing.assert_allclose(losses[0], first_loss, rtol=1e-6)  # the batch's mean loss
    assert any(not np.array_equal(a, b.numpy())
               for a, b in zip(weights_before, model.trainable_variables))
    after = network.compute_loss(model, x, eps)
    assert float(after) < float(before)


def test_an_epoch_takes_every_batch_in_order_and_a_smaller_last_one():
    tf.keras.utils.set_random_seed(4)
    model = network.CVAE(2)
    optimizer = tf.keras.optimizers.SGD(0.0)  # the weights stay: each loss is checkable
    images = tf.constant((np.random.default_rng(4).random((70, 28, 28, 1)) < 0.2).astype(np.float32))
    train_steps = steps.compiled_train_steps(train.train_step, model, optimizer,
                                             tf.random.Generator.from_seed(4))
    calls = [(batches.first, train_steps(batches))
             for batches in steps.batches(images, batch_size=32, steps_per_call=2)]
    assert [first for first, _ in calls] == [0, 2]  # two full batches in one call, then the rest
    losses = np.concatenate([losses for _, losses in calls])

    noise = tf.random.Generator.from_seed(4)
    expected = [network.compute_loss(model, images[start:start + 32], noise.normal((size, 2)))
                for start, size in ((0, 32), (32, 32), (64, 6))]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)


class LatentEcho:
    """Stands in for a model: 'decodes' z into an image of brightness sigmoid(z0) on the
    left half and sigmoid(z1) on the right half, to check the manifold's layout."""

    image_shape = (28, 28, 1)

    def sample(self, z):
        left = tf.sigmoid(z[:, 0])[:, None, None, None] * tf.ones((1, 28, 14, 1))
        right = tf.sigmoid(z[:, 1])[:, None, None, None] * tf.ones((1, 28, 14, 1))
        return tf.concat([left, right], axis=2)


def test_manifold_walks_the_normal_quantiles():
    image = pictures.latent_manifold(LatentEcho(), n=5)
    assert image.shape == (5 * 28, 5 * 28)
    quantiles = [NormalDist().inv_cdf(p) for p in np.linspace(0.05, 0.95, 5)]
    expected = 1 / (1 + np.exp(-np.array(quantiles)))
    # Column j holds z0 = quantile j (left half of each digit), row i holds z1 = quantile i.
    np.testing.assert_allclose(image[0, 0:140:28], expected, atol=1e-5)
    np.testing.assert_allclose(image[0:140:28, 27], expected, atol=1e-5)


def test_manifold_png_is_written(tmp_path):
    model = network.CVAE(2)
    pictures.save_latent_manifold(model, tmp_path / "latent_manifold.png")
    image = iio.imread(tmp_path / "latent_manifold.png")
    assert image.shape == (560, 560) and image.dtype == np.uint8  # 20 x 20 digits, grey
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_an_epoch_prepares_uint8_batches_in_the_epoch_order():
    """Stored uint8 images, gathered in the epoch's order and binarized a call at a time,
    train exactly as the binarized images put in that order beforehand."""
    pixels = make_mnist_arrays(num_train=100, num_test=0, seed=7)["x_train"][..., np.newaxis]
    order = dataset.epoch_order(len(pixels), seed=7, epoch=1)
    losses = {}
    for stored in ("uint8", "float32 in order"):
        tf.keras.utils.set_random_seed(7)
        model = network.CVAE(2)
        train_steps = steps.compiled_train_steps(train.train_step, model, tf.keras.optimizers.Adam(1e-3),
                                                 tf.random.Generator.from_seed(7),
                                                 prepare=dataset.binarize if stored == "uint8" else None)
        losses[stored] = (
            epoch_losses(train_steps, pixels, order=order, steps_per_call=2) if stored == "uint8"
            else epoch_losses(train_steps, dataset.binarize(pixels[order]), steps_per_call=2))
    assert losses["uint8"].shape == (4,)
    np.testing.assert_array_equal(losses["uint8"], losses["float32 in order"])


@pytest.mark.parametrize("shards", [1, 2])
def test_evaluate_is_the_mean_elbo_over_all_images(shards):
    tf.keras.utils.set_random_seed(4)
    model = network.CVAE(2)
    images = (np.random.default_rng(4).random((1300, 28, 28, 1)) < 0.2).astype(np.float32)
    batches = dataset.make_batches((images, np.zeros(len(images), np.uint8)), dataset.EVAL_BATCH_SIZE)
    test_loss = steps.compiled_loss(network.compute_loss, model, tf.random.Generator.from_seed(9), shards)
    elbo = train.test_set_elbo(test_loss, batches)
    rng = tf.random.Generator.from_seed(9)  # the same noise, drawn in the same batches
    batch_means = [network.compute_loss(model, images[i:i + 1000], rng.normal((len(images[i:i + 1000]), 2)))
                   for i in (0, 1000)]
    np.testing.assert_allclose(elbo, -(batch_means[0] * 1000 + batch_means[1] * 300) / 1300, rtol=1e-5)


def test_fit_writes_grids_and_metrics(tmp_path, tiny_arrays):
    train_images = data_files.with_channels(tiny_arrays["x_train"])  # uint8: fit binarizes a batch at a time
    test_images = data_files.with_channels(tiny_arrays["x_test"])
    tf.keras.utils.set_random_seed(0)
    model = network.CVAE(2)
    metrics = train.fit(model, tf.keras.optimizers.Adam(1e-3), train_settings("--epochs", "2", "--seed", "0"),
                        train_images, test_images, out_dir=tmp_path)
    assert [row["epoch"] for row in metrics] == [0, 1, 2]
    assert metrics[2]["test_elbo"] > metrics[0]["test_elbo"]
    for epoch in range(3):
        assert iio.imread(pictures.grid_path(tmp_path, epoch)).shape[:2] == (400, 400)
    with open(tmp_path / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    assert float(rows[2]["test_elbo"]) == metrics[2]["test_elbo"]

    pictures.save_gif([pictures.grid_path(tmp_path, e) for e in range(3)], tmp_path / "cvae.gif")
    assert iio.imread(tmp_path / "cvae.gif", index=None).shape[0] == 3


def test_the_train_step_trains_with_network_compute_loss(monkeypatch):
    """What compute_loss says is what trains: zero times it, and no weight moves."""
    x = tf.constant((np.random.default_rng(6).random((32, 28, 28, 1)) < 0.2).astype(np.float32))
    moved, original = {}, network.compute_loss
    for name, scale in (("as written", 1.0), ("zero times itself", 0.0)):
        monkeypatch.setattr(network, "compute_loss", lambda *args, scale=scale, **kwargs:
                            scale * original(*args, **kwargs))
        for shards in (1, 2):
            tf.keras.utils.set_random_seed(6)
            model = network.CVAE(2)
            optimizer = tf.keras.optimizers.Adam(1e-3)
            before = [w.numpy() for w in model.trainable_variables]
            train_steps = steps.compiled_train_steps(functools.partial(train.train_step, shards=shards),
                                                     model, optimizer, tf.random.Generator.from_seed(6))
            epoch_losses(train_steps, tf.concat([x] * 3, 0))
            moved[name, shards] = [not np.array_equal(a, b.numpy())
                                   for a, b in zip(before, model.trainable_variables)]
    for shards in (1, 2):
        assert all(moved["as written", shards])
        assert not any(moved["zero times itself", shards])


def test_the_tutorials_train_step_call_takes_a_step():
    """train_step(model, x, optimizer), as the tutorial calls it: its own noise, one update."""
    tf.keras.utils.set_random_seed(8)
    model = network.CVAE(2)
    optimizer = tf.keras.optimizers.Adam(1e-3)
    x = tf.constant((np.random.default_rng(8).random((8, 28, 28, 1)) < 0.2).astype(np.float32))
    loss = train.train_step(model, x, optimizer)
    assert loss.shape == () and np.isfinite(float(loss))
    assert int(optimizer.iterations) == 1
    loss = train.train_step(model, x, optimizer, shards=2)  # in two shards, each drawing its noise
    assert loss.shape == () and np.isfinite(float(loss)) and int(optimizer.iterations) == 2
