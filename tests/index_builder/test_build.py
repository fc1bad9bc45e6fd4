from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index_builder import (
    FingerprintMismatchError,
    GalleryIndex,
    IndexBusyError,
    IndexFormatError,
    Source,
    SourceListError,
    add_images,
    build_index,
    read_list,
    scan_folder,
    writing,
)
from index_builder.files import writer_lock
from index_builder.versions import has_index
from model import fingerprint
from model.quantization import LEVELS, unpack
from tests.index_builder.helpers import build_tiny, make_images, tiny_embedder


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    folder = tmp_path / "gallery"
    make_images(folder, 12)
    (folder / "class0" / "notes.txt").write_text("not an image")
    png = (folder / "class1" / "img0_0001.png").read_bytes()
    (folder / "class1" / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "class2" / "copy.png").write_bytes(png)  # the same bytes as img0_0001.png
    (folder / "class2" / "empty.png").write_bytes(b"")
    (folder / ".hidden.png").write_bytes(png)
    return folder


def test_round_trip_every_item_finds_itself_first(gallery: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    report = build_tiny(gallery, out)
    assert report.indexed == 12
    assert report.count == 12
    reasons = {Path(s["path"]).name: s["reason"] for s in report.skipped}
    assert reasons["notes.txt"].startswith("not a readable image")
    assert reasons["truncated.png"].startswith("corrupt or truncated")
    assert reasons["empty.png"].startswith("not a readable image")
    assert reasons["copy.png"] == "duplicate bytes of class1/img0_0001.png"
    assert ".hidden.png" not in reasons

    index = GalleryIndex.open(out, expected_fingerprint=fingerprint(tiny_embedder().model))
    assert index.count == 12
    assert index.verify() == []
    # Re-embed every image from its file: its own item comes first.
    items = index.items(index.ids)
    paths = [Path(items[int(i)].path or "") for i in index.ids]
    embedding, _ = tiny_embedder().embed([Image.open(p).convert("RGB") for p in paths])
    scores, ids = index.search(embedding.vector.numpy(), k=3)
    assert ids[:, 0].tolist() == index.ids.tolist()
    assert np.all(scores[:, 0] > 0.999)
    grids = index.grids(index.ids[::-1])
    assert grids.dtype == np.float16
    assert grids.shape == (12, 4, 16)
    # Stored in int8, within half a step of its part's scale; float16 on the way in and out
    # adds up to 1e-3 (half a float16 ulp at |x| < 1, twice).
    parts = embedding.parts.numpy()
    step = np.abs(parts).max(axis=-1, keepdims=True) / LEVELS
    assert (np.abs(grids[::-1] - parts) <= step / 2 + 1e-3).all()
    item = items[int(index.ids[0])]
    assert item.key == "class0/img0_0000.png"
    assert item.label == "class0"
    assert item.sha256 == hashlib.sha256(Path(item.path or "").read_bytes()).hexdigest()
    assert (item.width, item.height) == Image.open(item.path or "").size
    info = index.info()
    assert info["count"] == 12
    assert info["bytes_per_item"] > 4 * 16 * 2
    index.close()


def test_grids_are_stored_in_int8_and_older_float16_segments_still_read(
    gallery: Path, tmp_path: Path
) -> None:
    build_tiny(gallery, tmp_path / "index", segment_size=5)
    index = GalleryIndex.open(tmp_path / "index")
    ids = np.arange(12, dtype=np.int64)
    assert index.store.arrays(0)[1].dtype.names == ("codes", "scales")
    before = index.grids(ids)
    regions, dim = before.shape[1:]
    path = index.store.paths(0)[1]  # 5 items: R x D codes and R float32 scales each, + header
    assert np.load(path, mmap_mode="r").dtype.itemsize == regions * (dim + 4)
    assert path.stat().st_size <= 5 * regions * (dim + 4) + 256
    # An index written before int8 storage: segment 0 as (n, R, D) float16.
    old = unpack(np.load(path))
    index.close()
    np.save(path, old)
    index = GalleryIndex.open(tmp_path / "index")
    np.testing.assert_array_equal(index.grids(ids), before)
    assert index.info()["grid_storage"] == "float16 x1, int8 x2"  # what a rebuild would shrink
    index.close()
    with writing(tmp_path / "index", fingerprint(tiny_embedder().model)) as writer:
        extra = make_images(tmp_path / "more", 2, seed=7)
        add_images(writer, [Source(p, p.name) for p in extra], tiny_embedder())
        assert writer.count == 14
        assert writer.grids(ids).dtype == np.float16
        np.testing.assert_array_equal(writer.grids(ids), before)


def test_the_grid_store_is_memory_mapped_and_gathers_only_candidates(
    gallery: Path, tmp_path: Path
) -> None:
    build_tiny(gallery, tmp_path / "index", segment_size=5)
    index = GalleryIndex.open(tmp_path / "index")
    assert len(index.table.segments()) == 3
    assert isinstance(index.store.arrays(0)[1], np.memmap)
    chosen = np.array([11, 0, 6], dtype=np.int64)
    segments, rows = index.locate(chosen)
    assert segments.tolist() == [2, 0, 1]
    expected = np.stack(
        [index.store.arrays(int(s))[1][r] for s, r in zip(segments, rows, strict=True)]
    )
    np.testing.assert_array_equal(index.grids(chosen), unpack(expected))
    with pytest.raises(KeyError, match="no live item with id 99"):
        index.grids(np.array([99]))
    index.close()


def test_parallel_decoding_gives_the_same_index(gallery: Path, tmp_path: Path) -> None:
    serial = build_tiny(gallery, tmp_path / "serial")
    parallel = build_index(scan_folder(gallery), tmp_path / "parallel", tiny_embedder(), workers=2)
    assert parallel.count == serial.count
    a, b = GalleryIndex.open(tmp_path / "serial"), GalleryIndex.open(tmp_path / "parallel")
    np.testing.assert_array_equal(a.vectors(a.ids), b.vectors(b.ids))


def test_too_large_files_are_skipped(gallery: Path, tmp_path: Path) -> None:
    report = build_tiny(gallery, tmp_path / "index", max_bytes=60)  # the PNGs are larger
    assert report.indexed == 0
    reasons = {Path(s["path"]).name: s["reason"] for s in report.skipped}
    assert reasons["img0_0000.png"].startswith("too large")
    assert "(limit 60)" in reasons["img0_0000.png"]


def test_rebuild_replaces_the_live_version_atomically(gallery: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    build_tiny(gallery, out)
    first = (out / "CURRENT").read_text()
    make_images(gallery, 3, seed=7)
    report = build_tiny(gallery, out)
    assert report.count == 15
    assert (out / "CURRENT").read_text() != first
    assert [p.name for p in out.glob("v-*")] == [(out / "CURRENT").read_text().strip()]


def test_add_then_remove_is_visible_at_once_and_after_reopening(
    gallery: Path, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    build_tiny(gallery, out)
    new = make_images(tmp_path / "new", 2, seed=5)
    embedder = tiny_embedder()
    with writing(out, fingerprint(embedder.model)) as index:
        sources = [Source(p, p.name, "new") for p in [*new, new[0]]]
        report = add_images(index, sources, embedder)
        assert report.indexed == 2
        assert report.skipped == [
            {"path": str(new[0]), "reason": f"duplicate bytes of {new[0].name}"}
        ]
        assert report.ids == [12, 13]
        vectors = index.vectors(np.array(report.ids))
        assert index.search(vectors, 1)[1][:, 0].tolist() == [12, 13]
        assert index.remove([12, 3, 99]) == [3, 12]
        _, found = index.search(vectors, 5)
        assert 12 not in found
        assert 3 not in found
    reopened = GalleryIndex.open(out)
    assert reopened.count == 12
    _, found = reopened.search(vectors, 14)
    assert {3, 12}.isdisjoint(found.ravel().tolist())
    assert 13 in found[1]
    assert reopened.verify() == []
    assert reopened.manifest.count == 12


def test_many_adds_write_a_new_snapshot(
    gallery: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import index_builder.gallery as gallery_module

    monkeypatch.setattr(gallery_module, "SNAPSHOT_BACKLOG", 1)
    out = tmp_path / "index"
    build_tiny(gallery, out)
    embedder = tiny_embedder()
    with writing(out, fingerprint(embedder.model)) as index:
        new = make_images(tmp_path / "new", 4, seed=9)
        add_images(index, [Source(p, p.name) for p in new], embedder)
    reopened = GalleryIndex.open(out)
    assert reopened.backlog() == 0
    assert reopened.count == 16
    assert reopened.verify() == []


def test_a_different_model_is_refused_naming_both(gallery: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    build_tiny(gallery, out)
    other = tiny_embedder(dim=8)
    theirs, ours = fingerprint(other.model), fingerprint(tiny_embedder().model)
    with pytest.raises(FingerprintMismatchError) as e:
        GalleryIndex.open(out, expected_fingerprint=theirs)
    assert ours[:16] in str(e.value)
    assert theirs[:16] in str(e.value)
    with writing(out) as index, pytest.raises(FingerprintMismatchError):
        add_images(index, [Source(gallery / "class0" / "img0_0000.png", "x")], other)


def test_one_writer_at_a_time(gallery: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    build_tiny(gallery, out)
    with writer_lock(out), pytest.raises(IndexBusyError, match="another process"):
        build_tiny(gallery, out)


def test_not_an_index(tmp_path: Path) -> None:
    with pytest.raises(IndexFormatError, match="no such index folder"):
        GalleryIndex.open(tmp_path / "absent")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(IndexFormatError, match="not an index"):
        GalleryIndex.open(tmp_path / "empty")


def test_verify_finds_an_altered_segment(gallery: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    build_tiny(gallery, out)
    index = GalleryIndex.open(out)
    grids = index.store.paths(0)[1]
    data = bytearray(grids.read_bytes())
    data[-1] ^= 0xFF
    grids.write_bytes(bytes(data))
    assert any("checksum mismatch" in p for p in GalleryIndex.open(out).verify())


def test_sources_get_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_images(tmp_path / "pics", 2)
    (tmp_path / "list.csv").write_text("path\npics/class0/img0_0000.png\n")
    monkeypatch.chdir(tmp_path)
    assert all(s.path.is_absolute() for s in scan_folder(Path("pics")))
    assert read_list(Path("list.csv"))[0].path == tmp_path / "pics/class0/img0_0000.png"


def test_read_list(tmp_path: Path) -> None:
    make_images(tmp_path / "pics", 2)
    listing = tmp_path / "list.csv"
    listing.write_text(
        "path,key,label\npics/class0/img0_0000.png,first,bird\npics/class1/img0_0001.png,,\n"
    )
    sources = read_list(listing)
    assert sources[0] == Source(tmp_path / "pics/class0/img0_0000.png", "first", "bird")
    assert sources[1].key == "pics/class1/img0_0001.png"
    assert sources[1].label is None
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,x\n")
    with pytest.raises(SourceListError, match=r"bad\.csv: the first line must be a CSV header"):
        read_list(bad)
    bad.write_text("path\na.png\n\n ,\n")
    with pytest.raises(SourceListError, match=r"bad\.csv:4: empty path"):
        read_list(bad)
    with pytest.raises(SourceListError, match="cannot read"):
        read_list(tmp_path / "absent.csv")


def test_report_json(gallery: Path, tmp_path: Path) -> None:
    report = build_tiny(gallery, tmp_path / "index")
    data = json.loads(json.dumps(report.to_dict()))
    assert set(data) == {"indexed", "skipped", "seconds", "images_per_second", "count"}
    assert data["images_per_second"] > 0


def test_has_index_only_once_published(tmp_path: Path) -> None:
    out = tmp_path / "index"
    assert not has_index(out)  # no folder
    out.mkdir()
    (out / ".building").mkdir()  # a build in progress is not an index yet
    assert not has_index(out)
    make_images(tmp_path / "gallery", 4)
    build_tiny(tmp_path / "gallery", out)
    assert has_index(out)
