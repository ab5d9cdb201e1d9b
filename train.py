"""Train the CVAE with the tutorial's recipe, and draw what it learned.

The defaults are the tutorial's: binarized MNIST, batch 32, latent_dim 2, Adam 1e-4,
10 epochs, the single-sample Monte Carlo ELBO and a custom tf.GradientTape step. A run
writes into --out-dir a 4x4 grid of test digits per epoch, cvae.gif, latent_manifold.png,
metrics.csv, config.json, checkpoints/ and tensorboard/. Stopped at any moment, it goes
on with --resume from its last complete epoch, as if it had never stopped.

    python train.py                                  # the tutorial
    python train.py --data mnist.npz --epochs 1 --train-size 2000   # a quick look
    python train.py --out-dir output --resume        # continue a stopped run
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import cli  # first: it loads TensorFlow without its start-up logs

import numpy as np
import tensorflow as tf

import dataset
import distribute
import export
import network
import pictures
import run_folder
import run_log
import speedups

# The tutorial's recipe: these are the flags' defaults.
EPOCHS = 10
LATENT_DIM = network.LATENT_DIM
BATCH_SIZE = 32
LEARNING_RATE = 1e-4
SEED = 42
STEPS_PER_CALL = 50  # train steps per tf.function call: progress and Ctrl-C after each call


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description="Train the convolutional VAE on binarized MNIST.")
    parser.add_argument("--epochs", type=cli.non_negative_int, default=EPOCHS,
                        help="passes over the training set")
    parser.add_argument("--latent-dim", type=cli.positive_int, default=LATENT_DIM,
                        help="size of the latent space (the manifold needs 2)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=BATCH_SIZE,
                        help="images per training step")
    parser.add_argument("--learning-rate", type=cli.positive_float, default=LEARNING_RATE,
                        help="Adam's learning rate")
    parser.add_argument("--kl", choices=network.KL_ESTIMATORS, default="mc",
                        help="the ELBO's KL term: the tutorial's single-sample estimate (mc) or "
                             "its closed form (analytic)")
    parser.add_argument("--precision", choices=tuple(network.PRECISIONS), default="fp32",
                        help="bf16: Keras mixed_bfloat16 for the hidden layers (faster where the "
                             "hardware has bfloat16 maths), with the loss and sampling in float32")
    parser.add_argument("--seed", type=cli.seed_int, default=SEED,
                        help="seed for weights, shuffling and noise: the same seed repeats a "
                             "run on the same machine")
    dataset.add_data_flags(parser)
    parser.add_argument("--train-size", type=cli.positive_int, default=None,
                        help="use only the first N training images (default: all)")
    parser.add_argument("--test-size", type=cli.positive_int, default=None,
                        help=f"use only the first N test images, at least "
                             f"{pictures.NUM_EXAMPLES_TO_GENERATE} (default: all)")
    run_folder.add_flags(parser)
    distribute.add_flags(parser)
    speedups.add_flag(parser)
    return parser


# ----------------------------------------------------------------------------
# The tutorial's train step, and the test ELBO


def batch_loss(model: network.CVAE, x: tf.Tensor, eps: tf.Tensor | None = None, kl: str = "mc",
               shards: int = 1, batch_size: int | None = None) -> tf.Tensor:
    """network.compute_loss of the images `x`, in `shards` slices side by side (see
    speedups.setup_shards), each weighted by its share of the `batch_size` images (default:
    all of `x`; under tf.distribute, `x` is a replica's share of the batch)."""
    batch_size = batch_size or _count(x)
    shards = max(1, min(shards, x.shape[0] or shards))  # no empty slice (a small last batch)
    loss = None
    for piece in range(shards):
        x_piece = distribute.split_slice(x, piece, shards)
        eps_piece = None if eps is None else distribute.split_slice(eps, piece, shards)
        weighted = network.compute_loss(model, x_piece, eps_piece, kl) * (_count(x_piece) / batch_size)
        loss = weighted if loss is None else loss + weighted
    return loss


def _count(x: tf.Tensor) -> int | tf.Tensor:
    """The images in `x`: static where its shape is known."""
    return x.shape[0] if x.shape[0] is not None else tf.cast(tf.shape(x)[0], tf.float32)


def train_step(model: network.CVAE, x: tf.Tensor, optimizer: tf.keras.optimizers.Optimizer,
               eps: tf.Tensor | None = None, kl: str = "mc", shards: int = 1,
               batch_size: int | None = None) -> tf.Tensor:
    """The tutorial's train_step: the loss and its gradients, then one update of the
    weights; it returns the loss. `eps` fixes the noise; for the rest see batch_loss."""
    with tf.GradientTape() as tape:
        loss = batch_loss(model, x, eps, kl, shards, batch_size)
    gradients = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return loss


TrainSteps = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


def make_train_function(model: network.CVAE, optimizer: tf.keras.optimizers.Optimizer,
                        rng: tf.random.Generator, *, kl: str = "mc",
                        strategy: tf.distribute.Strategy | None = None, shards: int = 1) -> TrainSteps:
    """train_step, compiled `count` steps a call: `train_steps(batches, first, count)` steps
    on batches[first], batches[first + 1], .. and returns their losses. Each replica of a
    `strategy` takes its share of every batch; the noise is drawn for the whole batch."""
    strategy = strategy or tf.distribute.get_strategy()

    def replica_step(x: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
        batch_size = x.shape[0]  # static: the batches are slices of a tensor of known shape
        return train_step(model, distribute.replica_share(x), optimizer,
                          distribute.replica_share(eps), kl, shards, batch_size)

    @tf.function
    def train_steps(batches: tf.Tensor, first: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
        losses = tf.TensorArray(tf.float32, size=count)
        for i in tf.range(count):
            # One step after the other (a loop may otherwise start the next iterations early).
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            x = batches[first + i]
            eps = rng.normal(shape=(tf.shape(x)[0], model.latent_dim))
            loss = strategy.run(replica_step, args=(x, eps))
            losses = losses.write(i, strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None))
        return losses.stack()

    return train_steps


def epoch_losses(train_steps: TrainSteps, images: tf.Tensor, batch_size: int,
                 steps_per_call: int = STEPS_PER_CALL) -> Iterator[tuple[int, np.ndarray]]:
    """A step on each batch of `images` in order, `steps_per_call` a call; after each call,
    yield the index of its first step and its losses. The last batch may be smaller."""
    # Batches of static shape: the kernels, and so the results, are those of a function
    # traced for one batch (a dynamic batch size rounds differently).
    full = len(images) // batch_size
    batches = tf.reshape(images[:full * batch_size], (full, batch_size, *images.shape[1:]))
    for first in range(0, full, steps_per_call):
        count = min(steps_per_call, full - first)
        yield first, train_steps(batches, tf.constant(first), tf.constant(count)).numpy()
    if full * batch_size < len(images):  # the smaller last batch: one call of its own shape
        yield full, train_steps(images[tf.newaxis, full * batch_size:], tf.constant(0),
                                tf.constant(1)).numpy()


@tf.function
def _test_loss(model: network.CVAE, rng: tf.random.Generator, x: tf.Tensor, kl: str,
               shards: int) -> tf.Tensor:
    eps = rng.normal(shape=(tf.shape(x)[0], model.latent_dim))
    return batch_loss(model, x, eps, kl, shards)


def test_set_elbo(model: network.CVAE, batches: tf.data.Dataset, rng: tf.random.Generator,
                  kl: str = "mc", shards: int = 1) -> float:
    """The tutorial's test-set ELBO: minus compute_loss, averaged over every image."""
    total, count = 0.0, 0
    for x in batches:
        total -= float(_test_loss(model, rng, x, kl, shards)) * len(x)
        count += len(x)
    return total / count


# ----------------------------------------------------------------------------
# The loop


def fit(model: network.CVAE, optimizer: tf.keras.optimizers.Optimizer,
        train_images: np.ndarray, test_images: np.ndarray, *, epochs: int, batch_size: int,
        seed: int, out_dir: Path, resume_from: str | None = None, kl: str = "mc",
        strategy: tf.distribute.Strategy | None = None, shards: int = 1) -> list[dict]:
    """The tutorial's epoch loop, to `epochs`, with a 4x4 grid, metrics and a checkpoint
    after every epoch; it returns the metrics. `resume_from`: a checkpoint to continue.
    The images are binarized float32 (N, 28, 28, 1); only a `strategy`'s chief writes."""
    strategy = strategy or tf.distribute.get_strategy()
    chief = distribute.is_chief(strategy)
    if not optimizer.built:  # its variables must exist before train_steps is traced
        with strategy.scope():
            optimizer.build(model.trainable_variables)
    log = run_log.RunLog(model, optimizer, test_images, seed, out_dir, chief,
                         distribute.checkpoint_folder(strategy))
    rng = log.rng  # all noise: training, the test ELBO, the grid
    train_steps = make_train_function(model, optimizer, rng, kl=kl, strategy=strategy,
                                      shards=shards)
    train_tensor = tf.constant(train_images)  # converted once, permuted every epoch
    test_batches = dataset.make_batches(test_images, dataset.EVAL_BATCH_SIZE)

    def end_epoch(epoch: int, row: dict, loss_points: list[tuple[int, float]] = ()) -> None:
        if chief:
            pictures.generate_and_save_images(model, epoch, log.test_sample, log.sample_eps, out_dir)
        log.end_epoch(epoch, row, loss_points)

    # Every worker of a multi-worker run goes on from the last epoch that all of them have.
    resume_from = run_folder.agreed_checkpoint(resume_from, distribute.from_every_worker(
        strategy, run_folder.checkpoint_epoch(resume_from)), log.checkpoint_dir)
    if resume_from:
        done = log.restore(resume_from, epochs)
    else:
        done = 0
        elbo = test_set_elbo(model, test_batches, rng, kl, shards)
        print(f"Epoch 0 (untrained): test ELBO {elbo:.2f}")
        end_epoch(0, {"epoch": 0, "test_elbo": round(elbo, 4)})

    with run_log.GracefulStop() as stop:
        for epoch in range(done + 1, epochs + 1):
            print(f"Epoch {epoch}/{epochs}")
            progress = run_log.EpochProgress(epoch, len(train_images), batch_size,
                                             int(optimizer.iterations.numpy()), out_dir)
            start_time = time.perf_counter()
            images = dataset.epoch_images(train_tensor, seed, epoch)  # this epoch's shuffle
            for first, losses in epoch_losses(train_steps, images, batch_size):
                progress.update(first, losses)
                if stop.signal:
                    break
            end_time = time.perf_counter()
            if not progress.complete:
                print()
                raise stop.stopped(f"during epoch {epoch} (step {progress.seen // batch_size} of "
                                   f"{progress.steps})", epoch - 1, out_dir)

            elbo = test_set_elbo(model, test_batches, rng, kl, shards)
            seconds, loss = end_time - start_time, progress.mean_loss
            print(f"Epoch {epoch}/{epochs}: test ELBO {elbo:.2f}, train loss {loss:.2f}, "
                  f"time for the epoch {seconds:.1f} s ({progress.seen / seconds:,.0f} images/s)")
            end_epoch(epoch, progress.row(elbo, seconds), progress.loss_points)
            if stop.signal and epoch < epochs:
                raise stop.stopped(f"after epoch {epoch}", epoch, out_dir)
    return log.metrics


def save_final_outputs(model: network.CVAE, config: dict, out_dir: Path) -> None:
    """The chief's last outputs: the GIF of the grids, the manifold, the exported model."""
    frames = [pictures.grid_path(out_dir, epoch) for epoch in range(config["epochs"] + 1)]
    pictures.save_gif(frames, out_dir / "cvae.gif")
    print(f"Wrote {out_dir / 'cvae.gif'} ({len(frames)} frames)")
    if config["latent_dim"] == 2:
        pictures.save_latent_images(model, out_dir / "latent_manifold.png")
        print(f"Wrote {out_dir / 'latent_manifold.png'}")
    else:
        print(f"No latent manifold: it needs --latent-dim 2, not {config['latent_dim']}")
    export.export_model(model, out_dir)  # the trained model, to use without this script
    print(f"Wrote {out_dir / network.KERAS_FILE} and {out_dir / network.SAVEDMODEL_DIR}/ "
          f"(python generate.py --out-dir {out_dir} draws digits from them)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    shards = speedups.setup_shards(args.shards, args.strategy)  # before TensorFlow starts
    if args.strategy == "multiworker":
        cli.hide_native_logs()  # its cluster's logs, and a lost worker's pages of gRPC errors
    strategy = distribute.make_strategy(args.strategy, args.devices)
    chief, checkpoint_folder = distribute.is_chief(strategy), distribute.checkpoint_folder(strategy)
    out_dir = Path(args.out_dir)
    try:  # a lost worker or a full disk ends the run in one line
        if not chief:  # the chief checks and sets up the run folder first: it may be shared
            distribute.barrier(strategy)
        run = run_folder.prepare_run(args, cli.explicit_flags(parser, argv), chief, checkpoint_folder)
        if chief:
            distribute.barrier(strategy)
        config, out_dir = run.config, run.out_dir
        print(distribute.describe(strategy, shards))
        print(f"Training on {len(run.train_images):,} images, testing on {len(run.test_images):,}; "
              f"writing to {out_dir}/")

        # The same seed must give the same run: the weights start from it, and deterministic
        # kernels keep a resumed run bit-identical (on a GPU: deterministic convolutions).
        tf.config.experimental.enable_op_determinism()
        tf.keras.utils.set_random_seed(config["seed"])
        with strategy.scope():  # the variables live on the strategy's devices
            model = network.CVAE(config["latent_dim"], config["precision"])
            optimizer = tf.keras.optimizers.Adam(config["learning_rate"])
        fit(model, optimizer, run.train_images, run.test_images, epochs=config["epochs"],
            batch_size=config["batch_size"], seed=config["seed"], out_dir=out_dir,
            resume_from=run.resume_from, kl=config["kl"], strategy=strategy, shards=shards)
        if chief:
            save_final_outputs(model, config, out_dir)
    except (*run_log.MACHINE_ERRORS, *run_log.LOST_WORKER_ERRORS) as error:
        raise run_log.interrupted(error, out_dir, out_dir / checkpoint_folder) from None
    if chief and (peak := cli.peak_memory_gib()) is not None:
        print(f"Peak memory (RSS): {peak:.2f} GiB")


if __name__ == "__main__":
    cli.run(main)
