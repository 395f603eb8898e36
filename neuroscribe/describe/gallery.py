"""A static, offline HTML gallery of a job's unit descriptions: ``JOBDIR/gallery/``.

- ``index.html``: per layer, how many units were described (and recorded, when the Recording is given), how
  many have an exemplar grid, the mean score and the backends, linking to the layer's page; plus a search box
  that filters units across all layers by their description and candidate text (inline JS over an inline JSON
  index);
- ``layer-<name>.html`` (name made file-safe by :func:`neuroscribe.describe.views.safe_name`): every described
  unit with its description, score, backend, candidates, faithfulness (when given) and its exemplar grid image
  (a relative link), with a filter box.

Safety: templates are rendered with autoescaping, so descriptions and layer names are always text, never markup;
the JSON index sits in a ``<script type="application/json">`` block with ``<``, ``>`` and ``&`` escaped, so no
description can close it; a Content-Security-Policy lets only the page's own (hashed) script and style run and
forbids every network fetch. Pages open from ``file://`` with no server and no CDN. Writes are atomic and layer
pages left over from an earlier run with other layers are removed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from markupsafe import Markup

from .. import io
from .views import safe_name

if TYPE_CHECKING:  # pragma: no cover
    from .describers import Described
    from ..record.exemplars import Recording

__all__ = ["write_gallery", "layer_page_name", "script_json"]

TEMPLATES = Path(__file__).with_name("templates")
UnitKey = tuple[str, int]


def layer_page_name(layer: str) -> str:
    """The gallery file name of ``layer``'s page."""
    return f"layer-{safe_name(layer)}.html"


def script_json(obj: Any) -> str:
    """JSON that is safe inside an HTML ``<script>`` element: ``<``, ``>``, ``&``, U+2028/9 are \\u-escaped."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


@lru_cache(maxsize=1)
def _env():
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    script = (TEMPLATES / "gallery.js").read_text(encoding="utf-8")
    css = (TEMPLATES / "gallery.css").read_text(encoding="utf-8")
    csp = (f"default-src 'none'; script-src {_sha256(script)}; style-src {_sha256(css)}; "
           "img-src 'self' file: data:; base-uri 'none'; form-action 'none'")
    env.globals.update(script=Markup(script), css=Markup(css), csp=csp)
    return env


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "—" if math.isnan(f) else f"{f:.3g}"


def _href(target: Path, base: Path) -> str:
    """A URL-quoted POSIX relative link from directory ``base`` to ``target``."""
    return quote(Path(os.path.relpath(Path(target).resolve(), base.resolve())).as_posix())


def _grid_size(path: Path) -> tuple[int, int] | None:
    try:
        from PIL import Image
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError):
        return None


def _faith_text(f: Mapping | None) -> str | None:
    if not f:
        return None
    auc, mad = f.get("auc", f.get("faithfulness_auc")), f.get("mad", f.get("faithfulness_mad"))
    if auc is None and mad is None and f.get("note"):
        return f"not measured: {f['note']}"
    return f"AUC {_fmt(auc)} · MAD {_fmt(mad)}"


def _verify_text(v: Mapping | None) -> str | None:
    if not v or not v.get("status"):
        return None
    if v.get("kind") is None:
        return str(v["status"])
    return (f"{v['status']} ({v['kind']}: {v.get('target')}; effect {_fmt(v.get('effect'))} · "
            f"AUC {_fmt(v.get('auc'))} · response {_fmt(v.get('response'))})")


def write_gallery(rows: Sequence["Described"], job_dir: str | Path,
                  view_paths: Mapping[UnitKey, Mapping] | None = None, *, rec: "Recording | None" = None,
                  faithfulness: Mapping[UnitKey, Mapping | None] | None = None,
                  verification: Mapping[UnitKey, Mapping] | None = None,
                  title: str = "neuroscribe unit descriptions") -> Path:
    """Write the gallery into ``job_dir/gallery/`` and return the path of its ``index.html``.

    ``view_paths[(layer, unit)]["grid"]`` (from :func:`save_unit_views`) is the unit's exemplar grid; it must be
    an existing file (relative paths are relative to the working directory) and is linked relatively, so the
    job directory can be moved or archived whole. ``rec`` adds the model spec and per-layer unit totals.
    """
    job_dir = Path(job_dir)
    gdir = job_dir / "gallery"
    gdir.mkdir(parents=True, exist_ok=True)
    view_paths = view_paths or {}
    faithfulness = faithfulness or {}
    env = _env()
    model = None
    if rec is not None:
        m = rec.meta.get("model")
        model = str(m.get("spec") if isinstance(m, Mapping) else m) if m is not None else None

    by_layer: dict[str, list] = {}
    seen: set[UnitKey] = set()
    for r in rows:
        key = (str(r.layer), int(r.unit))
        if key in seen:
            raise ValueError(f"unit {key[1]} of layer {key[0]!r} is described twice; the gallery needs one row "
                             "per unit")
        seen.add(key)
        by_layer.setdefault(key[0], []).append(r)
    pages = {layer: layer_page_name(layer) for layer in by_layer}
    # pragma below: safe_name hashes every changed name, so this needs a hash collision
    if len(set(pages.values())) != len(pages):  # pragma: no cover
        raise ValueError(f"two layers map to the same gallery page: {pages}")

    layers_ctx, index_units = [], []
    for layer, lrows in by_layer.items():
        lrows = sorted(lrows, key=lambda r: int(r.unit))
        units_ctx, scores, n_grids = [], [], 0
        for r in lrows:
            key = (layer, int(r.unit))
            grid = (view_paths.get(key) or {}).get("grid")
            grid_href = grid_size = None
            if grid:
                gp = Path(grid)
                if not gp.is_file():
                    raise FileNotFoundError(f"exemplar grid of {layer!r} unit {key[1]} not found: {gp} (write "
                                            "it with save_unit_views before the gallery)")
                grid_href, grid_size, n_grids = _href(gp, gdir), _grid_size(gp), n_grids + 1
            cands = [(str(t), _fmt(s)) for t, s in (r.candidates or [])]
            score = None if r.score is None or (isinstance(r.score, float) and math.isnan(r.score)) else r.score
            if score is not None:
                scores.append(float(score))
            search = "\n".join([str(r.description), *(t for t, _ in cands), f"unit {key[1]}"]).lower()
            units_ctx.append({"unit": key[1], "description": str(r.description), "score": _fmt(score),
                              "backend": str(r.backend), "candidates": cands, "grid": grid_href,
                              "grid_size": grid_size, "search": search,
                              "faithfulness": _faith_text(faithfulness.get(key)),
                              "verification": _verify_text((verification or {}).get(key))})
            index_units.append({"l": layer, "u": key[1], "d": str(r.description), "s": _fmt(score) if
                                score is not None else None, "c": " ".join(t for t, _ in cands),
                                "h": f"{quote(pages[layer])}#unit-{key[1]}"})
        html = env.get_template("layer.html").render(title=title, model=model, layer=layer, units=units_ctx)
        io.write_text(gdir / pages[layer], html)
        total = None
        if rec is not None and layer in rec.layers:
            total = rec.units(layer)
        layers_ctx.append({"name": layer, "href": quote(pages[layer]), "n_units": len(lrows), "n_grids": n_grids,
                           "total": total, "mean_score": _fmt(sum(scores) / len(scores)) if scores else "—",
                           "backends": sorted({str(r.backend) for r in lrows})})

    index = env.get_template("index.html").render(
        title=title, model=model, layers=layers_ctx, n_units=len(seen), has_totals=rec is not None,
        index_json=Markup(script_json({"units": index_units})))
    io.write_text(gdir / "index.html", index)
    keep = set(pages.values())
    for stale in gdir.glob("layer-*.html"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return gdir / "index.html"
