"""The tutorial's convolutional VAE and its loss: cells 15 and 17, as the tutorial wrote them.

The encoder maps an image x to a diagonal Gaussian q(z|x) = N(mean, exp(logvar)); the
decoder maps a latent z to the logits of 28x28 Bernoulli pixels, p(x|z); the prior p(z)
is N(0, I). Training maximizes the ELBO, log p(x|z) + log p(z) - log q(z|x), estimated
with one sample z ~ q(z|x) per image; the loss is its negative, averaged over the batch.

    python network.py                    # summaries, parameter counts, a forward pass
    python network.py --from output      # the same for the model a run exported
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

from machinery import cli  # for python network.py, below; the model and its loss need none of it

import numpy as np
import tensorflow as tf

LATENT_DIM = 2
IMAGE_SHAPE = (28, 28, 1)
# --precision: the Keras dtype policy of the hidden layers. The layers at the latent code
# and the logits layer stay float32, so z, its sampling and the loss keep float32.
PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16"}
KL_ESTIMATORS = ("mc", "analytic")
# Where a run exports its trained model (export.py): Keras' own format, and a SavedModel.
KERAS_FILE = "cvae.keras"
SAVEDMODEL_DIR = "cvae_savedmodel"


@tf.keras.utils.register_keras_serializable(package="cvae")  # for keras.saving.load_model
class CVAE(tf.keras.Model):
    """Convolutional variational autoencoder."""

    def __init__(self, latent_dim: int = LATENT_DIM, precision: str = "fp32") -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.precision = precision
        hidden = PRECISIONS[precision]  # the dtype policy of the hidden layers (--precision)
        self.encoder = tf.keras.Sequential(
            [
                tf.keras.layers.InputLayer(shape=IMAGE_SHAPE),  # Keras 3 calls input_shape shape
                tf.keras.layers.Conv2D(
                    filters=32, kernel_size=3, strides=(2, 2), activation='relu', dtype=hidden),
                tf.keras.layers.Conv2D(
                    filters=64, kernel_size=3, strides=(2, 2), activation='relu', dtype=hidden),
                tf.keras.layers.Flatten(dtype=hidden),
                # No activation
                tf.keras.layers.Dense(latent_dim + latent_dim, dtype="float32"),
            ],
            name="encoder",
        )

        self.decoder = tf.keras.Sequential(
            [
                tf.keras.layers.InputLayer(shape=(latent_dim,)),
                # float32: z in bfloat16 would keep 3 significant digits of the code.
                tf.keras.layers.Dense(units=7*7*32, activation=tf.nn.relu, dtype="float32"),
                tf.keras.layers.Reshape(target_shape=(7, 7, 32), dtype=hidden),
                tf.keras.layers.Conv2DTranspose(
                    filters=64, kernel_size=3, strides=2, padding='same',
                    activation='relu', dtype=hidden),
                tf.keras.layers.Conv2DTranspose(
                    filters=32, kernel_size=3, strides=2, padding='same',
                    activation='relu', dtype=hidden),
                # No activation
                tf.keras.layers.Conv2DTranspose(
                    filters=1, kernel_size=3, strides=1, padding='same', dtype="float32"),
            ],
            name="decoder",
        )
        self.built = True  # the encoder and decoder are: their InputLayers gave them their shapes

    def get_config(self) -> dict:
        """What keras.saving.load_model passes back to __init__ to rebuild the model."""
        return {"latent_dim": self.latent_dim, "precision": self.precision}

    @tf.function
    def sample(self, eps: tf.Tensor | None = None) -> tf.Tensor:
        if eps is None:
            eps = tf.random.normal(shape=(100, self.latent_dim))
        return self.decode(eps, apply_sigmoid=True)

    def encode(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        mean, logvar = tf.split(self.encoder(x), num_or_size_splits=2, axis=1)
        return mean, logvar

    # eps: the training loop draws the noise from the run's seed, so that a run repeats.
    def reparameterize(self, mean: tf.Tensor, logvar: tf.Tensor,
                       eps: tf.Tensor | None = None) -> tf.Tensor:
        if eps is None:
            eps = tf.random.normal(shape=tf.shape(mean))  # tf.shape: the batch may be unknown
        return eps * tf.exp(logvar * .5) + mean

    def decode(self, z: tf.Tensor, apply_sigmoid: bool = False) -> tf.Tensor:
        logits = self.decoder(z)
        if apply_sigmoid:
            probs = tf.sigmoid(logits)
            return probs
        return logits


def log_normal_pdf(sample: tf.Tensor, mean: tf.Tensor, logvar: tf.Tensor, raxis: int = 1) -> tf.Tensor:
    log2pi = tf.math.log(2. * np.pi)
    return tf.reduce_sum(
        -.5 * ((sample - mean) ** 2. * tf.exp(-logvar) + logvar + log2pi),
        axis=raxis)


def analytic_kl(mean: tf.Tensor, logvar: tf.Tensor) -> tf.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) in closed form, per image (--kl analytic)."""
    return 0.5 * tf.reduce_sum(tf.exp(logvar) + mean**2 - 1. - logvar, axis=1)


def compute_loss(model: CVAE, x: tf.Tensor, eps: tf.Tensor | None = None, kl: str = "mc") -> tf.Tensor:
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar, eps)
    x_logit = model.decode(z)
    cross_ent = tf.nn.sigmoid_cross_entropy_with_logits(logits=x_logit, labels=x)
    logpx_z = -tf.reduce_sum(cross_ent, axis=[1, 2, 3])
    if kl == "analytic":  # --kl analytic: the KL term in closed form, for logqz_x - logpz
        return -tf.reduce_mean(logpx_z - analytic_kl(mean, logvar))
    logpz = log_normal_pdf(z, 0., 0.)
    logqz_x = log_normal_pdf(z, mean, logvar)
    return -tf.reduce_mean(logpx_z + logpz - logqz_x)


# ----------------------------------------------------------------------------
# python network.py: what the model looks like


def count_params(model: tf.keras.Model) -> int:
    return int(sum(np.prod(weight.shape) for weight in model.weights))


def load_model(path: str | Path) -> CVAE:
    """The CVAE a run exported: `path` is its run folder (holding cvae.keras) or the file."""
    path = Path(path)
    file = path / KERAS_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"{path} holds no {KERAS_FILE}" if path.is_dir() else f"{path}: no such file or folder"
        raise cli.UserError(f"{where}; a run exports one at its end, and python export.py "
                            f"--out-dir RUN exports one from a run's checkpoints")
    try:
        model = tf.keras.models.load_model(file)
    except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as error:
        raise cli.UserError(f"{file} is not a Keras .keras archive of a model "
                            f"({cli.first_line(error)})") from None
    if not isinstance(model, CVAE):
        raise cli.UserError(f"{file} holds a {type(model).__name__}, not a CVAE")
    return model


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(description="Print the CVAE: summaries, parameters, shapes.")
    parser.add_argument("--latent-dim", type=cli.positive_int, default=LATENT_DIM,
                        help="size of the latent space of a new, untrained model")
    parser.add_argument("--from", dest="source", default=None, metavar="RUN",
                        help=f"print instead the trained model a run exported: its folder "
                             f"(holding {KERAS_FILE}) or the file")
    parser.add_argument("--batch-size", type=cli.positive_int, default=32,
                        help="size of the dummy batch for the forward pass")
    args = parser.parse_args(argv)
    if args.source and "latent_dim" in cli.explicit_flags(parser, argv):
        raise cli.UserError("--latent-dim is for a new model; the one --from loads has its own")

    if args.source:
        model = load_model(args.source)
        print(f"Loaded {args.source}: latent_dim {model.latent_dim}, precision {model.precision}")
    else:
        model = CVAE(args.latent_dim)
    model.encoder.summary()
    model.decoder.summary()
    encoder_params, decoder_params = count_params(model.encoder), count_params(model.decoder)
    print(f"Parameters: encoder {encoder_params:,}, decoder {decoder_params:,}, "
          f"total {encoder_params + decoder_params:,}")

    x = tf.zeros((args.batch_size, *IMAGE_SHAPE))
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar)
    logits = model.decode(z)
    print(f"\nForward pass on a dummy batch of {args.batch_size}:")
    for name, tensor in (("x", x), ("mean", mean), ("logvar", logvar), ("z", z), ("logits", logits)):
        print(f"  {name:7s}{tuple(tensor.shape)}")
    state = "trained" if args.source else "untrained"
    print(f"  loss   {float(compute_loss(model, x)):.2f} (negative ELBO of the blank batch, {state})")


if __name__ == "__main__":
    cli.run(main)
