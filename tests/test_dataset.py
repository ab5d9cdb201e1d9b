"""Loading, checking, binarizing and batching MNIST."""

from __future__ import annotations

import gzip
from pathlib import Path

from machinery.cli import UserError

import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    IDX_NAMES,
    assert_one_line_error,
    idx_bytes,
    make_mnist_arrays,
    run_main,
    write_idx_folder,
)

import dataset
import train


def test_binarize_is_the_tutorials_threshold():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    pixels = np.tile(pixels, (1, 2, 2))[:, :28, :28]
    expected = np.where(pixels.reshape(1, 28, 28, 1) / 255.0 > 0.5, 1.0, 0.0).astype("float32")
    result = dataset.binarize(pixels).numpy()
    assert result.dtype == np.float32 and result.shape == (1, 28, 28, 1)
    np.testing.assert_array_equal(result, expected)
    assert dataset.binarize(np.array([[[127] * 28] * 28], np.uint8)).numpy().max() == 0.0
    assert dataset.binarize(np.array([[[128] * 28] * 28], np.uint8)).numpy().min() == 1.0


def assert_same_as(loaded, arrays):
    (x_train, y_train), (x_test, y_test) = loaded
    np.testing.assert_array_equal(x_train, arrays["x_train"])
    np.testing.assert_array_equal(y_train, arrays["y_train"])
    np.testing.assert_array_equal(x_test, arrays["x_test"])
    np.testing.assert_array_equal(y_test, arrays["y_test"])
    assert x_train.dtype == np.uint8 and y_train.dtype == np.uint8


def test_npz(tiny_npz, tiny_arrays):
    assert_same_as(dataset.load_data(str(tiny_npz)).splits, tiny_arrays)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_folder(tmp_path, tiny_arrays, gz):
    folder = write_idx_folder(tmp_path / "idx", tiny_arrays, gz=gz)
    assert_same_as(dataset.load_data(str(folder)).splits, tiny_arrays)


def test_env_var_names_the_data(monkeypatch, tiny_npz, tiny_arrays):
    monkeypatch.setenv("CVAE_DATA", str(tiny_npz))
    assert_same_as(dataset.load_data().splits, tiny_arrays)


@pytest.mark.parametrize("main, prog", [(dataset.main, "dataset.py"), (train.main, "train.py")])
def test_a_typed_dataset_with_the_env_var_set_is_refused(tmp_path, monkeypatch, capsys, tiny_npz, main, prog):
    # CVAE_DATA names MNIST's file: --dataset fashion_mnist must not show it under Fashion-MNIST's
    # class names (it did: "T-shirt/top" counting the 0s), nor train a "Trouser" that is a 1.
    monkeypatch.setenv("CVAE_DATA", str(tiny_npz))
    out = tmp_path / "out"
    code, stderr = run_main(main, ["--dataset", "fashion_mnist", "--out-dir", out], prog, capsys, monkeypatch)
    assert_one_line_error(stderr, prog, f"--dataset fashion_mnist asks for a Keras download, but CVAE_DATA "
                                        f"names {tiny_npz}: pass that file with --data", 2, code)
    assert "Remove-Item Env:CVAE_DATA" in stderr and not out.exists()
    # With --data, --dataset names the file's classes; without --dataset, CVAE_DATA names the data.
    dataset.main(["--data", str(tiny_npz), "--dataset", "fashion_mnist", "--out-dir", str(out)])
    assert "0 T-shirt/top" in capsys.readouterr().out
    dataset.main(["--out-dir", str(out)])
    assert f"Source: {tiny_npz}" in capsys.readouterr().out


def test_keras_download_is_the_default(monkeypatch, tiny_arrays):
    a = tiny_arrays
    monkeypatch.setattr(tf.keras.datasets.mnist, "load_data",
                        lambda: ((a["x_train"], a["y_train"]), (a["x_test"], a["y_test"])))
    assert_same_as(dataset.load_data().splits, tiny_arrays)


def test_failed_download_says_how_to_pass_a_file(monkeypatch):
    def offline():
        raise Exception("URL fetch failure on https://example/mnist.npz: None -- [Errno -3]\nmore")

    monkeypatch.setattr(tf.keras.datasets.mnist, "load_data", offline)
    with pytest.raises(UserError) as error:
        dataset.load_data()
    message = str(error.value)
    assert "could not download MNIST" in message and "--data" in message
    assert "CVAE_DATA" in message and "\n" not in message


def test_first_n_images(tiny_npz, tiny_arrays):
    (x_train, y_train), (x_test, _) = dataset.load_data(str(tiny_npz), train_size=10, test_size=20).splits
    assert len(x_train) == len(y_train) == 10 and len(x_test) == 20
    np.testing.assert_array_equal(x_train, tiny_arrays["x_train"][:10])


@pytest.mark.parametrize("sizes, flag", [((97, None), "--train-size"), ((None, 33), "--test-size")])
def test_sizes_larger_than_the_data(tiny_npz, sizes, flag):
    with pytest.raises(UserError, match=f"{flag} .* is larger than"):
        dataset.load_data(str(tiny_npz), *sizes)


# Every malformed input the loader handles: how to make it, and what the message says.
def npz_with(**changes):
    def make(path: Path) -> Path:
        arrays = make_mnist_arrays(8, 8)
        arrays.update(changes)
        arrays = {k: v for k, v in arrays.items() if v is not None}
        np.savez(path / "bad.npz", **arrays)
        return path / "bad.npz"
    return make


def idx_with(key, data=None, transform=None, gz=False):
    def make(path: Path) -> Path:
        folder = write_idx_folder(path / "idx", make_mnist_arrays(8, 8), gz=gz)
        name = IDX_NAMES[key] + (".gz" if gz else "")
        file = folder / name
        if data is None:
            file.unlink()
        else:
            file.write_bytes(data(file.read_bytes()) if transform is None else transform(file))
        return folder
    return make


def write(name, content):
    def make(path: Path) -> Path:
        (path / name).write_bytes(content)
        return path / name
    return make


def truncated_npz(path: Path) -> Path:
    np.savez(path / "cut.npz", **make_mnist_arrays(8, 8))
    data = (path / "cut.npz").read_bytes()
    (path / "cut.npz").write_bytes(data[: len(data) // 2])
    return path / "cut.npz"


def npy_file(path: Path) -> Path:
    np.save(path / "images.npy", np.zeros((2, 28, 28), np.uint8))
    return path / "images.npy"


MALFORMED = {
    "missing path": (lambda path: path / "nowhere.npz", "no such file or folder"),
    "text file": (write("notes.npz", b"hello, this is not an archive\n"), "not an .npz or zip"),
    "empty file": (write("empty.npz", b""), "cannot read it as .npz"),
    "truncated npz": (truncated_npz, "cannot read it as .npz"),
    "npy not npz": (npy_file, "not an .npz archive"),
    "missing key": (npz_with(y_test=None), "missing y_test"),
    "sides not multiples of 4": (npz_with(x_train=np.zeros((8, 28, 27), np.uint8)),
                                 "28x27 pixels: the CVAE needs sides that are multiples of 4"),
    "too small": (npz_with(x_train=np.zeros((8, 4, 4), np.uint8), x_test=np.zeros((8, 4, 4), np.uint8)),
                  "4x4 pixels: the CVAE needs sides that are multiples of 4, at least 8"),
    "flat images": (npz_with(x_test=np.zeros((8, 784), np.uint8)), "expected (N, H, W) or (N, H, W, C)"),
    "two channels": (npz_with(x_train=np.zeros((8, 28, 28, 2), np.uint8)), "1 (grey) or 3 (colour)"),
    "splits of two shapes": (npz_with(x_test=np.zeros((8, 32, 32, 3), np.uint8)),
                             "train images are (28, 28, 1), test images (32, 32, 3)"),
    "colour floats": (npz_with(x_train=np.zeros((8, 32, 32, 3), np.float32),
                               x_test=np.zeros((8, 32, 32, 3), np.float32)), "expected uint8"),
    "labels of another length": (npz_with(y_test=np.zeros((9, 1), np.uint8)),
                                 "(9,) labels for 8 images"),
    "wrong dtype": (npz_with(x_train=np.zeros((8, 28, 28), np.float32)), "expected uint8"),
    "labels out of range": (npz_with(y_train=np.full(8, 10, np.uint8)), "labels range 10..10"),
    "negative labels": (npz_with(y_test=np.full(8, -1, np.int64)), "labels range -1..-1"),
    "float labels": (npz_with(y_test=np.zeros(8, np.float32)), "expected integers"),
    "label count": (npz_with(y_train=np.zeros(7, np.uint8)), "labels for 8 images"),
    "empty split": (npz_with(x_test=np.zeros((0, 28, 28), np.uint8),
                             y_test=np.zeros(0, np.uint8)), "test split: no images"),
    "idx file missing": (idx_with("y_test"), "no t10k-labels-idx1-ubyte"),
    "idx truncated": (idx_with("x_train", data=lambda b: b[:-100]), "truncated"),
    "idx header cut": (idx_with("y_train", data=lambda b: b[:6]), "truncated"),
    "idx trailing bytes": (idx_with("x_test", data=lambda b: b + b"\0\0"), "trailing bytes"),
    "idx wrong magic": (idx_with("x_train", data=lambda b: (2049).to_bytes(4, "big") + b[4:]),
                        "wrong magic number 0x00000801"),
    "idx labels as images": (idx_with("y_train", data=lambda b: idx_bytes(np.zeros((8, 28, 28)))),
                             "wrong magic number 0x00000803"),
    "idx gz truncated": (idx_with("x_test", gz=True, data=lambda b: b[: len(b) // 2]),
                         "cannot read it"),
    "idx gz bad deflate": (idx_with("x_train", gz=True, data=lambda b: (
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff\x07" + b"\x00" * 32)), "cannot read it"),
    "idx gz not gzip": (idx_with("y_test", gz=True, data=lambda b: gzip.decompress(b)),
                        "cannot read it"),
    "idx short split": (idx_with("y_train", data=lambda b: idx_bytes(np.zeros(5, np.uint8))),
                        "labels for 8 images"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_input_is_one_clear_line(tmp_path, case):
    make, expected = MALFORMED[case]
    path = make(tmp_path)
    with pytest.raises(UserError) as error:
        dataset.load_data(str(path))
    message = str(error.value)
    assert expected in message
    assert path.name in message  # says where
    assert "\n" not in message


def test_epoch_order_is_a_repeatable_permutation():
    order = dataset.epoch_order(1000, seed=3, epoch=2)
    np.testing.assert_array_equal(np.sort(order), np.arange(1000))
    np.testing.assert_array_equal(order, dataset.epoch_order(1000, seed=3, epoch=2))
    assert not np.array_equal(order, dataset.epoch_order(1000, seed=3, epoch=3))
    assert not np.array_equal(order, dataset.epoch_order(1000, seed=4, epoch=2))


def test_make_batches_keeps_the_order_and_the_remainder():
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    in_order = [b.numpy().ravel().tolist() for b in dataset.make_batches(images, 6)]
    assert in_order == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]


def test_fashion_mnist_comes_from_its_own_keras_loader(monkeypatch, tiny_arrays):
    a = tiny_arrays
    monkeypatch.setattr(tf.keras.datasets.fashion_mnist, "load_data",
                        lambda: ((a["x_train"], a["y_train"]), (a["x_test"], a["y_test"])))
    monkeypatch.setattr(tf.keras.datasets.mnist, "load_data", lambda: pytest.fail("not MNIST"))
    assert_same_as(dataset.load_data(name="fashion_mnist").splits, tiny_arrays)


def test_data_of_fewer_classes_has_as_many_class_names(tmp_path, capsys):
    """A file of labels 0..7, read as --dataset mnist: eight classes, and dataset.py's table
    has a row for each of them alone."""
    arrays = make_mnist_arrays(num_train=80, num_test=16)
    arrays["y_train"], arrays["y_test"] = arrays["y_train"] % 8, arrays["y_test"] % 8
    path = tmp_path / "eight.npz"
    np.savez(path, **arrays)
    assert dataset.load_data(str(path)).class_names == tuple("01234567")
    dataset.main(["--data", str(path), "--out-dir", str(tmp_path / "out")])
    table = capsys.readouterr().out.split("Images per class:")[1].split("total")[0]
    assert [row.split()[0] for row in table.splitlines() if row.strip()][1:] == list("01234567")
