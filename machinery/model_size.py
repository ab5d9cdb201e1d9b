"""How big a model is: its parameters, and the FLOPs of each layer for one image, counted
from the layer shapes; and python network.py's description of a model."""

from __future__ import annotations

from collections.abc import Callable

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


def describe(model: tf.keras.Model, compute_loss: Callable[..., tf.Tensor], batch_size: int,
             source: str | None = None) -> None:
    """Print a CVAE (the one exported in `source`, if any): its summaries, parameters and
    FLOPs, and the shapes and loss of a forward pass on a blank batch."""
    if source:
        print(f"Loaded {source}: latent_dim {model.latent_dim}, precision {model.precision}, "
              f"filters {model.filters or '32, 64 (the tutorial)'}, images {model.image_shape}, "
              f"likelihood {model.likelihood}, classes {model.num_classes or 'none (not conditional)'}")
    model.encoder.summary()
    model.decoder.summary()
    encoder_params, decoder_params = map(count_params, (model.encoder, model.decoder))
    print(f"Parameters: encoder {encoder_params:,}, decoder {decoder_params:,}, "
          f"total {encoder_params + decoder_params:,}")
    flops = sum(layer_flops(model.encoder.layers + model.decoder.layers))
    print(f"FLOPs of one image's forward pass: {flops:,} (a train step: about three times that)")

    x = tf.zeros((batch_size, *model.image_shape))
    y = tf.zeros(batch_size, tf.int32) if model.num_classes else None  # a conditional model's class 0
    mean, logvar = model.encode(x, y)
    z = model.reparameterize(mean, logvar)
    decoded = model.decode(z, y=y)  # logits; for the logistic, each pixel's mean and log-scale
    print(f"\nForward pass on a dummy batch of {batch_size}:")
    decoded_name = "logits" if model.likelihood == "bernoulli" else "decoded"
    for name, tensor in (("x", x), ("mean", mean), ("logvar", logvar), ("z", z), (decoded_name, decoded)):
        print(f"  {name:7s}{tuple(tensor.shape)}")
    state = "trained" if source else "untrained"
    print(f"  loss   {float(compute_loss(model, x, y=y)):.2f} (negative ELBO of the blank batch, {state})")
