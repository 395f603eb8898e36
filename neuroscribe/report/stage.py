"""The report stage: ``report(cfg)`` assembles ``report.{json,md,html}`` and ``curve.png`` from the job's
``flags.json``, ``ablation.json``, ``evaluation.json`` and ``descriptions.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import JobConfig


def report(cfg: JobConfig) -> dict:
    """Assemble the robustness report (``report.json/.md/.html``, ``curve.png``) from the stage artifacts."""
    from .robustness import write_report
    job = Path(cfg.out)
    abl = json.loads((job / "ablation.json").read_text())
    ev = json.loads((job / "evaluation.json").read_text())
    flags = json.loads((job / "flags.json").read_text())
    desc = {(r["layer"], r["unit"]): r for r in
            (json.loads(l) for l in (job / "descriptions.jsonl").read_text().splitlines() if l.strip())}
    variants = {}
    for vname, units in ev["variants"].items():
        variants[vname] = {"n_units": len(units), "units": [f"{l}:{u}" for l, u in units],
                           "results": ev["results"][vname]}
    variants["random"] = {"n_units": abl["controls"]["n"], "draws": [
        {"seed": cfg.seed, "units": [f"{l}:{u}" for l, u in d], "results": ev["results"][f"random/{i}"]}
        for i, d in enumerate(ev["random_draws"])]}
    main = abl["variants"].get("description", {"curve": [[0, None]], "chosen_n": 0})
    curve = [(n, a) for n, a in main["curve"] if a is not None]
    reasons = {}
    for f in flags["flags"]:
        reasons.setdefault((f["layer"], f["unit"]), []).extend(
            {"reason": r, "score": f.get("similarity")} for r in f.get("reasons") or [])
    units = []
    for l, u in ev["variants"].get("ablated", []):
        d = desc.get((l, u), {})
        units.append({"layer": l, "unit": u, "description": d.get("description", ""),
                      "flags": reasons.get((l, u), []), "grid": d.get("grid_path") or d.get("grid")})
    results = {
        "title": f"neuroscribe robustness report: {cfg.model.spec}",
        "model": {"spec": cfg.model.spec}, "job": {"dir": str(job), "config": json.loads(json.dumps(
            cfg.model_dump(mode="json")))},
        "validation": {"name": "validation", "description": abl["validation"]["description"],
                       "n": abl["validation"]["n"]},
        "test_sets": ev["test_sets"],
        "ablation": {"method": cfg.ablate.method, "flagged_by": "descriptions (keywords + sentence embedding)",
                     "chosen_n": main["chosen_n"], "selection": _selection(abl)},
        "variants": variants,
        "units": units,
    }
    headline = _headline(ev, variants)
    if headline:
        results["headline"] = headline
    if ev.get("flag_quality"):
        results["flag_quality"] = ev["flag_quality"]
    if curve:
        results["curve"] = {"n_units": [n for n, _ in curve], "validation": [a for _, a in curve],
                            "chosen_n": main["chosen_n"]}
    return {k: str(v) for k, v in write_report(results, job).items()}


def _selection(abl: dict) -> str:
    """How N was chosen, in words (with the clean accuracy the chosen N costs on validation, where measured)."""
    tol = abl.get("clean_tolerance")
    text = "N with the best validation accuracy (ties: smaller N)"
    if tol is not None:
        text += f" among the N that cost at most {tol:g} points of clean validation accuracy"
    main = abl["variants"].get("description", {})
    rows = dict((n, a) for n, a in main.get("clean_curve") or [])
    n = main.get("chosen_n", 0)
    if rows and n in rows and 0 in rows:
        text += f"; clean validation accuracy {rows[n]:.1%} at the chosen N, {rows[0]:.1%} unablated"
    return text + ", validation data only"


def _headline(ev: dict, variants: dict) -> dict | None:
    """The description-flag ablation's gain on the shifted test set where the base model is worst (points, paired
    95% CI), beside the best and mean random draw of the same N. Group data with no shifted set: the gain in
    worst-group accuracy on the first test set with groups (no paired CI: the worst group can change). None
    without that variant or either kind of set."""
    res, paired = ev["results"], ev.get("vs_base", {})
    if "ablated" not in res:
        return None
    shifted = [s for s, t in ev["test_sets"].items() if not t.get("in_distribution")]
    grouped = [s for s in ev["test_sets"] if res["base"][s].get("worst_group")]
    if shifted:
        target = min(shifted, key=lambda s: (res["base"][s]["acc"], s))
        score = lambda v: res[v][target]["acc"]  # noqa: E731
        pv = paired.get("ablated", {}).get(target, {})
        metric, rule = "accuracy", "the shifted test set where the base model is worst"
    elif grouped:
        target, pv = grouped[0], {}
        score = lambda v: res[v][target]["worst_group"]["acc"]  # noqa: E731
        metric, rule = "worst-group accuracy", "no shifted test set: worst-group accuracy on the first set with groups"
    else:
        return None
    base = score("base")
    gain = 100 * (score("ablated") - base)
    lo = None if pv.get("lo") is None else 100 * pv["lo"]
    hi = None if pv.get("hi") is None else 100 * pv["hi"]
    draws = [100 * (score(k) - base) for k in sorted(res) if k.startswith("random/")]
    best = max(draws) if draws else None
    return {"set": target, "variant": "ablated", "metric": metric, "n_units": variants["ablated"]["n_units"],
            "gain": gain, "gain_lo": lo, "gain_hi": hi, "random_best": best,
            "random_mean": sum(draws) / len(draws) if draws else None, "random_draws": len(draws),
            "excludes_random_best": None if lo is None or best is None else lo > best,
            "rule": rule + "; gain = points over the base model, CI = paired bootstrap on the same images"}
