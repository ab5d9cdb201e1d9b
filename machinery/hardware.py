"""What this machine computes with: a GPU, or a CPU and its vector instructions (AVX2,
AVX-512, AMX) and whether it has bfloat16 maths. The speed choices, the bf16 warning and
the benchmark go by it."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from pathlib import Path

import tensorflow as tf

# CPU flags as Linux names them, and what the README and the benchmark call them.
INSTRUCTION_SETS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16",
                    "amx_bf16": "AMX-BF16", "bf16": "BF16"}
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # bf16: the Arm name (FEAT_BF16)


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags: /proc/cpuinfo on Linux, sysctl on macOS; None where unknown."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):  # x86, Arm
                return frozenset(line.split(":", 1)[1].lower().split())
        return None
    if sys.platform == "darwin":
        return _macos_flags()
    return None


def _macos_flags() -> frozenset[str] | None:
    def sysctl(name: str) -> str:
        result = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""
    if platform.machine() == "arm64":
        return frozenset({"bf16"} if sysctl("hw.optional.arm.FEAT_BF16") == "1" else set())
    features = f"{sysctl('machdep.cpu.features')} {sysctl('machdep.cpu.leaf7_features')}".lower()
    return frozenset(features.replace("avx512bf16", "avx512_bf16").replace(".", "_").split()) or None


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def instruction_sets() -> list[str]:
    """The vector instruction sets that matter here, e.g. ["AVX2", "AVX-512"]."""
    flags = cpu_flags() or frozenset()
    return [name for flag, name in INSTRUCTION_SETS.items() if flag in flags]


def describe_cpu() -> str:
    """One line: the CPU and its instruction sets, as the benchmark and the README name them."""
    sets = instruction_sets()
    bf16 = has_bf16_maths()
    maths = "" if bf16 is None else ", bfloat16 maths" if bf16 else ", no bfloat16 maths"
    return f"{cpu_name()} ({', '.join(sets) or 'instruction sets unknown'}{maths})"


def has_bf16_maths() -> bool | None:
    """Whether the CPU has bfloat16 instructions (AVX-512 BF16, AMX or Arm's BF16);
    None where its flags are unknown."""
    flags = cpu_flags()
    return None if flags is None else any(flag in flags for flag in BF16_FLAGS)


def has_gpu() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def bf16_is_emulated() -> bool:
    """bfloat16 on this machine is emulated: no GPU, and a CPU known to lack bf16 maths."""
    return not has_gpu() and has_bf16_maths() is False


def bf16_warning() -> str | None:
    """The line a bf16 run prints where bfloat16 is emulated, else None."""
    if not bf16_is_emulated():
        return None
    return (f"--precision bf16: this CPU has no bfloat16 instructions ({describe_cpu()}), so "
            f"TensorFlow emulates them and bf16 will be slower here than fp32")
