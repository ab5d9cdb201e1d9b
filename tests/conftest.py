"""Tiny stand-ins for MNIST, written in both formats the loader reads, and a way to run
the scripts as a user would."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from machinery import cli, data_files, files, image_decoding, steps
from machinery.settings import RunSettings

import numpy as np
import pytest
import tensorflow as tf

import network
import train

ROOT = Path(__file__).resolve().parents[1]
IDX_NAMES = data_files.IDX_FILES  # Keras array name -> IDX file name


def make_mnist_arrays(num_train: int = 96, num_test: int = 32, seed: int = 0) -> dict:
    """MNIST-shaped uint8 data: a bright bar whose height depends on the label, plus
    speckle, so that there is something to learn and to reconstruct."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", num_train), ("test", num_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) < 0.03).astype(np.uint8) * 200
        for image, label in zip(images, labels):
            image[3 + 2 * label : 7 + 2 * label, 5:23] = 255
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
    return arrays


def train_settings(*flags: str) -> RunSettings:
    """The RunSettings that train.py's `flags` give: by default, the tutorial's recipe."""
    return RunSettings.from_flags(train.build_parser().parse_args(flags))


def epoch_losses(train_steps, images, batch_size: int = 32, **options) -> np.ndarray:
    """What train.fit does with an epoch, less its records: the compiled train steps on the
    images' batches (steps.batches' `options`); the losses, a batch each."""
    return np.concatenate([train_steps(batches) for batches in steps.batches(images, batch_size, **options)])


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, arrays: dict, gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in IDX_NAMES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="session")
def tiny_arrays() -> dict:
    return make_mnist_arrays()


@pytest.fixture
def tiny_npz(tmp_path: Path, tiny_arrays: dict) -> Path:
    path = tmp_path / "tiny_mnist.npz"
    np.savez(path, **tiny_arrays)
    return path


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests name their data; CVAE_DATA (set in CI) is for the real-data test alone. Decoded
    folders of images are cached in a folder of each test's own."""
    monkeypatch.delenv("CVAE_DATA", raising=False)
    monkeypatch.setenv(image_decoding.CACHE_ENV_VAR, str(tmp_path_factory.mktemp("cache")))


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300,
               cwd: Path = ROOT):
    """Run one of the project's scripts as a user would; returns CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if k != "CVAE_DATA"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=cwd)


def exported_weights(out: Path) -> dict[str, np.ndarray]:
    """The weights a run exported: those in its cvae.keras and those in its SavedModel."""
    weights = {f"keras {i}": w for i, w in enumerate(network.load_model(out).get_weights())}
    reader = tf.train.load_checkpoint(str(out / files.SAVEDMODEL_DIR / "variables" / "variables"))
    # "variables/N" is the model's N-th variable; the archive's "_all_variables" copies them
    # in an order of no meaning.
    return {**weights, **{name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
                          if name.startswith("variables/")}}


def stderr_lines(stderr: str) -> list[str]:
    """The non-blank lines of stderr: the scripts' own alone, as they hide TensorFlow's
    start-up logs (machinery/__init__.py), whatever its version."""
    return [line for line in stderr.splitlines() if line.strip()]


def assert_one_line_error(stderr: str, script: str, expected: str, exit_code: int | None = None,
                          returncode: int | None = None) -> None:
    """A script's user error: one line on stderr, `script: error: ...` holding `expected`,
    no traceback; and the exit code, where given."""
    assert "Traceback" not in stderr
    lines = stderr_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error:"), lines
    assert expected in lines[0], lines[0]
    if exit_code is not None:
        assert returncode == exit_code, (returncode, lines)


def run_main(main, argv: list, prog: str, capsys: pytest.CaptureFixture,
             monkeypatch: pytest.MonkeyPatch) -> tuple[int | None, str]:
    """A script's main() run as `python prog ARGV` runs it (machinery.cli.run), but in this
    process: the exit code (None if it returned) and stderr. For bad input, which ends
    before anything starts, without a new process's start-up each time."""
    monkeypatch.setattr(sys, "argv", [prog])
    capsys.readouterr()
    try:
        cli.run(main, [str(arg) for arg in argv])
    except SystemExit as stop:
        return stop.code, capsys.readouterr().err
    return None, capsys.readouterr().err


SCRIPTS = ("dataset.py", "network.py", "train.py", "evaluate.py", "export.py", "generate.py", "explore.py",
           "benchmarks/benchmark.py")  # the scripts with flags


@pytest.fixture(scope="session")
def help_texts() -> dict[str, str]:
    """Each script's --help, as `python SCRIPT --help` prints it, all from one process."""
    result = run_script("tests/help_texts.py", *SCRIPTS)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def help_entries(text: str) -> dict[str, str]:
    """Each option of an argparse --help, by each of its flags: the whole entry (its flags,
    metavars and help, over however many lines argparse wrapped it)."""
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in text.splitlines():
        if line.startswith("  -"):  # an option's first line: its flags, then perhaps its help
            names = re.findall(r"(?:^|, )(--?[\w-]+)", line.strip().split("  ")[0])
            entries.update(dict.fromkeys(names, line.strip()))
        elif names and line.startswith("      ") and line.strip():  # its help, continued
            entries.update(dict.fromkeys(names, entries[names[0]] + " " + line.strip()))
        else:
            names = []
    return entries
