"""explore.py's page in a real browser, headless Chromium driven by WebDriver: it loads
with no console error, the pointer over the plane changes the decoded image, a stroke on
the pad and a file each give an ellipse, draws and a reconstruction, and two clicks a walk.
CVAE_SCREENSHOTS=FOLDER keeps the screenshots (docs/explore.png is one, looked at)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from machinery import explore_server

import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mnist_arrays, train_settings
from PIL import Image

import explore
import export

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):  # .ci/run installs both: CI never skips this
    if os.environ.get("CI"):
        pytest.fail("CI needs Debian's chromium and chromium-driver (.ci/run installs them)",
                    pytrace=False)
    pytest.skip("needs Chromium and its driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def page_url():
    tf.keras.utils.set_random_seed(0)
    arrays = make_mnist_arrays(num_train=32, num_test=200)
    settings = train_settings()
    settings.class_names, settings.likelihood = [str(digit) for digit in range(10)], "bernoulli"
    explorer = explore.Explorer(export.new_model(settings), settings, arrays["x_test"], arrays["y_test"], 0)
    server = explore_server.make_server(explore.PAGE.read_bytes(), *explorer.routes())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield explore_server.address(server)
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--window-size=1400,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, seconds: float = 15):
    return WebDriverWait(driver, seconds).until(lambda d: d.execute_script(condition), message=what)


def keep_screenshot(driver, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("CVAE_SCREENSHOTS") or tmp_path)
    driver.save_screenshot(str(folder / name))
    assert np.ptp(np.asarray(Image.open(folder / name))) > 0


def test_the_page_shows_the_model_and_what_it_makes_of_your_input(browser, page_url, tmp_path):
    browser.get(page_url)
    wait_for(browser, "return document.getElementById('about').textContent.length > 0", "the run's info")
    wait_for(browser, "return document.getElementById('decoded').src.startsWith('blob:')", "a decoded image")
    plane = browser.find_element(By.ID, "plane")
    seen = browser.execute_script("return document.getElementById('decoded').src")
    ActionChains(browser).move_to_element_with_offset(plane, -200, 150).perform()
    wait_for(browser, f"return document.getElementById('decoded').src !== '{seen}'", "another image")
    assert browser.find_element(By.ID, "z").text.startswith("z = (")

    pad = browser.find_element(By.ID, "pad")  # a stroke: a 1, top to bottom
    ActionChains(browser).move_to_element_with_offset(pad, 0, -60).click_and_hold().move_by_offset(
        0, 40).move_by_offset(0, 40).move_by_offset(0, 40).release().perform()
    wait_for(browser, "return encoded !== null", "the stroke encoded")
    assert not browser.find_element(By.ID, "result").get_attribute("hidden")
    assert "ELBO" in browser.find_element(By.ID, "parts").text
    drawn = browser.execute_script("return encoded")
    assert len(drawn["draws"]) == explore.SHOWN_DRAWS and min(drawn["ellipse"]["radii"]) > 0
    keep_screenshot(browser, "explore_pad.png", tmp_path)

    picture = tmp_path / "digit.png"
    Image.fromarray(make_mnist_arrays(num_train=1, num_test=1, seed=3)["x_test"][0]).save(picture)
    browser.execute_script("encoded = null")
    browser.find_element(By.ID, "file").send_keys(str(picture))
    wait_for(browser, "return encoded !== null", "the file encoded")
    assert browser.execute_script("return encoded")["mean"] != drawn["mean"]

    ActionChains(browser).move_to_element_with_offset(plane, -150, 0).click().move_by_offset(
        250, -100).click().perform()
    wait_for(browser, "return !document.getElementById('walk').hidden", "the walk")
    keep_screenshot(browser, "explore.png", tmp_path)
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
