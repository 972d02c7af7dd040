"""Evaluation stage: a trained run + labelled images -> what the model is worth, and where it fails.

In: a run directory (or ``.keras`` file) and a labelled folder, or the run's own test/validation
split (``split.csv``). Out: ``EvalReport`` and ``RUN/eval/<name>/`` (metrics, plots, report.html)
from ``evaluate``; a temperature and abstain threshold stored in the run from ``calibrate``; a
queue of likely-mislabelled images from ``review``; runs side by side from ``compare``.
"""

from cnnkit.evaluation.calibration import CalibrationResult, calibrate
from cnnkit.evaluation.comparison import Comparison, compare
from cnnkit.evaluation.mislabels import ReviewItem, ReviewQueue, review
from cnnkit.evaluation.scoring import EvalReport, compute_metrics, evaluate

__all__ = ["CalibrationResult", "Comparison", "EvalReport", "ReviewItem", "ReviewQueue", "calibrate", "compare",
           "compute_metrics", "evaluate", "review"]
