"""The web page in headless Chromium (Debian's, driven by Playwright) against a real server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_server import Server

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def page(served: dict[str, Path], fresh_index: Path) -> Iterator[tuple[object, Server, list[str]]]:
    server = Server(fresh_index, served["checkpoint"])
    server.wait_ready()
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.on("request", lambda r: requests.append(r.url))
        tab.goto(server.url)
        try:
            yield tab, server, requests
        finally:
            browser.close()
            server.stop()


def test_search_explain_hover_and_errors(
    page: tuple[object, Server, list[str]],
    served: dict[str, Path],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    tab, server, requests = page  # type: ignore[misc]
    try:  # a real photograph where the CUB subset is present, else a gallery picture
        query = request.getfixturevalue("cub_images")[0]
    except pytest.skip.Exception:
        query = sorted(served["gallery"].rglob("*.png"))[5]
    tab.wait_for_selector("#gallery .item")
    assert "(12 images)" in tab.inner_text("#gallery-count")

    tab.set_input_files("#file", str(query))
    tab.wait_for_function("document.querySelectorAll('#results .result').length === 12")
    api = httpx.post(
        f"{server.url}/search",
        files={"image": ("q.png", query.read_bytes())},
        params={"k": 12, "rerank_k": 100, "matches": 8},
        timeout=60,
    ).json()
    cards = tab.query_selector_all("#results .result")
    for card, hit in zip(cards, api["results"], strict=True):
        assert card.get_attribute("data-id") == str(hit["id"])
        assert card.query_selector(".score").inner_text() == f"{hit['score']:.3f}"
    assert f"global rank {api['results'][1]['global_rank']}" in cards[1].inner_text()
    tab.screenshot(path=str(tmp_path / "results.png"))

    cards[1].click()
    tab.wait_for_selector("#detail:not([hidden]) #pair .cell")
    hit = api["results"][1]
    explanation = httpx.post(
        f"{server.url}/explain",
        files={"a": ("q.png", query.read_bytes())},
        data={"b_id": str(hit["id"])},
        timeout=60,
    ).json()
    for side in ("query", "result"):
        drawn = [
            float(c.get_attribute("data-contribution"))
            for c in tab.query_selector_all(f'#pair .cell[data-side="{side}"]')
        ]
        assert drawn == pytest.approx(explanation["contributions"][side], abs=1e-9)
    bars = [float(b.get_attribute("data-value")) for b in tab.query_selector_all("#bars .bar")]
    assert sum(bars) == pytest.approx(explanation["score"], abs=1e-6)
    assert len(tab.query_selector_all("#pair .match")) == 8
    first = explanation["matches"][0]["contribution"]
    assert tab.text_content("#pair .rank-label") == f"1: {first:.4f}"
    assert len(tab.query_selector_all("#matches tbody tr")) == 8

    tab.hover('#pair .cell[data-side="query"][data-region="0"]')
    tab.wait_for_selector("#pair .flows line", state="attached")
    info = tab.inner_text("#hover-info")
    assert info.startswith("query part 0 sends most flow to result part")
    best = max(range(4), key=lambda j: explanation["plan"][0][j])
    assert f"result part {best}:" in info
    tab.mouse.move(0, 0)  # the pointer leaves, so the focus alone decides what is shown
    tab.focus('#pair .cell[data-side="result"][data-region="3"]')  # keyboard reaches parts too
    assert tab.inner_text("#hover-info").startswith("result part 3 sends most flow")
    tab.screenshot(path=str(tmp_path / "explanation.png"), full_page=True)

    tab.click("#more-like-this")
    tab.wait_for_function(
        f"document.querySelector('#results .result')?.dataset.id === '{hit['id']}'"
    )

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    tab.set_input_files("#file", str(notes))
    tab.wait_for_selector("#status.error")
    assert "not a readable image" in tab.inner_text("#status")
    assert "415" in tab.inner_text("#status")

    outside = [u for u in requests if not u.startswith((server.url, "blob:", "data:"))]
    assert outside == []


def test_add_images_and_browse_pages(
    page: tuple[object, Server, list[str]], tmp_path: Path
) -> None:
    from tests.index_builder.helpers import make_images

    tab, _, _ = page  # type: ignore[misc]
    tab.wait_for_selector("#gallery .item")
    new = make_images(tmp_path / "new", 2, seed=31)
    tab.set_input_files("#add-files", [str(p) for p in new])
    tab.fill("#add-label", "fresh")
    tab.click("#add-form button[type=submit]")
    tab.wait_for_function("document.querySelector('#status').textContent.startsWith('Added 2')")
    tab.wait_for_function("document.querySelector('#gallery-count').textContent === '(14 images)'")


def test_phone_sized_window_has_no_sideways_scrolling(
    page: tuple[object, Server, list[str]], served: dict[str, Path]
) -> None:
    tab, _, _ = page  # type: ignore[misc]
    tab.set_viewport_size({"width": 390, "height": 844})
    tab.set_input_files("#file", str(sorted(served["gallery"].rglob("*.png"))[0]))
    tab.wait_for_selector("#results .result")
    tab.click("#results .result")
    tab.wait_for_selector("#detail:not([hidden]) #pair .cell")
    assert tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


def test_filters_threshold_more_results_examples_and_duplicates(
    page: tuple[object, Server, list[str]], served: dict[str, Path], tmp_path: Path
) -> None:
    import io

    from PIL import Image

    tab, server, _ = page  # type: ignore[misc]
    tab.wait_for_selector("#gallery .item")
    tab.wait_for_function("document.querySelectorAll('#label-list option').length === 3")
    query = sorted(served["gallery"].rglob("*.png"))[4]

    def api(path: str, **params: object) -> list[dict[str, object]]:
        files = {"image": ("q.png", query.read_bytes())} if path == "/search" else None
        answer = httpx.post(f"{server.url}{path}", files=files, params=params, timeout=60)
        assert answer.status_code == 200, answer.text
        results: list[dict[str, object]] = answer.json()["results"]
        return results

    def shown() -> list[str]:
        return [
            c.get_attribute("data-id") or "" for c in tab.query_selector_all("#results .result")
        ]

    tab.fill("#labels", "class1")
    tab.fill("#k", "4")
    tab.set_input_files("#file", str(query))
    tab.wait_for_function("document.querySelectorAll('#results .result').length === 4")
    assert all(c.inner_text().count("class1") for c in tab.query_selector_all("#results .label"))
    assert tab.is_hidden("#more-results")  # class1 holds 4 items: the ranking ends here

    tab.fill("#labels", "")
    tab.click("#search-button")
    tab.wait_for_function("document.querySelector('#status').textContent.startsWith('4 results')")
    tab.click("#more-results")  # the next page of the same ranking
    tab.wait_for_function("document.querySelectorAll('#results .result').length === 8")
    whole = api("/search", k=8, rerank_k=100)
    assert shown() == [str(h["id"]) for h in whole]

    scores = sorted(float(h["score"]) for h in whole)  # type: ignore[arg-type]
    threshold = round((scores[3] + scores[4]) / 2, 4)
    tab.fill("#k", "8")
    tab.fill("#min-score", str(threshold))
    tab.click("#search-button")
    tab.wait_for_function("document.querySelector('#status').textContent.includes('at least')")
    assert shown() == [str(h["id"]) for h in whole if float(h["score"]) >= threshold]  # type: ignore[arg-type]
    tab.fill("#min-score", "")

    tab.click("#search-button")
    tab.wait_for_function("document.querySelector('#status').textContent.startsWith('8 results')")
    assert tab.is_hidden("#examples-bar")  # nothing marked yet
    cards = tab.query_selector_all("#results .result")
    liked, disliked = cards[1].get_attribute("data-id"), cards[2].get_attribute("data-id")
    cards[1].query_selector("button.like").click()
    cards[2].query_selector("button.unlike").click()
    assert "1 more like this, 1 less like this" in tab.inner_text("#examples-note")
    tab.click("#examples-search")
    tab.wait_for_function(
        "document.querySelector('#results-note').textContent.includes('examples')"
    )
    files = {"positive": ("q.png", query.read_bytes())}
    params = {"k": 8, "rerank_k": 100, "positive_id": liked, "negative_id": disliked}
    expected = httpx.post(f"{server.url}/search/examples", files=files, params=params, timeout=60)
    assert shown() == [str(h["id"]) for h in expected.json()["results"]]
    assert liked not in shown()
    assert disliked not in shown()

    copy = io.BytesIO()
    Image.open(query).convert("RGB").save(copy, "JPEG", quality=95)  # a re-encoded copy
    added = httpx.post(f"{server.url}/gallery", files={"images": ("copy.jpg", copy.getvalue())})
    assert added.status_code == 201, added.text
    tab.click("#find-duplicates")
    tab.wait_for_selector("#duplicates .dup-group")
    groups = [g.inner_text() for g in tab.query_selector_all("#duplicates .dup-group")]
    original = query.relative_to(served["gallery"]).as_posix()
    assert any("copy.jpg" in g and original in g for g in groups)  # one group holds both
