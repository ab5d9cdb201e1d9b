"""What runs faster, in the open: threads for the shards (one core an op and several ops at
once, for --shards: train.train_step computes them, machinery/steps.py cuts them), and the
logits layer evaluate.py builds where it pays. docs/speed.md says what each buys, measured."""

from __future__ import annotations

import argparse

from machinery import cli, distribute, hardware

import tensorflow as tf

# ----------------------------------------------------------------------------
# The logits layer


class DepthwiseLogits(tf.keras.layers.Conv2DTranspose):
    """Keras' Conv2DTranspose, the same weights and results to rounding, computed where it can
    (stride 1, 'same', an odd kernel, to one channel) as the convolution it equals: by the
    flipped kernel, which to one channel is a depthwise convolution summed over the channels."""

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        if not (self.filters == 1 and self.strides == (1, 1) and self.padding == "same"
                and self.dilation_rate == (1, 1) and self.output_padding is None
                and self.data_format == "channels_last" and all(k % 2 for k in self.kernel_size)):
            return super().call(inputs)
        kernel = tf.transpose(self.kernel[::-1, ::-1], (0, 1, 3, 2))  # (rows, cols, in, 1)
        outputs = tf.reduce_sum(tf.nn.depthwise_conv2d(inputs, kernel, [1, 1, 1, 1], "SAME"),
                                axis=-1, keepdims=True)
        outputs = outputs + self.bias if self.use_bias else outputs
        return self.activation(outputs) if self.activation is not None else outputs


def logits_layer() -> type:
    """The logits layer's class for evaluate.py's IWAE bound: DepthwiseLogits on a CPU with
    AVX-512 (a decode 29% faster there), else Keras' own (faster with AVX2 alone)."""
    fast = not hardware.has_gpu() and "AVX-512" in hardware.instruction_sets()
    return DepthwiseLogits if fast else tf.keras.layers.Conv2DTranspose


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
