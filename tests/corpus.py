"""A generated corpus of every kind of bad (and oddly good) input a user's folder holds; nothing binary is committed.

``write_corpus(root)`` writes ``root/<class>/...`` for the classes ``cat`` and ``dog`` (enough good
images to train on) plus every awkward file, and returns what cnnkit must make of each one: an
``Expect`` per path (relative to ``root``), either a usable image of its class or a skipped file
whose reason contains a given phrase.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BASE = np.zeros((12, 16, 3), np.uint8)  # an asymmetric picture: every EXIF orientation maps it differently
BASE[:6, :8] = (250, 10, 10)
BASE[:6, 8:] = (10, 250, 10)
BASE[6:, :4] = (10, 10, 250)
BASE[6:, 4:] = (240, 240, 20)
# How a camera stores the upright picture under EXIF orientation k: the inverse of the transform
# that displaying it applies (ImageOps.exif_transpose: 6 -> ROTATE_270, 8 -> ROTATE_90, the rest
# their own inverse).
_STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


@dataclass(frozen=True)
class Expect:
    """What cnnkit must make of one corpus entry.

    Attributes:
        usable: decodes to an image (counted in its class folder's class).
        reason: for an unusable entry, a phrase its skip reason (or error) contains.
        pixels: for the EXIF entries, the exact upright picture it must decode to (before resizing).
        in_scan: the scan lists it at all (False for an entry inside a folder that is not followed).
    """

    usable: bool
    reason: str = ""
    pixels: np.ndarray | None = None
    in_scan: bool = True


def _noisy(rng: np.random.Generator, colour: tuple[int, int, int], size: int = 24) -> Image.Image:
    base = np.array(colour, np.int16)[None, None]
    return Image.fromarray(np.clip(base + rng.integers(-30, 31, (size, size, 3)), 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def exif_oriented(orientation: int) -> bytes:
    """A PNG holding BASE as a camera would store it under EXIF ``orientation`` (1-8)."""
    img = Image.fromarray(BASE)
    if _STORED[orientation] is not None:
        img = img.transpose(_STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(img, "PNG", exif=exif)


def write_corpus(root: Path, per_class: int = 12, seed: int = 0) -> dict[str, Expect]:
    """Write the corpus under ``root`` and return ``{relative path: Expect}`` for every entry."""
    rng = np.random.default_rng(seed)
    expect: dict[str, Expect] = {}
    colours = {"cat": (200, 60, 40), "dog": (40, 80, 200)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _noisy(rng, colour).save(root / name / f"{name}_{i:02d}.png")
            expect[f"{name}/{name}_{i:02d}.png"] = Expect(True)
    cat, dog = root / "cat", root / "dog"
    good_jpeg = _encode(_noisy(rng, colours["cat"], 64), "JPEG", quality=90)
    good_png = _encode(_noisy(rng, colours["cat"], 64), "PNG")

    def put(rel: str, data: bytes, outcome: Expect) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        expect[rel] = outcome

    put("cat/empty.jpg", b"", Expect(False, "empty file"))
    for cut in (2, 100, len(good_jpeg) // 2, len(good_jpeg) - 10):
        put(f"cat/truncated_{cut}.jpg", good_jpeg[:cut], Expect(False, "truncat" if cut > 100 else "corrupt"))
    for cut in (8, 40, len(good_png) // 2):
        put(f"cat/truncated_{cut}.png", good_png[:cut], Expect(False, "truncat" if cut > 40 else "corrupt"))
    # cut inside the end marker only: every pixel is there, so the image is usable (as in any viewer)
    put("cat/no_end_marker.png", good_png[:-10], Expect(True))
    put("cat/random.jpg", rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), Expect(False, "not an image"))
    put("cat/words.png", b"this is not a picture, just text with an image's name\n" * 20, Expect(False, "not an image"))
    put("cat/png_named.jpg", good_png, Expect(True))  # the extension lies; the content decides
    put("cat/jpeg_named.png", good_jpeg, Expect(True))
    put("cat/cmyk.jpg", _encode(_noisy(rng, colours["cat"]).convert("CMYK"), "JPEG"), Expect(True))
    sixteen = Image.fromarray((rng.integers(0, 65536, (24, 24))).astype(np.uint16))
    put("cat/sixteen_bit.png", _encode(sixteen, "PNG"), Expect(True))
    palette = _noisy(rng, colours["cat"]).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    put("cat/palette_transparent.png", _encode(palette, "PNG", transparency=0), Expect(True))
    put("cat/gray_alpha.png", _encode(_noisy(rng, colours["cat"]).convert("LA"), "PNG"), Expect(True))
    frames = [_noisy(rng, colours["cat"]).convert("P") for _ in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("cat/animated.gif", buffer.getvalue(), Expect(True))
    put("cat/one_pixel.png", _encode(Image.new("RGB", (1, 1), colours["cat"]), "PNG"), Expect(True))
    put("cat/thin_strip.png", _encode(Image.new("RGB", (4000, 1), colours["cat"]), "PNG"), Expect(True))
    put("cat/bomb.png", _encode(Image.new("1", (12000, 8000)), "PNG", optimize=True),
        Expect(False, "decompression bomb"))
    for k in range(1, 9):
        put(f"dog/exif_orientation_{k}.png", exif_oriented(k), Expect(True, pixels=BASE))
    # names: not UTF-8, emoji; hidden files; nested folders; a folder named like an image
    weird = os.fsdecode(b"dog/caf\xe9_latin1.png")
    put(weird, _encode(_noisy(rng, colours["dog"]), "PNG"), Expect(True))
    put("dog/🐶 good boy.png", _encode(_noisy(rng, colours["dog"]), "PNG"), Expect(True))
    put("dog/.DS_Store", b"\x00\x00\x00\x01Bud1", Expect(False, "hidden file"))
    put("dog/._dog_00.png", b"\x00\x05\x16\x07\x00\x02\x00\x00", Expect(False, "hidden file"))
    put("dog/notes.txt", b"labelled by Sam", Expect(False, "not an image extension"))
    put("dog/puppies/litter_2/pup.png", _encode(_noisy(rng, colours["dog"]), "PNG"), Expect(True))
    (root / "dog" / "folder.jpg").mkdir()
    put("dog/folder.jpg/inside.png", _encode(_noisy(rng, colours["dog"]), "PNG"), Expect(True))
    # links: a loop, a link into the other class's folder, a link to a file of the other class
    os.symlink("..", root / "dog" / "loop")
    expect["dog/loop"] = Expect(False, "link loop")
    os.symlink(cat, dog / "cats_too")
    expect["dog/cats_too"] = Expect(False, "class 'cat'")
    os.symlink(cat / "cat_00.png", dog / "sneaky.png")
    expect["dog/sneaky.png"] = Expect(False, "class 'cat'")
    # a file nobody may read (the test runs as a user without file-permission overrides to see it)
    put("cat/locked.png", _encode(_noisy(rng, colours["cat"]), "PNG"), Expect(False, "permission denied"))
    os.chmod(root / "cat" / "locked.png", 0)
    return expect
