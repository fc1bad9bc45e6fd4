from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.config import Preprocessing
from model.decoding import load_image, to_rgb
from model.image_limits import ImageLoadError
from model.preprocessing import geometry_of, preprocess
from tests.hostile import dds_header, png_header


def _png(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def _reference() -> Image.Image:
    """A 60 x 40 picture that no flip or rotation maps onto itself."""
    array = np.zeros((40, 60, 3), dtype=np.uint8)
    array[:10, :20] = (255, 0, 0)  # red block top-left
    array[30:, 45:] = (0, 0, 255)  # blue block bottom-right
    array[:, 30] = (0, 255, 0)  # green vertical line
    return Image.fromarray(array)


# What each EXIF orientation says about how the stored pixels must be turned to be upright,
# written from the EXIF specification, applied in reverse to make the stored picture.
STORED_AS = {
    1: lambda im: im,
    2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    3: lambda im: im.rotate(180),
    4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
    6: lambda im: im.rotate(90, expand=True),  # camera turned: display needs 90° clockwise
    7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
    8: lambda im: im.rotate(-90, expand=True),  # display needs 90° counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_exif_orientation_is_applied(orientation: int) -> None:
    upright = _reference()
    stored = STORED_AS[orientation](upright)
    exif = Image.Exif()
    exif[0x0112] = orientation
    loaded = load_image(_png(stored, exif=exif.tobytes()))
    assert loaded.size == upright.size
    assert np.array_equal(np.asarray(loaded), np.asarray(upright))


def _modes() -> dict[str, Image.Image]:
    rgb = _reference()
    return {
        "L": rgb.convert("L"),
        "1": rgb.convert("1"),
        "P": rgb.convert("P"),
        "RGBA": rgb.convert("RGBA"),
        "LA": rgb.convert("LA"),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "I;16": Image.fromarray(np.full((40, 60), 65535, dtype=np.uint16)),
        "I": Image.fromarray(np.full((40, 60), 65535, dtype=np.int32)),
        "F": Image.fromarray(np.linspace(0, 1, 2400, dtype=np.float32).reshape(40, 60)),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_mode_becomes_rgb(mode: str) -> None:
    image = _modes()[mode]
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.size == (60, 40)


def test_sixteen_bit_white_stays_white_and_float_keeps_its_range() -> None:
    modes = _modes()
    assert np.asarray(to_rgb(modes["I;16"])).min() == 255
    assert np.asarray(to_rgb(modes["I"])).min() == 255
    ramp = np.asarray(to_rgb(modes["F"]))[..., 0]
    assert ramp.min() == 0
    assert ramp.max() == 255


def test_transparency_is_composited_on_white() -> None:
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).min() == 255
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    assert np.asarray(load_image(_png(palette))).min() == 255


def test_gif_first_frame_is_used() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    image = load_image(buffer.getvalue())
    assert image.getpixel((5, 5))[0] > 200  # red: the first frame


def test_bad_inputs_raise_image_load_error_naming_the_input(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageLoadError, match=r"notes\.txt: not a readable image"):
        load_image(text)
    with pytest.raises(ImageLoadError, match=r"missing\.jpg: no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageLoadError, match="is a folder"):
        load_image(tmp_path)
    jpeg = io.BytesIO()
    _reference().save(jpeg, "JPEG")
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])


def test_too_many_pixels_are_refused_before_decoding() -> None:
    big = _png(Image.new("L", (2000, 2000)))
    with pytest.raises(ImageLoadError, match="over the limit") as e:
        load_image(big, max_pixels=1_000_000)
    assert e.value.kind == "too_many_pixels"


def test_formats_outside_the_allow_list_are_refused() -> None:
    buffer = io.BytesIO()
    _reference().save(buffer, "PPM")
    # Pillow is not even asked to decode it as PPM: only the accepted formats are tried.
    with pytest.raises(ImageLoadError, match="not a readable image; use JPEG, PNG") as e:
        load_image(buffer.getvalue(), formats={"JPEG", "PNG"})
    assert e.value.kind == "not_image"
    assert load_image(_png(_reference()), formats={"PNG"}).size == (60, 40)


@pytest.mark.parametrize("size", [(512, 300), (300, 512), (256, 256), (1000, 230)])
def test_geometry_maps_each_cell_back_to_its_pixels(size: tuple[int, int]) -> None:
    """Paint one grid cell's box in the original image; the model's crop sees it in that cell."""
    spec = Preprocessing()
    grid = 4
    width, height = size
    _, geometry = preprocess(Image.new("RGB", size), spec)
    target = 6  # row 1, column 2
    x0, y0, x1, y1 = geometry.cell_boxes(grid)[target]
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[round(y0) : round(y1), round(x0) : round(x1)] = 255
    pixels, _ = preprocess(Image.fromarray(array), spec)
    std, mean = np.asarray(spec.std), np.asarray(spec.mean)
    red = pixels[0].numpy() * std[0] + mean[0]  # back to [0, 1]
    step = spec.crop // grid
    cells = red.reshape(grid, step, grid, step).mean(axis=(1, 3)).flatten()
    assert cells[target] > 0.9
    assert np.delete(cells, target).max() < 0.1


def test_geometry_of_agrees_with_preprocess() -> None:
    spec = Preprocessing()
    for size in [(512, 300), (300, 512), (1000, 230), (224, 224)]:
        assert geometry_of(*size, spec) == preprocess(Image.new("RGB", size), spec)[1]


def test_preprocess_shape_and_normalisation() -> None:
    spec = Preprocessing()
    pixels, geometry = preprocess(Image.new("RGB", (640, 480), (124, 116, 104)), spec)
    assert pixels.shape == (3, 224, 224)
    assert float(pixels.abs().max()) < 0.01  # the ImageNet mean colour normalises to ~0
    assert geometry.size == pytest.approx(224 * 480 / 256)
    assert geometry.left == pytest.approx((640 - geometry.size) / 2, abs=1.5)


@pytest.mark.parametrize("formats", [None, {"PNG", "JPEG"}])
def test_a_header_past_pillows_own_bomb_limit_is_too_many_pixels(formats: set | None) -> None:
    # 40000 x 40000 is past twice Pillow's MAX_IMAGE_PIXELS: Image.open itself refuses it.
    with pytest.raises(ImageLoadError) as info:
        load_image(png_header(40_000, 40_000), formats=formats)
    assert info.value.kind == "too_many_pixels"
    assert "downscale" in str(info.value)


def test_only_the_accepted_formats_decoders_see_the_bytes() -> None:
    dds = dds_header()  # Pillow has a DDS plugin; it must not be tried
    with pytest.raises(ImageLoadError) as info:
        load_image(dds, formats={"PNG", "JPEG"})
    assert info.value.kind == "not_image"
    # With every format allowed, whatever Pillow's plugin raises is still an ImageLoadError.
    with pytest.raises(ImageLoadError):
        load_image(dds)
