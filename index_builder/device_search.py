"""Exact global search with torch on the model's device: the GPU path.

FAISS-GPU publishes no wheel that matches this project's torch/CUDA pair, so on a GPU the live
global vectors are kept in device memory (float16 on CUDA) and searched exactly with one matrix
product and a top-k per batch of queries. On the CPU, FAISS stays the default.
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

    def __init__(self, index: AnyIndex, device: torch.device | str) -> None:
        self.index = index
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
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
        for start in range(0, len(ids), UPLOAD_CHUNK):
            chunk = ids[start : start + UPLOAD_CHUNK]
            vectors[start : start + len(chunk)] = torch.from_numpy(self.index.vectors(chunk)).to(
                self.device, self.dtype
            )
        self.ids = torch.from_numpy(ids).to(self.device)
        self.vectors = vectors

    def add(self, ids: Sequence[int]) -> None:
        if not len(ids):
            return
        new = np.asarray(ids, dtype=np.int64)
        vectors = torch.from_numpy(self.index.vectors(new)).to(self.device, self.dtype)
        self.ids = torch.cat([self.ids, torch.from_numpy(new).to(self.device)])
        self.vectors = torch.cat([self.vectors, vectors])

    def remove(self, ids: Sequence[int]) -> None:
        gone = torch.as_tensor(list(ids), dtype=torch.int64, device=self.device)
        keep = ~torch.isin(self.ids, gone)
        self.ids, self.vectors = self.ids[keep], self.vectors[keep]

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
