"""Tests for the seeded spurious-cue builders (neuroscribe.datasets.cues / .shifts).

Uses real Imagenette photos (the sample shipped in the package) and the real RapidOCR model to read the written class
names back.
"""

from __future__ import annotations

import csv
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from neuroscribe.datasets import cues as cues_mod
from neuroscribe.datasets.cues import (
    CLASS_PALETTE, BackgroundCue, ColourCue, PatchCue, TextCue, WatermarkCue, apply_cue, class_colour,
    load_font, parse_cue, render_cue,
)
from neuroscribe.datasets.probe import sample_root
from neuroscribe.datasets.shifts import MANIFEST_COLUMNS, CuedDataset, ShiftConfig, materialise

# Sorted wnid order = class index (see neuroscribe/data/sample/README.md).
WNIDS = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
    "n03888257": "parachute",
}
ALL_NAMES = [WNIDS[w] for w in sorted(WNIDS)]
OCR_NAMES = ["tench", "church", "golf ball", "parachute"]  # short, OCR-friendly
PER_CLASS = 3


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """The first PER_CLASS validation photos of every class of the real Imagenette sample shipped in the package
    (128 px), enlarged to 224 px like the full Imagenette and saved losslessly (PNG), one folder per wnid."""
    out = tmp_path_factory.mktemp("imagenette-224")
    for wnid in WNIDS:
        (out / wnid).mkdir()
        for src in sorted((sample_root() / "val" / wnid).glob("*.jpg"))[:PER_CLASS]:
            with Image.open(src) as im:
                im.convert("RGB").resize((224, 224), Image.BICUBIC).save(out / wnid / f"{src.stem}.png")
    return out


def _imagenette(root: Path, names: list[str], per_class: int) -> list[tuple[str, int]]:
    by_name = {v: k for k, v in WNIDS.items()}
    per_label = []
    for label, name in enumerate(names):
        files = sorted((root / by_name[name]).glob("*.png"))[:per_class]
        assert len(files) == per_class, f"need {per_class} photos of {name!r} in {root}, found {len(files)}"
        per_label.append([(str(f), label) for f in files])
    # interleave classes (round-robin) so the first k samples cover several classes
    return [group[j] for j in range(per_class) for group in per_label]


@pytest.fixture(scope="module")
def real_samples(photo_dir: Path) -> list[tuple[str, int]]:
    return _imagenette(photo_dir, ALL_NAMES, PER_CLASS)  # 30 real photos, 3 per class


def _fake(n: int, n_classes: int = 10) -> list[tuple[str, int]]:
    """Samples whose files are never opened (plan-only tests)."""
    return [(f"/nonexistent/{i}.jpg", i % n_classes) for i in range(n)]


def _norm(text: str) -> str:
    return "".join(text.lower().split())


# --------------------------------------------------------------------------- OCR read-back


@pytest.fixture(scope="module")
def ocr():
    rapidocr = pytest.importorskip("rapidocr_onnxruntime", reason="rapidocr-onnxruntime is not installed")
    # no angle classifier (text is upright); detector input capped at 448 px (default 736) for speed
    return rapidocr.RapidOCR(use_cls=False, det_limit_side_len=448)


def _read(ocr, img: Image.Image) -> str:
    result, _ = ocr(np.asarray(img))
    return " ".join(r[1] for r in result or [])


def test_text_cue_ocr_readback_match_and_wrong(ocr, photo_dir: Path) -> None:
    samples = _imagenette(photo_dir, OCR_NAMES, PER_CLASS)
    cue = TextCue(size=0.12, position="random-corner")
    match = CuedDataset(samples, OCR_NAMES, cue, fraction=1.0, correlation="match", seed=1)
    wrong = CuedDataset(samples, OCR_NAMES, cue, fraction=1.0, correlation="wrong", seed=2)
    hits, total = 0, 0
    t0 = time.perf_counter()
    for i in range(5):
        img, label, info = match[i]
        assert info["has_cue"] and info["cue_token"] == OCR_NAMES[label]
        read = _read(ocr, img)
        total += 1
        hits += _norm(OCR_NAMES[label]) in _norm(read)
        assert _norm(OCR_NAMES[label]) in _norm(read), f"match: wrote {OCR_NAMES[label]!r}, OCR read {read!r}"

        img, label, info = wrong[i]
        assert info["has_cue"] and info["cue_class"] != label
        read = _read(ocr, img)
        total += 1
        hits += _norm(info["cue_token"]) in _norm(read)
        assert _norm(info["cue_token"]) in _norm(read), f"wrong: wrote {info['cue_token']!r}, OCR read {read!r}"
        assert _norm(OCR_NAMES[label]) not in _norm(read), f"wrong: true class {OCR_NAMES[label]!r} was written"
    # the clean photos themselves do not carry the class names (so the read-back is not vacuous)
    for i in range(2):
        clean, _ = match.pair(i)
        read = _norm(_read(ocr, clean))
        assert not any(_norm(n) in read for n in OCR_NAMES), f"clean photo {i} already reads {read!r}"
    print(f"OCR read-back {hits}/{total} in {time.perf_counter() - t0:.1f}s")


# --------------------------------------------------------------------------- plan / fraction


def test_fraction_honoured_and_reproducible_by_seed() -> None:
    samples = _fake(200)
    plans = [CuedDataset(samples, ALL_NAMES, TextCue(), fraction=0.5, seed=s).plan() for s in (7, 7, 8)]
    n_cued = sum(r["has_cue"] for r in plans[0])
    assert 80 <= n_cued <= 120, n_cued
    assert plans[0] == plans[1]
    assert plans[0] != plans[2]
    big = CuedDataset(_fake(5000), ALL_NAMES, TextCue(), fraction=0.3, seed=3).plan()
    assert abs(sum(r["has_cue"] for r in big) / 5000 - 0.3) < 0.03
    assert not any(r["has_cue"] for r in CuedDataset(samples, ALL_NAMES, TextCue(), fraction=0.0).plan())
    assert all(r["has_cue"] for r in CuedDataset(samples, ALL_NAMES, TextCue(), fraction=1.0).plan())
    assert not any(r["has_cue"] for r in
                   CuedDataset(samples, ALL_NAMES, TextCue(), fraction=1.0, correlation="none").plan())


def test_decisions_depend_only_on_seed_and_index() -> None:
    long = CuedDataset(_fake(300), ALL_NAMES, TextCue(), fraction=0.5, seed=5).plan()
    short = CuedDataset(_fake(50), ALL_NAMES, TextCue(), fraction=0.5, seed=5).plan()
    assert long[:50] == short
    # the same seed picks the same images whatever the correlation (train/test shifts line up)
    wrong = CuedDataset(_fake(300), ALL_NAMES, TextCue(), fraction=0.5, correlation="wrong", seed=5).plan()
    assert [r["has_cue"] for r in wrong] == [r["has_cue"] for r in long]
    # probe.Sample objects (path, label attributes) are accepted like (path, label) tuples
    from neuroscribe.datasets.probe import Sample
    objs = [Sample(Path(p), lbl) for p, lbl in _fake(50)]
    assert CuedDataset(objs, ALL_NAMES, TextCue(), fraction=0.5, seed=5).plan() == short


def test_correlation_modes() -> None:
    samples = _fake(3000)
    match = CuedDataset(samples, ALL_NAMES, TextCue(), fraction=1.0, correlation="match").plan()
    assert all(r["cue_class"] == r["label"] and r["cue_token"] == r["class_name"] for r in match)
    assert all(r["group"] == "cue-agrees" for r in match)

    wrong = CuedDataset(samples, ALL_NAMES, TextCue(), fraction=1.0, correlation="wrong").plan()
    assert all(r["cue_class"] != r["label"] and r["group"] == "cue-conflicts" for r in wrong)
    assert all(r["cue_token"] == ALL_NAMES[r["cue_class"]] for r in wrong)
    counts = Counter(r["cue_class"] for r in wrong if r["label"] == 0)  # 300 samples, 9 wrong classes
    assert set(counts) == set(range(1, 10))
    assert all(15 <= c <= 55 for c in counts.values()), counts

    rand = CuedDataset(samples, ALL_NAMES, TextCue(), fraction=1.0, correlation="random").plan()
    agree = sum(r["cue_class"] == r["label"] for r in rand) / len(rand)
    assert 0.06 < agree < 0.14, agree

    half = CuedDataset(samples, ALL_NAMES, TextCue(), fraction=0.5).plan()
    clean = [r for r in half if not r["has_cue"]]
    assert clean and all(r["group"] == "clean" and r["cue_token"] == "" and r["cue_class"] == -1 for r in clean)


@pytest.mark.parametrize("cue", [ColourCue(), PatchCue(), BackgroundCue()], ids=lambda c: c.kind)
@pytest.mark.parametrize("strength", [1.0, 0.8, 0.3])
def test_strength_is_agreement_rate(cue, strength: float) -> None:
    plan = CuedDataset(_fake(4000), ALL_NAMES, cue, fraction=1.0, strength=strength, seed=11).plan()
    agree = sum(r["cue_class"] == r["label"] for r in plan) / len(plan)
    assert abs(agree - strength) < 0.03, (strength, agree)
    assert all(0 <= r["cue_class"] < 10 for r in plan)


def test_class_palette_fixed_and_distinct() -> None:
    assert [class_colour(k) for k in range(20)] == list(CLASS_PALETTE)
    colours = [class_colour(k) for k in range(1000)]
    assert len(set(colours)) == 1000
    assert class_colour(500) == colours[500]
    with pytest.raises(ValueError, match="class index"):
        class_colour(-1)


# --------------------------------------------------------------------------- determinism on real images


def _as_bytes(ds: CuedDataset, order: list[int]) -> dict[int, tuple[bytes, dict]]:
    out = {}
    for i in order:
        img, _label, info = ds[i]
        out[i] = (img.tobytes(), info)
    return out


@pytest.mark.parametrize("cue", [TextCue(position="random-corner"), PatchCue(position="random-corner"),
                                 WatermarkCue(rotation=25, tile=True)], ids=lambda c: c.kind)
def test_determinism_across_instances_and_access_order(real_samples, cue) -> None:
    samples = real_samples[:12]
    a = CuedDataset(samples, ALL_NAMES, cue, fraction=0.5, seed=3)
    b = CuedDataset(samples, ALL_NAMES, cue, fraction=0.5, seed=3)
    order = list(range(12))
    shuffled = order[:]
    random.Random(0).shuffle(shuffled)
    first = _as_bytes(a, order)
    assert first == _as_bytes(b, list(reversed(order)))
    assert first == _as_bytes(a, shuffled)
    assert any(info["has_cue"] for _, info in first.values())
    assert not all(info["has_cue"] for _, info in first.values())


def test_determinism_with_dataloader_workers(real_samples) -> None:
    import torch
    from torch.utils.data import DataLoader
    from torchvision.transforms.functional import pil_to_tensor

    ds = CuedDataset(real_samples[:8], ALL_NAMES, TextCue(position="random-corner"), fraction=0.5,
                     seed=9, transform=pil_to_tensor)
    expected = torch.stack([ds[i][0] for i in range(8)])
    batches = list(DataLoader(ds, batch_size=4, num_workers=2, shuffle=False))
    got = torch.cat([b[0] for b in batches])
    assert torch.equal(expected, got)
    assert [bool(x) for b in batches for x in b[2]["has_cue"]] == [r["has_cue"] for r in ds.plan()]


# --------------------------------------------------------------------------- pair() / geometry


def _outside_box_equal(a: Image.Image, b: Image.Image, box: tuple[int, int, int, int]) -> bool:
    x0, y0, x1, y1 = box
    diff = np.any(np.asarray(a) != np.asarray(b), axis=2)
    inside = np.zeros_like(diff)
    inside[y0:y1, x0:x1] = True
    return not diff[~inside].any() and diff[inside].any()


@pytest.mark.parametrize("cue", [TextCue(), TextCue(position="random-corner", background=None, stroke=0.08),
                                 PatchCue(position="random-corner"), PatchCue(position="center"),
                                 WatermarkCue()],
                         ids=["text-box", "text-stroke", "patch-corner", "patch-center", "watermark"])
def test_pair_differs_only_inside_cue_box(real_samples, cue) -> None:
    ds = CuedDataset(real_samples[:6], ALL_NAMES, cue, fraction=0.5, seed=4)
    for i in range(6):
        clean, cued = ds.pair(i)
        raw = Image.open(ds.samples[i][0]).convert("RGB")
        assert clean.tobytes() == raw.tobytes()
        img, _, info = ds[i]
        if info["has_cue"]:
            assert img.tobytes() == cued.tobytes()
            box = info["cue_box"]
        else:
            assert img.tobytes() == raw.tobytes()  # uncued sample is untouched...
            # the same seed with fraction=1 makes the same draw for index i, so gives its box
            full = CuedDataset(real_samples[:6], ALL_NAMES, cue, fraction=1.0, seed=4)
            full_img, _, full_info = full[i]
            assert full_img.tobytes() == cued.tobytes()
            box = full_info["cue_box"]
        assert box[2] - box[0] < clean.width and box[3] - box[1] < clean.height
        assert _outside_box_equal(clean, cued, box), (i, box)  # ...but pair() always draws


def test_patch_geometry_and_colour(real_samples) -> None:
    img = Image.open(real_samples[0][0]).convert("RGB")
    w, h = img.size
    cue = PatchCue(size=0.2, position="bottom-right", margin=0.05)
    out = render_cue(img, cue, 4, random.Random(0))
    side, m = round(0.2 * min(w, h)), round(0.05 * min(w, h))
    assert out.box == (w - m - side, h - m - side, w - m, h - m)
    patch = np.asarray(out.image)[out.box[1]:out.box[3], out.box[0]:out.box[2]]
    assert (patch == np.array(class_colour(4), dtype=np.uint8)).all()


def test_random_position_spreads_inside_margins_and_redraws_alike_at_any_size() -> None:
    """``position='random'`` puts the cue anywhere inside the margins (not only the four corners), and the same
    rng state gives the same relative place at another resolution (views redraw a probe's cue at their size)."""
    text = TextCue(size=0.15, position="random", background=None, stroke=0.1, margin=0.05)
    patch = PatchCue(size=0.2, position="random", margin=0.05)
    small, large = Image.new("RGB", (96, 96), (90, 120, 60)), Image.new("RGB", (384, 384), (90, 120, 60))
    centres = []
    for seed in range(40):
        box = render_cue(small, patch, 1, random.Random(seed)).box
        big = render_cue(large, patch, 1, random.Random(seed)).box
        m = round(0.05 * 96)
        assert box[0] >= m and box[1] >= m and box[2] <= 96 - m and box[3] <= 96 - m, box
        assert abs(big[0] / 4 - box[0]) <= 1.5 and abs(big[1] / 4 - box[1]) <= 1.5, (box, big)
        centres.append(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
        tbox = render_cue(large, text, "golf ball", random.Random(seed)).box
        assert tbox[0] >= round(0.05 * 384) - 1 and tbox[2] <= 384 - round(0.05 * 384) + 1, tbox
    xs, ys = np.array(centres).T
    assert len(set(centres)) >= 30  # not four corners
    assert ((xs > 30) & (xs < 66) & (ys > 30) & (ys < 66)).sum() >= 3  # the middle is reached too
    assert xs.min() < 25 and xs.max() > 71 and ys.min() < 25 and ys.max() > 71
    assert abs(np.corrcoef(xs, ys)[0, 1]) < 0.6  # the two axes are drawn apart (not one draw for both)


def test_background_frame_leaves_interior_untouched(real_samples) -> None:
    img = Image.open(real_samples[0][0]).convert("RGB")
    out = np.asarray(apply_cue(img, BackgroundCue(width=0.1), 2, random.Random(0)))
    src, f = np.asarray(img), round(0.1 * min(img.size))
    assert (out[f:-f, f:-f] == src[f:-f, f:-f]).all()
    for edge in (out[:f], out[-f:], out[:, :f], out[:, -f:]):
        assert (edge == np.array(class_colour(2), dtype=np.uint8)).all()


def test_colour_cue_tints_toward_class_colour(real_samples) -> None:
    img = Image.open(real_samples[1][0]).convert("RGB")
    src = np.asarray(img, dtype=float)
    for k in (0, 3):  # red, blue
        target = np.array(class_colour(k), dtype=float)
        out = np.asarray(apply_cue(img, ColourCue(alpha=0.4), k, random.Random(0)), dtype=float)
        assert np.abs(out - target).mean() < np.abs(src - target).mean() * 0.7
        assert np.allclose(out, 0.6 * src + 0.4 * target, atol=1.0)


def test_faint_text_is_the_opaque_drawing_blended_at_its_opacity() -> None:
    """``opacity`` blends text and box over the image; the same box is drawn; opacity 1 is the opaque drawing."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    opaque = render_cue(img, TextCue(size=0.2), "tench", random.Random(0))
    faint = render_cue(img, TextCue(size=0.2, opacity=0.5), "tench", random.Random(0))
    assert faint.box == opaque.box
    src, a, b = (np.asarray(x, dtype=float) for x in (img, opaque.image, faint.image))
    assert np.abs(b - (src + a) / 2).max() <= 1.0  # half way between the photo and the opaque drawing
    assert render_cue(img, TextCue(size=0.2, opacity=1.0), "tench", random.Random(0)).image.tobytes() == \
        opaque.image.tobytes()
    with pytest.raises(ValidationError, match="opacity"):
        TextCue(opacity=0)


def test_text_fits_and_default_font_fallback(real_samples, monkeypatch) -> None:
    img = Image.open(real_samples[0][0]).convert("RGB").resize((96, 96))
    box = render_cue(img, TextCue(size=0.3), "garbage truck", random.Random(0)).box
    assert box[0] >= 0 and box[2] <= 96 and box[2] - box[0] <= 96 - 2 * round(0.02 * 96)
    monkeypatch.setattr(cues_mod, "DEFAULT_FONT", Path("/nonexistent/font.ttf"))
    load_font.cache_clear()
    try:
        out = render_cue(img, TextCue(), "tench", random.Random(0))
        assert out.image.tobytes() != img.tobytes()
    finally:
        load_font.cache_clear()


# --------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize(("make", "field"), [
    (lambda: TextCue(size=0), "size"),
    (lambda: TextCue(size=1.5), "size"),
    (lambda: TextCue(position="middle"), "position"),
    (lambda: TextCue(colour="notacolour"), "colour"),
    (lambda: TextCue(background=(300, 0, 0)), "background"),
    (lambda: TextCue(font="/nonexistent/font.ttf"), "font"),
    (lambda: TextCue(bogus=1), "bogus"),
    (lambda: WatermarkCue(opacity=1.5), "opacity"),
    (lambda: WatermarkCue(text=""), "text"),
    (lambda: ColourCue(alpha=0), "alpha"),
    (lambda: PatchCue(size=-0.1), "size"),
    (lambda: BackgroundCue(width=0.6), "width"),
    (lambda: parse_cue({"kind": "sticker"}), "kind"),
    (lambda: CuedDataset(_fake(4), ALL_NAMES, TextCue(), fraction=1.2), "fraction"),
    (lambda: CuedDataset(_fake(4), ALL_NAMES, TextCue(), correlation="opposite"), "correlation"),
    (lambda: CuedDataset(_fake(4), ALL_NAMES, PatchCue(), correlation="wrong", strength=0.5), "strength"),
    (lambda: CuedDataset(_fake(4), ALL_NAMES, {"kind": "patch", "size": 2}), "size"),
    (lambda: CuedDataset([("a.jpg", 10)], ALL_NAMES, TextCue()), "label"),
    (lambda: CuedDataset(_fake(4), ["a", "a"], TextCue()), "duplicates"),
    (lambda: CuedDataset(_fake(4), ALL_NAMES, TextCue(), eligible_classes=[12]), "eligible_classes"),
    (lambda: ShiftConfig.model_validate({"cue": {"kind": "text"}, "seed": "x"}), "seed"),
])
def test_invalid_config_names_the_field(make, field: str) -> None:
    with pytest.raises(ValueError) as err:  # pydantic.ValidationError is a ValueError
        make()
    assert field in str(err.value), str(err.value)


def test_wrong_token_types_are_rejected(real_samples) -> None:
    img = Image.open(real_samples[0][0])
    with pytest.raises(TypeError, match="'text' cue needs a non-empty string"):
        apply_cue(img, TextCue(), 3, random.Random(0))
    with pytest.raises(TypeError, match="'patch' cue needs a non-negative class index"):
        apply_cue(img, PatchCue(), "tench", random.Random(0))


def test_cue_configs_round_trip_through_dicts() -> None:
    for cue in (TextCue(colour="red", background=None), WatermarkCue(rotation=30, tile=True),
                ColourCue(), PatchCue(), BackgroundCue()):
        assert parse_cue(cue.model_dump(mode="json")) == cue
    assert TextCue(colour="red").colour == (255, 0, 0)
    cfg = ShiftConfig(cue={"kind": "patch"}, fraction=0.25, correlation="wrong", seed=3)
    assert ShiftConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    ds = CuedDataset.from_config(_fake(40), ALL_NAMES, cfg.model_dump(mode="json"))
    assert ds.plan() == CuedDataset(_fake(40), ALL_NAMES, PatchCue(), fraction=0.25,
                                    correlation="wrong", seed=3).plan()


def test_watermark_info_and_eligible_classes(real_samples) -> None:
    ds = CuedDataset(real_samples[:10], ALL_NAMES, WatermarkCue(), fraction=1.0, eligible_classes=[2], seed=0)
    for img, label, info in (ds[i] for i in range(10)):
        assert info["has_cue"] == (label == 2)
        if info["has_cue"]:
            assert info["cue_token"] == "iStock" and info["cue_class"] == -1 and info["group"] == "cue"
            x0, y0, x1, y1 = info["cue_box"]
            assert abs((x0 + x1) / 2 - img.width / 2) <= 2 and abs((y0 + y1) / 2 - img.height / 2) <= 2


# --------------------------------------------------------------------------- materialise


def test_materialise_manifest_matches_plan(real_samples, tmp_path: Path) -> None:
    ds = CuedDataset(real_samples[:10], ALL_NAMES, TextCue(), fraction=0.5, correlation="wrong", seed=2)
    out = materialise(ds, tmp_path / "shifted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shifted"]
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == MANIFEST_COLUMNS
    plan = ds.plan()
    assert len(rows) == len(plan) == 10
    for row, p in zip(rows, plan):
        assert int(row["label"]) == p["label"] and row["group"] == p["group"]
        assert bool(int(row["has_cue"])) == p["has_cue"] and row["cue_token"] == p["cue_token"]
        assert int(row["cue_class"]) == p["cue_class"] and row["source"] == p["path"]
        saved = Image.open(out / row["path"]).convert("RGB")
        assert saved.tobytes() == ds.render(p["index"])[0].tobytes()  # PNG is lossless
    assert (out / "shift.json").is_file()
    from neuroscribe.datasets.probe import manifest  # the core's loader reads what we write
    probe = manifest(out / "manifest.csv")
    assert [s.label for s in probe.samples] == [p["label"] for p in plan]
    assert [s.group for s in probe.samples] == [p["group"] for p in plan]
    with pytest.raises(FileExistsError):
        materialise(ds, out)
    ds2 = CuedDataset(real_samples[:3], ALL_NAMES, PatchCue(), fraction=1.0, seed=0)
    materialise(ds2, out, overwrite=True, image_format="jpeg")
    assert len((out / "manifest.csv").read_text().splitlines()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shifted"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_materialise_leaves_no_partial_dir(real_samples, tmp_path: Path, exc) -> None:
    ds = CuedDataset(real_samples[:8], ALL_NAMES, TextCue(), fraction=0.5, seed=2)

    def boom(done: int, total: int) -> None:
        if done == 4:
            raise exc("interrupted")

    with pytest.raises(exc):
        materialise(ds, tmp_path / "shifted", progress=boom)
    assert list(tmp_path.iterdir()) == []
    # an existing good directory survives a failed overwrite untouched
    good = materialise(ds, tmp_path / "shifted")
    before = (good / "manifest.csv").read_bytes()
    with pytest.raises(exc):
        materialise(ds, good, overwrite=True, progress=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shifted"]
    assert (good / "manifest.csv").read_bytes() == before


def test_describe_cue_words_follow_the_cue_kind():
    from neuroscribe.datasets.cues import describe_cue
    assert describe_cue({"kind": "text"}, "wrong") == "the name of a random WRONG class written on it"
    assert describe_cue({"kind": "patch"}, "match") == "a patch in the colour of the true class"
    assert describe_cue({"kind": "watermark"}, "wrong") == "a watermark (it names no class)"
    assert "class name" not in describe_cue({"kind": "colour"}, "wrong")
