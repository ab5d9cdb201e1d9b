"""A folder of image files as the data: the layout, the decoding, the cache, the split,
and one clear line for what cannot be used."""

from __future__ import annotations

import json
from pathlib import Path

from machinery import image_decoding, image_folder
from machinery.cli import UserError

import numpy as np
import pytest
from conftest import assert_one_line_error, run_main, run_script
from PIL import Image

import dataset
import evaluate
import generate
import train

SETTINGS = image_folder.Settings(image_size=(16, 16), test_fraction=0.25, seed=1)


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A colour picture: a gradient with a bright square whose place depends on the seed."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)
    pixels[..., 2] = rng.integers(0, 256)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    pixels[top:top + height // 3, left:left + width // 3] = 255
    return Image.fromarray(pixels)


def make_folder(root: Path, per_class: int = 12, classes: tuple[str, ...] = ("cats", "dogs")) -> Path:
    """Class folders of mixed sizes and formats: PNG, PNG with alpha, JPEG, grey PNG, palette
    PNG with transparency, GIF, BMP; and files that are no images."""
    kinds = ("png", "rgba.png", "jpg", "grey.png", "palette.png", "gif", "bmp")
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = picture(20 + 4 * (i % 3), 24 + 8 * (i % 2), seed=100 * label + i)
            kind = kinds[i % len(kinds)]
            path = folder / f"{i:03d}.{kind}"
            if kind == "rgba.png":
                image = image.convert("RGBA")
                image.putalpha(Image.new("L", image.size, 255))
            elif kind == "grey.png":
                image = image.convert("L")
            elif kind == "palette.png":
                image = image.convert("P")
                image.info["transparency"] = 0
            image.save(path, **({"transparency": 0} if kind == "palette.png" else {}))
    (root / "README.txt").write_text("not an image\n")
    (root / classes[0] / "notes.md").write_text("not an image either\n")
    (root / classes[0] / "._000.png").write_bytes(b"macOS metadata, hidden")
    return root


@pytest.fixture
def photos(tmp_path) -> Path:
    return make_folder(tmp_path / "photos")


def test_a_folder_of_class_folders_is_the_data(photos):
    data = dataset.load_data(str(photos), folder=SETTINGS)
    (x_train, y_train), (x_test, y_test) = data.splits
    assert data.class_names == ("cats", "dogs")
    assert x_train.shape == (18, 16, 16, 3) and x_test.shape == (6, 16, 16, 3)
    assert x_train.dtype == np.uint8 and isinstance(x_train, np.memmap)  # mapped from the cache
    assert np.bincount(np.concatenate([y_train, y_test])).tolist() == [12, 12]
    assert len(set(y_train[:6].tolist())) == 2  # each split in a seeded order: the classes mixed
    report = data.folder_report
    assert report["left_out"] == ["README.txt", "cats/notes.md"] and report["resized"] == 24
    assert report["sizes_found"] == 6 and report["upscaled"] == 0
    again = dataset.load_data(str(photos), folder=SETTINGS)
    assert again.fingerprint == data.fingerprint
    np.testing.assert_array_equal(again.train[0], x_train)
    other_seed = dataset.load_data(str(photos), folder=image_folder.Settings((16, 16), None, 0.25, 2))
    # Another seed draws other test images (6 of 24: the same 6 by chance, 1 in 134,596).
    assert {image.tobytes() for image in other_seed.test[0]} != {image.tobytes() for image in x_test}


def test_a_second_load_maps_the_cache_and_decodes_nothing(photos, monkeypatch):
    first = dataset.load_data(str(photos), folder=SETTINGS)
    monkeypatch.setattr(image_decoding, "decode", lambda *args: pytest.fail("decoded again"))
    second = dataset.load_data(str(photos), folder=SETTINGS)
    np.testing.assert_array_equal(second.test[0], first.test[0])


def test_a_changed_file_changes_the_fingerprint(photos):
    before = dataset.load_data(str(photos), folder=SETTINGS).fingerprint
    picture(20, 24, seed=999).save(photos / "dogs" / "000.png")
    assert dataset.load_data(str(photos), folder=SETTINGS).fingerprint != before


def test_transparency_is_white_and_a_gif_gives_its_first_frame(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # red, but wholly transparent
    clear.save(folder / "clear.png")
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("blue", "yellow")]
    frames[0].save(folder / "moving.gif", save_all=True, append_images=frames[1:])
    assert image_decoding.decode(folder / "clear.png", (8, 8), 3).tolist() == \
        np.full((8, 8, 3), 255).tolist()
    first = image_decoding.decode(folder / "moving.gif", (8, 8), 3)
    assert first[..., 2].min() > 200 and first[..., 0].max() < 50  # blue, not yellow


def test_a_16_bit_grey_png_keeps_its_top_8_bits(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit grey PNG
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    decoded = image_decoding.decode(tmp_path / "deep.png", (8, 8), 1)
    np.testing.assert_array_equal(decoded[..., 0], ramp >> 8)


def test_one_size_is_kept_and_grey_images_give_one_channel(tmp_path):
    folder = tmp_path / "grey"
    folder.mkdir()
    for i in range(20):
        picture(12, 8, seed=i).convert("L").save(folder / f"{i}.png")
    data = dataset.load_data(str(folder))
    assert data.train[0].shape[1:] == (8, 12, 1) and data.class_names == ("grey",)
    assert data.folder_report["resized"] == 0
    assert data.default_likelihood == "logistic"  # the 8-bit likelihood for a folder
    coloured = dataset.load_data(str(folder), folder=image_folder.Settings(channels=3))
    assert coloured.train[0].shape[1:] == (8, 12, 3)


def test_train_and_test_folders_are_the_split(tmp_path):
    make_folder(tmp_path / "data" / "train", per_class=8)
    make_folder(tmp_path / "data" / "test", per_class=4)
    data = dataset.load_data(str(tmp_path / "data"), folder=SETTINGS)
    assert len(data.train[0]) == 16 and len(data.test[0]) == 8
    assert "train/ and test/" in data.folder_report["split"]


def test_flat_train_and_test_folders_are_one_class_named_after_the_folder(tmp_path):
    for split, count in (("train", 12), ("test", 4)):
        (tmp_path / "shots" / split).mkdir(parents=True)
        for i in range(count):
            picture(16, 16, seed=i).save(tmp_path / "shots" / split / f"{i}.png")
    data = dataset.load_data(str(tmp_path / "shots"))
    assert data.class_names == ("shots",) and (len(data.train[0]), len(data.test[0])) == (12, 4)


def test_a_conditional_run_needs_two_classes(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "one"
    folder.mkdir()
    for i in range(40):
        picture(16, 16, seed=i).save(folder / f"{i}.png")
    code, stderr = run_main(train.main, ["--data", folder, "--conditional", "--out-dir", tmp_path / "run"],
                            "train.py", capsys, monkeypatch)
    assert_one_line_error(stderr, "train.py", "--conditional needs images of two classes", 2, code)
    assert not (tmp_path / "run" / "config.json").exists()


def truncated_png(folder: Path) -> Path:
    path = folder / "cats" / "000.png"
    path.write_bytes(path.read_bytes()[:-40])  # its last chunks lost
    return path


@pytest.mark.parametrize(("spoil", "settings", "expected"), [
    (truncated_png, SETTINGS, "cats/000.png: cannot"),
    (lambda folder: None, image_folder.Settings(), "sizes ("),  # mixed sizes, no --image-size
    (lambda folder: [p.unlink() for p in (folder / "dogs").iterdir()], SETTINGS, "dogs holds no images"),
    (lambda folder: [(folder / f"class{i:03d}").mkdir() for i in range(image_folder.MAX_CLASSES)],
     SETTINGS, f"at most {image_folder.MAX_CLASSES} are supported"),
    (lambda folder: None, image_folder.Settings((16, 16), None, 0.001, 0), "leaves no test images"),
])
def test_what_cannot_be_used_is_one_clear_error(photos, spoil, settings, expected):
    spoil(photos)
    with pytest.raises(UserError, match=None) as error:
        dataset.load_data(str(photos), folder=settings)
    assert expected in str(error.value), str(error.value)
    assert not list(image_decoding.cache_folder().glob("*.npy"))  # nothing half-written kept


def test_an_empty_folder_and_flags_for_no_folder(tmp_path, tiny_npz):
    (tmp_path / "empty" / "only_text").mkdir(parents=True)
    (tmp_path / "empty" / "only_text" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="holds no images"):
        image_folder.load(tmp_path / "empty", SETTINGS)
    with pytest.raises(UserError, match="--image-size and --channels are for a folder"):
        dataset.load_data(str(tiny_npz), folder=SETTINGS)


@pytest.mark.parametrize("value", ["30", "16,18", "4", "big", "16,16,3"])
def test_an_image_size_the_cvae_cannot_take_is_one_line(value, capsys, monkeypatch, photos):
    code, stderr = run_main(train.main, ["--data", photos, "--image-size", value], "train.py",
                            capsys, monkeypatch)
    assert_one_line_error(stderr, "train.py", "--image-size", 2, code)


def test_a_folder_from_the_data_to_every_script(tmp_path, capsys, monkeypatch):
    """dataset.py, train.py, evaluate.py and generate.py on a folder; --resume refuses it changed."""
    photos, run = make_folder(tmp_path / "photos", per_class=24), tmp_path / "run"
    code, _ = run_main(dataset.main, ["--data", photos, "--image-size", "16", "--out-dir", tmp_path],
                       "dataset.py", capsys, monkeypatch)
    assert code is None and (tmp_path / "dataset_preview.png").is_file()
    trained = run_script("train.py", "--data", photos, "--image-size", "16", "--test-fraction", "0.34",
                         "--epochs", "1", "--batch-size", "8", "--out-dir", run)
    assert trained.returncode == 0, trained.stderr[-2000:]
    config = json.loads((run / "config.json").read_text())
    assert config["class_names"] == ["cats", "dogs"] and config["image_shape"] == [16, 16, 3]
    assert config["image_size"] == [16, 16] and config["likelihood"] == "logistic"
    assert "draws images from them" in trained.stdout
    assert "Images of 16x16x3 in a latent space of 2" in trained.stdout  # what to expect, what to try
    evaluate.main(["--out-dir", str(run), "--iw-samples", "4"])  # in this process, as generate below
    bits = json.loads((run / "evaluation.json").read_text())["bits_per_dim"]["mean"]
    assert 0 < bits < 8
    generate.main(["--out-dir", str(run), "--num", "4", "--npy"])
    assert np.load(run / "generated.npy").shape == (4, 16, 16, 3)
    assert "4 images decoded" in capsys.readouterr().out

    picture(20, 24, seed=7).save(photos / "cats" / "000.png")  # a changed picture
    cached = sorted(image_decoding.cache_folder().glob("*.npy"))
    code, stderr = run_main(train.main, ["--out-dir", run, "--resume", "--epochs", "2"], "train.py",
                            capsys, monkeypatch)
    assert_one_line_error(stderr, "train.py", "is not the data the run", 2, code)
    assert sorted(image_decoding.cache_folder().glob("*.npy")) == cached  # refused before decoding
