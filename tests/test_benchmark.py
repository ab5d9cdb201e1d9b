"""benchmarks/benchmark.py: its FLOP count, and a short run on tiny data."""

from __future__ import annotations

import json
import sys

from machinery import cli, distribute, hardware

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, run_script, stderr_lines

import network

sys.path.insert(0, str(ROOT / "benchmarks"))
import benchmark  # noqa: E402
import variants  # noqa: E402


def test_train_flops_are_counted_from_the_layer_shapes():
    # Multiply-adds x 2 per image, layer by layer, for latent_dim 2:
    forward = (2 * 13 * 13 * 32 * (3 * 3 * 1)  # Conv2D 32: each output pixel gathers 3x3x1
               + 2 * 6 * 6 * 64 * (3 * 3 * 32)  # Conv2D 64
               + 2 * 2304 * 4  # Dense to mean and log-variance
               + 2 * 2 * 7 * 7 * 32  # Dense from z
               + 2 * 7 * 7 * 32 * (3 * 3 * 64)  # Conv2DTranspose 64: each input pixel spreads 3x3x64
               + 2 * 14 * 14 * 64 * (3 * 3 * 32)  # Conv2DTranspose 32
               + 2 * 28 * 28 * 32 * (3 * 3 * 1))  # Conv2DTranspose 1
    assert forward == 10_932_416
    first_layer = 2 * 13 * 13 * 32 * 9
    assert variants.forward_flops(network.CVAE(2)) == (forward, first_layer)
    assert variants.train_flops_per_image(network.CVAE(2)) == 3 * forward - first_layer
    # A decode, z to logits: the four decoder layers above, 9.49 MFLOP.
    assert variants.decode_flops(network.CVAE(2)) == 2 * (2 * 1568 + 49 * 9 * 32 * 64 + 196 * 9 * 64 * 32
                                                          + 784 * 9 * 32) == 9_489_536


def test_the_benchmark_prints_its_table_and_writes_json(tmp_path, tiny_npz):
    out_dir = tmp_path / "bench"
    names = ["tutorial", "fp32"]  # two variants of the five: each is a process of its own
    result = run_script("benchmarks/benchmark.py", "--data", tiny_npz, "--repeats", "1",
                        "--steps", "2", "--batch-size", "16", "--iw-samples", "50",
                        "--variants", ",".join(names),
                        "--out-dir", out_dir)
    assert result.returncode == 0, stderr_lines(result.stderr)[-20:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table] == ["variant", *names]
    report = json.loads((out_dir / "benchmark.json").read_text())
    assert [row["variant"] for row in report["table"]] == names
    for row in report["table"]:
        assert row["ms_per_step"] > 0 and row["epoch_seconds"] > 0 and row["eval_seconds"] > 0
        assert row["peak_memory_gib"] > 0.1  # each variant's own process
    default = 2 if distribute.available_cores() >= 2 and not tf.config.list_physical_devices("GPU") else 1
    for name in names:
        assert report["settings"]["shards"][name] == (variants.SETTINGS[name][2] or default)
    assert report["table"][0]["epoch_ratio"] == 1.0
    assert report["matmul_gflops"]["fp32"] > 0 and report["startup"]["to_first_step_seconds"] > 0
    assert report["settings"]["batch_size"] == 16
    assert report["train_flops_per_step"] == 16 * variants.train_flops_per_image(network.CVAE(2))
    machine = report["machine"]  # the CPU named, and whether its bf16 is emulated
    # The CPU as the printed table names it (its flags' parsing: test_hardware), and, on an x86
    # Linux such as CI's, its AVX2 among them.
    sets = ", ".join(machine["instruction_sets"]) or "instruction sets unknown"
    assert f"{machine['cpu']} ({sets}" in result.stdout
    assert ("AVX2" in machine["instruction_sets"]) == ("avx2" in (hardware.cpu_flags() or ()))
    assert machine["bf16_emulated"] == hardware.bf16_is_emulated()
    iwae = report["iwae"]
    assert iwae["decodes_per_second"] > 0 and 0 < iwae["fraction_of_fp32_matmul"] < 2
    assert iwae["k"] == 50 and iwae["images"] == variants.IWAE_IMAGES
    assert f"IWAE bound (evaluate.py, in tutorial's process), {variants.IWAE_IMAGES} images x K = 50: " \
        in result.stdout
    assert hardware.describe_cpu() in result.stdout


def test_an_unknown_variant_is_one_line(tmp_path, tiny_npz):
    result = run_script("benchmarks/benchmark.py", "--data", tiny_npz, "--variants", "fp32,fp64",
                        "--out-dir", tmp_path / "bench")
    assert result.returncode == 2
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and "unknown 'fp64'" in lines[0], lines


def test_a_variant_whose_process_dies_is_one_error_not_a_hang(tmp_path):
    with pytest.raises(cli.ScriptError, match="fp32 variant's process stopped"):
        benchmark.Worker("fp32", str(tmp_path / "missing.npz"), None)  # it cannot load its data


def test_images_the_tutorials_network_cannot_take_are_one_line(tmp_path):
    colour = tmp_path / "colour.npz"
    images, labels = np.zeros((64, 32, 32, 3), np.uint8), np.zeros((64, 1), np.uint8)
    np.savez(colour, x_train=images, y_train=labels, x_test=images, y_test=labels)
    with pytest.raises(cli.UserError, match=r"images of \(32, 32, 3\); the benchmark times"):
        benchmark.main(["--data", str(colour), "--out-dir", str(tmp_path / "bench")])
