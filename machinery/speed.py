"""Kernels and threads: another call for some layers of a built model (the same variables,
the tutorial's maths, as tests/test_speed.py checks against Keras' layers), and threads for
the shards; docs/speed.md says what each buys, measured.

- float32_bias_gradients(model), for bf16 training: its convolutions' bias gradients in float32.
- depthwise_logits(model): the logits layer as a depthwise convolution, on AVX-512 CPUs.
- setup_shards: one core an op and several ops at once, for a batch cut into shards (steps.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from machinery import cli, distribute, hardware

import tensorflow as tf

# ----------------------------------------------------------------------------
# Kernels: Keras' convolution layers, with our own call where it must differ


@tf.custom_gradient
def _add_bias(outputs: tf.Tensor, bias: tf.Tensor) -> tuple[tf.Tensor, object]:
    """outputs + bias (over the last axis), with the bias gradient summed in float32."""
    def gradients(upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        all_but_channels = list(range(len(upstream.shape) - 1))
        bias_gradient = tf.reduce_sum(tf.cast(upstream, tf.float32), axis=all_but_channels)
        return upstream, tf.cast(bias_gradient, bias.dtype)
    return outputs + bias, gradients


def _convolve_then_add_bias(layer: tf.keras.layers.Layer, inputs: tf.Tensor, convolve) -> tf.Tensor:
    outputs = convolve(inputs)
    if layer.use_bias:
        bias = tf.cast(layer.bias, outputs.dtype)
        outputs = _add_bias(outputs, bias) if outputs.dtype == tf.bfloat16 else outputs + bias
    return layer.activation(outputs)


class BF16Conv2D(tf.keras.layers.Conv2D):
    """tf.keras.layers.Conv2D in bfloat16, with a float32 bias gradient."""

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return _convolve_then_add_bias(self, inputs, lambda x: self.convolution_op(x, self.kernel))


class BF16Conv2DTranspose(tf.keras.layers.Conv2DTranspose):
    """tf.keras.layers.Conv2DTranspose in bfloat16, with a float32 bias gradient."""

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return _convolve_then_add_bias(self, inputs, lambda x: tf.keras.ops.conv_transpose(
            x, self.kernel, strides=list(self.strides), padding=self.padding,
            output_padding=self.output_padding, dilation_rate=self.dilation_rate,
            data_format=self.data_format))


class DepthwiseLogits(tf.keras.layers.Conv2DTranspose):
    """A stride-1 transposed convolution to one channel ('same', odd kernel) as what it
    equals: a convolution by the flipped kernel, which to one channel is a depthwise
    convolution summed over the channels."""

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        def convolve(x: tf.Tensor) -> tf.Tensor:
            kernel = tf.transpose(self.kernel[::-1, ::-1], (0, 1, 3, 2))  # (rows, cols, in, 1)
            return tf.reduce_sum(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME"),
                                 axis=-1, keepdims=True)
        return _convolve_then_add_bias(self, inputs, convolve)


def is_logits_shape(layer: tf.keras.layers.Layer) -> bool:
    """Whether `layer` is a transposed convolution that DepthwiseLogits computes exactly."""
    return (isinstance(layer, tf.keras.layers.Conv2DTranspose) and layer.filters == 1
            and layer.strides == (1, 1) and layer.padding == "same"
            and layer.output_padding is None and layer.dilation_rate == (1, 1)
            and layer.data_format == "channels_last"
            and all(size % 2 == 1 for size in layer.kernel_size)
            and layer.compute_dtype == "float32")


def _swap_classes(model: tf.keras.layers.Layer, new_class: Callable[[tf.keras.layers.Layer], type | None]
                  ) -> list[str]:
    """Give each of the model's layers (nested too) the class new_class(layer) names, if any:
    the same variables, another call. Returns the names of the layers changed."""
    changed = []
    for layer in getattr(model, "layers", []):
        if (subclass := new_class(layer)) is not None:
            layer.__class__ = subclass
            changed.append(layer.name)
        changed += _swap_classes(layer, new_class)
    return changed


def float32_bias_gradients(model: tf.keras.layers.Layer) -> list[str]:
    """In a bf16 model, the convolutions whose bias gradient is summed in float32 (Keras' CPU
    kernel sums bfloat16 in bfloat16, and the biases barely learn); nothing in fp32."""
    bf16_classes = {tf.keras.layers.Conv2D: BF16Conv2D, tf.keras.layers.Conv2DTranspose: BF16Conv2DTranspose}
    return _swap_classes(model, lambda layer: bf16_classes.get(type(layer))
                         if layer.compute_dtype == "bfloat16" else None)


def _vectorize_shared_depthwise_kernels() -> bool:
    """Teach tf.vectorized_map the depthwise convolution of a kernel the same in every
    iteration: TensorFlow's own rule takes only a kernel that varies, and fails on ours.
    Ours folds the loop into the batch, as TensorFlow does for Conv2D. Returns whether
    vectorized_map can take DepthwiseLogits (False where TensorFlow's rules moved)."""
    try:
        from tensorflow.python.ops.parallel_for import pfor
        rules, its_rule = pfor._pfor_converter_registry, "DepthwiseConv2dNative"
        tensorflows_rule, create_op, wrap = rules[its_rule], pfor._create_op, pfor.wrap
    except (ImportError, AttributeError, KeyError):
        return False
    if getattr(tensorflows_rule, "shares_kernels", False):
        return True

    def rule(pfor_input):
        if pfor_input.inputs[1].is_stacked:  # a kernel per iteration: TensorFlow's rule
            return tensorflows_rule(pfor_input)
        images = pfor_input.stacked_input(0)  # (iterations, batch, ...): to (iterations * batch, ...)
        shape = tf.shape(images)
        outputs = create_op(its_rule, [tf.reshape(images, tf.concat([[-1], shape[2:]], 0)),
                                       pfor_input.unstacked_input(1)],
                            [output.dtype for output in pfor_input.outputs],
                            attrs=pfor_input.op.node_def.attr).outputs[0]
        return wrap(tf.reshape(outputs, tf.concat([shape[:2], tf.shape(outputs)[1:]], 0)), True)
    rule.shares_kernels = True
    rules[its_rule] = rule
    return True


def depthwise_logits_pay() -> bool:
    """Whether the depthwise logits kernel is the faster one: on a CPU with AVX-512
    (docs/speed.md), not with AVX2 alone nor on a GPU."""
    return not hardware.has_gpu() and "AVX-512" in hardware.instruction_sets()


def depthwise_logits(model: tf.keras.layers.Layer, vectorized: bool = False,
                     where_it_pays: bool = True) -> list[str]:
    """The logits layer as DepthwiseLogits, where it pays (depthwise_logits_pay, unless
    `where_it_pays` is False); with `vectorized` (evaluate.py's tf.vectorized_map), only
    where vectorized_map can take it."""
    if where_it_pays and not depthwise_logits_pay():
        return []
    if vectorized and not _vectorize_shared_depthwise_kernels():
        return []
    return _swap_classes(model, lambda layer: DepthwiseLogits if is_logits_shape(layer) else None)


# ----------------------------------------------------------------------------
# Threads: each batch in shards side by side, a core each


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=cli.positive_int, default=None,
                        help="cut each batch into N shards computed side by side, the cores "
                             "shared among them (default: 2 with --strategy default on a "
                             "machine with no GPU and 2 or more cores, else 1); the results "
                             "are the same to float rounding, and repeat bit for bit on 2 "
                             "cores (with more, each op has more than one thread)")


def setup_shards(requested: int | None = None, strategy_name: str = "default") -> int:
    """How many shards to cut each batch into (--shards), with TensorFlow's threads set
    for them: that many ops at once, the cores shared among them. By default 2 on one
    CPU device of 2 or more cores, else 1; and 1 where TensorFlow started already."""
    cores = distribute.available_cores()
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
