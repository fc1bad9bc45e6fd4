"""What qdrant-client's local mode does not emulate, checked in Qdrant's own engine.

Local mode (what the other Qdrant tests use) is a brute-force Python re-implementation: it
stores float16 vectors as float32, has no HNSW and no payload indexes. ``qdrant-edge-py`` runs
Qdrant's Rust engine in-process (one shard, no server), so the collection layout of
:class:`index_builder.qdrant_index.QdrantIndex` is rebuilt here in it: a float16 MaxSim
multivector ``parts`` without HNSW, a ``global`` vector with Qdrant's default HNSW graph, a
keyword index on ``label``; then

- float16 storage: the grid comes back as the float16 rounding of what was written, exactly
  (our index writes grids that are float16 already, so they come back unchanged);
- HNSW recall at the ef the service asks for (``SEARCH_EF``) against exact search;
- filtered search through the payload index: only allowed labels, the same top-k as exact
  filtered search, also for a label too rare for the graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from index_builder.qdrant_index import SEARCH_EF

edge = pytest.importorskip("qdrant_edge", reason="needs qdrant-edge-py (the dev extras)")

N, D, R, K = 6000, 64, 4, 100
LABELS = [f"species-{i:02d}" for i in range(30)]


def _layout(indexing_threshold_kb: int) -> object:
    return edge.EdgeConfig(
        vectors={
            "global": edge.EdgeVectorParams(size=D, distance=edge.Distance.Dot),
            "parts": edge.EdgeVectorParams(
                size=D,
                distance=edge.Distance.Dot,
                datatype=edge.VectorStorageDatatype.Float16,
                multivector_config=edge.MultiVectorConfig(edge.MultiVectorComparator.MaxSim),
                hnsw_config=edge.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10),
            ),
        },
        # Qdrant's defaults for the graph; a full scan only below 1 KB of vectors, so that the
        # searches below go through the graph.
        hnsw_config=edge.HnswIndexConfig(m=16, ef_construct=100, full_scan_threshold=1),
        optimizers=edge.EdgeOptimizersConfig(indexing_threshold=indexing_threshold_kb),
    )


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ...]]:
    """N points in clusters (like embeddings of many photos of a few hundred subjects), the
    rarest label on 1% of them, HNSW built."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((300, D))
    members = rng.integers(0, len(centres), N)
    vectors = centres[members] + 0.6 * rng.standard_normal((N, D))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    parts = rng.standard_normal((N, R, D)).astype(np.float32)
    labels = np.array([LABELS[i % (len(LABELS) - 1)] for i in range(N)], dtype=object)
    labels[rng.choice(N, N // 100, replace=False)] = LABELS[-1]
    store = edge.EdgeShard.create(str(tmp_path_factory.mktemp("edge")), _layout(1))
    store.update(edge.UpdateOperation.create_field_index("label", edge.PayloadSchemaType.Keyword))
    for start in range(0, N, 500):
        store.update(
            edge.UpdateOperation.upsert_points(
                [
                    edge.Point(
                        i, {"global": vectors[i].tolist(), "parts": parts[i].tolist()},
                        {"label": str(labels[i])},
                    )
                    for i in range(start, min(start + 500, N))
                ]
            )
        )  # fmt: skip
    while store.optimize():  # build the graph now, not in the background
        pass
    yield store, vectors, parts, labels
    store.close()


def _query(store: Any, q: np.ndarray, exact: bool, where: object = None) -> list[int]:
    found = store.query(
        edge.QueryRequest(
            limit=K,
            query=edge.Query.Nearest(q.tolist(), using="global"),
            filter=where,
            params=edge.SearchParams(hnsw_ef=max(SEARCH_EF, K), exact=exact),
        )
    )
    return [int(p.id) for p in found]


def test_the_engine_keeps_float16_grids_exactly(shard: tuple[Any, ...]) -> None:
    store, vectors, parts, _ = shard
    ids = [0, 17, N - 1]
    records = store.retrieve(ids, with_payload=False, with_vector=True)
    for record in records:
        i = int(record.id)
        grid = np.asarray(record.vector["parts"], dtype=np.float32)
        # float16 storage is the float16 rounding, exactly; a float16 grid comes back unchanged
        np.testing.assert_array_equal(grid, parts[i].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(np.asarray(record.vector["global"], np.float32), vectors[i])
    assert store.info().indexed_vectors_count >= N


def test_hnsw_recall_at_the_search_ef(shard: tuple[Any, ...]) -> None:
    store, vectors, _, _ = shard
    queries = vectors[:: N // 50][:50]
    recall = np.mean(
        [len(set(_query(store, q, False)) & set(_query(store, q, True))) / K for q in queries]
    )
    print(f"HNSW recall@{K} at ef {max(SEARCH_EF, K)}: {recall:.4f}")
    assert recall >= 0.95


def test_filtered_search_through_the_payload_index(shard: tuple[Any, ...]) -> None:
    store, vectors, _, labels = shard
    allowed = {LABELS[3], LABELS[7], LABELS[-1]}
    where = edge.Filter(
        must=[edge.FieldCondition(key="label", match=edge.MatchAny(any=sorted(allowed)))],
        must_not=[edge.FieldCondition(key="label", match=edge.MatchAny(any=[LABELS[7]]))],
    )
    rare = edge.Filter(
        must=[edge.FieldCondition(key="label", match=edge.MatchAny(any=[LABELS[-1]]))]
    )
    recalls = []
    for q in vectors[:: N // 20][:20]:
        found = _query(store, q, False, where)
        assert len(found) == K
        assert {labels[i] for i in found} <= allowed - {LABELS[7]}
        recalls.append(len(set(found) & set(_query(store, q, True, where))) / K)
        # 60 points carry the rarest label: fewer than k, so the answer is all of them
        assert sorted(_query(store, q, False, rare)) == sorted(np.flatnonzero(labels == LABELS[-1]))
    print(f"filtered HNSW recall@{K}: {np.mean(recalls):.4f}")
    assert np.mean(recalls) >= 0.95
