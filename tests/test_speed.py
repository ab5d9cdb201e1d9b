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

import evaluate
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


def test_bias_options_stay_and_other_bf16_layers_with_a_bias_are_refused():
    dense = tf.keras.layers.Dense(4, bias_initializer="ones", bias_regularizer="l2",
                                  bias_constraint="non_neg", dtype="mixed_bfloat16")
    model = tf.keras.Sequential(network.with_float32_bias_gradients([tf.keras.layers.InputLayer(shape=(3,)),
                                                                     dense]))
    bias_add = model.layers[1]
    np.testing.assert_array_equal(bias_add.bias.numpy(), np.ones(4))
    assert bias_add.bias.constraint is not None and len(model.losses) == 1  # the L2 term
    restored = network.BiasAdd.from_config(bias_add.get_config())
    assert restored.get_config() == bias_add.get_config()
    with pytest.raises(ValueError, match="dtype='float32' or use_bias=False"):
        network.with_float32_bias_gradients([tf.keras.layers.Conv1D(4, 3, dtype="mixed_bfloat16")])


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_the_depthwise_logits_layer_is_keras_transposed_convolution(kernel_size):
    keras, ours = (tf.keras.Sequential([tf.keras.layers.InputLayer(shape=(28, 28, 32)),
                                        kind(1, kernel_size, padding="same")])
                   for kind in (tf.keras.layers.Conv2DTranspose, speed.DepthwiseLogits))
    rng = np.random.default_rng(7)
    keras.set_weights([rng.normal(size=w.shape) for w in keras.get_weights()])
    ours.set_weights(keras.get_weights())
    x = tf.constant(rng.normal(size=(4, 28, 28, 32)), tf.float32)
    results = []
    for model in (ours, keras):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)
            total = tf.reduce_sum(y * tf.range(28.0)[:, None, None])  # uneven weights
        results.append([y, *tape.gradient(total, [x, *model.trainable_variables])])
    # Sums in another order: rounding of about sqrt(n) ulps of the result's scale (the widest
    # sums, the kernel's and bias' gradients, add 4 x 28 x 28 terms); an unflipped kernel is off by O(1).
    atol_per_scale = np.sqrt(4 * 28 * 28) * np.finfo(np.float32).eps
    for ours_, keras_ in zip(*results):
        np.testing.assert_allclose(ours_, keras_, atol=atol_per_scale * np.abs(keras_).max())


def test_evaluates_iwae_bound_is_the_same_with_the_depthwise_logits():
    tf.keras.utils.set_random_seed(4)
    keras = network.CVAE(2)
    ours = network.CVAE(2, logits_layer=speed.DepthwiseLogits)
    ours.set_weights(keras.get_weights())
    assert type(ours.decoder.layers[-1]) is speed.DepthwiseLogits
    x = tf.constant((np.random.default_rng(4).random((8, 28, 28, 1)) < 0.3).astype(np.float32))
    eps = evaluate.noise(4, 0, 1, (8, 20, 2))
    np.testing.assert_allclose(evaluate.iwae_bound(ours, x, eps), evaluate.iwae_bound(keras, x, eps),
                               rtol=1e-5)


@pytest.mark.parametrize("sets, gpu, depthwise", [(["AVX2", "AVX-512"], False, True),
                                                  (["AVX2"], False, False),
                                                  (["AVX2", "AVX-512"], True, False)])
def test_the_depthwise_logits_only_where_they_pay(monkeypatch, sets, gpu, depthwise):
    """AVX-512 alone: with AVX2 alone (and, unmeasured, on a GPU) Keras' own kernel is faster."""
    monkeypatch.setattr(speed.hardware, "instruction_sets", lambda: sets)
    monkeypatch.setattr(speed.hardware, "has_gpu", lambda: gpu)
    assert speed.logits_layer() is (speed.DepthwiseLogits if depthwise else tf.keras.layers.Conv2DTranspose)


@pytest.mark.parametrize("optimizer_name, classes", [("sgd", 0), ("adam", 0), ("adam", 10)])
@pytest.mark.parametrize("shards", [2, 3])
def test_a_step_in_shards_is_the_whole_batch_step(shards, optimizer_name, classes):
    """The batch cut into shards (even or not) gives the same losses and weights, to
    rounding, a conditional model's classes staying with their images; the last batch, of
    one image, has a single shard."""
    images = tf.constant((np.random.default_rng(5).random((65, 28, 28, 1)) < 0.2).astype(np.float32))
    labels = np.random.default_rng(5).integers(0, 10, 65) if classes else None
    tf.keras.utils.set_random_seed(5)
    initial = network.CVAE(2, num_classes=classes).get_weights()
    results = []
    for count in (1, shards):  # the whole batch, then in shards
        model = network.CVAE(2, num_classes=classes)
        model.set_weights(initial)
        optimizer = (tf.keras.optimizers.SGD(1e-2) if optimizer_name == "sgd"
                     else tf.keras.optimizers.Adam(1e-3))
        train_steps = steps.compiled_train_steps(functools.partial(train.train_step, shards=count),
                                                 model, optimizer, tf.random.Generator.from_seed(5))
        losses = epoch_losses(train_steps, images, labels=labels)
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


@pytest.mark.parametrize("cores, gpus, expected", [(1, [], 1), (2, [], 2), (16, [], 2), (16, ["GPU:0"], 1)])
def test_the_default_shards_are_two_on_a_cpu_of_two_cores_or_more(cores, gpus, expected, monkeypatch):
    """The rule as the README states it, case by case (the test above re-derives it)."""
    monkeypatch.setattr(speed.distribute, "available_cores", lambda: cores)
    monkeypatch.setattr(speed.tf.config, "list_physical_devices",
                        lambda kind=None: gpus if kind == "GPU" else [])
    for setter in ("set_inter_op_parallelism_threads", "set_intra_op_parallelism_threads"):
        monkeypatch.setattr(speed.tf.config.threading, setter, lambda threads: None)
    assert speed.setup_shards(None) == expected
