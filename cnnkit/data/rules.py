"""The rules for class sizes, used by ``cnnkit train`` (warnings) and ``cnnkit doctor`` (problems).

One rule set, so the two commands never disagree about what counts as too few images or too
imbalanced a folder.
"""

from __future__ import annotations

# Below ~10 training images a class can hardly be learnt, and its validation accuracy swings by 10
# points or more with a single image.
MIN_IMAGES_PER_CLASS = 10
# Largest / smallest class above this: accuracy mostly reflects the large classes.
IMBALANCE_RATIO = 5.0


def imbalance_ratio(counts: dict[str, int]) -> float | None:
    """Largest over smallest non-empty class (None when no class has images)."""
    nonzero = [n for n in counts.values() if n]
    return round(max(nonzero) / min(nonzero), 2) if nonzero else None


def class_size_problems(counts: dict[str, int], class_weighted: bool = False) -> list[str]:
    """What is wrong with the training split's class sizes, in words (empty list: nothing).

    Args:
        counts: class name -> number of usable training images.
        class_weighted: the loss is already weighted by class (``--class-weight auto``): the advice
            for an imbalance leaves that out.
    """
    problems = [f"Class '{name}' has no readable training image: add images or remove the folder."
                for name, n in counts.items() if n == 0]
    tiny = [f"'{name}' has only {n}" for name, n in counts.items() if 0 < n < MIN_IMAGES_PER_CLASS]
    if tiny:
        problems.append(
            f"Classes with fewer than {MIN_IMAGES_PER_CLASS} training images: {', '.join(tiny)}. The model can "
            "hardly learn them and their validation accuracy is noise: add images to those classes.")
    ratio = imbalance_ratio(counts)
    if ratio is not None and ratio > IMBALANCE_RATIO:
        nonzero = [n for n in counts.values() if n]
        fix = ("the loss is weighted by class (--class-weight auto), but add images of the small classes if you can"
               if class_weighted else "add images of the small classes or train with --class-weight auto")
        problems.append(
            f"Classes are imbalanced {ratio:g}:1 ({max(nonzero)} vs {min(nonzero)} training images): accuracy will "
            f"favour the large classes. {fix[0].upper()}{fix[1:]}, and judge the model by per-class recall "
            "('cnnkit evaluate').")
    return problems
