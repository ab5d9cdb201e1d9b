"""Each script run as a user would: a subprocess, on tiny data, into a temporary folder."""

from __future__ import annotations

import csv
import json
import math

import imageio.v3 as iio
import numpy as np
import pytest
from conftest import assert_one_line_error, help_entries, run_main, run_script, write_idx_folder

import dataset
import evaluate
import network
import train


def assert_ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_dataset_script_reports_and_writes_a_preview(tiny_npz, tmp_path):
    result = run_script("dataset.py", "--data", tiny_npz, "--out-dir", tmp_path / "out")
    assert_ok(result)
    assert "(96, 28, 28)" in result.stdout and "(32, 28, 28)" in result.stdout
    assert "values {0, 1}" in result.stdout
    assert "train 3, test 1" in result.stdout  # batches per epoch at batch size 32
    preview = tmp_path / "out" / "dataset_preview.png"
    assert str(preview) in result.stdout
    assert iio.imread(preview).ndim == 3


def test_dataset_script_reads_an_idx_folder_from_the_env_var(tiny_arrays, tmp_path, capsys, monkeypatch):
    folder = write_idx_folder(tmp_path / "idx", tiny_arrays, gz=True)
    monkeypatch.setenv("CVAE_DATA", str(folder))
    dataset.main(["--out-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "(96, 28, 28)" in printed and f"Source: {folder}" in printed


def test_network_script_prints_the_model(capsys):
    network.main([])
    printed = capsys.readouterr().out
    assert "encoder 28,036, decoder 41,953" in printed
    for shape in ("mean   (32, 2)", "logvar (32, 2)", "z      (32, 2)", "logits (32, 28, 28, 1)"):
        assert shape in printed


def test_train_script_writes_every_output(tiny_npz, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", "--data", tiny_npz, "--epochs", "2", "--out-dir", out)
    assert_ok(result)
    expected = {f"image_at_epoch_{e:04d}.png" for e in range(3)} | {
        f"latent_means_epoch_{e:04d}.png" for e in range(3)} | {
        "cvae.gif", "latent_means.gif", "latent_manifold.png", "metrics.csv", "config.json", "checkpoints",
        "tensorboard", "cvae.keras", "cvae_savedmodel", ".run.lock"}
    assert {p.name for p in out.iterdir()} == expected  # nothing else, no temporary files
    assert iio.imread(out / "cvae.gif", index=None).shape[0] == 3
    moves = iio.imread(out / "latent_means.gif", index=None)  # the test images' means, epochs 0 to 2
    assert moves.shape[0] == 3 and not np.array_equal(moves[0], moves[2])
    with open(out / "metrics.csv") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["0", "1", "2"]
    assert "Epoch 2/2: test ELBO" in result.stdout
    assert "3/3" in result.stdout  # the progress bar's last line: 96 images, batch 32


def test_a_run_of_another_latent_dim_draws_no_plane(tiny_npz, tmp_path):
    # (A seed repeating a run bit for bit: test_resume's runs, stopped or not, against one reference.)
    result = run_script("train.py", "--data", tiny_npz, "--epochs", "1", "--seed", "7", "--latent-dim", "3",
                        "--out-dir", tmp_path)
    assert_ok(result)
    assert "No latent manifold: it needs --latent-dim 2, not 3" in result.stdout
    assert not list(tmp_path.glob("latent_m*"))  # no manifold, no latent_means.gif or its frames


def test_a_bf16_run_trains_records_its_precision_and_evaluates(tiny_npz, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", "--data", tiny_npz, "--epochs", "2", "--precision", "bf16",
                        "--out-dir", out)
    assert_ok(result)
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"
    with open(out / "metrics.csv") as file:
        elbos = [float(row["test_elbo"]) for row in csv.DictReader(file)]
    assert all(math.isfinite(elbo) for elbo in elbos) and elbos[-1] > elbos[0]
    evaluate.main(["--out-dir", str(out), "--iw-samples", "2", "--data", str(tiny_npz)])
    report = json.loads((out / "evaluation.json").read_text())
    assert abs(report["elbo"]["mean"] - elbos[-1]) < 5  # the same model, fresh noise


@pytest.mark.parametrize("script, flags", [
    ("dataset.py", ["--data", "--dataset", "--image-size", "--channels", "--test-fraction",
                    "--split-seed", "--likelihood", "--batch-size", "--out-dir"]),
    ("network.py", ["--latent-dim", "--filters", "--likelihood", "--batch-size", "--from"]),
    ("export.py", ["--out-dir"]),
    ("evaluate.py", ["--out-dir", "--iw-samples", "--test-size", "--data", "--seed"]),
    ("generate.py", ["--out-dir", "--num", "--z", "--interpolate", "--label", "--steps", "--seed", "--out",
                     "--npy"]),
    ("train.py", ["--epochs", "--latent-dim", "--batch-size", "--learning-rate", "--filters",
                  "--likelihood", "--kl", "--conditional", "--beta", "--kl-warmup", "--kl-cycle",
                  "--precision",
                  "--seed", "--data", "--dataset", "--image-size", "--channels", "--test-fraction",
                  "--split-seed", "--train-size", "--test-size", "--out-dir",
                  "--resume", "--overwrite", "--strategy", "--devices", "--shards"]),
    ("benchmarks/benchmark.py", ["--data", "--dataset", "--train-size", "--repeats", "--steps",
                                 "--batch-size", "--iw-samples", "--variants", "--out-dir"]),
])
def test_help_documents_every_flag_with_its_default(script, flags, help_texts):
    entries = help_entries(help_texts[script])
    assert set(entries) - {"-h", "--help"} == set(flags)  # every flag, and no other
    for flag in flags:
        assert "(default:" in entries[flag], f"{script} {flag}: no default in {entries[flag]!r}"


def test_train_help_shows_the_tutorials_recipe(help_texts):
    text = " ".join(help_texts["train.py"].split())
    for default in ("(default: 10)", "(default: 2)", "(default: 32)", "(default: 0.0001)",
                    "(default: output)"):
        assert default in text


BAD_TRAIN_INPUT = {
    "missing data": (["--data", "nowhere.npz"], "nowhere.npz: no such file or folder"),
    "not an npz": (["--data", "{tmp}/notes.txt"], "not an .npz or zip file"),
    "negative epochs": (["--epochs", "-1"], "argument --epochs: '-1' is not a whole number >= 0"),
    "zero latent dim": (["--latent-dim", "0"], "argument --latent-dim: '0' is not"),
    "zero batch": (["--batch-size", "0"], "argument --batch-size: '0' is not"),
    "zero shards": (["--shards", "0"], "argument --shards: '0' is not"),
    "text batch": (["--batch-size", "many"], "argument --batch-size: 'many' is not"),
    "zero learning rate": (["--learning-rate", "0"], "argument --learning-rate: '0' is not"),
    "unknown flag": (["--epoch", "3", "--lr", "1"], "unrecognized arguments"),
    "train size too large": (["--train-size", "1000"], "--train-size 1000 is larger than the 96"),
    "too few test images": (["--test-size", "8"], "the sample grid needs 16 test images, got 8"),
    "out dir is a file": (["--out-dir", "{tmp}/notes.txt"], "is a file, not a folder"),
}


@pytest.mark.parametrize("case", BAD_TRAIN_INPUT)
def test_bad_input_is_one_line_and_exit_code_2(case, tiny_npz, tmp_path, capsys, monkeypatch):
    args, expected = BAD_TRAIN_INPUT[case]
    (tmp_path / "notes.txt").write_text("keep me\n")
    out = tmp_path / "run"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--data" not in args:
        args += ["--data", str(tiny_npz)]
    if "--out-dir" not in args:
        args += ["--out-dir", str(out)]
    code, stderr = run_main(train.main, args, "train.py", capsys, monkeypatch)
    assert_one_line_error(stderr, "train.py", expected, 2, code)
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"
    assert not out.exists() or not any(out.iterdir())


def test_bad_input_ends_a_real_process_in_one_line(tmp_path):
    """As a user sees it: a process of its own, exit code 2, the one line and nothing else."""
    result = run_script("train.py", "--data", tmp_path / "nowhere.npz", "--out-dir", tmp_path / "run")
    assert_one_line_error(result.stderr, "train.py", "nowhere.npz: no such file or folder", 2,
                          result.returncode)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
