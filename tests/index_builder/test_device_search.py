"""The torch exact-search path (the GPU's coarse search) against FAISS, and kept in step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from index_builder import GalleryIndex, add_images, scan_folder, writing
from index_builder.device_search import DeviceSearch
from model import fingerprint
from tests.index_builder.helpers import build_tiny, make_images, tiny_embedder


def queries(index: GalleryIndex, n: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(n, index.manifest.dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_same_ids_as_faiss_and_padding(tmp_path: Path) -> None:
    make_images(tmp_path / "g", 12)
    build_tiny(tmp_path / "g", tmp_path / "index")
    index = GalleryIndex.open(tmp_path / "index")
    search = DeviceSearch(index, "cpu")
    q = queries(index)
    faiss_scores, faiss_ids = index.search(q, 5)
    scores, ids = search.search(q, 5)
    np.testing.assert_array_equal(ids, faiss_ids)
    np.testing.assert_allclose(scores, faiss_scores, rtol=1e-5, atol=1e-6)
    scores, ids = search.search(q, 20)  # more than the 12 items
    assert (ids[:, 12:] == -1).all()
    assert np.isneginf(scores[:, 12:]).all()
    assert sorted(ids[0, :12].tolist()) == sorted(index.ids.tolist())


def test_kept_in_step_with_adds_and_removals(tmp_path: Path) -> None:
    make_images(tmp_path / "g", 8)
    build_tiny(tmp_path / "g", tmp_path / "index")
    embedder = tiny_embedder()
    new = make_images(tmp_path / "new", 3, seed=9)
    with writing(tmp_path / "index", fingerprint(embedder.model)) as index:
        search = DeviceSearch(index, "cpu")
        report = add_images(index, [s for s in scan_folder(tmp_path / "new")], embedder)
        search.add(report.ids)
        index.remove([0, 3])
        search.remove([0, 3])
        q = queries(index)
        _, expected = index.search(q, 9)
        _, ids = search.search(q, 9)
        np.testing.assert_array_equal(ids, expected)
        assert search.count == index.count == 8 + len(new) - 2
        fresh = DeviceSearch(index, "cpu")  # a reload agrees with the incremental updates
        assert torch.equal(fresh.ids, search.ids)


def test_grids_kept_on_the_device_are_the_index_grids_through_adds_and_removals(
    tmp_path: Path,
) -> None:
    make_images(tmp_path / "g", 8)
    build_tiny(tmp_path / "g", tmp_path / "index")
    embedder = tiny_embedder()
    make_images(tmp_path / "new", 3, seed=9)
    with writing(tmp_path / "index", fingerprint(embedder.model)) as index:
        assert DeviceSearch(index, "cpu").grids(index.ids) is None  # not kept unless asked
        search = DeviceSearch(index, "cpu", grids=True)
        assert search.part_grids is not None
        assert search.part_grids.dtype == torch.float16
        assert DeviceSearch.grid_bytes(index) == search.part_grids.numel() * 2
        report = add_images(index, list(scan_folder(tmp_path / "new")), embedder)
        search.add(report.ids)
        index.remove([0, 3])
        search.remove([0, 3])
        live = np.asarray(index.ids)
        wanted = np.r_[live[::-1], live[[2, 2, 5]]]  # any order, repeats (padding) included
        kept = search.grids(wanted)
        assert kept is not None
        np.testing.assert_array_equal(kept.numpy(), index.grids(wanted))
        assert search.grids(np.array([0])) is None  # removed: the caller reads the index
        assert search.grids(np.array([live[0], 10_000])) is None


@pytest.mark.gpu
def test_cuda_half_precision_matches(tmp_path: Path) -> None:
    make_images(tmp_path / "g", 12)
    build_tiny(tmp_path / "g", tmp_path / "index")
    index = GalleryIndex.open(tmp_path / "index")
    search = DeviceSearch(index, "cuda", grids=True)
    assert search.vectors.dtype == torch.float16
    scores, ids = search.search(queries(index), 12)
    faiss_scores, _ = index.search(queries(index), 12)
    np.testing.assert_allclose(scores, faiss_scores, atol=2e-3)
    kept = search.grids(ids[0])
    assert kept is not None
    assert kept.is_cuda
    np.testing.assert_array_equal(kept.cpu().numpy(), index.grids(ids[0]))


def test_grids_are_found_by_id_whatever_order_the_ids_come_in() -> None:
    """A Qdrant collection's ids are content hashes, in no order: the lookup must not assume
    the ascending ids of a folder index."""
    from types import SimpleNamespace

    rng = np.random.default_rng(1)
    ids = rng.choice(2**40, size=50, replace=False).astype(np.int64)
    grids = rng.normal(size=(50, 4, 8)).astype(np.float16)
    row = {int(i): r for r, i in enumerate(ids)}
    fake = SimpleNamespace(
        ids=ids, count=50, manifest=SimpleNamespace(grid=2, dim=8),
        vectors=lambda chosen: np.ones((len(chosen), 8), np.float32),
        grids=lambda chosen: grids[[row[int(i)] for i in chosen]],
    )  # fmt: skip
    search = DeviceSearch(fake, "cpu", grids=True)  # type: ignore[arg-type]
    wanted = ids[rng.permutation(50)[:20]]
    kept = search.grids(wanted)
    assert kept is not None
    np.testing.assert_array_equal(kept.numpy(), grids[[row[int(i)] for i in wanted]])
