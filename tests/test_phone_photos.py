"""A folder as phone photos meet it (issue 39, item 6): EXIF orientation, large JPEGs decoded
at a smaller scale, a split with a seed of its own, sizes refused before decoding, and a
cache that checks its bytes."""

from __future__ import annotations

from machinery import image_decoding, image_folder
from machinery.cli import UserError

import numpy as np
import pytest
from conftest import make_mnist_arrays, train_settings
from PIL import Image, ImageOps
from test_image_folder import SETTINGS, make_folder

import dataset


def halves(width: int, height: int) -> Image.Image:
    """Red on the left half, blue on the right."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :width // 2, 0] = 255
    pixels[:, width // 2:, 2] = 255
    return Image.fromarray(pixels)


def test_a_photo_comes_out_upright_as_its_exif_orientation_says(tmp_path):
    """Orientation 6: the camera's 40x20 picture is shown turned a quarter clockwise, 20x40,
    its left half on top."""
    exif = Image.Exif()
    exif[image_decoding.EXIF_ORIENTATION] = 6
    path = tmp_path / "turned.jpg"
    halves(40, 20).save(path, exif=exif, quality=95)
    upright = image_decoding.decode(path, (16, 8), 3)  # (height, width)
    assert upright.shape == (16, 8, 3)
    assert upright[:6, :, 0].min() > 200 and upright[:6, :, 2].max() < 60  # red on top
    assert upright[10:, :, 2].min() > 200 and upright[10:, :, 0].max() < 60  # blue below
    with Image.open(path) as image:
        assert image.size == (40, 20) and image_decoding.upright_size(image) == (20, 40)
    # A folder of such photos has one size, as they are shown: no --image-size needed.
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        halves(40, 20).save(folder / f"{i}.jpg", exif=exif)
    data = dataset.load_data(str(folder), folder=image_folder.Settings(test_fraction=0.25))
    assert data.train[0].shape[1:] == (40, 20, 3)


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_covers_the_size(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (12, 15, 3), dtype=np.uint8))
    path = tmp_path / "photo.jpg"
    small.resize((2000, 1600), Image.Resampling.BICUBIC).save(path, quality=92)  # smooth, as a photo
    fitted = []
    fit = ImageOps.fit
    monkeypatch.setattr(image_decoding.ImageOps, "fit", lambda image, *a, **k: fitted.append(image.size)
                        or fit(image, *a, **k))
    drafted = image_decoding.decode(path, (32, 32), 3)
    assert fitted == [(250, 200)]  # 1/8 of each side: still over 32, where 1/16 would not be
    with Image.open(path) as image:  # the whole photo, decoded in full, resized the same way
        whole = np.asarray(ImageOps.fit(image.convert("RGB"), (32, 32), Image.Resampling.BILINEAR))
    assert np.abs(drafted.astype(int) - whole).mean() < 3  # levels of 255: the same picture
    # A JPEG under twice the size, grey from colour: decoded as before, in full and then made grey.
    small.resize((30, 30), Image.Resampling.BICUBIC).save(tmp_path / "small.jpg", quality=92)
    with Image.open(tmp_path / "small.jpg") as image:
        expected = np.asarray(ImageOps.fit(image.convert("L"), (16, 16), Image.Resampling.BILINEAR))
    grey = image_decoding.decode(tmp_path / "small.jpg", (16, 16), 1)
    np.testing.assert_array_equal(grey[..., 0], expected)
    # A size it must not shrink under: 1/2 is the most, for a 1000-pixel side.
    fitted.clear()
    image_decoding.decode(path, (700, 1000), 3)
    assert fitted == [(1000, 800)]


def test_the_split_has_a_seed_of_its_own_that_every_training_seed_shares(tmp_path):
    photos = make_folder(tmp_path / "photos")
    folder_settings = [image_folder.settings(train_settings("--seed", seed, "--image-size", "16"))
                       for seed in ("1", "2")]
    assert folder_settings[0] == folder_settings[1]
    assert folder_settings[0].seed == image_folder.SPLIT_SEED
    other_split = image_folder.settings(train_settings("--split-seed", "5", "--image-size", "16"))
    data = [dataset.load_data(str(photos), folder=settings) for settings in (*folder_settings, other_split)]
    assert data[0].fingerprint == data[1].fingerprint != data[2].fingerprint
    # A run made before --split-seed drew its split with --seed: its config.json still does.
    older = {"seed": 7, "image_size": [16, 16], "test_fraction": 0.1}
    assert image_folder.settings(older).seed == 7


def test_sizes_out_of_range_are_refused_before_the_folder_is_decoded(tmp_path, monkeypatch):
    photos = make_folder(tmp_path / "photos")  # 18 training images and 6 test images with SETTINGS
    monkeypatch.setattr(image_decoding, "decode", lambda *args: pytest.fail("decoded"))
    for sizes, expected in (((19, None), "--train-size 19 is larger than the 18 train images"),
                            ((None, 7), "--test-size 7 is larger than the 6 test images")):
        with pytest.raises(UserError, match=expected):
            dataset.load_data(str(photos), *sizes, folder=SETTINGS)
    assert not list(image_decoding.cache_folder().glob("*.npy"))
    with pytest.raises(UserError, match="--test-size 99 is larger than the 32 test images"):
        np_file = tmp_path / "mnist.npz"
        np.savez(np_file, **make_mnist_arrays())
        dataset.load_data(str(np_file), test_size=99)


def test_a_damaged_cache_is_decoded_again_and_said_so(tmp_path, capsys):
    photos = make_folder(tmp_path / "photos", per_class=40)
    first = np.array(dataset.load_data(str(photos), folder=SETTINGS).train[0])
    cached, = image_decoding.cache_folder().glob("*.npy")
    size = cached.stat().st_size
    with open(cached, "r+b") as file:  # bytes zeroed in the middle, the size unchanged
        file.seek(size // 2)
        file.write(bytes(2000))
    assert cached.stat().st_size == size
    capsys.readouterr()
    again = dataset.load_data(str(photos), folder=SETTINGS)
    said = capsys.readouterr().out
    assert "do not match their checksum" in said and "Decoding 80 images" in said
    np.testing.assert_array_equal(again.train[0], first)
    dataset.load_data(str(photos), folder=SETTINGS)
    assert "Images decoded by an earlier run" in capsys.readouterr().out
    # A cache without its checksum (an older version's, or one cut off before it) is decoded again too.
    cached.with_name(cached.name + ".sha256").unlink()
    dataset.load_data(str(photos), folder=SETTINGS)
    assert "do not match their checksum" in capsys.readouterr().out
