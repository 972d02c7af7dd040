"""The doctor's checks: what is in an image folder and what is wrong with it, before any training.

``doctor()`` reads every image once (in worker processes) and reports counts per class and split,
class imbalance, image sizes, modes and formats, unreadable files with reasons, exact duplicates
(same bytes) and near-duplicates (a 64-bit difference hash, dHash, within a few bits) within and
across splits: an image in both train and test is leakage that inflates test accuracy, and the
same image under two classes is a label conflict. It never modifies, moves or rewrites a file.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit._progress import console, esc, progress_task
from cnnkit._backends.devices import usable_cpus
from cnnkit.data._pool import process_pool
from cnnkit.data.decode import DecodeError, describe_image, load_image
from cnnkit.data.rules import class_size_problems, imbalance_ratio
from cnnkit.data.scan import LINK_KINDS, ImageFolder, scan_folder
from cnnkit.rundir import unfinished_in

# Hamming distance (of 64 bits) at or under which two dHashes count as near-duplicates: 0-3 bits
# differ for re-encoded, resized or slightly brightened copies of one photo; unrelated images differ
# by ~32. Four 16-bit bands guarantee every pair within 3 bits shares at least one band.
NEAR_DUPLICATE_BITS = 3
# A dHash match is confirmed only when the 32x32 grayscale thumbnails also agree to within this
# mean absolute difference (of 255): tiny or flat images (8x8 digits, blank scans) share dHashes
# without being copies, while re-encoded or resized copies of one photo differ by a few levels.
NEAR_DUPLICATE_MEAN_DIFF = 10.0
_BUCKET_LIMIT = 2000  # a band value shared by more images (blank images) is compared only within exact-hash groups


def dhash(gray: np.ndarray) -> int:
    """64-bit difference hash of a grayscale image: is each pixel brighter than its right neighbour (9x8)."""
    from PIL import Image

    small = np.asarray(Image.fromarray(gray.squeeze()).resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(np.packbits(bits).view(">u8")[0])


def _inspect(path: str) -> dict[str, Any]:
    record: dict[str, Any] = {"path": path}
    try:
        with open(path, "rb") as fh:
            record["sha256"] = hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        record["sha256"] = None
    try:
        thumb = load_image(path, (32, 32), "grayscale")
        record["gray"], record["thumb"] = dhash(thumb), thumb.squeeze()
        (record["width"], record["height"]), record["mode"], record["format"] = describe_image(path)
    except DecodeError as exc:
        record["error"] = exc.reason
    except Exception as exc:  # header readable by load_image but not by describe_image: report, don't crash
        record["error"] = f"unreadable ({exc})"
    return record


def _inspect_chunk(paths: list[str]) -> list[dict[str, Any]]:
    return [_inspect(p) for p in paths]


@dataclass
class DoctorReport:
    """The doctor's findings. ``problems`` lists everything that should be fixed, in words."""

    root: Path
    layout: str
    class_names: list[str]
    counts: dict[str, dict[str, int]]
    imbalance_ratio: float | None
    sizes: dict[str, Any]
    modes: dict[str, int]
    formats: dict[str, int]
    unreadable: list[dict[str, str]]
    skipped: list[dict[str, str]]
    exact_duplicates: list[dict[str, Any]]
    near_duplicates: list[dict[str, Any]]
    links: list[dict[str, str]] = field(default_factory=list)
    nested: str | None = None
    layout_problems: list[str] = field(default_factory=list)
    unfinished_runs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}

    @property
    def leakage(self) -> list[dict[str, Any]]:
        """Exact and near-duplicate groups that span more than one split."""
        return [d for d in self.exact_duplicates + self.near_duplicates if len(d["splits"]) > 1]


def doctor(root: str | Path, workers: int | None = None, near_bits: int = NEAR_DUPLICATE_BITS,
           follow_links: bool = False, runs: str | Path | None = "runs") -> DoctorReport:
    """Inspect an image folder (see the module docstring). Reads files only; never writes.

    Args:
        root: the data folder.
        workers: processes reading images (default: one per CPU this process may use).
        near_bits: dHash bits two near-duplicates may differ in.
        follow_links: follow symbolic links that lead out of ``root`` too, as ``train --follow-links`` would.
        runs: a folder of run directories whose unfinished (killed) runs to report; default ``runs``
            (``cnnkit train``'s default output), None for none.

    Example:
        >>> report = cnnkit.doctor("dataset")
        >>> problems = report.problems   # what to fix, in words
    """
    folder = scan_folder(root, val_split=0.0, test_split=0.0, strict=False, follow_links=follow_links)
    paths = [str(f.path) for f in folder.files]
    records = _inspect_all(paths, workers)
    split_of = {str(f.path): f.split for f in folder.files}
    class_of = {str(f.path): folder.class_names[f.label] for f in folder.files}
    good = [r for r in records if "error" not in r]
    report = DoctorReport(
        root=folder.root, layout=folder.layout, class_names=folder.class_names, counts=_counts(folder, records),
        imbalance_ratio=None, sizes=_sizes(good), modes=dict(Counter(r["mode"] for r in good)),
        formats=dict(Counter(r["format"] for r in good)),
        unreadable=[{"path": r["path"], "reason": r["error"]} for r in records if "error" in r],
        skipped=[{"path": str(s.path), "reason": s.reason} for s in folder.skipped if s.kind not in LINK_KINDS],
        exact_duplicates=_exact_duplicates(records, split_of, class_of),
        near_duplicates=_near_duplicates(good, split_of, class_of, near_bits),
        links=[{"path": str(s.path), "kind": s.kind, "reason": s.reason} for s in folder.skipped if s.kind in LINK_KINDS],
        nested=folder.nested,
        layout_problems=folder.problems,
        unfinished_runs=[u.describe() for folder_ in {Path(root), *([Path(runs)] if runs else [])}
                         for u in unfinished_in(folder_) if not u.running and not u.finished],
    )
    _judge(report)
    return report


def _inspect_all(paths: list[str], workers: int | None) -> list[dict[str, Any]]:
    workers = workers or usable_cpus()
    chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]
    out: list[dict[str, Any]] = []
    with progress_task("Inspecting images", len(paths)) as advance:
        if workers == 1 or len(paths) < 1000:
            for chunk in chunks:
                out += _inspect_chunk(chunk)
                advance(len(chunk))
            return out
        with process_pool(workers) as pool:
            for chunk, result in zip(chunks, pool.map(_inspect_chunk, chunks)):
                out += result
                advance(len(chunk))
    return out


def _counts(folder: ImageFolder, records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    readable = {r["path"] for r in records if "error" not in r}
    counts: dict[str, dict[str, int]] = {}
    for f in folder.files:
        per_class = counts.setdefault(f.split, {name: 0 for name in folder.class_names})
        if str(f.path) in readable:
            per_class[folder.class_names[f.label]] += 1
    return counts or {"train": {name: 0 for name in folder.class_names}}


def _sizes(records: list[dict[str, Any]]) -> dict[str, Any]:
    if not records:
        return {}
    widths = np.array([r["width"] for r in records])
    heights = np.array([r["height"] for r in records])
    common = Counter(f"{r['width']}x{r['height']}" for r in records).most_common(5)
    return {"width": {"min": int(widths.min()), "median": float(np.median(widths)), "max": int(widths.max())},
            "height": {"min": int(heights.min()), "median": float(np.median(heights)), "max": int(heights.max())},
            "most_common": dict(common), "distinct": len({(r["width"], r["height"]) for r in records})}


def _describe_group(paths: list[str], split_of: dict[str, str], class_of: dict[str, str]) -> dict[str, Any]:
    splits = sorted({split_of[p] for p in paths})
    classes = sorted({class_of[p] for p in paths})
    kind = "across splits (leakage)" if len(splits) > 1 else "within " + splits[0]
    if len(classes) > 1:
        kind += ", different classes (label conflict)"
    return {"paths": paths, "splits": splits, "classes": classes, "kind": kind}


def _exact_duplicates(records, split_of, class_of) -> list[dict[str, Any]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for r in records:
        if r.get("sha256"):
            groups[r["sha256"]].append(r["path"])
    return [_describe_group(p, split_of, class_of) for p in groups.values() if len(p) > 1]


def _near_duplicates(records, split_of, class_of, max_bits: int) -> list[dict[str, Any]]:
    """Pairs of different files whose dHashes differ in at most ``max_bits`` bits."""
    if len(records) < 2:
        return []
    hashes = np.array([r["gray"] for r in records], dtype=np.uint64)
    sha = [r["sha256"] for r in records]
    pairs: set[tuple[int, int]] = set()
    for band in range(4):
        keys = (hashes >> np.uint64(16 * band)) & np.uint64(0xFFFF)
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, key in enumerate(keys.tolist()):
            buckets[key].append(i)
        for members in buckets.values():
            if len(members) < 2 or len(members) > _BUCKET_LIMIT:
                continue
            idx = np.array(members)
            xor = hashes[idx][:, None] ^ hashes[idx][None, :]
            distance = np.unpackbits(xor.view(np.uint8), axis=-1).reshape(len(idx), len(idx), 64).sum(-1)
            for a, b in zip(*np.nonzero(np.triu(distance <= max_bits, k=1))):
                i, j = int(idx[a]), int(idx[b])
                if sha[i] != sha[j] and _thumbs_agree(records[i]["thumb"], records[j]["thumb"]):
                    pairs.add((min(i, j), max(i, j)))
    parent = list(range(len(records)))  # union-find: a photo saved in 9 formats is one group, not 36 pairs

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in sorted({k for pair in pairs for k in pair}):
        groups[find(i)].append(i)
    out = []
    for members in groups.values():
        group = _describe_group([records[i]["path"] for i in members], split_of, class_of)
        group["max_distance_bits"] = max(int(bin(int(hashes[i] ^ hashes[j])).count("1"))
                                         for i in members for j in members)
        out.append(group)
    return sorted(out, key=lambda g: g["paths"])


def _thumbs_agree(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16)))) <= NEAR_DUPLICATE_MEAN_DIFF


def _judge(report: DoctorReport) -> None:
    """Turn findings into problems (should be fixed) and notes (worth knowing)."""
    p, n = report.problems, report.notes
    train = report.counts.get("train", {})
    p += report.layout_problems
    _judge_links(report)
    if report.unfinished_runs:
        p.append(f"{len(report.unfinished_runs)} unfinished training runs (killed, or stopped by an error): "
                 f"{'; '.join(report.unfinished_runs[:3])}. Continue one with 'cnnkit train --resume RUN', or delete "
                 "its folder.")
    if not report.class_names:
        p.append(f"No class folders in '{report.root}': put one sub-folder per class, e.g. '{report.root}/cat/1.jpg'.")
    elif len(report.class_names) < 2:
        p.append(f"Only one class ('{report.class_names[0]}'): a classifier needs at least 2 class folders.")
    report.imbalance_ratio = imbalance_ratio(train)
    p += class_size_problems(train)
    if report.unreadable:
        p.append(f"{len(report.unreadable)} unreadable image files (training skips them): fix or remove them.")
    leaks = [d for d in report.exact_duplicates if len(d["splits"]) > 1]
    near_leaks = [d for d in report.near_duplicates if len(d["splits"]) > 1]
    conflicts = [d for d in report.exact_duplicates + report.near_duplicates if len(d["classes"]) > 1]
    if leaks:
        p.append(f"{len(leaks)} images appear byte-for-byte in more than one split (train/test leakage inflates "
                 "test accuracy): remove them from one split.")
    if near_leaks:
        p.append(f"{len(near_leaks)} groups of near-duplicates span splits (likely the same photo re-encoded or resized: "
                 "leakage): review them and keep each in one split only.")
    if conflicts:
        p.append(f"{len(conflicts)} duplicate groups carry different class labels (label conflict): fix the labels.")
    within = [d for d in report.exact_duplicates if len(d["splits"]) == 1]
    if within:
        n.append(f"{len(within)} groups of exact duplicates within one split (they weigh those images double).")
    if report.skipped:
        n.append(f"{len(report.skipped)} files are not images or are hidden (ignored by training).")
    if report.modes and set(report.modes) - {"RGB"}:
        n.append(f"Image modes {report.modes}: all are converted to RGB (alpha composited on white) when decoded.")
    if report.sizes.get("distinct", 1) > 1:
        n.append(f"{report.sizes['distinct']} distinct image sizes: all are resized to the model's image size.")


def _judge_links(report: DoctorReport) -> None:
    """Symbolic links: what was not followed or not counted twice, and why."""
    kinds = Counter(link["kind"] for link in report.links)
    messages = {
        "link-outside": "{n} symbolic links lead out of the data folder and were not followed (pass --follow-links to "
                        "use them, or copy the files in)",
        "link-loop": "{n} symbolic links loop back to a folder above them (a synced or hand-arranged folder?): not "
                     "followed; remove them",
        "link-other-class": "{n} files or folders are reachable under two classes or splits through links: each image "
                            "is counted once, under the class folder that really holds it; remove the links",
        "link-broken": "{n} symbolic links point to nothing: remove them",
    }
    for kind, message in messages.items():
        if kinds[kind]:
            report.problems.append(message.format(n=kinds[kind]) + f" (e.g. '{_first(report, kind)}').")
    if kinds["link-duplicate"]:
        report.notes.append(f"{kinds['link-duplicate']} files were reached twice through links within one class: "
                            "counted once.")


def _first(report: DoctorReport, kind: str) -> str:
    return next(link["path"] for link in report.links if link["kind"] == kind)


def print_report(report: DoctorReport, limit: int = 10) -> None:
    """The report as Rich tables on the console."""
    from rich.table import Table

    out = console()
    splits = list(report.counts)
    table = Table(title=f"{esc(report.root)} ({report.layout} layout, {len(report.class_names)} classes)")
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    for name in report.class_names:
        table.add_row(esc(name), *[str(report.counts[s].get(name, 0)) for s in splits])
    table.add_row("[bold]total", *[f"[bold]{sum(report.counts[s].values())}" for s in splits])
    out.print(table)
    if report.sizes:
        w, h = report.sizes["width"], report.sizes["height"]
        out.print(f"sizes: width {w['min']}-{w['max']} (median {w['median']:g}), height {h['min']}-{h['max']} "
                  f"(median {h['median']:g}); most common {report.sizes['most_common']}")
    out.print(f"modes: {report.modes}; formats: {report.formats}; imbalance ratio: {report.imbalance_ratio}",
              markup=False)
    for title, rows in (("unreadable", report.unreadable), ("skipped", report.skipped), ("link", report.links)):
        for row in rows[:limit]:
            out.print(f"  {title}: {esc(row['path'])}: {esc(row['reason'])}", highlight=False)
        if len(rows) > limit:
            out.print(f"  ... and {len(rows) - limit} more {title} (use --format json for all)")
    for title, groups in (("exact duplicates", report.exact_duplicates), ("near-duplicates", report.near_duplicates)):
        for group in groups[:limit]:
            out.print(f"  {title} {group['kind']}: {esc(', '.join(group['paths']))}", highlight=False)
        if len(groups) > limit:
            out.print(f"  ... and {len(groups) - limit} more groups of {title} (use --format json for all)")
    for note in report.notes:
        out.print(f"[cyan]note:[/] {esc(note)}", highlight=False)
    for problem in report.problems:
        out.print(f"[bold yellow]problem:[/] {esc(problem)}", highlight=False)
    if not report.problems:
        out.print("[bold green]no problems found[/]")
