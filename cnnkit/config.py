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
AugmentName = Literal["none", "standard"]

# Pillow refuses images over ~179 M pixels by default with a warning first; we refuse earlier:
# 80 M pixels (a 10,000 x 8,000 photo) is larger than any camera JPEG a user is likely to train on,
# and decoding one already costs ~240 MB of RAM per worker.
DEFAULT_MAX_PIXELS = 80_000_000


def cnnkit_home() -> Path:
    """cnnkit's own folder (decode caches, registry): ``$CNNKIT_HOME``, default ``~/.cnnkit``.

    The one place outside the server that reads the environment, so every stage agrees on it.
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


@dataclass(frozen=True)
class DataConfig:
    """How images are found, split and decoded.

    Args:
        image_size: (height, width) every image is resized to; ``None`` picks the model's default.
        color_mode: "rgb" (3 channels) or "grayscale" (1 channel); any file mode is converted.
        resize_mode: "stretch" (ignore aspect ratio, as Keras does), "pad" (keep aspect, pad with
            black to a square) or "crop" (keep aspect, centre-crop).
        val_split: fraction of each class held out for validation when the folder has no
            validation/ (or val/) folder.
        test_split: fraction of each class held out for testing when the folder has no test/ folder.
        seed: seed of the split and of the per-epoch shuffle.
        workers: decode processes; ``None`` uses every core.
        max_pixels: images with more pixels are skipped as decompression bombs.
    """

    image_size: tuple[int, int] | None = None
    color_mode: ColorMode = "rgb"
    resize_mode: ResizeMode = "stretch"
    val_split: float = 0.2
    test_split: float = 0.0
    seed: int = 1337
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

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
        _check_fraction("data", "val_split", self.val_split)
        _check_fraction("data", "test_split", self.test_split)
        if self.val_split + self.test_split >= 0.9:
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
    """Which architecture to build (see ``cnnkit.models.available_models()``)."""

    name: str = "simple"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"[model] name must be a model name. Received: name={self.name!r}")


@dataclass(frozen=True)
class TrainConfig:
    """How the model is fitted.

    Args:
        epochs: maximum epochs; EarlyStopping may end sooner.
        batch_size: images per step.
        learning_rate: Adam's initial rate; ReduceLROnPlateau halves it when val_loss stalls.
        augment: "none", or "standard" (random flip, rotation, zoom, translation as layers that
            act only in training).
        patience: epochs without val_loss improvement before EarlyStopping ends the run.
        overfit_gap: a train-minus-validation accuracy gap above this is reported as overfitting.
    """

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    augment: AugmentName = "none"
    patience: int = 5
    overfit_gap: float = 0.15

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"[train] epochs must be >= 1. Received: epochs={self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"[train] batch_size must be >= 1. Received: batch_size={self.batch_size}")
        if not 0.0 < self.learning_rate < 10.0:
            raise ConfigError(
                f"[train] learning_rate must be in (0, 10). Received: learning_rate={self.learning_rate}"
            )
        _check_choice("train", "augment", self.augment, AugmentName)
        if self.patience < 1:
            raise ConfigError(f"[train] patience must be >= 1. Received: patience={self.patience}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs: ``data``, ``model`` and ``train`` sections."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def _unknown_key(where: str, key: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"Unknown config key '{key}' in {where}. Valid keys: {', '.join(sorted(valid))}.{hint}")


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = _SECTIONS[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in valid:
            raise _unknown_key(f"[{name}]", key, valid)
    values = dict(values)
    if name == "data" and values.get("image_size") is not None:
        size = values["image_size"]
        values["image_size"] = (int(size), int(size)) if isinstance(size, int) else tuple(size)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"[{name}] {exc}") from exc


def config_from_dict(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build a RunConfig from nested sections plus ``{"section.key": value}`` overrides (None skipped)."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for name, values in raw.items():
        if name not in _SECTIONS:
            raise _unknown_key("the config file", name, list(_SECTIONS))
        if not isinstance(values, dict):
            raise ConfigError(f"Config section [{name}] must be a table of keys. Received: {name}={values!r}")
        sections[name].update(values)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        name, _, key = dotted.partition(".")
        sections[name][key] = value
    return RunConfig(**{name: _build_section(name, values) for name, values in sections.items()})


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML or JSON config (or a run's run.json) and apply ``section.key`` overrides.

    Example:
        >>> cfg = load_config(None, {"train.epochs": 3, "model.name": "vgg"})
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
    return config_from_dict(raw, overrides)
