"""A gallery in a Qdrant collection (qdrant-client's local mode here: the same client code as
against a server) behaves as the folder index does: build, resume, add, remove, filters,
fingerprint checks, and the service on top of it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from index_builder import (
    FingerprintMismatchError,
    GalleryIndex,
    LabelFilter,
    QdrantLocation,
    Source,
    build_index,
    open_index,
    parse_location,
    scan_folder,
)
from index_builder.qdrant_collection import item_id
from model import fingerprint, save_checkpoint
from tests.index_builder.helpers import make_images, tiny_embedder

pytest.importorskip("qdrant_client", reason="pip install 'diml-retrieval[cluster]'")
REPO = Path(__file__).resolve().parents[2]


def test_locations_are_folders_or_qdrant_urls() -> None:
    assert parse_location("gallery.index") == Path("gallery.index")
    assert parse_location("qdrant://db.internal/birds") == QdrantLocation("birds", "db.internal")
    tls = parse_location("qdrants://db:7000/birds")
    assert tls == QdrantLocation("birds", "db", 7000, https=True)
    assert str(tls) == "qdrants://db:7000/birds"
    assert parse_location(Path("qdrant://db/birds")) == QdrantLocation("birds", "db")  # one slash
    local = parse_location("qdrant-local:/tmp/q#birds")
    assert local == QdrantLocation("birds", path=Path("/tmp/q"))
    assert parse_location("qdrant-local:/tmp/q") == QdrantLocation("gallery", path=Path("/tmp/q"))
    for bad in ("qdrant://", "qdrant://host/", "qdrant://host:port/c", "qdrant://h/a b"):
        with pytest.raises(ValueError, match="qdrant://HOST"):
            parse_location(bad)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("qdrant")
    make_images(root / "gallery", 12)
    embedder = tiny_embedder()
    checkpoint = root / "tiny.safetensors"
    save_checkpoint(embedder.model, checkpoint)
    sources = scan_folder(root / "gallery")
    folder = build_index(sources, root / "folder", embedder, workers=0)
    location = QdrantLocation("gallery", path=root / "q")
    report = build_index(sources, location, embedder, workers=0)
    return {"root": root, "location": location, "checkpoint": checkpoint, "report": report,
            "folder": folder, "fp": fingerprint(embedder.model)}  # fmt: skip


def test_a_qdrant_build_searches_as_the_folder_index(built: dict[str, object]) -> None:
    root, location = built["root"], built["location"]
    assert isinstance(root, Path)
    assert built["report"].indexed == 12  # type: ignore[attr-defined]
    folder = GalleryIndex.open(root / "folder")
    collection = open_index(location, str(built["fp"]))
    try:
        assert collection.count == 12
        keys = {i.key: i for i in folder.items(folder.ids).values()}
        mine = collection.items(collection.ids)
        assert sorted(i.key for i in mine.values()) == sorted(keys)
        for item in mine.values():  # ids come from the bytes
            assert item.id == item_id(item.sha256)
            assert item.sha256 == keys[item.key].sha256
        queries = folder.vectors(folder.ids)
        a_scores, a_ids = folder.search(queries, 5)
        b_scores, b_ids = collection.search(queries, 5)
        by_folder_id = {i.id: i.key for i in folder.items(folder.ids).values()}
        assert [[by_folder_id[i] for i in row] for row in a_ids] == [
            [mine[i].key for i in row] for row in b_ids
        ]
        np.testing.assert_allclose(a_scores, b_scores, atol=1e-5)
        ids = collection.ids[:3]
        folder_ids = [folder_id for folder_id, key in by_folder_id.items()
                      if key in {mine[i].key for i in ids}]  # fmt: skip
        grids = collection.grids(ids)
        assert grids.dtype == np.float16
        assert grids.shape == (3, 4, folder.manifest.dim)
        order = [next(f for f in folder_ids if by_folder_id[f] == mine[i].key) for i in ids]
        np.testing.assert_allclose(grids, folder.grids(np.array(order)), atol=1e-3)
        # A label filter runs inside Qdrant's search: k hits of that label.
        _, only = collection.search(queries[:2], 10, LabelFilter(("class1",)))
        assert [sorted({mine[i].label for i in row if i >= 0}) for row in only] == [["class1"]] * 2
        assert (only >= 0).sum(axis=1).tolist() == [4, 4]
        _, without = collection.search(queries[:1], 12, LabelFilter(exclude=("class1",)))
        assert (without >= 0).sum() == 8
        assert collection.verify(str(built["fp"])) == []
        # The candidates' vectors, grids and records come back with the search itself.
        _, found = collection.search(queries[:2], 6)
        retrieve = collection.client.retrieve
        collection.client.retrieve = None  # type: ignore[assignment]  # any call would fail
        try:
            flat = found.ravel()
            assert collection.grids(flat).shape == (12, 4, folder.manifest.dim)
            assert collection.vectors(flat).shape == (12, folder.manifest.dim)
            assert set(collection.items(flat)) == set(flat.tolist())
        finally:
            collection.client.retrieve = retrieve  # type: ignore[method-assign]
        assert collection.labels() == [("class0", 4), ("class1", 4), ("class2", 4)]
    finally:
        folder.close()
        collection.close()


def test_a_rerun_resumes_and_another_model_is_refused(
    built: dict[str, object], tmp_path: Path
) -> None:
    root, location = built["root"], built["location"]
    assert isinstance(root, Path)
    assert isinstance(location, QdrantLocation)
    copy = QdrantLocation("gallery", path=tmp_path / "q")
    shutil.copytree(location.path, copy.path)  # type: ignore[arg-type]
    gallery = root / "gallery"
    twin = tmp_path / "twin.png"
    shutil.copy(next(gallery.rglob("*.png")), twin)
    sources = [*scan_folder(gallery), Source(twin, "twin.png")]
    again = build_index(sources, copy, tiny_embedder(), workers=0)
    assert again.indexed == 0  # everything was there under its own key: nothing re-added
    assert [s["reason"].startswith("duplicate bytes of") for s in again.skipped] == [True]
    assert again.count == 12
    with pytest.raises(FingerprintMismatchError, match="built by model"):
        open_index(copy, "0" * 64)


@pytest.mark.slow
def test_the_cli_and_the_service_take_a_qdrant_location(
    built: dict[str, object], tmp_path: Path
) -> None:
    from service.app import create_app
    from service.settings import Settings

    location = built["location"]
    assert isinstance(location, QdrantLocation)
    assert location.path is not None
    copy = tmp_path / "q"
    shutil.copytree(location.path, copy)
    where = f"qdrant-local:{copy}"
    cli = [sys.executable, "-m", "service.cli", "index"]
    info = subprocess.run([*cli, "info", where], capture_output=True, text=True, cwd=REPO)
    assert info.returncode == 0, info.stderr
    assert "count: 12" in info.stdout
    new = make_images(tmp_path / "new", 2, seed=9)
    checkpoint = str(built["checkpoint"])
    add = [*cli, "add", where, *map(str, new), "--label", "fresh", "--checkpoint", checkpoint]
    added = subprocess.run(add, capture_output=True, text=True, cwd=REPO)
    assert added.returncode == 0, added.stderr
    assert "14 items" in added.stdout
    bad = subprocess.run([*cli, "info", "qdrant://"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert "qdrant://HOST" in bad.stderr

    settings = Settings(index=where, checkpoint=built["checkpoint"], anonymous_writes="any",
                        uploads=tmp_path / "uploads")  # fmt: skip
    with TestClient(create_app(settings, load_in_background=False)) as client:
        assert client.get("/readyz").json()["items"] == 14
        fresh = client.post("/search", files={"image": ("q.png", new[0].read_bytes())},
                            params={"label": "fresh", "k": 5})  # fmt: skip
        hits = fresh.json()["results"]
        assert [h["label"] for h in hits] == ["fresh", "fresh"]
        assert hits[0]["global_similarity"] == pytest.approx(1.0, abs=1e-3)
        page1 = client.post(f"/search/by-id/{hits[0]['id']}", params={"k": 7}).json()
        page2 = client.post(f"/search/by-id/{hits[0]['id']}", params={"k": 7, "offset": 7}).json()
        whole = client.post(f"/search/by-id/{hits[0]['id']}", params={"k": 14}).json()
        assert [h["id"] for h in page1["results"] + page2["results"]] == [
            h["id"] for h in whole["results"]
        ]
        image = make_images(tmp_path / "more", 1, seed=11)[0].read_bytes()
        response = client.post("/gallery", files={"images": ("more.png", image)})
        assert response.status_code == 201, response.text
        new_id = response.json()["added"][0]["id"]
        assert client.get(f"/gallery/{new_id}/image").content == image
        assert client.delete(f"/gallery/{new_id}").json()["count"] == 14
        assert client.get(f"/gallery/{new_id}").status_code == 404
        labels = client.get("/gallery/labels").json()
        assert {"label": "fresh", "count": 2} in labels
        assert client.get("/duplicates").status_code == 200


@pytest.mark.slow
def test_a_build_on_ray_writes_the_same_collection(
    built: dict[str, object], tmp_path: Path
) -> None:
    """Decoding on Ray tasks and embedding on a Ray actor (a local Ray here) gives the points
    the in-process build gave, whether this process writes them or a writer actor does; a
    folder --out is refused, and so are two writers on a local folder."""
    pytest.importorskip("ray", reason="pip install 'diml-retrieval[cluster]'")
    root, location = built["root"], built["location"]
    assert isinstance(root, Path)
    assert isinstance(location, QdrantLocation)
    cli = [sys.executable, "-m", "service.cli", "index", "build", "--images", str(root / "gallery"),
           "--checkpoint", str(built["checkpoint"]), "--batch-size", "5", "--quiet"]  # fmt: skip
    for writers in ("0", "1"):
        where = f"qdrant-local:{tmp_path / ('q' + writers)}"
        done = subprocess.run([*cli, "--out", where, "--ray", "--ray-writers", writers],
                              capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "indexed 12 images" in done.stdout
        ours, theirs = open_index(parse_location(where)), open_index(location)
        try:
            ids = theirs.ids
            np.testing.assert_array_equal(ours.ids, ids)
            np.testing.assert_allclose(ours.vectors(ids), theirs.vectors(ids), atol=1e-5)
            np.testing.assert_allclose(ours.grids(ids), theirs.grids(ids), atol=2e-3)
            mine, reference = ours.items(ids), theirs.items(ids)
            for i in ids.tolist():  # the same records (only the time added differs)
                a, b = mine[i], reference[i]
                assert (a.key, a.label, a.sha256, a.width) == (b.key, b.label, b.sha256, b.width)
        finally:
            ours.close()
            theirs.close()
    args = [*cli, "--out", f"qdrant-local:{tmp_path / 'q2'}", "--ray", "--ray-writers", "2"]
    two = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert two.returncode == 2
    assert "one writer at most" in two.stderr
    folder = subprocess.run([*cli, "--out", str(tmp_path / "folder"), "--ray"],
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert folder.returncode == 2
    assert "--ray writes to a Qdrant collection" in folder.stderr


def test_the_write_stage_of_a_ray_build_adds_as_a_local_build_and_settles_races(
    built: dict[str, object], tmp_path: Path
) -> None:
    """The writer actors' work, run in this process: the decode, embed and write stages over
    batches give the collection the in-process build gave, with the same skip report (a copy
    of an image, a file that is no image); a rerun adds nothing; two writers that added the
    same bytes at once are reported as one added and one duplicate of the key kept."""
    from index_builder.qdrant_build import create_collection
    from index_builder.ray_build import Write, _decode, _Embed, settle
    from model import load_model

    root, reference, checkpoint = built["root"], built["location"], built["checkpoint"]
    assert isinstance(root, Path)
    assert isinstance(reference, QdrantLocation)
    assert isinstance(checkpoint, Path)
    sources = scan_folder(root / "gallery")
    first = sources[0]
    shutil.copy(first.path, tmp_path / "copy.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    sources += [Source(tmp_path / "copy.png", "copy", "x"), Source(tmp_path / "bad.png", "bad")]
    model = load_model(checkpoint)
    embed = _Embed(str(checkpoint), "cpu", "torch")
    location = QdrantLocation("gallery", path=tmp_path / "q")
    create_collection(location, model).close()

    def write_all() -> list[tuple[int, str, str]]:
        writer, rows = Write(location, fingerprint(model)), []
        try:
            for start in range(0, len(sources), 5):
                chunk = list(enumerate(sources))[start : start + 5]
                batch = {
                    "index": np.array([i for i, _ in chunk]),
                    "path": np.array([str(s.path) for _, s in chunk], dtype=object),
                    "key": np.array([s.key for _, s in chunk], dtype=object),
                    "label": np.array([s.label or "" for _, s in chunk], dtype=object),
                }
                out = writer(embed(_decode(batch, model.config.preprocessing, 10**7)))
                rows += zip(out["index"].tolist(), out["sha256"], out["outcome"], strict=True)
        finally:
            writer.index.close()
        return rows

    rows = write_all()
    ours, theirs = open_index(location), open_index(reference)
    try:
        report = settle(sources, rows, ours)
        assert report.indexed == report.count == 12
        assert report.skipped == [
            {"path": str(tmp_path / "bad.png"), "reason": report.skipped[0]["reason"]},
            {"path": str(tmp_path / "copy.png"), "reason": f"duplicate bytes of {first.key}"},
        ]
        assert "not a readable image" in report.skipped[0]["reason"]
        ids = theirs.ids
        np.testing.assert_array_equal(ours.ids, ids)
        np.testing.assert_allclose(ours.vectors(ids), theirs.vectors(ids), atol=1e-5)
        mine, reference_items = ours.items(ids), theirs.items(ids)
        assert {i: (m.key, m.label) for i, m in mine.items()} == {
            i: (r.key, r.label) for i, r in reference_items.items()
        }
        # Two writers both added the original and its copy: the collection kept the original.
        sha = hashlib.sha256(first.path.read_bytes()).hexdigest()
        race = settle(sources, [(0, sha, "added"), (len(sources) - 2, sha, "added")], ours)
        assert race.indexed == 1
        assert race.skipped == [
            {"path": str(tmp_path / "copy.png"), "reason": f"duplicate bytes of {first.key}"}
        ]
    finally:
        ours.close()
        theirs.close()
    again = write_all()  # a rerun: everything there already under its own key
    assert sorted(o for _, _, o in again if o in ("added", "kept")) == ["kept"] * 12
