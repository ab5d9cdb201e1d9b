"""train.train_step compiled for speed, as train.fit calls it: many steps in one tf.function
call, each batch shared among the replicas of a tf.distribute strategy, the noise of every
step drawn from the run's generator; and a batch's parts (its replicas' and shards'), which
train_step and the test ELBO weigh by their share of the whole batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

from machinery import distribute

import numpy as np
import tensorflow as tf

STEPS_PER_CALL = 50  # train steps per tf.function call: progress and Ctrl-C after each call

LossFunction = Callable[..., tf.Tensor]  # compute_loss(model, x, eps, ..., y=None) -> loss
CompiledLoss = Callable[..., tf.Tensor]  # images (and classes) -> loss, the noise drawn inside
Prepare = Callable[[tf.Tensor], tf.Tensor]  # stored images (uint8) -> the model's input
TrainStep = Callable[..., tf.Tensor]  # train_step(model, x, optimizer, eps, y=None) -> loss


class Part(NamedTuple):
    """One part of a batch: its images, noise and classes (None for the tutorial's model),
    and its share of the whole batch."""

    x: tf.Tensor
    eps: tf.Tensor | None  # None: compute_loss draws its own
    y: tf.Tensor | None
    share: float | tf.Tensor

    def weigh(self, loss: tf.Tensor) -> tf.Tensor:
        """The part's mean `loss` times its share (0 for an empty part, whose mean is NaN)."""
        return tf.math.multiply_no_nan(loss, tf.cast(self.share, loss.dtype))


def num_images(x: tf.Tensor) -> int | tf.Tensor:
    """The images in `x`: static where its shape is known."""
    return x.shape[0] if x.shape[0] is not None else tf.cast(tf.shape(x)[0], tf.float32)


def parts(x: tf.Tensor, eps: tf.Tensor | None, y: tf.Tensor | None = None, shards: int = 1
          ) -> Iterator[Part]:
    """This replica's part of the batch (x, its noise eps and its classes y, or None), cut into `shards`
    consecutive shards (no more than it has images), each with its share of the whole batch.
    On one device with one shard: the whole batch, of share 1. A replica with no image of a
    last batch smaller than the replicas takes one of the batch's, of share 0: its gradients
    are then zeros (some CPU kernels fail on an empty batch)."""
    def each(part: Callable[[tf.Tensor], tf.Tensor], *tensors: tf.Tensor | None) -> list:
        return [None if tensor is None else part(tensor) for tensor in tensors]

    replica_x, replica_eps, replica_y = each(distribute.replica_batch, x, eps, y)
    if replica_x.shape[0] == 0:
        yield Part(*each(lambda tensor: tensor[:1], x, eps, y), 0.0)
        return
    shards = max(1, min(shards, replica_x.shape[0] if replica_x.shape[0] is not None else shards))
    for i in range(shards):
        shard_x, shard_eps, shard_y = each(lambda tensor, i=i: distribute.consecutive_part(tensor, i, shards),
                                           replica_x, replica_eps, replica_y)
        yield Part(shard_x, shard_eps, shard_y, num_images(shard_x) / num_images(x))


def weighted_loss(compute_loss: LossFunction, model: tf.keras.Model, x: tf.Tensor,
                  eps: tf.Tensor, shards: int, y: tf.Tensor | None = None) -> tf.Tensor:
    """compute_loss of `x` (of classes `y`, for a conditional model), its parts side by side,
    each weighted by its share of the batch."""
    total = tf.constant(0.0)
    for part in parts(x, eps, y, shards):
        total += part.weigh(compute_loss(model, part.x, part.eps, y=part.y))
    return total


class Batches(NamedTuple):
    """Batches of an epoch (STEPS_PER_CALL, or the smaller last one alone), stacked as one
    compiled call takes them."""

    first: int  # the index of its first batch in the epoch
    images: tf.Tensor  # (steps_per_call, batch, H, W, C) as stored (uint8), padded; or (1, rest, ...)
    count: tf.Tensor  # how many of them are the epoch's batches
    labels: tf.Tensor | None  # their classes, where the data has any


def batches(images: np.ndarray | tf.Tensor, batch_size: int, order: np.ndarray | None = None,
            labels: np.ndarray | None = None, steps_per_call: int = STEPS_PER_CALL) -> Iterator[Batches]:
    """The batches of images[order] (default: in order), steps_per_call at a time; the last
    batch may be smaller, on its own. Only a call's images are gathered (from uint8 images,
    say), so an epoch holds no copy of the set."""
    images = np.asarray(images)
    order = np.arange(len(images)) if order is None else order
    full = len(order) // batch_size
    for first in range(0, full, steps_per_call):
        count = min(steps_per_call, full - first)
        # Always steps_per_call batches of static shape, the last call's padded: one trace,
        # and the kernels (so the results) of a function traced for one batch size.
        picked = order[first * batch_size:(first + count) * batch_size]
        picked = np.pad(picked, (0, (steps_per_call - count) * batch_size), mode="edge")
        stacked = images[picked].reshape(steps_per_call, batch_size, *images.shape[1:])
        classes = None if labels is None else tf.constant(labels[picked].reshape(steps_per_call, -1))
        yield Batches(first, tf.constant(stacked), tf.constant(count), classes)
    if full * batch_size < len(order):  # the smaller last batch: one call of its own shape
        rest = order[full * batch_size:]
        classes = None if labels is None else tf.constant(labels[rest][np.newaxis])
        yield Batches(full, tf.constant(images[rest][np.newaxis]), tf.constant(1), classes)


def compiled_train_steps(train_step: TrainStep, model: tf.keras.Model,
                         optimizer: tf.keras.optimizers.Optimizer, rng: tf.random.Generator, *,
                         strategy: tf.distribute.Strategy | None = None,
                         prepare: Prepare | None = None) -> Callable[[Batches], np.ndarray]:
    """train_step(model, x, optimizer, eps, y) on each batch of a Batches in one compiled
    call, on every replica of `strategy`, the noise eps drawn from `rng`: the batches' losses."""
    strategy = strategy or tf.distribute.get_strategy()
    prepare = prepare or tf.identity
    if not optimizer.built:  # its variables must exist before the loop is traced
        with strategy.scope():
            optimizer.build(model.trainable_variables)

    @tf.function
    def train_steps(images: tf.Tensor, count: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        losses = tf.TensorArray(tf.float32, size=count)
        for i in tf.range(count):  # images[count:] is padding
            # One step after the other (a loop may otherwise start the next iterations early).
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            x = prepare(images[i])
            eps = rng.normal(shape=(tf.shape(x)[0], model.latent_dim))
            y = None if labels is None else tf.cast(labels[i], tf.int32)
            loss = strategy.run(train_step, args=(model, x, optimizer, eps, y))
            losses = losses.write(i, strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None))
        return losses.stack()

    def run(batches: Batches) -> np.ndarray:
        labels = batches.labels if model.num_classes else None  # the tutorial's CVAE takes none
        return train_steps(batches.images, batches.count, labels).numpy()
    return run


def compiled_loss(compute_loss: LossFunction, model: tf.keras.Model, rng: tf.random.Generator,
                  shards: int = 1, prepare: Prepare | None = None) -> CompiledLoss:
    """compute_loss(model, prepare(x), eps) as one compiled call, eps drawn from `rng`, `x`
    in shards side by side (of classes `y`, for a conditional model): for the test ELBO."""
    prepare = prepare or tf.identity

    @tf.function
    def loss(x: tf.Tensor, y: tf.Tensor | None = None) -> tf.Tensor:
        x = prepare(x)
        eps = rng.normal(shape=(tf.shape(x)[0], model.latent_dim))
        classes = tf.cast(y, tf.int32) if y is not None and model.num_classes else None
        return weighted_loss(compute_loss, model, x, eps, shards, classes)
    return loss
