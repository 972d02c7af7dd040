"""Properties that hold for any input (Hypothesis): decode and resize give the asked shape and dtype for
any size, mode and aspect ratio; the split is stratified, disjoint and deterministic by seed."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnkit.data.decode import load_image
from cnnkit.data.scan import stratified_split

# Pillow mode -> a format that stores it
MODES = {"RGB": "PNG", "RGBA": "PNG", "L": "PNG", "LA": "PNG", "P": "PNG", "1": "PNG", "I;16": "PNG",
         "CMYK": "JPEG", "I": "TIFF", "F": "TIFF"}


def _image(mode: str, width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format=MODES[mode])
    return buffer.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(sorted(MODES)), width=st.integers(1, 300), height=st.integers(1, 300),
       target=st.tuples(st.integers(8, 64), st.integers(8, 64)), resize_mode=st.sampled_from(["stretch", "pad", "crop"]),
       color_mode=st.sampled_from(["rgb", "grayscale"]), seed=st.integers(0, 2**16))
def test_decode_and_resize_give_the_asked_shape_and_dtype(mode, width, height, target, resize_mode, color_mode, seed):
    pixels = load_image(_image(mode, width, height, seed), target, color_mode, resize_mode)
    assert pixels.shape == (*target, 3 if color_mode == "rgb" else 1)
    assert pixels.dtype == np.uint8


@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(sorted(MODES)), width=st.integers(1, 120), height=st.integers(1, 120),
       seed=st.integers(0, 2**16))
def test_decode_without_resizing_keeps_the_size(mode, width, height, seed):
    pixels = load_image(_image(mode, width, height, seed))
    assert pixels.shape == (height, width, 3) and pixels.dtype == np.uint8


@st.composite
def _labels(draw):
    counts = draw(st.lists(st.integers(1, 60), min_size=1, max_size=8))
    labels = np.repeat(np.arange(len(counts)), counts)
    return draw(st.permutations(list(labels))), counts


@settings(max_examples=80, deadline=None)
@given(data=_labels(), val=st.floats(0.0, 0.5), test=st.floats(0.0, 0.3), seed=st.integers(0, 2**31 - 1))
def test_split_is_stratified_disjoint_and_deterministic(data, val, test, seed):
    labels, counts = data
    labels = np.asarray(labels)
    fractions = {"validation": val, "test": test}
    assigned = stratified_split(labels, fractions, seed)
    assert len(assigned) == len(labels) and set(assigned) <= {"train", "validation", "test"}  # one split each
    np.testing.assert_array_equal(assigned, stratified_split(labels, fractions, seed))  # same seed, same split
    for label, n in enumerate(counts):
        mine = assigned[labels == label]
        left = n - 1  # every class keeps a training image
        for split, fraction in fractions.items():
            wanted = int(round(fraction * n))
            if fraction > 0 and wanted == 0 and n >= 3:
                wanted = 1  # a held-out split gets at least one image of a class of 3 or more
            taken = min(wanted, left)
            assert int((mine == split).sum()) == taken, (label, n, split, fraction)  # stratified: its own share
            left -= taken
        assert (mine == "train").sum() >= 1


@settings(max_examples=30, deadline=None)
@given(n=st.integers(20, 200), seed=st.integers(0, 2**31 - 2))
def test_another_seed_gives_another_split(n, seed):
    labels = np.zeros(n, dtype=int)
    a = stratified_split(labels, {"validation": 0.25}, seed)
    b = stratified_split(labels, {"validation": 0.25}, seed + 1)
    assert (a == "validation").sum() == (b == "validation").sum()
    assert not np.array_equal(a, b)  # 20+ images, 5+ held out: two seeds all but never pick the same ones
