"""The web page in headless Chromium (Debian's, driven by Playwright) against a real server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def _open(index: Path, checkpoint: Path) -> Iterator[tuple[object, Server, list[str]]]:
    server = Server(index, checkpoint)
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


@pytest.fixture
def page(served: dict[str, Path], fresh_index: Path) -> Iterator[tuple[object, Server, list[str]]]:
    """The page against the tiny model, whose score adds the structural term (weight 1)."""
    yield from _open(fresh_index, served["checkpoint"])


@pytest.fixture(scope="module")
def unweighted(
    served: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The tiny model as the default model is used: weight 0 (ranked by global similarity),
    with score bands no pair reaches as close, and its own index."""
    from index_builder import build_index, scan_folder
    from model import Embedder, load_model, save_checkpoint

    root = tmp_path_factory.mktemp("unweighted")
    model = load_model(served["checkpoint"])
    checkpoint = root / "weight0.safetensors"
    save_checkpoint(model, checkpoint, model.config.with_structural_weight(0.0, bands=(-5.0, 5.0)))
    index = root / "index"
    build_index(scan_folder(served["gallery"]), index, Embedder(load_model(checkpoint)), workers=0)
    return {"checkpoint": checkpoint, "index": index}


@pytest.fixture
def unweighted_page(
    unweighted: dict[str, Path], tmp_path: Path
) -> Iterator[tuple[object, Server, list[str]]]:
    index = tmp_path / "index"
    shutil.copytree(unweighted["index"], index)
    yield from _open(index, unweighted["checkpoint"])


def _drawn(tab: object, side: str, attribute: str = "data-contribution") -> list[float]:
    return [
        float(c.get_attribute(attribute))
        for c in tab.query_selector_all(f'#pair .cell[data-side="{side}"]')  # type: ignore[attr-defined]
    ]


def _score_table_adds_up(tab: object, explanation: dict[str, object]) -> None:
    """The score table's rows add up to the score printed above them (and to the API's)."""
    rows = [
        float(r.get_attribute("data-total") or "nan")
        for r in tab.query_selector_all("#score-table tbody tr")  # type: ignore[attr-defined]
    ]
    printed = tab.inner_text("#score-line")  # type: ignore[attr-defined]
    score = float(tab.get_attribute("#score-line", "data-score"))  # type: ignore[attr-defined]
    assert printed.startswith(f"score {score:.4f} = global ")
    assert sum(rows) == pytest.approx(score, abs=1e-9)
    assert score == pytest.approx(explanation["score"], abs=1e-9)
    shown = tab.inner_text("#score-table tfoot")  # type: ignore[attr-defined]
    assert f"{score:.4f}" in shown


def _explained(server: Server, query: Path, item_id: int) -> dict[str, Any]:
    """What /explain answers for the query upload against a gallery item."""
    answer = httpx.post(f"{server.url}/explain", files={"a": ("q.png", query.read_bytes())},
                        data={"b_id": str(item_id)}, timeout=60)  # fmt: skip
    assert answer.status_code == 200, answer.text
    explanation: dict[str, Any] = answer.json()
    return explanation


def _boxes_do_not_intersect(boxes: list[dict[str, float]]) -> None:
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            apart = (
                a["right"] <= b["left"]
                or b["right"] <= a["left"]
                or a["bottom"] <= b["top"]
                or b["bottom"] <= a["top"]
            )
            assert apart, (a, b)


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
    explanation = _explained(server, query, hit["id"])
    contributions = explanation["contributions"]
    for side in ("query", "result"):  # the heat maps are the whole score's split
        assert _drawn(tab, side) == pytest.approx(contributions["total"][side], abs=1e-9)
        assert _drawn(tab, side, "data-structural") == pytest.approx(
            contributions["structural"][side], abs=1e-9
        )
        assert _drawn(tab, side, "data-global") == pytest.approx(
            contributions["global"][side], abs=1e-9
        )
        assert sum(_drawn(tab, side)) == pytest.approx(explanation["score"], abs=1e-5)
    _score_table_adds_up(tab, explanation)
    heading = tab.inner_text("#detail-rule")
    assert "re-ranked by structural matching (weight 1)" in heading.lower()
    assert explanation["ranked_by"] in tab.inner_text("#results-note")
    assert len(tab.query_selector_all("#pair .match")) == 8
    first = explanation["matches"][0]["contribution"]
    assert tab.text_content('#pair .rank-label[data-rank="1"] text') == f"1: {first:.4f}"
    assert len(tab.query_selector_all("#matches tbody tr")) == 8

    tab.hover('#pair .cell[data-side="query"][data-region="0"]')
    tab.wait_for_selector("#pair .flows line", state="attached")
    info = tab.inner_text("#hover-info")
    assert info.startswith("query part 0 sends most flow to result part")
    best = max(range(4), key=lambda j: explanation["plan"][0][j])
    assert f"result part {best}:" in info
    assert "share of the score" in info
    assert "structural" in info
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


def test_busy_explanation_labels_never_overlap(
    page: tuple[object, Server, list[str]], served: dict[str, Path]
) -> None:
    """All 16 part pairs of the 2 x 2 grid drawn: many lines meet at each part, and the
    labels placed for them still never overlap (those with no free place are left out)."""
    tab, _, _ = page  # type: ignore[misc]
    tab.set_input_files("#file", str(sorted(served["gallery"].rglob("*.png"))[3]))
    tab.wait_for_selector("#results .result")
    tab.click("#results .result")
    tab.wait_for_selector("#detail:not([hidden]) #pair .cell")
    assert len(tab.query_selector_all("#pair .match")) == 8
    tab.fill("#lines", "16")  # the same explanation again, with all 16 part pairs
    tab.dispatch_event("#lines", "change")
    tab.wait_for_function("document.querySelectorAll('#pair .match').length === 16")
    boxes = tab.evaluate(
        "[...document.querySelectorAll('#pair .rank-label .label-box')].map((b) => {"
        " const r = b.getBoundingClientRect();"
        " return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; })"
    )
    assert 4 <= len(boxes) <= 16
    _boxes_do_not_intersect(boxes)
    # The texts lie inside their boxes, so the texts do not overlap either.
    inside = tab.evaluate(
        "[...document.querySelectorAll('#pair .rank-label')].every((g) => {"
        " const b = g.querySelector('rect').getBoundingClientRect();"
        " const t = g.querySelector('text').getBoundingClientRect();"
        " return t.left >= b.left - 0.5 && t.right <= b.right + 0.5"
        "   && t.top >= b.top - 0.5 && t.bottom <= b.bottom + 0.5; })"
    )
    assert inside
    recorded = tab.evaluate("window.__labels")  # the placements, in the SVG's coordinates
    assert len(recorded) == len(boxes)
    _boxes_do_not_intersect(
        [{"left": r["x0"], "top": r["y0"], "right": r["x1"], "bottom": r["y1"]} for r in recorded]
    )
    assert recorded[0]["rank"] == 1  # the strongest match is labelled first


def test_weight_0_says_global_ranks_and_nothing_is_close(
    unweighted_page: tuple[object, Server, list[str]], served: dict[str, Path]
) -> None:
    tab, server, _ = unweighted_page  # type: ignore[misc]
    query = sorted(served["gallery"].rglob("*.png"))[2]
    tab.wait_for_selector("#gallery .item")
    tab.set_input_files("#file", str(query))
    tab.wait_for_selector("#results .result")
    api = httpx.post(
        f"{server.url}/search",
        files={"image": ("q.png", query.read_bytes())},
        params={"k": 12, "rerank_k": 100},
        timeout=60,
    ).json()
    assert api["nothing_close"] is True
    assert api["ranked_by"] == "ranked by global similarity"
    assert tab.is_visible("#nothing-close")
    assert "Nothing in the gallery is close" in tab.inner_text("#nothing-close")
    verdicts = [v.inner_text() for v in tab.query_selector_all("#results .result .verdict")]
    assert verdicts == [h["verdict"] for h in api["results"]] == ["related"] * 12
    note = tab.inner_text("#results-note")
    assert "ranked by global similarity" in note
    assert "re-ranked" not in note

    tab.click("#results .result")
    tab.wait_for_selector("#detail:not([hidden]) #pair .cell")
    heading = tab.inner_text("#detail-rule")
    assert "Ranked by global similarity" in heading
    assert "re-ranked" not in heading.lower()
    assert "correspondence, not ranking" in heading
    assert "related" in heading  # the verdict
    hit = api["results"][0]
    explanation = _explained(server, query, hit["id"])
    assert explanation["structural_weight"] == 0
    # Weight 0: the heat maps are the global term's split alone, and still add up to the score.
    for side in ("query", "result"):
        assert _drawn(tab, side) == pytest.approx(
            explanation["contributions"]["global"][side], abs=1e-9
        )
    _score_table_adds_up(tab, explanation)


def test_without_score_bands_there_are_no_verdicts_and_no_message(
    page: tuple[object, Server, list[str]], served: dict[str, Path]
) -> None:
    """The tiny model has no score bands: no verdicts, and no "nothing is close" message."""
    tab, _, _ = page  # type: ignore[misc]
    tab.set_input_files("#file", str(sorted(served["gallery"].rglob("*.png"))[1]))
    tab.wait_for_selector("#results .result")
    assert tab.is_hidden("#nothing-close")
    assert tab.query_selector_all("#results .result .verdict") == []
