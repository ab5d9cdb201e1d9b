"""What this machine computes with: a GPU, or a CPU and its vector instructions (AVX2,
AVX-512, AMX), and whether bfloat16 maths is fast on it. The speed choices, the bf16
warning and the benchmark go by it."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
import time
from pathlib import Path

import tensorflow as tf

# CPU flags as Linux names them, and what the README and the benchmark call them.
INSTRUCTION_SETS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16",
                    "amx_bf16": "AMX-BF16", "bf16": "BF16"}
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # bf16: the Arm name (FEAT_BF16)
BF16_COMPUTE_CAPABILITY = (8, 0)  # NVIDIA GPUs with bfloat16 maths: Ampere (A100, L4) and later


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's feature flags: /proc/cpuinfo on Linux, sysctl on macOS; None where unknown."""
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):  # x86, Arm
                return frozenset(line.split(":", 1)[1].lower().split())
        return None
    if sys.platform == "darwin":
        if platform.machine() == "arm64":
            return frozenset({"bf16"} if _sysctl("hw.optional.arm.FEAT_BF16") == "1" else set())
        features = f"{_sysctl('machdep.cpu.features')} {_sysctl('machdep.cpu.leaf7_features')}".lower()
        return frozenset(features.replace("avx512bf16", "avx512_bf16").replace(".", "_").split()) or None
    return None


def _sysctl(name: str) -> str:
    """A macOS sysctl value, or "" where it cannot be read."""
    try:
        result = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def cpu_name() -> str:
    """The CPU's marketing name, e.g. "AMD EPYC 9B14" or "Apple M2", where the system says it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin" and (name := _sysctl("machdep.cpu.brand_string")):
        return name
    if sys.platform == "win32":
        try:
            import winreg
            key = winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0")
            return str(winreg.QueryValueEx(key, "ProcessorNameString")[0]).strip()
        except OSError:
            pass
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


def gpu_compute_capability() -> tuple[str, tuple[int, int] | None]:
    """The first GPU's name and its CUDA compute capability (None where it has none)."""
    details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
    return details.get("device_name", "GPU"), details.get("compute_capability")


@functools.cache
def bf16_time_ratio() -> float:
    """How many times as long a transposed convolution (the decoder's costliest layer) and its
    gradients take in bfloat16 as in float32, best of 5: about 0.5 with bfloat16 maths,
    10 where it is emulated. It touches no random state."""
    images = tf.random.stateless_uniform((32, 14, 14, 64), (1, 2))
    kernel = tf.random.stateless_uniform((3, 3, 32, 64), (3, 4))
    seconds = []
    for dtype in (tf.float32, tf.bfloat16):
        @tf.function
        def step(x, k):
            with tf.GradientTape() as tape:
                tape.watch([x, k])
                y = tf.nn.conv2d_transpose(x, k, (32, 28, 28, 32), 2, "SAME")
                total = tf.reduce_sum(tf.cast(y, tf.float32))
            return tape.gradient(total, [x, k])
        arguments = (tf.cast(images, dtype), tf.cast(kernel, dtype))
        step(*arguments)  # traced and warmed up
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            step(*arguments)[1].numpy()
            best = min(best, time.perf_counter() - start)
        seconds.append(best)
    return seconds[1] / seconds[0]


def bf16_slowdown() -> str | None:
    """Why bfloat16 will be slower here than float32, or None where it will not: by a GPU's
    compute capability, by the CPU's flags on Linux, else (macOS, Windows) by a short timing."""
    gpu = has_gpu()
    if gpu:  # an NVIDIA GPU has a compute capability; another is timed, below
        name, capability = gpu_compute_capability()
        if capability is not None:
            if tuple(capability) >= BF16_COMPUTE_CAPABILITY:
                return None
            return (f"this GPU ({name}, compute capability {capability[0]}.{capability[1]}) has no "
                    f"bfloat16 maths (8.0 or more has)")
    elif sys.platform.startswith("linux") and (maths := has_bf16_maths()) is not None:
        return None if maths else (f"this CPU has no bfloat16 instructions ({describe_cpu()}), so "
                                   f"TensorFlow emulates them")
    try:
        ratio = bf16_time_ratio()
    except tf.errors.OpError:  # no bfloat16 kernel here at all: training will say so itself
        return None
    return None if ratio < 1 else (f"on this {'GPU' if gpu else f'CPU ({cpu_name()})'}, a short test ran "
                                   f"{ratio:.1f} times as long in bfloat16 as in float32")


def bf16_is_emulated() -> bool:
    """bfloat16 is slower here than float32 (emulated, or without bfloat16 maths)."""
    return bf16_slowdown() is not None


def bf16_warning() -> str | None:
    """The line a bf16 run prints where bfloat16 will be slower than fp32, else None."""
    reason = bf16_slowdown()
    return None if reason is None else f"--precision bf16: {reason}, so bf16 will be slower here than fp32"

