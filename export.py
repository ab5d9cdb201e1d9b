"""A run's model: built from its settings, restored from its last intact checkpoint, and
exported, to use it without the training code.

    python export.py --out-dir output    # the model at the run's last complete epoch

writes into the run folder (train.py does the same at the end of every run):
  cvae.keras         the whole CVAE in Keras' format: keras.saving.load_model, with network.py
                     imported (python generate.py and python network.py --from read it)
  cvae_savedmodel/   a SavedModel for plain TensorFlow, no project code needed:
                     decode (z -> pixels: their probabilities; for the logistic, their medians),
                     encode (images -> mean, logvar), in the shapes of the run's images
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from machinery import cli, files, run_folder
from machinery.settings import RunSettings, load_settings

import tensorflow as tf

import dataset
import network

# What config.json may hold for a setting with choices: what its flag offers.
SETTING_CHOICES = {"kl": network.KL_ESTIMATORS, "dataset": dataset.KERAS_DATASETS,
                   "precision": network.PRECISIONS, "likelihood": network.LIKELIHOODS}


def read_settings(out_dir: Path) -> RunSettings:
    """The run's settings, from its config.json (checked, with the choices its flags offer)."""
    return load_settings(out_dir, SETTING_CHOICES)


def new_model(settings: RunSettings, **options) -> network.CVAE:
    """An untrained CVAE of the run's settings (and `options`: another logits_layer, say)."""
    return network.CVAE(**settings.model_options(), **options)


def load_trained_model(out_dir: Path, **options) -> tuple[network.CVAE, RunSettings, str, int]:
    """The run's model (built with `options`, as new_model) at its latest intact checkpoint;
    with the run's settings, that checkpoint's path and its epoch."""
    if not out_dir.is_dir():
        raise cli.UserError(f"--out-dir {out_dir}: no such folder")
    settings = read_settings(out_dir)
    checkpoint_path, epoch = run_folder.latest_intact_checkpoint(out_dir / "checkpoints")
    if checkpoint_path is None:
        raise cli.UserError(f"{out_dir} has no checkpoint yet")
    model = new_model(settings, **options)
    run_folder.restore(tf.train.Checkpoint(model=model), checkpoint_path)
    return model, settings, checkpoint_path, epoch


def savedmodel_archive(model: network.CVAE) -> tf.keras.export.ExportArchive:
    """The model's weights and two serving signatures: decode, the default, and encode (each
    also taking the classes y, int32, for a conditional model)."""
    archive = tf.keras.export.ExportArchive()
    archive.track(model)
    classes = [tf.TensorSpec((None,), tf.int32, name="y")] if model.num_classes else []

    def decode(z: tf.Tensor, *y: tf.Tensor) -> dict[str, tf.Tensor]:
        # What pictures show: pixel probabilities (for the logistic, medians).
        return {"pixels": model.decode(z, apply_sigmoid=True, y=y[0] if y else None)}

    def encode(images: tf.Tensor, *y: tf.Tensor) -> dict[str, tf.Tensor]:
        mean, logvar = model.encode(images, y[0] if y else None)
        return {"mean": mean, "logvar": logvar}

    archive.add_endpoint("decode", decode, input_signature=[
        tf.TensorSpec((None, model.latent_dim), tf.float32, name="z"), *classes])
    archive.add_endpoint("encode", encode, input_signature=[
        tf.TensorSpec((None, *model.image_shape), tf.float32, name="images"), *classes])
    return archive


def export_model(model: network.CVAE, out_dir: Path) -> None:
    """Write cvae.keras and cvae_savedmodel/ into `out_dir`, each whole or not at all: the
    model's weights in a CVAE of its settings (evaluate.py may build another logits layer)."""
    plain = network.CVAE(**model.get_config())
    plain.set_weights(model.get_weights())
    model = plain
    with files.atomic_path(out_dir / files.KERAS_FILE) as tmp:
        model.save(tmp)
    with files.atomic_folder(out_dir / files.SAVEDMODEL_DIR) as tmp:
        savedmodel_archive(model).write_out(str(tmp), verbose=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(description="Export a run's trained model: cvae.keras, for "
                                            "Keras, and cvae_savedmodel/, for plain TensorFlow.")
    parser.add_argument("--out-dir", default=run_folder.OUT_DIR, help="the run folder to export")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    model, _, checkpoint_path, epoch = load_trained_model(out_dir)
    files.ensure_out_dir(out_dir)
    export_model(model, out_dir)
    print(f"Exported {checkpoint_path} (epoch {epoch}) to {out_dir / files.KERAS_FILE} and "
          f"{out_dir / files.SAVEDMODEL_DIR}/")


if __name__ == "__main__":
    cli.run(main)
