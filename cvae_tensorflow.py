# %% [markdown]
# # Convolutional Variational Autoencoder
#
# The TensorFlow tutorial, top to bottom, as one notebook-style script. It trains a
# convolutional variational autoencoder (VAE) on binarized MNIST, then draws digits
# from what it learned. The code lives in three modules, and each cell below calls them:
# `dataset.py` (data), `network.py` (model and loss), `train.py` (loop and pictures).
#
# Run it as `python cvae_tensorflow.py` (it takes train.py's flags, such as
# `--data mnist.npz` for an offline copy), or open it as a notebook: Jupyter with
# jupytext, VS Code and PyCharm all read the `# %%` cells.

# %%
import sys
from pathlib import Path

import tensorflow as tf

import cli
import dataset
import network
import train


def show(path: Path) -> None:
    """Show a picture inline in a notebook; name it when run as a script."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Image(filename=str(path)))
    else:
        print(f"See {path}")


cli.setup_script_without_main()  # bad input: one line, not a traceback

# train.py's flags, with the tutorial's recipe as their defaults. parse_known_args,
# because a notebook kernel passes arguments of its own. A notebook is re-run from the top,
# so each run replaces the last one in its own folder (another --out-dir is never replaced
# without --overwrite).
NOTEBOOK_DIR = "output/notebook"
parser = train.build_parser()
parser.set_defaults(out_dir=NOTEBOOK_DIR)
args, _ = parser.parse_known_args()
args.overwrite = args.overwrite or (args.out_dir == NOTEBOOK_DIR and not args.resume)
# On a CPU, each batch is computed in two pieces side by side (--shards; see
# train.setup_shards). TensorFlow takes its thread settings only before it starts.
shards = train.setup_shards(args.shards)

# %% [markdown]
# ## Load the MNIST dataset
#
# Each 28x28 image is a grid of grey levels. We binarize them statically (a pixel is 1
# where its grey level is above half, else 0) and model each pixel as a Bernoulli
# variable. `train.prepare_run` loads and checks MNIST (`dataset.load_mnist`), binarizes
# it (`dataset.binarize`) and sets up the run folder.

# %%
run = train.prepare_run(args, cli.explicit_flags(parser, sys.argv[1:]))
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
# ## The loss and the optimizer
#
# VAEs train by maximizing the evidence lower bound (ELBO) on the log-likelihood:
# log p(x) >= E_q[log p(x|z) + log p(z) - log q(z|x)]. We estimate it with a single
# sample z from q(z|x) (`network.compute_loss` returns its negative, the loss).
# Analytic KL terms exist for these Gaussians, but the single-sample Monte Carlo
# estimate keeps all three terms in one formula, as in the tutorial.

# %%
optimizer = tf.keras.optimizers.Adam(config["learning_rate"])
print(f"loss of the untrained model on 32 images: "
      f"{float(network.compute_loss(model, train_images[:32])):.1f}")

# %% [markdown]
# ## Training
#
# Each step encodes a batch, draws z with the reparameterization trick, decodes it, and
# takes a gradient step on the loss (a custom `tf.GradientTape` step, compiled with
# `tf.function`, 50 steps a call: `train.make_train_function`). Before training and
# after each epoch, 16 fixed test digits are passed through the model and saved as a
# 4x4 grid.

# %%
metrics = train.fit(model, optimizer, train_images, test_images, epochs=config["epochs"],
                    batch_size=config["batch_size"], seed=config["seed"], out_dir=out_dir,
                    resume_from=run.resume_from, kl=config["kl"], shards=shards)

# %% [markdown]
# ## A generated image from the last training epoch

# %%
show(train.grid_path(out_dir, config["epochs"]))

# %% [markdown]
# ## An animated GIF of all the saved images

# %%
train.save_gif([train.grid_path(out_dir, epoch) for epoch in range(config["epochs"] + 1)],
               out_dir / "cvae.gif")
show(out_dir / "cvae.gif")

# %% [markdown]
# ## A 2D manifold of digits from the latent space
#
# With a two-dimensional latent space we can decode a grid of points spread evenly
# over the prior (its quantiles 0.05..0.95 on each axis) and watch the digits morph
# into one another.

# %%
if config["latent_dim"] == 2:
    train.save_latent_manifold(model, out_dir / "latent_manifold.png")
    show(out_dir / "latent_manifold.png")
else:
    print("The manifold needs a two-dimensional latent space (--latent-dim 2).")
