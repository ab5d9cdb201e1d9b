"""What the machine computes with, the line a bf16 run prints where bfloat16 is slower than
float32, and a device's errors (out of memory, cuDNN) said as what they are."""

from __future__ import annotations

import sys
from pathlib import Path

from machinery import cli, faults, hardware

import pytest
import tensorflow as tf
from conftest import assert_one_line_error, run_main, stderr_lines

import evaluate
import export
import generate
import network
import train


@pytest.mark.parametrize("flags, emulated", [
    (frozenset({"avx2", "fma"}), True),  # AVX2 alone: TensorFlow emulates bfloat16
    (frozenset({"avx2", "avx512f", "avx512_bf16"}), False),
    (frozenset({"avx2", "amx_bf16"}), False),
])
def test_on_linux_bf16_is_called_emulated_on_a_cpu_without_bf16_maths(flags, emulated, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    monkeypatch.setattr(hardware, "has_gpu", lambda: False)
    monkeypatch.setattr(hardware, "bf16_time_ratio", lambda: pytest.fail("timed where the flags tell"))
    assert hardware.bf16_is_emulated() is emulated
    warning = hardware.bf16_warning()
    if emulated:
        assert warning.startswith("--precision bf16:") and "slower here than fp32" in warning
        assert "AVX2" in warning and "\n" not in warning
    else:
        assert warning is None


@pytest.mark.parametrize("platform", ["win32", "darwin", "linux"])
@pytest.mark.parametrize("ratio", [0.6, 9.5])
def test_without_flags_to_go_by_a_short_timing_decides(platform, ratio, monkeypatch):
    """Windows gives no flags, and macOS's (FEAT_BF16) do not say what TensorFlow uses."""
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: None if platform != "darwin" else frozenset({"bf16"}))
    monkeypatch.setattr(hardware, "has_gpu", lambda: False)
    monkeypatch.setattr(hardware, "bf16_time_ratio", lambda: ratio)
    warning = hardware.bf16_warning()
    assert (warning is not None) == (ratio > 1)
    if warning:
        assert "a short test ran 9.5 times as long in bfloat16 as in float32" in warning


def test_the_timing_runs_and_touches_no_random_state():
    tf.keras.utils.set_random_seed(7)
    expected = tf.random.uniform((3,)).numpy(), tf.keras.random.normal((3,), seed=None).numpy()
    tf.keras.utils.set_random_seed(7)
    hardware.bf16_time_ratio.cache_clear()
    assert hardware.bf16_time_ratio() > 0
    after = tf.random.uniform((3,)).numpy(), tf.keras.random.normal((3,), seed=None).numpy()
    assert all((a == b).all() for a, b in zip(after, expected))


@pytest.mark.parametrize("name, capability, slower", [
    ("Tesla T4", (7, 5), True), ("NVIDIA A100", (8, 0), False), ("NVIDIA H100", (9, 0), False)])
def test_on_a_gpu_its_compute_capability_decides(name, capability, slower, monkeypatch):
    monkeypatch.setattr(hardware, "has_gpu", lambda: True)
    monkeypatch.setattr(hardware, "gpu_compute_capability", lambda: (name, capability))
    warning = hardware.bf16_warning()
    assert (warning is not None) == slower
    if slower:
        assert f"this GPU ({name}, compute capability 7.5) has no bfloat16 maths" in warning


OUT_OF_MEMORY = tf.errors.ResourceExhaustedError(
    None, None, "OOM when allocating tensor with shape[32,64,14,14] and type float on "
                "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc [Op:Conv2D]")
CUDNN = tf.errors.NotFoundError(None, None, "No algorithm worked!  Error messages: ... [Op:Conv2D]")


@pytest.mark.parametrize("error, expected", [
    (OUT_OF_MEMORY, "the GPU ran out of memory (OOM when allocating"),
    (CUDNN, "the GPU's cuDNN failed (No algorithm worked!"),
    (tf.errors.ResourceExhaustedError(None, None, "ckpt-1.data: No space left on device"), None),
    (tf.errors.NotFoundError(None, None, "out/checkpoints; No such file or directory"), None),
    (tf.errors.ResourceExhaustedError(None, None, "zoom/room/ckpt-1.data: No space left on device"), None),
    (OSError(28, "No space left on device"), None),
])
def test_a_devices_errors_are_named_and_others_left_alone(error, expected):
    problem = cli.device_error(error)
    assert problem == expected if expected is None else problem.startswith(expected)
    if problem:
        assert "--batch-size" in problem and "\n" not in problem


def test_running_out_of_memory_ends_a_run_in_one_line(tiny_npz, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise OUT_OF_MEMORY

    monkeypatch.setattr(train, "test_set_elbo", out_of_memory)
    out = tmp_path / "run"
    code, stderr = run_main(train.main, ["--data", tiny_npz, "--out-dir", out, "--train-size", 64],
                            "train.py", capsys, monkeypatch)
    assert_one_line_error(stderr, "train.py", "the GPU ran out of memory (OOM when allocating", 1, code)
    assert "train with a smaller --batch-size" in stderr and "no epoch is saved yet" in stderr


@pytest.mark.parametrize("stop, exit_code, line", [(OUT_OF_MEMORY, 1, ": error: the GPU ran out of memory"),
                                                 (KeyboardInterrupt(), 130, ": interrupted")],
                         ids=["out of memory", "Ctrl-C"])
def test_the_other_scripts_end_in_one_line_on_running_out_of_memory_or_ctrl_c(
        stop, exit_code, line, tiny_npz, tmp_path, capsys, monkeypatch):
    """evaluate.py, generate.py and export.py, each stopped inside its own work on a real
    run: one line, the exit code, and the run folder as it was."""
    out = tmp_path / "run"
    code, stderr = run_main(train.main, ["--data", tiny_npz, "--out-dir", out, "--epochs", "0"], "train.py",
                            capsys, monkeypatch)
    assert code is None, stderr

    def stopped(*args, **kwargs):
        raise stop

    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    stops = {"evaluate.py": (evaluate, "evaluate_run", evaluate.main),
             "generate.py": (network.CVAE, "sample", generate.main),
             "export.py": (export, "savedmodel_archive", export.main)}
    for script, (owner, name, main) in stops.items():
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, stopped)
            code, stderr = run_main(main, ["--out-dir", out, *(["--data", tiny_npz] if script == "evaluate.py"
                                                               else [])], script, capsys, monkeypatch)
        lines = stderr_lines(stderr)
        assert (code, len(lines)) == (exit_code, 1) and lines[0].startswith(script + line), lines
        assert "Traceback" not in stderr
    after = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    assert after.keys() == before.keys()  # no file left half written
    # All as it was but cvae.keras, which export.py wrote whole before its SavedModel was stopped.
    assert {name: time for name, time in after.items() if name != "cvae.keras"} == {
        name: time for name, time in before.items() if name != "cvae.keras"}
    assert network.load_model(out).latent_dim == 2


def test_a_refused_write_says_another_program_may_hold_the_file_on_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "ON_WINDOWS", True)
    error = PermissionError(13, "Permission denied", str(tmp_path / "metrics.csv"))
    line = str(faults.interrupted(error, tmp_path, tmp_path / "checkpoints"))
    assert f"{tmp_path / 'metrics.csv'}: Permission denied (open in another program?)" in line


def test_the_instruction_sets_are_named(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert hardware.instruction_sets() == ["AVX2", "AVX-512", "AVX-512 BF16"]
    assert hardware.describe_cpu().endswith("(AVX2, AVX-512, AVX-512 BF16, bfloat16 maths)")


def test_the_flags_of_linuxs_cpuinfo_are_read(tmp_path):
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu SSE2 avx2 avx512f avx512_bf16\n"
                   "bugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd bf16 i8mm\nCPU part\t: 0xd40\n")
    assert hardware.cpu_flags(x86) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}  # the first CPU's
    assert hardware.cpu_flags(arm) == {"fp", "asimd", "bf16", "i8mm"}
    (tmp_path / "none").write_text("processor\t: 0\n")
    assert hardware.cpu_flags(tmp_path / "none") is None
    if Path("/proc/cpuinfo").is_file():  # Linux, as CI: this machine's flags, read
        flags = hardware.cpu_flags()
        assert flags and ("sse2" in flags or "fp" in flags or "asimd" in flags), flags


@pytest.mark.parametrize("emulated", [True, False])
def test_a_bf16_run_says_so_before_training_where_bf16_is_emulated(emulated, tiny_npz, tmp_path,
                                                                    capsys, monkeypatch):
    monkeypatch.setattr(hardware, "bf16_slowdown", lambda: "this CPU has none" if emulated else None)
    train.main([str(arg) for arg in ("--data", tiny_npz, "--precision", "bf16", "--epochs", "1",
                                     "--train-size", 64, "--test-size", 32, "--out-dir", tmp_path / "run")])
    lines = capsys.readouterr().out.splitlines()
    warned = [i for i, line in enumerate(lines) if "bf16" in line and "slower here than fp32" in line]
    assert len(warned) == emulated
    if emulated:  # before the first epoch
        assert warned[0] < next(i for i, line in enumerate(lines) if line.startswith("Epoch 1/1"))
