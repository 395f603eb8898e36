"""Robustness report of an ablation job: ``report.json``, ``report.md``, ``report.html`` and ``curve.png``.

:func:`write_report` takes one JSON-able ``results`` dict (validated; a wrong field raises :class:`ReportError`
naming it). All accuracies are FRACTIONS in [0, 1]; ``lo``/``hi`` are the 95% confidence interval the producer
computed (e.g. a bootstrap), null when none was (``evaluate.bootstrap: 0``). Schema (``?`` = optional)::

    {
      "schema"?: "neuroscribe.robustness/1",
      "title"?: str,
      "model": {"spec": str, "arch"?: str, "num_classes"?: int, "class_names"?: [str], "fingerprint"?: str,
                "seed"?: int, "notes"?: str},
      "job": {"dir": str,                 # job directory; unit grid paths are relative to it
              "name"?: str, "created"?: str (ISO time), "neuroscribe_version"?: str, "config"?: {...}},
      "validation": {"name": str,         # e.g. "holdout"; may also appear as a column of the variants
                     "description": str,  # how it was made, e.g. "10% of training images per class, ..."
                     "n": int, "groups"?: {GROUP: n}},
      "test_sets": {NAME: {"description": str, "n": int, "in_distribution"?: bool (default false; at most one true),
                           "groups"?: {GROUP: n}}},
      "ablation": {"method": str ("zero" | "mean"), "flagged_by": str (e.g. "description keywords"),
                   "chosen_n": int, "selection": str (how N was chosen, e.g. "best validation accuracy")},
      "variants": {VARIANT: {                    # "base" required; known order: base, ablated, ablated_evidence,
                       "label"?: str,            #   ablated_both, ablated_group, refit_only, refit, dfr,
                                                 #   ablated_dfr, ablated_dfr_tuned, random, sort_all; others follow
                       "description"?: str, "n_units": int, "units"?: ["layer:unit", ...],
                       "results"?: {SET: ACC},   # SET = a test set name or validation.name; required unless draws
                       "draws"?: [{"seed"?: int, "units"?: [...], "results": {SET: ACC}}]}},  # random: >= 5 draws
      "curve"?: {"n_units": [int], "validation": [acc], "test_sets"?: {NAME: [acc]} (display only),
                 "chosen_n": int},
      "headline"?: {"set": str, "variant": str, "metric"?: str ("accuracy" | "worst-group accuracy"), "n_units": int,
                    "gain": float (points), "gain_lo"?/"gain_hi"?: float
                    (paired 95% CI), "random_best"?/"random_mean"?: float (points, same N), "random_draws"?: int,
                    "excludes_random_best"?: bool (gain_lo above random_best), "rule"?: str},
      "units": [{"layer": str, "unit": int, "description": str, "flags": [{"reason": str, "score"?: float}],
                 "scores"?: {NAME: float}, "grid"?: str (image path relative to job.dir, no ".."),
                 "variants"?: [VARIANT]}]   # the ablated units (chosen N, flagged by descriptions)
    }
    ACC = {"acc": float, "lo": float|null, "hi": float|null, "n": int, "correct"?: int,
           "groups"?: {GROUP: {"acc": float, "lo": float|null, "hi": float|null, "n": int}},
           "worst_group"?: {"name": GROUP, "acc": float, "lo": float|null, "hi": float|null, "n": int}}
    # worst_group: give it to report a CI of the minimum over groups (e.g. a bootstrap of the min); without it
    # the worst group is the group with the lowest accuracy, shown with that group's own CI

A variant with ``draws`` and no ``results`` (the random control) gets per set the MEAN accuracy over draws, with
``lo``/``hi`` the min/max over draws (``interval: "range"``, marked † in the tables) and ``sd``.

``report.json`` holds the validated results plus ``derived``: ``columns`` (set order), ``variant_order``, and per
``variant -> set``: ``acc, lo, hi, n, interval`` (``ci95``/``range``/``none``), ``delta_vs_base``, ``gap_to_id``
(accuracy minus the same variant's in-distribution accuracy), ``worst_group`` (``{name, acc, lo, hi, n}`` or null) and
``cell`` (the table text). ``report.md`` is a Markdown table (rows = variants, columns = sets, cells
``acc% [lo, hi]``) plus worst-group, gap, random-draw and unit tables. ``report.html`` is self-contained (autoescaped,
strict Content-Security-Policy, no scripts, no network; images are relative links or, with ``embed_images``, inline
base64). ``curve.png`` plots accuracy against the number of ablated units. Every file is written atomically.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import statistics
from pathlib import Path
from typing import Any
from urllib.parse import quote

from markupsafe import Markup
from .. import io
from .schema import ReportError, RobustnessResults, _validate

__all__ = ["ReportError", "RobustnessResults", "write_report", "VARIANT_ORDER"]

TEMPLATES = Path(__file__).with_name("templates")
VARIANT_ORDER = ("base", "ablated", "ablated_evidence", "ablated_both", "ablated_group", "refit_only", "refit",
                 "dfr", "ablated_dfr", "ablated_dfr_tuned", "random", "sort_all")
_LABELS = {"base": "base model", "ablated": "ablated (flagged by descriptions)", "ablated_evidence":
           "ablated (flagged by evidence)", "ablated_both": "ablated (descriptions and evidence)",
           "ablated_group": "ablated (flagged by group evidence)", "refit_only": "last layer re-fit alone (control)",
           "refit": "ablated + last layer re-fit", "dfr": "DFR alone (last layer re-fit, group-balanced)",
           "ablated_dfr": "ablated + DFR", "ablated_dfr_tuned": "ablated + DFR, N chosen with DFR",
           "random": "random units (control)",
           "sort_all": "top units by validation gain (control)"}
_CSS = ("body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:.5rem 0 1.5rem}th,td{border:1px solid #ccc;padding:.3rem .5rem;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;white-space:nowrap}"
        "img.grid{max-width:360px;height:auto}img.curve{max-width:100%}.muted{color:#666}code{font-size:90%}"
        "pre{background:#f6f6f6;padding:.5rem;overflow:auto}")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _interval(c: dict) -> str:
    """`` [lo, hi]`` in percent, or nothing when no interval was computed."""
    return "" if c.get("lo") is None else f" [{_pct(c['lo'])}, {_pct(c['hi'])}]"


def _cell(c: dict | None) -> str:
    if c is None:
        return "—"
    return f"{_pct(c['acc'])}%{_interval(c)}" + ("†" if c.get("interval") == "range" else "")


def _derive(r: RobustnessResults) -> dict:
    """Per variant and set: the cell (mean over draws for controls), delta to base, gap to ID, worst group."""
    used = {k for v in r.variants.values() for k in [*(v.results or {})] + [k for d in v.draws or []
                                                                               for k in d.results]}
    columns = ([r.validation.name] if r.validation.name in used else []) + list(r.test_sets)
    order = [k for k in VARIANT_ORDER if k in r.variants] + [k for k in r.variants if k not in VARIANT_ORDER]
    id_set = next((k for k, t in r.test_sets.items() if t.in_distribution), None)
    cells: dict[str, dict[str, dict | None]] = {}
    for name in order:
        v = r.variants[name]
        row: dict[str, dict | None] = {}
        for s in columns:
            if v.results is not None and s in v.results:
                a = v.results[s]
                c = {"acc": a.acc, "lo": a.lo, "hi": a.hi, "n": a.n, "interval": "ci95" if a.lo is not None
                     else "none", "groups": a.groups, "worst_group": a.worst_group}
            else:
                accs = [d.results[s] for d in v.draws or [] if s in d.results]
                if not accs:
                    row[s] = None
                    continue
                xs = [a.acc for a in accs]
                c = {"acc": statistics.fmean(xs), "lo": min(xs), "hi": max(xs), "n": accs[0].n, "interval": "range",
                     "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "draws": len(xs), "groups": None,
                     "worst_group": None}
            groups = {g: ga for g, ga in (c.pop("groups") or {}).items() if ga.n > 0}
            worst = min(groups.items(), key=lambda kv: (kv[1].acc, kv[0])) if groups else None
            given = c.pop("worst_group")
            c["worst_group"] = (given.model_dump() if given is not None else None if worst is None
                                else {"name": worst[0], **worst[1].model_dump()})
            c["groups"] = {g: ga.model_dump() for g, ga in groups.items()} or None
            row[s] = c
        cells[name] = row
    for name, row in cells.items():
        for s, c in row.items():
            if c is None:
                continue
            base = cells["base"].get(s)
            idc = row.get(id_set) if id_set else None
            c["delta_vs_base"] = None if base is None else c["acc"] - base["acc"]
            c["gap_to_id"] = None if idc is None or s == id_set else c["acc"] - idc["acc"]
            c["cell"] = _cell(c)
    return {"columns": columns, "variant_order": order, "in_distribution": id_set, "cells": cells,
            "labels": {k: r.variants[k].label or _LABELS.get(k, k) for k in order}}


def _md(text: Any) -> str:
    """Markdown-safe table text: no pipes, newlines, HTML or emphasis markup."""
    s = str(text).replace("\\", "\\\\").replace("\r", " ").replace("\n", " ")
    for ch in "|*_`[]<>#":
        s = s.replace(ch, "\\" + ch)
    return s


def _code(text: Any) -> str:
    """An inline Markdown code span (its content is literal text); backticks and newlines removed."""
    return "`" + str(text).replace("`", "'").replace("\n", " ").replace("\r", " ") + "`"


def _table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown section: heading and table (cells are inserted as given)."""
    lines = [f"\n## {title}\n\n| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def _points(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f}"


def _headline_text(h) -> str | None:
    """The headline as one plain sentence (escaped by whoever shows it: Markdown or the HTML template)."""
    if h is None:
        return None
    ci = f" [{_points(h.gain_lo)}, {_points(h.gain_hi)}]" if h.gain_lo is not None else ""
    rnd = (f"; best of {h.random_draws} random draws of the same N {_points(h.random_best)}, mean "
           f"{_points(h.random_mean)}" if h.random_draws else "")
    verdict = ("" if h.excludes_random_best is None else "; the CI excludes the best random draw"
               if h.excludes_random_best else "; the CI does not exclude the best random draw")
    return (f"{h.variant} ({h.n_units} units) on {h.set}: {_points(h.gain)} points of {h.metric} vs the base "
            f"model{ci}{rnd}{verdict}")


def _headline_md(h) -> str:
    text = _headline_text(h)
    return "" if text is None else f"- **Headline**: {_md(text)}\n"


def _group_table_data(r: RobustnessResults, order, label: dict, cols) -> list[dict]:
    """Average-group accuracy (GroupDRO / DFR's mean over groups) and, per test set with groups, every group:
    ``[{"title", "header", "rows"}]`` in plain text, for report.md and report.html alike."""
    res = {v: r.variants[v].results or {} for v in order}
    out = []
    if any(a.avg_group is not None for v in order for a in res[v].values()):
        def avg(a) -> str:
            return "—" if a is None or a.avg_group is None else _cell(a.avg_group.model_dump())
        out.append({"title": "Average-group accuracy (%, 95% CI)", "header": ["variant", *cols],
                    "rows": [[label[v], *(avg(res[v].get(c)) for c in cols)] for v in order]})
    for c in cols:
        groups = sorted({g for v in order for g in ((res[v].get(c) and res[v][c].groups) or {})})
        if len(groups) < 2:
            continue
        rows = []
        for v in order:
            gs = (res[v].get(c) and res[v][c].groups) or {}
            rows.append([label[v], *(_cell(gs[g].model_dump()) if g in gs else "—" for g in groups)])
        out.append({"title": f"Per-group accuracy on {c} (%, 95% CI)", "header": ["variant", *groups], "rows": rows})
    return out


def _flag_quality_table(r: RobustnessResults) -> dict | None:
    """Each flag set against the test-set ground truth: ``{"title", "note", "header", "rows"}`` in plain text."""
    q = r.flag_quality
    if q is None:
        return None
    f = lambda v, pct=True: "—" if v is None else f"{100 * v:.1f}" if pct else f"{v:.2f}"  # noqa: E731
    return {"title": f"Flag quality on {q.test_set} (%)",
            "note": f"{q.rule}: {q.truth} of {q.units} units, {q.n_images} images. Measured after the fact; nothing "
                    "was chosen with it. AUC: the description ranking over all described units.",
            "header": ["flag set", "flagged", "share", "precision", "recall", "AUC"],
            "rows": [[k, str(v.flagged), f(v.share), f(v.precision), f(v.recall), f(v.auc, False)]
                     for k, v in q.sets.items()]
                    + ([[f"{k} (pooled truth: {q.pooled.truth} units, {q.pooled.rule})", str(v.flagged), f(v.share),
                         f(v.precision), f(v.recall), f(v.auc, False)] for k, v in q.pooled.sets.items()]
                       if q.pooled else [])}


def _group_tables(r: RobustnessResults, order, label: dict, cols) -> list[str]:
    return [_table(_md(t["title"]), [_md(h) for h in t["header"]], [[_md(row[0]), *row[1:]] for row in t["rows"]])
            for t in _group_table_data(r, order, label, cols)]


def _markdown(r: RobustnessResults, d: dict, grids: dict[int, str | None]) -> str:
    """The Markdown report: header, test sets, the accuracy table, worst groups, gaps, random draws, units."""
    cols, cells, order = d["columns"], d["cells"], d["variant_order"]
    label = {v: _md(d["labels"][v]) for v in order}
    some = lambda key: any(c and c.get(key) for row in cells.values() for c in row.values())  # noqa: E731
    out = [f"# {_md(r.title or 'Robustness report')}\n\n- Model: {_code(r.model.spec)}\n- Job: {_code(r.job.dir)}\n"
           f"- Ablation: {_md(r.ablation.method)}, units flagged by {_md(r.ablation.flagged_by)}; "
           f"chosen N = {r.ablation.chosen_n} ({_md(r.ablation.selection)})\n"
           f"- Validation: {_md(r.validation.name)}, n = {r.validation.n}: {_md(r.validation.description)}\n"
           + _headline_md(r.headline),
           _table("Test sets", ["set", "n", "in-distribution", "description"],
                  [[_md(k), t.n, "yes" if t.in_distribution else "", _md(t.description)]
                   for k, t in r.test_sets.items()]),
           _table("Accuracy (%, 95% CI)", ["variant", "units", *map(_md, cols)],
                  [[label[v], r.variants[v].n_units, *(_cell(cells[v][c]) for c in cols)] for v in order])]
    if any(c and c["interval"] == "range" for row in cells.values() for c in row.values()):
        out.append("\n† mean over random draws; brackets = min and max over draws.\n")
    if some("worst_group"):
        def wg(c: dict | None) -> str:
            w = c and c["worst_group"]
            return "—" if not w else f"{_pct(w['acc'])}{_interval(w)} ({_md(w['name'])})"
        out.append(_table("Worst-group accuracy (%)", ["variant", *map(_md, cols)],
                          [[label[v], *(wg(cells[v][c]) for c in cols)] for v in order]))
    out += _group_tables(r, order, d["labels"], cols)
    fq = _flag_quality_table(r)
    if fq:
        out.append(_table(_md(fq["title"]), fq["header"], [[_md(x) for x in row] for row in fq["rows"]])
                   + "\n" + _md(fq["note"]) + "\n")
    if d["in_distribution"]:
        def gap(c: dict | None) -> str:
            return "—" if not c or c["gap_to_id"] is None else f"{100 * c['gap_to_id']:+.1f}"
        out.append(_table(f"Gap to in-distribution ({_md(d['in_distribution'])}), points", ["variant", *map(_md, cols)],
                          [[label[v], *(gap(cells[v][c]) for c in cols)] for v in order]))
    rnd = r.variants.get("random")
    if rnd is not None and rnd.draws:
        out.append(_table("Random-unit draws (%, 95% CI)", ["draw", "seed", *map(_md, cols)], [
            [i + 1, "" if dr.seed is None else dr.seed,
             *(_cell(dr.results[c].model_dump()) if c in dr.results else "—" for c in cols)]
            for i, dr in enumerate(rnd.draws)]))
    if r.units:
        out.append(_table(f"Ablated units ({len(r.units)})", ["layer", "unit", "description", "flags", "grid"], [
            [_md(u.layer), u.unit, _md(u.description),
             _md("; ".join(f.reason + ("" if f.score is None else f" ({f.score:.3g})") for f in u.flags)),
             f"[grid]({grids[i]})" if grids.get(i) else ""] for i, u in enumerate(r.units)]))
    return "".join(out)


def _plot(r: RobustnessResults, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    c = r.curve
    fig = Figure(figsize=(7.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(c.n_units, [100 * y for y in c.validation], marker="o", lw=2.2, ms=3,
            label=f"validation: {r.validation.name}")
    for name, ys in (c.test_sets or {}).items():
        ax.plot(c.n_units, [100 * y for y in ys], ls="--", lw=1.2, label=f"test: {name} (display only)")
    ax.axvline(c.chosen_n, color="k", ls=":", lw=1.2, label=f"chosen N = {c.chosen_n}")
    ax.set_xlabel("number of ablated units")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs. ablated units")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _grid_links(r: RobustnessResults, out_dir: Path, embed: bool) -> tuple[dict, dict, dict[int, bool]]:
    """Per unit index: a link relative to ``out_dir``, the HTML src (a data: URI when embedding), file exists."""
    rel: dict[int, str | None] = {}
    src: dict[int, str | None] = {}
    exists: dict[int, bool] = {}
    for i, u in enumerate(r.units):
        target = None if u.grid is None else Path(r.job.dir) / u.grid
        exists[i] = target is not None and target.is_file()
        rel[i] = src[i] = None if target is None else quote(
            Path(os.path.relpath(target.absolute(), out_dir.absolute())).as_posix())
        if embed and exists[i]:
            mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(target.suffix.lower(),
                                                                                            "image/png")
            src[i] = f"data:{mime};base64," + base64.b64encode(target.read_bytes()).decode()
    return rel, src, exists


def write_report(results: dict, out_dir: str | Path, *, embed_images: bool = False) -> dict[str, Path]:
    """Validate ``results`` and write report.json, report.md, report.html and (with a curve) curve.png.

    Returns ``{"json", "md", "html"[, "curve"]}`` -> paths. ``embed_images`` inlines unit grids as base64 (a
    larger page that can be moved on its own) instead of linking them relative to ``out_dir``.
    """
    import jinja2
    r = _validate(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = _derive(r)
    rel, grids, exists = _grid_links(r, out, embed_images)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    if r.curve is not None:
        paths["curve"] = out / "curve.png"
        _plot(r, paths["curve"])
    io.write_text(paths["md"], _markdown(r, d, rel))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=_pct, cell=_cell, interval=_interval)
    csp = ("default-src 'none'; style-src 'sha256-" + base64.b64encode(hashlib.sha256(_CSS.encode()).digest())
           .decode() + "'; img-src 'self' file: data:; base-uri 'none'; form-action 'none'")
    html = env.get_template("robustness.html.j2").render(
        r=r, d=d, css=Markup(_CSS), csp=csp, grids=grids, grid_exists=exists, curve="curve.png" if r.curve else None,
        headline=_headline_text(r.headline),
        group_tables=_group_table_data(r, d["variant_order"], d["labels"], d["columns"]),
        flag_quality=_flag_quality_table(r),
        config_json=None if r.job.config is None else json.dumps(r.job.config, indent=1, sort_keys=True, default=str))
    io.write_text(paths["html"], html)
    payload = r.model_dump(mode="json", by_alias=True)
    payload["derived"] = {**d, "units": [{"grid_exists": exists[i]} for i in range(len(r.units))],
                          "files": {k: p.name for k, p in paths.items()}}
    io.write_json(paths["json"], payload)
    return paths
