"""Each speed trick against what it stands in for: Keras' own layer, values and gradients;
the shards against the whole batch; the thread set-up."""

from __future__ import annotations

import subprocess
import sys

from machinery import speed, steps

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, epoch_losses

import evaluate
import network
import train


def keras_model(*layers: tf.keras.layers.Layer, shape=(28, 28, 32)) -> tf.keras.Sequential:
    return tf.keras.Sequential([tf.keras.layers.InputLayer(shape=shape), *layers])


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_the_logits_layer_as_a_depthwise_convolution_is_keras(kernel_size):
    ours, keras = (keras_model(tf.keras.layers.Conv2DTranspose(1, kernel_size, padding="same"))
                   for _ in range(2))
    rng = np.random.default_rng(7)
    keras.set_weights([rng.normal(size=w.shape) for w in keras.get_weights()])
    ours.set_weights(keras.get_weights())
    assert speed.depthwise_logits(ours, where_it_pays=False) == [ours.layers[0].name]
    assert type(ours.layers[0]) is speed.DepthwiseLogits
    assert type(keras.layers[0]) is tf.keras.layers.Conv2DTranspose
    x = tf.constant(rng.normal(size=(4, 28, 28, 32)), tf.float32)
    results = []
    for model in (ours, keras):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)
            total = tf.reduce_sum(y * tf.range(28.0)[:, None, None])  # uneven weights
        results.append([y, *tape.gradient(total, [x, *model.trainable_variables])])
    # Sums in another order: rounding, whose typical size for a float32 sum of n terms is
    # sqrt(n) ulps of the result's scale; the widest sums here (the kernel's and the bias'
    # gradients) add 4 x 28 x 28 terms. A wrong kernel (unflipped, say) is off by O(1).
    atol_per_scale = np.sqrt(4 * 28 * 28) * np.finfo(np.float32).eps
    for ours_, keras_ in zip(*results):
        np.testing.assert_allclose(ours_, keras_, atol=atol_per_scale * np.abs(keras_).max())


@pytest.mark.parametrize("layer", [tf.keras.layers.Conv2DTranspose(1, 4, padding="same"),  # even kernel
                                   tf.keras.layers.Conv2DTranspose(1, 3, strides=2, padding="same"),
                                   tf.keras.layers.Conv2DTranspose(1, 3, padding="valid"),
                                   tf.keras.layers.Conv2DTranspose(2, 3, padding="same"),
                                   tf.keras.layers.Conv2D(8, 3)])
def test_other_layers_keep_keras_own_kernels(layer):
    model = keras_model(layer, shape=(7, 7, 4))
    assert speed.depthwise_logits(model, where_it_pays=False) == speed.float32_bias_gradients(model) == []
    assert type(model.layers[0]).__module__.startswith("keras")


def test_the_cvaes_fast_kernels_keep_its_variables_and_outputs():
    x = tf.constant((np.random.default_rng(3).random((4, 28, 28, 1)) < 0.3).astype(np.float32))
    eps = tf.random.stateless_normal((4, 2), seed=(3, 3))
    for precision, swapped in (("fp32", 0), ("bf16", 4)):  # bf16: the 4 hidden convolutions
        tf.keras.utils.set_random_seed(3)
        model = network.CVAE(2, precision)
        before = [w.numpy() for w in model.weights]
        loss = network.compute_loss(model, x, eps)
        assert len(speed.float32_bias_gradients(model)) == swapped
        assert len(speed.depthwise_logits(model, where_it_pays=False)) == 1
        assert all(np.array_equal(a, b.numpy()) for a, b in zip(before, model.weights))
        np.testing.assert_allclose(network.compute_loss(model, x, eps), loss, rtol=1e-5 if precision == "fp32"
                                   else 1e-3)


def test_vectorized_map_takes_the_depthwise_logits():
    """evaluate.py runs compute_loss in tf.vectorized_map, whose own rule for a depthwise
    convolution fails on a kernel shared by every iteration; a kernel per iteration still
    goes to TensorFlow's rule."""
    keras, ours = (keras_model(tf.keras.layers.Conv2DTranspose(1, 3, padding="same")) for _ in range(2))
    ours.set_weights(keras.get_weights())
    assert speed.depthwise_logits(ours, vectorized=True, where_it_pays=False) == [ours.layers[0].name]
    x = tf.random.stateless_normal((5, 2, 28, 28, 32), seed=(4, 4))
    np.testing.assert_allclose(tf.vectorized_map(ours, x, fallback_to_while_loop=False),
                               tf.stack([keras(images) for images in x]), rtol=1e-4, atol=1e-5)
    kernels = tf.random.stateless_normal((5, 3, 3, 32, 1), seed=(5, 5))
    convolve = lambda pair: tf.nn.depthwise_conv2d(pair[0], pair[1], [1, 1, 1, 1], "SAME")  # noqa: E731
    np.testing.assert_allclose(tf.vectorized_map(convolve, (x, kernels), fallback_to_while_loop=False),
                               tf.stack([convolve(pair) for pair in zip(x, kernels)]), rtol=1e-5, atol=1e-5)


def test_the_iwae_bound_with_the_fast_kernels_is_keras():
    tf.keras.utils.set_random_seed(4)
    keras, ours = network.CVAE(2), network.CVAE(2)
    ours.set_weights(keras.get_weights())
    logits = ours.decoder.layers[-1].name
    assert speed.depthwise_logits(ours, vectorized=True, where_it_pays=False) == [logits]
    x = tf.constant((np.random.default_rng(4).random((8, 28, 28, 1)) < 0.3).astype(np.float32))
    eps = evaluate.noise(4, 0, 1, (8, 20, 2))
    np.testing.assert_allclose(evaluate.iwae_bound(ours, x, eps), evaluate.iwae_bound(keras, x, eps),
                               rtol=1e-5)


@pytest.mark.parametrize("sets, gpu, swapped", [(["AVX2", "AVX-512"], False, True),
                                                (["AVX2"], False, False), (["AVX2", "AVX-512"], True, False)])
def test_the_logits_layer_is_swapped_only_where_it_pays(monkeypatch, sets, gpu, swapped):
    """The depthwise logits on a CPU with AVX-512 alone: with AVX2 alone (and, unmeasured, on
    a GPU) Keras' own kernel is the faster."""
    monkeypatch.setattr(speed.hardware, "instruction_sets", lambda: sets)
    monkeypatch.setattr(speed.hardware, "has_gpu", lambda: gpu)
    model = network.CVAE(2)
    assert speed.depthwise_logits(model) == ([model.decoder.layers[-1].name] if swapped else [])


@pytest.mark.parametrize("kind", [tf.keras.layers.Conv2D, tf.keras.layers.Conv2DTranspose])
def test_bf16_bias_gradients_are_summed_in_float32(kind):
    model = keras_model(kind(8, 3, padding="same", dtype="mixed_bfloat16"), shape=(28, 28, 1))
    assert len(speed.float32_bias_gradients(model)) == 1
    layer = model.layers[0]
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(tf.cast(model(tf.ones((32, 28, 28, 1))), tf.float32))
    # d total / d bias = the number of outputs per channel: 32 x 28 x 28 = 25,088. Summed
    # in bfloat16 (Keras' layer on TensorFlow's CPU kernels), it stalls far short (at 512).
    np.testing.assert_array_equal(tape.gradient(total, layer.bias), np.full(8, 32 * 28 * 28))


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
        compiled_step = steps.CompiledStep(train.train_step, model, optimizer,
                                           tf.random.Generator.from_seed(5), shards=count)
        losses = epoch_losses(compiled_step, images)
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
