"""The viewer page in a real headless browser: ``unioncam serve --viewer`` with a random VGG16 at 32×32,
driven by Debian's Chromium through selenium and chromedriver (``scripts/bootstrap.sh`` installs them).

Skipped with the reason when Chromium, chromedriver or selenium is missing, unless
``UNIONCAM_REQUIRE_BROWSER=1`` (CI sets it): then a missing browser fails. ``UNIONCAM_SCREENSHOT=1``
writes the page with its explanations to ``docs/viewer.png``, and the page mid-explanation with its
progress bar to ``docs/viewer-progress.png``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from unioncam.serve.torchserve.server import Ports, config_text, free_port

from .fakes import serving

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get install chromium chromium-driver, pip install selenium (./test.sh's set-up does both)"
#: One masked-forward explanation at 32² takes ~20 s on this project's shared 2-core CPU; the page waits
#: for a slot for the second one. Generous: a slow machine must not fail the test.
EXPLAIN_TIMEOUT = 600

pytestmark = [pytest.mark.server, pytest.mark.browser]


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is missing"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


MISSING = _missing()
if MISSING and os.environ.get("UNIONCAM_REQUIRE_BROWSER") != "1":
    pytest.skip(f"browser test skipped: {MISSING} ({INSTALL})", allow_module_level=True)


def _serve(base: Path, *args: str):
    """``unioncam serve --viewer ARGS`` on free ports under ``base``; yields the page's address and the run's
    key file, then stops the server with Ctrl-C (which must end it cleanly)."""
    if MISSING:
        pytest.fail(f"UNIONCAM_REQUIRE_BROWSER=1 but {MISSING} ({INSTALL})")
    config = base / "config.properties"
    config.write_text(config_text(Ports.free()))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "unioncam", "serve", "--viewer", "--viewer-port", str(free_port()), *args,
         "--model-store", str(base / "store"), "--runs", str(base / "runs"), "--run-name", "t",
         "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=base)
    with serving(proc) as served:
        url = next(x.split()[1] for x in served.lines if x.startswith("viewer: "))
        yield {"url": url, "key_file": base / "runs" / "t" / "key_file.json"}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A random VGG16 at 32×32."""
    yield from _serve(tmp_path_factory.mktemp("viewer"), "--weights", "random", "--image-size", "32")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """Where the browser saves the page's downloads."""
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(downloads):
    if MISSING:
        pytest.fail(f"UNIONCAM_REQUIRE_BROWSER=1 but {MISSING} ({INSTALL})")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never try the network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield d
    d.quit()


def _wait(driver, condition, seconds: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.5).until(condition)
    except Exception as exc:
        panes = driver.execute_script(
            "return [...document.querySelectorAll('.pane')].map(p => p.dataset.method + ': ' + p.dataset.state"
            " + ': ' + p.querySelector('.status').textContent)")
        errors = driver.execute_script("return document.getElementById('errors').textContent")
        raise AssertionError(f"timed out waiting for {what}; panes {panes}; errors {errors!r}") from exc


# Per canvas: its size and how many distinct colours it holds (a blank one has one).
CANVAS_STATS = """
return [...document.querySelectorAll('.pane')].map(p => {
  const c = p.querySelector('canvas.overlay');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const colours = new Set();
  for (let i = 0; i < d.length; i += 4 * 7) colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
  let sum = 0;
  for (let i = 0; i < d.length; i += 4) sum = (sum + d[i] * 3 + d[i + 1] * 5 + d[i + 2] * 7) % 1000000007;
  return {method: p.dataset.method, width: c.width, height: c.height, colours: colours.size, sum,
          waited: p.dataset.waited === '1', details: p.querySelector('.details').textContent,
          timings: p.querySelector('.timings').textContent};
});
"""


def test_upload_explain_side_by_side_then_a_non_image(page, driver, tmp_path):
    from selenium.webdriver.common.by import By

    driver.get(page["url"])
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, 'input[name="method"]')) >= 7, 60, "the method list")
    key = json.loads(page["key_file"].read_text())["inference"]["key"]
    assert key not in driver.page_source
    # Random weights are said where a user looks: the header and a warning under it.
    assert "weights random (seed 0)" in driver.find_element(By.ID, "model-info").text
    warning = driver.find_element(By.ID, "weights-warning")
    assert warning.is_displayed() and "RANDOM" in warning.text and "mean nothing" in warning.text
    driver.find_element(By.ID, "file").send_keys(str(ROOT / "samples" / "chelsea.png"))
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "button.prediction")) == 5, 120, "the top-5 predictions")
    assert driver.execute_script("const i = document.getElementById('preview'); return i.naturalWidth * i.naturalHeight") > 0

    # UnionCAM (the archive's default, checked) and Score-CAM both need the one explanation slot: the
    # second is told 503 + Retry-After and must wait and retry by itself; Grad-CAM runs beside them.
    for method in ("gradcam", "scorecam"):
        driver.find_element(By.CSS_SELECTOR, f'input[name="method"][value="{method}"]').click()
    checked = driver.execute_script(
        "return [...document.querySelectorAll('input[name=method]:checked')].map(i => i.value)")
    assert checked == ["unioncam", "gradcam", "scorecam"]
    start = time.monotonic()
    driver.find_elements(By.CSS_SELECTOR, "button.prediction")[1].click()  # explain the second class
    _wait(driver, lambda d: d.execute_script("return document.querySelectorAll('.pane .status')[0].textContent")
          .endswith("elapsed"), 30, "an elapsed-time indicator")
    # A masked explanation longer than a second shows the server's progress: a bar, done of total, %, time left.
    shown = _wait(driver, lambda d: d.execute_script(
        "const p = [...document.querySelectorAll('.pane .progress')].find(p => !p.hidden);"
        " if (!p) return null; const b = p.querySelector('progress');"
        " return [p.closest('.pane').dataset.method, p.querySelector('.progress-text').textContent, b.max, b.value];"),
        120, "a progress bar")
    method, text, most, value = shown
    assert method in ("unioncam", "scorecam") and 0 <= value <= most and most > 3, shown
    assert re.fullmatch(r"\d+ of \d+ masked forwards · \d+ %( · about [\d.]+ s left)?", text), text
    if os.environ.get("UNIONCAM_SCREENSHOT") == "1":  # the page mid-explanation
        _wait(driver, lambda d: "left" in d.execute_script(
            "const p = [...document.querySelectorAll('.pane .progress')].find(p => !p.hidden);"
            " return p ? p.textContent : ''"), 60, "a time left")
        driver.save_screenshot(str(ROOT / "docs" / "viewer-progress.png"))

    def all_done(d):
        states = d.execute_script("return [...document.querySelectorAll('.pane')].map(p => p.dataset.state)")
        assert "error" not in states, d.execute_script("return document.getElementById('errors').textContent")
        return states == ["done"] * 3

    _wait(driver, all_done, EXPLAIN_TIMEOUT, "three explanations")
    seconds = time.monotonic() - start
    stats = {s["method"]: s for s in driver.execute_script(CANVAS_STATS)}
    assert list(stats) == ["unioncam", "gradcam", "scorecam"]
    for method, s in stats.items():
        assert s["width"] > 0 and s["height"] > 0, s
        assert abs(s["width"] / s["height"] - 451 / 300) < 0.02, s  # chelsea.png's aspect
        assert s["colours"] > 20, s  # image and map drawn, not a blank canvas
        assert "ms on the server" in s["timings"], s
    assert stats["unioncam"]["waited"] or stats["scorecam"]["waited"], "no masked explanation was told to wait"
    details = stats["unioncam"]["details"]
    assert "AMS kept the union map" in details or "AMS kept the region map" in details, details
    for words in ("β_union = ", "β_region = ", "β_denoise = ", "% of the gradient entries", "active"):
        assert words in details, (words, details)
    target = driver.execute_script("return document.querySelectorAll('button.prediction')[1].dataset.class")
    title = driver.find_element(By.CSS_SELECTOR, ".pane .pane-title").text
    assert f"({target})" in title  # the class that was clicked

    # The page's float16 decoding agrees with numpy's on the same request's answer (through the same proxy).
    import numpy as np
    import requests

    r = requests.post(f"{page['url']}api/explanations", headers={"Origin": page["url"].rstrip("/")}, timeout=120,
                      files={"image": ("chelsea.png", (ROOT / "samples" / "chelsea.png").read_bytes(),
                                       "application/octet-stream")},
                      data={"method": "gradcam", "target": target, "theta": "10"})
    assert r.status_code == 200, r.text
    m = r.json()["map"]
    want = np.frombuffer(base64.b64decode(m["data"]), dtype="<f2").astype(np.float64).reshape(m["shape"])
    got = json.loads(driver.execute_script("return document.querySelector('.pane[data-method=gradcam]')"
                                           ".dataset.mapStats"))
    assert [got["h"], got["w"]] == m["shape"] == [32, 32]
    assert got["min"] == pytest.approx(want.min(), abs=1e-3) and got["max"] == pytest.approx(want.max(), abs=1e-3)
    assert got["sum"] == pytest.approx(want.sum(), rel=1e-3)
    assert 0 <= got["min"] < got["max"] <= 1

    # The opacity slider redraws from the kept maps, without a request.
    driver.execute_script("const o = document.getElementById('opacity'); o.value = 90;"
                          " o.dispatchEvent(new Event('input'));")
    after = {s["method"]: s for s in driver.execute_script(CANVAS_STATS)}
    assert all(after[m]["sum"] != stats[m]["sum"] for m in stats)
    driver.execute_script("const o = document.getElementById('opacity'); o.value = 50;"
                          " o.dispatchEvent(new Event('input'));")
    print(f"three explanations side by side in {seconds:.1f} s")

    # A file that is no image: the API's refusal, as a sentence on the page.
    text = tmp_path / "notes.txt"
    text.write_text("these are notes, not a picture\n")
    driver.find_element(By.ID, "file").send_keys(str(text))
    sentence = "The server refused the image: the image is not an image PIL can read."
    _wait(driver, lambda d: sentence in d.find_element(By.ID, "errors").text, 120, "the error sentence")
    assert "It accepts a JPEG, PNG" in driver.find_element(By.ID, "errors").text
    assert driver.find_elements(By.CSS_SELECTOR, ".pane") == []
    assert key not in driver.page_source


def _explain_all(driver, methods: tuple[str, ...], seconds: float) -> dict[str, dict]:
    """Check exactly ``methods``, click "Explain" and wait for every pane; their canvas statistics."""
    from selenium.webdriver.common.by import By

    for box in driver.find_elements(By.CSS_SELECTOR, 'input[name="method"]'):
        if box.is_selected() != (box.get_attribute("value") in methods):
            box.click()

    def all_done(d):
        states = d.execute_script("return [...document.querySelectorAll('.pane')].map(p => p.dataset.state)")
        assert "error" not in states, d.execute_script("return document.getElementById('errors').textContent")
        return states == ["done"] * len(methods)

    driver.find_element(By.ID, "explain").click()
    _wait(driver, all_done, seconds, f"{len(methods)} explanations")
    return {s["method"]: s for s in driver.execute_script(CANVAS_STATS)}


@pytest.fixture(scope="module")
def shapes_page(tmp_path_factory):
    """The ground-truth benchmark's CNN with its shipped (trained) weights at 64×64: maps that mean something."""
    yield from _serve(tmp_path_factory.mktemp("viewer-shapes"), "--model", "shapes", "--image-size", "64")


def test_a_trained_model_other_than_vgg16(shapes_page, driver, downloads, tmp_path):
    """The page serves whatever model the archive holds; with trained weights the maps find the object.
    ``UNIONCAM_SCREENSHOT=1`` saves this page as the README's ``docs/viewer.png``."""
    from selenium.webdriver.common.by import By

    from unioncam.eval.groundtruth import make_sample

    sample = make_sample(7, 4, size=256)  # a cross on clutter, drawn at 256² (the server resizes to 64²)
    path = tmp_path / "cross.png"
    Image.fromarray((sample.image * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
    driver.get(shapes_page["url"])
    _wait(driver, lambda d: "shapes" in d.find_element(By.TAG_NAME, "header").text, 60, "the model's name")
    assert "weights shipped" in driver.find_element(By.ID, "model-info").text
    assert not driver.find_element(By.ID, "weights-warning").is_displayed()
    assert "samples/shapes" in driver.find_element(By.ID, "results-hint").text
    # Dropped on the page this time (the first test chose its file): a File from a detached input, handed
    # to the drop zone in a DataTransfer as a drag from the desktop would.
    driver.execute_script("const i = document.createElement('input'); i.type = 'file'; i.id = 'to-drop';"
                          " i.style.display = 'none'; document.body.append(i);")
    driver.find_element(By.ID, "to-drop").send_keys(str(path))
    driver.execute_script("const t = new DataTransfer(); t.items.add(document.getElementById('to-drop').files[0]);"
                          " const z = document.getElementById('drop');"
                          " z.dispatchEvent(new DragEvent('dragover', {dataTransfer: t, bubbles: true, cancelable: true}));"
                          " z.dispatchEvent(new DragEvent('drop', {dataTransfer: t, bubbles: true, cancelable: true}));")
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "button.prediction")) == 5, 120, "the predictions")
    assert driver.find_element(By.ID, "file").get_attribute("value") == ""  # not through the file input
    first = driver.find_elements(By.CSS_SELECTOR, "button.prediction")[0].text
    assert first.startswith("cross (") and "%" in first, first
    stats = _explain_all(driver, ("unioncam", "gradcam", "scorecam"), EXPLAIN_TIMEOUT)
    for method, st in stats.items():
        assert st["width"] == st["height"] > 0 and st["colours"] > 20, st
        assert f"{method}: cross" in driver.find_element(By.CSS_SELECTOR, f'.pane[data-method="{method}"]').text
    # Where each map is hottest: inside the cross's box (the maps are 64×64, the box is at 256²).
    x0, y0, x1, y1 = (v / 4 for v in sample.box)
    for method in stats:
        got = json.loads(driver.execute_script(
            f"return document.querySelector('.pane[data-method={method}]').dataset.mapStats"))
        assert got["max"] > got["min"], (method, got)
        ay, ax = divmod(got["argmax"], got["w"])
        assert x0 - 2 <= ax <= x1 + 2 and y0 - 2 <= ay <= y1 + 2, (method, (ax, ay), (x0, y0, x1, y1))
    if os.environ.get("UNIONCAM_SCREENSHOT") == "1":  # the whole page, 1400 px wide
        chrome, height = driver.execute_script(
            "return [window.outerHeight - window.innerHeight, document.documentElement.scrollHeight]")
        driver.set_window_size(1400, chrome + height)
        driver.save_screenshot(str(ROOT / "docs" / "viewer.png"))
        driver.set_window_size(1400, 1000)

    # The pane's downloads: the overlay as a PNG of the drawn canvas, the API's answer as JSON.
    pane = driver.find_element(By.CSS_SELECTOR, '.pane[data-method="unioncam"]')
    pane.find_element(By.CSS_SELECTOR, ".download-png").click()
    pane.find_element(By.CSS_SELECTOR, ".download-json").click()
    png, js = downloads / "cross.unioncam.png", downloads / "cross.unioncam.json"
    _wait(driver, lambda d: png.is_file() and js.is_file(), 60, "the two downloads")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (stats["unioncam"]["width"], stats["unioncam"]["height"])
    answer = json.loads(js.read_text())
    assert answer["method"] == "unioncam" and answer["class_name"] == "cross"
    assert answer["details"]["selected"] in ("union", "region") and answer["map"]["shape"] == [64, 64]


def test_what_the_server_cannot_say_well_the_page_says(page, driver):
    """A 413 from TorchServe (an empty body) and a β tie at float32 rounding, the answers stood in for."""
    from selenium.webdriver.common.by import By

    driver.get(page["url"])
    _wait(driver, lambda d: d.execute_script("return !!document.querySelector('input[name=method]')"), 60, "the page")
    m = base64.b64encode(bytes.fromhex("00000038003c0034")).decode()  # float16 0, 0.5, 1, 0.25
    answer = {"class": 1, "class_name": "one", "score": 0.5, "method": "unioncam",
              "map": {"dtype": "float16", "byteorder": "little", "shape": [2, 2], "data": m},
              "details": {"beta_denoise": 0.5, "beta_union": 0.9311167, "beta_region": 0.9311166, "beta_tie": True,
                          "selected": "union", "theta": 10, "denoised_fraction": 0.1,
                          "denoised_positive_fraction": 0.0, "active_channels": 3, "channels": 4,
                          "baseline_score": 0.01, "masked_forwards": 6, "layer": "x"},
              "timings": {"decode_ms": 1, "explain_ms": 2, "encode_ms": 1}}
    preds = {"predictions": [{"class": 1, "class_name": "one", "probability": 0.5}]}
    driver.execute_script(
        "window.__answer = arguments[0]; window.__preds = arguments[1]; window.__too_large = true;"
        " window.fetch = (url, opts) => {"
        "  if (String(url).endsWith('/api/predictions')) return Promise.resolve(window.__too_large"
        "    ? new Response('', {status: 413}) : new Response(JSON.stringify(window.__preds),"
        "      {status: 200, headers: {'Content-Type': 'application/json'}}));"
        "  return Promise.resolve(new Response(JSON.stringify(window.__answer),"
        "    {status: 200, headers: {'Content-Type': 'application/json'}})); };", answer, preds)
    driver.find_element(By.ID, "file").send_keys(str(ROOT / "samples" / "shapes" / "cross.png"))
    limit = "larger than the server accepts: at most 16 MiB per request (HTTP 413)"
    _wait(driver, lambda d: limit in d.find_element(By.ID, "errors").text, 30, "the size limit")

    driver.execute_script("window.__too_large = false;")
    driver.find_element(By.ID, "file").send_keys(str(ROOT / "samples" / "shapes" / "ring.png"))
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "button.prediction")) == 1, 30, "the prediction")
    driver.find_elements(By.CSS_SELECTOR, "button.prediction")[0].click()
    _wait(driver, lambda d: d.execute_script(
        "return [...document.querySelectorAll('.pane')].every(p => p.dataset.state === 'done')"), 30, "the panes")
    details = driver.find_element(By.CSS_SELECTOR, '.pane[data-method="unioncam"] .details').text
    assert "AMS kept the union map on a tie" in details and "equal to float32 rounding" in details, details
    assert "beat" not in details, details
