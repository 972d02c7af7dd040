"""Figures are private: drawing a report never switches a notebook user's matplotlib backend or leaves figures open."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import matplotlib
    matplotlib.use("svg")                       # the user's choice, e.g. a notebook's inline backend
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image
    from cnnkit import plots
    out = __import__("pathlib").Path(__import__("sys").argv[1])
    plots.plot_curves({"loss": [1.0, 0.5], "accuracy": [0.5, 0.8], "val_loss": [1.1, 0.7],
                       "val_accuracy": [0.4, 0.7], "phase": [1, 2]}, out / "curves.png")
    plots.plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["a", "b"], out / "cm.png")
    plots.plot_mistakes(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"], ["b", "a"], [0.9, 0.8], out / "m.png",
                        heatmaps=np.ones((2, 8, 8), np.float32))
    plots.plot_lr_find([1e-4, 1e-3, 1e-2], [2.0, 1.0, 3.0], 1e-4, 1e-3, out / "lr.png")
    print(matplotlib.get_backend(), len(plt.get_fignums()), Image.open(out / "curves.png").size)
""")


def test_plots_leave_the_users_backend_and_figures_alone(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "MPLBACKEND": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    backend, open_figures, size = result.stdout.split(maxsplit=2)
    assert backend == "svg" and open_figures == "0"
    assert size.startswith("(") and int(size.strip("()").split(",")[0]) > 300  # a real PNG was drawn
    for name in ("curves", "cm", "m", "lr"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
