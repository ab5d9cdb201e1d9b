"""The model's shapes and size, and the maths of the loss against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import network
import train


@pytest.fixture(scope="module")
def model() -> network.CVAE:
    tf.keras.utils.set_random_seed(0)
    return network.CVAE(latent_dim=2)


def test_parameter_counts_are_the_tutorials(model):
    assert network.count_params(model.encoder) == 28_036
    assert network.count_params(model.decoder) == 41_953


@pytest.mark.parametrize("latent_dim", [1, 2, 5])
def test_shapes(latent_dim):
    model = network.CVAE(latent_dim)
    x = tf.zeros((3, 28, 28, 1))
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (3, latent_dim)
    z = model.reparameterize(mean, logvar)
    assert z.shape == (3, latent_dim)
    assert model.decode(z).shape == (3, 28, 28, 1)
    probabilities = model.sample(tf.zeros((4, latent_dim)))
    assert probabilities.shape == (4, 28, 28, 1)
    assert 0.0 <= float(tf.reduce_min(probabilities)) <= float(tf.reduce_max(probabilities)) <= 1.0
    assert model.sample().shape == (100, 28, 28, 1)  # the tutorial's default: 100 prior draws


def test_reparameterize_is_mean_plus_sigma_times_eps(model):
    mean = tf.constant([[0.5, -1.0]])
    logvar = tf.constant([[np.log(4.0), np.log(0.25)]], tf.float32)
    eps = tf.constant([[1.0, 2.0]])
    # sigma = exp(logvar / 2) = (2, 0.5): z = (0.5 + 2 * 1, -1 + 0.5 * 2)
    np.testing.assert_allclose(model.reparameterize(mean, logvar, eps), [[2.5, 0.0]], rtol=1e-6)


def test_log_normal_pdf_is_the_gaussian_log_density():
    rng = np.random.default_rng(1)
    x, mean = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    variance = rng.uniform(0.1, 3.0, size=(5, 3))
    density = np.exp(-((x - mean) ** 2) / (2 * variance)) / np.sqrt(2 * np.pi * variance)
    expected = np.log(density).sum(axis=1)
    result = network.log_normal_pdf(tf.constant(x, tf.float32), tf.constant(mean, tf.float32),
                                    tf.constant(np.log(variance), tf.float32))
    np.testing.assert_allclose(result, expected, rtol=1e-5)
    # The standard normal at 0, in d dimensions: -d/2 log(2 pi).
    np.testing.assert_allclose(network.log_normal_pdf(tf.zeros((1, 4)), 0.0, 0.0),
                               [-2 * np.log(2 * np.pi)], rtol=1e-6)


def test_loss_matches_a_hand_computation(model):
    rng = np.random.default_rng(2)
    x = (rng.random((4, 28, 28, 1)) < 0.3).astype(np.float32)
    eps = rng.normal(size=(4, 2)).astype(np.float32)

    mean, logvar = (t.numpy().astype(np.float64) for t in model.encode(x))
    z = mean + np.exp(logvar / 2) * eps
    p = 1 / (1 + np.exp(-model.decode(tf.constant(z, tf.float32)).numpy().astype(np.float64)))
    log_px_z = (x * np.log(p) + (1 - x) * np.log(1 - p)).sum(axis=(1, 2, 3))
    log_pz = (-0.5 * z**2 - 0.5 * np.log(2 * np.pi)).sum(axis=1)
    log_qz_x = (-0.5 * eps**2 - 0.5 * logvar - 0.5 * np.log(2 * np.pi)).sum(axis=1)
    expected_elbo = log_px_z + log_pz - log_qz_x

    x, eps = tf.constant(x), tf.constant(eps)
    np.testing.assert_allclose(network.elbo_per_example(model, x, eps), expected_elbo, rtol=1e-4)
    np.testing.assert_allclose(network.compute_loss(model, x, eps), -expected_elbo.mean(), rtol=1e-4)


def test_bernoulli_log_likelihood_is_minus_the_tutorials_cross_entropy():
    rng = np.random.default_rng(5)
    logits = tf.constant(rng.normal(scale=8.0, size=(4, 28, 28, 1)), tf.float32)
    x = tf.constant(rng.random((4, 28, 28, 1)) < 0.3, tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        ours = network.bernoulli_log_likelihood(logits, x)
        cross_ent = tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits)
        tutorials = -tf.reduce_sum(cross_ent, axis=[1, 2, 3])
    np.testing.assert_allclose(ours, tutorials, rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(ours, logits), tape.gradient(tutorials, logits),
                               atol=1e-6)


@pytest.mark.parametrize("kl", network.KL_ESTIMATORS)
def test_written_out_kl_gradients_are_autodiffs(kl):
    rng = np.random.default_rng(6)
    mean, logvar, eps = (tf.constant(rng.normal(size=(8, 3)), tf.float32) for _ in range(3))
    upstream = tf.constant(rng.normal(size=8), tf.float32)  # any weights of the examples
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([mean, logvar])
        z = eps * tf.exp(logvar * 0.5) + mean  # so the gradients include the path through z
        if kl == "mc":
            written = network.monte_carlo_kl(z, mean, logvar)
            autodiff = network.log_normal_pdf(z, mean, logvar) - network.log_normal_pdf(z, 0.0, 0.0)
        else:
            written = network.analytic_kl(mean, logvar)
            autodiff = 0.5 * tf.reduce_sum(tf.exp(logvar) + mean**2 - 1.0 - logvar, axis=1)
        written_total, autodiff_total = (tf.reduce_sum(upstream * kl_) for kl_ in (written, autodiff))
    np.testing.assert_allclose(written, autodiff, rtol=1e-6)
    for ours, expected in zip(tape.gradient(written_total, [mean, logvar]),
                              tape.gradient(autodiff_total, [mean, logvar])):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kl", network.KL_ESTIMATORS)
def test_the_train_step_adds_gradients_two_at_a_time(precision, kl, shards):
    """An AddN of three or more sums in an order that depends on timing (see network.py)."""
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
    train_steps = train.make_train_function(model, optimizer, rng)
    losses = train_steps(tf.stack([x] * 5), tf.constant(0), tf.constant(5))
    assert losses.shape == (5,)
    np.testing.assert_allclose(losses[0], first_loss, rtol=1e-6)  # the batch's mean loss
    assert any(not np.array_equal(a, b.numpy())
               for a, b in zip(weights_before, model.trainable_variables))
    after = network.compute_loss(model, x, eps)
    assert float(after) < float(before)


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


def test_an_epoch_takes_every_batch_in_order_and_a_smaller_last_one():
    tf.keras.utils.set_random_seed(4)
    model = network.CVAE(2)
    optimizer = tf.keras.optimizers.SGD(0.0)  # the weights stay: each loss is checkable
    optimizer.build(model.trainable_variables)
    images = tf.constant((np.random.default_rng(4).random((70, 28, 28, 1)) < 0.2).astype(np.float32))
    train_steps = train.make_train_function(model, optimizer, tf.random.Generator.from_seed(4))
    calls = list(train.epoch_losses(train_steps, images, batch_size=32, steps_per_call=2))
    assert [first for first, _ in calls] == [0, 2]  # two full batches in one call, then the rest
    losses = np.concatenate([losses for _, losses in calls])

    noise = tf.random.Generator.from_seed(4)
    expected = [network.compute_loss(model, images[start:start + 32], noise.normal((size, 2)))
                for start, size in ((0, 32), (32, 32), (64, 6))]
    np.testing.assert_allclose(losses, expected, rtol=1e-6)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_the_transposed_convolution_to_one_channel_is_keras(kernel_size):
    ours = network.Conv2DTranspose(1, kernel_size, padding="same")
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


@pytest.mark.parametrize("layer", [network.Conv2DTranspose(1, 4, padding="same"),  # even kernel
                                   network.Conv2DTranspose(1, 3, strides=2, padding="same"),
                                   network.Conv2DTranspose(1, 3, padding="valid"),
                                   network.Conv2DTranspose(2, 3, padding="same")])
def test_other_transposed_convolutions_are_keras_own(layer):
    assert not layer._has_faster_convolution()
    layer.build((1, 7, 7, 4))
    x = tf.constant(np.random.default_rng(8).normal(size=(1, 7, 7, 4)), tf.float32)
    np.testing.assert_array_equal(layer(x), tf.keras.layers.Conv2DTranspose.call(layer, x))


@pytest.mark.parametrize("layer", [network.Conv2D(8, 3, padding="same", dtype="mixed_bfloat16"),
                                   network.Conv2DTranspose(8, 3, padding="same",
                                                           dtype="mixed_bfloat16")])
def test_bf16_bias_gradients_are_summed_in_float32(layer):
    x = tf.ones((32, 28, 28, 1))
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(tf.cast(layer(x), tf.float32))
    # d total / d bias = the number of outputs per channel: 32 x 28 x 28 = 25,088. Summed
    # in bfloat16 (TensorFlow's BiasAddGrad), it stalls far short (at 512 with Keras' layers).
    np.testing.assert_array_equal(tape.gradient(total, layer.bias), np.full(8, 32 * 28 * 28))


def test_fp32_and_bf16_models_agree():
    x = tf.constant((np.random.default_rng(0).random((32, 28, 28, 1)) < 0.3).astype(np.float32))
    eps = tf.random.stateless_normal((32, 2), seed=(1, 2))
    losses = []
    for precision in ("fp32", "bf16"):
        tf.keras.utils.set_random_seed(1)
        losses.append(float(network.compute_loss(network.CVAE(2, precision), x, eps)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
