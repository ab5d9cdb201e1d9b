"""What the machine computes with, and the line a bf16 run prints where bfloat16 is emulated."""

from __future__ import annotations

from machinery import hardware

import pytest

import train


@pytest.mark.parametrize("flags, gpu, emulated", [
    (frozenset({"avx2", "fma"}), False, True),  # AVX2 alone: TensorFlow emulates bfloat16
    (frozenset({"avx2", "avx512f", "avx512_bf16"}), False, False),
    (frozenset({"avx2", "amx_bf16"}), False, False),
    (frozenset({"avx2"}), True, False),  # on a GPU: nothing to say
    (None, False, False),  # flags unknown: nothing to say
])
def test_bf16_is_called_emulated_only_on_a_cpu_without_bf16_maths(flags, gpu, emulated, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    monkeypatch.setattr(hardware, "has_gpu", lambda: gpu)
    assert hardware.bf16_is_emulated() is emulated
    warning = hardware.bf16_warning()
    if emulated:
        assert warning.startswith("--precision bf16:") and "slower here than fp32" in warning
        assert "AVX2" in warning and "\n" not in warning
    else:
        assert warning is None


def test_the_instruction_sets_are_named(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert hardware.instruction_sets() == ["AVX2", "AVX-512", "AVX-512 BF16"]
    assert hardware.describe_cpu().endswith("(AVX2, AVX-512, AVX-512 BF16, bfloat16 maths)")


def test_this_machines_flags_are_read():
    flags = hardware.cpu_flags()
    assert flags is None or all(flag == flag.lower() for flag in flags)


@pytest.mark.parametrize("emulated", [True, False])
def test_a_bf16_run_says_so_before_training_where_bf16_is_emulated(emulated, tiny_npz, tmp_path,
                                                                    capsys, monkeypatch):
    monkeypatch.setattr(hardware, "bf16_is_emulated", lambda: emulated)
    train.main([str(arg) for arg in ("--data", tiny_npz, "--precision", "bf16", "--epochs", "1",
                                     "--train-size", 64, "--test-size", 32, "--out-dir", tmp_path / "run")])
    lines = capsys.readouterr().out.splitlines()
    warned = [i for i, line in enumerate(lines) if "bf16" in line and "slower here than fp32" in line]
    assert len(warned) == emulated
    if emulated:  # before the first epoch
        assert warned[0] < next(i for i, line in enumerate(lines) if line.startswith("Epoch 1/1"))
