"""Speed, and exact repeatability at speed: each trick below stands in for a piece of the
tutorial with the same maths; tests/test_speedups.py checks each against the tutorial's
formula or Keras' own layer, and docs/speed.md measures it.

- Conv2D, Conv2DTranspose in bf16: the bias gradient summed in float32, where Keras'
  CPU kernel sums bfloat16 in bfloat16 and stalls (docs/speed.md#bf16).
- Conv2DTranspose: the logits layer (stride 1, to one channel) as a depthwise
  convolution, faster on a CPU than Keras' transposed one (docs/speed.md#the-logits-layer).
- bernoulli_log_likelihood, log_normal_pdfs, analytic_kl: gradients that add two numbers
  at a time, where autodiff's AddN of three sums in a timing-dependent order
  (docs/speed.md#exact-runs).
- setup_shards: one core an op, two ops at once, for a batch cut in two (train.batch_loss),
  instead of TensorFlow's default threads (docs/speed.md#two-shards).

This module knows nothing of the model or the loop: they call it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import cli  # first: it loads TensorFlow without its start-up logs

import tensorflow as tf

# ----------------------------------------------------------------------------
# Layers: Keras' convolutions, with our own call where it must differ


@tf.custom_gradient
def _add_bias(outputs: tf.Tensor, bias: tf.Tensor) -> tuple[tf.Tensor, object]:
    """outputs + bias (over the last axis), with the bias gradient summed in float32."""
    def gradients(upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        all_but_channels = list(range(len(upstream.shape) - 1))
        bias_gradient = tf.reduce_sum(tf.cast(upstream, tf.float32), axis=all_but_channels)
        return upstream, tf.cast(bias_gradient, bias.dtype)
    return outputs + bias, gradients


class _Convolution:
    """Keras' convolution layers, with our own call in bfloat16 (a float32 bias gradient)
    and where `_convolve` has a faster kernel. Same variables, same results to rounding."""

    def _has_faster_convolution(self) -> bool:
        return False

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        bfloat16 = self.compute_dtype == "bfloat16"
        if not (bfloat16 or self._has_faster_convolution()):
            return super().call(inputs)
        outputs = self._convolve(inputs)
        if self.use_bias:
            bias = tf.cast(self.bias, outputs.dtype)
            outputs = _add_bias(outputs, bias) if bfloat16 else outputs + bias
        return self.activation(outputs)


class Conv2D(_Convolution, tf.keras.layers.Conv2D):
    """tf.keras.layers.Conv2D, with a float32 bias gradient in bfloat16."""

    def _convolve(self, inputs: tf.Tensor) -> tf.Tensor:
        return self.convolution_op(inputs, self.kernel)


class Conv2DTranspose(_Convolution, tf.keras.layers.Conv2DTranspose):
    """tf.keras.layers.Conv2DTranspose, with a float32 bias gradient in bfloat16, and the
    logits layer's shape (stride 1, 'same', one channel, odd kernel) as a depthwise one."""

    allow_depthwise = True  # False: always Keras' kernel (the benchmark's tutorial variant)

    def _has_faster_convolution(self) -> bool:
        return (self.allow_depthwise and self.filters == 1 and self.strides == (1, 1)
                and self.padding == "same"
                and self.output_padding is None and self.dilation_rate == (1, 1)
                and self.data_format == "channels_last"
                and all(size % 2 == 1 for size in self.kernel_size))

    def _convolve(self, inputs: tf.Tensor) -> tf.Tensor:
        if self._has_faster_convolution():
            # With stride 1, a transposed convolution is a convolution by the flipped kernel;
            # to one channel, that is a depthwise one (a filter per input channel), summed.
            kernel = tf.transpose(self.kernel[::-1, ::-1], (0, 1, 3, 2))  # (rows, cols, in, 1)
            return tf.reduce_sum(tf.nn.depthwise_conv2d(inputs, kernel, [1, 1, 1, 1], "SAME"),
                                 axis=-1, keepdims=True)
        return tf.keras.ops.conv_transpose(
            inputs, self.kernel, strides=list(self.strides), padding=self.padding,
            output_padding=self.output_padding, dilation_rate=self.dilation_rate,
            data_format=self.data_format)


# ----------------------------------------------------------------------------
# The loss's terms, with gradients that add two numbers at a time
#
# Where a tensor feeds three or more ops, autodiff adds their gradients in one AddN, and
# TensorFlow's CPU AddN sums in an order that depends on timing when ops run side by
# side. Written as below, no tensor of the train step feeds more than two differentiable
# ops, and a sum of two is the same in either order: a seed repeats a run bit for bit.


def bernoulli_log_likelihood(logits: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """log p(x|z) of binary pixels `x` under Bernoulli(sigmoid(logits)), summed per image:
    -reduce_sum(sigmoid_cross_entropy_with_logits(logits, x)), with a gradient of two terms."""
    return tf.reduce_sum(x * logits - tf.math.softplus(logits), axis=(1, 2, 3))


LogNormalPdf = Callable[..., tf.Tensor]


def log_normal_pdfs(log_normal_pdf: LogNormalPdf, z: tf.Tensor, mean: tf.Tensor,
                    logvar: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(log p(z), log q(z|x)) = (log_normal_pdf(z, 0., 0.), log_normal_pdf(z, mean, logvar)),
    the values from the tutorial's `log_normal_pdf`, with their gradients written out."""

    @tf.custom_gradient
    def densities(z: tf.Tensor, mean: tf.Tensor, logvar: tf.Tensor):
        def gradients(upstream_p: tf.Tensor, upstream_q: tf.Tensor):
            upstream_p, upstream_q = upstream_p[:, tf.newaxis], upstream_q[:, tf.newaxis]
            d_mean = (z - mean) * tf.exp(-logvar)  # d log q / d mean, and -d log q / d z
            d_logvar = 0.5 * ((z - mean) * d_mean - 1.0)  # d log q / d logvar
            # d/dz: -upstream_q * d_mean - upstream_p * z, grouped so that for the ELBO
            # (upstream_p = -upstream_q) it is upstream_q * (z - d_mean) to the bit.
            d_z = upstream_q * (z - d_mean) - (upstream_p + upstream_q) * z
            return d_z, upstream_q * d_mean, upstream_q * d_logvar
        return (log_normal_pdf(z, 0.0, 0.0), log_normal_pdf(z, mean, logvar)), gradients

    return densities(z, mean, logvar)


@tf.custom_gradient
def analytic_kl(mean: tf.Tensor, logvar: tf.Tensor) -> tuple[tf.Tensor, object]:
    """KL(N(mean, exp(logvar)) || N(0, I)) in closed form, per image:
    0.5 * reduce_sum(exp(logvar) + mean**2 - 1 - logvar, axis=1), gradients written out."""
    def gradients(upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        upstream = upstream[:, tf.newaxis]
        return upstream * mean, upstream * 0.5 * (tf.exp(logvar) - 1.0)
    return 0.5 * tf.reduce_sum(tf.exp(logvar) + mean**2 - 1.0 - logvar, axis=1), gradients


# ----------------------------------------------------------------------------
# Threads: each batch in shards side by side, a core each


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=cli.positive_int, default=None,
                        help="cut each batch into N pieces computed side by side, the cores "
                             "shared among them (default: 2 with --strategy default on a "
                             "machine with no GPU and 2 or more cores, else 1); the results "
                             "are the same to float rounding, and repeat bit for bit with 1 "
                             "or 2")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def setup_shards(requested: int | None = None, strategy_name: str = "default") -> int:
    """How many shards to cut each batch into (--shards), with TensorFlow's threads set
    for them: that many ops at once, the cores shared among them. By default 2 on one
    CPU device of 2 or more cores, else 1; and 1 where TensorFlow started already."""
    cores = available_cores()
    shards = requested or (2 if strategy_name == "default" and cores >= 2
                           and not tf.config.list_physical_devices("GPU") else 1)
    if shards == 1:
        return 1
    threads = (shards, max(1, cores // shards))  # inter-op, intra-op
    try:
        tf.config.threading.set_inter_op_parallelism_threads(threads[0])
        tf.config.threading.set_intra_op_parallelism_threads(threads[1])
    except RuntimeError:  # TensorFlow has started: thread settings are fixed now
        started_with = (tf.config.threading.get_inter_op_parallelism_threads(),
                        tf.config.threading.get_intra_op_parallelism_threads())
        if started_with != threads and requested is None:
            return 1  # faster than 2 shards on the default threads
    return shards
