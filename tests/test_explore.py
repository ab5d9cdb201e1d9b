"""explore.py: a real HTTP client against the real server. Each answer is the model's own
(the decoder's image, the encoder's q(z|x), the ELBO's parts); a bad request gets a 4xx
status and a JSON error, and the server goes on serving."""

from __future__ import annotations

import base64
import io
import json
import math
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

from machinery import explore_server, image_decoding

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, assert_one_line_error, make_mnist_arrays, run_main, run_script, train_settings
from PIL import Image

import dataset
import explore
import export


def request(url: str, body: bytes | dict | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, or of a POST of `body` (a dict: as JSON)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def read_png(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def serving(conditional: bool):
    """An Explorer of an untrained model (seeded) on 64 test images, served on a free port."""
    tf.keras.utils.set_random_seed(0)
    arrays = make_mnist_arrays(num_train=32, num_test=64)
    settings = train_settings(*(["--conditional"] if conditional else []))
    settings.class_names, settings.likelihood = [str(digit) for digit in range(10)], "bernoulli"
    model = export.new_model(settings)
    explorer = explore.Explorer(model, settings, arrays["x_test"], arrays["y_test"], epoch=0)
    server = explore_server.make_server(explore.PAGE.read_bytes(), *explorer.routes())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield explore_server.address(server), model, arrays
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def served():
    yield from serving(conditional=False)


@pytest.fixture(scope="module")
def served_conditional():
    yield from serving(conditional=True)


def decoded(model, z, y=None) -> np.ndarray:
    return explore.to_pixels(model.decode(tf.constant(z, tf.float32), True, y=y))


def test_the_page_and_the_runs_plane(served):
    url, model, arrays = served
    status, kind, page = request(url)
    assert status == 200 and kind.startswith("text/html") and b"CVAE explorer" in page
    status, kind, body = request(url + "api/info")
    info = json.loads(body)
    assert status == 200 and kind == "application/json"
    means = model.encode(dataset.binarize(arrays["x_test"]))[0].numpy()
    np.testing.assert_allclose(info["points"], means, atol=1e-3)  # latent_dim 2: the plane is z itself
    assert info["labels"] == arrays["y_test"].tolist() and info["axes"] == [[1, 0], [0, 1]]


def test_decode_and_walk_are_the_decoders_images(served):
    url, model, _ = served
    status, kind, body = request(url + "api/decode", {"z": [0.5, -1.25]})
    assert status == 200 and kind == "image/png"
    np.testing.assert_array_equal(read_png(body), decoded(model, [[0.5, -1.25]])[0, ..., 0])
    status, _, body = request(url + "api/walk", {"a": [-2, 0], "b": [2, 1], "steps": 5})
    strip = read_png(body)
    assert status == 200 and strip.shape == (28, 5 * 28)
    line = np.linspace([-2, 0], [2, 1], 5)
    np.testing.assert_array_equal(strip, np.concatenate(list(decoded(model, line)[..., 0]), axis=1))


def test_encode_shows_q_its_draws_and_the_elbos_parts(served):
    url, model, arrays = served
    status, _, body = request(url + "api/encode", png(arrays["x_test"][3]))
    answer = json.loads(body)
    assert status == 200
    x = dataset.binarize(arrays["x_test"][3:4])
    mean, logvar = (part.numpy()[0] for part in model.encode(x))
    np.testing.assert_allclose(answer["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(answer["logvar"], logvar, rtol=1e-5)
    # The ellipse: mean +- 2 standard deviations along z's axes (the plane is z itself).
    np.testing.assert_allclose(sorted(answer["ellipse"]["radii"]), sorted(2 * np.exp(logvar / 2)), rtol=1e-4)
    draws = np.array(answer["draws"])
    assert draws.shape == (explore.SHOWN_DRAWS, 2) and not np.allclose(draws, mean)
    assert answer["elbo"] == pytest.approx(answer["log_px_z"] - answer["kl"], abs=1e-3)
    untrained_elbo = -float(tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=x, logits=model.decode(tf.constant(mean[np.newaxis])))))
    assert answer["log_px_z"] == pytest.approx(untrained_elbo, rel=0.05)  # about 545 nats, untrained
    np.testing.assert_array_equal(read_png_url(answer["input"]), x.numpy()[0, ..., 0] * 255)


def test_any_picture_is_cropped_and_resized_as_a_folders(served, tmp_path):
    url, model, _ = served
    photo = np.random.default_rng(1).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    status, _, body = request(url + "api/encode", png(photo))
    (tmp_path / "photo.png").write_bytes(png(photo))
    as_a_folder = image_decoding.decode(tmp_path / "photo.png", (28, 28), 1)
    mean = model.encode(dataset.binarize(as_a_folder[np.newaxis]))[0].numpy()[0]
    assert status == 200
    np.testing.assert_allclose(json.loads(body)["mean"], mean, rtol=1e-5)


BAD_REQUESTS = {
    "not JSON": ("api/decode", b"z=1,2", 400, "not JSON"),
    "a z too short": ("api/decode", {"z": [1.0]}, 400, "z has 1 numbers; the model's latent space has 2"),
    "a z not finite": ("api/decode", b'{"z": [NaN, 0]}', 400, "not finite"),
    "a z of words": ("api/decode", {"z": ["a", "b"]}, 400, "must be a list of 2 numbers"),
    "a class for an unconditional model": ("api/decode", {"z": [0, 0], "label": 3}, 400, "not conditional"),
    "a walk too long": ("api/walk", {"a": [0, 0], "b": [1, 1], "steps": 1000}, 400, "steps must be"),
    "not an image": ("api/encode", b"hello", 415, "not an image"),
    "an image too large": ("api/encode", "huge", 413, "more than this server decodes"),
    "a body over the limit": ("api/encode", b"0" * (explore_server.MAX_BODY + 1), 413, "at most"),
    "no such request": ("api/files", None, 404, "no GET /api/files"),
    "a GET of a POST": ("api/decode", None, 405, "no GET /api/decode"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_is_a_4xx_json_error_and_the_server_goes_on(served, case):
    url, _, _ = served
    path, body, expected_status, expected = BAD_REQUESTS[case]
    if body == "huge":  # 10,000 x 5,000 pixels of one colour: a small file, too many pixels
        body = png(np.zeros((5000, 10000), np.uint8))
    status, kind, answer = request(url + path, body)
    assert (status, kind) == (expected_status, "application/json")
    assert expected in json.loads(answer)["error"]
    assert request(url + "api/info")[0] == 200


def test_a_conditional_model_draws_the_class_asked_for(served_conditional):
    url, model, arrays = served_conditional
    status, _, body = request(url + "api/decode", {"z": [0.5, 0.5], "label": 7})
    assert status == 200
    np.testing.assert_array_equal(read_png(body), decoded(model, [[0.5, 0.5]], tf.constant([7]))[0, ..., 0])
    assert json.loads(request(url + "api/info")[2])["num_classes"] == 10
    for label in (10, -1, "cat", None):
        status, _, answer = request(url + "api/decode", {"z": [0, 0], "label": label})
        assert status == 400 and "label must be a whole number from 0 to 9" in json.loads(answer)["error"]
    status, _, body = request(url + "api/encode?label=4", png(arrays["x_test"][0]))
    y = tf.constant([4])
    mean = model.encode(dataset.binarize(arrays["x_test"][:1]), y)[0].numpy()[0]
    assert status == 200
    np.testing.assert_allclose(json.loads(body)["mean"], mean, rtol=1e-5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of the tutorial's model, 0 epochs long: train.py's checkpoint and config.json."""
    folder = tmp_path_factory.mktemp("explore")
    np.savez(folder / "mnist.npz", **make_mnist_arrays(num_train=64, num_test=48))
    result = run_script("train.py", "--data", str(folder / "mnist.npz"), "--epochs", "0",
                        "--out-dir", str(folder / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "run"


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, which Windows lacks")
def test_explore_py_serves_a_run_and_stops_on_ctrl_c(run):
    process = subprocess.Popen([sys.executable, str(ROOT / "explore.py"), "--out-dir", str(run),
                                "--no-browser", "--host", "0.0.0.0"], cwd=ROOT, text=True,  # noqa: S104
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = [process.stdout.readline() for _ in range(3)]
        assert "Encoding 48 test images" in lines[0]
        assert "Warning: serving on 0.0.0.0: anyone who can reach port" in lines[1]
        url = lines[2].split(" on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        info = json.loads(request(url + "api/info")[2])
        assert len(info["points"]) == 48 and math.isfinite(info["points"][0][0])
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130 and stderr.strip().endswith("explore.py: interrupted")


def test_explore_py_refuses_what_it_cannot_serve(run, tmp_path, capsys, monkeypatch):
    code, stderr = run_main(explore.main, ["--out-dir", tmp_path / "none"], "explore.py", capsys, monkeypatch)
    assert_one_line_error(stderr, "explore.py", "no such folder", 2, code)
    code, stderr = run_main(explore.main, ["--out-dir", run, "--port", "70000"], "explore.py", capsys,
                            monkeypatch)
    assert_one_line_error(stderr, "explore.py", "argument --port", 2, code)


def test_a_colour_model_of_four_dimensions_on_its_principal_plane():
    tf.keras.utils.set_random_seed(1)
    settings = train_settings("--latent-dim", "4")
    settings.likelihood, settings.image_shape, settings.class_names = "logistic", [16, 16, 3], ["a", "b"]
    model = export.new_model(settings)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, 40).astype(np.uint8)
    explorer = explore.Explorer(model, settings, images, labels, epoch=0)
    info = json.loads(explorer.info(b"", {})[1])
    axes = np.array(info["axes"])
    means = model.encode(dataset.scale_8bit(images))[0].numpy()
    np.testing.assert_allclose(axes.T @ axes, np.eye(4), atol=1e-5)  # principal axes: orthonormal
    coordinates = (means - np.array(info["centre"])) @ axes
    np.testing.assert_allclose(info["points"], coordinates[:, :2], atol=2e-3)
    assert info["pca"] and np.all(np.diff(np.var(coordinates, axis=0)) <= 1e-9)  # the widest first
    kind, body = explorer.decode(json.dumps({"z": [0.1, 0.2, 0.3, 0.4]}).encode(), {})
    medians = explore.to_pixels(model.decode(tf.constant([[0.1, 0.2, 0.3, 0.4]]), True))[0]
    assert kind == "image/png" and read_png(body).shape == (16, 16, 3)
    np.testing.assert_array_equal(read_png(body), medians)
    answer = json.loads(explorer.encode(png(images[0]), {})[1])
    assert len(answer["coords"]) == 4 and len(answer["draws"][0]) == 2
    assert read_png_url(answer["input"]).shape == (16, 16, 3)


def read_png_url(url: str) -> np.ndarray:
    return read_png(base64.b64decode(url.split(",", 1)[1]))
