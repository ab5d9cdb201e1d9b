"""See inside a trained run in the browser: the test images' latent means on a plane, the
image decoded at the pointer, your own drawing or picture encoded (q(z|x) as an ellipse,
draws z = mean + sigma * eps, the reconstruction and the ELBO's parts) and a walk.

    python explore.py                        # the run in output/, on http://127.0.0.1:PORT
    python explore.py --out-dir cond --port 8000 --no-browser

The page works offline; its requests are small JSON or PNG exchanges (docs/explore.md).
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
from collections.abc import Sequence
from pathlib import Path

from machinery import cli, explore_server, image_decoding, run_folder
from machinery.explore_server import BadRequest, json_answer, png_answer
from machinery.settings import RunSettings

import numpy as np
import tensorflow as tf

import dataset
import evaluate
import export
import network
import pictures

PAGE = Path(__file__).resolve().parent / "machinery" / "explore.html"
ELBO_DRAWS = 64  # draws z ~ q(z|x) whose mean gives a picture's ELBO parts
SHOWN_DRAWS = 8  # of them, those drawn on the plane
MAX_WALK = 32  # images along a walk, at most


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description="Explore a trained run in the browser: its latent space, "
                                            "your own drawings and pictures, walks between points.")
    parser.add_argument("--out-dir", default=run_folder.OUT_DIR, help="the run folder to explore")
    parser.add_argument("--data", default=None,
                        help="where the run's data is now, if not where config.json says")
    parser.add_argument("--port", type=cli.int_between(0, 65535), default=0,
                        help="the port to serve on (default: a free one)")
    parser.add_argument("--host", default=explore_server.LOOPBACK,
                        help="the address to serve on; another than the loopback lets anyone who "
                             "can reach the port use the model")
    parser.add_argument("--no-browser", action="store_true", help="print the address, open no browser")
    return parser


def to_pixels(images: tf.Tensor) -> np.ndarray:
    """Decoded images (probabilities or medians, 0..1) as uint8."""
    return np.round(np.clip(images.numpy(), 0., 1.) * 255.).astype(np.uint8)


def data_url(pixels: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_answer(pixels)[1]).decode()


def plane_axes(means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the plane's origin lies in the latent space, and its axes (columns, all
    latent_dim of them): for latent_dim 2, z itself; else the means' principal axes."""
    latent_dim = means.shape[1]
    if latent_dim <= 2:
        return np.zeros(latent_dim, np.float32), np.eye(latent_dim, dtype=np.float32)
    centre, axes, _ = pictures.principal_axes(means)
    return centre, axes.astype(np.float32)


class Explorer:
    """The model's answers to the page: every figure from the code that trains."""

    def __init__(self, model: network.CVAE, settings: RunSettings, images: np.ndarray,
                 labels: np.ndarray, epoch: int) -> None:
        self.model, self.settings, self.epoch = model, settings, epoch
        self.names = list(settings.class_names or dataset.CLASS_NAMES[settings.dataset])
        means = pictures.latent_means(model, dataset.preprocess(images, model.likelihood), labels)
        self.centre, self.axes = plane_axes(means)
        self.coords = (means - self.centre) @ self.axes  # each mean in the plane's axes
        self.labels = labels
        self.decode_z = tf.function(functools.partial(model.decode, apply_sigmoid=True))  # (z, y=...)

    def info(self, body: bytes, query: dict) -> tuple[str, bytes]:
        spread = self.coords.std(axis=0) if len(self.coords) > 1 else np.ones(self.model.latent_dim)
        return json_answer({
            "latent_dim": self.model.latent_dim, "image_shape": list(self.model.image_shape),
            "likelihood": self.model.likelihood, "num_classes": self.model.num_classes,
            "class_names": self.names, "epoch": self.epoch, "kl": self.settings.kl,
            "centre": self.centre.tolist(), "axes": self.axes.tolist(), "spread": spread.tolist(),
            "pca": self.model.latent_dim > 2,
            "points": np.round(self.coords[:, :2], 3).tolist(), "labels": self.labels.tolist()})

    def label(self, value: object) -> tf.Tensor | None:
        """A conditional model's class from a request (its index); None for another model."""
        if not self.model.num_classes:
            if value not in (None, ""):
                raise BadRequest("this model is not conditional: it takes no class")
            return None
        if isinstance(value, str):
            value = int(value) if value.lstrip("-").isdigit() else value
        index = explore_server.whole_number(value, "label", 0, self.model.num_classes - 1)
        return tf.constant([index], tf.int32)

    def decode(self, body: bytes, query: dict) -> tuple[str, bytes]:
        request = explore_server.read_json(body)
        z = explore_server.latent_point(request.get("z"), self.model.latent_dim)
        return png_answer(to_pixels(self.decode_z(z[np.newaxis], y=self.label(request.get("label"))))[0])

    def walk(self, body: bytes, query: dict) -> tuple[str, bytes]:
        """The images decoded along the line from point a to point b, side by side."""
        request = explore_server.read_json(body)
        a, b = (explore_server.latent_point(request.get(end), self.model.latent_dim, end) for end in "ab")
        steps = explore_server.whole_number(request.get("steps", 10), "steps", 2, MAX_WALK)
        z = np.linspace(a, b, steps).astype(np.float32)
        y = self.label(request.get("label"))
        images = to_pixels(self.decode_z(z, y=None if y is None else tf.repeat(y, steps)))
        return png_answer(np.concatenate(list(images), axis=1))

    def encode(self, body: bytes, query: dict) -> tuple[str, bytes]:
        """A picture (any size: cropped and resized as dataset.py does a folder's) encoded:
        q(z|x), a few draws from it, the reconstruction and the ELBO's parts."""
        explore_server.check_image(body)
        height, width, channels = self.model.image_shape
        try:
            pixels = image_decoding.decode(io.BytesIO(body), (height, width), channels)
        except cli.UserError as error:
            raise BadRequest(f"cannot decode the image ({str(error).split(': ', 1)[-1]})") from None
        x = dataset.preprocess(pixels[np.newaxis], self.model.likelihood)
        y = self.label(query.get("label"))
        posterior = self.model.encode(x, y)
        mean, logvar = (part.numpy()[0] for part in posterior)
        eps = tf.random.normal((ELBO_DRAWS, self.model.latent_dim))
        # The draws are a batch of copies of x that share its one encoding.
        copies = [None if t is None else tf.repeat(t, ELBO_DRAWS, axis=0) for t in (x, y, *posterior)]
        elbo, logpx_z, kl = (float(tf.reduce_mean(part)) for part in evaluate.elbo_parts(
            self.model, copies[0], eps, self.settings.kl, copies[1], posterior=tuple(copies[2:])))
        draws = mean + np.exp(logvar / 2) * eps.numpy()[:SHOWN_DRAWS]
        plane = self.axes[:, :2]
        covariance = plane.T @ (np.exp(logvar)[:, np.newaxis] * plane)  # q(z|x) seen on the plane
        variances, directions = np.linalg.eigh(covariance)
        return json_answer({
            "mean": mean.tolist(), "logvar": logvar.tolist(),
            "coords": ((mean - self.centre) @ self.axes).tolist(),
            "ellipse": {"radii": (2 * np.sqrt(np.maximum(variances, 0))).tolist(),
                        "angle": float(np.arctan2(directions[1, -1], directions[0, -1]))
                        if len(variances) == 2 else 0.0},
            "draws": ((draws - self.centre) @ plane).tolist(),
            "input": data_url(to_pixels(x)[0]),
            "reconstruction": data_url(to_pixels(self.decode_z(mean[np.newaxis], y=y))[0]),
            "elbo": elbo, "log_px_z": logpx_z, "kl": kl, "draws_averaged": ELBO_DRAWS})

    def routes(self) -> tuple[dict, dict]:
        """The GET and POST requests the page makes (docs/explore.md)."""
        return {"/api/info": self.info}, {"/api/decode": self.decode, "/api/walk": self.walk,
                                          "/api/encode": self.encode}


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out_dir)
    model, settings, checkpoint_path, epoch = export.load_trained_model(out_dir)
    test_images, test_labels = dataset.load_run_data(settings, args.data or settings.data, check=True).test
    print(f"Encoding {len(test_images):,} test images with {checkpoint_path} (epoch {epoch})")
    explorer = Explorer(model, settings, test_images, test_labels, epoch)
    server = explore_server.make_server(PAGE.read_bytes(), *explorer.routes(), args.host, args.port)
    url = explore_server.address(server)
    if not explore_server.is_loopback(args.host):
        print(f"Warning: serving on {args.host}: anyone who can reach port {server.server_address[1]} "
              f"can use the model")
    print(f"Exploring {out_dir} on {url} (Ctrl-C stops it)")
    if not args.no_browser:
        explore_server.open_browser(url)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    cli.run(main)
