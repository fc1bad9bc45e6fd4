"""The one embedding loop: every indexing path's records and arrays, checked against embedding
each image on its own, and the Ray stages' columns against the loop run in this process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from index_builder import Decoded, EmbeddedBatch, Source
from index_builder.embedding import decode_source, embed_decoded, embed_sources, with_embedding
from index_builder.ray_build import _decode, _decoded, _Embed, _embedded
from model import Embedder, Embedding, load_for_model
from tests.index_builder.helpers import make_images, tiny_embedder


@pytest.fixture
def sources(tmp_path: Path) -> list[Source]:
    paths = make_images(tmp_path / "gallery", 5)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    found = [Source(p, p.name, p.parent.name) for p in paths]
    return [*found[:2], Source(tmp_path / "bad.png", "bad"), *found[2:],
            Source(tmp_path / "missing.png", "missing")]  # fmt: skip


def _reference(embedder: Embedder, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Each image decoded and embedded on its own: vectors (n, D), grids (n, R, D) float32."""
    spec = embedder.model.config.preprocessing
    rows = [embedder.embed_pixels(load_for_model(p, spec).pixels[None]) for p in paths]
    return (np.concatenate([r.vector.float().numpy() for r in rows]),
            np.concatenate([r.parts.float().numpy() for r in rows]))  # fmt: skip


def test_the_loop_embeds_what_decodes_in_order_and_reports_the_rest(
    sources: list[Source],
) -> None:
    embedder = tiny_embedder()
    spec = embedder.model.config.preprocessing
    decoded = [decode_source(s, spec) for s in sources]
    batch = embed_decoded(decoded, embedder.embed_pixels)
    good = [s for s in sources if s.path.exists() and s.key != "bad"]
    assert [d.source for d in batch.decoded] == good
    assert [d.source.key for d in batch.failed] == ["bad", "missing"]
    assert batch.failed[0].reason.startswith("not a readable image")
    assert batch.failed[1].reason.startswith("unreadable")
    assert batch.vectors.dtype == np.float32
    assert batch.grids.dtype == np.float16
    vectors, grids = _reference(embedder, [s.path for s in good])
    np.testing.assert_allclose(batch.vectors, vectors, atol=1e-5)
    np.testing.assert_allclose(batch.grids.astype(np.float32), grids, atol=2e-3)
    embedded = batch.embedded()
    assert [e.source for e in embedded] == good
    assert [e.item().key for e in embedded] == [s.key for s in good]
    assert batch.skipped() == [{"path": str(d.source.path), "reason": d.reason}
                               for d in batch.failed]  # fmt: skip
    # The loop over files gives the same batches, decoding in this process or in workers.
    for workers in (0, 2):
        batches = list(embed_sources(sources, embedder, batch_size=3, workers=workers))
        assert [len(b.decoded) + len(b.failed) for b in batches] == [3, 3, 1]
        found = np.concatenate([b.vectors for b in batches if b.decoded])
        np.testing.assert_allclose(found, batch.vectors, atol=1e-5)  # other batch sizes


def test_a_batch_where_nothing_decodes_embeds_nothing(tmp_path: Path) -> None:
    failed = [Decoded(Source(tmp_path / "a.png", "a"), reason="unreadable: gone")]

    def embed(pixels: torch.Tensor) -> Embedding:
        raise AssertionError("nothing to embed")

    batch = embed_decoded(failed, embed)
    assert batch.embedded() == []
    assert batch.failed == failed
    with pytest.raises(ValueError, match="need their embedding"):
        with_embedding([Decoded(Source(tmp_path / "b.png", "b"), torch.zeros(3, 4, 4))], None)


def test_ray_stages_pass_the_loop_s_records_through_their_columns(
    sources: list[Source],
) -> None:
    """Decode stage -> embed actor -> the records the write stage adds: the same as the loop
    run here, with the failures and their reasons."""
    embedder = tiny_embedder()
    spec = embedder.model.config.preprocessing
    direct = embed_decoded([decode_source(s, spec) for s in sources], embedder.embed_pixels)
    batch = {
        "index": np.arange(len(sources)),
        "path": np.array([str(s.path) for s in sources], dtype=object),
        "key": np.array([s.key for s in sources], dtype=object),
        "label": np.array([s.label or "" for s in sources], dtype=object),
    }
    columns = _decode(batch, spec, 10**7)
    for array in columns.values():
        array.flags.writeable = False  # as Ray may hand them over
    assert [d.source for d in _decoded(columns)] == sources
    actor = object.__new__(_Embed)  # the actor without loading a checkpoint: the tiny model
    actor.embedder, actor.shape = embedder, (embedder.model.config.grid**2, embedder.model.dim)
    through: EmbeddedBatch = _embedded(actor(columns))
    assert [d.source for d in through.decoded] == [d.source for d in direct.decoded]
    assert [d.sha256 for d in through.decoded] == [d.sha256 for d in direct.decoded]
    assert through.skipped() == direct.skipped()
    np.testing.assert_array_equal(through.vectors, direct.vectors)
    np.testing.assert_array_equal(through.grids, direct.grids)
