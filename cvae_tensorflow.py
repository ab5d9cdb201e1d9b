# %% [markdown]
# # Convolutional Variational Autoencoder
#
# The TensorFlow tutorial, top to bottom, as one notebook-style script. It trains a
# convolutional variational autoencoder (VAE) on binarized MNIST, then draws digits
# from what it learned. The tutorial's `train_step` and training loop are in the cells
# below; the rest comes from the modules: `dataset.py` (data), `network.py` (the model and
# `compute_loss`), `pictures.py` (the grid, the GIF, the manifold), `run_folder.py` and
# `run_log.py` (the run folder, checkpoints and metrics).
#
# Run it as `python cvae_tensorflow.py` (it takes train.py's flags, such as
# `--data mnist.npz` for an offline copy), or open `cvae_tensorflow.ipynb`, the same cells
# as a notebook (made from this file by jupytext), in Jupyter, VS Code or Colab: it needs
# the project's folder around it (see README.md). It takes one step per `tf.function`
# call, as the tutorial does; `python train.py` compiles 50 a call.

# %%
import os
import shlex
import sys
import time
from pathlib import Path

try:  # the project's modules sit in the notebook's folder, where Jupyter starts its kernel
    import cli  # first: it loads TensorFlow without its start-up logs
except ModuleNotFoundError as error:  # a notebook opened alone (Colab), or nothing installed yet
    raise ModuleNotFoundError(
        f"{error}: this notebook runs in the project's folder, beside its modules; clone or upload "
        "that folder, open the notebook there (on Colab, %cd into it) and run pip install -r requirements.txt"
    ) from None

import numpy as np
import tensorflow as tf

import dataset
import distribute
import export
import network
import pictures
import run_folder
import run_log
import train


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (IPython), not as a script."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def show(path: Path) -> None:
    """Show a picture inline in a notebook; name it when run as a script."""
    if in_notebook():
        from IPython.display import Image, display

        display(Image(filename=str(path)))
    else:
        print(f"See {path}")


cli.setup_script_without_main()  # bad input: one line, not a traceback

# train.py's flags, with the tutorial's recipe as defaults: from the command line, or in a
# notebook (whose kernel has its own) from CVAE_FLAGS, e.g. %env CVAE_FLAGS=--epochs 1.
# A notebook re-run replaces its last run in output/notebook, never another --out-dir.
NOTEBOOK_DIR = "output/notebook"
parser = train.build_parser()
parser.prog = "cvae_tensorflow.py"
parser.set_defaults(out_dir=NOTEBOOK_DIR)
argv = shlex.split(os.environ.get("CVAE_FLAGS", "")) if in_notebook() else sys.argv[1:]
args = parser.parse_args(argv)
args.overwrite = args.overwrite or (args.out_dir == NOTEBOOK_DIR and not args.resume)
if args.strategy != "default" or args.shards:
    raise cli.UserError("the notebook runs the tutorial's step on one device, the batch whole; "
                        "--strategy and --shards are for python train.py")
print(distribute.describe(tf.distribute.get_strategy()))

# %% [markdown]
# ## Load the MNIST dataset
#
# Each 28x28 image is a grid of grey levels. We binarize them statically (a pixel is 1
# where its grey level is above half, else 0) and model each pixel as a Bernoulli
# variable. `run_folder.prepare_run` loads and checks MNIST (`dataset.load_mnist`),
# binarizes it (`dataset.binarize`) and sets up the run folder.

# %%
run = run_folder.prepare_run(args, cli.explicit_flags(parser, argv))
config, out_dir, train_images, test_images = run.config, run.out_dir, run.train_images, run.test_images
print(f"train {train_images.shape}, test {test_images.shape}, values {{0, 1}}; writing to {out_dir}/")
dataset.save_preview(train_images[:32], run.train_labels[:32], out_dir / "dataset_preview.png")
show(out_dir / "dataset_preview.png")

# %% [markdown]
# ## The encoder and decoder networks
#
# The **encoder** (inference network) takes an image x and outputs the mean and the
# log-variance of a diagonal Gaussian q(z|x) over the latent code z. The **decoder**
# (generative network) takes z and outputs the logits of p(x|z), one Bernoulli per pixel.
# The prior p(z) is a standard normal.
#
# **Reparameterization trick.** To backpropagate through a random draw of z, we draw
# the noise separately: z = mu + sigma * eps, with sigma = exp(logvar / 2) and
# eps ~ N(0, I). The randomness sits in eps, and z stays differentiable in mu and sigma.

# %%
tf.config.experimental.enable_op_determinism()  # same seed, same run (see train.py)
tf.keras.utils.set_random_seed(config["seed"])
model = network.CVAE(config["latent_dim"], config["precision"])
model.encoder.summary()
model.decoder.summary()

# %% [markdown]
# ## Define the loss function and the optimizer
#
# VAEs train by maximizing the evidence lower bound (ELBO) on the log-likelihood:
# log p(x) >= E_q[log p(x|z) + log p(z) - log q(z|x)]. We estimate it with a single
# sample z from q(z|x): `network.compute_loss` returns its negative, the loss, built from
# `network.log_normal_pdf` as in the tutorial. Analytic KL terms exist for these
# Gaussians (`--kl analytic`), but the single-sample Monte Carlo estimate keeps all three
# terms in one formula.
#
# `train_step` computes the loss and its gradients with a `tf.GradientTape`, then updates
# the weights. Here it takes the batch's noise `eps` from the run's random generator, so
# that a seed repeats a run. (train.py's `train_step` is this one, compiled 50 steps a
# call, with each batch in two shards on a CPU.)

# %%
optimizer = tf.keras.optimizers.Adam(config["learning_rate"])
print(f"loss of the untrained model on 32 images: "
      f"{float(network.compute_loss(model, train_images[:32])):.1f}")


@tf.function
def train_step(model, x, optimizer, eps):
    """Executes one training step and returns the loss."""
    with tf.GradientTape() as tape:
        loss = network.compute_loss(model, x, eps, config["kl"])
    gradients = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return loss


# %% [markdown]
# ## Training
#
# Before training and after each epoch, 16 fixed test digits (`test_sample`) are encoded,
# sampled with fixed noise (`random_vector_for_generation`) and decoded into a 4x4 grid.
# `run_log.RunLog` holds these and the random generator of all the noise, and writes
# metrics.csv, TensorBoard and a checkpoint after each epoch, so `--resume` continues a
# stopped notebook run.

# %%
epochs = config["epochs"]
latent_dim = config["latent_dim"]
# num_examples_to_generate: pictures.NUM_EXAMPLES_TO_GENERATE, 16 digits in a 4x4 grid
log = run_log.RunLog(model, optimizer, test_images, config["seed"], out_dir)
test_sample, random_vector_for_generation = log.test_sample, log.sample_eps
train_dataset = tf.constant(train_images)  # shuffled and batched every epoch, below
test_dataset = dataset.make_batches(test_images, dataset.EVAL_BATCH_SIZE)


def end_epoch(epoch: int, row: dict, loss_points: list[tuple[int, float]] = ()) -> None:
    pictures.generate_and_save_images(model, epoch, test_sample, random_vector_for_generation, out_dir)
    log.end_epoch(epoch, row, loss_points)


# %%
if run.resume_from:
    done = log.restore(run.resume_from, epochs)
else:
    done = 0
    elbo = train.test_set_elbo(model, test_dataset, log.rng, config["kl"])
    end_epoch(0, {"epoch": 0, "test_elbo": round(elbo, 4)})

for epoch in range(done + 1, epochs + 1):
    # A progress bar, the epoch's mean loss, and a stop on a non-finite loss.
    progress = run_log.EpochProgress(epoch, len(train_images), config["batch_size"],
                                     int(optimizer.iterations), out_dir)
    start_time = time.time()
    epoch_dataset = dataset.make_batches(
        dataset.epoch_images(train_dataset, config["seed"], epoch), config["batch_size"])
    for step, train_x in enumerate(epoch_dataset):
        eps = log.rng.normal((len(train_x), latent_dim))
        loss = train_step(model, train_x, optimizer, eps)
        progress.update(step, np.atleast_1d(loss.numpy()))
    end_time = time.time()

    elbo = train.test_set_elbo(model, test_dataset, log.rng, config["kl"])
    seconds = end_time - start_time
    print(f"Epoch: {epoch}, Test set ELBO: {elbo:.2f}, "
          f"time elapse for current epoch: {seconds:.1f} s")
    end_epoch(epoch, progress.row(elbo, seconds), progress.loss_points)

# %% [markdown]
# ## Display a generated image from the last training epoch


# %%
def display_image(epoch_no: int) -> None:
    show(pictures.grid_path(out_dir, epoch_no))


display_image(epochs)

# %% [markdown]
# ## Display an animated GIF of all the saved images

# %%
anim_file = out_dir / "cvae.gif"
pictures.save_gif([pictures.grid_path(out_dir, epoch) for epoch in range(epochs + 1)], anim_file)
show(anim_file)

# %% [markdown]
# ## Display a 2D manifold of digits from the latent space
#
# With a two-dimensional latent space we can decode a grid of points spread evenly
# over the prior (its quantiles 0.05..0.95 on each axis) and watch the digits morph
# into one another.

# %%
if latent_dim == 2:
    pictures.save_latent_images(model, out_dir / "latent_manifold.png")
    show(out_dir / "latent_manifold.png")
else:
    print("The manifold needs a two-dimensional latent space (--latent-dim 2).")

# %% [markdown]
# ## Save the trained model
#
# Beyond the tutorial: the model in Keras' format (`cvae.keras`, for
# `keras.saving.load_model`) and as a SavedModel for plain TensorFlow, in the run folder.
# `python generate.py --out-dir output/notebook` then draws new digits from it.

# %%
export.export_model(model, out_dir)
print(f"Wrote {out_dir / network.KERAS_FILE} and {out_dir / network.SAVEDMODEL_DIR}/")
