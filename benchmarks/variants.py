"""The benchmark's variants: the tutorial's code (network.compute_loss and train.train_step
as the tutorial runs them), and this port's loop one idea at a time (see benchmark.py),
each with the same jobs to time; and the FLOPs of a step and of a decode."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules

from machinery import cli, data_files, model_size, speed, steps  # noqa: E402  (TensorFlow, quietly)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dataset  # noqa: E402
import evaluate  # noqa: E402
import network  # noqa: E402
import train  # noqa: E402

# Each variant's (--precision, steps per call, --shards); None: train.py's default.
SETTINGS = {"tutorial": ("fp32", 1, 1), "fp32 1/call": ("fp32", 1, 1),
            "fp32 1 shard": ("fp32", steps.STEPS_PER_CALL, 1),
            "fp32": ("fp32", steps.STEPS_PER_CALL, None),
            "bf16": ("bf16", steps.STEPS_PER_CALL, None)}
VARIANTS = tuple(SETTINGS)
DATASETS = ("mnist", "fashion_mnist")  # the 28x28 grey images the tutorial's network takes
# The IWAE row: evaluate.py's bound on IWAE_IMAGES test images, IWAE_SAMPLES draws each
# unless --iw-samples says otherwise.
IWAE_IMAGES, IWAE_SAMPLES = evaluate.IWAE_IMAGES, 1000


def check_training_images(images: np.ndarray, source: str, train_size: int | None, batch_size: int) -> None:
    """Refuse, in one line, images the variants cannot time: not the tutorial's shape, or
    fewer than a batch."""
    if (shape := data_files.image_shape(images)) != network.IMAGE_SHAPE:
        raise cli.UserError(f"{source}: images of {shape}; the benchmark times the tutorial's "
                            f"network, on images of {network.IMAGE_SHAPE}")
    if len(images) < batch_size:
        raise cli.UserError(f"--train-size {train_size}: an epoch needs at least "
                            f"{batch_size} images (--batch-size)")


# ----------------------------------------------------------------------------
# Work per step


def forward_flops(model: network.CVAE) -> tuple[int, int]:
    """The FLOPs of one image's forward pass, and those of the first layer alone (whose
    input, the image, needs no gradient)."""
    per_layer = model_size.layer_flops(model.encoder.layers + model.decoder.layers)
    return sum(per_layer), per_layer[0]


def decode_flops(model: network.CVAE) -> int:
    """The FLOPs of one decode, z to logits."""
    return sum(model_size.layer_flops(model.decoder.layers))


def train_flops_per_image(model: network.CVAE) -> int:
    """A train step's FLOPs per image: the forward pass, then backward the gradients of
    every layer's weights (as much again) and inputs (again, but for the first layer)."""
    forward, first_layer = forward_flops(model)
    return 3 * forward - first_layer


# ----------------------------------------------------------------------------
# The variants: each gives the same three things to time


class Variant:
    """A model and optimizer set up one variant's way, with its three timed jobs:
    `steps(n)` (the compiled step alone), `epoch(number)` and `evaluate()`."""

    steps: Callable[[int], None]
    epoch: Callable[[int], None]
    evaluate: Callable[[], float]

    def iwae(self) -> int:
        """evaluate.py's IWAE bound (its model in float32) on the first test images;
        returns the decodes it took."""
        evaluate.iwae_bound(self.plain_model, self.iwae_images, self.iwae_noise)
        return int(np.prod(self.iwae_noise.shape[:2]))

    def __init__(self, name: str, train_images: np.ndarray, test_images: np.ndarray,
                 shards: int, batch_size: int = train.BATCH_SIZE, iw_samples: int = IWAE_SAMPLES) -> None:
        self.name, self.batch_size = name, batch_size
        tf.keras.utils.set_random_seed(train.SEED)  # every variant starts from the same weights
        precision, steps_per_call, _ = SETTINGS[name]
        self.model = network.CVAE(latent_dim=train.LATENT_DIM, precision=precision)
        self.optimizer = tf.keras.optimizers.Adam(train.LEARNING_RATE)
        self.optimizer.build(self.model.trainable_variables)
        # As evaluate.py loads it: fp32, with the logits layer that pays here (speed.logits_layer).
        self.plain_model = network.CVAE(latent_dim=train.LATENT_DIM, logits_layer=speed.logits_layer())
        self.plain_model.set_weights(self.model.get_weights())
        self.iwae_images = dataset.binarize(test_images[:IWAE_IMAGES])
        self.iwae_noise = evaluate.noise(0, 0, 1, (len(self.iwae_images), iw_samples, train.LATENT_DIM))
        if name == "tutorial":  # one step a call, on images binarized up front as the tutorial does
            self._tutorial(dataset.binarize(train_images).numpy(), dataset.binarize(test_images).numpy())
        else:
            self._port(train_images, test_images, steps_per_call=steps_per_call, shards=shards)

    def _tutorial(self, train_images: np.ndarray, test_images: np.ndarray) -> None:
        model, optimizer = self.model, self.optimizer

        @tf.function
        def train_step(x: tf.Tensor) -> None:  # the tutorial's: compute_loss draws its noise
            train.train_step(model, x, optimizer)

        batch_size = self.batch_size
        train_dataset = (tf.data.Dataset.from_tensor_slices(train_images)
                         .shuffle(len(train_images)).batch(batch_size))
        test_dataset = (tf.data.Dataset.from_tensor_slices(test_images)
                        .shuffle(len(test_images)).batch(batch_size))
        in_memory = [tf.constant(train_images[i * batch_size:(i + 1) * batch_size])
                     for i in range(len(train_images) // batch_size)]

        def steps(count: int) -> None:
            for i in range(count):
                train_step(in_memory[i % len(in_memory)])
            optimizer.iterations.numpy()  # wait for the last step

        def epoch(number: int) -> None:
            for x in train_dataset:
                train_step(x)
            optimizer.iterations.numpy()

        def evaluate() -> float:  # eager, at the training batch size
            loss = tf.keras.metrics.Mean()
            for x in test_dataset:
                loss(network.compute_loss(model, x))
            return -float(loss.result())

        self.steps, self.epoch, self.evaluate = steps, epoch, evaluate

    def _port(self, train_images: np.ndarray, test_images: np.ndarray, steps_per_call: int,
              shards: int) -> None:
        rng = tf.random.Generator.from_seed(train.SEED)
        # train.fit's: train.train_step (train.py's defaults, the batch in `shards` shards) on
        # each batch of a call
        train_step = functools.partial(train.train_step, kl="mc", beta=1.0, shards=shards)
        train_steps = steps.compiled_train_steps(train_step, self.model, self.optimizer, rng,
                                                 prepare=dataset.binarize)
        test_loss = steps.compiled_loss(network.compute_loss, self.model, rng, shards, dataset.binarize)
        no_classes = np.zeros(len(test_images), np.uint8)  # the tutorial's CVAE takes none
        test_batches = dataset.make_batches((test_images, no_classes), dataset.EVAL_BATCH_SIZE)
        batch_size = self.batch_size
        num_full_batches = len(train_images) // batch_size

        def run(images: np.ndarray, order: np.ndarray | None = None) -> None:  # train.fit's loop, no outputs
            for batches in steps.batches(images, batch_size, order, steps_per_call=steps_per_call):
                train_steps(batches)

        self.steps = lambda count: run(train_images[:min(count, num_full_batches) * batch_size])
        self.epoch = lambda n: run(train_images, dataset.epoch_order(len(train_images), train.SEED, n))
        self.evaluate = lambda: train.test_set_elbo(test_loss, test_batches)
