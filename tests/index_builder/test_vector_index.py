from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from index_builder.vector_index import VectorIndex, default_factory


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def _filled(factory: str, x: np.ndarray, ids: np.ndarray) -> VectorIndex:
    index = VectorIndex.create(factory, x.shape[1])
    if index.needs_training:
        index.train(x)
    index.add(ids, x)
    return index


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16", "IVF16,PQ4"])
def test_removal_works_for_every_factory(factory: str, tmp_path: Path) -> None:
    x = _unit(2000, 16)
    ids = np.arange(2000, dtype=np.int64) * 7 + 3  # ids are not positions
    index = _filled(factory, x, ids)
    _, found = index.search(x[:10], 1, nprobe=16)
    assert (found[:, 0] == ids[:10]).mean() >= (0.8 if "PQ" in factory else 1.0)
    gone = ids[:5]
    index.remove(gone)
    _, found = index.search(x[:10], 20, nprobe=16)
    assert not np.isin(found, gone).any()
    assert index.ntotal - len(index.filtered) == 1995
    # Survives a write and read when the index deletes natively; filters are re-applied on open.
    index.write(tmp_path / "index.faiss")
    back = VectorIndex.read(tmp_path / "index.faiss", factory)
    back.remove(gone)
    assert not np.isin(back.search(x[:10], 20, nprobe=16)[1], gone).any()


def test_search_results_match_exact_inner_product() -> None:
    x, q = _unit(500, 8), _unit(5, 8, seed=1)
    index = _filled("Flat", x, np.arange(500, dtype=np.int64))
    scores, found = index.search(q, 10)
    exact = q @ x.T
    np.testing.assert_array_equal(found, np.argsort(-exact, axis=1)[:, :10])
    np.testing.assert_allclose(scores, np.sort(exact, axis=1)[:, ::-1][:, :10], rtol=1e-5)


def test_ivf_recall_at_100_against_exact_search() -> None:
    # Clustered data, like real embeddings; IVF256 probing 32 lists.
    rng = np.random.default_rng(0)
    centres = _unit(200, 32, seed=2)
    x = centres[rng.integers(0, 200, 30_000)] + 0.3 * _unit(30_000, 32, seed=3)
    faiss.normalize_L2(x)
    ids = np.arange(30_000, dtype=np.int64)
    queries = x[rng.choice(30_000, 50, replace=False)]
    exact = _filled("Flat", x, ids).search(queries, 100)[1]
    ivf = _filled("IVF256,Flat", x, ids).search(queries, 100, nprobe=32)[1]
    recall = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(exact, ivf, strict=True)])
    assert recall >= 0.95


def test_fewer_items_than_k_pad_with_minus_one_never_crash() -> None:
    index = _filled("Flat", _unit(3, 8), np.arange(3, dtype=np.int64))
    _, found = index.search(_unit(1, 8), 10)
    assert found.shape == (1, 3)
    empty = VectorIndex.create("Flat", 8)
    assert empty.search(_unit(1, 8), 5)[1].tolist() == [[-1]]


def test_default_factory_and_bad_factories() -> None:
    assert default_factory(99_999) == "Flat"
    assert default_factory(100_000) == "IVF1024,Flat"
    assert default_factory(1_000_000) == "IVF4096,Flat"
    # Wider vectors cost more to scan: the head-less 1,280-d model turns approximate at 10k,
    # with no more lists than k-means can train (39 items each).
    assert default_factory(9_999, 1280) == "Flat"
    assert default_factory(10_000, 1280) == "IVF256,Flat"
    assert default_factory(20_000, 1280) == "IVF512,Flat"
    assert default_factory(200_000_000).startswith("IVF65536")
    with pytest.raises(ValueError, match="not a FAISS factory string"):
        VectorIndex.create("Bogus42", 8)


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat", "HNSW16"])
def test_allow_and_deny_select_inside_the_search(factory: str) -> None:
    """A rare allowed set still fills k: an approximate index whose usual breadth finds too
    few of them searches again everywhere. Denied and removed ids never come back."""
    x = _unit(4000, 16, seed=1)
    ids = np.arange(4000, dtype=np.int64) * 3
    index = _filled(factory, x, ids)
    index.remove(ids[:10])
    rare = ids[::400]  # 10 ids scattered over the lists; the first is removed
    _, found = index.search(x[:3], 20, nprobe=1, ef_search=16, allow=rare)
    assert [set(row[row >= 0]) for row in found] == [set(rare[1:].tolist())] * 3
    deny = ids[10:2000]
    _scores, found = index.search(x[2000:2005], 5, nprobe=64, allow=None, deny=deny)
    assert not np.isin(found, np.r_[deny, ids[:10]]).any()
    assert (found[:, 0] == ids[2000:2005]).all()  # each query's own vector
    _, nothing = index.search(x[:2], 5, allow=np.array([], dtype=np.int64))
    assert (nothing == -1).all()
