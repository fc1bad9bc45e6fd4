"""The global term, split exactly over the regions of an image.

The global vector is the normalised mean of the projected feature map ``f_p`` (N = h x w map
positions; the projection is a 1 x 1 convolution, so ``f_p`` is what the head makes of position
p). Its cosine with another image's unit global vector ``o`` is therefore a sum over positions
(Stylianou, Souvenir and Pless, "Visualizing deep similarity networks", WACV 2019):

    cos(mean f, o) = sum_p <f_p, o> / (N |mean f|)

Each term is position p's contribution. Positions are then shared out among the model's
``G x G`` grid cells, the regions of the structural term: the cells of adaptive average pooling
overlap where G does not divide the map (at 4 x 4 over 7 x 7, rows and columns 1, 3 and 5 lie
in two cells), and a position covered by m cells gives each 1/m of its contribution, so the cells'
contributions still add up to the cosine exactly.

The cells' shares are linear in the other image's vector, so an image's side of any comparison is
fixed by one (R, D) array, its *global basis* ``U_c = sum_{p in c} f_p / (m_p N |mean f|)``
(m_p: the cells covering p), which sums over cells to the unit global vector; cell c's share of
the cosine with ``o`` is ``<U_c, o>``. That basis, not the map, is what a service keeps per image.
"""

from __future__ import annotations

import math

import torch


def pooling_cells(grid: int, height: int, width: int) -> torch.Tensor:
    """(R, h * w) float64: entry (c, p) is 1/m when map position p (row-major) lies in cell c
    of ``adaptive_avg_pool2d(map, grid)`` and in m cells in all; every column sums to 1."""
    if grid < 1 or height < 1 or width < 1:
        raise ValueError(f"pooling_cells needs grid, height, width >= 1, got {grid, height, width}")

    def spans(size: int) -> torch.Tensor:  # (grid, size): which positions each cell row spans
        inside = torch.zeros(grid, size, dtype=torch.float64)
        for i in range(grid):  # PyTorch's adaptive pooling bounds
            inside[i, (i * size) // grid : math.ceil((i + 1) * size / grid)] = 1.0
        return inside

    member = torch.einsum("ay,bx->abyx", spans(height), spans(width)).reshape(grid * grid, -1)
    return member / member.sum(dim=0, keepdim=True)


def global_basis(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """maps: (B, D, h, w), projected feature maps -> (B, R, D) float64, each image's global
    basis (see the module's docstring): it sums over R to the normalised mean of the map."""
    if maps.dim() != 4:
        raise ValueError(f"global_basis needs maps (B, D, h, w), got {tuple(maps.shape)}")
    f = maps.double().flatten(2)  # (B, D, N)
    norm = f.mean(dim=2).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)  # (B,)
    cells = pooling_cells(grid, maps.shape[2], maps.shape[3]).to(f.device)  # (R, N)
    return torch.einsum("rn,bdn->brd", cells, f) / (f.shape[2] * norm[:, None, None])


def global_contributions(maps: torch.Tensor, other: torch.Tensor, grid: int) -> torch.Tensor:
    """maps: (B, D, h, w); other: (B, D), the other images' unit global vectors -> (B, R)
    float64: each grid cell's share of the global cosine, row b summing to
    ``<normalize(mean maps[b]), other[b]>``."""
    return torch.einsum("brd,bd->br", global_basis(maps, grid), other.double())
