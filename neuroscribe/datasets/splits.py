"""Samples drawn from a labelled set: class-stratified, seeded, and disjoint from what must not be touched.

Every sample the pipeline draws to choose or fit something (evidence pairs, ground truth, subsets) goes through
:func:`stratified_sample`, never ``range(n)``: image folders are class-sorted, so the first N images are one or two
classes.
"""

from __future__ import annotations

import hashlib
import random
from typing import Iterable, Sequence

__all__ = ["stratified_sample"]


def _rng(seed: int, *parts: object) -> random.Random:
    digest = hashlib.sha256("|".join(map(str, (seed,) + parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def stratified_sample(labels: Sequence[int], n: int, seed: int, *, exclude: Iterable[int] = (),
                      purpose: str = "") -> list[int]:
    """``n`` indices into ``labels``, spread over the classes as evenly as their sizes allow, seeded.

    Each class contributes ``floor(n / C)`` or one more (the extra ones go to the classes with the most images left,
    ties by class); a class with too few images gives all it has and the rest is filled from the others. Indices
    in ``exclude`` are never drawn. ``purpose`` names the sample so that two samples of one set with the same seed
    are independent draws. Returns sorted indices; all of them when ``n`` is at least the number available."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    banned = set(exclude)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        if i not in banned:
            by_class.setdefault(int(y), []).append(i)
    for c, ids in by_class.items():
        _rng(seed, purpose, c).shuffle(ids)
    if n >= sum(len(v) for v in by_class.values()):
        return sorted(i for v in by_class.values() for i in v)
    take = {c: 0 for c in by_class}
    left = n
    while left:
        open_classes = [c for c in by_class if take[c] < len(by_class[c])]
        share = max(1, left // len(open_classes))
        for c in sorted(open_classes, key=lambda c: (-(len(by_class[c]) - take[c]), c)):
            step = min(share, len(by_class[c]) - take[c], left)
            take[c] += step
            left -= step
            if not left:
                break
    return sorted(i for c, ids in by_class.items() for i in ids[:take[c]])
