"""Tests for the description exports and gallery (neuroscribe.describe.exports, .gallery): table exports
(pandas/pyarrow/duckdb) and the static gallery's safety and links.

Descriptions are fake (given here) over a real recording (efficientnet-lite0 on the shipped photos).
"""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from neuroscribe.describe.describers import Described
from neuroscribe.record.exemplars import Recording
from neuroscribe.describe.views import save_unit_views
from neuroscribe.describe.exports import COLUMNS, MILAN_COLUMNS, write_descriptions
from neuroscribe.describe.gallery import layer_page_name, script_json, write_gallery

CONV, FLAT = "_blocks.12", "_fc"
EVIL_LAYER = '"><img src=x onerror=alert(1)>'
XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def job(rec: Recording, tmp_path_factory) -> dict:
    """A job dir with exemplar grids for a few units and fake descriptions (some hostile)."""
    jd = tmp_path_factory.mktemp("job")
    units = [(CONV, 0), (CONV, 1), (CONV, 2), (FLAT, 0), (FLAT, 1)]
    view_paths = {k: save_unit_views(rec, *k, jd / "views") for k in units}
    texts = [f"striped fur {XSS}", 'red truck, "quoted", and\na newline', "ünïcode — 犬", "golden dog", "sky"]
    rows = [Described(l, u, t, score=0.9 - 0.1 * i, backend="fake",
                      candidates=[(t, 0.9 - 0.1 * i), (f"alt {i} {XSS}", 0.1)])
            for i, ((l, u), t) in enumerate(zip(units, texts, strict=True))]
    rows[-1].score = float("nan")
    rows[-1].candidates = []
    rows.append(Described(EVIL_LAYER, 7, f"evil layer {XSS}", 0.5, "fake"))
    faith = {(CONV, 1): {"auc": 0.75, "mad": 0.125}, (FLAT, 0): None}
    paths = write_descriptions(list(reversed(rows)), rec, jd, view_paths, faith)
    index = write_gallery(rows, jd, view_paths, rec=rec, faithfulness=faith)
    return {"dir": jd, "rows": rows, "views": view_paths, "paths": paths, "index": index, "faith": faith}


# --------------------------------------------------------------------------- exports


def _expected_ids(rec: Recording, layer: str, unit: int) -> list[int]:
    return [e.image_id for e in rec.exemplars(layer, unit)]


def test_csv_round_trip_pandas(job: dict, rec: Recording) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(job["paths"]["csv"], keep_default_na=True)
    assert tuple(df.columns[:3]) == MILAN_COLUMNS and tuple(df.columns) == COLUMNS
    assert len(df) == len(job["rows"])
    # ordered by layer (first appearance in the rows given: reversed) then unit
    assert list(df["layer"])[:1] == [EVIL_LAYER] and list(df[df.layer == CONV]["unit"]) == [0, 1, 2]
    by = {(r.layer, int(r.unit)): r for r in df.itertuples()}
    for row in job["rows"]:
        got = by[(row.layer, row.unit)]
        assert got.description == row.description and got.backend == "fake" and got.model == "efficientnet-lite0"
        if math.isnan(row.score):
            assert math.isnan(got.score)
        else:
            assert got.score == pytest.approx(row.score)
        assert json.loads(got.candidates) == [{"text": t, "score": s} for t, s in row.candidates]
        if row.layer != EVIL_LAYER:
            assert [int(x) for x in str(got.exemplar_ids).split()] == _expected_ids(rec, row.layer, row.unit)
            assert not Path(got.grid_path).is_absolute()
            assert (job["dir"] / got.grid_path).resolve() == job["views"][(row.layer, row.unit)]["grid"].resolve()
        else:
            assert isinstance(got.grid_path, float) and math.isnan(got.grid_path)   # empty cell
    assert by[(CONV, 1)].faithfulness_auc == 0.75 and by[(CONV, 1)].faithfulness_mad == 0.125
    assert math.isnan(by[(FLAT, 0)].faithfulness_auc)


def test_jsonl_and_parquet_round_trip(job: dict, rec: Recording) -> None:
    pd = pytest.importorskip("pandas")
    lines = job["paths"]["jsonl"].read_text(encoding="utf-8").splitlines()
    recs = [json.loads(x) for x in lines]
    assert all(list(r)[:3] == list(MILAN_COLUMNS) and list(r) == list(COLUMNS) for r in recs)
    pq = pd.read_parquet(job["paths"]["parquet"])
    js = pd.read_json(job["paths"]["jsonl"], lines=True)
    assert tuple(pq.columns) == COLUMNS and tuple(js.columns) == COLUMNS
    first = {(r["layer"], r["unit"]): r for r in recs}
    for df in (pq, js):
        assert list(df["layer"]) == [r["layer"] for r in recs] and list(df["unit"]) == [r["unit"] for r in recs]
        assert list(df["description"]) == [r["description"] for r in recs]
    row = pq[(pq.layer == CONV) & (pq.unit == 0)].iloc[0]
    assert list(row["exemplar_ids"]) == _expected_ids(rec, CONV, 0) == first[(CONV, 0)]["exemplar_ids"]
    assert [dict(c) for c in row["candidates"]] == first[(CONV, 0)]["candidates"]
    assert first[(FLAT, 1)]["score"] is None and math.isnan(pq[(pq.layer == FLAT) & (pq.unit == 1)].score.iloc[0])
    import pyarrow.parquet as papq
    schema = papq.read_schema(job["paths"]["parquet"])
    assert str(schema.field("exemplar_ids").type) == "list<element: int64>"
    assert str(schema.field("unit").type) == "int64"


def test_duckdb_reads_all_three(job: dict) -> None:
    duckdb = pytest.importorskip("duckdb", reason="duckdb not installed (pip install duckdb)")
    p = job["paths"]
    con = duckdb.connect()
    n = len(job["rows"])
    for fn, path in (("read_csv", p["csv"]), ("read_json", p["jsonl"]), ("read_parquet", p["parquet"])):
        cur = con.execute(f"SELECT * FROM {fn}('{path}')")
        assert [d[0] for d in cur.description][:3] == list(MILAN_COLUMNS), fn
        assert len(cur.fetchall()) == n, fn
        got = con.execute(f"SELECT description FROM {fn}('{path}') WHERE layer = ? AND unit = 1", [CONV]).fetchall()
        assert got == [('red truck, "quoted", and\na newline',)], fn
    ids = con.execute(f"SELECT exemplar_ids, candidates[1].text FROM read_parquet('{p['parquet']}') "
                      "WHERE layer = ? AND unit = 0", [CONV]).fetchall()[0]
    assert isinstance(ids[0], list) and ids[1] == f"striped fur {XSS}"


def test_exports_are_atomic_and_checked(job: dict, rec: Recording, tmp_path: Path) -> None:
    assert not [p for p in job["dir"].iterdir() if p.name.endswith(".tmp")]
    dup = [Described(CONV, 0, "a", 1.0, "x"), Described(CONV, 0, "b", 1.0, "x")]
    with pytest.raises(ValueError, match="unit 0 of layer '_blocks.12' is described twice"):
        write_descriptions(dup, rec, tmp_path)
    with pytest.raises(ValueError, match="score must be a number"):
        write_descriptions([Described(CONV, 0, "a", "high", "x")], rec.meta, tmp_path)
    assert not list(tmp_path.iterdir()), "a failed export left files behind"
    # a plain meta dict works too (no exemplar ids then, unless the row carries them)
    out = write_descriptions([Described(CONV, 0, "a", 1.0, "x", extra={"exemplar_ids": [3, 1]})],
                             {"model": "m"}, tmp_path)
    rec0 = json.loads(out["jsonl"].read_text())
    assert rec0["model"] == "m" and rec0["exemplar_ids"] == [3, 1] and rec0["grid_path"] is None


# --------------------------------------------------------------------------- gallery


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


def _pages(job: dict) -> dict[Path, str]:
    g = job["dir"] / "gallery"
    return {p: p.read_text(encoding="utf-8") for p in sorted(g.glob("*.html"))}


def test_gallery_pages(job: dict) -> None:
    g = job["dir"] / "gallery"
    assert job["index"] == g / "index.html"
    names = {p.name for p in _pages(job)}
    assert names == {"index.html"} | {layer_page_name(l) for l in (CONV, FLAT, EVIL_LAYER)}
    layer = _pages(job)[g / layer_page_name(CONV)]
    for r in job["rows"][:3]:
        assert f'id="unit-{r.unit}"' in layer
    assert "AUC 0.75" in layer and "MAD 0.125" in layer


def test_gallery_escapes_hostile_text(job: dict) -> None:
    for path, html in _pages(job).items():
        assert XSS not in html and "<script>alert" not in html, path.name
        assert "<img src=x" not in html and "onerror=alert(1)>" not in html, path.name
        p = _Tags()
        p.feed(html)
        for tag, attrs in p.tags:
            assert not any(a.lower().startswith("on") for a in attrs), f"{path.name}: event handler on <{tag}>"
        scripts = [(t, a) for t, a in p.tags if t == "script"]
        assert [a.get("type") for _, a in scripts] == (["application/json", None] if path.name == "index.html"
                                                       else [None]), path.name
        assert all(a.get("class") == "grid" for t, a in p.tags if t == "img"), path.name
    index = _pages(job)[job["index"]]
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in index                    # the layer name, as text
    evil = _pages(job)[job["dir"] / "gallery" / layer_page_name(EVIL_LAYER)]
    assert "evil layer &lt;script&gt;alert(1)&lt;/script&gt;" in evil
    # the inline JSON index carries the raw text back intact
    p = _Tags()
    p.feed(index)
    data = json.loads(p.scripts[0])
    assert {u["d"] for u in data["units"]} == {r.description for r in job["rows"]}
    assert EVIL_LAYER in {u["l"] for u in data["units"]}


def test_script_json_cannot_close_the_script() -> None:
    obj = {"d": "</script><script>alert(1)</script> & <!-- \u2028"}
    s = script_json(obj)
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == obj


def test_gallery_links_resolve(job: dict) -> None:
    g = job["dir"] / "gallery"
    n_img = 0
    for path, html in _pages(job).items():
        p = _Tags()
        p.feed(html)
        links = [a[k] for _, a in p.tags for k in ("href", "src") if k in a]
        if path.name == "index.html":
            links += [u["h"] for u in json.loads(p.scripts[0])["units"]]
        for link in links:
            parts = urlsplit(link)
            assert not parts.scheme and not parts.netloc, f"{path.name} links off-site: {link}"
            if parts.path:
                target = (g / unquote(parts.path)).resolve()
                assert target.is_file(), f"{path.name}: {link} -> {target} does not exist"
                n_img += target.suffix == ".jpg"
                if parts.fragment and target.suffix == ".html":
                    assert f'id="{parts.fragment}"' in target.read_text(), link
    assert n_img >= 2 * len(job["views"])       # each grid linked and shown on its layer page


def test_gallery_rerun_removes_stale_pages_and_checks_grids(job: dict, rec: Recording, tmp_path: Path) -> None:
    jd = tmp_path / "j"
    vp = {(CONV, 0): job["views"][(CONV, 0)]}
    write_gallery(job["rows"], jd, vp)
    assert (jd / "gallery" / layer_page_name(FLAT)).is_file()
    write_gallery([job["rows"][0]], jd, vp)
    assert sorted(p.name for p in (jd / "gallery").iterdir()) == ["index.html", layer_page_name(CONV)]
    with pytest.raises(FileNotFoundError, match="exemplar grid of '_blocks.12' unit 0 not found"):
        write_gallery([job["rows"][0]], jd, {(CONV, 0): {"grid": tmp_path / "missing.jpg"}})
    with pytest.raises(ValueError, match="described twice"):
        write_gallery([job["rows"][0], job["rows"][0]], jd, vp)
    p = _Tags()
    p.feed((jd / "gallery" / "index.html").read_text())
    csp = [a["content"] for t, a in p.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert len(csp) == 1 and csp[0].startswith("default-src 'none'; script-src 'sha256-")
