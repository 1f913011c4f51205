"""The page in a real browser: `serve` runs as its own process on a free port, Debian's chromium (driven by
Playwright) uploads a real photo, the rendered top-5 must be the API's, and clicking a result searches by it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from scripts.load_test import free_port

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -e '.[test]'")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
expect = playwright.expect

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("Leopards", "airplanes", "dalmatian", "pizza", "llama", "flamingo")
PER_CLASS = 12
pytestmark = pytest.mark.real


def chromium() -> str:
    found = shutil.which(os.environ.get("LOOKALIKE_CHROMIUM", "chromium")) or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no chromium found (apt-get install -y chromium, or set LOOKALIKE_CHROMIUM); "
                    "Playwright's own browser download cannot work offline")
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small real gallery (6 caltech101-22 classes x 12 photos, mobilenetv2), served on loopback;
    yields (base URL, held-out query photo)."""
    from tests.conftest import ASSETS

    archive = ASSETS / "data" / "caltech101-22.zip"
    if not archive.is_file() or not (ASSETS / "weights").is_dir():
        pytest.skip(f"real assets not found at {ASSETS} (set LOOKALIKE_ASSETS)")
    browser = chromium()
    root = tmp_path_factory.mktemp("browser")
    with zipfile.ZipFile(archive) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        for label in CLASSES:
            photos = [n for n in names if n.split("/")[-2] == label][:PER_CLASS + 1]
            for name in photos[1:]:
                (root / "gallery" / label).mkdir(parents=True, exist_ok=True)
                (root / "gallery" / label / Path(name).name).write_bytes(z.read(name))
            if label == "Leopards":
                query = root / "leopard-query.jpg"
                query.write_bytes(z.read(photos[0]))
    env = dict(os.environ, LOOKALIKE_WEIGHTS=str(ASSETS / "weights"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "cli.py", "build-cache", "--gallery", str(root / "gallery"), "--out",
                    str(root / "cache"), "--classifier", "mobilenetv2", "--embedder", "mobilenetv2", "--device", "cpu"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    port = free_port()
    with open(root / "serve.log", "w") as log:  # the server keeps its own copy of the descriptor
        server = subprocess.Popen([sys.executable, "cli.py", "serve", "--cache", str(root / "cache"), "--port",
                                   str(port), "--device", "cpu"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"serve did not start: {(root / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.3)
    try:
        yield base, query, browser
    finally:
        server.terminate()
        server.wait(timeout=30)


def rendered(page) -> list[str]:
    return page.locator("#results .card .label").all_inner_texts()


def test_upload_through_the_page_then_click_a_result(served, tmp_path):
    base, photo, browser_path = served
    expected = httpx.post(f"{base}/api/query", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
                          timeout=60).json()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        failed = []
        page.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
        page.goto(base)
        size = len(CLASSES) * PER_CLASS
        expect(page.locator("#info")).to_contain_text(f"{size} gallery images")
        page.set_input_files("#file", str(photo))
        expect(page.locator("#results .card")).to_have_count(5)
        assert page.inner_text("#query-name") == photo.name
        assert rendered(page) == [r["label"] for r in expected["results"]]
        assert rendered(page)[0] == "Leopards"
        scores = page.locator("#results .card .score").all_inner_texts()
        assert scores == [f"similarity {r['score']:.3f}" for r in expected["results"]]
        assert expected["buckets"] in page.inner_text("#chips")
        ranked = any(r["rank_score"] is not None for r in expected["results"])
        assert page.locator("#legend").is_visible() == ranked  # "ranked by" beside "similarity" is explained
        assert expected["predicted"][0]["name"] in page.inner_text("#predicted")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        page.evaluate("""async () => {  // a portrait photo in the first tile: its height must not stretch the tile
            const canvas = Object.assign(document.createElement("canvas"), { width: 100, height: 400 });
            const blob = await new Promise((done) => canvas.toBlob(done));
            const img = document.querySelector("#results .card img");
            img.loading = "eager";
            img.src = URL.createObjectURL(blob);
            await img.decode();
        }""")
        for width, height in ((1280, 900), (390, 844)):  # desktop and phone
            page.set_viewport_size({"width": width, "height": height})
            tiles = [page.locator("#results .card .img").nth(i).bounding_box() for i in range(5)]
            assert all(abs(tile["width"] - tile["height"]) <= 1 for tile in tiles), tiles  # square whatever the photo
        page.set_viewport_size({"width": 1280, "height": 900})
        assert not failed, failed  # the favicon too

        clicked = expected["results"][2]
        page.locator("#results .card").nth(2).click()
        expect(page.locator("#query-name")).to_have_text(clicked["path"])
        expect(page.locator("#status")).to_have_text("")
        again = httpx.post(f"{base}/api/query", json={"row": clicked["row"]}, timeout=60).json()
        assert rendered(page) == [r["label"] for r in again["results"]]
        first = page.locator("#results .card img").first.get_attribute("src")
        assert first == f"/api/thumbnails/{again['results'][0]['row']}"
        assert page.evaluate("(src) => fetch(src).then(r => r.headers.get('content-type'))", first) == "image/jpeg"

        assert page.locator("#predicted i").first.evaluate("(bar) => bar.style.width").endswith("%")  # under the CSP

        page.fill("#k", "3")
        page.locator("#k").dispatch_event("change")  # changing k asks the current query again
        expect(page.locator("#results .card")).to_have_count(3)
        assert rendered(page) == [r["label"] for r in again["results"][:3]]
        page.fill("#k", "100")
        page.select_option("#policy", "top1")  # one class's bucket: far fewer than 100 images
        expect(page.locator("#note")).to_contain_text("of the 100 asked for")
        assert page.locator("#results .card").count() < 100

        page.set_input_files("#file", files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"not a photo"}])
        page.wait_for_selector("#error.show")
        assert "notes.jpg: not an image" in page.inner_text("#error")
        expect(page.locator("#results .card")).to_have_count(0)  # no stale results under the error
        browser.close()
