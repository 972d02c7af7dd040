"""The web page at ``/`` (cnnkit.serve.page): its routes with TestClient, ``cnnkit ui``, then the page itself in a
real browser (Debian's Chromium driven by Playwright) against a real ``cnnkit serve`` on 127.0.0.1.

The browser tests skip, saying why, when Playwright or Chromium is missing (``apt-get install chromium``;
``pip install -e ".[test]"`` brings Playwright; no browser is ever downloaded). Screenshots and timings are
written under pytest's tmp dir (the path is printed); ``CNNKIT_UI_SCREENSHOT=1`` also copies the desktop
screenshot to docs/ui.png for the README; ``CNNKIT_TEST_ARTEFACTS=DIR`` keeps them all in DIR.
"""

from __future__ import annotations

import fnmatch
import html.parser
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import cnnkit
from cnnkit.rundir import read_json
from cnnkit.serve import create_app
from cnnkit.serve.page import STATIC
from tests.conftest import COLORS, colour_image, write_class_folder

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("CNNKIT_CHROMIUM", "/usr/bin/chromium"))
# As the machine notes say: headless, no sandbox (root in CI), and none of Chromium's own calls home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--no-default-browser-check"]


def _browser_missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return 'Playwright for Python is not installed: pip install -e ".[test]" (or pip install playwright)'
    if not CHROMIUM.is_file():
        return f"No Chromium at {CHROMIUM}: apt-get install chromium (or set CNNKIT_CHROMIUM to its path)"
    return None


# Skipped before any fixture is built (the trained run, the server) when there is no browser to drive.
needs_browser = pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
MAX_BODY_BYTES = 150_000  # the served limit: big.png (about 200 kB) is over it, the photos far under


@dataclass
class World:
    run: Path
    files: dict[str, Path]
    expected: dict[str, cnnkit.Prediction]  # cnnkit predict's answer for red, blue and grey
    threshold: float


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """A calibrated colours run with an evaluation report, and files: two photos, an ambiguous one, broken ones."""
    root = tmp_path_factory.mktemp("page")
    data = write_class_folder(root / "data", per_class=12)
    run = root / "colours"
    cnnkit.train(data, run, model="simple", epochs=4, image_size=16, cache_root=root / "cache")
    cnnkit.evaluate(run, write_class_folder(root / "test", per_class=3, seed=5), cache_root=root / "cache")
    files = _write_files(root / "files")
    cnnkit.calibrate(run)  # the temperature first; then a threshold between the photos and the grey image
    confidence = {p.path: p.confidence for p in cnnkit.Predictor(run).predict([files[n] for n in ("red", "blue", "grey")])}
    sure, unsure = min(confidence[str(files["red"])], confidence[str(files["blue"])]), confidence[str(files["grey"])]
    assert unsure < sure, f"the grey image should be the least sure: {confidence}"
    threshold = (sure + unsure) / 2
    cnnkit.calibrate(run, min_confidence=threshold)
    found = cnnkit.Predictor(run).predict([files[n] for n in ("red", "blue", "grey")], top_k=3)
    expected = dict(zip(("red", "blue", "grey"), found))
    assert expected["red"].label == "red" and expected["blue"].label == "blue", expected  # the model learned
    assert expected["grey"].label == "unknown", expected
    return World(run, files, expected, threshold)


def _write_files(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    rng = np.random.default_rng(11)
    files = {"red": folder / "red.jpg", "blue": folder / "blue.png", "grey": folder / "grey.png"}
    colour_image(rng, COLORS["red"], 48).save(files["red"], quality=90)
    colour_image(rng, COLORS["blue"], 48).resize((60, 40)).save(files["blue"])
    Image.fromarray(np.full((48, 48, 3), 128, np.uint8)).save(files["grey"])
    files["corrupt"] = folder / "corrupt.jpg"
    files["corrupt"].write_bytes(files["red"].read_bytes()[:300])  # a truncated JPEG
    files["fake"] = folder / "fake.jpg"
    files["fake"].write_text("these are words, not pixels")  # named like an image
    files["notes"] = folder / "notes.txt"
    files["notes"].write_text("a text file")  # the wrong type altogether
    files["big"] = folder / "big.png"
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(files["big"])
    assert files["big"].stat().st_size > MAX_BODY_BYTES
    for i in range(20):
        colour = list(COLORS)[i % 3]
        colour_image(rng, COLORS[colour], 48).save(folder / f"many_{i:02d}_{colour}.jpg", quality=90)
    return files


# -- the routes, without a browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(world):
    with TestClient(create_app(world.run, max_batch_size=4)) as c:
        yield c


def test_the_page_and_its_files_are_served_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    assert client.head("/").status_code == 200
    assert client.get("/static/page.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/page.css").headers["content-type"].startswith("text/css")
    missing = client.get("/static/../app.py")
    assert missing.status_code == 404
    other = client.get("/static/app.py")
    assert other.status_code == 404 and "page.js" in other.json()["error"]


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for key, value in attrs if key in ("src", "href", "action") and value]


def test_nothing_on_the_page_comes_from_another_host():
    """Every file the page is made of names only this server's paths: no CDN, no font, no analytics."""
    parser = _Links()
    parser.feed((STATIC / "index.html").read_text(encoding="utf-8"))
    assert sorted(parser.urls) == ["#results-heading", "/static/page.css", "/static/page.js", "data:,"]
    for path in STATIC.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, flags=re.IGNORECASE), path.name
        assert "@import" not in text and "url(" not in text, path.name


def test_the_page_ships_in_the_package():
    """pyproject's package-data takes every file of the page into wheels (and so into the Docker image)."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cnnkit"]
    files = [p.relative_to(REPO / "cnnkit").as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert {"serve/static/index.html", "serve/static/page.js", "serve/static/page.css"} <= set(files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)] == []


def test_the_model_card_of_a_run_comes_from_run_json(client, world):
    card = client.get("/v1/models/colours/card").json()
    run = read_json(world.run / "run.json")
    assert card["name"] == "colours" and card["version"] == "1" and card["stage"] is None
    assert card["from"] == "run.json"
    assert card["class_names"] == ["blue", "green", "red"] and card["image_size"] == [16, 16]
    assert card["data_hash"] == run["data_hash"] and card["trained"] == run["created"]
    assert card["backend"] == run["versions"]["backend"] and card["architecture"] == "simple"
    assert card["metrics"]["val_accuracy"] == run["metrics"]["val_accuracy"]
    evaluation = read_json(world.run / "eval" / "test" / "metrics.json")
    assert card["metrics"]["eval"]["test"]["accuracy"] == evaluation["accuracy"]
    assert card["calibration"]["min_confidence"] == pytest.approx(world.threshold)
    assert card["limits"]["max_body_bytes"] == 20 * 1024 * 1024
    assert card["reports"] == [{"name": "test", "url": "/v1/models/colours/reports/test"}]
    report = client.get(card["reports"][0]["url"])
    assert report.status_code == 200 and report.content == (world.run / "eval" / "test" / "report.html").read_bytes()
    assert "img-src data:" in report.headers["content-security-policy"]
    missing = client.get("/v1/models/colours/reports/validation")
    assert missing.status_code == 404 and "Reports: ['test']" in missing.json()["error"]
    assert client.get("/v1/models/other/card").status_code == 404
    assert "/v1/models/{name}/card" in client.get("/openapi.json").json()["paths"]  # a documented API route


def test_the_model_card_of_a_registered_model_comes_from_the_registry(world, tmp_path):
    from cnnkit.registry import Registry

    url = f"sqlite:///{tmp_path / 'reg.db'}"
    copy = tmp_path / "copy"
    shutil.copytree(world.run, copy)
    with Registry(url) as registry:
        registry.add(world.run, "flowers", stage="production")
        registry.add(copy, "flowers", stage="staging")
    with TestClient(create_app("flowers@production", registry_url=url)) as c:
        card = c.get("/v1/models/flowers/card").json()
        assert card["from"] == "registry" and card["stage"] == "production" and card["version"] == "1"
        assert card["registry_name"] == "flowers" and card["registered"]
        assert card["trained"] == read_json(world.run / "run.json")["created"]
        assert card["metrics"]["eval"]["test"]["accuracy"] == pytest.approx(
            read_json(world.run / "eval" / "test" / "metrics.json")["accuracy"])
        assert [r["name"] for r in card["reports"]] == ["test"]
        with Registry(url) as registry:
            registry.promote("flowers", 2, "production")
        assert c.get("/v1/models/flowers/card").json()["stage"] == "archived"  # read live, not at start-up


# -- cnnkit ui -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}


def _first_line(proc: subprocess.Popen, timeout_s: float = 120) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line:
            return line.strip()
        if proc.poll() is not None:
            raise AssertionError(f"cnnkit ui exited: {proc.stderr.read()}")
    raise AssertionError("cnnkit ui printed no URL in time")


@pytest.mark.slow
def test_cnnkit_ui_serves_the_page_on_a_free_local_port_and_opens_it(world, tmp_path):
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.py"  # the outside world's web browser: a script that notes the URL it got
    browser.write_text(f"import sys; open({str(opened)!r}, 'w').write(sys.argv[1])\n")
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit.cli", "ui", str(world.run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**_env(), "BROWSER": f"{sys.executable} {browser} %s"})
    try:
        url = _first_line(proc)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url), url
        assert "<title>cnnkit" in httpx.get(url, timeout=10).text
        assert httpx.get(url + "v1/models/colours/card", timeout=10).json()["name"] == "colours"
        for _ in range(100):
            if opened.exists() and opened.read_text():
                break
            time.sleep(0.1)
        assert opened.read_text() == url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cnnkit_ui_says_what_is_wrong():
    from typer.testing import CliRunner

    from cnnkit.cli import app

    result = CliRunner().invoke(app, ["ui", "no/such/run", "--no-browser"])
    assert result.exit_code == 2 and "No run directory or model file" in result.output


# -- the page in a real browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(world):
    """``cnnkit serve`` in a subprocess on a free 127.0.0.1 port, with a small body limit."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit.cli", "--quiet", "serve", str(world.run), "--port",
                             str(port), "--max-body-bytes", str(MAX_BODY_BYTES), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"cnnkit serve exited: {proc.stderr.read()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def chromium():
    if _browser_missing():
        pytest.skip(_browser_missing())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> Path:
    """Screenshots and timings: under pytest's tmp dir, or ``CNNKIT_TEST_ARTEFACTS`` to keep them."""
    kept = os.environ.get("CNNKIT_TEST_ARTEFACTS")
    folder = Path(kept) if kept else tmp_path_factory.mktemp("page-artefacts")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\npage screenshots and timings: {folder}")
    return folder


class Tab:
    """One browser tab on the served page; every request it makes is recorded, any to another host refused."""

    def __init__(self, browser, origin: str, width: int, height: int) -> None:
        self.origin = origin
        self.requests: list[str] = []
        self.outside: list[str] = []
        self.errors: list[str] = []
        self.context = browser.new_context(viewport={"width": width, "height": height}, service_workers="block")
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda m: self.errors.append(m.text) if "Content Security Policy" in m.text else None)
        # listening before the page loads: file-chooser interception is switched on asynchronously, and a
        # chooser opened before it is on is dismissed unseen (expect_file_chooser alone missed 1 in 3)
        self.choosers: list = []
        self.page.on("filechooser", lambda chooser: self.choosers.append(chooser))
        self.page.goto(origin + "/")
        self.page.wait_for_selector("#choose:not([disabled])", timeout=30_000)
        self.page.wait_for_selector("#card-facts dt", timeout=30_000)

    def _route(self, route) -> None:
        url = route.request.url
        self.requests.append(url)
        if url.startswith(self.origin + "/"):
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def drop(self, *paths: Path) -> float:
        """Drop files on the drop zone as a user's drag-and-drop does; returns the time of the drop."""
        files = [{"name": p.name, "type": _mime(p), "bytes": list(p.read_bytes())} for p in paths]
        transfer = self.page.evaluate_handle(
            """(files) => { const dt = new DataTransfer();
                for (const f of files) dt.items.add(new File([new Uint8Array(f.bytes)], f.name, {type: f.type}));
                return dt; }""", files)
        start = time.perf_counter()
        self.page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
        return start

    def wait_until_done(self, count: int, timeout_ms: float = 120_000, cam: bool = True) -> None:
        """Until ``count`` results are in (each an error, or a prediction and, with ``cam``, its Grad-CAM)."""
        self.page.wait_for_function(
            """([count, cam]) => { const items = [...document.querySelectorAll('#results > li')];
                return items.length >= count && items.every(i => i.dataset.state === 'error' ||
                    (i.dataset.state !== 'pending' && (!cam || i.dataset.cam))); }""",
            arg=[count, cam], timeout=timeout_ms, polling=10)

    def result(self, name: str):
        return self.page.locator("#results > li", has=self.page.locator("h3.filename", has_text=name))

    def close(self) -> None:
        assert self.errors == [], self.errors
        assert self.outside == [], f"requests left 127.0.0.1: {self.outside}"
        assert all(u.startswith(self.origin + "/") for u in self.requests), self.requests
        assert {"/", "/static/page.js", "/readyz"} <= {u[len(self.origin):] for u in self.requests}  # it saw them
        self.context.close()


def _mime(path: Path) -> str:
    return {".jpg": "image/jpeg", ".png": "image/png", ".txt": "text/plain"}[path.suffix]


@pytest.fixture
def tab(chromium, server):
    opened = Tab(chromium, server, 1280, 900)
    yield opened
    opened.close()


def _percent(text: str) -> float:
    return float(re.search(r"([\d.]+)%", text).group(1)) / 100


@pytest.mark.slow
@needs_browser
def test_two_photos_get_the_classes_and_confidences_cnnkit_predict_gives(tab, world, artefacts):
    tab.drop(world.files["red"], world.files["blue"])
    tab.wait_until_done(2)
    for name in ("red", "blue"):
        expected, card = world.expected[name], tab.result(world.files[name].name)
        assert card.get_attribute("data-state") == "done"
        assert card.locator(".verdict .label").inner_text() == expected.label == name
        assert _percent(card.locator(".verdict").inner_text()) == pytest.approx(expected.confidence, abs=0.0005)
        rows = card.locator(".topk li")
        assert rows.count() == 3
        for i, (label, probability) in enumerate(expected.top_k):  # every bar carries its number as text
            assert rows.nth(i).locator(".name").inner_text() == label
            assert _percent(rows.nth(i).locator(".value").inner_text()) == pytest.approx(probability, abs=0.0005)
            width = rows.nth(i).locator(".fill").evaluate("e => e.getBoundingClientRect().width / e.parentElement.getBoundingClientRect().width")
            assert width == pytest.approx(probability, abs=0.02)
    tab.page.screenshot(path=artefacts / "two-photos.png", full_page=True)


@pytest.mark.slow
@needs_browser
def test_the_grad_cam_overlay_renders_and_the_switch_hides_it_from_the_keyboard(tab, world, artefacts):
    tab.page.set_input_files("#files", [world.files["red"]])
    tab.wait_until_done(1)
    card = tab.result("red.jpg")
    assert card.get_attribute("data-cam") == "shown"
    overlay = card.locator("img.overlay")
    assert overlay.is_visible()
    # it decoded to the model's 16x16 input, and holds a heatmap (many colours), not a blank square
    size, colours = overlay.evaluate("""img => { const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data; const seen = new Set();
        for (let i = 0; i < d.length; i += 4) seen.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]);
        return [[img.naturalWidth, img.naturalHeight], seen.size]; }""")
    assert size == [16, 16] and colours > 20
    assert "red" in overlay.get_attribute("alt")
    switch = tab.page.get_by_role("switch", name="Show Grad-CAM")
    assert switch.is_checked()
    switch.focus()
    tab.page.keyboard.press("Space")
    assert not switch.is_checked() and overlay.is_hidden()
    card.screenshot(path=artefacts / "grad-cam-off.png")
    tab.page.keyboard.press("Space")
    assert switch.is_checked() and overlay.is_visible()
    card.screenshot(path=artefacts / "grad-cam-on.png")


@pytest.mark.slow
@needs_browser
def test_each_broken_file_gets_its_error_in_words_next_to_its_name(tab, world):
    names = ("corrupt", "fake", "notes", "big")
    tab.page.set_input_files("#files", [world.files[n] for n in names])
    tab.wait_until_done(len(names))
    expected = {"corrupt.jpg": ("Corrupt image:", "corrupt or truncated JPEG"),
                "fake.jpg": ("Not an image:", "not an image"),
                "notes.txt": ("Wrong type:", '"text/plain" is not an image type'),
                "big.png": ("Too large:", f"{MAX_BODY_BYTES:,} bytes")}
    for name, (kind, detail) in expected.items():
        card = tab.result(name)
        assert card.get_attribute("data-state") == "error"
        error = card.locator(".error")
        assert error.is_visible() and error.inner_text().startswith(kind) and detail in error.inner_text(), name
        # next to its name: the error follows the file name inside the same result
        assert card.locator("h3.filename + p.error").count() == 1
    assert "4 images, 4 with errors." in tab.page.locator("#progress").inner_text()


@pytest.mark.slow
@needs_browser
def test_an_unsure_image_is_unknown_and_the_page_says_why(tab, world):
    tab.page.set_input_files("#files", [world.files["grey"]])
    tab.wait_until_done(1)
    card = tab.result("grey.png")
    assert card.get_attribute("data-state") == "unknown"
    assert card.locator(".verdict .label").inner_text() == "unknown"
    why = card.locator(".why").inner_text()
    best, confidence = world.expected["grey"].top_k[0]
    assert f"“{best}”" in why and f"{confidence * 100:.1f}%" in why and f"{world.threshold * 100:.1f}%" in why
    assert "abstain threshold" in why


@pytest.mark.slow
@needs_browser
def test_paste_and_the_keyboard_reach_every_control(tab, world):
    page = tab.page
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "choose"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineWidth")
    assert float(outline.rstrip("px")) >= 2  # focus is visible
    page.keyboard.press("Enter")
    for _ in range(100):
        if tab.choosers:
            break
        page.wait_for_timeout(50)
    assert tab.choosers, "Enter on 'Choose images…' opened no file chooser"
    tab.choosers[0].set_files(world.files["blue"])
    tab.wait_until_done(1)
    transfer = page.evaluate_handle(
        """(bytes) => { const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], 'image.png', {type: 'image/png'})); return dt; }""",
        list(world.files["red"].read_bytes()))
    page.evaluate("(dt) => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt}))", transfer)
    tab.wait_until_done(2)
    assert tab.result("image.png").locator(".verdict .label").inner_text() == "red"
    for image in page.locator("img").all():  # labels for screen readers
        assert image.get_attribute("alt"), image.evaluate("e => e.outerHTML")
    assert page.get_by_role("list", name="Top 3 classes for blue.png").count() == 1
    page.locator("#clear").click()
    assert page.locator("#results > li").count() == 0


@pytest.mark.slow
@needs_browser
def test_the_model_card_and_its_report_link(tab, world):
    facts = dict(zip(tab.page.locator("#card-facts dt").all_inner_texts(),
                     tab.page.locator("#card-facts dd").all_inner_texts()))
    run = read_json(world.run / "run.json")
    assert facts["Name"] == "colours" and facts["Version"] == "1" and facts["Stage"] == "not registered"
    assert facts["Classes"] == "3: blue, green, red" and facts["Image size"].startswith("16 × 16 px")
    assert facts["Data hash"] == run["data_hash"] and facts["Backend"] == run["versions"]["backend"]
    assert facts["Trained"].startswith(run["created"][:10])
    assert facts["Abstains below"] == f"{world.threshold * 100:.1f}%"
    assert tab.page.locator("#card-metrics table").count() == 2  # training, and the test evaluation
    link = tab.page.get_by_role("link", name=re.compile("Evaluation report: test"))
    with tab.context.expect_page() as opened:
        link.click()
    report = opened.value
    report.wait_for_load_state()
    assert report.url == tab.origin + "/v1/models/colours/reports/test"
    assert "cnnkit evaluation" in report.title()
    report.close()


@pytest.mark.slow
@needs_browser
def test_screenshots_at_desktop_and_phone_width(chromium, server, world, artefacts):
    for label, width, height in (("desktop", 1280, 900), ("phone", 360, 780)):
        tab = Tab(chromium, server, width, height)
        tab.drop(world.files["red"], world.files["blue"], world.files["grey"], world.files["corrupt"])
        tab.wait_until_done(4)
        # readable at this width: nothing wider than the window, so no sideways scrolling
        assert tab.page.evaluate("document.documentElement.scrollWidth") <= width
        tab.page.screenshot(path=artefacts / f"page-{label}.png")
        tab.page.screenshot(path=artefacts / f"page-{label}-full.png", full_page=True)
        tab.close()
    if os.environ.get("CNNKIT_UI_SCREENSHOT"):
        shutil.copy2(artefacts / "page-desktop.png", REPO / "docs" / "ui.png")
    assert Image.open(artefacts / "page-phone.png").size == (360, 780)


@pytest.mark.slow
@needs_browser
def test_time_from_drop_to_result_for_one_and_twenty_images(chromium, server, world, artefacts):
    many = sorted(world.files["red"].parent.glob("many_*.jpg"))
    warm = Tab(chromium, server, 1280, 900)  # the server's first Grad-CAM traces its gradient function
    warm.drop(world.files["blue"])
    warm.wait_until_done(1)
    warm.close()
    timings = {}
    for count in (1, 20):
        tab = Tab(chromium, server, 1280, 900)
        start = tab.drop(*many[:count])
        tab.wait_until_done(count, cam=False)
        predicted = time.perf_counter() - start
        tab.wait_until_done(count, cam=True)
        explained = time.perf_counter() - start
        labels = tab.page.locator("#results .verdict .label").all_inner_texts()
        assert labels == [p.stem.rsplit("_", 1)[1] for p in many[:count]]
        timings[f"{count}_images"] = {"to_predictions_s": round(predicted, 3), "to_grad_cam_s": round(explained, 3)}
        tab.close()
    (artefacts / "timings.json").write_text(json.dumps(timings, indent=2))
    print(f"\ndrop to result: {timings}")
    assert timings["20_images"]["to_grad_cam_s"] < 120
