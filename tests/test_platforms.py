"""What differs from one platform to another: Windows' refusals (no fcntl, no fsync through
a read-only handle, no folder opened, a rename refused while another program holds the
file) met as a run there meets them, and the retried rename itself."""

from __future__ import annotations

import csv
import errno
import os
import subprocess
import sys
from pathlib import Path

from machinery import files

import numpy as np
import pytest
import windows_like
from conftest import ROOT, make_mnist_arrays, stderr_lines

pytestmark = pytest.mark.skipif(os.name != "posix", reason="simulates Windows with POSIX locks")


def as_on_windows(script: str, *args) -> subprocess.CompletedProcess:
    """Run a script through tests/windows_like.py; its last stderr line counts the refusals."""
    env = {k: v for k, v in os.environ.items() if k != "CVAE_DATA"}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "windows_like.py"), script, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def refusals(result: subprocess.CompletedProcess) -> dict[str, int]:
    last = stderr_lines(result.stderr)[-1]
    assert last.startswith("windows_like refused: "), result.stderr[-2000:]
    return eval(last.split(": ", 1)[1])  # the dict it printed


def test_a_run_its_resume_evaluate_and_generate_work_as_on_windows(tmp_path):
    data, out = tmp_path / "mnist.npz", tmp_path / "run"
    np.savez(data, **make_mnist_arrays(num_train=128, num_test=32))
    result = as_on_windows("train.py", "--data", data, "--out-dir", out, "--epochs", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    refused = refusals(result)
    assert refused["replace"] and refused["open a folder"] and not refused["fsync"]
    result = as_on_windows("train.py", "--out-dir", out, "--resume", "--epochs", "2", "--data", data)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / "metrics.csv") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["0", "1", "2"]
    for script, args in (("evaluate.py", ("--iw-samples", "2", "--data", data)), ("generate.py", ())):
        result = as_on_windows(script, "--out-dir", out, *args)
        assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "evaluation.json").is_file() and (out / "generated.png").is_file()
    assert not list(out.glob(".*tmp*"))

    # This process holds the folder with msvcrt's byte lock, as a run on Windows would ...
    lock = open(out / files.LOCK_FILE, "a+")  # noqa: SIM115
    os.lseek(lock.fileno(), files.LOCKED_BYTE, os.SEEK_SET)
    windows_like.msvcrt.locking(lock.fileno(), windows_like.msvcrt.LK_NBLCK, 1)
    lock.truncate(0)
    lock.write("4242\n")
    lock.flush()
    try:  # ... and a second run there is refused, naming it
        result = as_on_windows("train.py", "--out-dir", out, "--resume", "--epochs", "3", "--data", data)
    finally:
        lock.close()
    assert result.returncode == 2
    assert f"{out} is in use by a run in progress (process 4242)" in stderr_lines(result.stderr)[0]
    assert (out / "metrics.csv").read_text().count("\n") == 4  # the header and epochs 0 to 2


def test_a_rename_refused_for_a_while_is_tried_again(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "REPLACE_WAITS", (0, 0, 0))
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if len(calls) < 3:
            raise PermissionError(errno.EACCES, "Access is denied", str(source), None, str(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with files.atomic_path(tmp_path / "metrics.csv") as tmp:
        tmp.write_text("epoch\n0\n")
    assert (tmp_path / "metrics.csv").read_text() == "epoch\n0\n" and len(calls) == 3


def test_a_rename_refused_for_good_keeps_the_old_file_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "REPLACE_WAITS", (0, 0))
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")

    def replace(source: Path, target: Path):
        raise PermissionError(errno.EACCES, "Access is denied", str(source), None, str(target))

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError), files.atomic_path(target) as tmp:
        tmp.write_text("new\n")
    assert target.read_text() == "old\n" and list(tmp_path.iterdir()) == [target]
