"""Exact global search with torch on the model's device: the GPU path.

FAISS-GPU publishes no wheel that matches this project's torch/CUDA pair, so on a GPU the live
global vectors are kept in device memory (float16 on CUDA) and searched exactly with one matrix
product and a top-k per batch of queries. On the CPU, FAISS stays the default.

With ``grids=True`` the live part grids (float16, as the index stores them) are kept on the
device too, so that re-ranking gathers its candidates' grids there with one indexing operation
instead of reading them on the host and copying them over for every batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from index_builder.opening import AnyIndex

UPLOAD_CHUNK = 65_536


class DeviceSearch:
    """The live vectors of ``index`` on ``device``; keep it in step with :meth:`add` and
    :meth:`remove` after the index changes (the engine does, under its lock)."""

    def __init__(self, index: AnyIndex, device: torch.device | str, grids: bool = False) -> None:
        self.index = index
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.keeps_grids = grids
        self.refresh()

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    def refresh(self) -> None:
        """Load every live vector again, in chunks (the host never holds them all at once)."""
        ids = np.asarray(self.index.ids, dtype=np.int64)
        vectors = torch.empty(
            len(ids), self.index.manifest.dim, dtype=self.dtype, device=self.device
        )
        grids = None
        if self.keeps_grids:
            shape = (self.index.manifest.grid**2, self.index.manifest.dim)
            grids = torch.empty(len(ids), *shape, dtype=torch.float16, device=self.device)
        for start in range(0, len(ids), UPLOAD_CHUNK):
            chunk = ids[start : start + UPLOAD_CHUNK]
            vectors[start : start + len(chunk)] = torch.from_numpy(self.index.vectors(chunk)).to(
                self.device, self.dtype
            )
            if grids is not None:
                grids[start : start + len(chunk)] = self._grids(chunk)
        self.ids = torch.from_numpy(ids).to(self.device)
        self.vectors = vectors
        self.part_grids = grids
        self._lookup: tuple[torch.Tensor, torch.Tensor] | None = None

    def _grids(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.index.grids(ids), dtype=np.float16)).to(self.device)

    @staticmethod
    def grid_bytes(index: AnyIndex) -> int:
        """What keeping ``index``'s part grids on a device takes (float16)."""
        return index.count * index.manifest.grid**2 * index.manifest.dim * 2

    def add(self, ids: Sequence[int]) -> None:
        if not len(ids):
            return
        new = np.asarray(ids, dtype=np.int64)
        vectors = torch.from_numpy(self.index.vectors(new)).to(self.device, self.dtype)
        self.ids = torch.cat([self.ids, torch.from_numpy(new).to(self.device)])
        self.vectors = torch.cat([self.vectors, vectors])
        if self.part_grids is not None:
            self.part_grids = torch.cat([self.part_grids, self._grids(new)])
        self._lookup = None

    def remove(self, ids: Sequence[int]) -> None:
        gone = torch.as_tensor(list(ids), dtype=torch.int64, device=self.device)
        keep = ~torch.isin(self.ids, gone)
        self.ids, self.vectors = self.ids[keep], self.vectors[keep]
        if self.part_grids is not None:
            self.part_grids = self.part_grids[keep]
        self._lookup = None

    def grids(self, ids: np.ndarray) -> torch.Tensor | None:
        """The part grids of ``ids`` (n, R, D) float16 on the device, gathered there; None
        when grids are not kept here or one of ``ids`` is not (the caller reads the index)."""
        if self.part_grids is None or self.count == 0 or len(ids) == 0:
            return None
        if self._lookup is None:  # ids in order, and where each lies: rebuilt after changes
            order = torch.argsort(self.ids)
            self._lookup = (self.ids[order], order)
        ordered, order = self._lookup
        wanted = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        at = torch.searchsorted(ordered, wanted).clamp_max(len(ordered) - 1)
        if not bool((ordered[at] == wanted).all()):  # one host sync per gathering
            return None
        return self.part_grids[order[at]]

    @torch.inference_mode()
    def search(
        self,
        queries: np.ndarray,
        k: int,
        allow: np.ndarray | None = None,
        deny: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries: (n, D) unit vectors -> scores (n, k) float32, ids (n, k); past the number
        of items (or of those ``allow`` lets through and ``deny`` does not stop), scores are
        -inf and ids -1 (as FAISS pads)."""
        n = queries.shape[0]
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        found = np.full((n, k), -1, dtype=np.int64)
        if self.count == 0 or n == 0:
            return scores, found
        q = torch.from_numpy(np.ascontiguousarray(queries)).to(self.device, self.dtype)
        similarity = (q @ self.vectors.T).float()
        if allow is not None or deny is not None:
            keep = torch.ones_like(self.ids, dtype=torch.bool)
            if allow is not None:
                keep &= torch.isin(self.ids, torch.from_numpy(allow).to(self.device))
            if deny is not None:
                keep &= ~torch.isin(self.ids, torch.from_numpy(deny).to(self.device))
            similarity = similarity.masked_fill(~keep, float("-inf"))
        top = torch.topk(similarity, min(k, self.count), dim=1)
        ids = torch.where(top.values > float("-inf"), self.ids[top.indices], -1)
        scores[:, : top.values.shape[1]] = top.values.cpu().numpy()
        found[:, : top.values.shape[1]] = ids.cpu().numpy()
        return scores, found
