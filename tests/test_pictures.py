"""What the pictures show, not only that they are PNGs: the images each figure is given
(caught at pictures.image_grid) against the model's own."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mnist_arrays

import dataset
import network
import pictures


@pytest.fixture
def grids(monkeypatch) -> list:
    """The (images, columns, titles) of every grid drawn, in order."""
    drawn = []
    original = pictures.image_grid
    monkeypatch.setattr(pictures, "image_grid", lambda figure, images, columns, titles=(): (
        drawn.append((np.asarray(images), columns, list(titles))), original(figure, images, columns, titles)))
    return drawn


def test_the_interpolation_walks_from_one_test_images_mean_to_anothers(grids, tmp_path):
    tf.keras.utils.set_random_seed(3)
    model = network.CVAE(2)
    arrays = make_mnist_arrays(num_train=1, num_test=12, seed=4)
    images, labels = dataset.binarize(arrays["x_test"]).numpy(), arrays["y_test"]
    pictures.save_interpolation(model, images, labels, tmp_path / "interpolation.png", steps=5)
    (row, columns, titles), = grids
    other = int(np.flatnonzero(labels != labels[0])[0])  # the first test image of another class
    np.testing.assert_array_equal(row[0], images[0])  # the ends: the two test images themselves
    np.testing.assert_array_equal(row[-1], images[other])
    means = model.encode(images[[0, other]])[0].numpy()
    line = np.linspace(means[0], means[1], 5)  # between them: the decoder's images along the line
    np.testing.assert_allclose(row[1:-1], model.sample(tf.constant(line)).numpy(), atol=1e-6)
    assert columns == 7 and titles[0] == f"test {labels[0]}" and titles[-1] == f"test {labels[other]}"


def test_the_analogies_decode_each_style_with_every_class_in_its_column(grids, tmp_path):
    tf.keras.utils.set_random_seed(3)
    model = network.CVAE(2, num_classes=10)
    arrays = make_mnist_arrays(num_train=1, num_test=3, seed=5)
    images, labels = dataset.binarize(arrays["x_test"]).numpy(), arrays["y_test"]
    pictures.save_analogies(model, images, labels, tmp_path / "analogies.png", pictures.DIGITS)
    (grid, columns, titles), = grids
    assert columns == 11 and titles == ["test image", *pictures.DIGITS]
    rows = grid.reshape(3, 11, 28, 28, 1)
    styles = model.encode(images, tf.constant(labels, tf.int32))[0]
    for row, image, style in zip(rows, images, styles):
        np.testing.assert_array_equal(row[0], image)
        for digit in range(10):  # column 1 + d: the style decoded as the class d
            expected = model.sample(style[tf.newaxis], tf.constant([digit]))[0].numpy()
            np.testing.assert_allclose(row[1 + digit], expected, atol=1e-6)
