"""How fast the CVAE trains and evaluates on this machine, next to the tutorial's recipe.

    python benchmarks/benchmark.py --data mnist.npz
    python benchmarks/benchmark.py --train-size 12800 --repeats 1   # a quick look

Each variant trains the same model from the same start at batch 32, in a process of its own
(TensorFlow's thread settings hold for a whole process), adding one idea to the one above:

  tutorial        the tutorial's code: compute_loss, train_step and Keras' kernels, a
                  shuffle(60000).batch(32) pipeline, one step per tf.function call, an
                  eager test-set ELBO at batch 32, TensorFlow's default threads
  fp32 1/call     train.py's loop (machinery/steps.py's compiled_train_steps around
                  train.train_step), in-memory batches and compiled test-set ELBO, one step
                  per call, the batch whole (--shards 1)
  fp32 1 shard    50 steps per call
  fp32            the batch in shards, a core each (train.py as it runs by default)
  bf16            train.py --precision bf16

Each is timed on its compiled step, a whole epoch and the test-set ELBO, as medians over
--repeats with the variants taking turns; a fp32 and a bf16 matmul timed in the same run,
and evaluate.py's IWAE bound, close the table. docs/speed.md explains each column.
"""

from __future__ import annotations

import time

LAUNCHED = time.perf_counter()  # before TensorFlow loads: start-up counts from here

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules

from machinery import cli, data_files, files, hardware, speed, steps  # noqa: E402  (TensorFlow, quietly)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import variants  # noqa: E402
from variants import SETTINGS, VARIANTS, Variant  # noqa: E402

import dataset  # noqa: E402
import train  # noqa: E402

IMPORTED = time.perf_counter()

MATMUL_SIZE = 2048


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description="Time training and evaluation against the "
                                            "tutorial's recipe; print a table, write JSON.")
    dataset.add_data_flags(parser, variants.DATASETS, pictures=False, folders=False)
    parser.add_argument("--train-size", type=cli.positive_int, default=None,
                        help="images in a timed epoch (default: all 60,000)")
    parser.add_argument("--repeats", type=cli.positive_int, default=3,
                        help="timings of each kind per variant; the table shows their median")
    parser.add_argument("--steps", type=cli.positive_int, default=200,
                        help="train steps per timing of the compiled step")
    parser.add_argument("--batch-size", type=cli.positive_int, default=train.BATCH_SIZE,
                        help="the batch of every variant (the tutorial's is 32)")
    parser.add_argument("--iw-samples", type=cli.positive_int, default=variants.IWAE_SAMPLES,
                        help="draws per image in the IWAE row, K (evaluate.py's --iw-samples)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--out-dir", default="output/benchmark",
                        help="folder for benchmark.json")
    return parser


# ----------------------------------------------------------------------------
# What the machine can do


def matmul_gflops(dtype: tf.DType, repeats: int) -> float:
    """The machine's dense matmul speed in GFLOP/s (median), compiled, one 2048^2 product."""
    a = tf.random.stateless_normal((MATMUL_SIZE, MATMUL_SIZE), seed=(1, 2), dtype=dtype)
    b = tf.random.stateless_normal((MATMUL_SIZE, MATMUL_SIZE), seed=(3, 4), dtype=dtype)
    matmul = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, b)[0, :1], tf.float32)))
    matmul()  # warm-up
    seconds = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        matmul().numpy()
        seconds.append(time.perf_counter() - start)
    return 2 * MATMUL_SIZE**3 / float(np.median(seconds)) / 1e9


# ----------------------------------------------------------------------------
# Each variant in a process of its own: TensorFlow's thread settings hold for a process


def timed(job: Callable[..., object], *arguments: object) -> tuple[float, object]:
    start = time.perf_counter()
    result = job(*arguments)
    return time.perf_counter() - start, result


def serve(name: str, data: str | None, dataset_name: str, train_size: int | None,
          batch_size: int, iw_samples: int, connection: Connection) -> None:
    """One variant, in a process of its own: set up, take a first step, report how long
    that took, then time what the parent asks until it says "stop"."""
    shards = speed.setup_shards(SETTINGS[name][2])  # before TensorFlow starts
    (train_images, _), (test_images, _) = dataset.load_data(data, train_size, name=dataset_name).splits
    variant = Variant(name, data_files.with_channels(train_images), data_files.with_channels(test_images),
                      shards, batch_size, iw_samples)
    variant.steps(1)
    connection.send({"to_first_step_seconds": time.perf_counter() - LAUNCHED,
                     "import_seconds": IMPORTED - LAUNCHED, "shards": shards,
                     "flops_per_step": variants.train_flops_per_image(variant.model) * batch_size,
                     "flops_per_decode": variants.decode_flops(variant.model)})
    jobs = {"steps": variant.steps, "epoch": variant.epoch, "evaluate": variant.evaluate,
            "iwae": variant.iwae}
    while (command := connection.recv()) != ("stop",):
        job, *arguments = command
        connection.send(timed(jobs[job], *arguments))
    connection.send(cli.peak_memory_gib())


class Worker:
    """The parent's end of a variant's process."""

    def __init__(self, name: str, data: str | None, train_size: int | None,
                 dataset_name: str = "mnist", batch_size: int = train.BATCH_SIZE,
                 iw_samples: int = variants.IWAE_SAMPLES) -> None:
        self.name = name
        self.connection, child_end = multiprocessing.Pipe()
        # spawn: a fresh interpreter, whose TensorFlow has not started yet
        self.process = multiprocessing.get_context("spawn").Process(
            target=serve, args=(name, data, dataset_name, train_size, batch_size, iw_samples, child_end),
            daemon=True)
        self.process.start()
        child_end.close()  # the child's alone now: its end closes when it stops
        self.ready: dict = self._answer()

    def _answer(self) -> Any:
        try:
            return self.connection.recv()
        except EOFError:
            self.process.join()
            raise cli.ScriptError(f"the {self.name} variant's process stopped (exit code "
                                  f"{self.process.exitcode})") from None

    def ask(self, *command: object) -> Any:
        """("steps", n), ("epoch", number), ("evaluate",) or ("iwae",): its (seconds, result)."""
        self.connection.send(command)
        return self._answer()

    def stop(self) -> float | None:
        """End the process; return its peak memory in GiB."""
        self.connection.send(("stop",))
        peak = self._answer()
        self.process.join()
        return peak


# ----------------------------------------------------------------------------
# The run


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    names = [name.strip() for name in args.variants.split(",")]
    if unknown := [name for name in names if name not in VARIANTS]:
        raise cli.UserError(f"--variants: unknown {', '.join(map(repr, unknown))}; choose from "
                            f"{', '.join(VARIANTS)}")
    out_dir = files.ensure_out_dir(args.out_dir)
    data = dataset.data_source(args.data)
    # Checked here, before any process starts.
    (train_images, _), (test_images, _) = dataset.load_data(data, args.train_size, name=args.dataset).splits
    variants.check_training_images(train_images, data or args.dataset, args.train_size, args.batch_size)

    # One process at a time starts, so that start-up is timed on a quiet machine. Start-up:
    # from a process's launch to the end of the first step train.py would take.
    workers = {name: Worker(name, data, args.train_size, args.dataset, args.batch_size, args.iw_samples)
               for name in names}
    first = workers.get("fp32") or next(iter(workers.values()))
    startup = {key: first.ready[key] for key in ("to_first_step_seconds", "import_seconds")}
    print(f"Start-up ({first.name}): {startup['to_first_step_seconds']:.1f} s from launch to the "
          f"first step (imports {startup['import_seconds']:.1f} s)")

    gflops_fp32 = matmul_gflops(tf.float32, args.repeats)
    gflops_bf16 = matmul_gflops(tf.bfloat16, args.repeats)
    flops_per_step = first.ready["flops_per_step"]
    print(f"Matmul {MATMUL_SIZE}^2: fp32 {gflops_fp32:.0f} GFLOP/s, bf16 {gflops_bf16:.0f} GFLOP/s; "
          f"a train step is {flops_per_step / 1e9:.2f} GFLOP at batch {args.batch_size}")

    for worker in workers.values():  # warm-up: tracing, and the first epoch's allocations
        worker.ask("steps", args.steps)
        worker.ask("epoch", 0)
        worker.ask("evaluate")
    timings = {name: {"step_seconds": [], "epoch_seconds": [], "eval_seconds": [], "test_elbo": []}
               for name in names}
    for repeat in range(args.repeats):
        for name, worker in workers.items():
            seconds, _ = worker.ask("steps", args.steps)
            timings[name]["step_seconds"].append(seconds / args.steps)
            seconds, _ = worker.ask("epoch", repeat + 1)
            timings[name]["epoch_seconds"].append(seconds)
            seconds, elbo = worker.ask("evaluate")
            timings[name]["eval_seconds"].append(seconds)
            timings[name]["test_elbo"].append(elbo)
            latest = {key: values[-1] for key, values in timings[name].items()}
            print(f"  repeat {repeat + 1}/{args.repeats} {name:15s} epoch {latest['epoch_seconds']:6.2f} s  "
                  f"step {latest['step_seconds'] * 1e3:6.2f} ms  evaluation {seconds:5.2f} s", flush=True)
    # evaluate.py's IWAE bound, in a process with TensorFlow's default threads as evaluate.py has
    iwae_worker = next((w for w in workers.values() if w.ready["shards"] == 1), first)
    iwae_worker.ask("iwae")  # warm-up
    iwae_seconds, decodes_per_call = zip(*(iwae_worker.ask("iwae") for _ in range(args.repeats)))
    decodes = decodes_per_call[0] / float(np.median(iwae_seconds))
    iwae_gflops = decodes * first.ready["flops_per_decode"] / 1e9
    iwae = {"variant": iwae_worker.name, "images": decodes_per_call[0] // args.iw_samples,
            "k": args.iw_samples, "seconds": list(iwae_seconds),
            "decodes_per_second": decodes, "gflops_per_second": iwae_gflops,
            "fraction_of_fp32_matmul": iwae_gflops / gflops_fp32}
    peaks = {name: worker.stop() for name, worker in workers.items()}
    emulated = hardware.bf16_is_emulated()

    baseline = names[0]

    def ratio(name: str, kind: str) -> float:
        """The median over repeats of each repeat's ratio: a slow spell of a shared machine
        tends to hit a repeat's variants alike."""
        pairs = zip(timings[name][kind], timings[baseline][kind])
        return float(np.median([seconds / baseline_seconds for seconds, baseline_seconds in pairs]))

    rows = []
    for name in names:
        step = float(np.median(timings[name]["step_seconds"]))
        epoch = float(np.median(timings[name]["epoch_seconds"]))
        evaluation = float(np.median(timings[name]["eval_seconds"]))
        rows.append({
            "variant": f"{name} (emulated)" if emulated and SETTINGS[name][0] == "bf16" else name,
            "ms_per_step": step * 1e3, "images_per_second": args.batch_size / step,
            "gflops_per_second": flops_per_step / step / 1e9,
            "fraction_of_fp32_matmul": flops_per_step / step / 1e9 / gflops_fp32,
            "epoch_seconds": epoch, "epoch_ratio": ratio(name, "epoch_seconds"),
            "eval_seconds": evaluation, "eval_ratio": ratio(name, "eval_seconds"),
            "peak_memory_gib": peaks[name],
        })
    print(f"\n{hardware.describe_cpu()}, {os.cpu_count()} cores"
          f"{'' if not tf.config.list_physical_devices('GPU') else ', with a GPU'}")
    print(f"Medians of {args.repeats}; epoch = {len(train_images):,} images, input pipeline "
          f"included; ratios: the median of each repeat's ratio to {baseline}\n")
    header = (f"| {'variant':15s} | ms/step | images/s | GFLOP/s | of fp32 matmul | epoch s | "
              f"epoch ratio | eval s | eval ratio | peak GiB |")
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for row in rows:
        print(f"| {row['variant']:15s} | {row['ms_per_step']:7.2f} | {row['images_per_second']:8.0f} | "
              f"{row['gflops_per_second']:7.1f} | {row['fraction_of_fp32_matmul']:14.2f} | "
              f"{row['epoch_seconds']:7.2f} | {row['epoch_ratio']:11.2f} | {row['eval_seconds']:6.2f} | "
              f"{row['eval_ratio']:10.2f} | {row['peak_memory_gib'] or float('nan'):8.2f} |")
    print("\npeak GiB: the peak memory (RSS) of the variant's process" + (
        "; emulated: bfloat16 is slower than float32 here (machinery/hardware.py)" if emulated else ""))
    print(f"IWAE bound (evaluate.py, in {iwae_worker.name}'s process), {iwae['images']} images "
          f"x K = {iwae['k']}: "
          f"{decodes:,.0f} decodes/s, {iwae['gflops_per_second']:.1f} GFLOP/s, "
          f"{iwae['fraction_of_fp32_matmul']:.2f} of the fp32 matmul")

    report = {
        "machine": {"platform": platform.platform(), "cpu": hardware.cpu_name(),
                    "instruction_sets": hardware.instruction_sets(),
                    "bf16_maths": hardware.has_bf16_maths(), "bf16_emulated": emulated,
                    "cpus": os.cpu_count(),
                    "gpus": len(tf.config.list_physical_devices("GPU")),
                    "tensorflow": tf.__version__},
        "settings": {"batch_size": args.batch_size, "train_images": len(train_images),
                     "test_images": len(test_images), "repeats": args.repeats, "steps": args.steps,
                     "steps_per_call": steps.STEPS_PER_CALL,
                     "shards": {name: worker.ready["shards"] for name, worker in workers.items()}},
        "startup": startup,
        "matmul_gflops": {"fp32": gflops_fp32, "bf16": gflops_bf16},
        "train_flops_per_step": flops_per_step,
        "table": rows,
        "iwae": iwae,
        "timings": timings,
    }
    path = out_dir / "benchmark.json"
    with files.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Wrote {path}")


if __name__ == "__main__":
    cli.run(main)
