"""The response budget: the largest answer a request may ask for, checked before any work starts.

Every parameter has its own bound, but their product did not: 16 images x 1,000 hits x 256
matches made a 602 MB answer that took 6.4 GB to build. A request's worst-case answer is
estimated from its parameters (images x hits x explanation size) and refused with 422
``invalid_request`` over :data:`MAX_RESPONSE_BYTES`, the message naming the largest values
that fit. The estimate is an upper bound, counted from the JSON's own layout:

- every float at its longest JSON form (24 characters, ``-2.2250738585072014e-308``), ids at 19
  digits, and each character of a key or label at 6 bytes (``\\u0001``), at their limits
  (:mod:`index_builder.limits`);
- measured so (``tests/service/test_response_budget.py`` serialises such worst cases through
  the response models and holds each below its estimate): a hit without explanation 295 bytes
  plus its key and label; an explanation 715 bytes plus 404 per region (16 floats) plus 147-153
  per match; the R x R matrices of ``/explain`` 50 bytes a cell; a page 225 bytes.

Real answers are smaller: a random double takes 18-20 characters, and keys are short (an
explanation of a 4 x 4 grid with 5 matches measured 5.6 KB against 7.9 KB here). The documented
defaults, a batch of 16 images with k=10, 5 matches and explanations, estimate 2.1 MB.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from index_builder.limits import MAX_KEY_LENGTH, MAX_LABEL_LENGTH
from service.errors import ApiError
from service.search import SearchOptions

MAX_RESPONSE_BYTES = 16 * 2**20

TEXT_CHAR_BYTES = 6  # a control character, escaped
PAGE_BYTES = 256  # offset, next_offset, structural_weight, ranked_by, nothing_close
HIT_BYTES = 320 + TEXT_CHAR_BYTES * (MAX_KEY_LENGTH + MAX_LABEL_LENGTH)
GROUP_BYTES = 32 + TEXT_CHAR_BYTES * MAX_LABEL_LENGTH  # a group's label and brackets
EXPLANATION_BYTES = 768  # its scalars, verdict, ranked_by, sinkhorn
REGION_BYTES = 408  # 2 weights, 2 boxes of 4, 3 terms x 2 sides of contributions
MATCH_BYTES = 160
MATRIX_CELL_BYTES = 52  # a cell of the plan and of the similarity


def explanation_bytes(grid: int, matches: int, matrices: bool = False) -> int:
    """Worst-case JSON size of one explanation of a ``grid x grid`` model listing up to
    ``matches`` part matches (there are at most R x R), with the R x R matrices or not."""
    regions = grid * grid
    size = EXPLANATION_BYTES + REGION_BYTES * regions + MATCH_BYTES * min(matches, regions**2)
    return size + (MATRIX_CELL_BYTES * regions**2 if matrices else 0)


def search_bytes(options: SearchOptions, grid: int, queries: int = 1) -> int:
    """Worst-case JSON size of the answer to ``queries`` searches with ``options``: a page each
    of k hits (grouped: k groups of group_size hits, listed twice, in ``results`` and in
    ``groups``), each hit explained when asked."""
    hit = HIT_BYTES + (explanation_bytes(grid, options.matches) if options.explain else 0)
    if options.group_size is None:
        page = PAGE_BYTES + options.k * hit
    else:
        page = PAGE_BYTES + options.k * (GROUP_BYTES + 2 * options.group_size * hit)
    return queries * page


def check_search(options: SearchOptions, grid: int, queries: int = 1) -> None:
    """Refuse (422) searches whose answer could pass :data:`MAX_RESPONSE_BYTES`, naming the
    largest k, number of images and matches that would fit with the other values as sent."""
    size = search_bytes(options, grid, queries)
    if size <= MAX_RESPONSE_BYTES:
        return
    fits = _fits(lambda o, n: search_bytes(o, grid, n), options, queries)
    largest = []
    if (k := _largest(lambda v: fits(k=v), options.k, 1)) is not None:
        largest.append(f"k={k}")
    if queries > 1 and (n := _largest(lambda v: fits(queries=v), queries, 1)) is not None:
        largest.append(f"{n} images")
    if options.explain and (m := _largest(lambda v: fits(matches=v), options.matches, 0)):
        largest.append(f"matches={m}")
    if options.explain and fits(explain=False):
        largest.append("explain=false")
    shape = f"{queries} queries x " if queries > 1 else ""
    hits = f"{options.k} groups of {options.group_size}" if options.group_size else options.k
    explained = f", explained with {options.matches} matches" if options.explain else ""
    raise ApiError(422, "invalid_request", f"the answer to {shape}{hits} hits{explained} could "
                   f"take {_mb(size)}, over the limit of {_mb(MAX_RESPONSE_BYTES)} for one "
                   "response; what fits, each with the other values as sent: "
                   f"{', '.join(largest) or 'none: ask for fewer results'}")  # fmt: skip


def check_explanation(grid: int, matches: int) -> None:
    """Refuse (422) an ``/explain`` answer (with its matrices) that could pass the budget."""
    if explanation_bytes(grid, matches, matrices=True) <= MAX_RESPONSE_BYTES:
        return
    top = _largest(lambda v: explanation_bytes(grid, v, True) <= MAX_RESPONSE_BYTES, matches, 0)
    ask = "format=png" if top is None else f"at most top={top}, or format=png"
    raise ApiError(422, "invalid_request", f"the explanation of a {grid} x {grid} grid with "
                   f"{matches} matches could take {_mb(explanation_bytes(grid, matches, True))}, "
                   f"over the limit of {_mb(MAX_RESPONSE_BYTES)} for one response; ask for "
                   f"{ask}")  # fmt: skip


def _fits(
    size: Callable[[SearchOptions, int], int], options: SearchOptions, queries: int
) -> Callable[..., bool]:
    """``fits(**changes)``: whether the answer fits with ``changes`` to the options (or to
    ``queries``)."""

    def fits(queries: int = queries, **changes: Any) -> bool:
        return size(dataclasses.replace(options, **changes), queries) <= MAX_RESPONSE_BYTES

    return fits


def _largest(fits: Callable[[int], bool], upper: int, lower: int) -> int | None:
    """The largest value in [lower, upper] that ``fits`` (which is monotone), or None."""
    if not fits(lower):
        return None
    while lower < upper:  # fits(lower) holds
        middle = (lower + upper + 1) // 2
        lower, upper = (middle, upper) if fits(middle) else (lower, middle - 1)
    return lower


def _mb(size: int) -> str:
    return f"{size / 2**20:,.1f} MB"
