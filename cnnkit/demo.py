"""The demo: the main job end to end on data the package ships, with no network.

The data are scikit-learn's 1,797 handwritten digits (8x8 grayscale) written as PNG files in the
usual ``train/<class>/`` and ``test/<class>/`` layout, so the demo exercises exactly what a user's
folder goes through: scan, stratified validation split, grayscale -> RGB, resize, cache, training,
evaluation and prediction.
"""

from __future__ import annotations

import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

from cnnkit._progress import esc, say


def extract_demo_data(out: str | Path) -> Path:
    """Write the shipped digits under ``out`` (once) and return the dataset root."""
    out = Path(out)
    root = out / "digits"
    if not (root / "train").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = resources.files("cnnkit") / "demo_data" / "digits.zip"
        with resources.as_file(archive) as path, zipfile.ZipFile(path) as zf:
            zf.extractall(out)
    return root


def run_demo(out: str | Path = "cnnkit-demo", epochs: int = 15, model: str = "simple") -> dict[str, Any]:
    """Extract the digits, train, evaluate on their test split and predict a few images.

    Returns a summary: run directory, validation and test accuracy, and sample predictions.
    """
    from cnnkit.evaluation import evaluate
    from cnnkit.predict import Predictor
    from cnnkit.training import train

    from cnnkit.config import load_config
    from cnnkit.models import get_spec

    get_spec(model)  # bad options fail before anything is written
    load_config(None, {"train.epochs": epochs, "model.name": model})
    out = Path(out)
    data = extract_demo_data(out / "data")
    say(f"[bold]cnnkit demo[/]: handwritten digits in {esc(data)}")
    result = train(data, out / "runs" / "demo", model=model, epochs=epochs, overwrite=True)
    report = evaluate(result.run_dir, data / "test")
    samples = [sorted((data / "test" / name).iterdir())[0] for name in result.class_names]
    predictions = Predictor(result.run_dir).predict(samples, top_k=3)
    for p in predictions:
        say(f"  {esc(p.path)}: [bold]{esc(p.label)}[/] ({p.confidence:.1%})")
    return {
        "run_dir": str(result.run_dir),
        "data_dir": str(data),
        "val_accuracy": result.metrics.get("val_accuracy"),
        "test_accuracy": report.accuracy,
        f"test_top_{report.k}_accuracy": report.top_k_accuracy,
        "report": str(report.out_dir),
        "predictions": [{"path": p.path, "label": p.label, "confidence": round(p.confidence, 4)} for p in predictions],
    }
