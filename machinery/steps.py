"""How the loop runs train.train_step: many steps in one tf.function call, each batch
shared among the replicas of a tf.distribute strategy and cut into shards side by side,
with the noise of every step drawn from the run's random generator.

Each piece (a replica's share, or a shard of it) runs train_step as the tutorial wrote
it, with a GradientSum in place of the optimizer: the sum weighs each piece's gradients by
its share of the batch, so that the update is the whole batch's, and hands it to the
optimizer once. On one device with one shard, train_step gets the optimizer itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from machinery import distribute, exact

import numpy as np
import tensorflow as tf

STEPS_PER_CALL = 50  # train steps per tf.function call: progress and Ctrl-C after each call

TrainStep = Callable[..., tf.Tensor]  # train_step(model, x, optimizer, eps, y=None) -> loss
LossFunction = Callable[..., tf.Tensor]  # compute_loss(model, x, eps, ..., y=None) -> loss
CompiledLoss = Callable[..., tf.Tensor]  # images (and classes) -> loss, the noise drawn inside
Prepare = Callable[[tf.Tensor], tf.Tensor]  # stored images (uint8) -> the model's input


class GradientSum:
    """Stands in for the optimizer in each piece's train_step: it keeps the gradients of
    each piece, weighted by the piece's share of the batch (`next_piece`), and adds them."""

    def __init__(self, variables: Sequence[tf.Variable]) -> None:
        self.variables, self.total, self.weight = list(variables), None, 1.0

    def next_piece(self, weight: float | tf.Tensor) -> None:
        self.weight = weight

    def apply_gradients(self, grads_and_vars: Iterable[tuple[tf.Tensor, tf.Variable]]) -> None:
        weighted = [tf.math.multiply_no_nan(gradient, self.weight) for gradient, _ in grads_and_vars]
        self.total = weighted if self.total is None else [
            total + gradient for total, gradient in zip(self.total, weighted)]


def num_images(x: tf.Tensor) -> int | tf.Tensor:
    """The images in `x`: static where its shape is known."""
    return x.shape[0] if x.shape[0] is not None else tf.cast(tf.shape(x)[0], tf.float32)


def weighted_pieces(x: tf.Tensor, eps: tf.Tensor, shards: int, y: tf.Tensor | None = None
                    ) -> Iterator[tuple[tf.Tensor, tf.Tensor, tf.Tensor | None, float | tf.Tensor]]:
    """This replica's share of the batch (x, eps and the classes y, if any), cut into `shards`
    consecutive slices (no more than it has images), each with its share of the whole batch
    `x`: a weight. A share known to be empty (a last batch smaller than the replicas) has no
    pieces; one empty at run time gets weight 0."""
    share, share_eps = distribute.replica_share(x), distribute.replica_share(eps)
    share_y = None if y is None else distribute.replica_share(y)
    if share.shape[0] == 0:
        return  # some CPU kernels fail on an empty batch: nothing to compute
    shards = max(1, min(shards, share.shape[0] if share.shape[0] is not None else shards))
    for i in range(shards):
        piece = distribute.split_slice(share, i, shards)
        piece_y = None if y is None else distribute.split_slice(share_y, i, shards)
        yield piece, distribute.split_slice(share_eps, i, shards), piece_y, num_images(piece) / num_images(x)


def weighted_loss(compute_loss: LossFunction, model: tf.keras.Model, x: tf.Tensor,
                  eps: tf.Tensor, shards: int, y: tf.Tensor | None = None) -> tf.Tensor:
    """compute_loss of `x` (of classes `y`, for a conditional model), in `shards` slices side
    by side, each weighted by its share (multiply_no_nan: the mean of an empty share is NaN,
    its weight 0)."""
    total = None
    for piece, piece_eps, piece_y, weight in weighted_pieces(x, eps, shards, y):
        loss = tf.math.multiply_no_nan(compute_loss(model, piece, piece_eps, y=piece_y),
                                       tf.cast(weight, tf.float32))
        total = loss if total is None else total + loss
    return tf.constant(0.0) if total is None else total


class StepLoop:
    """Runs `train_step` on an epoch's batches, STEPS_PER_CALL to a compiled call (see
    the module's docstring); `epoch_losses` yields the losses as each call ends."""

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

    def _replica_step(self, x: tf.Tensor, eps: tf.Tensor, y: tf.Tensor | None = None) -> tf.Tensor:
        """train_step on this replica's share of the batch `x` (of classes `y`, for a
        conditional model), a shard at a time."""
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        if replicas == 1 and self.shards == 1:
            return self.train_step(self.model, x, self.optimizer, eps, y=y)
        summed, loss = GradientSum(self.model.trainable_variables), tf.constant(0.0)
        for piece, piece_eps, piece_y, weight in weighted_pieces(x, eps, self.shards, y):
            summed.next_piece(weight)
            piece_loss = self.train_step(self.model, piece, summed, piece_eps, y=piece_y)
            loss += tf.math.multiply_no_nan(piece_loss, tf.cast(weight, tf.float32))
        if summed.total is None:  # an empty share: it adds nothing to the batch's gradients
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
            with exact.gradients_added_in_pairs():
                loss = self.strategy.run(self._replica_step, args=step_inputs)
            losses = losses.write(i, self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None))
        return losses.stack()

    def epoch_losses(self, images: np.ndarray | tf.Tensor, batch_size: int,
                     steps_per_call: int = STEPS_PER_CALL, order: np.ndarray | None = None,
                     labels: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """A step on each batch of images[order] (default: in order; with their `labels` for a
        conditional model); after each call, the index of its first step and its losses. The
        last batch may be smaller. Only a call's batches are gathered (from uint8 images, say),
        so an epoch holds no copy of the set."""
        images = np.asarray(images)
        if not self.model.num_classes:
            labels = None  # the tutorial's CVAE takes no classes
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
            yield first, self._steps(tf.constant(batches), tf.constant(count), classes).numpy()
        if full * batch_size < len(order):  # the smaller last batch: one call of its own shape
            rest = order[full * batch_size:]
            classes = None if labels is None else tf.constant(labels[rest][np.newaxis])
            yield full, self._steps(tf.constant(images[rest][np.newaxis]), tf.constant(1), classes).numpy()


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
