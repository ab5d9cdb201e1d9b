"""The test set's latent means in TensorBoard's Embedding Projector (PCA, t-SNE, UMAP), for
any latent_dim: the means as a TSV, their classes, a sprite of the images, and the
projector_config.pbtxt that tells TensorBoard where they are."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from machinery import files

import imageio.v3 as iio
import numpy as np
from tensorboard.plugins import projector

SPRITE_LIMIT = 8192  # pixels a side: the largest sprite the Projector shows
TENSOR_NAME = "latent_means"
FILES = ("latent_means.tsv", "metadata.tsv", "sprite.png")


def sprite(images: np.ndarray) -> np.ndarray:
    """Images of pixel values 0..1, (N, H, W, C), as one uint8 square grid, row by row."""
    count, height, width, channels = images.shape
    side = int(np.ceil(np.sqrt(count)))
    cells = np.full((side * side, height, width, channels), 255, np.uint8)  # white beyond the last
    for start in range(0, count, 1000):  # to uint8 a thousand at a time: no float copy of them all
        stop = min(start + 1000, count)
        cells[start:stop] = np.round(np.clip(images[start:stop], 0, 1) * 255)
    grid = cells.reshape(side, side, height, width, channels).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(side * height, side * width, channels)
    return grid[..., 0] if channels == 1 else grid


def most_points(image_shape: Sequence[int]) -> int:
    """How many images a sprite within SPRITE_LIMIT x SPRITE_LIMIT holds."""
    height, width = image_shape[:2]
    return (SPRITE_LIMIT // max(height, width)) ** 2


def write(folder: Path, means: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
          images: np.ndarray) -> int:
    """Write the first points that a sprite can show into `folder` (a TensorBoard run's);
    return how many."""
    count = min(len(means), most_points(images.shape[1:]))
    with files.atomic_path(folder / FILES[0]) as tmp:
        np.savetxt(tmp, means[:count], delimiter="\t", fmt="%.6g")
    with files.atomic_path(folder / FILES[1]) as tmp:
        rows = [f"{label}\t{class_names[label]}" for label in labels[:count].tolist()]
        tmp.write_text("label\tclass\n" + "\n".join(rows) + "\n", encoding="utf-8")
    with files.atomic_path(folder / FILES[2]) as tmp:
        iio.imwrite(tmp, sprite(images[:count]))
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name, embedding.tensor_path = TENSOR_NAME, FILES[0]
    embedding.metadata_path, embedding.sprite.image_path = FILES[1], FILES[2]
    embedding.sprite.single_image_dim.extend([images.shape[2], images.shape[1]])  # width, height
    projector.visualize_embeddings(str(folder), config)  # projector_config.pbtxt
    return count
