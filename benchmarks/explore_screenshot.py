"""docs/explore.png: explore.py's page on a trained run, in headless Chromium, with a digit
drawn on the pad, the pointer on the plane and a walk (Debian's chromium and chromium-driver).

    python benchmarks/explore_screenshot.py --out-dir output docs/explore.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machinery import explore_server  # noqa: E402  (TensorFlow, quietly)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import dataset  # noqa: E402
import explore  # noqa: E402
import export  # noqa: E402

# A 2 drawn on the pad, MNIST-sized (a margin around it): moves (dx, dy) from a start left of
# and above the pad's centre.
STROKES = [(12, -10), (16, 0), (12, 10), (0, 16), (-16, 20), (-24, 22), (30, 0), (16, 0)]


def headless_chromium() -> webdriver.Chrome:
    """Debian's Chromium, headless, driven by its chromium-driver (no download of either)."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--window-size=1400,900"):
        options.add_argument(argument)
    return webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="output", help="the trained run")
    parser.add_argument("picture", help="the PNG to write")
    args = parser.parse_args()
    model, settings, _, epoch = export.load_trained_model(Path(args.out_dir))
    images, labels = dataset.load_run_data(settings, settings.data, check=True).test
    explorer = explore.Explorer(model, settings, images, labels, epoch)
    server = explore_server.make_server(explore.PAGE.read_bytes(), *explorer.routes())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = headless_chromium()
    try:
        driver.get(explore_server.address(server))
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return bounds !== null"))
        plane, pad = driver.find_element(By.ID, "plane"), driver.find_element(By.ID, "pad")
        ActionChains(driver).move_to_element_with_offset(plane, -180, -40).click().move_by_offset(
            330, 120).click().perform()
        drawing = ActionChains(driver).move_to_element_with_offset(pad, -30, -22).click_and_hold()
        for dx, dy in STROKES:
            drawing.move_by_offset(dx, dy)
        drawing.release().perform()
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return encoded !== null"))
        ActionChains(driver).move_to_element_with_offset(plane, 60, -150).perform()
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return !pending"))
        driver.save_screenshot(args.picture)
    finally:
        driver.quit()
        server.shutdown()
    print(f"Wrote {args.picture}")


if __name__ == "__main__":
    main()
