"""One suite, both index implementations: a folder and a Qdrant collection (local mode).

Everything here goes through what the CLI and the service use (``build_index``,
``opened``/``open_index``, ``add_images``, the index's ``search``/``remove``/``items``), so the
two must behave the same: adds and removals visible at once and after reopening, duplicate
bytes skipped, another model refused naming both, label filters inside the search, and an exact
search equal to brute force over the stored vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index_builder import FingerprintMismatchError, Source, add_images, build_index, scan_folder
from index_builder.interface import LabelFilter
from index_builder.opening import index_exists, open_index, opened
from model import fingerprint
from tests.index_builder.helpers import make_images, tiny_embedder


@pytest.fixture(params=["folder", "qdrant-local"])
def built(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(location, fingerprint) of 12 pictures in 3 labels."""
    if request.param == "qdrant-local":
        pytest.importorskip("qdrant_client", reason="needs the cluster extra (qdrant-client)")
        where = f"qdrant-local:{tmp_path / 'qdrant'}#gallery"
    else:
        where = str(tmp_path / "index")
    make_images(tmp_path / "gallery", 12)
    embedder = tiny_embedder()
    assert not index_exists(where)
    report = build_index(scan_folder(tmp_path / "gallery"), where, embedder, workers=0)
    assert report.indexed == 12
    assert index_exists(where)
    return where, fingerprint(embedder.model)


def test_adds_and_removals_show_at_once_and_after_reopening(
    built: tuple[str, str], tmp_path: Path
) -> None:
    where, fp = built
    new = make_images(tmp_path / "new", 2, seed=5)
    with opened(where, fp, writable=True) as index:
        report = add_images(
            index, [Source(p, p.name, "new") for p in [*new, new[0]]], tiny_embedder()
        )
        assert report.indexed == 2
        assert report.skipped == [
            {"path": str(new[0]), "reason": f"duplicate bytes of {new[0].name}"}
        ]
        added = report.ids
        vectors = index.vectors(np.array(added))
        assert index.search(vectors, 1)[1][:, 0].tolist() == added  # each finds itself first
        assert index.count == 14
        victim = int(index.ids[0])
        assert sorted(index.remove([added[0], victim, 10**15])) == sorted([added[0], victim])
        _, found = index.search(vectors, 14)
        assert {added[0], victim}.isdisjoint(found.ravel().tolist())
    with opened(where, fp) as reopened:
        assert reopened.count == 12
        _, found = reopened.search(vectors, 14)
        assert {added[0], victim}.isdisjoint(found.ravel().tolist())
        assert found[1, 0] == added[1]
        assert reopened.items([added[1]])[added[1]].label == "new"


def test_another_model_is_refused_naming_both(built: tuple[str, str], tmp_path: Path) -> None:
    where, ours = built
    other = tiny_embedder(dim=8)
    theirs = fingerprint(other.model)
    with pytest.raises(FingerprintMismatchError) as refused:
        open_index(where, theirs)
    assert ours[:16] in str(refused.value)
    assert theirs[:16] in str(refused.value)
    picture = make_images(tmp_path / "other", 1, seed=7)[0]
    with opened(where, None, writable=True) as index, pytest.raises(FingerprintMismatchError):
        add_images(index, [Source(picture, "x")], other)
    with opened(where, ours) as index:
        assert index.count == 12  # nothing was written


def test_label_filters_run_inside_the_search(built: tuple[str, str]) -> None:
    where, fp = built
    with opened(where, fp) as index:
        items = index.items(index.ids)
        queries = index.vectors(index.ids[:3])
        _, only = index.search(queries, 10, LabelFilter(("class1",)))
        assert (only >= 0).sum(axis=1).tolist() == [4, 4, 4]  # all of them, though not nearest
        assert {items[i].label for i in only.ravel() if i >= 0} == {"class1"}
        _, both = index.search(queries, 3, LabelFilter(("class0", "class2"), exclude=("class2",)))
        assert {items[i].label for i in both.ravel()} == {"class0"}
        _, without = index.search(queries, 12, LabelFilter(exclude=("class1",)))
        assert (without >= 0).sum(axis=1).tolist() == [8, 8, 8]
        assert index.labels() == [("class0", 4), ("class1", 4), ("class2", 4)]


def test_search_is_exact_over_the_stored_vectors(built: tuple[str, str]) -> None:
    where, fp = built
    with opened(where, fp) as index:
        ids = np.asarray(index.ids)
        stored = index.vectors(ids)
        scores, found = index.search(stored, 5)
        brute = stored @ stored.T
        position = {int(i): n for n, i in enumerate(ids)}
        cols = np.vectorize(position.__getitem__)(found)
        rows = np.arange(len(ids))[:, None]
        np.testing.assert_allclose(brute[rows, cols], scores, atol=1e-5)  # each hit's own score
        np.testing.assert_allclose(scores, -np.sort(-brute, axis=1)[:, :5], atol=1e-5)  # the best
        assert (found[:, 0] == ids).all()  # each item first for itself
