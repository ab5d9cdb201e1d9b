"""Runs you can trust: stopped at any moment (SIGKILL, SIGTERM, SIGINT) and resumed, a
run gives the same metrics and the same final weights as one never stopped; bad input
is refused in one line with exit code 2 and leaves the run folder as it was."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from machinery import faults
from machinery.settings import RunSettings

import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    ROOT,
    assert_one_line_error,
    exported_weights,
    make_mnist_arrays,
    run_main,
    run_script,
    stderr_lines,
    write_idx_folder,
)

import train

EPOCHS = 3
TINY = dict(num_train=1600, num_test=64)  # 50 steps an epoch (at batch 16, 100: two compiled calls)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mnist.npz"
    np.savez(path, **make_mnist_arrays(**TINY))
    return path


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out-dir", str(out), "--epochs", str(EPOCHS), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """A run never stopped, to compare the others with."""
    out = tmp_path_factory.mktemp("reference")
    result = run_script("train.py", *train_args(data, out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def metrics(out: Path) -> list[tuple]:
    with open(out / "metrics.csv") as file:
        return [(row["epoch"], row["train_loss"], row["test_elbo"]) for row in csv.DictReader(file)]


def final_state(out: Path) -> dict[str, np.ndarray]:
    """Every variable of the last checkpoint: weights, optimizer slots, random state."""
    reader = tf.train.load_checkpoint(str(out / "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith("save_counter")}


def assert_same_run(out: Path, reference: Path) -> None:
    assert metrics(out) == metrics(reference)
    for read in (final_state, exported_weights):
        expected, state = read(reference), read(out)
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(state[name], value, err_msg=name)  # bit for bit
    assert (out / "cvae.gif").is_file() and (out / "latent_manifold.png").is_file()


def start_and_wait_for_epoch(args: list[str], out: Path, epoch: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / f"ckpt-{epoch}.index").exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch
    return process


def test_sigkill_mid_epoch_then_resume_gives_the_same_run(tmp_path, data, reference):
    """Killed during epoch 1: it resumes from the untrained model's checkpoint, ckpt-0 (the
    signals below stop it in epoch 2)."""
    out = tmp_path / "run"
    process = start_and_wait_for_epoch(train_args(data, out), out, epoch=0)
    process.kill()
    process.communicate()
    assert process.returncode == (1 if sys.platform == "win32" else -signal.SIGKILL)  # TerminateProcess there
    assert not (out / "cvae.gif").exists()  # it really stopped before the end

    # Settings from config.json; and the killed run no longer holds the folder.
    result = run_script("train.py", "--out-dir", out, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resuming" in result.stdout
    assert_same_run(out, reference)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows sends a child process neither SIGINT nor "
                    "SIGTERM (send_signal ends it at once); Ctrl-C there is the same GracefulStop")
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_stop_cleanly_and_resume(tmp_path, data, reference, sig, code):
    out = tmp_path / "run"
    process = start_and_wait_for_epoch(train_args(data, out), out, epoch=1)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code
    lines = stderr_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, lines
    assert f"stopped by {sig.name}" in lines[0]
    assert f"python train.py --out-dir {out} --resume" in lines[0]
    saved = sorted(int(path.stem.split("-")[1]) for path in (out / "checkpoints").glob("ckpt-*.index"))
    assert [int(row[0]) for row in metrics(out)] == list(range(saved[-1] + 1))  # complete epochs only
    assert not list(out.glob(".*tmp*"))

    result = run_script("train.py", "--out-dir", out, "--resume", "--data", data)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(out, reference)


MID_EPOCH = ["--batch-size", "16", "--epochs", "2"]  # 100 steps an epoch: two compiled calls of 50


@pytest.fixture(scope="module")
def two_calls_an_epoch(tmp_path_factory, data) -> Path:
    """A run never stopped, of two compiled calls of train_step an epoch."""
    out = tmp_path_factory.mktemp("two_calls")
    result = run_script("train.py", "--data", data, "--out-dir", out, *MID_EPOCH)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_ctrl_c_inside_an_epoch_stops_it_after_the_call_and_resumes_the_same(tmp_path, data,
                                                                             two_calls_an_epoch):
    out = tmp_path / "run"
    result = run_script("tests/signal_in_a_step_call.py", "3", "1", "--data", data, "--out-dir", out,
                        *MID_EPOCH)  # the 3rd call: epoch 2's first
    assert result.returncode == 130
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, lines
    assert "stopped by SIGINT during epoch 2 (step 50 of 100); epochs up to 1 are saved" in lines[0]
    assert [int(row[0]) for row in metrics(out)] == [0, 1] and not list(out.glob(".*tmp*"))
    result = run_script("train.py", "--out-dir", out, "--resume", "--data", data)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(out, two_calls_an_epoch)


def test_a_second_ctrl_c_stops_at_once_with_the_epochs_before_kept(tmp_path, data):
    out = tmp_path / "run"
    result = run_script("tests/signal_in_a_step_call.py", "3", "2", "--data", data, "--out-dir", out,
                        *MID_EPOCH)
    assert result.returncode == 130
    assert stderr_lines(result.stderr)[-1] == "train.py: interrupted" and "Traceback" not in result.stderr
    assert [int(row[0]) for row in metrics(out)] == [0, 1] and not list(out.glob(".*tmp*"))
    assert sorted(path.name for path in (out / "checkpoints").glob("ckpt-*.index")) == [
        "ckpt-0.index", "ckpt-1.index"]


def test_resuming_a_finished_run_says_so(tmp_path, reference):
    out = tmp_path / "done"
    shutil.copytree(reference, out)
    result = run_script("train.py", "--out-dir", out, "--resume")
    assert result.returncode == 0
    assert f"has finished its {EPOCHS} epochs" in result.stdout
    assert metrics(out) == metrics(reference)


def test_resume_with_more_epochs_trains_further(tmp_path, data, reference):
    out = tmp_path / "longer"
    result = run_script("train.py", *train_args(data, out)[:-2], "--epochs", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_script("train.py", "--out-dir", out, "--resume", "--epochs", str(EPOCHS))
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(out, reference)


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path, reference):
    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    data_file = out / "checkpoints" / f"ckpt-{EPOCHS}.data-00000-of-00001"
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    result = run_script("train.py", "--out-dir", out, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"ckpt-{EPOCHS}" in result.stdout and "is damaged" in result.stdout
    assert f"Resuming {out} after epoch {EPOCHS - 1}" in result.stdout
    assert_same_run(out, reference)


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, data):
    out = tmp_path / "diverged"
    result = run_script("train.py", *train_args(data, out, "--learning-rate", "1e30"))
    assert result.returncode == 1
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and "the loss is nan at epoch 1, step" in lines[0], lines
    assert "Try a new run with a lower --learning-rate, or --kl analytic" in lines[0]
    kept = tf.train.load_checkpoint(str(out / "checkpoints" / "ckpt-0"))  # the untrained model's, whole
    assert kept.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE") == 0
    assert all(np.isfinite(kept.get_tensor(name)).all() for name in kept.get_variable_to_shape_map()
               if name.startswith("model/"))


# ----------------------------------------------------------------------------
# Bad input: one line, exit code 2, no traceback, and the run folder exactly as it was


def snapshot(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def bad_npz(tmp: Path, **changes) -> Path:
    arrays = make_mnist_arrays(**TINY)
    arrays.update(changes)
    path = tmp / "bad.npz"
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


def idx_folder(tmp: Path, key: str, edit) -> Path:
    folder = write_idx_folder(tmp / "idx", make_mnist_arrays(**TINY))
    file = folder / {"x_train": "train-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}[key]
    file.write_bytes(edit(file.read_bytes()))
    return folder


def damage_every_checkpoint(run: Path) -> None:
    for file in (run / "checkpoints").glob("ckpt-*.index"):
        file.write_bytes(b"not a checkpoint index")


BAD_INPUT = {
    # name: (flags after --out-dir RUN, or a function (tmp, run) -> flags; what the line says)
    "missing path": (["--overwrite", "--data", "nowhere.npz"], "no such file or folder"),
    "not an npz or zip": (lambda tmp, run: ["--overwrite", "--data", str(tmp / "notes.txt")],
                          "not an .npz or zip file"),
    "npz missing a key": (lambda tmp, run: ["--overwrite", "--data", str(bad_npz(tmp, x_test=None))],
                          "missing x_test"),
    "wrong shape": (lambda tmp, run: ["--overwrite", "--data", str(
        bad_npz(tmp, x_train=np.zeros((1600, 28, 14), np.uint8)))], "multiples of 4"),
    "wrong dtype": (lambda tmp, run: ["--overwrite", "--data", str(
        bad_npz(tmp, x_test=np.zeros((64, 28, 28), np.float64)))], "expected uint8"),
    "labels out of range": (lambda tmp, run: ["--overwrite", "--data", str(
        bad_npz(tmp, y_train=np.full(1600, 11, np.uint8)))], "expected 0..9"),
    "empty split": (lambda tmp, run: ["--overwrite", "--data", str(bad_npz(
        tmp, x_train=np.zeros((0, 28, 28), np.uint8), y_train=np.zeros(0, np.uint8)))], "no images"),
    "truncated IDX": (lambda tmp, run: ["--overwrite", "--data", str(
        idx_folder(tmp, "x_train", lambda b: b[:-1000]))], "truncated"),
    "IDX wrong magic": (lambda tmp, run: ["--overwrite", "--data", str(
        idx_folder(tmp, "y_test", lambda b: b"\0\0\x08\x03" + b[4:]))], "wrong magic number"),
    "epochs < 0": (["--overwrite", "--epochs", "-2"], "argument --epochs"),
    "latent dim < 1": (["--overwrite", "--latent-dim", "0"], "argument --latent-dim"),
    "batch size < 1": (["--overwrite", "--batch-size", "-1"], "argument --batch-size"),
    "train size too large": (["--overwrite", "--train-size", "1601"], "--train-size 1601 is larger"),
    "test size too large": (["--overwrite", "--test-size", "65"], "--test-size 65 is larger"),
    "fewer than 16 test images": (["--overwrite", "--test-size", "15"], "needs 16 test images, got 15"),
    "a run is there already": ([], "already holds a run; continue it with --resume"),
    "resume and overwrite": (["--resume", "--overwrite"], "choose one"),
    "resume contradicting a flag": (["--resume", "--latent-dim", "4"],
                                    "--latent-dim 4 contradicts the run"),
    "resume with other data": (lambda tmp, run: ["--resume", "--data", str(bad_npz(
        tmp, x_train=make_mnist_arrays(**TINY, seed=5)["x_train"]))], "is not the data the run"),
    "resume with fewer epochs than done": (["--resume", "--epochs", "2"], "has done 3 epochs"),
    "resume with a damaged config": (lambda tmp, run: (run / "config.json").write_text(
        '{"epochs": 3}') and ["--resume"], "config.json is damaged"),
    "resume with a damaged image_shape": (lambda tmp, run: edit_config(run, image_shape=[28, 28])
                                          or ["--resume"], "image_shape [28, 28] is not (height"),
    "resume with an image_shape the CVAE cannot take": (
        lambda tmp, run: edit_config(run, image_shape=[28, 30, 1]) or ["--resume"],
        "image_shape [28, 30, 1]: images of 28x30 pixels"),
    "resume with another precision": (["--resume", "--precision", "bf16"],
                                      "--precision bf16 contradicts the run"),
    "unknown precision": (["--overwrite", "--precision", "fp16"], "argument --precision"),
    "a device that is not here": (["--overwrite", "--strategy", "mirrored", "--devices", "GPU:7"],
                                  "no device 'GPU:7' here"),
    "devices without mirrored": (["--overwrite", "--devices", "CPU:0"],
                                 "--devices is for --strategy mirrored"),
    "seed out of range": (["--overwrite", "--seed", "-1"], "argument --seed"),
    "learning rate not finite": (["--overwrite", "--learning-rate", "inf"], "argument --learning-rate"),
    "resume with every checkpoint damaged": (lambda tmp, run: damage_every_checkpoint(run) or [
        "--resume", "--epochs", "5"], "no intact checkpoint"),
}


def edit_config(run: Path, **settings) -> None:
    """Overwrite settings in a run's config.json, as a hand edit would."""
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, **settings}))


def test_overwrite_replaces_the_runs_outputs_and_keeps_the_users_files(tmp_path, data, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "notes.txt").write_text("my notes\n")
    (run / "mine").mkdir()
    (run / "mine" / "cvae.gif").write_bytes(b"a picture of mine")  # a run's name, in a folder of the user's
    result = run_script("train.py", *train_args(data, run)[:-2], "--epochs", "1", "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "notes.txt").read_text() == "my notes\n"
    assert (run / "mine" / "cvae.gif").read_bytes() == b"a picture of mine"
    assert [int(row[0]) for row in metrics(run)] == [0, 1]  # the new run's, not the old one's
    assert not (run / f"image_at_epoch_{EPOCHS:04d}.png").exists()  # the old run's last grid
    assert sorted(path.name for path in (run / "checkpoints").glob("*.index")) == ["ckpt-0.index",
                                                                                   "ckpt-1.index"]


def test_a_run_with_an_older_config_resumes_with_the_later_settings_defaults(tmp_path, data, reference):
    run = tmp_path / "older"
    shutil.copytree(reference, run)
    config = json.loads((run / "config.json").read_text())
    first_version = [field.name for field in dataclasses.fields(RunSettings) if field.metadata["required"]]
    (run / "config.json").write_text(json.dumps({name: config[name] for name in first_version}))
    result = run_script("train.py", "--out-dir", str(run), "--resume", "--epochs", str(EPOCHS + 1),
                        "--data", str(data))
    assert result.returncode == 0, result.stderr[-2000:]
    # Each later setting takes its default, as the older run had it: the flags' but for split_seed,
    # whose None says the run's folder split (had it one) was drawn with --seed.
    resumed = json.loads((run / "config.json").read_text())
    assert resumed == {**config, "epochs": EPOCHS + 1, "split_seed": None}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_leaves_the_run_folder_unchanged(tmp_path, data, reference, case, capsys,
                                                   monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (tmp_path / "notes.txt").write_text("not an archive\n")
    flags, expected = BAD_INPUT[case]
    flags = flags(tmp_path, run) if callable(flags) else flags
    if "--data" not in flags:
        flags = [*flags, "--data", str(data)]
    before = snapshot(run)
    code, stderr = run_main(train.main, ["--out-dir", run, *flags], "train.py", capsys, monkeypatch)
    assert_one_line_error(stderr, "train.py", expected, 2, code)
    assert snapshot(run) == before


@pytest.mark.parametrize("where, expected", [("file", "is a file, not a folder"),
                                             ("read-only", "is not writable")])
def test_an_unusable_out_dir_is_refused(tmp_path, data, where, expected):
    if where == "read-only" and not sys.platform.startswith("linux"):
        pytest.skip("/sys is read-only on Linux alone")
    out = tmp_path / "notes.txt" if where == "file" else Path("/sys")  # read-only even for root
    if where == "file":
        out.write_text("keep me\n")
    result = run_script("train.py", "--out-dir", out, "--data", data)
    assert result.returncode == 2
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and expected in lines[0], lines
    if where == "file":
        assert out.read_text() == "keep me\n"


def test_a_run_holds_its_folder_while_evaluate_may_read_it(tmp_path, data, capsys, monkeypatch):
    out = tmp_path / "busy"
    # Long epochs (batch 8), so that it still trains while the others start.
    args = ["--data", str(data), "--out-dir", str(out), "--epochs", "100", "--batch-size", "8"]
    process = start_and_wait_for_epoch(args, out, epoch=1)
    try:
        for flag in ("--resume", "--overwrite"):  # from this process: the lock is the other's
            code, stderr = run_main(train.main, [*args[:4], flag], "train.py", capsys, monkeypatch)
            assert_one_line_error(stderr, "train.py", f"{out} is in use by a run in progress (process "
                                  f"{process.pid})", 2, code)
            assert (out / "config.json").is_file() and (out / "checkpoints").is_dir()
        result = run_script("evaluate.py", "--out-dir", out, "--iw-samples", "2", "--data", data)
        assert result.returncode == 0, result.stderr[-2000:]
        assert process.poll() is None  # all the while, the run trained on
    finally:
        process.kill()
        process.communicate()


def test_a_write_that_fails_mid_run_stops_in_one_line_and_resumes(tmp_path, reference):
    out = tmp_path / "blocked"
    shutil.copytree(reference, out)
    blocker = out / "image_at_epoch_0004.png"
    blocker.mkdir()  # epoch 4's grid cannot take its place
    result = run_script("train.py", "--out-dir", out, "--resume", "--epochs", str(EPOCHS + 1))
    assert result.returncode == 1
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, lines
    assert f"cannot write the run in {out} ({blocker}: Is a directory); epochs up to {EPOCHS} " \
        f"are saved. Once that is mended, resume with: python train.py --out-dir {out} --resume" in lines[0]
    assert [int(row[0]) for row in metrics(out)] == list(range(EPOCHS + 1))
    blocker.rmdir()
    result = run_script("train.py", "--out-dir", out, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [int(row[0]) for row in metrics(out)] == list(range(EPOCHS + 2))


def test_a_disk_full_during_a_checkpoint_stops_in_one_line_and_resumes_the_same(tmp_path, data, reference):
    """On any machine (the test below needs a file system of its own): the checkpoint of
    epoch 2 fails half written, as on a full disk."""
    out = tmp_path / "run"
    result = run_script("tests/disk_full_at.py", "2", *train_args(data, out))
    assert result.returncode == 1
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, lines
    assert f"cannot write the run in {out} (" in lines[0] and "No space left on device); " in lines[0]
    assert "epochs up to 1 are saved" in lines[0] and f"--out-dir {out} --resume" in lines[0]
    assert not list((out / "checkpoints").glob("*_temp"))  # the checkpoint it cut short
    result = run_script("train.py", "--out-dir", out, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(out, reference)


def test_a_long_paths_cause_keeps_its_reason():
    # A deep run folder's checkpoint path once took the 200 characters, and "No space left
    # on device" with them (the test below failed so in CI's longer temporary folders).
    path = "/tmp/" + "deep/" * 40 + "ckpt-3_temp/part-00000-of-00001.data-00000-of-00001.tempstate123"
    error = tf.errors.ResourceExhaustedError(None, None, f"{path}; No space left on device [Op:SaveV2]")
    cause = faults._cause(error)
    assert len(cause) == 200 and cause.endswith("tempstate123; No space left on device"), cause


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 3 MiB file system (tmpfs), where this machine lets a test mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs",
                                                    str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a file system needs root (or CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_elsewhere(tmp_path, data, small_disk):
    out = small_disk / "run"
    result = run_script("train.py", *train_args(data, out)[:-2], "--epochs", "20")
    assert result.returncode == 1
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    saved = max(int(path.stem.split("-")[1]) for path in (out / "checkpoints").glob("ckpt-*.index"))
    assert f"epochs up to {saved} are saved" in lines[0] and f"--out-dir {out} --resume" in lines[0]
    assert not list((out / "checkpoints").glob("*_temp"))  # the checkpoint it cut short
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    result = run_script("train.py", "--out-dir", moved, "--resume", "--epochs", str(saved + 1))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Resuming {moved} after epoch {saved}" in result.stdout
