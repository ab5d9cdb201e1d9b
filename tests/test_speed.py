"""What runs for speed against what it stands for: the shards against the whole batch; the
thread set-up; and bf16's biases, which network.CVAE adds in float32 so that they learn."""

from __future__ import annotations

import functools
import subprocess
import sys

from machinery import speed, steps

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, epoch_losses

import network
import train


@pytest.mark.parametrize("kind", [tf.keras.layers.Conv2D, tf.keras.layers.Conv2DTranspose])
def test_bf16_bias_gradients_are_summed_in_float32(kind):
    """A bfloat16 layer with a bias (any: here one a student might add) becomes the layer
    without it and a float32 BiasAdd, whose gradient is the whole sum."""
    layers = network.with_float32_bias_gradients(
        [tf.keras.layers.InputLayer(shape=(28, 28, 1)),
         kind(8, 3, padding="same", activation="relu", dtype="mixed_bfloat16")])
    model = tf.keras.Sequential(layers)
    assert [type(layer) for layer in model.layers] == [kind, network.BiasAdd]
    assert not model.layers[0].use_bias and model.layers[1].compute_dtype == "float32"
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(model(tf.ones((32, 28, 28, 1))))
    # d total / d bias = the number of outputs per channel where the ReLU is open, at most
    # 32 x 28 x 28 = 25,088. Summed in bfloat16 (TensorFlow's CPU kernels), it stalls at 512.
    bias_gradient = tape.gradient(total, model.layers[1].bias).numpy()
    outputs = model(tf.ones((32, 28, 28, 1))).numpy()
    np.testing.assert_array_equal(bias_gradient, (outputs > 0).sum(axis=(0, 1, 2)))
    assert bias_gradient.max() > 4096


def test_float32_layers_and_layers_without_a_bias_are_left_alone():
    layers = [tf.keras.layers.Conv2D(8, 3), tf.keras.layers.Flatten(dtype="mixed_bfloat16"),
              tf.keras.layers.Dense(4, use_bias=False, dtype="mixed_bfloat16")]
    assert network.with_float32_bias_gradients(layers) == layers


def test_a_bf16_cvae_starts_from_the_fp32_weights_and_computes_alike():
    """The same seed gives a bf16 CVAE the fp32 one's weights (the same initializers, in
    order), and its loss agrees to bfloat16's precision."""
    weights, losses = {}, {}
    x = tf.constant((np.random.default_rng(2).random((16, 28, 28, 1)) < 0.3).astype(np.float32))
    eps = tf.random.stateless_normal((16, 2), seed=(2, 2))
    for precision in ("fp32", "bf16"):
        tf.keras.utils.set_random_seed(2)
        model = network.CVAE(2, precision)
        weights[precision] = model.get_weights()
        losses[precision] = float(network.compute_loss(model, x, eps))
    assert len(weights["fp32"]) == len(weights["bf16"]) == 14
    for fp32, bf16 in zip(weights["fp32"], weights["bf16"]):
        np.testing.assert_array_equal(fp32, bf16)
    assert abs(losses["fp32"] - losses["bf16"]) < 0.01 * abs(losses["fp32"])


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize("shards", [2, 3])
def test_a_step_in_shards_is_the_whole_batch_step(shards, optimizer_name):
    """The batch cut into shards (even or not) gives the same losses and weights, to
    rounding; the last batch, of one image, has a single shard."""
    images = tf.constant((np.random.default_rng(5).random((65, 28, 28, 1)) < 0.2).astype(np.float32))
    tf.keras.utils.set_random_seed(5)
    initial = network.CVAE(2).get_weights()
    results = []
    for count in (1, shards):  # the whole batch, then in shards
        model = network.CVAE(2)
        model.set_weights(initial)
        optimizer = (tf.keras.optimizers.SGD(1e-2) if optimizer_name == "sgd"
                     else tf.keras.optimizers.Adam(1e-3))
        train_steps = steps.compiled_train_steps(functools.partial(train.train_step, shards=count),
                                                 model, optimizer, tf.random.Generator.from_seed(5))
        losses = epoch_losses(train_steps, images)
        results.append((losses, model.get_weights()))
    (whole_losses, whole_weights), (losses, weights) = results
    assert len(losses) == 3
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-6)
    moved = max(float(np.abs(whole - start).max()) for whole, start in zip(whole_weights, initial))
    assert moved > 1e-3  # far more than the tolerance below: a wrong gradient would show
    for ours, whole, start in zip(weights, whole_weights, initial):
        assert not np.array_equal(whole, start)  # three steps moved every weight
        np.testing.assert_allclose(ours, whole, rtol=1e-5, atol=1e-6)  # rounding, at their scale


def test_a_loss_of_unknown_batch_size_in_shards_is_the_whole_batchs():
    """steps.weighted_loss where the batch size is known only when it runs (a traced function)."""
    tf.keras.utils.set_random_seed(9)
    model = network.CVAE(2)
    x = tf.constant((np.random.default_rng(9).random((7, 28, 28, 1)) < 0.2).astype(np.float32))
    eps = tf.random.stateless_normal((7, 2), seed=(9, 9))
    unknown = tf.function(lambda x, eps: steps.weighted_loss(network.compute_loss, model, x, eps, 2),
                          input_signature=[tf.TensorSpec((None, 28, 28, 1)), tf.TensorSpec((None, 2))])
    np.testing.assert_allclose(unknown(x, eps), network.compute_loss(model, x, eps), rtol=1e-6)


SHARDS_AND_THREADS = """
import sys
from machinery import distribute, speed
import tensorflow as tf
if sys.argv[1] == "started":
    tf.constant(1.0) + 1.0  # TensorFlow starts with its default threads
shards = speed.setup_shards(int(sys.argv[2]) or None)
print(shards, tf.config.threading.get_inter_op_parallelism_threads(),
      tf.config.threading.get_intra_op_parallelism_threads(), distribute.available_cores())
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
    assert speed.setup_shards(None, "mirrored") == 1  # each replica batch stays whole
