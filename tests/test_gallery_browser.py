"""The static gallery in a real headless browser (Chromium driven by Playwright), opened from file://.

Needs the Chromium binary (Debian: ``apt-get install -y chromium``; or set ``NEUROSCRIBE_CHROMIUM`` to its
path) and the ``playwright`` Python package (its own browser download is not used). Skips only when no
Chromium binary is found. Set ``NEUROSCRIBE_GALLERY_SCREENSHOT=/some/file.png`` to keep a screenshot of the
index page after a search.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from neuroscribe.describe.describers import Described
from neuroscribe.record.exemplars import Recording
from neuroscribe.describe.views import save_unit_views
from neuroscribe.describe.gallery import layer_page_name, write_gallery

CONV, FLAT = "_blocks.12", "_fc"
EVIL_LAYER = '"><img src=x onerror=alert(1)>'
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]
DESCRIPTIONS = {
    (CONV, 0): "zebra stripes on fur",
    (CONV, 1): "red fire truck ladder",
    (CONV, 2): "church steeple against sky",
    (FLAT, 0): "golden retriever puppy",
    (FLAT, 1): "zebra crossing road markings",
}


def _chromium() -> str | None:
    env = os.environ.get("NEUROSCRIBE_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium binary (apt-get install -y chromium, or set NEUROSCRIBE_CHROMIUM=/path)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Chromium is installed but the playwright package is not: pip install playwright")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=BROWSER_ARGS, timeout=60_000)
        yield b
        b.close()


@pytest.fixture(scope="module")
def gallery(rec: Recording, tmp_path_factory) -> Path:
    job = tmp_path_factory.mktemp("job with space & 'quote'")   # file:// URLs must be built properly
    views = {k: save_unit_views(rec, *k, job / "views") for k in DESCRIPTIONS}
    rows = [Described(l, u, d, 0.5 + 0.1 * i, "fake", [(d, 0.5), (f"alt {i}", 0.1)])
            for i, ((l, u), d) in enumerate(DESCRIPTIONS.items())]
    rows.append(Described(EVIL_LAYER, 0, "<script>alert(1)</script> zebra", 0.1, "fake"))
    return write_gallery(rows, job, views, rec=rec)


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    events: list[str] = []
    pg.on("dialog", lambda d: (events.append(f"dialog: {d.message}"), d.dismiss()))
    pg.on("pageerror", lambda e: events.append(f"page error: {e}"))
    pg.on("console", lambda m: events.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
          else None)
    pg.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else events.append(f"net: {r.url}"))
    pg.events = events
    yield pg
    ctx.close()


def _hit(pg, layer: str, unit: int):
    return pg.locator(f'li.hit[data-layer="{layer}"][data-unit="{unit}"]')


def test_index_search_filters_units_across_layers(page, gallery: Path) -> None:
    from playwright.sync_api import expect
    page.goto(gallery.as_uri())
    expect(page.locator("table.layers tbody tr")).to_have_count(3)
    box = page.locator("#q")
    box.press_sequentially("truck", delay=20)
    expect(_hit(page, CONV, 1)).to_be_visible()
    expect(_hit(page, CONV, 0)).to_be_hidden()
    expect(_hit(page, FLAT, 0)).to_be_hidden()
    expect(page.locator("#status")).to_have_text("1 matching unit")
    # several terms: all must match; results span layers
    box.fill("zebra")
    expect(_hit(page, CONV, 0)).to_be_visible()
    expect(_hit(page, FLAT, 1)).to_be_visible()
    expect(_hit(page, CONV, 1)).to_be_hidden()
    expect(page.locator("li.hit:visible")).to_have_count(3)        # incl. the hostile layer's unit, as text
    expect(page.locator("li.hit", has_text="<script>alert(1)</script> zebra")).to_be_visible()
    shot = Path(os.environ.get("NEUROSCRIBE_GALLERY_SCREENSHOT") or gallery.parent / "index.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0
    box.fill("zebra road")
    expect(_hit(page, FLAT, 1)).to_be_visible()
    expect(_hit(page, CONV, 0)).to_be_hidden()
    # following a hit lands on the unit's card on its layer page
    _hit(page, FLAT, 1).locator("a").click()
    page.wait_for_url(f"**/{layer_page_name(FLAT)}#unit-1")
    expect(page.locator("#unit-1")).to_be_visible()
    assert page.events == [], page.events


def test_layer_page_grid_images_load_and_filter(page, gallery: Path) -> None:
    from playwright.sync_api import expect
    page.goto((gallery.parent / layer_page_name(CONV)).as_uri())
    imgs = page.locator("img.grid")
    expect(imgs).to_have_count(3)
    for i in range(3):
        img = imgs.nth(i)
        img.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete", arg=img.element_handle())
        assert img.evaluate("img => img.naturalWidth") > 0, f"grid image {i} did not load"
        assert img.evaluate("img => img.naturalWidth") == 5 * 112
    page.locator("#q").press_sequentially("steeple", delay=20)
    expect(page.locator("#unit-2")).to_be_visible()
    expect(page.locator("#unit-0")).to_be_hidden()
    expect(page.locator("#unit-1")).to_be_hidden()
    page.locator("#q").fill("")
    expect(page.locator("article.unit:visible")).to_have_count(3)
    assert page.events == [], page.events


def test_hostile_layer_page_runs_no_injected_code(page, gallery: Path) -> None:
    from playwright.sync_api import expect
    page.goto((gallery.parent / layer_page_name(EVIL_LAYER)).as_uri())
    expect(page.locator("h1")).to_contain_text(EVIL_LAYER)
    expect(page.locator("p.description")).to_have_text("<script>alert(1)</script> zebra")
    assert page.locator("img").count() == 0
    assert page.events == [], page.events
