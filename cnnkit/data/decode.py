"""Decode stage: the ONE function that opens an image, for training, evaluation, prediction and serving.

``load_image`` reads a file (or bytes), applies the EXIF orientation, converts any mode to RGB or
grayscale (alpha composited on white, 16-bit scaled to 8-bit, CMYK converted), and resizes to the
requested ``image_size`` with the documented policy:

* ``stretch``: resize to exactly (height, width), ignoring aspect ratio (what Keras does);
* ``pad``: keep the aspect ratio, fit inside, pad with black (letterbox);
* ``crop``: keep the aspect ratio, fill, centre-crop.

Every way a file can be unusable (empty, unreadable, not an image, truncated or corrupt, too many
pixels) raises ``DecodeError`` whose ``reason`` is a short phrase a user can act on; callers skip
the file and list it, they never crash.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cnnkit.config import DEFAULT_MAX_PIXELS
from cnnkit.errors import DataError

# Bumped whenever decoding changes its output, so stale caches are never reused.
DECODER_VERSION = 2  # 2: JPEG draft down to the target size (was twice it)

try:  # libjpeg-turbo without Pillow's per-image overhead: ~7x faster on small JPEGs, same pixels
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - optional speed-up; Pillow decodes everything too
    _simplejpeg = None

_JPEG_MAGIC = b"\xff\xd8\xff"

# JPEGs at least twice the target are decoded by libjpeg at 1/2, 1/4 or 1/8 scale (Pillow's draft
# mode: the scaled IDCT averages each block, a proper area reduction), never below the target
# size; the final resize then anti-aliases the rest. A 3000x4000 photo for 224x224 decodes at 1/8.
_DRAFT_MARGIN = 1


class DecodeError(DataError):
    """One image cannot be used; ``reason`` says why in a few words."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"Cannot use image '{source}': {reason}.")
        self.source = source
        self.reason = reason


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except PermissionError as exc:
        raise DecodeError(str(path), "permission denied (cannot read the file)") from exc
    except IsADirectoryError as exc:
        raise DecodeError(str(path), "is a folder, not an image file") from exc
    except FileNotFoundError as exc:
        raise DecodeError(str(path), "file not found") from exc
    except OSError as exc:
        raise DecodeError(str(path), f"cannot read the file ({exc.strerror})") from exc


def _open(data: bytes, source: str, max_pixels: int) -> Image.Image:
    if not data:
        raise DecodeError(source, "empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise DecodeError(source, f"too many pixels, possible decompression bomb ({exc})") from exc
        except Exception as exc:  # Pillow raises many types for non-images
            kind = _sniff_format(data)
            reason = (f"corrupt or truncated {kind} file (its header cannot be read)" if kind
                      else "not an image, or a format Pillow cannot read")
            raise DecodeError(source, reason) from exc
    width, height = img.size
    if width * height > max_pixels:
        raise DecodeError(
            source,
            f"too many pixels ({width}x{height} = {width * height:,} > max_pixels={max_pixels:,}), "
            "possible decompression bomb",
        )
    if width < 1 or height < 1:
        raise DecodeError(source, f"image has no pixels ({width}x{height})")
    return img


_MAGIC = ((b"\xff\xd8", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def _sniff_format(data: bytes) -> str | None:
    """The image format a file's first bytes announce, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float grayscale (I;16, I, F) -> L, scaled to 0-255."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return Image.fromarray(arr)
    arr = arr.astype(np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    if img.mode == "F" and arr.max(initial=0) <= 1.0:
        top = 1.0
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def _to_mode(img: Image.Image, color_mode: str) -> Image.Image:
    """Any Pillow mode -> "RGB" or "L"; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    target = "RGB" if color_mode == "rgb" else "L"
    if img.mode != target:
        img = img.convert(target)
    return img


def _resize(img: Image.Image, image_size: tuple[int, int], resize_mode: str) -> Image.Image:
    height, width = image_size
    if img.size == (width, height):
        return img
    resample = Image.Resampling.BILINEAR
    if resize_mode == "pad":
        return ImageOps.pad(img, (width, height), method=resample, color=0)
    if resize_mode == "crop":
        return ImageOps.fit(img, (width, height), method=resample)
    return img.resize((width, height), resample)


def _decode_jpeg_fast(data: bytes, image_size: tuple[int, int] | None, max_pixels: int) -> np.ndarray | None:
    """A small baseline JPEG decoded by simplejpeg; None means "take the Pillow path".

    simplejpeg gives exactly Pillow's pixels (both run libjpeg-turbo with the accurate DCT and
    fancy upsampling), so it is used only where the Pillow path would do nothing more: no EXIF
    block (orientation), YCbCr or grayscale data, no reduced-scale (draft) decode, within the pixel
    limit. Anything else, corrupt files included, goes to Pillow, which names the reason.
    """
    if _simplejpeg is None or not data.startswith(_JPEG_MAGIC) or b"Exif\x00\x00" in data[:65536]:
        return None
    try:
        height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
        if (colorspace not in ("YCbCr", "Gray") or height * width > max_pixels
                or (image_size is not None and max(height, width) >= 2 * _DRAFT_MARGIN * max(image_size))):
            return None
        return _simplejpeg.decode_jpeg(data, colorspace="GRAY" if colorspace == "Gray" else "RGB", fastdct=False,
                                       fastupsample=False)
    except (ValueError, RuntimeError):
        return None


def load_image(
    source: str | Path | bytes,
    image_size: tuple[int, int] | None = None,
    color_mode: str = "rgb",
    resize_mode: str = "stretch",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> np.ndarray:
    """Open one image as uint8 pixels, exactly as cnnkit trains and serves on them.

    Args:
        source: a path, or the encoded bytes of a JPEG/PNG/... file.
        image_size: (height, width) to resize to; ``None`` keeps the image's own size.
        color_mode: "rgb" -> (H, W, 3) or "grayscale" -> (H, W, 1).
        resize_mode: "stretch", "pad" or "crop" (see the module docstring).
        max_pixels: larger images are refused as possible decompression bombs.
        name: what to call the image in errors (defaults to the path, or "<bytes>").

    Returns:
        A uint8 array (height, width, channels), values 0-255.

    Raises:
        DecodeError: the image cannot be used; ``.reason`` says why.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, label = bytes(source), name or "<bytes>"
    else:
        data, label = _read_bytes(Path(source)), name or str(source)
    fast = _decode_jpeg_fast(data, image_size, max_pixels)
    if fast is not None and fast.shape[2] == (3 if color_mode == "rgb" else 1) and (
            image_size is None or fast.shape[:2] == tuple(image_size)):
        return fast  # already what the Pillow path would return: no conversion, no resize
    img = None if fast is None else (Image.fromarray(fast[:, :, 0], "L") if fast.shape[2] == 1 else Image.fromarray(fast))
    try:
        if img is None:
            img = _open(data, label, max_pixels)
            if image_size is not None and img.format == "JPEG":
                side = _DRAFT_MARGIN * max(image_size)  # square request: EXIF may rotate the image
                img.draft(img.mode if img.mode in ("RGB", "L") else None, (side, side))
            img.load()
            img = ImageOps.exif_transpose(img)
        img = _to_mode(img, color_mode)
        if image_size is not None:
            img = _resize(img, image_size, resize_mode)
        arr = np.asarray(img, dtype=np.uint8)
    except DecodeError:
        raise
    except Exception as exc:  # truncated data, bad CRC, broken EXIF...: Pillow raises many types
        message = str(exc) or type(exc).__name__
        reason = "truncated file" if "truncated" in message.lower() else f"corrupt image data ({message})"
        raise DecodeError(label, reason) from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def describe_image(path: str | Path) -> tuple[tuple[int, int], str, str]:
    """(width, height), Pillow mode and format of an image, reading only its header."""
    with Image.open(path) as img:
        return img.size, img.mode, img.format or "?"
