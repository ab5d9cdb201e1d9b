"""How fast the CVAE trains and evaluates on this machine, next to the tutorial's recipe.

    python benchmarks/benchmark.py --data mnist.npz          # about 9 minutes on 2 cores
    python benchmarks/benchmark.py --train-size 12800 --repeats 1   # a quick look

Each variant trains the same model, from the same start, with batch 32, in a process of
its own (TensorFlow's thread settings hold for a whole process). Each adds one idea to
the one above it:

  tutorial        the tutorial's code: its loss and its logits layer's kernel, a
                  shuffle(60000).batch(32) pipeline, one step per tf.function call, an
                  eager test-set ELBO at batch 32, TensorFlow's default threads
  fp32 1/call     train.py's step (network.py's loss and layers), in-memory batches and
                  compiled test-set ELBO, one step per call, the batch whole (--shards 1)
  fp32 1 shard    50 steps per call
  fp32            the batch in shards, a core each (train.py as it runs by default)
  bf16            train.py --precision bf16

Each is timed three ways: the compiled train step alone (on batches already in memory,
after warm-up), a whole epoch (the input pipeline included) and the test-set ELBO. The
figures are medians over --repeats, the variants taking turns, so that a slow moment of
a shared machine hits them alike. A fp32 and a bf16 matmul, timed in the same run, show
what the machine can do: the step's GFLOP/s are given as a fraction of the fp32 one.
The table is printed and written with every raw timing to --out-dir/benchmark.json.
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

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import cli  # noqa: E402
import dataset  # noqa: E402
import network  # noqa: E402
import train  # noqa: E402

IMPORTED = time.perf_counter()
BATCH_SIZE = train.BATCH_SIZE
# Each variant's (--precision, steps per call, --shards); None: train.py's default.
SETTINGS = {"tutorial": ("fp32", 1, 1), "fp32 1/call": ("fp32", 1, 1),
            "fp32 1 shard": ("fp32", train.STEPS_PER_CALL, 1),
            "fp32": ("fp32", train.STEPS_PER_CALL, None),
            "bf16": ("bf16", train.STEPS_PER_CALL, None)}
VARIANTS = tuple(SETTINGS)
WHOLE_BATCH = tuple(name for name, (_, _, shards) in SETTINGS.items() if shards == 1)
MATMUL_SIZE = 2048


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description="Time training and evaluation against the "
                                            "tutorial's recipe; print a table, write JSON.")
    parser.add_argument("--data", default=None,
                        help=f"Keras .npz or folder of MNIST IDX files; default "
                             f"${dataset.DATA_ENV_VAR}, else the Keras download")
    parser.add_argument("--train-size", type=cli.positive_int, default=None,
                        help="images in a timed epoch (default: all 60,000)")
    parser.add_argument("--repeats", type=cli.positive_int, default=3,
                        help="timings of each kind per variant; the table shows their median")
    parser.add_argument("--steps", type=cli.positive_int, default=200,
                        help="train steps per timing of the compiled step")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--out-dir", default="output/benchmark",
                        help="folder for benchmark.json")
    return parser


# ----------------------------------------------------------------------------
# Work per step, and what the machine can do


def forward_flops(model: network.CVAE) -> tuple[int, int]:
    """Multiply-adds x 2 of one image's forward pass, counted from the layer shapes, and
    those of the first layer alone (whose input, the image, needs no gradient)."""
    per_layer = []
    for layer in model.encoder.layers + model.decoder.layers:
        if isinstance(layer, tf.keras.layers.Conv2DTranspose):  # each input pixel spreads a kernel
            _, height, width, channels = layer.input.shape
            kernel = np.prod(layer.kernel_size)
            per_layer.append(2 * height * width * channels * kernel * layer.filters)
        elif isinstance(layer, tf.keras.layers.Conv2D):  # each output pixel gathers a kernel
            _, height, width, filters = layer.output.shape
            kernel = np.prod(layer.kernel_size) * layer.input.shape[-1]
            per_layer.append(2 * height * width * filters * kernel)
        elif isinstance(layer, tf.keras.layers.Dense):
            per_layer.append(2 * layer.input.shape[-1] * layer.units)
    return int(sum(per_layer)), int(per_layer[0])


def train_flops_per_image(model: network.CVAE) -> int:
    """A train step's FLOPs per image: the forward pass, then backward the gradients of
    every layer's weights (as much again) and inputs (again, but for the first layer)."""
    forward, first_layer = forward_flops(model)
    return 3 * forward - first_layer


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
# The variants: each gives the same three things to time


def tutorial_loss(model: network.CVAE, x: tf.Tensor) -> tf.Tensor:
    """The tutorial's compute_loss as it is written there. network.compute_loss computes
    the same loss, with gradients that add two numbers at a time (see network.py)."""
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar)
    x_logit = model.decode(z)
    cross_ent = tf.nn.sigmoid_cross_entropy_with_logits(logits=x_logit, labels=x)
    logpx_z = -tf.reduce_sum(cross_ent, axis=[1, 2, 3])
    logpz = network.log_normal_pdf(z, 0.0, 0.0)
    logqz_x = network.log_normal_pdf(z, mean, logvar)
    return -tf.reduce_mean(logpx_z + logpz - logqz_x)


class Variant:
    """A model and optimizer set up one variant's way, with its three timed jobs:
    `steps(n)` (the compiled step alone), `epoch(number)` and `evaluate()`."""

    steps: Callable[[int], None]
    epoch: Callable[[int], None]
    evaluate: Callable[[], float]

    def __init__(self, name: str, train_images: np.ndarray, test_images: np.ndarray,
                 shards: int) -> None:
        self.name = name
        tf.keras.utils.set_random_seed(train.SEED)  # every variant starts from the same weights
        precision, steps_per_call, _ = SETTINGS[name]
        self.model = network.CVAE(train.LATENT_DIM, precision)
        self.optimizer = tf.keras.optimizers.Adam(train.LEARNING_RATE)
        self.optimizer.build(self.model.trainable_variables)
        if name == "tutorial":
            self.model.decoder.layers[-1].allow_depthwise = False  # the tutorial's kernel
            self._tutorial(train_images, test_images)
        else:
            self._port(train_images, test_images,
                       steps_per_call=steps_per_call, shards=shards)

    def _tutorial(self, train_images: np.ndarray, test_images: np.ndarray) -> None:
        model, optimizer = self.model, self.optimizer

        @tf.function
        def train_step(x: tf.Tensor) -> None:  # the tutorial's, noise drawn inside
            with tf.GradientTape() as tape:
                loss = tutorial_loss(model, x)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))

        train_dataset = (tf.data.Dataset.from_tensor_slices(train_images)
                         .shuffle(len(train_images)).batch(BATCH_SIZE))
        test_dataset = (tf.data.Dataset.from_tensor_slices(test_images)
                        .shuffle(len(test_images)).batch(BATCH_SIZE))
        in_memory = [tf.constant(train_images[i * BATCH_SIZE:(i + 1) * BATCH_SIZE])
                     for i in range(len(train_images) // BATCH_SIZE)]

        def steps(count: int) -> None:
            for i in range(count):
                train_step(in_memory[i % len(in_memory)])
            optimizer.iterations.numpy()  # wait for the last step

        def epoch(number: int) -> None:
            for x in train_dataset:
                train_step(x)
            optimizer.iterations.numpy()

        def evaluate() -> float:  # eager, batch 32
            loss = tf.keras.metrics.Mean()
            for x in test_dataset:
                loss(tutorial_loss(model, x))
            return -float(loss.result())

        self.steps, self.epoch, self.evaluate = steps, epoch, evaluate

    def _port(self, train_images: np.ndarray, test_images: np.ndarray, steps_per_call: int,
              shards: int) -> None:
        rng = tf.random.Generator.from_seed(train.SEED)
        train_steps = train.make_train_function(self.model, self.optimizer, rng, shards=shards)
        train_tensor = tf.constant(train_images)
        test_batches = dataset.make_batches(test_images, train.EVAL_BATCH_SIZE)
        num_full_batches = len(train_images) // BATCH_SIZE

        def steps(count: int) -> None:
            images = train_tensor[:min(count, num_full_batches) * BATCH_SIZE]
            for _ in train.epoch_losses(train_steps, images, BATCH_SIZE, steps_per_call):
                pass

        def epoch(number: int) -> None:  # what train.fit does, less its outputs
            images = dataset.epoch_images(train_tensor, train.SEED, number)
            for _ in train.epoch_losses(train_steps, images, BATCH_SIZE, steps_per_call):
                pass

        self.steps, self.epoch = steps, epoch
        self.evaluate = lambda: train.evaluate(self.model, test_batches, rng, shards=shards)


def timed(job: Callable[..., object], *arguments: object) -> tuple[float, object]:
    start = time.perf_counter()
    result = job(*arguments)
    return time.perf_counter() - start, result


def serve(name: str, data: str | None, train_size: int | None, connection: Connection) -> None:
    """One variant, in a process of its own: set up, take a first step, report how long
    that took, then time what the parent asks until it says "stop"."""
    shards = train.setup_shards(SETTINGS[name][2])  # before TensorFlow starts
    (train_images, _), (test_images, _) = dataset.load_mnist(data, train_size)
    variant = Variant(name, dataset.binarize(train_images), dataset.binarize(test_images), shards)
    variant.steps(1)
    connection.send({"to_first_step_seconds": time.perf_counter() - LAUNCHED,
                     "import_seconds": IMPORTED - LAUNCHED, "shards": shards,
                     "flops_per_step": train_flops_per_image(variant.model) * BATCH_SIZE})
    jobs = {"steps": variant.steps, "epoch": variant.epoch, "evaluate": variant.evaluate}
    while (command := connection.recv()) != ("stop",):
        job, *arguments = command
        connection.send(timed(jobs[job], *arguments))
    connection.send(cli.peak_memory_gib())


class Worker:
    """The parent's end of a variant's process."""

    def __init__(self, name: str, data: str | None, train_size: int | None) -> None:
        self.name = name
        self.connection, child_end = multiprocessing.Pipe()
        # spawn: a fresh interpreter, whose TensorFlow has not started yet
        self.process = multiprocessing.get_context("spawn").Process(
            target=serve, args=(name, data, train_size, child_end), daemon=True)
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
        """("steps", n), ("epoch", number) or ("evaluate",): its (seconds, result)."""
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
    out_dir = cli.ensure_out_dir(args.out_dir)
    data = dataset.data_source(args.data)
    (train_images, _), (test_images, _) = dataset.load_mnist(data, args.train_size)  # checked here
    if len(train_images) < BATCH_SIZE:
        raise cli.UserError(f"--train-size {args.train_size}: an epoch needs at least "
                            f"{BATCH_SIZE} images")

    # One process at a time starts, so that start-up is timed on a quiet machine. Start-up:
    # from a process's launch to the end of the first step train.py would take.
    workers = {name: Worker(name, data, args.train_size) for name in names}
    first = workers.get("fp32") or next(iter(workers.values()))
    startup = {key: first.ready[key] for key in ("to_first_step_seconds", "import_seconds")}
    print(f"Start-up ({first.name}): {startup['to_first_step_seconds']:.1f} s from launch to the "
          f"first step (imports {startup['import_seconds']:.1f} s)")

    gflops_fp32 = matmul_gflops(tf.float32, args.repeats)
    gflops_bf16 = matmul_gflops(tf.bfloat16, args.repeats)
    flops_per_step = first.ready["flops_per_step"]
    print(f"Matmul {MATMUL_SIZE}^2: fp32 {gflops_fp32:.0f} GFLOP/s, bf16 {gflops_bf16:.0f} GFLOP/s; "
          f"a train step is {flops_per_step / 1e9:.2f} GFLOP at batch {BATCH_SIZE}")

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
    peaks = {name: worker.stop() for name, worker in workers.items()}

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
            "variant": name, "ms_per_step": step * 1e3, "images_per_second": BATCH_SIZE / step,
            "gflops_per_second": flops_per_step / step / 1e9,
            "fraction_of_fp32_matmul": flops_per_step / step / 1e9 / gflops_fp32,
            "epoch_seconds": epoch, "epoch_ratio": ratio(name, "epoch_seconds"),
            "eval_seconds": evaluation, "eval_ratio": ratio(name, "eval_seconds"),
            "peak_memory_gib": peaks[name],
        })
    print(f"\nMedians of {args.repeats}; epoch = {len(train_images):,} images, input pipeline "
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
    print("\npeak GiB: the peak memory (RSS) of the variant's process")

    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(),
                    "gpus": len(tf.config.list_physical_devices("GPU")),
                    "tensorflow": tf.__version__},
        "settings": {"batch_size": BATCH_SIZE, "train_images": len(train_images),
                     "test_images": len(test_images), "repeats": args.repeats, "steps": args.steps,
                     "steps_per_call": train.STEPS_PER_CALL,
                     "shards": {name: worker.ready["shards"] for name, worker in workers.items()}},
        "startup": startup,
        "matmul_gflops": {"fp32": gflops_fp32, "bf16": gflops_bf16},
        "train_flops_per_step": flops_per_step,
        "table": rows,
        "timings": timings,
    }
    path = out_dir / "benchmark.json"
    with cli.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Wrote {path}")


if __name__ == "__main__":
    cli.run(main)
