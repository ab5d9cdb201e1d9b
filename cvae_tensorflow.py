# %% [markdown]
# # Convolutional Variational Autoencoder
#
# The TensorFlow [tutorial](https://www.tensorflow.org/tutorials/generative/cvae), cell by cell. Open
# it alone on Colab (File > Upload notebook) or in Jupyter and run all; pictures go to the current folder,
# and offline, `CVAE_DATA` names a Keras-format `mnist.npz`. `network.py` holds the same model and loss.

# %%
import glob
import os
import sys
import time
import warnings

import imageio.v2 as imageio
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import PIL
import tensorflow as tf
from IPython import display

IN_NOTEBOOK = "ipykernel" in sys.modules
if not IN_NOTEBOOK:  # run as a script: the pictures go to files, and no window opens
    matplotlib.use("Agg")
    warnings.filterwarnings("ignore", "FigureCanvasAgg is non-interactive")
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # GPU memory as needed: room for !python train.py

# %% [markdown]
# ## Settings
#
# The tutorial's, then its "Next steps"; a later cell may override them (papermill's tag).

# %% tags=["parameters"]
epochs = 10
train_size = 60000
batch_size = 32
test_size = 10000
filters = None  # "Next steps": e.g. 512 in every convolution but the last (None: 32, 64)
dataset = "mnist"  # or "fashion_mnist" (downloaded: CVAE_DATA is MNIST's); colour: train.py --dataset cifar10

# %% [markdown]
# ## Load the MNIST dataset
#
# Each pixel (0-255) is modelled as a Bernoulli variable: the images are statically binarized.

# %%
if os.environ.get("CVAE_DATA") and dataset == "mnist":  # offline: a local copy of MNIST's file
    if not os.path.isfile(os.environ["CVAE_DATA"]):
        print(f"CVAE_DATA={os.environ['CVAE_DATA']}: no such file", file=sys.stderr)
        sys.exit(2)
    with np.load(os.environ["CVAE_DATA"]) as mnist:
        train_images, test_images = mnist["x_train"], mnist["x_test"]
else:
    (train_images, _), (test_images, _) = getattr(tf.keras.datasets, dataset).load_data()
train_images, test_images = train_images[:train_size], test_images[:test_size]


# %%
def preprocess_images(images):
    images = images.reshape((images.shape[0], 28, 28, 1)) / 255.
    return np.where(images > .5, 1.0, 0.0).astype('float32')


train_images = preprocess_images(train_images)
test_images = preprocess_images(test_images)

# %% [markdown]
# ## Use *tf.data* to batch and shuffle the data

# %%
train_dataset = (tf.data.Dataset.from_tensor_slices(train_images)
                 .shuffle(train_size).batch(batch_size))
test_dataset = (tf.data.Dataset.from_tensor_slices(test_images)
                .shuffle(test_size).batch(batch_size))


# %% [markdown]
# ## Define the encoder and decoder networks with *tf.keras.Sequential*
#
# The encoder gives q(z|x), a diagonal Gaussian (mean, log-variance); the decoder, p(x|z),
# a Bernoulli per pixel (logits); the prior p(z) is N(0, I). Reparameterization trick:
# z = mu + sigma * eps, sigma = exp(logvar / 2), eps ~ N(0, I), differentiable in mu, sigma.

# %%
class CVAE(tf.keras.Model):
    """Convolutional variational autoencoder."""

    def __init__(self, latent_dim, filters=None):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = tf.keras.Sequential(
            [
                tf.keras.layers.InputLayer(shape=(28, 28, 1)),  # Keras 3 calls input_shape shape
                tf.keras.layers.Conv2D(
                    filters=filters or 32, kernel_size=3, strides=(2, 2), activation='relu'),
                tf.keras.layers.Conv2D(
                    filters=filters or 64, kernel_size=3, strides=(2, 2), activation='relu'),
                tf.keras.layers.Flatten(),
                # No activation
                tf.keras.layers.Dense(latent_dim + latent_dim),
            ]
        )
        self.decoder = tf.keras.Sequential(
            [
                tf.keras.layers.InputLayer(shape=(latent_dim,)),
                tf.keras.layers.Dense(units=7*7*32, activation=tf.nn.relu),
                tf.keras.layers.Reshape(target_shape=(7, 7, 32)),
                tf.keras.layers.Conv2DTranspose(
                    filters=filters or 64, kernel_size=3, strides=2, padding='same',
                    activation='relu'),
                tf.keras.layers.Conv2DTranspose(
                    filters=filters or 32, kernel_size=3, strides=2, padding='same',
                    activation='relu'),
                # No activation
                tf.keras.layers.Conv2DTranspose(
                    filters=1, kernel_size=3, strides=1, padding='same'),
            ]
        )

    @tf.function
    def sample(self, eps=None):
        if eps is None:
            eps = tf.random.normal(shape=(100, self.latent_dim))
        return self.decode(eps, apply_sigmoid=True)

    def encode(self, x):
        mean, logvar = tf.split(self.encoder(x), num_or_size_splits=2, axis=1)
        return mean, logvar

    def reparameterize(self, mean, logvar):
        eps = tf.random.normal(shape=mean.shape)
        return eps * tf.exp(logvar * .5) + mean

    def decode(self, z, apply_sigmoid=False):
        logits = self.decoder(z)
        if apply_sigmoid:
            probs = tf.sigmoid(logits)
            return probs
        return logits


# %% [markdown]
# ## Define the loss function and the optimizer
#
# VAEs maximize the evidence lower bound, log p(x) >= ELBO = E_q(z|x)[log p(x, z) / q(z|x)],
# here its single-sample Monte Carlo estimate log p(x|z) + log p(z) - log q(z|x), z ~ q(z|x).

# %%
optimizer = tf.keras.optimizers.Adam(1e-4)


def log_normal_pdf(sample, mean, logvar, raxis=1):
    log2pi = tf.math.log(2. * np.pi)
    return tf.reduce_sum(
        -.5 * ((sample - mean) ** 2. * tf.exp(-logvar) + logvar + log2pi),
        axis=raxis)


def compute_loss(model, x):
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar)
    x_logit = model.decode(z)
    cross_ent = tf.nn.sigmoid_cross_entropy_with_logits(logits=x_logit, labels=x)
    logpx_z = -tf.reduce_sum(cross_ent, axis=[1, 2, 3])
    logpz = log_normal_pdf(z, 0., 0.)
    logqz_x = log_normal_pdf(z, mean, logvar)
    return -tf.reduce_mean(logpx_z + logpz - logqz_x)


@tf.function
def train_step(model, x, optimizer):
    """Executes one training step and returns the loss.

    This function computes the loss and gradients, and uses the latter to
    update the model's parameters.
    """
    with tf.GradientTape() as tape:
        loss = compute_loss(model, x)
    gradients = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))


# %% [markdown]
# ## Training

# %%
# set the dimensionality of the latent space to a plane for visualization later
latent_dim = 2
num_examples_to_generate = 16

# keeping the random vector constant for generation (prediction) so
# it will be easier to see the improvement.
random_vector_for_generation = tf.random.normal(
    shape=[num_examples_to_generate, latent_dim])
model = CVAE(latent_dim, filters)


# %%
def generate_and_save_images(model, epoch, test_sample):
    mean, logvar = model.encode(test_sample)
    z = model.reparameterize(mean, logvar)
    predictions = model.sample(z)
    fig = plt.figure(figsize=(4, 4))  # noqa: F841 (the tutorial's line)

    for i in range(predictions.shape[0]):
        plt.subplot(4, 4, i + 1)
        plt.imshow(predictions[i, :, :, 0], cmap='gray')
        plt.axis('off')

    # tight_layout minimizes the overlap between 2 sub-plots
    plt.savefig(f'image_at_epoch_{epoch:04d}.png')
    plt.show()


# %%
# Pick a sample of the test set for generating output images
assert batch_size >= num_examples_to_generate
for test_batch in test_dataset.take(1):
    test_sample = test_batch[0:num_examples_to_generate, :, :, :]

# %%
generate_and_save_images(model, 0, test_sample)

for epoch in range(1, epochs + 1):
    start_time = time.time()
    for train_x in train_dataset:
        train_step(model, train_x, optimizer)
    end_time = time.time()

    loss = tf.keras.metrics.Mean()
    for test_x in test_dataset:
        loss(compute_loss(model, test_x))
    elbo = -loss.result()
    if IN_NOTEBOOK:
        display.clear_output(wait=False)
    print(f'Epoch: {epoch}, Test set ELBO: {elbo}, time elapse for current epoch: {end_time - start_time}'
          )
    generate_and_save_images(model, epoch, test_sample)


# %% [markdown]
# ### Display a generated image from the last training epoch

# %%
def display_image(epoch_no):
    return PIL.Image.open(f'image_at_epoch_{epoch_no:04d}.png')


plt.imshow(display_image(epoch))
plt.axis('off')  # Display images

# %% [markdown]
# ### Display an animated GIF of all the saved images

# %%
anim_file = 'cvae.gif'

with imageio.get_writer(anim_file, mode='I') as writer:
    filenames = glob.glob('image*.png')
    filenames = sorted(filenames)
    for filename in filenames:
        image = imageio.imread(filename)
        writer.append_data(image)
    image = imageio.imread(filename)
    writer.append_data(image)
if IN_NOTEBOOK:  # the tutorial shows it with tensorflow_docs, which Colab lacks
    display.display(display.Image(filename=anim_file))


# %% [markdown]
# ### Display a 2D manifold of digits from the latent space

# %%
def plot_latent_images(model, n, digit_size=28):
    """Plots n x n digit images decoded from the latent space."""

    # tf.math.ndtri: the tutorial's tfp.distributions.Normal(0, 1).quantile, without TFP
    grid_x = tf.math.ndtri(np.linspace(0.05, 0.95, n))
    grid_y = tf.math.ndtri(np.linspace(0.05, 0.95, n))
    image_width = digit_size*n
    image_height = image_width
    image = np.zeros((image_height, image_width))

    for i, yi in enumerate(grid_x):
        for j, xi in enumerate(grid_y):
            z = np.array([[xi, yi]])
            x_decoded = model.sample(z)
            digit = tf.reshape(x_decoded[0], (digit_size, digit_size))
            image[i * digit_size: (i + 1) * digit_size,
                  j * digit_size: (j + 1) * digit_size] = digit.numpy()

    plt.figure(figsize=(10, 10))
    plt.imshow(image, cmap='Greys_r')
    plt.axis('Off')
    plt.show()


# %%
plot_latent_images(model, 20)
