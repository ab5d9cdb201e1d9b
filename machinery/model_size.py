"""How big a model is: its parameters, and the FLOPs of each layer for one image, counted
from the layer shapes (python network.py prints them; the benchmark sets them against a matmul)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def count_params(model: tf.keras.Model) -> int:
    return int(sum(np.prod(weight.shape) for weight in model.weights))


def layer_flops(layers: list[tf.keras.layers.Layer]) -> list[int]:
    """Multiply-adds x 2 of each layer for one image, counted from the layer shapes."""
    per_layer = []
    for layer in layers:
        if isinstance(layer, tf.keras.layers.Conv2DTranspose):  # each input pixel spreads a kernel
            _, height, width, channels = layer.input.shape
            kernel = np.prod(layer.kernel_size)
            per_layer.append(2 * height * width * channels * kernel * layer.filters)
        elif isinstance(layer, tf.keras.layers.Conv2D):  # each output pixel gathers a kernel
            _, height, width, filters = layer.output.shape
            kernel = np.prod(layer.kernel_size) * layer.input.shape[-1]
            per_layer.append(2 * height * width * filters * kernel)
        elif isinstance(layer, tf.keras.layers.Dense):
            per_layer.append(2 * layer.input.shape[-1] * layer.units)
    return [int(flops) for flops in per_layer]
