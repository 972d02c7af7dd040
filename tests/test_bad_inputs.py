"""Every kind of bad input, through every command: the generated corpus (tests/corpus.py) goes through
decode, scan, doctor, train, evaluate, predict and both server endpoints, and each file gets the
documented outcome: used with its class, or skipped (or refused) with a reason that names it."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cnnkit
from cnnkit.data.decode import DecodeError, load_image
from cnnkit.data.scan import scan_folder
from tests.corpus import BASE, Expect, write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, Expect]]:
    root = tmp_path_factory.mktemp("corpus") / "pets"
    expect = write_corpus(root)
    if os.access(root / "cat" / "locked.png", os.R_OK):  # root with file-permission overrides reads anything
        expect["cat/locked.png"] = Expect(True)
    return root, expect


def _files(expect: dict[str, Expect], root: Path) -> dict[str, Expect]:
    """Entries that are plain files (what a user would upload), not links, folders or hidden files."""
    return {rel: e for rel, e in expect.items()
            if (root / rel).is_file() and not (root / rel).is_symlink() and not Path(rel).name.startswith(".")}


def _decodable(e: Expect) -> bool:
    return e.usable


def test_decode_gives_each_file_its_outcome(corpus):
    root, expect = corpus
    for rel, e in _files(expect, root).items():
        if e.usable:
            pixels = load_image(root / rel, (16, 16))
            assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8, rel
        elif "extension" not in e.reason:
            with pytest.raises(DecodeError) as info:
                load_image(root / rel, (16, 16))
            assert e.reason in info.value.reason, (rel, info.value.reason)


def test_every_exif_orientation_is_upright_pixel_by_pixel(corpus):
    root, expect = corpus
    for k in range(1, 9):
        np.testing.assert_array_equal(load_image(root / f"dog/exif_orientation_{k}.png"), BASE, err_msg=f"orientation {k}")


def test_scan_counts_each_real_image_once_and_lists_the_rest(corpus):
    root, expect = corpus
    folder = scan_folder(root, val_split=0)
    found = {os.path.relpath(f.path, root): folder.class_names[f.label] for f in folder.files}
    skipped = {os.path.relpath(s.path, root): s.reason for s in folder.skipped}
    for rel, e in expect.items():
        if rel in found:
            assert found[rel] == rel.split("/")[0], rel  # under its own class, never another
        elif e.usable:
            pytest.fail(f"{rel} is usable but was not found")
        elif rel not in skipped:  # an undecodable file is the decoder's to report
            assert (root / rel).is_file() and not (root / rel).is_symlink(), f"{rel}: neither counted nor listed"
        else:
            assert e.reason in skipped[rel], (rel, skipped[rel])
    assert len(found) == len(set(os.path.realpath(root / rel) for rel in found))  # no file counted twice
    assert sum(1 for f in folder.files if folder.class_names[f.label] == "cat") == sum(
        1 for rel in found if rel.startswith("cat/"))


def test_doctor_reports_every_bad_file_link_and_loop(corpus):
    root, expect = corpus
    report = cnnkit.doctor(root, runs=None)
    listed = {os.path.relpath(r["path"], root): r["reason"]
              for r in report.unreadable + report.skipped + report.links}
    for rel, e in expect.items():
        if not e.usable:
            assert rel in listed, f"doctor does not mention {rel}"
            assert e.reason in listed[rel], (rel, listed[rel])
    text = " ".join(report.problems)
    assert "loop back" in text and "under two classes" in text and "unreadable" in text


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    root, expect = corpus
    out = tmp_path_factory.mktemp("corpus-run") / "run"
    result = cnnkit.train(root, out, model="simple", image_size=16, epochs=2, batch_size=8, val_split=0.25)
    return result, root, expect


def test_train_uses_every_usable_image_once_and_lists_every_other_file(trained):
    result, root, expect = trained
    with open(result.run_dir / "split.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        used = [os.path.relpath(r["path"], root) for r in csv.DictReader(fh)]
    with open(result.run_dir / "skipped.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        skipped = {os.path.relpath(r["path"], root): r["reason"] for r in csv.DictReader(fh)}
    assert len(used) == len(set(used))
    for rel, e in expect.items():
        if e.usable:
            assert rel in used, rel
        else:
            assert rel in skipped and e.reason in skipped[rel], (rel, skipped.get(rel))
    assert result.status == "completed"


def test_evaluate_on_the_corpus_skips_with_reasons(trained):
    result, root, expect = trained
    report = cnnkit.evaluate(result.run_dir, root, name="corpus", gradcam=False)
    skipped = {os.path.relpath(s.path, root): s.reason for s in report.skipped}
    for rel, e in expect.items():
        if not e.usable:
            assert rel in skipped and e.reason in skipped[rel], (rel, skipped.get(rel))
    assert report.num_images == sum(e.usable for e in expect.values())


def test_predict_answers_each_file_or_says_why_not(trained):
    result, root, expect = trained
    predictor = cnnkit.Predictor(result.run_dir)
    files = _files(expect, root)
    by_path = {os.path.relpath(p.path, root): p for p in predictor.predict([root / rel for rel in files])}
    for rel, e in files.items():
        p = by_path[rel]
        if e.usable:
            assert p.error is None and p.label in ("cat", "dog"), (rel, p)
        else:
            assert p.error and e.reason.split()[0] in p.error, (rel, p.error)
    folder = {os.path.relpath(p.path, root): p for p in predictor.predict([root])}
    assert all(rel in folder for rel, e in expect.items() if e.usable)  # a folder: every usable image, once
    assert len(folder) == len({os.path.realpath(root / rel) for rel in folder})


def test_both_server_endpoints_answer_each_file_with_200_or_a_named_400(trained):
    from fastapi.testclient import TestClient

    from cnnkit.serve import create_app

    result, root, expect = trained
    with TestClient(create_app(result.run_dir, batching=False)) as client:
        for rel, e in _files(expect, root).items():
            data = (root / rel).read_bytes()
            body = json.dumps({"instances": [{"b64": base64.b64encode(data).decode()}]})
            answer = client.post(f"/v1/models/{result.run_dir.name}:predict", content=body)
            name = os.fsencode(Path(rel).name).decode("utf-8", "replace")  # what an HTTP client can send
            upload = client.post("/predict", files={"file": (name, data, "application/octet-stream")})
            if e.usable or "extension" in e.reason or "hidden" in e.reason:  # bytes have no name: content decides
                decodable = _bytes_decode(data)
                assert answer.status_code == (200 if decodable else 400), (rel, answer.text)
                assert upload.status_code == (200 if decodable else 400), (rel, upload.text)
            else:
                assert answer.status_code == 400 and e.reason.split()[0] in answer.json()["error"], (rel, answer.text)
                assert upload.status_code == 400 and name in upload.json()["error"], (rel, upload.text)


def _bytes_decode(data: bytes) -> bool:
    try:
        load_image(data, (8, 8))
        return True
    except DecodeError:
        return False


def _without_permission_overrides() -> list[str]:
    """A command prefix that runs as a process that cannot read files its mode forbids (root drops its overrides)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a process that honours file permissions")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def test_an_unreadable_file_is_reported_as_such_by_doctor_and_predict(corpus, tmp_path):
    root, _ = corpus
    env = {**os.environ, "PYTHONPATH": str(REPO), "CNNKIT_HOME": str(tmp_path / "home")}
    doctor = subprocess.run([*_without_permission_overrides(), sys.executable, "-m", "cnnkit.cli", "-q", "doctor",
                             str(root), "--format", "json", "--runs", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    unreadable = {os.path.relpath(u["path"], root): u["reason"] for u in json.loads(doctor.stdout)["unreadable"]}
    assert "permission denied" in unreadable.get("cat/locked.png", ""), unreadable
