"""How a manifest's label column is read, and the check at job start that every test label names a model class.

A manifest (CSV/JSONL, columns ``path[,label][,group]``) labels its images with integers or with names, never both:

* integers are indices into the model's class list (``0`` = its first class); a manifest written by neuroscribe
  names its indices in the ``shift.json`` beside it. An index outside the list is an error naming the row and the
  valid range;
* names are matched to the model's classes by name (:func:`label_map`: exactly, then
  ignoring case, spaces, underscores and hyphens);
* a column mixing the two is an error naming the rows of the rarer kind. An empty label is no label.

:func:`check_job_labels` reads only the label columns (and the class folder names) of every set a job evaluates,
so a label problem stops ``run`` and ``train`` before any work, naming the model's classes and the nearest names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from .probe import ProbeSetError, data_source, folder_classes, manifest_rows
from .readers import FORMATS

__all__ = ["LabelError", "check_job_labels", "is_index", "job_classes", "label_kind", "read_labels"]

_INDEX = re.compile(r"\s*-?\d+\s*")


class LabelError(ProbeSetError):
    """A label column mixes indices and names, or a label is no class of the model; the message names the rows."""


def is_index(value) -> bool:
    """Whether a label is an integer (a JSON number or a string of digits): an index into the class list."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and _INDEX.fullmatch(value) is not None)


def _given(value) -> bool:
    return value not in (None, "")


def _rows(numbers: list[int], most: int = 10) -> str:
    shown = ", ".join(str(n) for n in numbers[:most])
    more = f" and {len(numbers) - most} more" if len(numbers) > most else ""
    return f"row{'s' if len(numbers) > 1 else ''} {shown}{more}"


def _classes(names, most: int = 30) -> str:
    names = [str(n) for n in names]
    return f"{names[:most]}{' ...' if len(names) > most else ''}"


def label_kind(path, rows: list[tuple[int, object]]) -> str | None:
    """``'index'``, ``'name'`` or None (no labels) for a label column given as ``(row number, value)`` pairs;
    raises :class:`LabelError` naming the rows of the rarer kind when the column mixes both."""
    given = [(n, v) for n, v in rows if _given(v)]
    idx = [(n, v) for n, v in given if is_index(v)]
    names = [(n, v) for n, v in given if not is_index(v)]
    if idx and names:
        odd, kind, other = (names, "names", "indices") if len(names) <= len(idx) else (idx, "indices", "names")
        shown = ", ".join(repr(str(v)) for _, v in odd[:5])
        raise LabelError(f"{path}: the label column mixes class indices and class names: {_rows([n for n, _ in odd])} "
                         f"hold{'s' if len(odd) == 1 else ''} {kind} ({shown}) while {len(given) - len(odd)} "
                         f"rows hold {other}. Use one kind: integers are indices into the model's class list, names "
                         "are matched to its classes by name")
    return "index" if idx else "name" if names else None


def read_labels(path, rows: list[tuple[int, object]], classes: list[str] | None = None
                ) -> tuple[list[str] | None, list[int | None]]:
    """``(class names, each row's class index or None)`` for a manifest's label column ``rows``.

    Names: the sorted distinct names, each row indexing them. Integers: indices into the names in ``shift.json``
    beside the manifest when there is one, else into ``classes`` (the model's class list; None = unknown, then
    only negative labels are refused)."""
    path = Path(path)
    kind = label_kind(path, rows)
    if kind == "name":
        names = sorted({str(v) for _, v in rows if _given(v)})
        pos = {n: i for i, n in enumerate(names)}
        return names, [pos[str(v)] if _given(v) else None for _, v in rows]
    meta = path.parent / "shift.json"  # written beside the sets neuroscribe materialises: the names of its indices
    named = json.loads(meta.read_text()).get("class_names") if meta.is_file() else None
    names = list(named or classes or []) or None
    labels = [int(v) if _given(v) else None for _, v in rows]
    bad = [(n, k) for (n, _), k in zip(rows, labels) if k is not None and (k < 0 or names and k >= len(names))]
    if bad:
        whose = (f"the {len(names)} classes named in {meta}" if named else f"the model's {len(names)} classes"
                 ) if names else "the model's classes"
        valid = f"0..{len(names) - 1} ({_classes(names)})" if names else "0 and up (an empty label means no label)"
        raise LabelError(f"{path}: {_rows([n for n, _ in bad])}: label{'s' if len(bad) > 1 else ''} "
                         f"{', '.join(str(k) for _, k in bad[:10])} out of range: integer labels are indices into "
                         f"{whose}, valid {valid}")
    return names, labels


def _group_format(data, classes: list[str] | None = None):
    """A group-format set (:mod:`neuroscribe.datasets.readers`) read whole: its labels are checked as it is read."""
    from .probe import open_probe_set
    return open_probe_set(data.root, data.format, data.split, None, 0, classes, target=data.target,
                          spurious=data.spurious)


def _train_classes(data) -> list[str] | None:
    """The classes a model trained on ``data`` gets (as :func:`neuroscribe.train.classifier.train_classifier`
    names them)."""
    root, fmt = data_source(data.root, data.format)
    if fmt == "imagefolder":
        return folder_classes(root, data.split)
    if fmt in FORMATS:
        return _group_format(data).class_names
    names, labels = read_labels(root, [(n, r.get("label")) for n, r in manifest_rows(root)])
    known = [k for k in labels if k is not None]
    return names or ([str(k) for k in range(max(known) + 1)] if known else None)


def job_classes(cfg) -> list[str] | None:
    """The class list of the model a job evaluates: the classes training gives it when the job trains one, else
    the model's own (a checkpoint's sidecar is read without loading the weights); None when it has none."""
    if cfg.train is not None:
        return _train_classes(cfg.train.data)
    spec = cfg.model.spec
    if spec.startswith("checkpoint:"):
        side = Path(spec.removeprefix("checkpoint:") + ".spec.json").expanduser()
        names = json.loads(side.read_text()).get("class_names") if side.is_file() else None
        if names:
            return [str(n) for n in names]
    from ..models import load_model
    lm = load_model(spec, arch=cfg.model.arch, num_classes=cfg.model.num_classes, allow_pickle=cfg.model.allow_pickle)
    return lm.class_names


def _test_names(where: str, data, classes: list[str] | None) -> list[str] | None:
    """The class names of one test set's labels; unlabelled images, mixed and out-of-range labels are errors."""
    root, fmt = data_source(data.root, data.format)
    if fmt == "imagefolder":
        names = folder_classes(root, data.split)
        if names is None:
            raise LabelError(f"{where}: {root} has no class folders; every test image needs a label (class folders "
                             "or a manifest 'label' column)")
        return names
    if fmt in FORMATS:
        return _group_format(data, classes).class_names
    rows = [(n, r.get("label")) for n, r in manifest_rows(root)]
    missing = [n for n, v in rows if not _given(v)]
    if missing:
        raise LabelError(f"{where}: {root}: {_rows(missing)} {'has' if len(missing) == 1 else 'have'} no label; "
                         "every test image needs one")
    try:
        return read_labels(root, rows, classes)[0]
    except LabelError as e:
        raise LabelError(f"{where}: {e}") from None


def check_job_labels(cfg) -> None:
    """Read the labels of every set ``cfg`` evaluates or draws cues on (``data`` and each shift) and check them
    against the model's class list; raises :class:`LabelError` (or ``ProbeSetError`` for missing data) before any
    work is done."""
    classes = job_classes(cfg)
    for where, data in [("data", cfg.data)] + [(f"shifts[{s.name}].data", s.data) for s in cfg.shifts]:
        names = _test_names(where, data, classes)
        if classes and names and list(names) != list(classes):
            try:
                label_map(names, classes)
            except ValueError as e:
                raise LabelError(f"{where} ({data_source(data.root, data.format)[0]}): {e}") from None


def _norm_name(s: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(s)).strip().lower()


def _wnid_index() -> dict[str, int]:
    try:
        data = json.loads((resources.files("neuroscribe") / "data" / "imagenet_wordnet.json").read_text())
        return {c["wnid"]: int(c["index"]) for c in data["classes"]}
    except (OSError, KeyError, ValueError):
        return {}


def label_map(dataset_classes: Sequence[str], model_classes: Sequence[str]) -> list[int]:
    """``class_index``: the model's logit column for each of the test set's classes, matched by name.

    Names match exactly, then case-, space-, underscore- and hyphen-insensitively; for a 1000-class (ImageNet-1k)
    model a WordNet id (``n01440764``, Imagenette's folder names) matches its ImageNet index. Raises ``ValueError``
    naming every test-set class the model does not know, and for two test-set classes mapped to one column.
    """
    if not dataset_classes:
        raise ValueError("the test set has no class names to map")
    if not model_classes:
        raise ValueError("the model has no class names; pass class_index explicitly (or None when the test set "
                         "uses the model's own class numbering)")
    exact = {str(n): i for i, n in reversed(list(enumerate(model_classes)))}
    loose = {_norm_name(n): i for i, n in reversed(list(enumerate(model_classes)))}
    wnids = _wnid_index() if len(model_classes) == 1000 else {}
    out, unknown = [], []
    for c in dataset_classes:
        c = str(c)
        i = exact.get(c, loose.get(_norm_name(c), wnids.get(c)))
        if i is None:
            unknown.append(c)
        out.append(-1 if i is None else i)
    if unknown:
        raise ValueError(_unknown_classes(unknown, [str(n) for n in model_classes]))
    dup = sorted({dataset_classes[k] for k, i in enumerate(out) if out.count(i) > 1})
    if dup:
        raise ValueError(f"test-set classes {dup} map to the same model class")
    return out


def _unknown_classes(unknown: list[str], model: list[str]) -> str:
    """The message for test-set classes the model lacks: the nearest model classes of each and the model's list."""
    import difflib
    hints = {c: difflib.get_close_matches(c, model, n=3, cutoff=0.5) or difflib.get_close_matches(c, model, n=2,
                                                                                                   cutoff=0.0)
             for c in unknown[:10]}
    shown = f"{model[:30]}{' ...' if len(model) > 30 else ''}"
    return (f"the test set has {len(unknown)} classes the model does not know: {unknown[:20]}"
            f"{' ...' if len(unknown) > 20 else ''} (nearest model classes: {hints}); the model's "
            f"{len(model)} classes: {shown}. Integer labels are indices into this list; names are matched by name")
