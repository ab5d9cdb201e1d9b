"""The run folder: a new run, a resumed one, or a refusal before anything is written.

config.json holds a run's settings (machinery/settings.py) and a fingerprint of its data:
--resume continues from the latest intact checkpoint with them, and --overwrite replaces the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

from machinery import cli, data_files, files, image_folder
from machinery.settings import CONFIG_FILE, RunSettings, load_settings

import numpy as np
import tensorflow as tf

OUT_DIR = "output"
# What a run (train.py, then export.py, evaluate.py, generate.py) writes in its folder:
# --overwrite removes these alone.
RUN_OUTPUTS = (CONFIG_FILE, "metrics.csv", "checkpoints", "checkpoints-*", "tensorboard",
               "image_at_epoch_*.png", "cvae.gif", "latent_means_epoch_*.png", "latent_means.gif",
               "latent_manifold.png", files.KERAS_FILE, files.SAVEDMODEL_DIR, "evaluation.json",
               "reconstructions.png", "prior_samples.png", "latent_space.png", "interpolation.png",
               "training_curves.png", "generated.*", "analogies.png", ".evaluation-kept.npz", ".*.tmp.*")


# dataset.load_run_data: (a run's settings, where its data is, whether to check its
# fingerprint) -> dataset.Data: .splits, .fingerprint, .class_names, .source (the file read),
# .default_likelihood and .folder_report.
DataReader = Callable[[RunSettings, "str | None", bool], object]


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


def restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
    """Restore `path` into `checkpoint`, or say in one line why its variables do not fit."""
    try:
        checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
    except AssertionError as error:
        raise cli.UserError(f"{path} does not fit the model that config.json describes (a checkpoint "
                            f"of a bf16 run made before its float32 biases?): {cli.first_line(error)[:120]}"
                            ) from None


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
    settings: RunSettings  # as stored in config.json
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


def prepare_run(args: argparse.Namespace, given: set[str], read_data: DataReader,
                choices: Mapping[str, Collection[str]], chief: bool = True,
                checkpoint_folder: str = "checkpoints", test_images_needed: int = 1) -> Run:
    """Settle the run's settings, data and starting point from the flags (`given`: those
    typed) and the run folder. A new run takes the flags; --resume takes config.json (its
    settings checked against `choices`) and refuses a flag or data that contradicts it.
    Every check comes before the first write, and the `chief` holds the folder from then on.
    (Another worker keeps its checkpoints in its own `checkpoint_folder`, or finds the chief's
    in a shared run folder; the test set must hold `test_images_needed`.)"""
    if args.resume and args.overwrite:
        raise cli.UserError("--resume continues the run in --out-dir and --overwrite replaces it: "
                            "choose one")
    out_dir = files.ensure_out_dir(args.out_dir)
    # What this process answers for: the whole run; or, for another worker, its checkpoints
    # (in one shared run folder, the chief's files are the chief's to check and replace).
    own_outputs = RUN_OUTPUTS if chief else (checkpoint_folder,)
    if args.resume:
        settings = load_settings(out_dir, choices)
        if name := settings.contradicted(args, given):
            flag = "--" + name.replace("_", "-")
            raise cli.UserError(f"{flag} {getattr(args, name)} contradicts the run in {out_dir}, which "
                                f"has {flag} {getattr(settings, name)}; drop the flag to resume it, or "
                                f"start a new run in another --out-dir")
        if "epochs" in given:
            settings.epochs = args.epochs
        source = args.data or settings.data
    else:
        if holds_run(out_dir, own_outputs) and not args.overwrite:
            raise cli.UserError(f"{out_dir} already holds a run; continue it with --resume, or "
                                f"replace it with --overwrite")
        settings, source = RunSettings.from_flags(args), args.data

    data = read_data(settings, source, args.resume)
    settings.data = str(Path(data.source).resolve()) if data.source else None  # where it is now
    (train_images, train_labels), (test_images, test_labels) = data.splits
    settings.data_sha256 = data.fingerprint
    if not (args.resume and settings.class_names):  # a resumed run keeps its classes, and its model
        settings.class_names = list(data.class_names)
    if settings.conditional and len(data.class_names) < 2:
        raise cli.UserError(f"--conditional needs images of two classes or more; "
                            f"{data.source or 'the data'} has one")
    if len(test_images) < test_images_needed:
        raise cli.UserError(f"the sample grid needs {test_images_needed} test images, "
                            f"got {len(test_images)}")
    settings.image_shape = list(data_files.image_shape(train_images))  # the model's shapes follow
    settings.likelihood = settings.likelihood or data.default_likelihood
    resume_from, done = None, 0
    if args.resume:  # this worker's checkpoints, else (one shared run folder) the chief's
        for folder in dict.fromkeys((checkpoint_folder, "checkpoints")):
            resume_from, done = latest_intact_checkpoint(out_dir / folder)
            if resume_from:
                break
    if resume_from and settings.epochs < done:
        raise cli.UserError(f"--epochs {settings.epochs}: the run in {out_dir} has done {done} "
                            f"epochs already")

    if chief:
        hold(out_dir)
    if args.overwrite:
        for pattern in own_outputs:
            for path in out_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    settings.save(out_dir)
    return Run(settings, out_dir, data_files.with_channels(train_images),
               data_files.with_channels(test_images), train_labels, test_labels, resume_from,
               image_folder.report_lines(data.folder_report or {}))
