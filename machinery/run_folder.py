"""The run folder: a new run, a resumed one, or a refusal before anything is written.

config.json holds a run's settings and a fingerprint of its data: --resume continues from
the latest intact checkpoint with them, and --overwrite replaces the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from machinery import cli, files, image_folder

import numpy as np
import tensorflow as tf

import dataset
import network

OUT_DIR = "output"
# Settings fixed for a run's life: --resume refuses a flag that contradicts them.
# (--epochs may change: resuming with more epochs trains a finished run further.)
RUN_SETTINGS = ("latent_dim", "batch_size", "learning_rate", "seed", "train_size", "test_size",
                "kl", "dataset", "precision", "filters", "likelihood", "image_size", "channels",
                "test_fraction", "beta", "conditional")
# A setting's value where config.json lacks it (a run older than the setting).
SETTING_DEFAULTS = {"kl": "mc", "dataset": "mnist", "precision": "fp32", "filters": None,
                    "likelihood": "bernoulli", "image_shape": list(network.IMAGE_SHAPE),
                    "image_size": None, "channels": None, "beta": 1.0, "conditional": False,
                    "test_fraction": image_folder.DEFAULT_TEST_FRACTION, "class_names": None}
CONFIG_TYPES = {"epochs": int, "latent_dim": int, "batch_size": int, "learning_rate": (int, float),
                "seed": int, "train_size": (int, type(None)), "test_size": (int, type(None)),
                "kl": str, "dataset": str, "precision": str, "filters": (int, type(None)),
                "likelihood": str, "image_shape": list, "data": (str, type(None)),
                "data_sha256": str, "image_size": (list, type(None)), "channels": (int, type(None)),
                "test_fraction": float, "class_names": (list, type(None)), "beta": (int, float),
                "conditional": bool}
# What a run (train.py, then export.py, evaluate.py, generate.py) writes in its folder:
# --overwrite removes these alone.
RUN_OUTPUTS = ("config.json", "metrics.csv", "checkpoints", "checkpoints-*", "tensorboard",
               "image_at_epoch_*.png", "cvae.gif", "latent_manifold.png", network.KERAS_FILE,
               network.SAVEDMODEL_DIR, "evaluation.json", "reconstructions.png", "prior_samples.png",
               "latent_space.png", "interpolation.png", "training_curves.png", "generated.*", "analogies.png",
               ".evaluation-kept.npz", ".*.tmp.*")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """--out-dir, --resume and --overwrite."""
    parser.add_argument("--out-dir", default=OUT_DIR, help="folder for everything the run writes")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its last complete epoch, "
                             "with the settings stored there")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out-dir (refused without this "
                             "or --resume)")


# ----------------------------------------------------------------------------
# config.json, the data, and where to start


def holds_run(out_dir: Path, outputs: tuple[str, ...] = RUN_OUTPUTS) -> bool:
    return any(any(out_dir.glob(pattern)) for pattern in outputs)


def load_config(out_dir: Path) -> dict:
    """The run's config.json, checked: every setting present, of the right type."""
    path = out_dir / "config.json"
    if not path.is_file():
        raise cli.UserError(f"no run in {out_dir} (no config.json); start one with "
                            f"python train.py --out-dir {out_dir}")
    try:
        config = {**SETTING_DEFAULTS, **json.loads(path.read_text())}
    except (ValueError, TypeError, OSError) as error:
        raise cli.UserError(f"{path} is damaged ({cli.first_line(error)})") from None
    for key, kinds in CONFIG_TYPES.items():
        value = config.get(key)
        if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
            raise cli.UserError(f"{path} is damaged: {key} is missing or of the wrong type")
    for key, known in (("kl", network.KL_ESTIMATORS), ("dataset", dataset.KERAS_DATASETS),
                       ("precision", network.PRECISIONS), ("likelihood", network.LIKELIHOODS)):
        if config[key] not in known:
            raise cli.UserError(f"{path} is damaged: unknown {key} {config[key]!r}")
    shape = config["image_shape"]
    if len(shape) != 3 or not all(isinstance(side, int) and not isinstance(side, bool) for side in shape):
        raise cli.UserError(f"{path} is damaged: image_shape {shape!r} is not (height, width, channels)")
    if problem := image_folder.image_shape_problem(shape):
        raise cli.UserError(f"{path} is damaged: image_shape {shape!r}: {problem}")
    return config


def load_run_data(config: dict, source: str | None, out_dir: Path, check: bool) -> dataset.Data:
    """The run's data as its config says; with `check`, refuse data whose fingerprint is
    not the one the run was trained on (a folder's: its files, and how they were read)."""
    try:
        data = dataset.load_data(source, config["train_size"], config["test_size"], config["dataset"],
                                 image_folder.settings(config), config["data_sha256"] if check else None)
    except image_folder.Changed:
        data = None
    if check and (data is None or data.fingerprint != config["data_sha256"]):
        raise cli.UserError(f"the data from {source or 'the Keras download'} is not the data the "
                            f"run in {out_dir} was trained on (a file added, removed or changed?); "
                            f"pass that with --data")
    return data


def class_names(config: dict) -> tuple[str, ...]:
    """What a run's labels 0, 1, .. mean: its data's class names (or its --dataset's)."""
    return tuple(config["class_names"] or dataset.CLASS_NAMES[config["dataset"]])


def checkpoint_epoch(prefix: str | Path | None) -> int:
    """The epoch a checkpoint (checkpoints/ckpt-N, or its ckpt-N.index) marks complete; 0 for none."""
    return int(Path(prefix).stem.split("-")[1]) if prefix else 0


def latest_intact_checkpoint(directory: Path) -> tuple[str | None, int]:
    """The newest checkpoint whose every tensor reads back (checksums included), skipping
    damaged ones with a note, and its epoch; (None, 0) if there is none yet."""
    paths = sorted(directory.glob("ckpt-*.index"), key=checkpoint_epoch)
    damaged = []
    for index in reversed(paths):
        prefix = str(index.with_suffix(""))
        try:
            reader = tf.train.load_checkpoint(prefix)
            tensors = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
        except (tf.errors.OpError, ValueError) as error:
            damaged.append(f"{index.stem} ({cli.first_line(error)[:100]})")
            continue
        for note in damaged:
            print(f"Checkpoint {note} is damaged; using {index.stem}, the one before it")
        return prefix, int(tensors["epoch/.ATTRIBUTES/VARIABLE_VALUE"])
    if damaged:
        raise cli.UserError(f"--resume: no intact checkpoint in {directory}: {'; '.join(damaged)}")
    return None, 0


def new_model(config: dict, **options) -> network.CVAE:
    """An untrained CVAE of the run's settings (and `options`: another logits_layer, say)."""
    return network.CVAE(latent_dim=config["latent_dim"], precision=config["precision"],
                        filters=config["filters"], image_shape=config["image_shape"],
                        likelihood=config["likelihood"],
                        num_classes=len(class_names(config)) if config["conditional"] else 0, **options)


def restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
    """Restore `path` into `checkpoint`, or say in one line why its variables do not fit."""
    try:
        checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
    except AssertionError as error:
        raise cli.UserError(f"{path} does not fit the model that config.json describes (a checkpoint "
                            f"of a bf16 run made before its float32 biases?): {cli.first_line(error)[:120]}"
                            ) from None


def load_trained_model(out_dir: Path, **options) -> tuple[network.CVAE, dict, str, int]:
    """The run's model (built with `options`, as new_model) at its latest intact checkpoint;
    with the run's config, that checkpoint's path and its epoch."""
    if not out_dir.is_dir():
        raise cli.UserError(f"--out-dir {out_dir}: no such folder")
    config = load_config(out_dir)
    checkpoint_path, epoch = latest_intact_checkpoint(out_dir / "checkpoints")
    if checkpoint_path is None:
        raise cli.UserError(f"{out_dir} has no checkpoint yet")
    model = new_model(config, **options)
    restore(tf.train.Checkpoint(model=model), checkpoint_path)
    return model, config, checkpoint_path, epoch


def agreed_checkpoint(resume_from: str | None, epochs: list[int], folder: Path) -> str | None:
    """The checkpoint that this worker resumes from: that of the last epoch every worker has
    (`epochs`: each one's latest), from its own `folder` or the chief's checkpoints/ beside."""
    epoch = min(epochs)
    if epoch == max(epochs):
        return resume_from
    for candidate in (folder, folder.parent / "checkpoints"):
        if epoch and (candidate / f"ckpt-{epoch}.index").exists():
            return str(candidate / f"ckpt-{epoch}")
    raise cli.UserError(f"the workers cannot resume together: their last complete epochs are "
                        f"{epoch} to {max(epochs)}, and {folder} has no checkpoint of epoch {epoch}; "
                        f"give every worker its own folder back, or one shared run folder")


@dataclasses.dataclass
class Run:
    config: dict  # the settings, as stored in config.json
    out_dir: Path
    train_images: np.ndarray  # uint8 (N, H, W, C): train.fit prepares a batch at a time
    test_images: np.ndarray
    train_labels: np.ndarray  # (N,): a conditional model's classes, and the pictures'
    test_labels: np.ndarray
    resume_from: str | None  # the checkpoint to continue from, if any
    data_report: list[str] = dataclasses.field(default_factory=list)  # a folder's: what became of its files


def hold(out_dir: Path) -> None:
    """Hold the run folder for the rest of this process; refuse it while another holds it."""
    if holder := files.hold_folder(out_dir):
        raise cli.UserError(f"{out_dir} is in use by a run in progress (process {holder}); let it "
                            f"finish or stop it first, or use another --out-dir")


def prepare_run(args: argparse.Namespace, given: set[str], chief: bool = True,
                checkpoint_folder: str = "checkpoints", test_images_needed: int = 1) -> Run:
    """Settle the run's settings, data and starting point from the flags (`given`: those
    typed) and the run folder. A new run takes the flags; --resume takes config.json and
    refuses a flag or data that contradicts it. Every check comes before the first write,
    and the `chief` holds the folder from then on. (Another worker keeps its checkpoints in
    its own `checkpoint_folder`, or finds the chief's in a shared run folder; the test set must
    hold `test_images_needed`.)"""
    if args.resume and args.overwrite:
        raise cli.UserError("--resume continues the run in --out-dir and --overwrite replaces it: "
                            "choose one")
    out_dir = files.ensure_out_dir(args.out_dir)
    # What this process answers for: the whole run; or, for another worker, its checkpoints
    # (in one shared run folder, the chief's files are the chief's to check and replace).
    own_outputs = RUN_OUTPUTS if chief else (checkpoint_folder,)
    flags = {key: getattr(args, key) for key in ("epochs", *RUN_SETTINGS)}
    if args.resume:
        config = load_config(out_dir)
        for key in sorted(given & set(RUN_SETTINGS)):
            if flags[key] != config[key]:
                flag = "--" + key.replace("_", "-")
                raise cli.UserError(f"{flag} {flags[key]} contradicts the run in {out_dir}, which has "
                                    f"{flag} {config[key]}; drop the flag to resume it, or start a "
                                    f"new run in another --out-dir")
        if "epochs" in given:
            config["epochs"] = flags["epochs"]
        source = args.data or config["data"]
    else:
        if holds_run(out_dir, own_outputs) and not args.overwrite:
            raise cli.UserError(f"{out_dir} already holds a run; continue it with --resume, or "
                                f"replace it with --overwrite")
        source = dataset.data_source(args.data)
        config = dict(flags)
    config["data"] = str(Path(source).resolve()) if source else None  # where it is now

    data = load_run_data(config, source, out_dir, check=args.resume)
    (train_images, train_labels), (test_images, test_labels) = data.splits
    config["data_sha256"] = data.fingerprint
    if not (args.resume and config["class_names"]):  # a resumed run keeps its classes, and its model
        config["class_names"] = list(data.class_names)
    if config["conditional"] and len(data.class_names) < 2:
        raise cli.UserError(f"--conditional needs images of two classes or more; "
                            f"{source or 'the data'} has one")
    if len(test_images) < test_images_needed:
        raise cli.UserError(f"the sample grid needs {test_images_needed} test images, "
                            f"got {len(test_images)}")
    config["image_shape"] = list(dataset.image_shape(train_images))  # the model's shapes follow
    config["likelihood"] = config["likelihood"] or dataset.default_likelihood(data)
    resume_from, done = None, 0
    if args.resume:  # this worker's checkpoints, else (one shared run folder) the chief's
        for folder in dict.fromkeys((checkpoint_folder, "checkpoints")):
            resume_from, done = latest_intact_checkpoint(out_dir / folder)
            if resume_from:
                break
    if resume_from and config["epochs"] < done:
        raise cli.UserError(f"--epochs {config['epochs']}: the run in {out_dir} has done {done} "
                            f"epochs already")

    if chief:
        hold(out_dir)
    if args.overwrite:
        for pattern in own_outputs:
            for path in out_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    with files.atomic_path(out_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return Run(config, out_dir, dataset.with_channels(train_images), dataset.with_channels(test_images),
               train_labels, test_labels, resume_from, image_folder.report_lines(data.folder_report or {}))
