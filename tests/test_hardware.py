"""What the machine computes with, and the line a bf16 run prints where bfloat16 is emulated."""

from __future__ import annotations

from machinery import hardware

import pytest


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
