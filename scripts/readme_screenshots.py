"""Screenshots of the web page for the README, from freely licensed sample photos only.

    .venv/bin/pip install scikit-image && .venv/bin/python scripts/readme_screenshots.py

Gallery: scikit-image's sample photos chelsea, coffee (CC0), astronaut, rocket and
hubble_deep_field (NASA, public domain), each with three views (a crop, a mirror image, a
rescale). Query: a different crop of chelsea. Uses the default model and Debian's Chromium.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field")


def gallery(folder: Path) -> Path:
    from skimage import data

    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = image.size
        (folder / name).mkdir(parents=True)
        image.crop((w // 10, h // 10, w, h)).save(folder / name / "crop.jpg", quality=90)
        ImageOps.mirror(image).save(folder / name / "mirror.jpg", quality=90)
        image.resize((w * 2 // 3, h * 2 // 3)).save(folder / name / "small.jpg", quality=90)
    chelsea = Image.fromarray(data.chelsea())
    query = folder.parent / "query.jpg"
    chelsea.crop((0, 0, chelsea.width * 3 // 4, chelsea.height)).save(query, quality=90)
    return query


def main() -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("needs Debian's chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        query = gallery(Path(tmp) / "photos")
        index = Path(tmp) / "index"
        diml = [sys.executable, "-m", "service.cli"]
        subprocess.run(
            [
                *diml,
                "index",
                "build",
                "--images",
                str(Path(tmp) / "photos"),
                "--out",
                str(index),
                "--quiet",
            ],
            check=True,
            cwd=REPO,
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen(
            [*diml, "serve", "--index", str(index), "--port", str(port)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(120):
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                tab = browser.new_page(viewport={"width": 1100, "height": 800})
                tab.goto(url)
                tab.wait_for_selector("#gallery .item")
                tab.fill("#k", "6")
                tab.set_input_files("#file", str(query))
                # The first search loads the model: on a small CPU it takes longer than
                # Playwright's default 30 s.
                tab.wait_for_selector("#results .result img[src]", timeout=180_000)
                tab.wait_for_timeout(500)
                tab.locator("#results-section").screenshot(path=str(DOCS / "page-results.png"))
                tab.query_selector_all("#results .result")[1].click()
                tab.wait_for_selector("#detail:not([hidden]) #pair .cell", timeout=120_000)
                tab.hover('#pair .cell[data-side="query"][data-region="5"]')
                tab.wait_for_timeout(500)
                tab.locator("#detail").screenshot(path=str(DOCS / "page-explanation.png"))
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {DOCS / 'page-results.png'} and {DOCS / 'page-explanation.png'}")


if __name__ == "__main__":
    main()
