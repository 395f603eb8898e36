"""neuroscribe.report.robustness: a results dict with known numbers rendered to JSON, Markdown, HTML and a PNG."""

from __future__ import annotations

import copy
import json
import re

import pytest
from PIL import Image

from neuroscribe.report.robustness import ReportError, write_report

XSS = "<script>alert(1)</script>"


def _acc(acc: float, lo: float, hi: float, n: int = 500, groups: dict | None = None) -> dict:
    a = {"acc": acc, "lo": lo, "hi": hi, "n": n}
    if groups:
        a["groups"] = {g: {"acc": x, "lo": max(0, x - 0.05), "hi": min(1, x + 0.05), "n": n // 2}
                       for g, x in groups.items()}
    return a


def _results(job_dir) -> dict:
    grid = job_dir / "gallery" / "img" / "layer4-7.png"
    grid.parent.mkdir(parents=True)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(grid)
    draws = [{"seed": s, "results": {"val": _acc(0.905 + s / 1000, 0.88, 0.93),
                                     "text-wrong": _acc(0.412 + s / 100, 0.38 + s / 100, 0.44 + s / 100)}}
             for s in range(5)]
    return {
        "title": "MILAN §7 text cue",
        "model": {"spec": "checkpoint:jobs/t/train/seed0/model.safetensors", "arch": "torchvision:resnet18@none",
                  "num_classes": 10, "seed": 0},
        "job": {"dir": str(job_dir), "name": "milan-text", "config": {"train": {"epochs": 30}}},
        "validation": {"name": "holdout", "n": 947,
                       "description": "10% of training images per class; every image carries a wrong class name"},
        "test_sets": {"val": {"description": "Imagenette val, clean", "n": 3925, "in_distribution": True},
                      "text-wrong": {"description": "val with a random wrong class name " + XSS, "n": 3925,
                                     "groups": {"cue-conflicts": 3925}}},
        "ablation": {"method": "zero", "flagged_by": "description keywords", "chosen_n": 8,
                     "selection": "best validation accuracy"},
        "variants": {
            "base": {"n_units": 0, "results": {"holdout": _acc(0.3125, 0.281, 0.344, 947),
                                               "val": _acc(0.9137, 0.9049, 0.9222, 3925),
                                               "text-wrong": _acc(0.4018, 0.3866, 0.4171, 3925,
                                                                  {"cue-conflicts": 0.4018, "short": 0.2234})}},
            "ablated": {"n_units": 8, "description": "flagged: " + XSS,
                        "results": {"holdout": _acc(0.5521, 0.52, 0.584, 947), "val": _acc(0.9011, 0.8917, 0.9104),
                                    "text-wrong": _acc(0.6034, 0.5881, 0.6187)}},
            "random": {"n_units": 8, "draws": draws},
            "sort_all": {"n_units": 8, "results": {"val": _acc(0.8876, 0.8777, 0.8975),
                                                   "text-wrong": _acc(0.6512, 0.6362, 0.6661)}},
        },
        "curve": {"n_units": [0, 1, 2, 4, 8, 16], "validation": [0.3125, 0.35, 0.41, 0.5, 0.5521, 0.54],
                  "test_sets": {"text-wrong": [0.4018, 0.45, 0.5, 0.58, 0.6034, 0.6]}, "chosen_n": 8},
        "units": [{"layer": "layer4", "unit": 7, "description": "the word " + XSS,
                   "flags": [{"reason": "keyword: word", "score": 1.0}], "scores": {"text_effect": 2.5},
                   "grid": "gallery/img/layer4-7.png"},
                  {"layer": "layer3", "unit": 12, "description": "letters & digits", "flags": [{"reason": "keyword"}],
                   "grid": "gallery/img/missing.png"}],
    }


def test_report_files_numbers_and_escaping(tmp_path):
    job = tmp_path / "job"
    res = _results(job)
    res["headline"] = {"set": "text-wrong", "variant": "ablated", "n_units": 8, "gain": 20.2, "gain_lo": 17.0,
                       "gain_hi": 23.4, "random_best": 4.1, "random_mean": 2.0, "random_draws": 5,
                       "excludes_random_best": True}
    paths = write_report(res, job / "report")
    assert set(paths) == {"json", "md", "html", "curve"}
    md, html = paths["md"].read_text(), paths["html"].read_text()
    data = json.loads(paths["json"].read_text())

    for cell in ("91.4% [90.5, 92.2]", "40.2% [38.7, 41.7]", "60.3% [58.8, 61.9]", "31.2% [28.1, 34.4]",
                 "65.1% [63.6, 66.6]"):
        assert cell in md and cell in html, cell
    # random control: mean over the 5 draws, range over draws, marked
    assert "43.2% [41.2, 45.2]†" in md and "43.2% [41.2, 45.2]†" in html
    assert re.search(r"\|\s*ablated \(flagged by descriptions\)\s*\|\s*8\s*\|", md)
    cells = data["derived"]["cells"]
    assert data["derived"]["columns"] == ["holdout", "val", "text-wrong"]
    assert cells["ablated"]["text-wrong"]["acc"] == 0.6034
    assert cells["ablated"]["text-wrong"]["delta_vs_base"] == pytest.approx(0.6034 - 0.4018)
    assert cells["ablated"]["text-wrong"]["gap_to_id"] == pytest.approx(0.6034 - 0.9011)
    assert cells["base"]["val"]["gap_to_id"] is None
    assert cells["base"]["text-wrong"]["worst_group"]["name"] == "short"
    assert cells["base"]["text-wrong"]["worst_group"]["acc"] == 0.2234 and "22.3 [17.3, 27.3]" in md
    # every group's accuracy, per test set with groups: rows = variants, one column per group
    per_group = md.split("Per-group accuracy on text-wrong")[1].split("\n\n")[1]
    row = r"\|\s*base model\s*\|\s*40\.2% \[35\.2, 45\.2\]\s*\|\s*22\.3% \[17\.3, 27\.3\]\s*\|"
    assert re.search(row, per_group), per_group
    assert "Per-group accuracy on val" not in md  # val has no groups
    # the HTML has the same per-group table and the headline, as report.md does
    html_rows = html.split("Per-group accuracy on text-wrong")[1].split("</table>")[0]
    assert re.search(r"<th>base model</th><td class=\"num\">40\.2% \[35\.2, 45\.2\]</td><td class=\"num\">"
                     r"22\.3% \[17\.3, 27\.3\]</td>", html_rows), html_rows
    sentence = ("ablated (8 units) on text-wrong: +20.2 points of accuracy vs the base model [+17.0, +23.4]; best of 5 "
                "random draws of the same N +4.1, mean +2.0; the CI excludes the best random draw")
    assert f"<strong>Headline</strong>: {sentence}" in html
    assert "**Headline**: " + sentence.replace("[", "\\[").replace("]", "\\]") in md
    rnd = cells["random"]["text-wrong"]
    assert rnd["interval"] == "range" and rnd["acc"] == pytest.approx(0.432) and rnd["draws"] == 5
    assert len(data["variants"]["random"]["draws"]) == 5 and data["ablation"]["chosen_n"] == 8
    assert data["derived"]["units"] == [{"grid_exists": True}, {"grid_exists": False}]
    assert "-29.8" in md and "-29.8" in html  # gap of the ablated model on text-wrong, in points

    # never markup: the description is escaped in the HTML and defused in the Markdown
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert XSS not in md and "letters &amp; digits" in html
    assert "<script" not in html.lower()
    assert "http://" not in html and "https://" not in html  # offline: no CDN
    assert 'src="../gallery/img/layer4-7.png"' in html and "missing: gallery/img/missing.png" in html
    assert 'src="curve.png"' in html

    png = paths["curve"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    with Image.open(paths["curve"]) as im:
        im.verify()
    assert not list((job / "report").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_no_bootstrap_and_given_worst_group(tmp_path):
    """``evaluate.bootstrap: 0`` gives no intervals; a worst group computed by the producer is used as given."""
    res = _results(tmp_path / "job")
    for v in res["variants"].values():
        for a in [*v.get("results", {}).values(), *(x for d in v.get("draws", []) for x in d["results"].values())]:
            a["lo"] = a["hi"] = None
            for g in (a.get("groups") or {}).values():
                g["lo"] = g["hi"] = None
    res["variants"]["ablated"]["results"]["text-wrong"]["worst_group"] = {"name": "cue-conflicts", "acc": 0.5556,
                                                                          "lo": 0.5, "hi": 0.6, "n": 100}
    paths = write_report(res, tmp_path / "out")
    md, html = paths["md"].read_text(), paths["html"].read_text()
    assert "| base model | 0 | 31.2% | 91.4% | 40.2% |" in md and "[28.1" not in md
    assert "55.6 [50.0, 60.0] (cue-conflicts)" in md and "22.3 (short)" in md
    cell = json.loads(paths["json"].read_text())["derived"]["cells"]["ablated"]["text-wrong"]
    assert cell["interval"] == "none" and cell["worst_group"]["acc"] == 0.5556
    assert "60.3%" in html


def test_embedded_images(tmp_path):
    paths = write_report(_results(tmp_path / "job"), tmp_path / "elsewhere", embed_images=True)
    html = paths["html"].read_text()
    assert 'src="data:image/png;base64,' in html


@pytest.mark.parametrize("edit, match", [
    (lambda r: r["variants"].pop("base"), "variants.base"),
    (lambda r: r["variants"]["ablated"]["results"]["val"].update(acc=91.0, hi=95.0), "fraction"),
    (lambda r: r["variants"]["random"]["draws"].pop(), "at least 5 draws"),
    (lambda r: r["variants"]["ablated"]["results"].update(nope=r["variants"]["ablated"]["results"]["val"]),
     "unknown sets"),
    (lambda r: r["units"][0].update(grid="../../etc/passwd"), "units.0.grid"),
    (lambda r: r["curve"]["validation"].pop(), "n_units has 6"),
    (lambda r: r["variants"]["base"]["results"]["val"].update(lo=0.95), "lo <= acc <= hi"),
    (lambda r: r["variants"]["base"]["results"]["val"].update(lo=None), "both lo and hi"),
    (lambda r: r["curve"].update(chosen_n=4), "differs from ablation.chosen_n"),
    (lambda r: r.update(headline={"set": "nope", "variant": "ablated", "n_units": 3, "gain": 1.0}), "headline.set"),
    (lambda r: r.update(headline={"set": "val", "variant": "nope", "n_units": 3, "gain": 1.0}), "headline.variant"),
])
def test_invalid_results_name_the_field(tmp_path, edit, match):
    res = copy.deepcopy(_results(tmp_path / "job"))
    edit(res)
    with pytest.raises(ReportError, match=match):
        write_report(res, tmp_path / "out")


def test_headline_takes_the_worst_shifted_set_and_the_best_random_draw():
    from neuroscribe.report.stage import _headline
    acc = lambda a: {"acc": a, "lo": a, "hi": a, "n": 100}  # noqa: E731
    ev = {"test_sets": {"id": {"in_distribution": True}, "shift-a": {}, "shift-b": {}},
          "results": {"base": {"id": acc(0.9), "shift-a": acc(0.5), "shift-b": acc(0.3)},
                      "ablated": {"id": acc(0.88), "shift-a": acc(0.5), "shift-b": acc(0.45)},
                      **{f"random/{i}": {"id": acc(0.9), "shift-a": acc(0.6), "shift-b": acc(0.3 + 0.01 * i)}
                         for i in range(5)}},
          "vs_base": {"ablated": {"shift-b": {"diff": 0.15, "lo": 0.06, "hi": 0.2, "n": 100}}}}
    h = _headline(ev, {"ablated": {"n_units": 7}})
    assert h["set"] == "shift-b" and h["n_units"] == 7  # the base model's worst shifted set, never "id"
    assert h["gain"] == pytest.approx(15.0) and (h["gain_lo"], h["gain_hi"]) == pytest.approx((6.0, 20.0))
    assert h["random_best"] == pytest.approx(4.0) and h["random_mean"] == pytest.approx(2.0)
    assert h["random_draws"] == 5 and h["excludes_random_best"] is True
    ev["vs_base"]["ablated"]["shift-b"]["lo"] = 0.03
    assert _headline(ev, {"ablated": {"n_units": 7}})["excludes_random_best"] is False
    # group data with no shifted set: the worst-group accuracy gain on the first set with groups, no paired CI
    wg = lambda a, w: dict(acc(a), worst_group={"name": "g", "acc": w, "lo": w, "hi": w, "n": 10})  # noqa: E731
    grp = {"test_sets": {"test": {"in_distribution": True}},
           "results": {"base": {"test": wg(0.8, 0.2)}, "ablated": {"test": wg(0.8, 0.35)},
                       **{f"random/{i}": {"test": wg(0.8, 0.2 + 0.01 * i)} for i in range(5)}}}
    h = _headline(grp, {"ablated": {"n_units": 3}})
    assert (h["set"], h["metric"]) == ("test", "worst-group accuracy") and h["gain"] == pytest.approx(15.0)
    assert h["random_best"] == pytest.approx(4.0) and h["gain_lo"] is None and h["excludes_random_best"] is None
    grp["results"]["base"]["test"].pop("worst_group")
    assert _headline(grp, {"ablated": {"n_units": 3}}) is None  # neither a shifted set nor groups
    del ev["results"]["ablated"]
    assert _headline(ev, {}) is None
