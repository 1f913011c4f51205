"""Screenshot the serve page with real results: chromium (via Playwright) opens a running `serve`, uploads a
photo, waits for the grid and its thumbnails, and saves the page as a PNG (docs/serve.png is made this way)."""
from __future__ import annotations

import argparse
import shutil

from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000/", help="a running `cli.py serve`")
    parser.add_argument("--photo", required=True, help="the query photo to upload")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("-k", type=int, default=5, help="results to show")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium", help="browser executable")
    args = parser.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": args.height}, device_scale_factor=1)
        page.goto(args.url)
        page.wait_for_function("document.querySelector('#info').textContent.includes('gallery images')")
        page.fill("#k", str(args.k))
        page.set_input_files("#file", args.photo)
        page.wait_for_function(f"document.querySelectorAll('#results .card').length === {args.k}")
        page.wait_for_function("[...document.images].every(image => image.complete && image.naturalWidth > 0)")
        page.evaluate("document.activeElement.blur()")  # no focus ring in the picture
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
