"""Evaluate a trained run: the ELBO and its parts, an importance-weighted log p(x), and
pictures of what the model learned.

Every figure comes from network.elbo_terms, the per-image log p(x|z), log p(z) and log
q(z|x) that compute_loss averages for training, so an edit of them shows in all of them.

Loads the run's latest checkpoint and its config.json (no flags to repeat), and writes
into the run folder:

  evaluation.json        every figure below (and bits_per_dim), K, the checkpoint's epoch, the data
  reconstructions.png    test images (odd rows) above their reconstructions (even rows)
  prior_samples.png      64 images decoded from z ~ N(0, I)
  latent_space.png       the test set's latent means, coloured by label
  latent_manifold.png    images decoded from a grid of the latent plane (latent_dim 2)
  interpolation.png      a walk in latent space between two test images of different classes
  analogies.png          a conditional model's: each test image's style in every class (no
                         manifold or interpolation then)
  training_curves.png    train loss and test ELBO per epoch, from metrics.csv
  tensorboard/           the latent means, their classes and a sprite for TensorBoard's Projector

    python evaluate.py --out-dir output
    python evaluate.py --out-dir output --iw-samples 1000 --test-size 1000
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from machinery import cli, distribute, files, projector, records, resumable, run_folder, speed

import numpy as np
import tensorflow as tf

import dataset
import export
import network
import pictures

IW_SAMPLES = 100
IWAE_IMAGES = 32  # test images a batch of the IWAE bound: what a stopped evaluation keeps
KEPT_FILE = ".evaluation-kept.npz"  # in the run folder, until the evaluation is complete
ACTIVE_VARIANCE = 0.01  # a latent dimension is active where its mean varies over x more than this
POSTERIOR_COLLAPSE = ("Posterior collapse: no latent dimension is used (its mean does not vary "
                      "with x); try a KL warm-up (--kl-warmup 5), a cyclical KL weight "
                      "(--kl-cycle 2.5) or --beta below 1")
# Decoded images per call of the IWAE bound for the tutorial's decoder: the K draws of a
# batch are taken in chunks, so memory stays bounded whatever K is.
DECODES_PER_CALL = 4096
TUTORIALS_LARGEST_ACTIVATION = 28 * 28 * 32  # floats per decode, at the decoder's widest layer


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description="Evaluate a trained CVAE run and draw its pictures.")
    parser.add_argument("--out-dir", default=run_folder.OUT_DIR, help="the run folder to evaluate")
    parser.add_argument("--iw-samples", type=cli.positive_int, default=IW_SAMPLES,
                        help="K, the samples per image of the importance-weighted bound")
    parser.add_argument("--test-size", type=cli.positive_int, default=None,
                        help="use only the first N test images (default: the run's test set)")
    parser.add_argument("--data", default=None,
                        help="where the run's data is now, if not where config.json says")
    parser.add_argument("--seed", type=cli.seed_int, default=0, help="seed for the evaluation's noise")
    return parser


# ----------------------------------------------------------------------------
# The figures, from network.elbo_terms: what compute_loss and training are made of


@tf.function
def elbo_parts(model: network.CVAE, x: tf.Tensor, eps: tf.Tensor, kl: str, y: tf.Tensor | None = None,
               posterior: tuple | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Each image's ELBO, log p(x|z) and KL term, log q(z|x) - log p(z), from one draw z
    (noise eps); with --kl analytic, the KL in closed form. (posterior: as elbo_terms'.)"""
    logpx_z, logpz, logqz_x = network.elbo_terms(model, x, eps, kl, y, posterior)
    return logpx_z + logpz - logqz_x, logpx_z, logqz_x - logpz


@tf.function
def log_weights(model: network.CVAE, x: tf.Tensor, eps: tf.Tensor, y: tf.Tensor | None = None) -> tf.Tensor:
    """The log importance weights log p(x, z_k) - log q(z_k|x) of each image of `x` and draw
    z_k (noise eps: batch, k, latent): (batch, k). The K draws of an image are a batch of K
    copies of it, which share its one encoding."""
    batch, k = tf.shape(eps)[0], tf.shape(eps)[1]

    def copies(tensor: tf.Tensor | None) -> tf.Tensor | None:  # image i, k times, then image i + 1
        return None if tensor is None else tf.repeat(tensor, k, axis=0)

    mean, logvar = model.encode(x, y)
    logpx_z, logpz, logqz_x = network.elbo_terms(model, copies(x), tf.reshape(eps, [batch * k, -1]), "mc",
                                                 copies(y), posterior=(copies(mean), copies(logvar)))
    return tf.reshape(logpx_z + logpz - logqz_x, [batch, k])


def noise(seed: int, batch: int, purpose: int, shape: Sequence[int]) -> tf.Tensor:
    """The standard normal noise of a batch, the same whatever was evaluated before it."""
    seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, purpose], tf.int64), batch)
    return tf.random.stateless_normal(shape, seed=seed)


def decodes_per_call(model: network.CVAE) -> int:
    """DECODES_PER_CALL, made smaller for a decoder whose widest layer is larger than the
    tutorial's (--filters, larger images), so that a call's memory stays the same."""
    largest = max(int(np.prod(layer.output.shape[1:])) for layer in model.decoder.layers)
    widest = max(largest, TUTORIALS_LARGEST_ACTIVATION)
    return max(1, DECODES_PER_CALL * TUTORIALS_LARGEST_ACTIVATION // widest)


def iwae_bound(model: network.CVAE, x: tf.Tensor, eps: tf.Tensor, y: tf.Tensor | None = None) -> np.ndarray:
    """log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) from the noise eps (batch, K,
    latent), per image: a lower bound on log p(x) that tightens as K grows, and the
    single-sample ELBO when K = 1 (of log p(x|y), given a conditional model's classes y). The
    K draws go in chunks, combined by a running log-sum-exp: memory bounded for any K."""
    k = eps.shape[1]
    chunks = math.ceil(k / max(1, decodes_per_call(model) // len(x)))
    chunk = math.ceil(k / chunks)  # all chunks alike: one trace of log_weights
    total = tf.fill([len(x), 1], -np.inf)
    for start in range(0, k, chunk):
        draws = eps[:, start:start + chunk]
        padded = tf.pad(draws, [[0, 0], [0, chunk - draws.shape[1]], [0, 0]])  # the last chunk
        weights = log_weights(model, x, padded, y)[:, :draws.shape[1]]
        total = tf.reduce_logsumexp(tf.concat([total, weights], axis=1), axis=1, keepdims=True)
    return (total[:, 0] - math.log(k)).numpy()


def kl_health(means: np.ndarray, logvars: np.ndarray) -> dict:
    """Each latent dimension's KL(q(z_j|x) || p(z_j)) in closed form, averaged over the test
    images, and the active units: dimensions whose mean varies over the images by more than
    ACTIVE_VARIANCE (Burda et al. 2016). None active is a posterior collapse."""
    kl = 0.5 * (np.exp(logvars) + means**2 - 1 - logvars)
    return {"kl_per_dimension": kl.mean(axis=0).round(4).tolist(),
            "active_units": int(np.sum(np.var(means, axis=0) > ACTIVE_VARIANCE))}


def mean_and_stderr(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)),
            "stderr": float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0}


def evaluate_run(model: network.CVAE, images: np.ndarray, *, iw_samples: int, kl: str,
                 seed: int, kept: Path | None = None, work: dict | None = None,
                 labels: np.ndarray | None = None, class_prior: np.ndarray | None = None) -> dict:
    """The test figures of `model` on `images`: the ELBO, its two parts, and the IWAE bound.
    The IWAE bound's batches are kept in `kept` as they finish (the work that `work`
    describes), so that the same evaluation asked for again goes on from there. A conditional
    model's figures are given the `labels`; its log p(x) sums p(y) p(x|y) over the classes,
    p(y) the `class_prior`, and it is scored as a classifier, argmax_y p(y) p(x|y)."""
    labels = np.zeros(len(images), np.int32) if labels is None else labels.astype(np.int32)
    given = model.num_classes > 0  # whether the model takes the classes
    parts = [elbo_parts(model, x, noise(seed, i, 0, (len(x), model.latent_dim)), kl, y if given else None)
             for i, (x, y) in enumerate(dataset.make_batches((images, labels),
                                                             dataset.eval_batch_size(model.image_shape)))]
    elbo, logpx_z, kl_term = (np.concatenate([part[j].numpy() for part in parts]) for j in range(3))
    batches = resumable.BatchResults(kept, {"iw_samples": iw_samples, "seed": seed, **(work or {})},
                                     len(images))
    if batches.resumed:
        print(f"Going on from the {batches.resumed} batches of {IWAE_IMAGES} images kept in {kept}")
    done = 0
    for i, x in enumerate(dataset.make_batches(images, IWAE_IMAGES)):
        done += len(x)

        def bounds(x: tf.Tensor = x, i: int = i) -> np.ndarray:  # drawn only for a batch not kept
            draws = noise(seed, i, 1, (len(x), iw_samples, model.latent_dim))  # the same for every class
            return np.stack([iwae_bound(model, x, draws, tf.fill([len(x)], c) if given else None)
                             for c in range(max(1, model.num_classes))], axis=1)
        batches.batch(i, bounds, done)
    by_class = batches.all()  # (images, classes): log p(x|y) for each class y; one column without
    conditional = {}
    if given:
        log_joint = by_class + np.log(class_prior)  # log p(y) + log p(x|y)
        iwae = tf.reduce_logsumexp(log_joint, axis=1).numpy()
        conditional = {"conditional_log_likelihood": {"k": iw_samples, **mean_and_stderr(
                           by_class[np.arange(len(images)), labels])},
                       "accuracy": float(np.mean(np.argmax(log_joint, axis=1) == labels))}
    else:
        iwae = by_class[:, 0]
    dimensions = int(np.prod(model.image_shape))  # bits per dimension: -log2 p(x) per pixel channel
    return {**conditional, "elbo": mean_and_stderr(elbo),
            "reconstruction_log_likelihood": mean_and_stderr(logpx_z),
            "kl": mean_and_stderr(kl_term),
            "iwae_log_likelihood": {"k": iw_samples, **mean_and_stderr(iwae)},
            "bits_per_dim": mean_and_stderr(-iwae / (dimensions * math.log(2)))}


# ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out_dir)
    # speed.logits_layer: a faster kernel for the same logits, where it pays (machinery/speed.py)
    model, settings, checkpoint_path, epoch = export.load_trained_model(
        out_dir, logits_layer=speed.logits_layer())
    files.ensure_out_dir(out_dir)  # writable: say so now, not after the figures

    data = dataset.load_run_data(settings, args.data or settings.data, check=True)
    test_images, test_labels = data.test
    if args.test_size is not None:
        if args.test_size > len(test_images):
            raise cli.UserError(f"--test-size {args.test_size} is larger than the run's "
                                f"{len(test_images)} test images")
        test_images, test_labels = test_images[:args.test_size], test_labels[:args.test_size]
    names, noun = data.class_names, pictures.noun(data.class_names)
    if len(test_images) < 2 or (len(names) > 1 and len(np.unique(test_labels)) < 2):
        raise cli.UserError(f"the interpolation needs test {noun} of two classes; use a larger "
                            f"--test-size")
    test_images = dataset.preprocess(test_images, settings.likelihood).numpy()

    print(distribute.describe(tf.distribute.get_strategy()))
    print(f"Evaluating {checkpoint_path} (epoch {epoch}) on {len(test_images):,} test images, "
          f"K = {args.iw_samples}")

    work = {"checkpoint": checkpoint_path, "data_sha256": settings.data_sha256,
            "test_images": len(test_images), "classes": model.num_classes}  # what kept work must match
    prior = np.bincount(data.train[1], minlength=len(names)) / len(data.train[1])  # p(y), for a conditional
    figures = evaluate_run(model, test_images, iw_samples=args.iw_samples, kl=settings.kl,
                           seed=args.seed, kept=out_dir / KEPT_FILE, work=work, labels=test_labels,
                           class_prior=prior)
    means, logvars = pictures.latent_posteriors(model, test_images, test_labels)
    figures.update(kl_health(means, logvars))
    report = {"checkpoint": checkpoint_path, "epoch": epoch, "data": data.source,
              "dataset": settings.dataset, "test_images": len(test_images),
              "image_shape": settings.image_shape, "likelihood": settings.likelihood,
              "kl_estimator": settings.kl, "beta": settings.beta, "seed": args.seed, **figures}
    with files.atomic_path(out_dir / "evaluation.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")

    def line(name: str, figure: dict) -> str:
        return f"  {name:38s} {figure['mean']:9.2f} +- {figure['stderr']:.2f}"

    if settings.beta != 1:
        print(f"(trained with --beta {settings.beta:g}; these are the ELBO and its parts, B = 1)")
    print(line("ELBO", figures["elbo"]))
    print(line("  reconstruction log-likelihood", figures["reconstruction_log_likelihood"]))
    print(line("  KL(q(z|x) || p(z))", figures["kl"]))
    print(line(f"log p(x), IWAE bound with K = {args.iw_samples}", figures["iwae_log_likelihood"]))
    if model.num_classes:  # log p(x) sums p(y) p(x|y), a bound per class
        print(line("log p(x|y), of the true class", figures["conditional_log_likelihood"]))
        print(f"  {'accuracy, argmax_y p(y) p(x|y)':38s} {figures['accuracy']:9.4f}")
    print("(nats per image; +- one standard error over the test images)")
    per_dimension = ", ".join(f"{kl:.2f}" for kl in figures["kl_per_dimension"][:8])
    print(f"  {'active latent dimensions (Var_x E[z] > 0.01)':38s} {figures['active_units']:9d} of "
          f"{model.latent_dim}; KL per dimension (closed form): {per_dimension}"
          f"{' ...' * (model.latent_dim > 8)}")
    if figures["active_units"] == 0:
        print(f"  {POSTERIOR_COLLAPSE}")
    what = "binarized pixel" if settings.likelihood == "bernoulli" else "8-bit pixel channel"
    print(f"  {'-log2 p(x) per ' + what:38s} {figures['bits_per_dim']['mean']:9.4f} bits/dim")

    pictures.save_reconstructions(model, test_images, out_dir / "reconstructions.png", noun,
                                  labels=test_labels)
    pictures.save_prior_samples(model, out_dir / "prior_samples.png", args.seed)
    pictures.save_latent_space(means, test_labels, out_dir / "latent_space.png", names)
    shown = projector.write(files.ensure_out_dir(out_dir / "tensorboard"), means, test_labels, names,
                            test_images)
    pictures.save_training_curves(records.read_metrics(out_dir / "metrics.csv"),
                                  out_dir / "training_curves.png")
    written = ["evaluation.json", "reconstructions.png", "prior_samples.png", "latent_space.png",
               "training_curves.png"]
    if model.num_classes:  # a walk across classes, and the manifold, need a class to decode with
        pictures.save_analogies(model, test_images[:pictures.ANALOGY_ROWS], test_labels,
                                out_dir / "analogies.png", names)
        written.append("analogies.png")
    else:
        pictures.save_interpolation(model, test_images, test_labels, out_dir / "interpolation.png", names)
        written.append("interpolation.png")
    if settings.latent_dim == 2 and not model.num_classes:
        pictures.save_latent_manifold(model, out_dir / "latent_manifold.png")
        written.append("latent_manifold.png")
    print(f"Wrote {', '.join(written)} in {out_dir}/, and the latent means of {shown:,} test images "
          f"for TensorBoard's Projector (tensorboard --logdir {out_dir})")


if __name__ == "__main__":
    cli.run(main)
