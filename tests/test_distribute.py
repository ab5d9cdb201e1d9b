"""tf.distribute on two logical CPU devices: a mirrored step is the single-device step,
and a mirrored run trains and writes its outputs once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow as tf
from conftest import run_script, stderr_lines

import network

# Runs under tests/two_cpus.py: steps on full batches, a smaller unevenly split one, and one
# of a single image, on one device and mirrored on two, from the same weights and noise.
COMPARE_STEPS = """
import json, sys
from machinery import steps
import numpy as np, tensorflow as tf
import network, train

images = tf.constant((np.random.default_rng(0).random((39, 28, 28, 1)) < 0.3).astype(np.float32))
mirrored = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
tf.keras.utils.set_random_seed(7)
initials = {classes: network.CVAE(2, num_classes=classes).get_weights() for classes in (0, 10)}
labels = np.random.default_rng(1).integers(0, 10, 39)  # a conditional model's, with their images
report = {"replicas": mirrored.num_replicas_in_sync}
for optimizer_name, classes in (("sgd", 0), ("adam", 0), ("adam", 10)):
    initial = initials[classes]
    results = {}
    for name, strategy in (("single", tf.distribute.get_strategy()), ("mirrored", mirrored)):
        with strategy.scope():
            model = network.CVAE(2, num_classes=classes)
            optimizer = (tf.keras.optimizers.SGD(1e-4) if optimizer_name == "sgd"
                         else tf.keras.optimizers.Adam(1e-3))
            optimizer.build(model.trainable_variables)
        model.set_weights(initial)
        train_steps = steps.compiled_train_steps(train.train_step, model, optimizer,
                                                 tf.random.Generator.from_seed(3), strategy=strategy)
        # 39 images: a full batch, then 7 split 3 and 4; then 33: a last batch of one image,
        # one replica's batch empty.
        losses = np.concatenate([train_steps(batches) for count in (39, 33) for batches in steps.batches(
            images[:count], 32, labels=labels[:count] if classes else None)])
        results[name] = (losses, [np.asarray(w) for w in model.get_weights()])
    (loss_1, weights_1), (loss_2, weights_2) = results["single"], results["mirrored"]
    report[f"{optimizer_name}, {classes} classes"] = {
        "losses": loss_1.tolist(),
        "loss_diff": float(np.max(np.abs(loss_1 - loss_2))),
        "weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(weights_1, weights_2)),
        "weight_change": max(float(np.max(np.abs(a - b))) for a, b in zip(weights_1, initial)),
    }
print("REPORT " + json.dumps(report))
"""


def test_a_mirrored_step_is_the_single_device_step(tmp_path):
    script = tmp_path / "compare_steps.py"
    script.write_text(COMPARE_STEPS)
    result = run_script("tests/two_cpus.py", script)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    assert report["replicas"] == 2
    for optimizer in ("sgd, 0 classes", "adam, 0 classes", "adam, 10 classes"):
        figures = report[optimizer]
        assert all(np.isfinite(figures["losses"]))
        assert figures["weight_change"] > 1e-4  # the steps did move the weights
        assert figures["loss_diff"] < 1e-5 * max(abs(loss) for loss in figures["losses"])
        assert figures["weight_diff"] < 1e-5, (optimizer, figures)


def test_a_short_mirrored_run_trains_and_saves_once(tmp_path, tiny_npz):
    out_dir = tmp_path / "run"
    result = run_script("tests/two_cpus.py", "train.py", "--strategy", "mirrored",
                        "--devices", "CPU:0,CPU:1", "--data", tiny_npz, "--epochs", "2",
                        "--batch-size", "16", "--out-dir", out_dir)
    assert result.returncode == 0, stderr_lines(result.stderr)[-20:]
    rows = (out_dir / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1", "2"]
    elbos = [float(row.split(",")[2]) for row in rows[1:]]
    assert np.all(np.isfinite(elbos)) and elbos[-1] > elbos[0]  # it learned something
    assert sorted(path.name for path in out_dir.glob("image_at_epoch_*.png")) == [
        "image_at_epoch_0000.png", "image_at_epoch_0001.png", "image_at_epoch_0002.png"]
    assert (out_dir / "cvae.gif").is_file() and (out_dir / "latent_manifold.png").is_file()

    # One checkpoint an epoch, which a plain single-device model reads.
    assert sorted(path.name for path in (out_dir / "checkpoints").glob("*.index")) == [
        "ckpt-0.index", "ckpt-1.index", "ckpt-2.index"]
    model = network.CVAE(2)
    tf.train.Checkpoint(model=model).restore(str(out_dir / "checkpoints" / "ckpt-2")).expect_partial()
    assert any(np.any(w != 0) for w in model.get_weights())
    # And the exported model, written from the mirrored variables, holds the same weights.
    for exported, restored in zip(network.load_model(out_dir).get_weights(), model.get_weights()):
        np.testing.assert_array_equal(exported, restored)


def test_multiworker_without_tf_config_is_one_worker(tmp_path: Path, tiny_npz):
    out_dir = tmp_path / "run"
    result = run_script("train.py", "--strategy", "multiworker", "--data", tiny_npz,
                        "--epochs", "1", "--out-dir", out_dir)
    assert result.returncode == 0, stderr_lines(result.stderr)[-20:]
    assert len((out_dir / "metrics.csv").read_text().splitlines()) == 3


def test_a_bad_tf_config_is_one_line(tmp_path: Path, tiny_npz):
    result = run_script("train.py", "--strategy", "multiworker", "--data", tiny_npz,
                        "--out-dir", tmp_path / "run", env={"TF_CONFIG": "{not json"})
    assert result.returncode == 2
    assert len(stderr_lines(result.stderr)) == 1 and "TF_CONFIG" in result.stderr
    assert not (tmp_path / "run").exists()
