"""Many devices with tf.distribute: --strategy and --devices, each replica's part of a
batch, which process writes the run's outputs, and a line saying what the run runs on."""

from __future__ import annotations

import argparse
import os

from machinery import cli, hardware

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multiworker")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", choices=STRATEGIES, default="default",
                        help="default: one device (the GPU if there is one); mirrored: "
                             "tf.distribute.MirroredStrategy over --devices; multiworker: "
                             "MultiWorkerMirroredStrategy over the machines in $TF_CONFIG")
    parser.add_argument("--devices", default=None,
                        help="for --strategy mirrored, a comma-separated device list such as "
                             "\"GPU:0,GPU:1\" (default: every local GPU, else the CPU)")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _device_key(name: str) -> tuple[str, int | None] | None:
    try:
        spec = tf.DeviceSpec.from_string(name)
    except ValueError:
        return None
    return (spec.device_type or "").upper(), spec.device_index


def make_strategy(name: str, devices: str | None = None) -> tf.distribute.Strategy:
    """The tf.distribute strategy for --strategy and --devices."""
    if devices and name != "mirrored":
        raise cli.UserError(f"--devices is for --strategy mirrored, not --strategy {name}")
    if name == "mirrored":
        here = {_device_key(device.name): device.name for device in tf.config.list_logical_devices()}
        names = [device.strip() for device in devices.split(",")] if devices else None
        for device in names or ():
            if _device_key(device) not in here:
                raise cli.UserError(f"--devices: no device {device!r} here; there are "
                                    f"{', '.join(sorted(here.values()))}")
        return tf.distribute.MirroredStrategy(names)
    if name == "multiworker":
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()  # the cluster: $TF_CONFIG
        except ValueError as error:
            raise cli.UserError(f"--strategy multiworker: $TF_CONFIG is not a usable cluster "
                                f"description ({cli.first_line(error)})") from None
    return tf.distribute.get_strategy()


def describe(strategy: tf.distribute.Strategy, shards: int = 1) -> str:
    """One line: the devices a run computes on, and how."""
    if isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)):
        devices = ", ".join(name.split("device:")[-1] for name in strategy.extended.worker_devices)
        where = f"{devices} ({type(strategy).__name__})"
    elif gpus := tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpus[0])
        where = f"GPU:0 ({details.get('device_name', 'a GPU')})"
    else:
        where = f"CPU, {available_cores()} cores: {hardware.describe_cpu()}; no GPU found"
    if shards > 1:
        where += f"; each batch in {shards} shards side by side (--shards)"
    return f"Device: {where}"


def replica_batch(tensor: tf.Tensor) -> tf.Tensor:
    """This replica's batch: its consecutive part of the global batch's first axis (all of it
    on one device)."""
    context = tf.distribute.get_replica_context()
    replica, replicas = context.replica_id_in_sync_group, context.num_replicas_in_sync
    if replicas == 1:
        return tensor
    known = tf.get_static_value(replica)  # static slices, where the id is known
    return consecutive_part(tensor, int(known) if known is not None else replica, replicas)


def consecutive_part(tensor: tf.Tensor, index: int | tf.Tensor, count: int) -> tf.Tensor:
    """The `index`-th of `count` consecutive, near-equal parts of `tensor`'s first axis."""
    if count == 1:
        return tensor
    size = tensor.shape[0] if tensor.shape[0] is not None else tf.shape(tensor)[0]
    return tensor[size * index // count:size * (index + 1) // count]


def checkpoint_folder(strategy: tf.distribute.Strategy) -> str:
    """Where this process keeps its checkpoints, in its run folder: the chief in checkpoints/,
    another worker in checkpoints-worker-N/, for its own --resume (a shared folder or not)."""
    if is_chief(strategy):
        return "checkpoints"
    return f"checkpoints-{strategy.cluster_resolver.task_type}-{strategy.cluster_resolver.task_id}"


def from_every_worker(strategy: tf.distribute.Strategy, value: int) -> list[int]:
    """`value` as each worker of a multi-worker run has it (every worker must ask)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return [value]
    gathered = strategy.gather(strategy.run(lambda: tf.constant([value], tf.int64)), axis=0)
    return [int(each) for each in gathered.numpy()]


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Wait here until every worker of a multi-worker run has come here too."""
    from_every_worker(strategy, 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's outputs: always, but in a multi-worker run,
    where only the chief (or worker 0, if no task is named chief) does."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())
