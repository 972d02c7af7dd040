import io
import os

import numpy as np
import pytest
from PIL import Image

from cnnkit.data.decode import DecodeError, load_image
from tests.conftest import add_bad_files


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "RGB", "I", "F"])
def test_every_mode_becomes_rgb_uint8(mode):
    img = Image.new("RGB", (10, 6), (120, 60, 30)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    arr = load_image(_png_bytes(img, fmt), (4, 5))
    assert arr.shape == (4, 5, 3) and arr.dtype == np.uint8


def test_grayscale_mode_gives_one_channel():
    arr = load_image(_png_bytes(Image.new("RGB", (8, 8), (255, 0, 0))), (8, 8), color_mode="grayscale")
    assert arr.shape == (8, 8, 1)
    assert 70 <= arr[0, 0, 0] <= 80  # ITU-R 601 luma of pure red is 76


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert (load_image(_png_bytes(transparent)) == 255).all()
    half = Image.new("LA", (4, 4), (0, 128))
    assert 125 <= load_image(_png_bytes(half))[0, 0, 0] <= 129


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    raw = _png_bytes(img, transparency=0)
    assert (load_image(raw) == 255).all()


def test_sixteen_bit_is_scaled_not_clipped():
    arr16 = np.full((4, 4), 32768, dtype=np.uint16)
    raw = _png_bytes(Image.fromarray(arr16))
    value = load_image(raw)[0, 0, 0]
    assert 126 <= value <= 129  # half of full scale, not 255 (clipped) nor 0 (truncated)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    arr = load_image(_png_bytes(img, "JPEG", exif=exif, quality=95))
    assert arr.shape == (40, 20, 3)  # portrait after applying EXIF
    assert arr[5, 10].mean() > 200 and arr[35, 10].mean() < 50  # white on top


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"])
def test_formats(fmt):
    arr = load_image(_png_bytes(Image.new("RGB", (20, 10), (10, 200, 10)), fmt), (8, 8))
    assert arr.shape == (8, 8, 3)
    assert arr[4, 4, 1] > 150


def test_resize_modes():
    wide = Image.new("RGB", (40, 20), (255, 255, 255))
    stretch = load_image(_png_bytes(wide), (10, 10), resize_mode="stretch")
    pad = load_image(_png_bytes(wide), (10, 10), resize_mode="pad")
    crop = load_image(_png_bytes(wide), (10, 10), resize_mode="crop")
    assert (stretch == 255).all() and (crop == 255).all()
    assert (pad[0] == 0).all() and (pad[5] == 255).all()  # letterbox bars top and bottom


def test_big_jpeg_draft_decode_matches_full_decode_closely():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((100, 100, 1))).astype(np.uint8)
    raw = _png_bytes(Image.fromarray(smooth), "JPEG", quality=90)
    fast = load_image(raw, (30, 40)).astype(int)
    reference = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB").resize((40, 30), Image.BILINEAR)).astype(int)
    assert np.abs(fast - reference).mean() < 3


def test_bad_files_raise_decode_error_with_reason(tmp_path):
    expected = add_bad_files(tmp_path)
    for name, fragment in expected.items():
        if fragment in ("hidden file", "not an image extension"):
            continue
        with pytest.raises(DecodeError) as info:
            load_image(tmp_path / name, (8, 8), max_pixels=20_000_000)
        assert fragment in info.value.reason, (name, info.value.reason)
        assert name in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without permission")
def test_unreadable_permissions(tmp_path):
    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    with pytest.raises(DecodeError, match="permission denied"):
        load_image(path)


def test_folder_named_like_an_image(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(DecodeError, match="folder"):
        load_image(tmp_path / "dir.jpg")


@pytest.mark.parametrize("image_size, color_mode", [((16, 16), "rgb"), ((12, 20), "grayscale"), (None, "rgb")])
def test_fast_jpeg_path_gives_exactly_the_pillow_pixels(monkeypatch, image_size, color_mode):
    import cnnkit.data.decode as decode

    rng = np.random.default_rng(1)
    samples = [_png_bytes(Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)), "JPEG", quality=q)
               for q in (50, 75, 95)]
    samples.append(_png_bytes(Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)), "JPEG"))  # grayscale
    samples.append(_png_bytes(Image.new("CMYK", (20, 20), (10, 200, 30, 5)), "JPEG"))  # CMYK: Pillow path
    assert decode._simplejpeg is not None
    fast = [load_image(s, image_size, color_mode) for s in samples]
    monkeypatch.setattr(decode, "_simplejpeg", None)
    slow = [load_image(s, image_size, color_mode) for s in samples]
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_fast_jpeg_path_leaves_exif_and_bad_files_to_pillow(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    assert load_image(_png_bytes(img, "JPEG", exif=exif), None).shape == (40, 20, 3)  # rotated by EXIF
    raw = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(DecodeError, match="truncated"):
        load_image(raw[: len(raw) // 2], (8, 8))
    with pytest.raises(DecodeError, match="decompression bomb"):
        load_image(raw, (8, 8), max_pixels=1000)
