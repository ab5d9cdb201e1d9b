"""How fast explore.py answers: a decoded image under the pointer and an encoded drawing
(medians of 100 requests from a client on localhost), for the tutorial's model and a 64x64
colour one; and the page's first view of 10,000 test points in headless Chromium, from the
server's start. About a minute on 2 cores.

    python benchmarks/explore_latency.py
"""

from __future__ import annotations

import io
import json
import platform
import shutil
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machinery import explore_server, hardware  # noqa: E402  (TensorFlow, quietly)
from machinery.settings import RunSettings  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

import explore  # noqa: E402
import network  # noqa: E402

REQUESTS = 100
POINTS = 10_000


def settings_of(shape: list[int]) -> RunSettings:
    likelihood = "bernoulli" if shape[2] == 1 else "logistic"
    return RunSettings(epochs=10, latent_dim=2, batch_size=32, learning_rate=1e-4, seed=42, train_size=None,
                       test_size=None, data=None, data_sha256="", likelihood=likelihood, image_shape=shape,
                       class_names=[str(k) for k in range(10)])


def served(shape: list[int]) -> tuple:
    settings = settings_of(shape)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (POINTS, *shape), dtype=np.uint8)
    model = network.CVAE(**settings.model_options())
    started = time.perf_counter()
    explorer = explore.Explorer(model, settings, images, rng.integers(0, 10, POINTS).astype(np.uint8), 10)
    server = explore_server.make_server(explore.PAGE.read_bytes(), *explorer.routes())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, explore_server.address(server), time.perf_counter() - started


def median_ms(url: str, body: bytes) -> float:
    times = []
    for _ in range(REQUESTS):
        start = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, data=body)) as answer:
            answer.read()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def first_view_seconds(shape: list[int]) -> float | None:
    """From the server's start to the page's plane drawn, in a browser already open."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return None
    from explore_screenshot import headless_chromium
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium()
    try:
        driver.get("about:blank")
        server, url, _ = served(shape)
        start = time.perf_counter()
        driver.get(url)
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "return bounds !== null && document.getElementById('decoded').src.startsWith('blob:')"))
        seconds = time.perf_counter() - start
        server.shutdown()
        return seconds
    finally:
        driver.quit()


def main() -> None:
    print(f"{platform.machine()}, {hardware.describe_cpu()}; TensorFlow {tf.__version__}; "
          f"{REQUESTS} requests each")
    for shape in ([28, 28, 1], [64, 64, 3]):
        server, url, encoding = served(shape)
        drawing = io.BytesIO()
        Image.fromarray(np.zeros((168, 168), np.uint8)).save(drawing, format="PNG")
        decode = median_ms(url + "api/decode", json.dumps({"z": [0.3, -0.7]}).encode())
        encode = median_ms(url + "api/encode", drawing.getvalue())
        server.shutdown()
        view = first_view_seconds(shape)
        shown = f"{view:.2f} s from the server's start" if view is not None else "not measured (no Chromium)"
        print(f"{'x'.join(map(str, shape))}: decode {decode:.1f} ms, encode a drawing {encode:.1f} ms "
              f"(medians); {POINTS:,} test images encoded in {encoding:.2f} s; first view {shown}")


if __name__ == "__main__":
    main()
