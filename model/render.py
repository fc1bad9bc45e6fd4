"""Draw an explanation: both images side by side, contribution heatmaps, lines between matches."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from model.explain import Box, Explanation

HEIGHT = 320
GAP = 48
HEADER = 44
ROW = 18
PAD = 12
LINE_COLOURS = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip


def render_explanation(
    query: Image.Image,
    result: Image.Image,
    explanation: Explanation,
    top: int = 5,
    heights: tuple[int, int] | None = None,
) -> Image.Image:
    """An RGB picture of ``explanation`` drawn over ``query`` (left) and ``result`` (right).

    Each grid cell is tinted by its part's contribution to the structural similarity, on one
    scale for both images running from the smallest contribution (clear) to the largest (strong
    red; negative contributions are blue); the ``top`` strongest matches are joined by numbered
    lines whose width follows their contribution. ``heights``: the heights of the originals the
    explanation's regions are measured in, when the pictures given are reduced copies.
    """
    font = _font(14)
    query_height, result_height = heights or (query.height, result.height)
    left_img, sl = _fit(query, query_height)
    right_img, sr = _fit(result, result_height)
    matches = explanation.matches[:top]
    width = left_img.width + GAP + right_img.width + 2 * PAD
    height = HEADER + HEIGHT + PAD + ROW * (len(matches) + 1) + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x_right = PAD + left_img.width + GAP
    canvas.paste(left_img, (PAD, HEADER))
    canvas.paste(right_img, (x_right, HEADER))

    values = explanation.query_contributions + explanation.result_contributions
    low, high = min(values), max(values)
    floor = max(low, 0.0)  # positive tints run from the smallest positive value up
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    sides = (
        (explanation.query_regions, explanation.query_contributions, sl, PAD),
        (explanation.result_regions, explanation.result_contributions, sr, x_right),
    )
    for regions, contributions, s, x0 in sides:
        for box, value in zip(regions, contributions, strict=True):
            cell = _place(box, s, x0)
            if value >= 0:
                colour, strength = (220, 30, 30), (value - floor) / ((high - floor) or 1.0)
            else:
                colour, strength = (30, 80, 220), value / low
            alpha = int(170 * min(max(strength, 0.0), 1.0))
            draw.rectangle(cell, fill=(*colour, alpha), outline=(255, 255, 255, 90))
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")

    draw_rgb = ImageDraw.Draw(canvas)
    strongest = max((abs(m.contribution) for m in matches), default=0.0) or 1.0
    for rank, m in enumerate(matches):
        colour = LINE_COLOURS[rank % len(LINE_COLOURS)]
        a = _centre(_place(explanation.query_regions[m.query_region], sl, PAD))
        b = _centre(_place(explanation.result_regions[m.result_region], sr, x_right))
        draw_rgb.line([a, b], fill=colour, width=max(1, round(6 * abs(m.contribution) / strongest)))
        for x, y in (a, b):
            draw_rgb.ellipse((x - 9, y - 9, x + 9, y + 9), fill=colour, outline=(0, 0, 0))
            draw_rgb.text((x, y), str(rank + 1), fill=(0, 0, 0), font=_font(11), anchor="mm")

    e = explanation
    header = (
        f"score {e.score:.4f} = global {e.global_similarity:.4f} + {e.structural_weight:g} x "
        f"structural {e.structural_similarity:.4f}    "
        f"(grid {e.grid}x{e.grid}, epsilon {e.epsilon:g})"
    )
    draw_rgb.text((PAD, PAD), header, fill=(0, 0, 0), font=font)
    tint = f"tint: part contribution, {low:+.4f} (clear) to {high:+.4f} (red)"
    draw_rgb.text((PAD, HEADER - ROW), "query      " + tint, fill=(80, 80, 80), font=font)
    draw_rgb.text((x_right, HEADER - ROW), "result", fill=(80, 80, 80), font=font)
    y = HEADER + HEIGHT + PAD
    columns = ("#", "query part", "result part", "flow", "similarity", "contribution")
    _row(draw_rgb, y, columns, (80, 80, 80), font)
    for rank, m in enumerate(matches):
        y += ROW
        cells = (
            str(rank + 1), str(m.query_region), str(m.result_region), f"{m.flow:.4f}",
            f"{m.similarity:+.4f}", f"{m.contribution:+.5f}",
        )  # fmt: skip
        _row(draw_rgb, y, cells, LINE_COLOURS[rank % len(LINE_COLOURS)], font)
    return canvas


def _row(
    draw: ImageDraw.ImageDraw,
    y: int,
    cells: tuple[str, ...],
    colour: tuple[int, int, int],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    for x, text in zip((0, 30, 130, 240, 320, 420), cells, strict=True):
        draw.text((PAD + x, y), text, fill=colour, font=font)


def _fit(image: Image.Image, original_height: int) -> tuple[Image.Image, float]:
    """``image`` scaled to ``HEIGHT`` pixels high, and the scale from original pixels to it."""
    size = (max(1, round(image.width * HEIGHT / image.height)), HEIGHT)
    return image.convert("RGB").resize(size, Image.Resampling.BILINEAR), HEIGHT / original_height


def _place(box: Box, scale: float, x0: int) -> tuple[float, float, float, float]:
    return (
        x0 + box[0] * scale,
        HEADER + box[1] * scale,
        x0 + box[2] * scale,
        HEADER + box[3] * scale,
    )


def _centre(box: tuple[float, float, float, float]) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()
