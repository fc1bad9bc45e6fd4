"""The three searches, each through the same named stages:

    decode -> embed                      the engine's batchers (:mod:`service.batching`)
    coarse_search -> gather -> rerank    :mod:`service.search`
    rank -> explain                      :mod:`service.ranking`
    respond                              the routes

A search by query (:meth:`Retrieval.batch`: the queries of several requests at once), its
grouped form (:meth:`Retrieval.grouped`) and a search by examples (:meth:`Retrieval.examples`)
differ only in what they score (one query, or the best positive less the best negative) and in
how they cut the ranking into pages (a slice, groups by label). ``rerank_k`` means one thing
in all three: :class:`service.search.SearchOptions`. Each stage is timed on the request's
:class:`service.metrics.StageTimer`.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from model import Embedding, ImageGeometry
from model.config import ModelConfig
from model.matching import StructuralMatch
from service.batching import SearchJob
from service.gallery import Gallery, GalleryChangedError, rerun_if_changed
from service.limits import check_deadline
from service.metrics import StageTimer
from service.ranking import (
    PagePairs,
    by_examples,
    explain_hits,
    group_by_label,
    pairs_at,
    pick_pages,
    rank,
    spread,
)
from service.search import (
    Candidates,
    Hit,
    Page,
    SearchOptions,
    coarse_search,
    gather,
    gather_shared,
    needed_positions,
    rerank,
)

GROUP_DEPTH = 4  # a grouped search first looks at this many candidates per hit it may return


class Retrieval:
    """The searches of one gallery with one model's matching, on ``device``.

    ``group_depth`` (:data:`GROUP_DEPTH`) may be lowered, by tests, to make a grouped search
    deepen its coarse search."""

    def __init__(self, gallery: Gallery, config: ModelConfig, device: torch.device) -> None:
        self.gallery, self.config, self.device = gallery, config, device
        self.group_depth: float = GROUP_DEPTH

    def head(self, rerank_k: int) -> int:
        """How many of a query's first candidates are sorted by score: ``rerank_k``, or none
        when the structural weight is 0 (the score is then the global similarity, and sorting
        could not change the order). The one place the weight is read for ranking."""
        return rerank_k if self.config.matching.structural_weight != 0 else 0

    def coarse(self, vectors: np.ndarray, options: list[SearchOptions], depth: int) -> Candidates:
        """The coarse_search stage for queries ``vectors`` (B, D); hold the gallery's lock."""
        return coarse_search(self.gallery.search, vectors, [o.where for o in options], depth)

    def match(self, queries: Embedding, ids: np.ndarray, timer: StageTimer) -> StructuralMatch:
        """The gather and rerank stages for every query against the same items ``ids``: a
        StructuralMatch over (len(queries), len(ids)) on the CPU, their grids read once.
        GalleryChangedError when one was deleted since the coarse search found it."""
        with timer.stage("gather"), self.gallery.lock:
            try:
                gathered = gather_shared(self.gallery.index, ids, self.gallery.device_search)
            except KeyError as e:
                raise GalleryChangedError from e
        with timer.stage("rerank"):
            return rerank(queries, gathered, self.config, self.device).to("cpu")

    def batch(self, jobs: list[SearchJob]) -> list[list[Page]]:
        """The queries of several requests, searched together: one coarse search per distinct
        label filter, one gathering and one structural match for the whole batch, on the
        model's device (only the scores and the pages' pairs leave it). A page is a slice of
        its query's ranking, so pages continue each other exactly. Only the candidates a
        ranking needs are matched: the sorted head and the page. Each request's timer gets
        the shared stages' time and its own explanations'."""
        options = [j.options for j in jobs for _ in range(len(j.queries))]
        heads = [self.head(o.rerank_k) for o in options]
        # One more than the page tells whether a next page exists.
        depth = max(max(o.offset + o.k + 1, h) for o, h in zip(options, heads, strict=True))
        queries = Embedding.cat([j.queries for j in jobs]) if len(jobs) > 1 else jobs[0].queries
        times = [time.perf_counter()]
        with self.gallery.lock:
            candidates = self.coarse(queries.vector.numpy(), options, depth)
            times.append(time.perf_counter())
            counts = candidates.counts.tolist()
            needed = [needed_positions(o, h, n)
                      for o, h, n in zip(options, heads, counts, strict=True)]  # fmt: skip
            gathered = gather(self.gallery.index, candidates, needed, self.gallery.device_search)
            times.append(time.perf_counter())
        if gathered is not None:
            match = rerank(queries, gathered, self.config, self.device)
            scores = spread(match, gathered, depth)
            rankings = rank(scores.score, candidates.counts, heads)
            pages = [r[o.offset : o.offset + o.k] for r, o in zip(rankings, options, strict=True)]
            picked, columns, ids = pick_pages(match, gathered, scores.column, pages)
        times.append(time.perf_counter())
        out, b = [], 0
        for job in jobs:
            for stage, seconds in zip(("coarse_search", "gather", "rerank"), np.diff(times),
                                      strict=True):  # fmt: skip
                job.timer.add(stage, float(seconds))
            answers, o = [], job.options
            with job.timer.stage("explain"):
                for geometry in job.geometries:
                    hits = [] if gathered is None else explain_hits(
                        picked, pairs_at(picked, columns[b], pages[b], ids[b], o.rerank_k),
                        gathered.items, [geometry], o, self.config)  # fmt: skip
                    answers.append(_page(hits, o, counts[b]))
                    b += 1
            out.append(answers)
        return out

    @rerun_if_changed
    def grouped(
        self, query: Embedding, geometry: ImageGeometry, options: SearchOptions, timer: StageTimer
    ) -> Page:
        """One query's ranking (as :meth:`batch` ranks) grouped by label: groups in the order
        of their best hit, each with its best ``group_size`` hits; ``k`` groups from group
        ``offset``. Items without a label form one group (label None). When the candidates
        run out before the groups are full and the gallery holds more, the coarse search is
        repeated four times deeper."""
        size = options.group_size or 1
        want = options.offset + options.k + 1  # groups; one more tells whether more exist
        head_k = self.head(options.rerank_k)
        depth = max(head_k, 1, int(self.group_depth * want * size))
        while True:
            check_deadline()
            with timer.stage("coarse_search"), self.gallery.lock:
                found = self.coarse(query.vector.numpy(), [options], depth)
                ids = found.ids[0][: found.counts[0]]
                items = self.gallery.index.items(ids)
                total = self.gallery.index.count
            head = min(head_k, len(ids))
            score = torch.full((1, len(ids)), float("-inf"))
            match = self.match(query, ids[:head], timer) if head else None
            if match is not None:
                score[0, :head] = match.score[0]
            ranking = rank(score, [len(ids)], [head])[0]
            groups, full = group_by_label(ranking, ids, items, want, size)
            if full or len(ids) < depth or depth >= total:
                break
            depth *= 4
        chosen = groups[options.offset : options.offset + options.k]
        if not chosen:
            return Page([], options.offset, None, [])
        flat = np.concatenate([members for _, members in chosen])
        positions = np.unique(flat)
        column = np.arange(len(ids))
        if match is None or positions[-1] >= head:  # some past the sorted head: match those
            match = self.match(query, ids[positions], timer)
            column[positions] = np.arange(len(positions))
        with timer.stage("explain"):
            pairs = pairs_at(match, column[flat], flat, ids[flat], options.rerank_k)
            hits = explain_hits(match, pairs, items, [geometry], options, self.config)
        out = [(label, list(members))
               for label, members in itertools.groupby(hits, lambda h: h.item.label)]  # fmt: skip
        return _page(hits, options, len(groups), out)

    @rerun_if_changed
    def examples(
        self,
        positives: Embedding,
        positive_geometries: list[ImageGeometry],
        negatives: Embedding | None,
        exclude: list[int],
        options: SearchOptions,
        timer: StageTimer,
    ) -> Page:
        """More like the positives, less like the negatives.

        Candidates: the union of each positive's top ``max(rerank_k, 1)`` by the global vector
        (within ``options.where``), less the gallery items given as examples (``exclude``),
        in id order; the same for every page, so pages continue one ranking. Every candidate
        is matched with every example in one structural match and ranked, all of them sorted,
        by :func:`service.ranking.by_examples` (ties in id order). A hit's global and
        structural terms and its explanation are those of the positive it matches best
        (``Hit.positive``: its position among the positives)."""
        n_pos = len(positives)
        examples = positives if negatives is None else Embedding.cat([positives, negatives])
        with timer.stage("coarse_search"), self.gallery.lock:
            depth = max(options.rerank_k, 1)
            found = self.coarse(positives.vector.numpy(), [options] * n_pos, depth).ids
            ids = np.setdiff1d(np.unique(found[found >= 0]), np.asarray(exclude, np.int64))
            if len(ids) == 0:
                return Page([], options.offset, None)
            items = self.gallery.index.items(ids)
        match = self.match(examples, ids, timer)
        with timer.stage("rerank"):
            score, best, global_rank = by_examples(match, n_pos)
            ranking = rank(score[None], [len(ids)], [len(ids)])[0]
        page = ranking[options.offset : options.offset + options.k]
        pairs = PagePairs(best[page], page, ids[page], score.numpy()[page], global_rank[page],
                          np.ones(len(page), dtype=bool), by_example=True)  # fmt: skip
        with timer.stage("explain"):
            hits = explain_hits(match, pairs, items, positive_geometries, options, self.config)
        return _page(hits, options, len(ids))


def _page(
    hits: list[Hit],
    options: SearchOptions,
    total: int,
    groups: list[tuple[str | None, list[Hit]]] | None = None,
) -> Page:
    """``hits`` from ``options.offset`` of a ranking of ``total`` (hits, or groups)."""
    end = options.offset + options.k
    return Page(hits, options.offset, end if total > end else None, groups)
