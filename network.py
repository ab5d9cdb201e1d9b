"""The tutorial's convolutional VAE and the maths of its loss.

The encoder maps an image x to a diagonal Gaussian q(z|x) (a mean and a log-variance);
the decoder maps a latent z to 28x28 Bernoulli logits p(x|z); the prior p(z) is N(0, I).
Training maximizes the ELBO, estimated with one sample of z per image.

    python network.py                    # summaries, parameter counts, a forward pass
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

import cli

LATENT_DIM = 2
IMAGE_SHAPE = (28, 28, 1)
LOG_2PI = float(np.log(2.0 * np.pi))
# --precision: the Keras dtype policy of the convolutions. With bf16 they compute in
# bfloat16 (the variables stay float32); the layers at the latent code (the encoder's
# output, the decoder's input) and the logits layer stay float32, so z, its sampling and
# the ELBO keep float32 precision.
PRECISIONS = {"fp32": "float32", "bf16": "mixed_bfloat16"}


@tf.custom_gradient
def _add_bias(outputs: tf.Tensor, bias: tf.Tensor) -> tuple[tf.Tensor, object]:
    """outputs + bias (over the last axis), with the bias gradient summed in float32."""
    def gradients(upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        all_but_channels = list(range(len(upstream.shape) - 1))
        bias_gradient = tf.reduce_sum(tf.cast(upstream, tf.float32), axis=all_but_channels)
        return upstream, tf.cast(bias_gradient, bias.dtype)
    return outputs + bias, gradients


class _Convolution:
    """Keras' convolution layers, with our own call where it must differ: in bfloat16, and
    where `_convolve` has a faster way than Keras'. Same variables, same results (to float
    rounding).

    In bfloat16 the bias is added with _add_bias. TensorFlow's CPU kernel for the gradient
    of a bias (BiasAddGrad) adds bfloat16 numbers in bfloat16, so the sum over a batch of
    feature maps stalls (512 instead of 25,088 for a batch of 32 ones): those biases barely
    learn, and a bf16 run ended 2.3 nats below float32.
    """

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
    def _convolve(self, inputs: tf.Tensor) -> tf.Tensor:
        return self.convolution_op(inputs, self.kernel)


class Conv2DTranspose(_Convolution, tf.keras.layers.Conv2DTranspose):
    # False: always Keras' own kernel (the benchmark's tutorial variant runs that way).
    allow_depthwise = True

    def _has_faster_convolution(self) -> bool:
        """A stride-1, 'same' transposed convolution to one channel (the decoder's logits
        layer, odd kernel) is faster as a depthwise convolution, measured on the CPU, where
        oneDNN runs it at about 12 GFLOP/s: a seventh of a train step and a third of the
        test ELBO's time."""
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


class CVAE(tf.keras.Model):
    """Convolutional variational autoencoder."""

    def __init__(self, latent_dim: int = LATENT_DIM, precision: str = "fp32") -> None:
        super().__init__()
        self.latent_dim = latent_dim
        hidden = PRECISIONS[precision]
        self.encoder = tf.keras.Sequential(
            [
                tf.keras.layers.InputLayer(shape=IMAGE_SHAPE),
                Conv2D(32, 3, strides=2, activation="relu", dtype=hidden),
                Conv2D(64, 3, strides=2, activation="relu", dtype=hidden),
                tf.keras.layers.Flatten(dtype=hidden),
                # No activation: a mean and a log-variance for each latent dimension.
                tf.keras.layers.Dense(latent_dim + latent_dim, dtype="float32"),
            ],
            name="encoder",
        )
        self.decoder = tf.keras.Sequential(
            [
                tf.keras.layers.InputLayer(shape=(latent_dim,)),
                # float32: z in bfloat16 would keep 3 significant digits of the code.
                tf.keras.layers.Dense(7 * 7 * 32, activation="relu", dtype="float32"),
                tf.keras.layers.Reshape((7, 7, 32), dtype=hidden),
                Conv2DTranspose(64, 3, strides=2, padding="same", activation="relu", dtype=hidden),
                Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu", dtype=hidden),
                # No activation: logits, for a stable log-likelihood (bernoulli_log_likelihood).
                Conv2DTranspose(1, 3, strides=1, padding="same", dtype="float32"),
            ],
            name="decoder",
        )

    @tf.function
    def sample(self, eps: tf.Tensor | None = None) -> tf.Tensor:
        """Decode latents `eps` (default: 100 draws from the prior) to pixel probabilities."""
        if eps is None:
            eps = tf.random.normal(shape=(100, self.latent_dim))
        return self.decode(eps, apply_sigmoid=True)

    def encode(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Images -> (mean, logvar) of q(z|x), each (batch, latent_dim)."""
        mean, logvar = tf.split(self.encoder(x), num_or_size_splits=2, axis=1)
        return mean, logvar

    def reparameterize(
        self, mean: tf.Tensor, logvar: tf.Tensor, eps: tf.Tensor | None = None
    ) -> tf.Tensor:
        """z = mean + sigma * eps with sigma = exp(logvar / 2), eps ~ N(0, I).

        Drawing the noise outside the network keeps z differentiable in mean and logvar.
        Pass `eps` to fix the noise (tests, reproducible runs); None draws it here.
        """
        if eps is None:
            eps = tf.random.normal(shape=tf.shape(mean))
        return eps * tf.exp(logvar * 0.5) + mean

    def decode(self, z: tf.Tensor, apply_sigmoid: bool = False) -> tf.Tensor:
        """Latents -> logits of p(x|z), or pixel probabilities with `apply_sigmoid`."""
        logits = self.decoder(z)
        if apply_sigmoid:
            return tf.sigmoid(logits)
        return logits


def log_normal_pdf(sample: tf.Tensor, mean: tf.Tensor, logvar: tf.Tensor, raxis: int = 1) -> tf.Tensor:
    """log N(sample; mean, diag(exp(logvar))), summed over axis `raxis`."""
    return tf.reduce_sum(
        -0.5 * ((sample - mean) ** 2.0 * tf.exp(-logvar) + logvar + LOG_2PI), axis=raxis
    )


# ----------------------------------------------------------------------------
# The ELBO's terms, with gradients that add two numbers at a time
#
# Where a tensor feeds three or more ops, autodiff adds their gradients with one AddN op,
# and TensorFlow's CPU AddN starts its sum from whichever input buffer it may reuse, that
# is, from whichever input's other readers happen to have finished. With two ops running
# at once, that order, and so the rounding, changed from run to run: three identical runs
# gave three different losses. Written as below, no tensor of the train step feeds more
# than two differentiable ops (tests/test_network.py checks the graph as traced; Grappler
# could still merge a chain of adds into one AddN, and does not here), and a sum of two
# is the same in either order, so a seed repeats a run bit for bit at full speed.


def bernoulli_log_likelihood(logits: tf.Tensor, x: tf.Tensor, axis: Sequence[int] = (1, 2, 3)) -> tf.Tensor:
    """log p(x|z) of binary pixels `x` under Bernoulli(sigmoid(logits)), summed over `axis`.

    x * logits - softplus(logits) is -tf.nn.sigmoid_cross_entropy_with_logits (the
    tutorial's form), as stable, with a gradient of two terms (x - sigmoid(logits)) where
    that op's has four.
    """
    return tf.reduce_sum(x * logits - tf.math.softplus(logits), axis=axis)


@tf.custom_gradient
def monte_carlo_kl(z: tf.Tensor, mean: tf.Tensor, logvar: tf.Tensor) -> tuple[tf.Tensor, object]:
    """The tutorial's single-sample KL estimate log q(z|x) - log p(z) per example, (batch,).

    Its gradient is written out: autodiff would add three gradients at z and at logvar.
    (Callers get the value; `gradients` is what autodiff uses.)
    """
    def gradients(upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        upstream = upstream[:, tf.newaxis]
        d_mean = (z - mean) * tf.exp(-logvar)  # d log q / d mean, and -d log q / d z
        d_z = z - d_mean  # d log p / d z is -z
        d_logvar = 0.5 * ((z - mean) * d_mean - 1.0)
        return upstream * d_z, upstream * d_mean, upstream * d_logvar
    return log_normal_pdf(z, mean, logvar) - log_normal_pdf(z, 0.0, 0.0), gradients


@tf.custom_gradient
def analytic_kl(mean: tf.Tensor, logvar: tf.Tensor) -> tuple[tf.Tensor, object]:
    """KL(N(mean, exp(logvar)) || N(0, I)) in closed form, per example: (batch,).

    Its gradient is written out: autodiff would add three gradients at logvar.
    (Callers get the value; `gradients` is what autodiff uses.)
    """
    def gradients(upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        upstream = upstream[:, tf.newaxis]
        return upstream * mean, upstream * 0.5 * (tf.exp(logvar) - 1.0)
    return 0.5 * tf.reduce_sum(tf.exp(logvar) + mean**2 - 1.0 - logvar, axis=1), gradients


KL_ESTIMATORS = ("mc", "analytic")


def elbo_parts(model: CVAE, x: tf.Tensor, eps: tf.Tensor | None = None,
               kl: str = "mc") -> tuple[tf.Tensor, tf.Tensor]:
    """The two parts of each image's ELBO, (log p(x|z), KL), each (batch,); ELBO = first - second.

    z is one draw from q(z|x) (noise `eps`, or fresh noise if None). With kl="mc" (the
    tutorial) the KL is its single-sample estimate log q(z|x) - log p(z); with
    kl="analytic", its closed form.
    """
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar, eps)
    logpx_z = bernoulli_log_likelihood(model.decode(z), x)
    if kl == "analytic":
        return logpx_z, analytic_kl(mean, logvar)
    return logpx_z, monte_carlo_kl(z, mean, logvar)


def elbo_per_example(model: CVAE, x: tf.Tensor, eps: tf.Tensor | None = None,
                     kl: str = "mc") -> tf.Tensor:
    """Single-sample Monte Carlo ELBO of each image: log p(x|z) + log p(z) - log q(z|x)
    (or log p(x|z) - KL in closed form, with kl="analytic"); shape (batch,)."""
    logpx_z, kl_term = elbo_parts(model, x, eps, kl)
    return logpx_z - kl_term


def compute_loss(model: CVAE, x: tf.Tensor, eps: tf.Tensor | None = None, kl: str = "mc") -> tf.Tensor:
    """The training loss: the negative ELBO, averaged over the batch."""
    return -tf.reduce_mean(elbo_per_example(model, x, eps, kl))


def log_importance_weights(model: CVAE, x: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
    """log p(x|z_k) + log p(z_k) - log q(z_k|x) for K draws z_k per image, from `eps`
    (batch, K, latent); shape (batch, K). Their log-mean-exp is the IWAE bound on log p(x);
    for K = 1 it is the single-sample ELBO."""
    mean, logvar = model.encode(x)
    mean, logvar = mean[:, tf.newaxis], logvar[:, tf.newaxis]
    z = model.reparameterize(mean, logvar, eps)  # (batch, K, latent)
    batch, k = tf.shape(eps)[0], tf.shape(eps)[1]
    logits = model.decode(tf.reshape(z, (batch * k, model.latent_dim)))
    logpx_z = tf.reshape(bernoulli_log_likelihood(logits, tf.repeat(x, k, axis=0)), (batch, k))
    return logpx_z + log_normal_pdf(z, 0.0, 0.0, raxis=2) - log_normal_pdf(z, mean, logvar, raxis=2)


# ----------------------------------------------------------------------------
# python network.py: what the model looks like


def count_params(model: tf.keras.Model) -> int:
    return int(sum(np.prod(weight.shape) for weight in model.weights))


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(description="Print the CVAE: summaries, parameters, shapes.")
    parser.add_argument("--latent-dim", type=cli.positive_int, default=LATENT_DIM,
                        help="size of the latent space")
    parser.add_argument("--batch-size", type=cli.positive_int, default=32,
                        help="size of the dummy batch for the forward pass")
    args = parser.parse_args(argv)

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
    print(f"  loss   {float(compute_loss(model, x)):.2f} (negative ELBO of the blank batch, untrained)")


if __name__ == "__main__":
    cli.run(main)
