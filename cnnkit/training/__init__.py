"""Training stage: a folder of images -> a run directory.

In: an image folder and a ``RunConfig`` (or flat options: ``model``, ``epochs``, ...), or a run to
resume. Out: ``TrainResult`` and the run directory (``model.keras``, ``run.json``, ``history.csv``,
``curves.png``, ``split.csv``, ``skipped.csv``, ``best.weights.h5``, ``last.keras``).

Modules, in the order a run uses them: ``run`` (``train``), ``resume``, ``fitting`` (phases,
BatchNorm re-estimation), ``budget`` (``--time-budget``), ``precision`` (mixed precision),
``optim`` (optimizers, schedules, loss), ``callbacks``, ``range_test`` (``lr_find``),
``diagnostics`` (mistakes in words).
"""

from cnnkit.training.diagnostics import diagnose_history
from cnnkit.training.range_test import LRFindResult, lr_find
from cnnkit.training.run import TrainResult, train

__all__ = ["LRFindResult", "TrainResult", "diagnose_history", "lr_find", "train"]
