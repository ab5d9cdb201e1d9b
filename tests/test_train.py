"""The loop and its outputs, on tiny data (in process, but for the thread settings)."""

from __future__ import annotations

import csv
import subprocess
import sys
from statistics import NormalDist

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT

import dataset
import network
import train


class LatentEcho:
    """Stands in for a model: 'decodes' z into an image of brightness sigmoid(z0) on the
    left half and sigmoid(z1) on the right half, to check the manifold's layout."""

    def sample(self, z):
        left = tf.sigmoid(z[:, 0])[:, None, None, None] * tf.ones((1, 28, 14, 1))
        right = tf.sigmoid(z[:, 1])[:, None, None, None] * tf.ones((1, 28, 14, 1))
        return tf.concat([left, right], axis=2)


def test_manifold_walks_the_normal_quantiles():
    image = train.latent_manifold(LatentEcho(), n=5)
    assert image.shape == (5 * 28, 5 * 28)
    quantiles = [NormalDist().inv_cdf(p) for p in np.linspace(0.05, 0.95, 5)]
    expected = 1 / (1 + np.exp(-np.array(quantiles)))
    # Column j holds z0 = quantile j (left half of each digit), row i holds z1 = quantile i.
    np.testing.assert_allclose(image[0, 0:140:28], expected, atol=1e-5)
    np.testing.assert_allclose(image[0:140:28, 27], expected, atol=1e-5)


def test_manifold_png_is_written(tmp_path):
    model = network.CVAE(2)
    train.save_latent_manifold(model, tmp_path / "latent_manifold.png")
    image = iio.imread(tmp_path / "latent_manifold.png")
    assert image.shape == (560, 560) and image.dtype == np.uint8  # 20 x 20 digits, grey
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize("shards", [1, 2])
def test_evaluate_is_the_mean_elbo_over_all_images(shards):
    tf.keras.utils.set_random_seed(4)
    model = network.CVAE(2)
    images = (np.random.default_rng(4).random((1300, 28, 28, 1)) < 0.2).astype(np.float32)
    batches = dataset.make_batches(images, train.EVAL_BATCH_SIZE)
    elbo = train.evaluate(model, batches, tf.random.Generator.from_seed(9), shards=shards)
    rng = tf.random.Generator.from_seed(9)  # the same noise, drawn in the same batches
    per_example = np.concatenate([
        network.elbo_per_example(model, images[i:i + 1000], rng.normal((len(images[i:i + 1000]), 2)))
        for i in (0, 1000)])
    np.testing.assert_allclose(elbo, per_example.mean(), rtol=1e-5)


def test_fit_writes_grids_and_metrics(tmp_path, tiny_arrays):
    train_images = dataset.binarize(tiny_arrays["x_train"])
    test_images = dataset.binarize(tiny_arrays["x_test"])
    tf.keras.utils.set_random_seed(0)
    model = network.CVAE(2)
    metrics = train.fit(model, tf.keras.optimizers.Adam(1e-3), train_images, test_images,
                        epochs=2, batch_size=32, seed=0, out_dir=tmp_path)
    assert [row["epoch"] for row in metrics] == [0, 1, 2]
    assert metrics[2]["test_elbo"] > metrics[0]["test_elbo"]
    for epoch in range(3):
        assert iio.imread(train.grid_path(tmp_path, epoch)).shape[:2] == (400, 400)
    with open(tmp_path / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    assert float(rows[2]["test_elbo"]) == metrics[2]["test_elbo"]

    train.save_gif([train.grid_path(tmp_path, e) for e in range(3)], tmp_path / "cvae.gif")
    assert iio.imread(tmp_path / "cvae.gif", index=None).shape[0] == 3



SHARDS_AND_THREADS = """
import sys
import tensorflow as tf
import train
if sys.argv[1] == "started":
    tf.constant(1.0) + 1.0  # TensorFlow starts with its default threads
shards = train.setup_shards(int(sys.argv[2]) or None)
print(shards, tf.config.threading.get_inter_op_parallelism_threads(),
      tf.config.threading.get_intra_op_parallelism_threads(), train.available_cores())
"""


@pytest.mark.parametrize("when, requested", [("fresh", 0), ("fresh", 1), ("started", 0),
                                             ("started", 2)])
def test_setup_shards_sets_the_threads_or_falls_back(when, requested):
    result = subprocess.run([sys.executable, "-c", SHARDS_AND_THREADS, when, str(requested)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    shards, inter, intra, cores = map(int, result.stdout.split())
    default = 2 if cores >= 2 and not tf.config.list_physical_devices("GPU") else 1
    if when == "fresh":
        assert shards == (requested or default)
        # With more than one shard: an op per shard at once, the cores shared among them.
        assert (inter, intra) == ((shards, cores // shards) if shards > 1 else (0, 0))
    else:  # too late to set the threads: the default is 1 shard, a request stands
        assert (inter, intra) == (0, 0)
        assert shards == (requested or 1)


def test_the_default_is_one_shard_under_a_strategy():
    assert train.setup_shards(None, "mirrored") == 1  # each replica's share stays whole
