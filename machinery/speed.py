"""Threads for the shards: one core an op and several ops at once, for a batch cut into
shards side by side (--shards; train.train_step computes them, machinery/steps.py cuts them).
docs/speed.md says what it buys, measured."""

from __future__ import annotations

import argparse

from machinery import cli, distribute

import tensorflow as tf

# ----------------------------------------------------------------------------
# Threads: each batch in shards side by side, a core each


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=cli.positive_int, default=None,
                        help="cut each batch into N shards computed side by side, the cores "
                             "shared among them (default: 2 with --strategy default on a "
                             "machine with no GPU and 2 or more cores, else 1); the results "
                             "are the same to float rounding, and repeat bit for bit on 2 "
                             "cores (with more, each op has more than one thread)")


def setup_shards(requested: int | None = None, strategy_name: str = "default") -> int:
    """How many shards to cut each batch into (--shards), with TensorFlow's threads set
    for them: that many ops at once, the cores shared among them. By default 2 on one
    CPU device of 2 or more cores, else 1; and 1 where TensorFlow started already."""
    cores = distribute.available_cores()
    shards = requested or (2 if strategy_name == "default" and cores >= 2
                           and not tf.config.list_physical_devices("GPU") else 1)
    if shards == 1:
        return 1
    threads = (shards, max(1, cores // shards))  # inter-op, intra-op
    try:
        tf.config.threading.set_inter_op_parallelism_threads(threads[0])
        tf.config.threading.set_intra_op_parallelism_threads(threads[1])
    except RuntimeError:  # TensorFlow has started: thread settings are fixed now
        started_with = (tf.config.threading.get_inter_op_parallelism_threads(),
                        tf.config.threading.get_intra_op_parallelism_threads())
        if started_with != threads and requested is None:
            return 1  # faster than 2 shards on the default threads
    return shards
