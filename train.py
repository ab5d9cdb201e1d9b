"""Train the CVAE with the tutorial's recipe, its defaults, and draw what it learned.

A run writes into --out-dir a 4x4 grid of test images per epoch, cvae.gif,
latent_manifold.png, metrics.csv, config.json, checkpoints/ and tensorboard/. Stopped at
any moment, it goes on with --resume from its last complete epoch, as if never stopped.

    python train.py                                  # the tutorial
    python train.py --data mnist.npz --epochs 1 --train-size 2000   # a quick look
    python train.py --out-dir output --resume        # continue a stopped run
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Sequence
from pathlib import Path

from machinery import cli, distribute, faults, files, launch, records, references, run_folder, speed, steps
from machinery.settings import RunSettings

import numpy as np
import tensorflow as tf

import dataset
import evaluate
import export
import network
import pictures

# The tutorial's recipe: these are the flags' defaults. (A run's settings, these and the
# others, are one RunSettings, that config.json stores: machinery/settings.py.)
EPOCHS = 10
LATENT_DIM = network.LATENT_DIM
BATCH_SIZE = 32
LEARNING_RATE = 1e-4
SEED = dataset.SEED  # 42


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description="Train the convolutional VAE on binarized MNIST (or "
                                            "the images --data or --dataset names: a .npz, or "
                                            "a folder of images).")
    parser.add_argument("--epochs", type=cli.non_negative_int, default=EPOCHS,
                        help="passes over the training set")
    parser.add_argument("--latent-dim", type=cli.positive_int, default=LATENT_DIM,
                        help="size of the latent space (the manifold needs 2)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=BATCH_SIZE,
                        help="images per training step")
    parser.add_argument("--learning-rate", type=cli.positive_float, default=LEARNING_RATE,
                        help="Adam's learning rate")
    network.add_model_flags(parser)
    parser.add_argument("--kl", choices=network.KL_ESTIMATORS, default=RunSettings.kl,
                        help="the ELBO's KL term: the tutorial's single-sample estimate (mc) or "
                             "its closed form (analytic)")
    parser.add_argument("--conditional", action="store_true",
                        help="condition the encoder and the decoder on the images' classes: "
                             "q(z|x, y) and p(x|z, y), a conditional VAE")
    parser.add_argument("--beta", type=cli.non_negative_float, default=RunSettings.beta,
                        help="weight of the KL term in the training loss (a beta-VAE); the test "
                             "ELBO and evaluate.py's figures are the ELBO itself, B = 1")
    parser.add_argument("--kl-warmup", type=cli.non_negative_float, default=RunSettings.kl_warmup,
                        metavar="EPOCHS", help="a KL warm-up: the KL term's weight rises linearly "
                                               "from 0 to --beta over the first EPOCHS epochs "
                                               "(Bowman et al. 2016); 0: none")
    parser.add_argument("--kl-cycle", type=cli.non_negative_float, default=RunSettings.kl_cycle,
                        metavar="EPOCHS", help="a cyclical KL weight: in every cycle of EPOCHS epochs "
                                               "it rises from 0 to --beta over the first half, then "
                                               "holds (Fu et al. 2019); 0: none")
    parser.add_argument("--precision", choices=tuple(network.PRECISIONS), default=RunSettings.precision,
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
    speed.add_flag(parser)
    return parser


# ----------------------------------------------------------------------------
# The tutorial's train step (cell 17) and test-set ELBO (cell 22)


def train_step(model: network.CVAE, x: tf.Tensor, optimizer: tf.keras.optimizers.Optimizer,
               eps: tf.Tensor | None = None, y: tf.Tensor | None = None, *, kl: str = "mc",
               beta: float | tf.Tensor = 1., shards: int = 1) -> tf.Tensor:
    """Executes one training step and returns the loss.

    This function computes the loss and gradients, and uses the latter to
    update the model's parameters. (eps: the noise; y: the classes of x, for --conditional.)
    """
    with tf.GradientTape() as tape:
        # The tutorial's loss = compute_loss(model, x), as a sum of the batch's parts: with
        # --shards or replicas, its shards side by side, each weighed by its share.
        loss = 0.
        for part in steps.parts(x, eps, y, shards):  # one part, the whole batch, by default
            loss += part.weigh(network.compute_loss(model, part.x, part.eps, kl, beta, part.y))
    gradients = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return loss


def kl_weight(step: tf.Tensor, settings: RunSettings, steps_per_epoch: int) -> tf.Tensor:
    """The KL term's weight at a training step (0 the first) under --kl-warmup or --kl-cycle:
    rising linearly from 0 to --beta over the warm-up, or over the first half of each cycle."""
    step = tf.cast(step, tf.float32)
    if settings.kl_warmup:
        rise = step / (settings.kl_warmup * steps_per_epoch)
    else:
        cycle = settings.kl_cycle * steps_per_epoch
        rise = tf.math.floormod(step, cycle) / (cycle / 2)
    return settings.beta * tf.minimum(1.0, rise)


def test_set_elbo(test_loss: steps.CompiledLoss, test_dataset: tf.data.Dataset) -> float:
    """Minus compute_loss over the test set: each batch's mean weighted by its size, so
    that it is the mean over every image (the tutorial averages the batch means)."""
    total, count = 0.0, 0
    for test_x, test_y in test_dataset:  # test_y: the classes, which a conditional model takes
        total += float(test_loss(test_x, test_y)) * len(test_x)
        count += len(test_x)
    return -total / count


# ----------------------------------------------------------------------------
# The tutorial's training loop (cell 22)


def fit(model: network.CVAE, optimizer: tf.keras.optimizers.Optimizer, settings: RunSettings,
        train_images: np.ndarray, test_images: np.ndarray, *, out_dir: Path,
        resume_from: str | None = None, strategy: tf.distribute.Strategy | None = None, shards: int = 1,
        train_labels: np.ndarray | None = None, test_labels: np.ndarray | None = None,
        train_step: steps.TrainStep = train_step) -> list[dict]:
    """Train to settings.epochs from `resume_from` (a checkpoint, if any), with the test ELBO,
    the 4x4 grid, the metrics and a checkpoint before training and after every epoch; return
    the metrics. The images are uint8, prepared a batch at a time (dataset.preprocess); the
    labels are the classes a conditional model is given."""
    # The tutorial's names for the settings the loop reads.
    epochs, batch_size, seed, kl = settings.epochs, settings.batch_size, settings.seed, settings.kl
    test_labels = np.zeros(len(test_images), np.uint8) if test_labels is None else test_labels
    strategy = strategy or tf.distribute.get_strategy()
    chief = distribute.is_chief(strategy)  # in a multi-worker run, only the chief writes files
    prepare = functools.partial(dataset.preprocess, likelihood=model.likelihood)
    state = records.RunState(model, optimizer, test_images, seed, out_dir, strategy, prepare, test_labels,
                             sample_size=pictures.NUM_EXAMPLES_TO_GENERATE)
    # Speed, around the tutorial's train_step (as nanoGPT's torch.compile): one compiled call
    # runs it on 50 batches, each on the replicas, its noise drawn from the run's seed.
    scheduled, steps_per_epoch = settings.kl_warmup or settings.kl_cycle, -(-len(train_images) // batch_size)

    def step(model: network.CVAE, x: tf.Tensor, optimizer: tf.keras.optimizers.Optimizer,
             eps: tf.Tensor | None = None, y: tf.Tensor | None = None) -> tf.Tensor:
        """train_step with the KL term's weight: --beta, or its schedule's at this step."""
        beta = kl_weight(optimizer.iterations, settings, steps_per_epoch) if scheduled else settings.beta
        return train_step(model, x, optimizer, eps, y, kl=kl, beta=beta, shards=shards)
    train_steps = steps.compiled_train_steps(step, model, optimizer, state.rng, strategy=strategy,
                                             prepare=prepare)
    test_loss = steps.compiled_loss(functools.partial(network.compute_loss, kl=kl), model,
                                    state.rng, shards, prepare)
    test_dataset = dataset.make_batches((test_images, test_labels),
                                        dataset.eval_batch_size(model.image_shape))
    # For latent_dim 2, each epoch also draws where the test images' means lie (latent_means.gif).
    frame_y = test_labels[:pictures.FRAME_POINTS]
    frame_x = prepare(test_images[:pictures.FRAME_POINTS]) if model.latent_dim == 2 else None

    def save_pictures(epoch: int) -> None:
        """The tutorial's 4x4 grid; for latent_dim 2, a frame of latent_means.gif too."""
        pictures.generate_and_save_images(model, epoch, state.test_sample, state.sample_eps, out_dir,
                                          state.sample_labels)
        if model.latent_dim == 2:
            pictures.save_latent_space(pictures.latent_means(model, frame_x, frame_y), frame_y,
                                       pictures.frame_path(out_dir, epoch),
                                       settings.class_names or pictures.DIGITS, epoch)

    done = state.resume(resume_from, epochs)  # the last complete epoch; None for a new run
    epoch_records = records.EpochRecords(out_dir, chief, done)

    def test_set_kl_health(epoch: int) -> dict:
        """The test images' KL per latent dimension and active units (evaluate.kl_health); a
        posterior collapse (no dimension active) is said when training first meets it."""
        health = evaluate.kl_health(*pictures.latent_posteriors(model, test_images, test_labels, prepare))
        if epoch > 0 and health["active_units"] == 0 and not any(
                row["epoch"] > 0 and row.get("active_units") == 0 for row in epoch_records.metrics):
            print(evaluate.POSTERIOR_COLLAPSE)
        return health

    if done is None:
        elbo, health = test_set_elbo(test_loss, test_dataset), test_set_kl_health(0)
        print(f"Epoch 0 (untrained): test ELBO {elbo:.2f}")
        if chief:
            save_pictures(0)
        epoch_records.write(0, {"epoch": 0, "test_elbo": round(elbo, 4)}, pictures.grid_path(out_dir, 0),
                            health=health)
        state.save(0)
        done = 0

    with faults.GracefulStop() as stop:  # Ctrl-C and SIGTERM stop at the next call's end
        for epoch in range(done + 1, epochs + 1):
            print(f"Epoch {epoch}/{epochs}")
            progress = records.EpochProgress(epoch, len(train_images), batch_size,
                                             int(optimizer.iterations.numpy()), out_dir)
            start_time = time.perf_counter()
            order = dataset.epoch_order(len(train_images), seed, epoch)  # this epoch's shuffle
            for batches in steps.batches(train_images, batch_size, order, train_labels):
                losses = train_steps(batches)  # train_step on each of 50 batches: their losses
                progress.update(batches.first, losses)
                if stop.signal:
                    break
            end_time = time.perf_counter()
            if not progress.complete:
                print()  # below the progress bar
                raise stop.stopped(f"during epoch {epoch} (step {progress.seen // batch_size} of "
                                   f"{progress.steps})", epoch - 1, out_dir)

            elbo, health = test_set_elbo(test_loss, test_dataset), test_set_kl_health(epoch)
            seconds = end_time - start_time
            print(f"Epoch {epoch}/{epochs}: test ELBO {elbo:.2f}, train loss {progress.mean_loss:.2f}, "
                  f"time for the epoch {seconds:.1f} s ({progress.seen / seconds:,.0f} images/s)")
            if chief:
                save_pictures(epoch)
            epoch_records.write(epoch, progress.row(elbo, seconds), pictures.grid_path(out_dir, epoch),
                                progress.loss_points, health)
            state.save(epoch)  # last: the checkpoint marks the epoch complete
            if stop.signal and epoch < epochs:
                raise stop.stopped(f"after epoch {epoch}", epoch, out_dir)
    return epoch_records.metrics


def save_final_outputs(model: network.CVAE, run: run_folder.Run) -> None:
    """The chief's last outputs: the GIF of the grids, the manifold (or a conditional model's
    analogies), the exported model."""
    out_dir, settings = run.out_dir, run.settings
    frames = [pictures.grid_path(out_dir, epoch) for epoch in range(settings.epochs + 1)]
    pictures.save_gif(frames, out_dir / "cvae.gif")
    print(f"Wrote {out_dir / 'cvae.gif'} ({len(frames)} frames)")
    if settings.latent_dim == 2:  # (frames of epochs a version before them trained are missing)
        moves = [pictures.frame_path(out_dir, epoch) for epoch in range(settings.epochs + 1)]
        moves = [frame for frame in moves if frame.is_file()]
        pictures.save_gif(moves, out_dir / "latent_means.gif")
        print(f"Wrote {out_dir / 'latent_means.gif'} (the test images' latent means, {len(moves)} frames)")
    if model.num_classes:
        images = dataset.preprocess(run.test_images[:pictures.ANALOGY_ROWS], model.likelihood).numpy()
        pictures.save_analogies(model, images, run.test_labels, out_dir / "analogies.png",
                                settings.class_names)
        print(f"Wrote {out_dir / 'analogies.png'}")
    elif settings.latent_dim == 2:  # (a conditional model's manifold would need a class)
        pictures.save_latent_manifold(model, out_dir / "latent_manifold.png")
        print(f"Wrote {out_dir / 'latent_manifold.png'}")
    else:
        print(f"No latent manifold: it needs --latent-dim 2, not {settings.latent_dim}")
    export.export_model(model, out_dir)  # the trained model, to use without this script
    print(f"Wrote {out_dir / files.KERAS_FILE} and {out_dir / files.SAVEDMODEL_DIR}/ "
          f"(python generate.py --out-dir {out_dir} draws "
          f"{pictures.noun(settings.class_names)} from them)")


def where_it_stands(settings: RunSettings, last: dict) -> str:
    """The run's last line: at its last epoch, its test ELBO, KL and active latent dimensions,
    and what its recipe gives in docs/results.md where that has a row for it."""
    line = f"At epoch {last['epoch']}: test ELBO {last['test_elbo']:.2f}"
    if last.get("active_units") is not None:
        line += (f", KL {last['test_kl']:.2f} nats, {last['active_units']:.0f} of {settings.latent_dim} "
                 f"latent dimensions active")
    reference = references.reference_line(settings)
    return line + (f"; {reference}" if reference else "")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = cli.explicit_flags(parser, argv)  # the flags typed: --resume checks them
    dataset.refuse_two_sources(args, given)  # --dataset typed, and $CVAE_DATA set
    if args.kl_warmup and args.kl_cycle:
        raise cli.UserError("--kl-warmup and --kl-cycle are two schedules of the KL weight: choose one")
    with launch.training(args, given, dataset.load_run_data, export.SETTING_CHOICES,
                         test_images_needed=pictures.NUM_EXAMPLES_TO_GENERATE) as (run, devices):
        with devices.strategy.scope():  # the variables live on the strategy's devices
            model = export.new_model(run.settings)  # network.CVAE with the run's settings
            optimizer = tf.keras.optimizers.Adam(run.settings.learning_rate)
        metrics = fit(model, optimizer, run.settings, run.train_images, run.test_images, out_dir=run.out_dir,
            resume_from=run.resume_from, strategy=devices.strategy, shards=devices.shards,
            train_labels=run.train_labels, test_labels=run.test_labels)
        if devices.chief:
            save_final_outputs(model, run)
            if metrics:  # (none where a finished run's metrics.csv was removed)
                print(where_it_stands(run.settings, metrics[-1]))


if __name__ == "__main__":
    cli.run(main)
