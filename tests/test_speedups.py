"""Each speed-up against what it stands in for: the tutorial's formula or Keras' own layer,
values and gradients; the train step's sums of two; shards; the thread set-up."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT

import network
import speedups
import train


def test_bernoulli_log_likelihood_is_minus_the_tutorials_cross_entropy():
    rng = np.random.default_rng(5)
    logits = tf.constant(rng.normal(scale=8.0, size=(4, 28, 28, 1)), tf.float32)
    x = tf.constant(rng.random((4, 28, 28, 1)) < 0.3, tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        ours = speedups.bernoulli_log_likelihood(logits, x)
        cross_ent = tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits)
        tutorials = -tf.reduce_sum(cross_ent, axis=[1, 2, 3])
    np.testing.assert_allclose(ours, tutorials, rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(ours, logits), tape.gradient(tutorials, logits),
                               atol=1e-6)


def test_written_out_log_density_gradients_are_autodiffs():
    """For any weights of log p(z) and log q(z|x), not only the ELBO's +1 and -1."""
    rng = np.random.default_rng(6)
    mean, logvar, eps = (tf.constant(rng.normal(size=(8, 3)), tf.float32) for _ in range(3))
    upstream_p, upstream_q = (tf.constant(rng.normal(size=8), tf.float32) for _ in range(2))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([mean, logvar])
        z = eps * tf.exp(logvar * 0.5) + mean  # so the gradients include the path through z
        written = speedups.log_normal_pdfs(network.log_normal_pdf, z, mean, logvar)
        tutorials = (network.log_normal_pdf(z, 0.0, 0.0), network.log_normal_pdf(z, mean, logvar))
        totals = [tf.reduce_sum(upstream_p * p + upstream_q * q) for p, q in (written, tutorials)]
    for ours, expected in zip(written, tutorials):
        np.testing.assert_array_equal(ours, expected)  # the values are log_normal_pdf's own
    for ours, expected in zip(tape.gradient(totals[0], [mean, logvar]),
                              tape.gradient(totals[1], [mean, logvar])):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_written_out_analytic_kl_gradients_are_autodiffs():
    rng = np.random.default_rng(6)
    mean, logvar = (tf.constant(rng.normal(size=(8, 3)), tf.float32) for _ in range(2))
    upstream = tf.constant(rng.normal(size=8), tf.float32)  # any weights of the examples
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([mean, logvar])
        written = speedups.analytic_kl(mean, logvar)
        autodiff = 0.5 * tf.reduce_sum(tf.exp(logvar) + mean**2 - 1.0 - logvar, axis=1)
        written_total, autodiff_total = (tf.reduce_sum(upstream * kl) for kl in (written, autodiff))
    np.testing.assert_allclose(written, autodiff, rtol=1e-6)
    for ours, expected in zip(tape.gradient(written_total, [mean, logvar]),
                              tape.gradient(autodiff_total, [mean, logvar])):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kl", network.KL_ESTIMATORS)
def test_the_train_step_adds_gradients_two_at_a_time(precision, kl, shards):
    """An AddN of three or more sums in an order that depends on timing (see speedups.py)."""
    model = network.CVAE(2, precision)
    optimizer = tf.keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)
    train_steps = train.make_train_function(model, optimizer, tf.random.Generator.from_seed(0),
                                            kl=kl, shards=shards)
    graph = train_steps.get_concrete_function(
        tf.TensorSpec((1, 4, 28, 28, 1)), tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.int32)
    ).graph.as_graph_def()
    # The step is the body of a loop: a function in the graph's library.
    nodes = [*graph.node, *(node for function in graph.library.function for node in function.node_def)]
    sums = [sum(not name.startswith("^") for name in node.input) for node in nodes if node.op == "AddN"]
    assert sums and max(sums) == 2, sums
    # Each shard has a forward pass of its own: one logits layer (a depthwise convolution) each.
    assert sum(node.op == "DepthwiseConv2dNative" for node in nodes) == shards


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize("shards", [2, 3])
def test_a_step_in_shards_is_the_whole_batch_step(shards, optimizer_name):
    """The batch cut into pieces (even or not) gives the same losses and weights, to
    rounding; the last batch, of one image, has a single piece."""
    images = tf.constant((np.random.default_rng(5).random((65, 28, 28, 1)) < 0.2).astype(np.float32))
    tf.keras.utils.set_random_seed(5)
    initial = network.CVAE(2).get_weights()
    results = []
    for pieces in (1, shards):
        model = network.CVAE(2)
        model.set_weights(initial)
        optimizer = (tf.keras.optimizers.SGD(1e-2) if optimizer_name == "sgd"
                     else tf.keras.optimizers.Adam(1e-3))
        optimizer.build(model.trainable_variables)
        train_steps = train.make_train_function(model, optimizer, tf.random.Generator.from_seed(5),
                                                shards=pieces)
        losses = np.concatenate([losses for _, losses in train.epoch_losses(train_steps, images, 32)])
        results.append((losses, model.get_weights()))
    (whole_losses, whole_weights), (losses, weights) = results
    assert len(losses) == 3
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-6)
    moved = max(float(np.abs(whole - start).max()) for whole, start in zip(whole_weights, initial))
    assert moved > 1e-3  # far more than the tolerance below: a wrong gradient would show
    for ours, whole, start in zip(weights, whole_weights, initial):
        assert not np.array_equal(whole, start)  # three steps moved every weight
        np.testing.assert_allclose(ours, whole, rtol=1e-5, atol=1e-6)  # rounding, at their scale


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_the_transposed_convolution_to_one_channel_is_keras(kernel_size):
    ours = speedups.Conv2DTranspose(1, kernel_size, padding="same")
    keras = tf.keras.layers.Conv2DTranspose(1, kernel_size, padding="same")
    rng = np.random.default_rng(7)
    x = tf.constant(rng.normal(size=(4, 28, 28, 32)), tf.float32)
    ours.build(x.shape)
    keras.build(x.shape)
    keras.set_weights([rng.normal(size=w.shape) for w in keras.get_weights()])
    ours.set_weights(keras.get_weights())
    assert ours._has_faster_convolution()  # a depthwise convolution, not oneDNN's transposed one
    gradients = []
    for layer in (ours, keras):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            total = tf.reduce_sum(y * tf.range(28.0)[:, None, None])  # uneven weights
        gradients.append([y, *tape.gradient(total, [x, *layer.trainable_variables])])
    for ours_, keras_ in zip(*gradients):  # sums in another order: rounding, at their scale
        np.testing.assert_allclose(ours_, keras_, atol=1e-6 * np.abs(keras_).max())
    ours.allow_depthwise = False  # as the benchmark's tutorial variant runs it
    assert not ours._has_faster_convolution()


@pytest.mark.parametrize("layer", [speedups.Conv2DTranspose(1, 4, padding="same"),  # even kernel
                                   speedups.Conv2DTranspose(1, 3, strides=2, padding="same"),
                                   speedups.Conv2DTranspose(1, 3, padding="valid"),
                                   speedups.Conv2DTranspose(2, 3, padding="same")])
def test_other_transposed_convolutions_are_keras_own(layer):
    assert not layer._has_faster_convolution()
    layer.build((1, 7, 7, 4))
    x = tf.constant(np.random.default_rng(8).normal(size=(1, 7, 7, 4)), tf.float32)
    np.testing.assert_array_equal(layer(x), tf.keras.layers.Conv2DTranspose.call(layer, x))


@pytest.mark.parametrize("layer", [speedups.Conv2D(8, 3, padding="same", dtype="mixed_bfloat16"),
                                   speedups.Conv2DTranspose(8, 3, padding="same",
                                                           dtype="mixed_bfloat16")])
def test_bf16_bias_gradients_are_summed_in_float32(layer):
    x = tf.ones((32, 28, 28, 1))
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(tf.cast(layer(x), tf.float32))
    # d total / d bias = the number of outputs per channel: 32 x 28 x 28 = 25,088. Summed
    # in bfloat16 (TensorFlow's BiasAddGrad), it stalls far short (at 512 with Keras' layers).
    np.testing.assert_array_equal(tape.gradient(total, layer.bias), np.full(8, 32 * 28 * 28))


def test_a_batch_of_unknown_size_in_shards_is_the_whole_batch():
    """train.batch_loss where the batch size is known only when it runs (a traced function)."""
    tf.keras.utils.set_random_seed(9)
    model = network.CVAE(2)
    x = tf.constant((np.random.default_rng(9).random((7, 28, 28, 1)) < 0.2).astype(np.float32))
    eps = tf.random.stateless_normal((7, 2), seed=(9, 9))
    unknown = tf.function(lambda x, eps: train.batch_loss(model, x, eps, shards=2), input_signature=[
        tf.TensorSpec((None, 28, 28, 1)), tf.TensorSpec((None, 2))])
    np.testing.assert_allclose(unknown(x, eps), network.compute_loss(model, x, eps), rtol=1e-6)


SHARDS_AND_THREADS = """
import sys
import tensorflow as tf
import speedups
if sys.argv[1] == "started":
    tf.constant(1.0) + 1.0  # TensorFlow starts with its default threads
shards = speedups.setup_shards(int(sys.argv[2]) or None)
print(shards, tf.config.threading.get_inter_op_parallelism_threads(),
      tf.config.threading.get_intra_op_parallelism_threads(), speedups.available_cores())
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
    assert speedups.setup_shards(None, "mirrored") == 1  # each replica's share stays whole
