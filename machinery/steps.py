"""train.train_step compiled for speed, as fit calls it: many steps in one tf.function
call (a Block of batches), each batch shared among the replicas of a tf.distribute strategy
and cut into shards side by side, the noise of every step drawn from the run's generator.

Each shard runs train_step as the tutorial wrote it, with a GradientAccumulator for its
optimizer; the accumulator weighs the shard's gradients by its part of the batch, so that
Adam then applies the whole batch's gradients once. One shard on one device gets Adam itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple, Protocol

from machinery import distribute

import numpy as np
import tensorflow as tf

STEPS_PER_CALL = 50  # train steps per tf.function call: progress and Ctrl-C after each call

LossFunction = Callable[..., tf.Tensor]  # compute_loss(model, x, eps, ..., y=None) -> loss
CompiledLoss = Callable[..., tf.Tensor]  # images (and classes) -> loss, the noise drawn inside
Prepare = Callable[[tf.Tensor], tf.Tensor]  # stored images (uint8) -> the model's input


class AppliesGradients(Protocol):
    """What train_step needs of its optimizer: Adam, or a shard's GradientAccumulator."""

    def apply_gradients(self, grads_and_vars: Iterable[tuple[tf.Tensor, tf.Variable]]) -> object: ...


TrainStep = Callable[..., tf.Tensor]  # train_step(model, x, optimizer, eps, kl=, beta=, y=) -> loss


class GradientAccumulator:
    """The optimizer of each shard's train_step: it adds up the shards' gradients, each
    weighted by its shard's part of the batch (`next_shard`), for Adam to apply once."""

    def __init__(self, variables: Sequence[tf.Variable]) -> None:
        self.variables, self.total, self.weight = list(variables), None, 1.0

    def next_shard(self, weight: float | tf.Tensor) -> None:
        self.weight = weight

    def apply_gradients(self, grads_and_vars: Iterable[tuple[tf.Tensor, tf.Variable]]) -> None:
        weighted = [tf.math.multiply_no_nan(gradient, self.weight) for gradient, _ in grads_and_vars]
        self.total = weighted if self.total is None else [
            total + gradient for total, gradient in zip(self.total, weighted)]


def num_images(x: tf.Tensor) -> int | tf.Tensor:
    """The images in `x`: static where its shape is known."""
    return x.shape[0] if x.shape[0] is not None else tf.cast(tf.shape(x)[0], tf.float32)


def weighted_shards(x: tf.Tensor, eps: tf.Tensor, shards: int, y: tf.Tensor | None = None
                    ) -> Iterator[tuple[tf.Tensor, tf.Tensor, tf.Tensor | None, float | tf.Tensor]]:
    """This replica's batch (its part of x, eps and the classes y, if any) cut into `shards`
    consecutive shards (no more than it has images), each with its part of the whole batch
    `x`: a weight. A replica's batch known to be empty (a last batch smaller than the
    replicas) has no shards; one empty at run time gets weight 0."""
    replica_x, replica_eps = distribute.replica_batch(x), distribute.replica_batch(eps)
    replica_y = None if y is None else distribute.replica_batch(y)
    if replica_x.shape[0] == 0:
        return  # some CPU kernels fail on an empty batch: nothing to compute
    shards = max(1, min(shards, replica_x.shape[0] if replica_x.shape[0] is not None else shards))
    for i in range(shards):
        shard_x = distribute.consecutive_part(replica_x, i, shards)
        shard_y = None if y is None else distribute.consecutive_part(replica_y, i, shards)
        shard_eps = distribute.consecutive_part(replica_eps, i, shards)
        yield shard_x, shard_eps, shard_y, num_images(shard_x) / num_images(x)


def weighted_loss(compute_loss: LossFunction, model: tf.keras.Model, x: tf.Tensor,
                  eps: tf.Tensor, shards: int, y: tf.Tensor | None = None) -> tf.Tensor:
    """compute_loss of `x` (of classes `y`, for a conditional model), in `shards` shards side
    by side, each weighted by its part of the batch (multiply_no_nan: the mean of an empty
    shard is NaN, its weight 0)."""
    total = None
    for shard_x, shard_eps, shard_y, weight in weighted_shards(x, eps, shards, y):
        loss = tf.math.multiply_no_nan(compute_loss(model, shard_x, shard_eps, y=shard_y),
                                       tf.cast(weight, tf.float32))
        total = loss if total is None else total + loss
    return tf.constant(0.0) if total is None else total


class Block(NamedTuple):
    """Batches of an epoch (STEPS_PER_CALL, or the smaller last one alone), stacked as one
    compiled call takes them."""

    first: int  # the index of its first batch in the epoch
    images: tf.Tensor  # (steps_per_call, batch, H, W, C) as stored (uint8), padded; or (1, rest, ...)
    count: tf.Tensor  # how many of them are the epoch's batches
    labels: tf.Tensor | None  # their classes, where the data has any


def blocks(images: np.ndarray | tf.Tensor, batch_size: int, order: np.ndarray | None = None,
           labels: np.ndarray | None = None, steps_per_call: int = STEPS_PER_CALL) -> Iterator[Block]:
    """The batches of images[order] (default: in order), steps_per_call to a Block; the last
    batch may be smaller, in a Block of its own. Only a Block's images are gathered (from
    uint8 images, say), so an epoch holds no copy of the set."""
    images = np.asarray(images)
    order = np.arange(len(images)) if order is None else order
    full = len(order) // batch_size
    for first in range(0, full, steps_per_call):
        count = min(steps_per_call, full - first)
        # Always steps_per_call batches of static shape, the last call's padded: one trace,
        # and the kernels (so the results) of a function traced for one batch size.
        picked = order[first * batch_size:(first + count) * batch_size]
        picked = np.pad(picked, (0, (steps_per_call - count) * batch_size), mode="edge")
        batches = images[picked].reshape(steps_per_call, batch_size, *images.shape[1:])
        classes = None if labels is None else tf.constant(labels[picked].reshape(steps_per_call, -1))
        yield Block(first, tf.constant(batches), tf.constant(count), classes)
    if full * batch_size < len(order):  # the smaller last batch: one call of its own shape
        rest = order[full * batch_size:]
        classes = None if labels is None else tf.constant(labels[rest][np.newaxis])
        yield Block(full, tf.constant(images[rest][np.newaxis]), tf.constant(1), classes)


class CompiledStep:
    """train_step for `model` and `optimizer`, compiled to take a Block of batches (see the
    module's docstring): called as train_step(model, train_x, optimizer), it returns the
    losses of the Block's steps."""

    def __init__(self, train_step: TrainStep, model: tf.keras.Model,
                 optimizer: tf.keras.optimizers.Optimizer, rng: tf.random.Generator, *,
                 strategy: tf.distribute.Strategy | None = None, shards: int = 1,
                 prepare: Prepare | None = None) -> None:
        self.train_step, self.model, self.optimizer, self.rng = train_step, model, optimizer, rng
        self.strategy = strategy or tf.distribute.get_strategy()
        self.shards, self.prepare = shards, prepare or tf.identity
        if not optimizer.built:  # its variables must exist before the loop is traced
            with self.strategy.scope():
                optimizer.build(model.trainable_variables)

    def __call__(self, model: tf.keras.Model, train_x: Block,
                 optimizer: tf.keras.optimizers.Optimizer) -> np.ndarray:
        if model is not self.model or optimizer is not self.optimizer:
            raise ValueError("a CompiledStep runs the model and optimizer it was compiled for")
        labels = train_x.labels if model.num_classes else None  # the tutorial's CVAE takes none
        return self._steps(train_x.images, train_x.count, labels).numpy()

    def _replica_step(self, x: tf.Tensor, eps: tf.Tensor, y: tf.Tensor | None = None) -> tf.Tensor:
        """train_step on this replica's batch of `x` (of classes `y`, for a conditional
        model), a shard at a time."""
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        if replicas == 1 and self.shards == 1:
            return self.train_step(self.model, x, self.optimizer, eps, y=y)
        summed, loss = GradientAccumulator(self.model.trainable_variables), tf.constant(0.0)
        for shard_x, shard_eps, shard_y, weight in weighted_shards(x, eps, self.shards, y):
            summed.next_shard(weight)
            shard_loss = self.train_step(self.model, shard_x, summed, shard_eps, y=shard_y)
            loss += tf.math.multiply_no_nan(shard_loss, tf.cast(weight, tf.float32))
        if summed.total is None:  # an empty replica's batch: it adds nothing to the batch's gradients
            summed.total = [tf.zeros_like(variable) for variable in summed.variables]
        self.optimizer.apply_gradients(zip(summed.total, summed.variables))
        return loss

    @tf.function
    def _steps(self, batches: tf.Tensor, count: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """Steps on batches[0], .., batches[count - 1] (the rest is padding), of classes
        labels[i] for a conditional model; their losses."""
        losses = tf.TensorArray(tf.float32, size=count)
        for i in tf.range(count):
            # One step after the other (a loop may otherwise start the next iterations early).
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            x = self.prepare(batches[i])
            eps = self.rng.normal(shape=(tf.shape(x)[0], self.model.latent_dim))
            step_inputs = (x, eps) if labels is None else (x, eps, tf.cast(labels[i], tf.int32))
            loss = self.strategy.run(self._replica_step, args=step_inputs)
            losses = losses.write(i, self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None))
        return losses.stack()


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
