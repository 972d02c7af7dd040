"""Shared fixtures: tiny image folders written with Pillow, good and broken."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit import _progress

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory):
    """Module- and session-scoped fixtures get a private CNNKIT_HOME too (never the user's ~/.cnnkit)."""
    saved = os.environ.get("CNNKIT_HOME")
    os.environ["CNNKIT_HOME"] = str(tmp_path_factory.mktemp("session-home"))
    yield
    if saved is None:
        os.environ.pop("CNNKIT_HOME", None)
    else:
        os.environ["CNNKIT_HOME"] = saved


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Each test gets its own CNNKIT_HOME (decode cache), and no progress bars in the output."""
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path_factory.mktemp("cnnkit-home")))
    _progress.set_progress(False)
    yield
    _progress.set_progress(True)


def colour_image(rng: np.random.Generator, colour: tuple[int, int, int], size: int = 16) -> Image.Image:
    """A noisy image whose dominant colour is ``colour``: learnable, but not trivially identical."""
    base = np.array(colour, dtype=np.int16)[None, None, :]
    noise = rng.integers(-40, 41, (size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_class_folder(root: Path, per_class: int = 20, size: int = 16, seed: int = 0,
                       classes: dict[str, tuple[int, int, int]] = COLORS, ext: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour_image(rng, colour, size).save(root / name / f"{name}_{i:03d}.{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """root/<red|green|blue>/*.png, 20 noisy 16x16 images per class."""
    return write_class_folder(tmp_path / "colours")


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """root/train/<class>/ (24 per class) and root/test/<class>/ (8 per class)."""
    root = tmp_path / "dataset"
    write_class_folder(root / "train", per_class=24, seed=1)
    write_class_folder(root / "test", per_class=8, seed=2)
    return root


def add_bad_files(folder: Path) -> dict[str, str]:
    """Every kind of bad file in class folder ``folder``; returns {file name: expected reason fragment}."""
    good = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    (folder / "empty.jpg").write_bytes(b"")
    good.save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "full.jpg").unlink()
    (folder / "text.png").write_text("this is not an image")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    Image.new("L", (5000, 5000)).save(folder / "bomb.png")  # 25 M pixels > the test limit of 20 M
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    (folder / "._red_000.png").write_bytes(b"\x00\x05\x16\x07")
    (folder / "notes.txt").write_text("stray file")
    return {
        "empty.jpg": "empty file",
        "truncated.jpg": "truncated",
        "text.png": "not an image",
        "corrupt.png": "corrupt or truncated PNG",
        "bomb.png": "decompression bomb",
        ".DS_Store": "hidden file",
        "._red_000.png": "hidden file",
        "notes.txt": "not an image extension",
    }
