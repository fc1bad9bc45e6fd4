"""Draw an explanation: both images side by side, heat maps of the whole score, match lines.

The picture says what really ranked the result (:attr:`Explanation.ranked_by`; with weight 0
the structural matching is only shown as correspondence), the verdict, the score and its two
terms, a heat map per image of each region's share of the whole score (``total`` = global +
w x structural), numbered lines for the structural term's strongest part matches, and two
tables: where the score comes from (rows that add up to the score printed above them) and the
strongest matches.

No two pieces of text overlap: the heading, legend and tables are laid out in bands measured
from the text itself, and the labels over the images (match numbers, part tags) are placed
greedily with collision checks (:func:`place_labels`); a label that finds no free place is left
out. The boxes of everything written are kept in the picture's ``info["labels"]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from model.explain import Box, Explanation

Rect = tuple[float, float, float, float]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Colour = tuple[int, int, int]

HEIGHT = 320
GAP = 56
PAD = 12
ROW = 18
TABLE_GAP = 36
TABLE_ROWS = 5  # query parts listed by name in the score table (the rest as one "others" row)
MAX_LINES = 32  # match lines drawn at most (the table lists as many)
INK: Colour = (20, 20, 20)
MUTED: Colour = (90, 90, 90)
RED: Colour = (215, 30, 30)
BLUE: Colour = (30, 80, 220)
LINE_COLOURS = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip
VERDICT_COLOURS: dict[str, Colour] = {
    "close": (30, 130, 73),
    "related": (176, 120, 0),
    "unrelated": (160, 40, 40),
}


@dataclass(frozen=True)
class ScoreRow:
    """One row of the score table: a part (or a group of parts) and its share of each term.

    ``structural`` is already weighted (w x the part's structural contribution)."""

    name: str
    global_: float | None
    structural: float | None
    total: float
    parts: tuple[int, ...] = ()


def score_rows(e: Explanation, top: int = TABLE_ROWS) -> list[ScoreRow]:
    """Rows that add up to ``e.score``: the ``top`` query parts with the largest totals, one
    row for the other parts, and one for what the regions leave unexplained (the residual:
    float rounding when the split is exact, shown only when it is not)."""
    side, w = e.query, e.structural_weight
    order = sorted(range(len(side.total)), key=lambda r: side.total[r], reverse=True)
    named, rest = order[: max(top, 0)], order[max(top, 0) :]

    def row(name: str, parts: Sequence[int]) -> ScoreRow:
        g = None if side.global_ is None else sum(side.global_[r] for r in parts)
        structural = w * sum(side.structural[r] for r in parts)
        return ScoreRow(name, g, structural, sum(side.total[r] for r in parts), tuple(parts))

    rows = [row(part_name(r, e.grid), [r]) for r in named]
    if rest:
        rows.append(row(f"other {len(rest)} parts", rest))
    if not e.exact or abs(side.residual) > 5e-5:
        rows.append(ScoreRow("not split over parts", None, None, side.residual))
    else:  # float rounding only: folded into the last row so the rows still add up exactly
        last = rows[-1]
        rows[-1] = dataclasses.replace(last, total=last.total + side.residual)
    return rows


def part_name(region: int, grid: int) -> str:
    """``5 (row 2, col 2)``: a region's index and where it is (1-based row and column)."""
    return f"{region} (row {region // grid + 1}, col {region % grid + 1})"


def heading(e: Explanation) -> list[str]:
    """The picture's first lines: the verdict and what ranked the result, in words."""
    rule = e.ranked_by[0].upper() + e.ranked_by[1:]
    first = f"Verdict: {e.verdict}  |  {rule}" if e.verdict else rule
    if e.structural_weight == 0:
        second = (
            "Structural matching does not rank here (weight 0): its lines show which parts "
            "correspond, not why the result ranks where it does."
        )
    else:
        second = (
            f"The score adds {e.structural_weight:g} x the structural similarity (the lines) "
            "to the global similarity."
        )
    return [first, second, score_equation(e)]


def score_equation(e: Explanation) -> str:
    return (
        f"score {e.score:.4f} = global {e.global_similarity:.4f} + {e.structural_weight:g} x "
        f"structural {e.structural_similarity:.4f}    (grid {e.grid}x{e.grid}, epsilon "
        f"{e.epsilon:g})"
    )


def intersects(a: Rect, b: Rect) -> bool:
    """Whether two boxes ``(x0, y0, x1, y1)`` overlap (touching edges do not)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(
    candidates: Sequence[Sequence[tuple[float, float]]],
    sizes: Sequence[tuple[float, float]],
    bounds: Rect,
    taken: Sequence[Rect] = (),
    margin: float = 2.0,
) -> list[Rect | None]:
    """Greedy label placement: label i (in priority order) takes the first of its
    ``candidates[i]`` centres where its box of ``sizes[i]`` (width, height) lies inside
    ``bounds`` and, grown by ``margin``, overlaps neither a ``taken`` box nor a label placed
    before it; None where no candidate fits (the label is left out)."""
    placed: list[Rect] = list(taken)
    out: list[Rect | None] = []
    for centres, (w, h) in zip(candidates, sizes, strict=True):
        box: Rect | None = None
        for cx, cy in centres:
            trial = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            if trial[0] < bounds[0] or trial[1] < bounds[1]:
                continue
            if trial[2] > bounds[2] or trial[3] > bounds[3]:
                continue
            grown = (trial[0] - margin, trial[1] - margin, trial[2] + margin, trial[3] + margin)
            if any(intersects(grown, other) for other in placed):
                continue
            box = trial
            break
        out.append(box)
        if box is not None:
            placed.append(box)
    return out


def along(a: tuple[float, float], b: tuple[float, float], step: float) -> list[tuple[float, float]]:
    """Candidate label centres on the segment a-b: its middle first, then outwards, and a
    little to either side of the line at each."""
    (ax, ay), (bx, by) = a, b
    length = max(((bx - ax) ** 2 + (by - ay) ** 2) ** 0.5, 1e-9)
    nx, ny = -(by - ay) / length * step, (bx - ax) / length * step
    out = []
    for t in (0.5, 0.42, 0.58, 0.34, 0.66, 0.26, 0.74, 0.18, 0.82, 0.12, 0.88):
        px, py = ax + t * (bx - ax), ay + t * (by - ay)
        out += [(px, py), (px + nx, py + ny), (px - nx, py - ny)]
    return out


class _Writer:
    """Writes text and keeps the box of everything written (for the no-overlap checks)."""

    def __init__(self, draw: ImageDraw.ImageDraw) -> None:
        self.draw = draw
        self.boxes: list[Rect] = []

    def size(self, text: str, font: Font) -> tuple[float, float]:
        x0, y0, x1, y1 = self.draw.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    def text(self, xy: tuple[float, float], text: str, colour: Colour, font: Font) -> Rect:
        box = tuple(float(v) for v in self.draw.textbbox(xy, text, font=font))
        self.draw.text(xy, text, fill=colour, font=font)
        self.boxes.append(box)  # type: ignore[arg-type]
        return box  # type: ignore[return-value]


def render_explanation(
    query: Image.Image,
    result: Image.Image,
    explanation: Explanation,
    top: int = 5,
    heights: tuple[int, int] | None = None,
) -> Image.Image:
    """An RGB picture of ``explanation`` drawn over ``query`` (left) and ``result`` (right).

    Each grid cell is tinted by its region's share of the whole score (global + w x
    structural), on one scale for both images from 0 (clear) to the largest share (strong red;
    negative shares are blue); the ``top`` strongest part matches of the structural term are
    joined by numbered lines whose width follows their contribution. ``heights``: the heights of
    the originals the explanation's regions are measured in, when the pictures given are reduced
    copies. ``info["labels"]`` of the picture holds the box of every text it carries.
    """
    e = explanation
    body, small, big = _font(14), _font(12), _font(16)
    query_height, result_height = heights or (query.height, result.height)
    left_img, sl = _fit(query, query_height)
    right_img, sr = _fit(result, result_height)
    matches = e.matches[: max(top, 0)]
    lines = matches[:MAX_LINES]
    rows = score_rows(e)

    probe = _Writer(ImageDraw.Draw(Image.new("RGB", (1, 1))))
    head = heading(e)
    head_fonts = [big, small, body]
    head_height = round(
        sum(probe.size("Ag" + t, f)[1] + 6 for t, f in zip(head, head_fonts, strict=True))
    )
    caption_h = round(probe.size("Ag", small)[1] + 6)
    top_y = PAD + head_height + 6 + caption_h  # where the images start
    score_table = _score_table(e, rows)
    match_table = _match_table(matches)
    score_width = _table_width(probe, score_table, body)
    match_width = _table_width(probe, match_table, body)
    images_width = left_img.width + GAP + right_img.width
    text_width = max(probe.size(t, f)[0] for t, f in zip(head, head_fonts, strict=True))
    side_by_side = score_width + TABLE_GAP + match_width <= max(images_width, text_width)
    both = (score_width + TABLE_GAP + match_width, max(len(score_table), len(match_table)))
    stacked = (max(score_width, match_width), len(score_table) + len(match_table) + 1)
    tables_width, table_rows = both if side_by_side else stacked
    width = int(max(images_width, tables_width, text_width) + 2 * PAD)
    legend_y = top_y + HEIGHT + 8
    table_y = legend_y + ROW + 14
    height = int(table_y + ROW * table_rows + 4 + 2 * PAD)

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x_left = PAD
    x_right = PAD + left_img.width + GAP
    canvas.paste(left_img, (x_left, top_y))
    canvas.paste(right_img, (x_right, top_y))

    # Heat maps of each region's share of the whole score, one scale for both images.
    values = e.query.total + e.result.total
    strongest_value = max((abs(v) for v in values), default=0.0) or 1.0
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    tint = ImageDraw.Draw(overlay)
    sides = (
        (e.query_regions, e.query.total, sl, x_left),
        (e.result_regions, e.result.total, sr, x_right),
    )
    for regions, totals, s, x0 in sides:
        for box, value in zip(regions, totals, strict=True):
            colour = RED if value >= 0 else BLUE
            alpha = int(190 * min(abs(value) / strongest_value, 1.0))
            cell = _place(box, s, x0, top_y)
            tint.rectangle(cell, fill=(*colour, alpha), outline=(255, 255, 255, 110))
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    writer = _Writer(draw)

    # Heading: the verdict and the ranking rule, the meaning of the lines, the score's terms.
    y = float(PAD)
    for i, (text, font) in enumerate(zip(head, head_fonts, strict=True)):
        colour = VERDICT_COLOURS.get(e.verdict or "", INK) if i == 0 else (INK if i == 2 else MUTED)
        y = writer.text((PAD, y), text, colour, font)[3] + 6

    # Each image's caption: what its tints add up to.
    for name, side, x0, img_w in (("query", e.query, x_left, left_img.width),
                                  ("result", e.result, x_right, right_img.width)):  # fmt: skip
        caption = f"{name}: parts add up to {sum(side.total):.4f}"
        if side.global_ is None:
            caption = f"{name}: global term not split ({side.residual:+.4f} unexplained)"
        caption = _fit_text(probe, caption, small, img_w + (GAP - 8 if name == "query" else 0))
        writer.text((x0, top_y - caption_h), caption, MUTED, small)

    # Match lines (the structural term), strongest last so they lie on top.
    centres = []
    strongest = max((abs(m.contribution) for m in lines), default=0.0) or 1.0
    for rank in reversed(range(len(lines))):
        m = lines[rank]
        a = _centre(_place(e.query_regions[m.query_region], sl, x_left, top_y))
        b = _centre(_place(e.result_regions[m.result_region], sr, x_right, top_y))
        colour = LINE_COLOURS[rank % len(LINE_COLOURS)]
        thickness = max(1, round(6 * abs(m.contribution) / strongest))
        draw.line([a, b], fill=(0, 0, 0), width=thickness + 2)
        draw.line([a, b], fill=colour, width=thickness)
        for x, yy in (a, b):
            draw.ellipse((x - 4, yy - 4, x + 4, yy + 4), fill=colour, outline=(0, 0, 0))
    for m in lines:
        centres.append((
            _centre(_place(e.query_regions[m.query_region], sl, x_left, top_y)),
            _centre(_place(e.result_regions[m.result_region], sr, x_right, top_y)),
        ))  # fmt: skip

    # Labels over the images: tags on the query parts the score table names, then the lines'
    # numbers, placed so that no two overlap (a number with no free place is left out).
    bounds: Rect = (x_left, top_y, x_right + right_img.width, top_y + HEIGHT)
    named = [row.parts[0] for row in rows if len(row.parts) == 1]
    tag_texts = [str(r) for r in named]
    tag_sizes = [_label_size(probe, t, small) for t in tag_texts]
    tag_spots = []
    for r, (w, h) in zip(named, tag_sizes, strict=True):
        cell = _place(e.query_regions[r], sl, x_left, top_y)
        tag_spots.append([(cell[0] + w / 2 + 2, cell[1] + h / 2 + 2)])
    number_texts = [str(rank + 1) for rank in range(len(lines))]
    number_sizes = [_label_size(probe, t, small) for t in number_texts]
    number_spots = [
        along(a, b, step=h + 2) for (a, b), (_, h) in zip(centres, number_sizes, strict=True)
    ]
    placed = place_labels(tag_spots + number_spots, tag_sizes + number_sizes, bounds)
    for i, spot in enumerate(placed):
        if spot is None:
            continue
        is_tag = i < len(tag_texts)
        text = tag_texts[i] if is_tag else number_texts[i - len(tag_texts)]
        fill = (255, 255, 255) if is_tag else LINE_COLOURS[(i - len(tag_texts)) % len(LINE_COLOURS)]
        draw.rectangle(spot, fill=fill, outline=(0, 0, 0))
        draw.text(_centre(spot), text, fill=(0, 0, 0), font=small, anchor="mm")
        writer.boxes.append(spot)

    # Legend: the tint scale.
    x = float(PAD)
    x = writer.text((x, legend_y), "tint: each part's share of the score,", MUTED, small)[2] + 6
    for k in range(60):
        draw.line([(x + k, legend_y + 2), (x + k, legend_y + 12)], fill=_blend(RED, k / 59))
    draw.rectangle((x, legend_y + 2, x + 60, legend_y + 12), outline=MUTED)
    x = writer.text((x + 66, legend_y), f"0 to {strongest_value:+.4f}", MUTED, small)[2] + 10
    if min(values, default=0.0) < 0:
        swatch = (x, legend_y + 2, x + 14, legend_y + 12)
        draw.rectangle(swatch, fill=_blend(BLUE, 0.8), outline=MUTED)
        x = writer.text((x + 20, legend_y), "negative", MUTED, small)[2] + 10
    writer.text((x, legend_y), "lines: strongest part matches (numbered as below)", MUTED, small)

    # Tables: where the score comes from (rows add up to the score), then the strongest matches.
    y = _draw_table(writer, draw, score_table, PAD, table_y, body)
    if side_by_side:
        _draw_table(writer, draw, match_table, PAD + score_width + TABLE_GAP, table_y, body)
    else:
        _draw_table(writer, draw, match_table, PAD, y + ROW, body)
    canvas.info["labels"] = writer.boxes
    canvas.info["score_rows"] = rows
    return canvas


# ---- tables ------------------------------------------------------------------------------

Table = list[tuple[tuple[str, ...], Colour, bool]]  # cells, colour, rule above the row


def _score_table(e: Explanation, rows: list[ScoreRow]) -> Table:
    w = e.structural_weight
    head: tuple[str, ...] = ("where the score comes from: query part", "global")
    head += (f"+ {w:g} x structural", "= total")
    table: Table = [(head, MUTED, False)]

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:+.4f}"

    for row in rows:
        table.append(
            ((row.name, num(row.global_), num(row.structural), num(row.total)), INK, False)
        )
    g = e.global_similarity if e.exact else None
    total = ("score", num(g), num(w * e.structural_similarity), f"{e.score:+.4f}")
    table.append((total, INK, True))
    return table


def _match_table(matches: Sequence[object]) -> Table:
    head = ("#", "query part", "result part", "flow", "similarity", "contribution")
    table: Table = [(head, MUTED, False)]
    for rank, m in enumerate(matches):
        cells = (
            str(rank + 1), str(m.query_region), str(m.result_region), f"{m.flow:.4f}",  # type: ignore[attr-defined]
            f"{m.similarity:+.4f}", f"{m.contribution:+.5f}",  # type: ignore[attr-defined]
        )  # fmt: skip
        colour = LINE_COLOURS[rank % len(LINE_COLOURS)] if rank < MAX_LINES else INK
        table.append((cells, _darker(colour), False))
    return table


def _columns(writer: _Writer, table: Table, font: Font) -> list[float]:
    count = len(table[0][0])
    widths = [max(writer.size(cells[c], font)[0] for cells, _, _ in table) for c in range(count)]
    xs, x = [], 0.0
    for w in widths:
        xs.append(x)
        x += w + 18
    return xs


def _table_width(writer: _Writer, table: Table, font: Font) -> float:
    xs = _columns(writer, table, font)
    return xs[-1] + max(writer.size(cells[-1], font)[0] for cells, _, _ in table)


def _draw_table(
    writer: _Writer, draw: ImageDraw.ImageDraw, table: Table, x0: float, y: float, font: Font
) -> float:
    """Draws ``table`` from ``y``; returns the y below it. Numbers are right-aligned."""
    xs = _columns(writer, table, font)
    widths = [max(writer.size(cells[c], font)[0] for cells, _, _ in table) for c in range(len(xs))]
    for cells, colour, rule in table:
        if rule:
            y += 4
            draw.line([(x0, y), (x0 + xs[-1] + widths[-1], y)], fill=MUTED)
        for c, text in enumerate(cells):
            if not text:
                continue
            x = x0 + xs[c]
            if c > 0 and (text[0] in "+-" or text[0].isdigit()):
                x += widths[c] - writer.size(text, font)[0]
            writer.text((x, y + 2), text, colour, font)
        y += ROW
    return y


# ---- helpers -----------------------------------------------------------------------------


def _label_size(writer: _Writer, text: str, font: Font) -> tuple[float, float]:
    w, h = writer.size(text, font)
    return w + 8, h + 6


def _fit_text(writer: _Writer, text: str, font: Font, width: float) -> str:
    while text and writer.size(text, font)[0] > width:
        text = text[:-2] + "…"
    return text


def _blend(colour: Colour, t: float) -> Colour:
    a = 190 / 255 * t
    return tuple(round(255 * (1 - a) + c * a) for c in colour)  # type: ignore[return-value]


def _darker(colour: Colour) -> Colour:
    return tuple(int(c * 0.7) for c in colour)  # type: ignore[return-value]


def _fit(image: Image.Image, original_height: int) -> tuple[Image.Image, float]:
    """``image`` scaled to ``HEIGHT`` pixels high, and the scale from original pixels to it."""
    size = (max(1, round(image.width * HEIGHT / image.height)), HEIGHT)
    return image.convert("RGB").resize(size, Image.Resampling.BILINEAR), HEIGHT / original_height


def _place(box: Box, scale: float, x0: float, y0: float) -> Rect:
    return (x0 + box[0] * scale, y0 + box[1] * scale, x0 + box[2] * scale, y0 + box[3] * scale)


def _centre(box: Rect) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()
