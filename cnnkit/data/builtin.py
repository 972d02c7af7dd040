"""Built-in datasets: ``cnnkit train cifar10`` trains on CIFAR-10 the way the tutorials' ``load_data()`` does.

The tutorials start from ``keras.datasets.cifar10.load_data()``. Here the same name, given where a
folder is expected, gets the same arrays from Keras (its one download, cached in
``~/.keras/datasets``, or ``$KERAS_HOME``) and writes them once as lossless PNGs in the folder layout
everything else reads: ``$CNNKIT_HOME/datasets/<name>/train|test/<class>/<index>.png``. ``<index>``
is the image's row in Keras's array, so a file maps back to ``x_train[i]``. From there a built-in set
is a folder like any other: the same decode cache, ``split.csv``, evaluation on its test split and
Grad-CAM on its files. A file or folder of the same name in the working directory always wins.

The folder is written beside its final place and renamed when complete, so a run killed while it
writes leaves nothing that looks finished; the next call removes the remains and writes it again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit import _progress
from cnnkit.config import cnnkit_home
from cnnkit._backends.devices import usable_cpus
from cnnkit.data._pool import process_pool
from cnnkit.errors import DataError
from cnnkit.rundir import hold_lock, new_directory

_CHUNK = 1000  # images a worker writes per task


@dataclass(frozen=True)
class BuiltinSet:
    """A dataset Keras can download (``keras.datasets.<its key in BUILTIN_SETS>``): its title, and its class names in
    Keras's label order.

    The names are the class folders'. cnnkit numbers classes by folder name (natural order): that is
    Keras's numbering for CIFAR-10, CIFAR-100 and MNIST. Fashion-MNIST's names sort differently
    (Ankle_boot is cnnkit's class 0 and Keras's 9); predictions are by name.
    """

    title: str
    classes: tuple[str, ...]


_CIFAR100 = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

BUILTIN_SETS: dict[str, BuiltinSet] = {  # keyed by the keras.datasets module
    "cifar10": BuiltinSet("CIFAR-10", ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                       "truck")),
    "cifar100": BuiltinSet("CIFAR-100 (fine labels)", tuple(_CIFAR100)),
    "mnist": BuiltinSet("MNIST", tuple(str(d) for d in range(10))),
    "fashion_mnist": BuiltinSet("Fashion-MNIST", ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                                  "Shirt", "Sneaker", "Bag", "Ankle_boot")),
}


def builtin_name(root: str | Path) -> str | None:
    """The built-in set ``root`` names (``CIFAR10``, ``cifar-10``, ``fashion_mnist``...), or None.

    Only a single path component that does not exist counts (``cifar10``, ``./cifar10``, ``CIFAR10/``:
    the shell and Typer make these one); a file or folder of that name here is what it is, and
    ``data/cifar10`` is always a path.
    """
    path = Path(root)
    if len(path.parts) != 1 or path.exists():
        return None
    key = path.name.lower().replace("-", "").replace("_", "")
    return next((name for name in BUILTIN_SETS if name.replace("_", "") == key), None)


def builtin_names() -> str:
    """The names a user can give, for messages."""
    return ", ".join(BUILTIN_SETS)


def data_folder(root: str | Path) -> Path:
    """``root`` itself, or the folder of the built-in set it names (written on first use)."""
    name = builtin_name(root)
    return Path(root) if name is None else builtin_folder(name)


def builtin_folder(name: str, home: Path | None = None) -> Path:
    """The folder of the built-in set ``name``, getting it from Keras and writing it on first use.

    One cnnkit process at a time writes a set, with its worker processes (a lock beside it, held
    until the folder is in place; a second cnnkit process waits, then reads the first one's folder).
    The lock holder removes what a process killed while writing left behind.

    Raises:
        DataError: the name is unknown, or Keras could not get the arrays (offline, say).
    """
    if name not in BUILTIN_SETS:
        raise DataError(f"No built-in dataset '{name}'. Built-in: {builtin_names()}; or pass a folder.")
    spec = BUILTIN_SETS[name]
    final = (home or cnnkit_home()) / "datasets" / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(final.parent / f".{name}.lock", wait=True):  # let go when closed, or when this process dies
        if final.is_dir():
            return final  # another process wrote it while this one waited
        for stale in final.parent.glob(f".{name}.partial-*"):  # no live writer: this process holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        _progress.say(f"'{name}' is not a folder here: getting the built-in {spec.title} from keras.datasets, to "
                      f"write it once as PNGs in '{_progress.esc(final)}'")
        (x_train, y_train), (x_test, y_test) = _load(name)
        partial = new_directory(final.parent, f".{name}.partial-")
        try:
            with _progress.progress_task(f"writing {spec.title}", len(x_train) + len(x_test)) as advance:
                for split, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
                    _write_split(partial / split, images, labels, spec.classes, advance)
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return final


def _load(name: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    import importlib

    module = importlib.import_module(f"keras.datasets.{name}")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Keras's download messages: stdout stays JSON/CSV
            return module.load_data()
    except Exception as exc:  # Keras raises a bare Exception for a failed download
        raise DataError(f"Could not get the built-in dataset '{name}' from keras.datasets: {exc}. Keras downloads it "
                        "once into ~/.keras/datasets (or $KERAS_HOME/datasets): connect to the network once, delete "
                        "a damaged copy there, or pass a folder of images (root/<class>/*.jpg).") from exc


def _write_split(folder: Path, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], advance) -> None:
    """Write one split's images as ``folder/<class>/<row>.png``, in worker processes when there are many."""
    labels = np.asarray(labels).reshape(-1)
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # Keras set to channels_first: images are files, channels last
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if len(labels) != len(images) or (len(labels) and (labels.min() < 0 or labels.max() >= len(classes))):
        raise DataError(f"keras.datasets gave {len(images)} images and {len(labels)} labels in 0..{len(classes) - 1} "
                        f"for '{folder.name}'; expected one label per image. Delete Keras's cached copy in "
                        "~/.keras/datasets and try again.")
    for name in classes:
        (folder / name).mkdir(parents=True)
    width = len(str(max(len(images) - 1, 0)))
    names = [str(folder / classes[label] / f"{i:0{width}d}.png") for i, label in enumerate(labels)]
    chunks = [slice(s, s + _CHUNK) for s in range(0, len(images), _CHUNK)]
    workers = min(usable_cpus(), len(chunks))
    if workers < 2:
        for part in chunks:
            advance(_write_pngs(images[part], names[part]))
        return
    with process_pool(workers) as pool:  # PNG encoding holds the GIL: processes, not threads
        try:
            for future in concurrent.futures.as_completed([pool.submit(_write_pngs, images[part], names[part])
                                                           for part in chunks]):
                advance(future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # a failed chunk or Ctrl-C: write no more before cleanup
            raise


def _write_pngs(images: np.ndarray, names: list[str]) -> int:
    from PIL import Image

    for image, name in zip(images, names):
        Image.fromarray(image).save(name, compress_level=1)
    return len(names)
