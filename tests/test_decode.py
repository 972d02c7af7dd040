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
    colour = np.array([120, 60, 30])
    luma = 0.299 * 120 + 0.587 * 60 + 0.114 * 30  # ITU-R 601, what Pillow stores for L, I, F: 74.5
    img = Image.new("RGB", (10, 6), tuple(colour)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    raw = _png_bytes(img, fmt)
    arr = load_image(raw, (4, 5))
    assert arr.shape == (4, 5, 3) and arr.dtype == np.uint8
    pixels = arr.reshape(-1, 3).astype(float)
    if mode in ("RGB", "RGBA", "CMYK"):  # colour kept (opaque alpha: nothing to composite)
        assert np.abs(pixels - colour).max() <= 1
    elif mode == "P":  # a palette approximates the colour, dithered: close per pixel, closer on average
        assert np.abs(pixels - colour).max() <= 15 and np.abs(pixels.mean(axis=0) - colour).max() <= 5
    else:  # single channel: grey, R = G = B
        assert (pixels == pixels[:, :1]).all()
        if mode in ("L", "LA", "I", "F"):
            assert np.abs(pixels - luma).max() <= 1
        elif mode == "I;16":  # 75 of 65535 is a 16-bit near-black: scaled to 8 bits, not read as 75
            assert np.abs(pixels - luma * 255 / 65535).max() <= 1
        else:  # "1" binarises (dithered): each pixel black or white, their mix about the luma
            full = load_image(raw)
            np.testing.assert_array_equal(full, np.repeat(np.asarray(img, np.uint8)[:, :, None] * 255, 3, axis=2))
            assert 0 < (full == 255).mean() < 1 and abs(pixels.mean() - luma) <= 10


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
    red, green, blue = (200, 30, 30), (30, 200, 30), (30, 30, 200)
    wide = np.empty((20, 40, 3), np.uint8)  # 40 wide x 20 high: red | green (middle half) | blue
    wide[:, :10], wide[:, 10:30], wide[:, 30:] = red, green, blue
    raw = _png_bytes(Image.fromarray(wide))
    stretch = load_image(raw, (10, 10), resize_mode="stretch").astype(int)
    pad = load_image(raw, (10, 10), resize_mode="pad").astype(int)
    crop = load_image(raw, (10, 10), resize_mode="crop").astype(int)
    assert stretch.shape == pad.shape == crop.shape == (10, 10, 3)
    # stretch: the whole image squeezed into the square, the side quarters kept at the edges.
    assert (stretch == stretch[:1]).all()  # every row alike: nothing cut, no bands
    assert np.abs(stretch[:, :2] - red).max() <= 2 and np.abs(stretch[:, -2:] - blue).max() <= 2
    assert np.abs(stretch[:, 3:7] - green).max() <= 2
    # crop: keeps the aspect ratio and the centre (the green middle half), drops the side quarters.
    assert np.abs(crop[:, 1:-1] - green).max() <= 2
    assert (crop[..., 1] > 150).all() and (crop[..., [0, 2]] < 80).all()  # edges: at most a blur of their neighbours
    # pad: keeps the aspect ratio and the whole image (10 x 5), letterboxed by black bands top and bottom.
    content = np.flatnonzero(pad.reshape(10, -1).any(axis=1))
    assert len(content) == 5 and content[0] in (2, 3) and np.array_equal(content, np.arange(content[0], content[0] + 5))
    assert (pad[: content[0]] == 0).all() and (pad[content[-1] + 1 :] == 0).all()
    assert np.abs(pad[content] - stretch[:5]).max() <= 2  # the band is the stretched image, half as high


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
