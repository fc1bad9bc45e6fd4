"""int8 part grids: every coordinate within half a step of its part's scale, zero parts kept as
zeros, records that memory-map, and float arrays (older indexes) read alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.quantization import LEVELS, dequantize, pack, packed_dtype, quantize, unpack


def unit_grids(n: int = 6, regions: int = 16, dim: int = 64, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, regions, dim, generator=generator), dim=-1).numpy()


def test_every_coordinate_is_kept_within_half_a_step() -> None:
    grids = unit_grids()
    codes, scales = quantize(grids)
    assert codes.dtype == np.int8
    assert scales.shape == grids.shape[:2]
    assert np.abs(codes).max() == LEVELS  # each part's largest coordinate takes the full range
    error = np.abs(dequantize(codes, scales, np.float32) - grids)
    assert (error <= scales[..., None] / 2 + 1e-7).all()


def test_cosines_survive_storage() -> None:
    a, b = unit_grids(seed=1), unit_grids(seed=2)
    stored = unpack(pack(a), np.float32), unpack(pack(b), np.float32)
    exact = np.einsum("nrd,npd->nrp", a, b)
    kept = np.einsum("nrd,npd->nrp", *stored)
    assert np.abs(kept - exact).max() < 5e-3


def test_a_part_of_zeros_stays_zeros() -> None:
    grids = unit_grids(2)
    grids[1, 3] = 0
    out = unpack(pack(grids), np.float32)
    assert (out[1, 3] == 0).all()
    assert np.isfinite(out).all()


def test_records_are_one_row_per_item_and_memory_map(tmp_path: object) -> None:
    grids = unit_grids(5, 4, 8)
    records = pack(grids)
    assert records.dtype == packed_dtype(4, 8)
    assert records.shape == (5,)
    assert records.dtype.itemsize == 4 * 8 + 4 * 4  # R x D bytes and a float32 scale per part
    path = f"{tmp_path}/grids.npy"
    np.save(path, records)
    mapped = np.load(path, mmap_mode="r")
    np.testing.assert_array_equal(unpack(mapped[[3, 0]]), unpack(records)[[3, 0]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_float_grids_pass_through(dtype: type) -> None:
    grids = unit_grids(3).astype(dtype)
    np.testing.assert_array_equal(unpack(grids), grids.astype(np.float16))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_dequantized_values_are_the_plain_product_rounded_once(dtype: type) -> None:
    rng = np.random.default_rng(3)
    grids = rng.standard_normal((40, 16, 64)).astype(np.float32)
    grids[:4] *= 1e-6  # float16 subnormals
    codes, scales = quantize(grids)
    expected = (codes.astype(np.float32) * scales[..., None]).astype(dtype)
    got = dequantize(codes, scales, dtype=dtype)
    assert got.dtype == dtype
    assert np.array_equal(got.view(f"u{got.itemsize}"), expected.view(f"u{got.itemsize}"))
