"""Two real workers on localhost (--strategy multiworker, each with its own TF_CONFIG): a
worker lost mid-epoch, killed or frozen, ends the run in one line with every complete epoch
intact; both resume, from one shared run folder or each from its own, and the run then
matches a one-process run of the same global batch."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from machinery import cli, run_folder

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, make_mnist_arrays, run_script, stderr_lines

EPOCHS = 3  # the workers train 2, lose one in the second, and resume with --epochs 3
BATCH = ["--batch-size", "8"]  # on 640 images: 80 steps an epoch, long enough to lose a worker in


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mnist.npz"
    np.savez(path, **make_mnist_arrays(num_train=640, num_test=64))
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data) -> Path:
    """The same run in one process: the reference for the workers."""
    out = tmp_path_factory.mktemp("one")
    result = run_script("train.py", "--data", data, "--out-dir", out, "--epochs", str(EPOCHS), *BATCH)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start_workers(out_dirs: list[Path], *args: str) -> list[subprocess.Popen]:
    """One train.py a worker, worker 0 (the chief) writing to out_dirs[0], and so on."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(len(out_dirs))]}
    processes = []
    for index, out in enumerate(out_dirs):
        env = {k: v for k, v in os.environ.items() if k != "CVAE_DATA"}
        env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "--strategy", "multiworker", "--out-dir",
             str(out), *args], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return processes


def run_workers(out_dirs: list[Path], *args: str) -> list[tuple[int, str, str]]:
    """Each worker's exit code, stdout and stderr."""
    processes = start_workers(out_dirs, *args)
    outputs = [process.communicate(timeout=300) for process in processes]
    return [(process.returncode, *output) for process, output in zip(processes, outputs)]


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as file:
        return list(csv.DictReader(file))


def assert_matches_one_process(out: Path, one_process: Path) -> None:
    """The same run to float rounding: each worker's half of the batch, and each of one
    process's two shards, is a part of the batch whose gradients are added. Each float tensor
    within 5e-4 of its largest value, all else equal: measured up to 1.8e-4, in Adam's moments,
    with Keras' kernel for the logits layer, which rounds otherwise in a worker (two threads an
    op) than in a shard (one); with speed.DepthwiseLogits in training, within 1e-5 as before."""
    rows, expected = metrics(out), metrics(one_process)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in expected]
    # The figures as metrics.csv rounds them (4 decimals): the same to float32 rounding
    # (a relative 1e-6 of a few hundred nats), give or take a last digit.
    for key in ("train_loss", "test_elbo"):
        ours, theirs = ([float(r[key] or "nan") for r in table] for table in (rows, expected))
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-4, err_msg=key)
    final, reference = (tf.train.load_checkpoint(str(path / "checkpoints")) for path in (out, one_process))
    names = reference.get_variable_to_shape_map().keys() - {"_CHECKPOINTABLE_OBJECT_GRAPH",
                                                            "save_counter/.ATTRIBUTES/VARIABLE_VALUE"}
    assert len(names) > 20  # weights, optimizer slots, random state, epoch
    for name in names:
        value, expected_value = final.get_tensor(name), reference.get_tensor(name)
        if np.issubdtype(expected_value.dtype, np.floating):
            scale = float(np.abs(expected_value).max())
            np.testing.assert_allclose(value, expected_value, rtol=0, atol=5e-4 * scale, err_msg=name)
        else:
            np.testing.assert_array_equal(value, expected_value, err_msg=name)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="Windows cannot freeze a process (SIGSTOP)")
@pytest.mark.parametrize("how, layout", [("SIGKILL", "a folder each"), ("SIGSTOP", "one shared folder")],
                         ids=["killed, a folder each", "frozen, one shared folder"])
def test_a_lost_worker_stops_the_run_in_one_line_and_both_resume(tmp_path, data, one_process,
                                                                  how, layout):
    separate = layout == "a folder each"
    out_dirs = [tmp_path / "chief", tmp_path / "worker"] if separate else [tmp_path / "run"] * 2
    chief, worker = start_workers(out_dirs, "--data", str(data), "--epochs", str(EPOCHS - 1), *BATCH)
    try:
        deadline = time.monotonic() + 240
        while not (out_dirs[0] / "checkpoints" / "ckpt-1.index").exists():
            assert chief.poll() is None and worker.poll() is None, chief.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # into epoch 2
        worker.send_signal(getattr(signal, how))  # SIGSTOP: a machine gone silent, its sockets left open
        lost_at = time.monotonic()
        _, stderr = chief.communicate(timeout=120)  # never a hang
        detected_in = time.monotonic() - lost_at
    finally:
        worker.kill()
        worker.communicate()
        chief.kill()
    assert chief.returncode == 1
    lines = stderr_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: a worker of the run was lost ("), lines
    assert f"python train.py --out-dir {out_dirs[0]} --resume" in lines[0]
    print(f"{how}: the chief stopped {detected_in:.1f} s after the loss")
    saved = max(int(path.stem.split("-")[1]) for path in (out_dirs[0] / "checkpoints").glob("ckpt-*.index"))
    assert saved < EPOCHS - 1 and [int(r["epoch"]) for r in metrics(out_dirs[0])][-1] >= saved

    # Both resume, with one epoch more, each from its own folder; only the chief wrote
    # pictures, metrics and TensorBoard.
    results = run_workers(out_dirs, "--resume", "--epochs", str(EPOCHS))
    for returncode, _, stderr in results:
        assert returncode == 0, stderr_lines(stderr)[-20:]
    assert f"Resuming {out_dirs[0]} after epoch {saved}" in results[0][1]
    assert_matches_one_process(out_dirs[0], one_process)
    if separate:
        assert sorted(path.name for path in out_dirs[1].iterdir()) == ["checkpoints-worker-1", "config.json"]
    else:
        assert (out_dirs[0] / "checkpoints-worker-1").is_dir()

    # Resumed once more, a finished run says so, on both workers.
    results = run_workers(out_dirs, "--resume")
    assert all(returncode == 0 and f"has finished its {EPOCHS} epochs" in stdout
               for returncode, stdout, _ in results), [stderr_lines(r[2])[-5:] for r in results]


def test_workers_resume_from_the_last_epoch_all_of_them_have(tmp_path):
    folder = tmp_path / "checkpoints-worker-1"
    folder.mkdir()
    for epoch in (2, 3):
        (folder / f"ckpt-{epoch}.index").touch()
    latest = str(folder / "ckpt-3")
    assert run_folder.agreed_checkpoint(latest, [3, 3], folder) == latest
    assert run_folder.agreed_checkpoint(latest, [3, 2], folder) == str(folder / "ckpt-2")
    for epochs in ([3, 1], [3, 0]):  # a checkpoint no longer kept, or none at all
        with pytest.raises(cli.UserError, match=f"their last complete epochs are {epochs[1]} to 3"):
            run_folder.agreed_checkpoint(latest, epochs, folder)
