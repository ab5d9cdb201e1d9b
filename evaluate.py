"""Evaluate a trained run: the ELBO and its parts, an importance-weighted log p(x), and
pictures of what the model learned.

Loads the run's latest checkpoint and its config.json (no flags to repeat), and writes
into the run folder:

  evaluation.json        every figure below, K, the checkpoint's epoch, the data used
  reconstructions.png    test digits (odd rows) above their reconstructions (even rows)
  prior_samples.png      64 digits decoded from z ~ N(0, I)
  latent_space.png       the test set's latent means, coloured by label
  latent_manifold.png    digits decoded from a grid of the latent plane (latent_dim 2)
  interpolation.png      a walk in latent space between two test digits of different classes
  training_curves.png    train loss and test ELBO per epoch, from metrics.csv

    python evaluate.py --out-dir output
    python evaluate.py --out-dir output --iw-samples 1000 --test-size 1000
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import cli  # first: it loads TensorFlow without its start-up logs

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

import dataset
import distribute
import network
import pictures
import run_folder
import speedups

IW_SAMPLES = 100
# Decoded images per call of the IWAE bound: the K samples are taken in chunks, so memory
# stays bounded (a few hundred MB) whatever K is.
DECODES_PER_CALL = 4096


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description="Evaluate a trained CVAE run and draw its pictures.")
    parser.add_argument("--out-dir", default=run_folder.OUT_DIR, help="the run folder to evaluate")
    parser.add_argument("--iw-samples", type=cli.positive_int, default=IW_SAMPLES,
                        help="K, the samples per image of the importance-weighted bound")
    parser.add_argument("--test-size", type=cli.positive_int, default=None,
                        help="use only the first N test images (default: the run's test set)")
    parser.add_argument("--data", default=None,
                        help="where the run's data is now, if not where config.json says")
    parser.add_argument("--seed", type=int, default=0, help="seed for the evaluation's noise")
    return parser


# ----------------------------------------------------------------------------
# The figures


def log_weight_terms(model: network.CVAE, x: tf.Tensor, eps: tf.Tensor
                     ) -> tuple[tuple[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """log p(x|z_k), log p(z_k) and log q(z_k|x) for K draws z_k per image from `eps`
    (batch, K, latent), each (batch, K); and q(z|x)'s (mean, logvar). Their sum
    log p(x|z_k) + log p(z_k) - log q(z_k|x) is an importance weight; for K = 1, the ELBO."""
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean[:, tf.newaxis], logvar[:, tf.newaxis], eps)  # (batch, K, latent)
    batch, k = tf.shape(eps)[0], tf.shape(eps)[1]
    x_logit = model.decode(tf.reshape(z, (batch * k, model.latent_dim)))
    logpx_z = tf.reshape(speedups.bernoulli_log_likelihood(x_logit, tf.repeat(x, k, axis=0)), (batch, k))
    logpz = network.log_normal_pdf(z, 0.0, 0.0, raxis=2)
    logqz_x = network.log_normal_pdf(z, mean[:, tf.newaxis], logvar[:, tf.newaxis], raxis=2)
    return (logpx_z, logpz, logqz_x), (mean, logvar)


@tf.function
def _elbo_parts(model: network.CVAE, rng: tf.random.Generator, x: tf.Tensor, kl: str):
    """Each image's log p(x|z) and KL term, from one z ~ q(z|x): ELBO = first - second."""
    eps = rng.normal((tf.shape(x)[0], model.latent_dim))
    (logpx_z, logpz, logqz_x), (mean, logvar) = log_weight_terms(model, x, eps[:, tf.newaxis])
    kl_term = speedups.analytic_kl(mean, logvar) if kl == "analytic" else (logqz_x - logpz)[:, 0]
    return logpx_z[:, 0], kl_term


@tf.function
def _iwae_chunk(model: network.CVAE, rng: tf.random.Generator, x: tf.Tensor, k: int) -> tf.Tensor:
    """log-sum-exp over `k` importance weights of each image in `x`: (batch,)."""
    eps = rng.normal((tf.shape(x)[0], k, model.latent_dim))
    (logpx_z, logpz, logqz_x), _ = log_weight_terms(model, x, eps)
    return tf.reduce_logsumexp(logpx_z + logpz - logqz_x, axis=1)


def iwae_bound(model: network.CVAE, x: tf.Tensor, rng: tf.random.Generator, k: int) -> np.ndarray:
    """log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x), per image: a lower bound on
    log p(x) that tightens as K grows, and the single-sample ELBO when K = 1.

    The K samples go in chunks, combined with a running log-sum-exp, so memory is bounded
    for any K and the sum never leaves log space.
    """
    chunk = max(1, min(k, DECODES_PER_CALL // len(x)))
    total = tf.fill([len(x)], -np.inf)
    for start in range(0, k, chunk):
        size = min(chunk, k - start)
        total = tf.reduce_logsumexp(tf.stack([total, _iwae_chunk(model, rng, x, size)]), axis=0)
    return (total - math.log(k)).numpy()


def mean_and_stderr(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)),
            "stderr": float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0}


def evaluate_run(model: network.CVAE, images: np.ndarray, *, iw_samples: int, kl: str,
                 seed: int) -> dict:
    """The test figures of `model` on `images`: the ELBO, its two parts, and the IWAE bound."""
    rng = tf.random.Generator.from_seed(seed)
    logpx_z, kl_term, iwae = [], [], []
    # Images per call of the IWAE bound: at least one, and K of them fit DECODES_PER_CALL.
    batch = max(1, min(dataset.EVAL_BATCH_SIZE, DECODES_PER_CALL // iw_samples))
    for x in dataset.make_batches(images, batch):
        parts = _elbo_parts(model, rng, x, kl)
        logpx_z.append(parts[0].numpy())
        kl_term.append(parts[1].numpy())
        iwae.append(iwae_bound(model, x, rng, iw_samples))
    logpx_z, kl_term, iwae = map(np.concatenate, (logpx_z, kl_term, iwae))
    return {"elbo": mean_and_stderr(logpx_z - kl_term),
            "reconstruction_log_likelihood": mean_and_stderr(logpx_z),
            "kl": mean_and_stderr(kl_term),
            "iwae_log_likelihood": {"k": iw_samples, **mean_and_stderr(iwae)}}


# ----------------------------------------------------------------------------
# The pictures


def save_figure(figure: Figure, path: Path) -> None:
    pictures.save_figure(figure, path, bbox_inches="tight")


def save_reconstructions(model: network.CVAE, images: np.ndarray, path: Path, count: int = 32,
                         columns: int = 8) -> None:
    """Test digits, each row of them above a row of their reconstructions (decoded means)."""
    originals = images[:count]
    mean, _ = model.encode(originals)
    reconstructions = model.sample(mean).numpy()
    rows = []
    for start in range(0, len(originals), columns):
        rows += [originals[start:start + columns], reconstructions[start:start + columns]]
    figure = Figure(figsize=(columns, len(rows) * 1.05))
    pictures.image_grid(figure, np.concatenate(rows), columns)
    figure.suptitle("Test digits (odd rows) and their reconstructions (even rows)")
    save_figure(figure, path)


def save_prior_samples(model: network.CVAE, path: Path, seed: int, count: int = 64) -> None:
    z = pictures.prior_draws(count, model.latent_dim, seed)
    figure = Figure(figsize=(8, 8.4))
    pictures.image_grid(figure, model.sample(z).numpy(), 8)
    figure.suptitle(f"{count} samples from the prior, z ~ N(0, I)")
    save_figure(figure, path)


def save_latent_space(model: network.CVAE, images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """The test set's latent means, coloured by label; the first two principal components
    when the latent space has more than two dimensions."""
    means = np.concatenate([model.encode(x)[0].numpy()
                            for x in dataset.make_batches(images, dataset.EVAL_BATCH_SIZE)])
    if means.shape[1] == 1:
        points = np.stack([means[:, 0], labels + np.random.default_rng(0).uniform(-0.3, 0.3, len(labels))], 1)
        title, axis_labels = "Latent means (1-D), spread by label", ("z", "label")
    elif means.shape[1] == 2:
        points, title, axis_labels = means, "Latent means of the test set", ("z[0]", "z[1]")
    else:
        centred = means - means.mean(axis=0)
        _, singular_values, components = np.linalg.svd(centred, full_matrices=False)
        points = centred @ components[:2].T
        explained = (singular_values[:2] ** 2).sum() / (singular_values**2).sum()
        title = (f"Latent means of the test set: first two principal components of "
                 f"{means.shape[1]} dimensions ({explained:.0%} of the variance)")
        axis_labels = ("PC 1", "PC 2")
    figure = Figure(figsize=(8, 7))
    axes = figure.add_subplot()
    scatter = axes.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", vmin=-0.5,
                           vmax=9.5, s=3, alpha=0.7)
    figure.colorbar(scatter, ax=axes, ticks=range(10), label="label")
    axes.set(title=title, xlabel=axis_labels[0], ylabel=axis_labels[1])
    save_figure(figure, path)


def save_interpolation(model: network.CVAE, images: np.ndarray, labels: np.ndarray, path: Path,
                       steps: int = 10) -> None:
    """Decode evenly spaced points on the line between the latent means of two test
    digits of different classes (the first test image and the first of another label)."""
    first = 0
    other = int(np.flatnonzero(labels != labels[first])[0])
    mean, _ = model.encode(images[[first, other]])
    path_z, weights = pictures.latent_walk(mean[0].numpy(), mean[1].numpy(), steps)
    decoded = model.sample(tf.constant(path_z)).numpy()
    row = np.concatenate([images[[first]], decoded, images[[other]]])
    titles = [f"test {labels[first]}"] + [f"{w:.2f}" for w in weights] + [f"test {labels[other]}"]
    figure = Figure(figsize=(len(row) * 1.0, 1.6))
    pictures.image_grid(figure, row, len(row), titles)
    figure.suptitle(f"From a {labels[first]} to a {labels[other]} in latent space")
    save_figure(figure, path)


def save_training_curves(metrics: list[dict], path: Path) -> None:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    trained = [row for row in metrics if row["train_loss"] is not None]
    axes.plot([r["epoch"] for r in trained], [-r["train_loss"] for r in trained], "o-",
              label="train ELBO (minus the epoch's mean loss)")
    axes.plot([r["epoch"] for r in metrics if r["epoch"] > 0],
              [r["test_elbo"] for r in metrics if r["epoch"] > 0], "s-", label="test ELBO")
    axes.set(xlabel="epoch", ylabel="ELBO (nats per image)", title="Training curves")
    axes.grid(alpha=0.3)
    axes.legend()
    save_figure(figure, path)


# ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out_dir)
    model, config, checkpoint_path, epoch = run_folder.load_trained_model(out_dir)
    cli.ensure_out_dir(out_dir)  # writable: say so now, not after the figures

    source = args.data or config["data"]
    _, (test_images, test_labels), _ = run_folder.load_run_data(config, source, out_dir, check=True)
    if args.test_size is not None:
        if args.test_size > len(test_images):
            raise cli.UserError(f"--test-size {args.test_size} is larger than the run's "
                                f"{len(test_images)} test images")
        test_images, test_labels = test_images[:args.test_size], test_labels[:args.test_size]
    if len(np.unique(test_labels)) < 2:
        raise cli.UserError("the interpolation needs test digits of two classes; use a larger "
                            "--test-size")
    test_images = dataset.binarize(test_images)

    print(distribute.describe(tf.distribute.get_strategy()))
    print(f"Evaluating {checkpoint_path} (epoch {epoch}) on {len(test_images):,} test images, "
          f"K = {args.iw_samples}")

    figures = evaluate_run(model, test_images, iw_samples=args.iw_samples, kl=config["kl"],
                           seed=args.seed)
    report = {"checkpoint": checkpoint_path, "epoch": epoch, "data": source,
              "dataset": config["dataset"], "test_images": len(test_images),
              "kl_estimator": config["kl"], "seed": args.seed, **figures}
    with cli.atomic_path(out_dir / "evaluation.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")

    def line(name: str, figure: dict) -> str:
        return f"  {name:38s} {figure['mean']:9.2f} +- {figure['stderr']:.2f}"

    print(line("ELBO", figures["elbo"]))
    print(line("  reconstruction log-likelihood", figures["reconstruction_log_likelihood"]))
    print(line("  KL(q(z|x) || p(z))", figures["kl"]))
    print(line(f"log p(x), IWAE bound with K = {args.iw_samples}", figures["iwae_log_likelihood"]))
    print("(nats per image; +- one standard error over the test images)")

    save_reconstructions(model, test_images, out_dir / "reconstructions.png")
    save_prior_samples(model, out_dir / "prior_samples.png", args.seed)
    save_latent_space(model, test_images, test_labels, out_dir / "latent_space.png")
    save_interpolation(model, test_images, test_labels, out_dir / "interpolation.png")
    save_training_curves(run_folder.read_metrics(out_dir / "metrics.csv"), out_dir / "training_curves.png")
    written = ["evaluation.json", "reconstructions.png", "prior_samples.png", "latent_space.png",
               "interpolation.png", "training_curves.png"]
    if config["latent_dim"] == 2:
        pictures.save_latent_images(model, out_dir / "latent_manifold.png")
        written.append("latent_manifold.png")
    print(f"Wrote {', '.join(written)} in {out_dir}/")


if __name__ == "__main__":
    cli.run(main)
