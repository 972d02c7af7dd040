"""``cnnkit.train`` and ``cnnkit.evaluate`` are both a module and that module's main function.

Python binds ``cnnkit.<sub>`` to the submodule as soon as anyone imports it, which would hide the
function of the same name that ``cnnkit/__init__`` exports. Making the module callable keeps
``cnnkit.train(...)`` working however the module was imported.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def make_module_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Calling the module ``module_name`` calls ``function``."""

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
