"""Evaluation stage: the report as one self-contained HTML page (every image embedded as base64).

``write_html_report`` reads the PNGs already written next to ``report.html`` (confusion matrix,
per-class bars, reliability diagram, mistakes with Grad-CAM) and the run directory (curves.png or
history.csv, run.json, skipped.csv), so the page opens from a file in any browser, without a
server, and can be mailed alone. Every text from the data (class names, paths) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from cnnkit.plots import plot_curves
from cnnkit.rundir import HISTORY_CSV, SKIPPED_CSV, read_history, read_run_json, write_text

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{margin-bottom:4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
.sub{color:#666;margin-top:0}.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#f5f7fa;border:1px solid #dde3ea;border-radius:8px;padding:10px 16px;min-width:120px}
.card .v{font-size:24px;font-weight:600}.card .k{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f0f2f5}td.l,th.l{text-align:left}tr.bad td{background:#fff1f0}
img{max-width:100%;border:1px solid #eee}pre{background:#f6f8fa;padding:12px;overflow:auto;font-size:12px}
.note{color:#666;font-size:13px}.scroll{overflow:auto;max-height:1400px;border:1px solid #eee}img.full{max-width:none}
"""


def _img(path: Path, alt: str, full_size: bool = False) -> str:
    """The PNG inline; ``full_size`` keeps its pixels (in a scroll box) instead of fitting the page width."""
    if not path.exists():
        return f'<p class="note">({html.escape(alt)}: not available)</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    css = ' class="full"' if full_size else ""
    tag = f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{css}>'
    return f'<div class="scroll">{tag}</div>' if full_size else tag


def _card(key: str, value: str) -> str:
    return f'<div class="card"><div class="v">{html.escape(value)}</div><div class="k">{html.escape(key)}</div></div>'


def _table(header: list[str], rows: list[list[Any]], left: int = 1, bad: list[bool] | None = None) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>' for i, h in enumerate(header))
    body = []
    for n, row in enumerate(rows):
        cls = ' class="bad"' if bad and bad[n] else ""
        cells = "".join(f'<td class="{"l" if i < left else ""}">{html.escape(str(v))}</td>' for i, v in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _headline(report) -> str:
    cards = [("accuracy", f"{report.accuracy:.2%}"), (f"top-{report.k} accuracy", f"{report.top_k_accuracy:.2%}"),
             ("balanced accuracy", f"{report.balanced_accuracy:.2%}"),
             ("macro F1", f"{report.macro_avg.get('f1-score', 0):.3f}"), ("loss", f"{report.loss:.4f}"),
             ("ECE", f"{report.ece:.3f}"), ("images", str(report.num_images))]
    out = f'<div class="cards">{"".join(_card(k, v) for k, v in cards)}</div>'
    if report.tta:
        t = report.tta
        rows = [["without TTA", f"{report.accuracy:.2%}", f"{report.top_k_accuracy:.2%}", f"{report.loss:.4f}",
                 f"{report.ece:.3f}"],
                [f"with TTA ({t['mode']}, {t['views']} views)", f"{t['accuracy']:.2%}",
                 f"{t[f'top_{report.k}_accuracy']:.2%}", f"{t['loss']:.4f}", f"{t['ece']:.3f}"]]
        out += "<h3>Test-time augmentation</h3>" + _table(["", "accuracy", f"top-{report.k}", "loss", "ECE"], rows)
        out += '<p class="note">Plots and mistakes below are without TTA (what <code>cnnkit predict</code> returns).</p>'
    if report.calibration:
        c = report.calibration
        out += (f'<p>Calibrated: temperature <b>{c["temperature"]:.3f}</b>; ECE {c["ece_uncalibrated"]:.3f} '
                f'uncalibrated &rarr; <b>{c["ece"]:.3f}</b> calibrated'
                + (f'; abstain below confidence {c["min_confidence"]:.2f}' if c.get("min_confidence") is not None
                   else "") + ".</p>")
    return out


def _curves(run: Path, out_dir: Path) -> str:
    curves = run / "curves.png"
    if not curves.exists() and (run / HISTORY_CSV).exists():
        curves = plot_curves(read_history(run / HISTORY_CSV), out_dir / "curves.png")
    if not curves.exists():
        return '<p class="note">No training history in this run (history.csv).</p>'
    return _img(curves, "training curves")


def _per_class(report) -> str:
    rows, bad = [], []
    for name, row in report.per_class.items():
        rows.append([name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1-score']:.3f}",
                     int(row["support"])])
        bad.append(row["support"] > 0 and row["f1-score"] < report.macro_avg.get("f1-score", 0) - 0.1)
    for label, avg in (("macro avg", report.macro_avg), ("weighted avg", report.weighted_avg)):
        rows.append([label, f"{avg.get('precision', 0):.3f}", f"{avg.get('recall', 0):.3f}",
                     f"{avg.get('f1-score', 0):.3f}", int(avg.get("support", 0))])
        bad.append(False)
    return _table(["class", "precision", "recall", "F1", "support"], rows, bad=bad)


def _data_summary(report, record: dict[str, Any], run: Path) -> str:
    support = {n: int(r["support"]) for n, r in report.per_class.items()}
    parts = [(f"<p>Evaluated <b>{report.num_images}</b> images; data hash <code>{html.escape(report.data_hash[:16])}"
              f"</code>; skipped <b>{len(report.skipped)}</b> files.</p>")]
    header, rows = ["class", "evaluated"], [[n, support[n]] for n in report.class_names]
    counts = record.get("class_counts", {})
    for split in ("train", "validation", "test"):
        if split in counts:
            header.append(f"trained on: {split}")
            for row in rows:
                row.append(counts[split].get(row[0], 0))
    parts.append(_table(header, rows))
    if record:
        parts.append(f"<p>Training data: <code>{html.escape(str(record.get('data_dir', '?')))}</code>, data hash "
                     f"<code>{html.escape(str(record.get('data_hash', ''))[:16])}</code>, "
                     f"{record.get('skipped', 0)} files skipped in training"
                     + (" (see skipped.csv)" if (run / SKIPPED_CSV).exists() else "") + ".</p>")
    if report.skipped:
        shown = report.skipped[:20]
        parts.append("<h3>Skipped in this evaluation</h3>"
                     + _table(["file", "reason"], [[str(s.path), s.reason] for s in shown], left=2)
                     + (f'<p class="note">... and {len(report.skipped) - 20} more.</p>' if len(report.skipped) > 20 else ""))
    return "".join(parts)


def write_html_report(path: Path, report, *, run: Path, mistakes: list[dict[str, Any]],
                      most_confused: list[dict[str, Any]], gradcam: bool) -> Path:
    """Write ``report.html`` for an EvalReport; the PNGs are read from the same folder."""
    out_dir = Path(path).parent
    run_dir = run if run.is_dir() else run.parent
    record = read_run_json(run_dir)
    title = f"cnnkit evaluation: {run_dir.name}"
    config = {k: record[k] for k in ("config", "versions", "augmentation", "metrics", "calibration", "created",
                                     "status", "warnings") if k in record}
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        (f'<p class="sub">model <b>{html.escape(str(record.get("config", {}).get("model", {}).get("name", "?")))}</b>'
         f" &middot; {len(report.class_names)} classes &middot; evaluated on {report.num_images} images "
         f"&middot; {report.seconds:.1f}s</p>"),
        "<h2>Metrics</h2>", _headline(report),
        "<h2>Training curves</h2>", _curves(run_dir, out_dir),
        "<h2>Per class</h2>", _per_class(report), _img(out_dir / "per_class.png", "per-class precision, recall, F1"),
        "<h2>Confusion matrix</h2>",
        _img(out_dir / "confusion_matrix.png", "confusion matrix", full_size=len(report.class_names) > 30),
        "<h3>Most confused pairs</h3>",
        _table(["true", "predicted as", "images", "of the true class"],
               [[c["true"], c["predicted"], c["count"], f"{c['fraction_of_true']:.1%}"] for c in most_confused[:15]], left=2)
        if most_confused else "<p>No confusions.</p>",
        "<h2>Most confident mistakes</h2>",
        '<p class="note">Each mistake: the image (true and predicted class, confidence)'
        + (", then its Grad-CAM overlay for the predicted class: where the model looked." if gradcam else ".") + "</p>",
        _img(out_dir / "mistakes.png", "mistakes"),
        _table(["file", "true", "predicted", "confidence"],
               [[m["path"], m["true"], m["predicted"], f"{m['confidence']:.1%}"] for m in mistakes], left=3)
        if mistakes else "",
        "<h2>Calibration</h2>", _img(out_dir / "calibration.png", "reliability diagram"),
        ('<p class="note">Bars on the diagonal = confidences you can trust. ECE = mean gap, weighted by images. '
         "Fit a temperature with <code>cnnkit calibrate RUN</code>.</p>"),
        "<h2>Data</h2>", _data_summary(report, record, run_dir),
        "<h2>Run configuration</h2>", f"<pre>{html.escape(json.dumps(config, indent=2, default=str), quote=False)}</pre>",
    ]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(sections)}</body></html>\n")
    return write_text(Path(path), page)
