"""How often an independent MNIST classifier names the digit a conditional run was asked to draw.

    python train.py --data mnist.npz --conditional --epochs 5 --out-dir cond
    python benchmarks/label_check.py --data mnist.npz --out-dir cond

Trains a small Keras convnet on MNIST's training images (pixel / 255), unrelated to the
CVAE, then for each digit d runs `generate.py --label d --num 100 --npy` and counts how many
of the 100 images the classifier labels d.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machinery import cli  # noqa: E402  (TensorFlow, quietly)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dataset  # noqa: E402


def classifier(images: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> tf.keras.Model:
    """A small convnet, trained on `images` (N, 28, 28, 1) of values 0..1."""
    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential([
        tf.keras.layers.InputLayer(shape=(28, 28, 1)),
        tf.keras.layers.Conv2D(32, 3, activation="relu"),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Conv2D(64, 3, activation="relu"),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(128, activation="relu"),
        tf.keras.layers.Dense(10),
    ])
    model.compile(optimizer="adam", loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(images, labels, batch_size=128, epochs=epochs, verbose=2)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(description="Score a conditional run's --label draws with an "
                                            "independent MNIST classifier.")
    parser.add_argument("--data", default=None, help="MNIST as a Keras .npz (default: $CVAE_DATA)")
    parser.add_argument("--out-dir", required=True, help="the conditional run folder")
    parser.add_argument("--num", type=cli.positive_int, default=100, help="images drawn per digit")
    parser.add_argument("--epochs", type=cli.positive_int, default=2, help="the classifier's epochs")
    args = parser.parse_args(argv)
    data = dataset.load_data(args.data)
    (x_train, y_train), (x_test, y_test) = data.splits
    scale = dataset.scale_8bit
    model = classifier(scale(x_train).numpy(), y_train, args.epochs, seed=0)
    test_accuracy = float(np.mean(np.argmax(model.predict(scale(x_test).numpy(), verbose=0), 1) == y_test))
    print(f"Classifier: {test_accuracy:.4f} on MNIST's test images")
    rates = {}
    for digit in range(10):
        out = Path(args.out_dir) / f"label_{digit}.png"
        subprocess.run([sys.executable, str(ROOT / "generate.py"), "--out-dir", args.out_dir, "--label",
                        str(digit), "--num", str(args.num), "--npy", "--out", str(out)], check=True)
        drawn = np.load(out.with_suffix(".npy"))
        rates[digit] = float(np.mean(np.argmax(model.predict(drawn, verbose=0), 1) == digit))
        print(f"  --label {digit}: {rates[digit]:.2f} labelled {digit}")
    mean = float(np.mean(list(rates.values())))
    print(f"Averaged over the ten digits: {mean:.4f}")
    report = {"classifier_test_accuracy": test_accuracy, "per_digit": rates, "mean": mean, "num": args.num}
    (Path(args.out_dir) / "label_check.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    cli.run(main)
