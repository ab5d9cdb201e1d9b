"""A training run's start and end, around train.py's loop: the threads and the
tf.distribute strategy, the run folder (checked, and set up by the chief before the other
workers of a multi-worker run touch it), the seed; and an error of the machine or a lost
worker or a device, which ends the run in one line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

from machinery import cli, distribute, faults, hardware, references, run_folder, speed

import tensorflow as tf


@dataclasses.dataclass
class Devices:
    strategy: tf.distribute.Strategy
    shards: int  # each batch (each replica batch) in this many shards side by side
    chief: bool  # whether this process writes the run's pictures, metrics and export


@contextlib.contextmanager
def training(args: argparse.Namespace, given: set[str], read_data: run_folder.DataReader,
             choices: Mapping[str, Collection[str]], test_images_needed: int = 1
             ) -> Iterator[tuple[run_folder.Run, Devices]]:
    """Set up the run that train.py's flags ask for (`given`: the flags typed; its data read
    by `read_data`; at least `test_images_needed`, the sample grid's; as run_folder.prepare_run)
    and yield it with its devices; a full disk or a lost worker then ends it in one line."""
    shards = speed.setup_shards(args.shards, args.strategy)  # before TensorFlow starts
    if args.strategy == "multiworker":
        cli.hide_native_logs()  # its cluster's logs, and a lost worker's pages of gRPC errors
    strategy = distribute.make_strategy(args.strategy, args.devices)
    chief, checkpoint_folder = distribute.is_chief(strategy), distribute.checkpoint_folder(strategy)
    out_dir = Path(args.out_dir)
    try:
        if not chief:  # the chief checks and sets up the run folder first: it may be shared
            distribute.barrier(strategy)
        run = run_folder.prepare_run(args, given, read_data, choices, chief, checkpoint_folder,
                                     test_images_needed)
        if chief:
            distribute.barrier(strategy)
        out_dir = run.out_dir
        print(distribute.describe(strategy, shards))
        if run.settings.precision == "bf16" and (warning := hardware.bf16_warning()):
            print(warning)
        for line in run.data_report:
            print(f"Data: {line}")
        settings = run.settings
        if settings.beta != 1 or settings.kl_warmup or settings.kl_cycle:
            schedule = ""
            if settings.kl_warmup:
                schedule = f", rising from 0 over the first {settings.kl_warmup:g} epochs"
            elif settings.kl_cycle:
                schedule = f", rising from 0 in each cycle of {settings.kl_cycle:g} epochs"
            print(f"The training loss weighs the KL term by --beta {settings.beta:g}{schedule}; the "
                  f"test ELBO is the ELBO itself (B = 1)")
        if advice := references.advice(settings):
            print(advice)
        print(f"Training on {len(run.train_images):,} images, testing on {len(run.test_images):,}; "
              f"writing to {out_dir}/")
        # The same seed must give the same run: the weights start from it, and deterministic
        # kernels keep a resumed run bit-identical (on a GPU: deterministic convolutions).
        tf.config.experimental.enable_op_determinism()
        tf.keras.utils.set_random_seed(run.settings.seed)
        yield run, Devices(strategy, shards, chief)
    except Exception as error:
        if not faults.ends_run(error):
            raise
        raise faults.interrupted(error, out_dir, out_dir / checkpoint_folder) from None
    if chief and (peak := cli.peak_memory_gib()) is not None:
        print(f"Peak memory (RSS): {peak:.2f} GiB")
