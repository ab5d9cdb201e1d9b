"""The tutorial's convolutional VAE and its loss: cells 15 and 17, with the deviations
README.md's map lists.

The encoder gives q(z|x), a diagonal Gaussian, and the decoder p(x|z), a Bernoulli per
pixel; compute_loss is minus the ELBO, log p(x|z) + log p(z) - log q(z|x), with one sample
z ~ q(z|x) an image. CVAE's other arguments are the tutorial's "Next steps" (more filters,
other image shapes, a discretized logistic p(x|z) for 8-bit pixels) and a conditional
model's classes.

    python network.py                    # summaries, parameter counts, a forward pass
    python network.py --filters 512      # the bigger network of the tutorial's "Next steps"
    python network.py --from output      # the same for the model a run exported
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from machinery import cli, files, model_size  # python network.py's, below; the model and its loss need none

import numpy as np
import tensorflow as tf

LATENT_DIM = 2
IMAGE_SHAPE = (28, 28, 1)
# --precision: the Keras dtype policy of the hidden layers. The layers at the latent code, the
# last layer and the biases (BiasAdd) stay float32: z, its sampling and the loss keep float32.
PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16"}
KL_ESTIMATORS = ("mc", "analytic")
# p(x|z): the tutorial's Bernoulli for binarized pixels, or a discretized logistic for 8-bit ones.
LIKELIHOODS = ("bernoulli", "logistic")


@tf.keras.utils.register_keras_serializable(package="cvae")  # for keras.saving.load_model
class CVAE(tf.keras.Model):
    """Convolutional variational autoencoder."""

    def __init__(self, latent_dim: int = LATENT_DIM, precision: str = "fp32", filters: int | None = None,
                 image_shape: Sequence[int] = IMAGE_SHAPE, likelihood: str = "bernoulli",
                 num_classes: int = 0, logits_layer: type = tf.keras.layers.Conv2DTranspose) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.precision = precision
        self.filters, self.image_shape, self.likelihood = filters, tuple(image_shape), likelihood
        # num_classes (--conditional): q(z|x, y) and p(x|z, y) also take the one-hot class y, as
        # more channels of the image and more inputs beside z. 0: the tutorial's CVAE.
        self.num_classes = num_classes
        hidden = PRECISIONS[precision]  # the dtype policy of the hidden layers (--precision)
        # filters (--filters N, the tutorial's "Next steps"): N in every convolution but the last.
        height, width, channels = self.image_shape  # the decoder starts at a quarter of the size
        # The last layer gives each pixel a logit (Bernoulli), or a mean and a log-scale (logistic).
        outputs = channels if likelihood == "bernoulli" else 2 * channels
        self.encoder = tf.keras.Sequential(
            with_float32_bias_gradients([
                tf.keras.layers.InputLayer(shape=(height, width, channels + num_classes)),  # Keras 3: shape
                tf.keras.layers.Conv2D(
                    filters=filters or 32, kernel_size=3, strides=(2, 2), activation='relu', dtype=hidden),
                tf.keras.layers.Conv2D(
                    filters=filters or 64, kernel_size=3, strides=(2, 2), activation='relu', dtype=hidden),
                tf.keras.layers.Flatten(dtype=hidden),
                # No activation
                tf.keras.layers.Dense(latent_dim + latent_dim, dtype="float32"),
            ]),
            name="encoder",
        )

        self.decoder = tf.keras.Sequential(
            with_float32_bias_gradients([
                tf.keras.layers.InputLayer(shape=(latent_dim + num_classes,)),
                # float32: z in bfloat16 would keep 3 significant digits of the code.
                tf.keras.layers.Dense(units=(height//4)*(width//4)*32, activation=tf.nn.relu,
                                      dtype="float32"),
                tf.keras.layers.Reshape(target_shape=(height//4, width//4, 32), dtype=hidden),
                tf.keras.layers.Conv2DTranspose(
                    filters=filters or 64, kernel_size=3, strides=2, padding='same',
                    activation='relu', dtype=hidden),
                tf.keras.layers.Conv2DTranspose(
                    filters=filters or 32, kernel_size=3, strides=2, padding='same',
                    activation='relu', dtype=hidden),
                # No activation. (logits_layer: the same layer and weights computed another way;
                # evaluate.py's faster speed.DepthwiseLogits where it pays.)
                logits_layer(
                    filters=outputs, kernel_size=3, strides=1, padding='same', dtype="float32"),
            ]),
            name="decoder",
        )
        self.built = True  # the encoder and decoder are: their InputLayers gave them their shapes

    def get_config(self) -> dict:
        """What keras.saving.load_model passes back to __init__ to rebuild the model."""
        return {"latent_dim": self.latent_dim, "precision": self.precision, "filters": self.filters,
                "image_shape": list(self.image_shape), "likelihood": self.likelihood,
                "num_classes": self.num_classes}

    @tf.function
    def sample(self, eps: tf.Tensor | None = None, y: tf.Tensor | None = None) -> tf.Tensor:
        if eps is None:
            eps = tf.random.normal(shape=(100, self.latent_dim))
        return self.decode(eps, apply_sigmoid=True, y=y)

    # y: the class of each image, for a conditional CVAE (--conditional); the tutorial's takes none.
    def encode(self, x: tf.Tensor, y: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        if y is not None:  # the one-hot y as more channels of every pixel
            one_hot = tf.one_hot(y, self.num_classes, dtype=x.dtype)[:, tf.newaxis, tf.newaxis, :]
            x = tf.concat([x, one_hot * tf.ones_like(x[..., :1])], axis=-1)
        mean, logvar = tf.split(self.encoder(x), num_or_size_splits=2, axis=1)
        return mean, logvar

    # eps: the training loop draws the noise from the run's seed, so that a run repeats.
    def reparameterize(self, mean: tf.Tensor, logvar: tf.Tensor,
                       eps: tf.Tensor | None = None) -> tf.Tensor:
        if eps is None:
            eps = tf.random.normal(shape=tf.shape(mean))  # tf.shape: the batch may be unknown
        return eps * tf.exp(logvar * .5) + mean

    # apply_sigmoid: the images to show: pixel probabilities, or the logistic's medians.
    def decode(self, z: tf.Tensor, apply_sigmoid: bool = False, y: tf.Tensor | None = None) -> tf.Tensor:
        if y is not None:  # --conditional: the one-hot y beside z
            z = tf.concat([z, tf.one_hot(y, self.num_classes, dtype=z.dtype)], axis=1)
        logits = self.decoder(z)  # logistic: each pixel's mean and log-scale, not logits
        if apply_sigmoid:
            if self.likelihood == "logistic":
                return logistic_median(logits)
            probs = tf.sigmoid(logits)
            return probs
        return logits


@tf.keras.utils.register_keras_serializable(package="cvae")
class BiasAdd(tf.keras.layers.Layer):
    """A bias and an activation in float32, taken out of a bfloat16 layer: TensorFlow's CPU
    kernels sum a bfloat16 bias gradient in bfloat16, where a sum of thousands stalls."""

    def __init__(self, activation: object = None, bias_initializer: object = "zeros",
                 bias_regularizer: object = None, bias_constraint: object = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.activation = tf.keras.activations.get(activation)
        self.options = {"initializer": bias_initializer, "regularizer": bias_regularizer,
                        "constraint": bias_constraint}

    def build(self, input_shape: Sequence[int | None]) -> None:
        self.bias = self.add_weight(name="bias", shape=(input_shape[-1],), **self.options)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return self.activation(inputs + self.bias)

    def get_config(self) -> dict:
        return {**super().get_config(), "activation": tf.keras.activations.serialize(self.activation),
                **{f"bias_{name}": option for name, option in self.options.items()}}


SPLIT_LAYERS = (tf.keras.layers.Dense, tf.keras.layers.Conv2D, tf.keras.layers.Conv2DTranspose)


def with_float32_bias_gradients(layers: list[tf.keras.layers.Layer]) -> list[tf.keras.layers.Layer]:
    """Each bfloat16 layer with a bias (one added here too) as two: the layer without its bias
    and activation (its kernel initialized alike), then a float32 BiasAdd, for biases that learn."""
    split = []
    for layer in layers:
        config = layer.get_config()
        if layer.compute_dtype == "bfloat16" and config.get("use_bias"):
            if not isinstance(layer, SPLIT_LAYERS) or config.get("data_format") == "channels_first":
                raise ValueError(f"{layer.name}: a bfloat16 {type(layer).__name__} with a bias; CVAE adds "
                                 f"the biases of Dense and Conv2D(Transpose) layers (channels last) in "
                                 f"float32 alone: give it dtype='float32' or use_bias=False")
            split.append(type(layer).from_config({**config, "use_bias": False, "activation": None,
                                                  "kernel_initializer": layer.kernel_initializer}))
            layer = BiasAdd(layer.activation, *(config[f"bias_{name}"] for name in (
                "initializer", "regularizer", "constraint")), dtype="float32", name=f"{layer.name}_bias")
        split.append(layer)
    return split


# ----------------------------------------------------------------------------
# The ELBO (cell 17): its parts per image, and the loss


def log_normal_pdf(sample: tf.Tensor, mean: tf.Tensor, logvar: tf.Tensor, raxis: int = 1) -> tf.Tensor:
    log2pi = tf.math.log(2. * np.pi)
    return tf.reduce_sum(
        -.5 * ((sample - mean) ** 2. * tf.exp(-logvar) + logvar + log2pi),
        axis=raxis)


def expected_log_normal_pdfs(mean: tf.Tensor, logvar: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """E_q[log p(z)] and E_q[log q(z|x)] in closed form, for q(z|x) = N(mean, exp(logvar)) and
    p(z) = N(0, I): their difference is minus KL(q || p) (--kl analytic)."""
    log2pi = tf.math.log(2. * np.pi)
    logpz = tf.reduce_sum(-.5 * (mean ** 2. + tf.exp(logvar) + log2pi), axis=1)
    logqz_x = tf.reduce_sum(-.5 * (1. + logvar + log2pi), axis=1)
    return logpz, logqz_x


def discretized_logistic_log_prob(x: tf.Tensor, outputs: tf.Tensor, levels: int = 256) -> tf.Tensor:
    """log P(x) of each pixel value x in {0, 1/255, ..., 1} (levels of them) under a logistic
    whose mean and log-scale are the decoder's `outputs`, halves of the channels: the mass of
    x's bin, the end bins taking the tails (Salimans et al. 2017, PixelCNN++)."""
    mean, log_scale = tf.split(outputs, 2, axis=-1)
    log_scale = tf.maximum(log_scale, -7.)  # a floor on the scale, as PixelCNN++
    half_bin = 0.5 / (levels - 1)
    inverse_scale = tf.exp(-log_scale)
    upper = (x + half_bin - mean) * inverse_scale
    lower = (x - half_bin - mean) * inverse_scale
    log_cdf_upper = tf.math.log_sigmoid(upper)  # P(X < x + half_bin): the first bin's mass
    log_sf_lower = tf.math.log_sigmoid(-lower)  # P(X > x - half_bin): the last bin's mass
    # Any other bin: log(sigmoid(upper) - sigmoid(lower)), taken in the tail the bin lies in
    # (sigmoid(-lower) - sigmoid(-upper) is the same mass) so that it keeps its precision.
    flip = (upper + lower) > 0.
    log_a = tf.math.log_sigmoid(tf.where(flip, -lower, upper))
    log_b = tf.math.log_sigmoid(tf.where(flip, -upper, lower))
    log_bin = log_a + tf.math.log(-tf.math.expm1(tf.minimum(log_b - log_a, -1e-12)))
    return tf.where(x < half_bin, log_cdf_upper, tf.where(x > 1. - half_bin, log_sf_lower, log_bin))


def logistic_median(outputs: tf.Tensor) -> tf.Tensor:
    """Each pixel's median under the discretized logistic: its mean, clipped to 0..1."""
    mean, _ = tf.split(outputs, 2, axis=-1)
    return tf.clip_by_value(mean, 0., 1.)


def elbo_terms(model: CVAE, x: tf.Tensor, eps: tf.Tensor | None = None, kl: str = "mc",
               y: tf.Tensor | None = None, posterior: tuple | None = None) -> tuple[tf.Tensor, ...]:
    """The tutorial's compute_loss up to its return: log p(x|z), log p(z) and log q(z|x) of
    each image, for one z ~ q(z|x) (noise eps). Training, the test ELBO and evaluate.py's
    every figure are made of these. (posterior: x's encoding, where x repeats an image.)"""
    mean, logvar = model.encode(x, y) if posterior is None else posterior  # y: --conditional's classes
    z = model.reparameterize(mean, logvar, eps)
    if model.likelihood == "logistic":  # --likelihood logistic, for 8-bit pixels
        x_mean_and_log_scale = model.decode(z, y=y)
        logpx_z = tf.reduce_sum(discretized_logistic_log_prob(x, x_mean_and_log_scale), axis=[1, 2, 3])
    else:
        x_logit = model.decode(z, y=y)
        cross_ent = tf.nn.sigmoid_cross_entropy_with_logits(logits=x_logit, labels=x)
        logpx_z = -tf.reduce_sum(cross_ent, axis=[1, 2, 3])
    if kl == "analytic":  # --kl analytic: their expectations over q(z|x), in closed form
        logpz, logqz_x = expected_log_normal_pdfs(mean, logvar)
    else:
        logpz = log_normal_pdf(z, 0., 0.)
        logqz_x = log_normal_pdf(z, mean, logvar)
    return logpx_z, logpz, logqz_x


def compute_loss(model: CVAE, x: tf.Tensor, eps: tf.Tensor | None = None, kl: str = "mc",
                 beta: float = 1., y: tf.Tensor | None = None) -> tf.Tensor:
    """Minus the ELBO, averaged over the batch; --beta B weighs its KL term, log q(z|x) -
    log p(z), by B (a beta-VAE; B = 1 is the tutorial's loss, to the bit)."""
    logpx_z, logpz, logqz_x = elbo_terms(model, x, eps, kl, y)
    return -tf.reduce_mean(logpx_z + beta * logpz - beta * logqz_x)


# ----------------------------------------------------------------------------
# python network.py: what the model looks like


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--filters and --likelihood, the tutorial's "Next steps" (train.py's and network.py's)."""
    parser.add_argument("--filters", type=cli.positive_int, default=None,
                        help="filters of every convolution but the image's own last layer "
                             "(default: the tutorial's 32, 64 / 64, 32)")
    parser.add_argument("--likelihood", choices=LIKELIHOODS, default=None,
                        help="p(x|z): bernoulli, the tutorial's, on binarized pixels; logistic, "
                             "a discretized logistic on the 256 levels of 8-bit pixels "
                             "(default: bernoulli for grey images, logistic for colour)")


def load_model(path: str | Path) -> CVAE:
    """The CVAE a run exported: `path` is its run folder (holding cvae.keras) or the file."""
    return files.load_keras_model(path, files.KERAS_FILE, CVAE)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(description="Print the CVAE: summaries, parameters, shapes.")
    parser.add_argument("--latent-dim", type=cli.positive_int, default=LATENT_DIM,
                        help="size of the latent space of a new, untrained model")
    add_model_flags(parser)
    parser.add_argument("--from", dest="source", default=None, metavar="RUN",
                        help=f"print instead the trained model a run exported: its folder "
                             f"(holding {files.KERAS_FILE}) or the file")
    parser.add_argument("--batch-size", type=cli.positive_int, default=32,
                        help="size of the dummy batch for the forward pass")
    args = parser.parse_args(argv)
    if args.source and {"latent_dim", "filters", "likelihood"} & cli.explicit_flags(parser, argv):
        raise cli.UserError("--latent-dim, --filters and --likelihood are for a new model; the "
                            "one --from loads has its own")

    if args.source:
        model = load_model(args.source)
    else:
        model = CVAE(latent_dim=args.latent_dim, filters=args.filters,
                     likelihood=args.likelihood or "bernoulli")
    model_size.describe(model, compute_loss, args.batch_size, args.source)


if __name__ == "__main__":
    cli.run(main)
