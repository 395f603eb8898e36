"""Descriptions as tables: ``descriptions.csv``, ``descriptions.jsonl`` and ``descriptions.parquet``.

One row per described unit, the same fields in all three files, MILAN's ``layer,unit,description`` first:

==================  ==========================================================================================
layer, unit         the unit (``unit`` an integer)
description         the best phrase
model               the recorded model's spec
score               the describer's score for ``description`` (empty/null when NaN)
backend             the describer backend (tagger, captioner, clip, ...)
faithfulness_auc    from the ablation stage, when given (empty/null otherwise)
faithfulness_mad    from the ablation stage, when given (empty/null otherwise)
faithfulness_note   why a unit has no faithfulness values (e.g. its description names no probe class)
verify_kind         the intervention the description's words became (text, colour, object; empty: none)
verify_target       what it rendered, painted or pasted (the word, the colour, the object's description)
verify_status       confirmed, not confirmed, unverifiable (empty: verification off)
verify_effect       mean(treated - control) / sd of the unit, on images where it is quiet
verify_auc          P(treated > control) on those images
verify_response     mean(treated - unedited) / sd of the unit, on every image: how far the words' edit moves it
exemplar_ids        the unit's exemplar image ids, best first (CSV: space-separated; JSONL/Parquet: a list)
grid_path           the unit's exemplar grid image, POSIX path relative to the job directory (or empty)
candidates          ranked alternatives as ``[{"text": ..., "score": ...}, ...]`` (CSV: that list as JSON)
==================  ==========================================================================================

The CSV is plain RFC 4180 (UTF-8, quoted where needed) and the Parquet file has typed list columns, so
``pandas.read_csv`` / ``pandas.read_parquet`` / ``pandas.read_json(lines=True)`` and DuckDB's ``read_csv``,
``read_json`` and ``read_parquet`` read them with no glue. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import io

if TYPE_CHECKING:  # pragma: no cover
    from .describers import Described
    from ..record.exemplars import Recording

__all__ = ["COLUMNS", "MILAN_COLUMNS", "export_rows", "write_descriptions"]

MILAN_COLUMNS = ("layer", "unit", "description")
VERIFY_COLUMNS = ("verify_kind", "verify_target", "verify_status", "verify_effect", "verify_auc",
                  "verify_response")
COLUMNS = MILAN_COLUMNS + ("model", "score", "backend", "faithfulness_auc", "faithfulness_mad",
                           "faithfulness_note") + VERIFY_COLUMNS \
    + ("exemplar_ids", "grid_path", "candidates")

UnitKey = tuple[str, int]


def _float(v: Any, what: str) -> float | None:
    """A finite float, or None for missing/NaN; anything else non-numeric is an error naming ``what``."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number or None; got {v!r}") from None
    return None if math.isnan(f) else f


def _model_of(rec: "Recording | Mapping | None") -> str | None:
    meta = getattr(rec, "meta", rec)
    if meta is None:
        return None
    if not isinstance(meta, Mapping):
        raise TypeError(f"rec must be a Recording or its meta dict; got {type(rec).__name__}")
    m = meta.get("model")
    if isinstance(m, Mapping):
        m = m.get("spec")
    return None if m is None else str(m)


def _exemplar_ids(rec: "Recording | Mapping | None", row: "Described") -> list[int]:
    ids = row.extra.get("exemplar_ids") if isinstance(row.extra, Mapping) else None
    tensors = getattr(rec, "tensors", None)
    if ids is None and tensors is not None:
        try:
            ids = tensors(row.layer)["ids"][row.unit].tolist()
        except (KeyError, IndexError):
            ids = []
    return [int(i) for i in (ids or []) if int(i) >= 0]


def _faith(faithfulness: Mapping | None, key: UnitKey) -> tuple[float | None, float | None]:
    f = (faithfulness or {}).get(key)
    if f is None:
        return None, None
    if not isinstance(f, Mapping):
        raise TypeError(f"faithfulness[{key!r}] must be a dict with 'auc'/'mad' (or None); got {f!r}")
    auc = f.get("auc", f.get("faithfulness_auc"))
    mad = f.get("mad", f.get("faithfulness_mad"))
    return _float(auc, f"faithfulness[{key!r}]['auc']"), _float(mad, f"faithfulness[{key!r}]['mad']")


def _rel(path: str | Path | None, job_dir: Path) -> str | None:
    if path is None or str(path) == "":
        return None
    # a relative path is relative to the working directory, like any path (save_unit_views returns them so)
    return Path(os.path.relpath(Path(path).resolve(), job_dir.resolve())).as_posix()


def export_rows(rows: Sequence["Described"], rec: "Recording | Mapping | None" = None,
                view_paths: Mapping[UnitKey, Mapping] | None = None,
                faithfulness: Mapping[UnitKey, Mapping | None] | None = None,
                job_dir: str | Path = ".", verification: Mapping[UnitKey, Mapping] | None = None
                ) -> list[dict[str, Any]]:
    """The export records (one dict per unit, keys in :data:`COLUMNS` order; lists as lists).

    Rows are ordered by layer (first appearance) then unit; a unit described twice is an error.
    ``view_paths[(layer, unit)]["grid"]`` is a path as :func:`save_unit_views` returns it (absolute, or
    relative to the working directory); it is stored relative to ``job_dir``.
    """
    job_dir = Path(job_dir)
    model = _model_of(rec)
    seen: dict[UnitKey, int] = {}
    layer_order: dict[str, int] = {}
    for i, r in enumerate(rows):
        key = (str(r.layer), int(r.unit))
        if key in seen:
            raise ValueError(f"unit {key[1]} of layer {key[0]!r} is described twice (rows {seen[key]} and {i})")
        seen[key] = i
        layer_order.setdefault(key[0], len(layer_order))
    out = []
    for r in sorted(rows, key=lambda r: (layer_order[str(r.layer)], int(r.unit))):
        key = (str(r.layer), int(r.unit))
        auc, mad = _faith(faithfulness, key)
        vp = (view_paths or {}).get(key) or {}
        ver = (verification or {}).get(key) or {}
        cands = []
        for j, c in enumerate(r.candidates or []):
            try:
                text, score = c
            except (TypeError, ValueError):
                raise ValueError(f"{key!r}: candidate {j} must be a (text, score) pair; got {c!r}") from None
            cands.append({"text": str(text), "score": _float(score, f"{key!r} candidate {j} score")})
        out.append({
            "layer": key[0], "unit": key[1], "description": str(r.description), "model": model,
            "score": _float(r.score, f"{key!r} score"), "backend": str(r.backend),
            "faithfulness_auc": auc, "faithfulness_mad": mad,
            "faithfulness_note": ((faithfulness or {}).get(key) or {}).get("note"), "verify_kind": ver.get("kind"),
            "verify_target": ver.get("target"), "verify_status": ver.get("status"),
            "verify_effect": _float(ver.get("effect"), f"{key!r} verify effect"),
            "verify_auc": _float(ver.get("auc"), f"{key!r} verify auc"),
            "verify_response": _float(ver.get("response"), f"{key!r} verify response"),
            "exemplar_ids": _exemplar_ids(rec, r),
            "grid_path": _rel(vp.get("grid"), job_dir), "candidates": cands,
        })
    return out


def _csv_text(records: list[dict[str, Any]]) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(COLUMNS)
    for rec in records:
        cells = []
        for c in COLUMNS:
            v = rec[c]
            if c == "exemplar_ids":
                v = " ".join(map(str, v))
            elif c == "candidates":
                v = json.dumps(v, ensure_ascii=False)
            elif v is None:
                v = ""
            elif isinstance(v, float):
                v = repr(v)
            cells.append(v)
        w.writerow(cells)
    return buf.getvalue()


def _parquet_table(records: list[dict[str, Any]]):
    import pyarrow as pa
    schema = pa.schema([
        ("layer", pa.string()), ("unit", pa.int64()), ("description", pa.string()), ("model", pa.string()),
        ("score", pa.float64()), ("backend", pa.string()), ("faithfulness_auc", pa.float64()),
        ("faithfulness_mad", pa.float64()), ("faithfulness_note", pa.string()), ("verify_kind", pa.string()),
        ("verify_target", pa.string()),
        ("verify_status", pa.string()), ("verify_effect", pa.float64()), ("verify_auc", pa.float64()),
        ("verify_response", pa.float64()),
        ("exemplar_ids", pa.list_(pa.int64())), ("grid_path", pa.string()),
        ("candidates", pa.list_(pa.struct([("text", pa.string()), ("score", pa.float64())]))),
    ])
    return pa.Table.from_pylist(records, schema=schema)


def write_descriptions(rows: Sequence["Described"], rec: "Recording | Mapping | None", out_dir: str | Path,
                       view_paths: Mapping[UnitKey, Mapping] | None = None,
                       faithfulness: Mapping[UnitKey, Mapping | None] | None = None, *,
                       job_dir: str | Path | None = None, stem: str = "descriptions",
                       verification: Mapping[UnitKey, Mapping] | None = None) -> dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.jsonl`` and ``<stem>.parquet`` into ``out_dir`` atomically.

    ``rec`` is the :class:`Recording` (or its ``meta`` dict) the rows describe: it gives the model spec and,
    unless a row carries ``extra["exemplar_ids"]``, the exemplar ids. ``view_paths`` maps ``(layer, unit)`` to
    :func:`neuroscribe.describe.views.save_unit_views` output; ``faithfulness`` maps ``(layer, unit)`` to
    ``{"auc": float, "mad": float}`` or None. Grid paths are stored relative to ``job_dir`` (default
    ``out_dir``, the job directory). Returns ``{"csv": Path, "jsonl": Path, "parquet": Path}``.
    """
    import pyarrow.parquet as pq
    out_dir = Path(out_dir)
    records = export_rows(rows, rec, view_paths, faithfulness, out_dir if job_dir is None else job_dir,
                          verification)
    paths = {"csv": out_dir / f"{stem}.csv", "jsonl": out_dir / f"{stem}.jsonl",
             "parquet": out_dir / f"{stem}.parquet"}
    with io.atomic_path(paths["csv"]) as tmp:
        tmp.write_text(_csv_text(records), encoding="utf-8", newline="")
    lines = [json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records]
    with io.atomic_path(paths["jsonl"]) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8", newline="")
    with io.atomic_path(paths["parquet"]) as tmp:
        pq.write_table(_parquet_table(records), tmp)
    return paths
