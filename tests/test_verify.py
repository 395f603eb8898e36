"""Verification by experiment (neuroscribe.describe.verify): the words alone become an edit, and the verdict follows
what the unit really responds to. The model is hand-made so the truth is known: unit 0 measures blueness, unit 1
redness, unit 2 fine-grained luminance contrast (strokes of rendered letters); run on real photos of the sample."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from neuroscribe import models
from neuroscribe.config import VerifyConfig, load_config
from neuroscribe.datasets.probe import sample_root
from neuroscribe.describe.verify import INTERVENTIONS, Intervention, Pools, intervention_for, verify_units
from neuroscribe.record.exemplars import Recording
from neuroscribe.record.recorder import record

SIZE = 96


class Detectors(torch.nn.Module):
    """``units`` outputs (B, 4, H/4, W/4): blueness, redness, local contrast and another blueness (blue over the
    larger of red and green: other exemplars, the same kind of region), each pooled over 4 x 4 cells."""

    def __init__(self):
        super().__init__()
        self.units = torch.nn.Identity()
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x):
        rgb = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
            1, 3, 1, 1)
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        lum = rgb.mean(1, keepdim=True)
        contrast = (lum - torch.nn.functional.avg_pool2d(lum, 3, 1, 1, count_include_pad=False)).abs()[:, 0]
        maps = torch.stack([b - (r + g) / 2, r - (g + b) / 2, 4 * contrast, b - torch.maximum(r, g)], 1)
        out = self.units(torch.nn.functional.avg_pool2d(maps, 4))
        return self.head(out.amax((2, 3)))


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    pre = models.Preprocess(resize=SIZE, crop=SIZE)
    mp = pytest.MonkeyPatch()
    mp.setitem(models._REGISTRY, "test-detectors", lambda **_: models.LoadedModel("test-detectors",
                                                                                  Detectors().eval(), pre))
    out = tmp_path_factory.mktemp("verify") / "job"
    cfg = load_config(None, {"model": "test-detectors", "layers": ["units"], "out": str(out), "progress": False,
                             "device": "cpu", "batch_size": 32, "workers": 0, "record": {"k": 8},
                             "data": {"root": str(sample_root()), "split": "val"}})
    r = Recording(record(cfg))
    yield r, models.load_model("test-detectors")
    mp.undo()


def run(rec, descriptions, null=False, **cfg):
    r, lm = rec
    return verify_units(r, lm, descriptions, VerifyConfig(images=24, **cfg), seed=0, device=torch.device("cpu"),
                        null=null)


def test_words_confirmed_where_the_unit_responds_and_rejected_elsewhere(rec):
    res = run(rec, {("units", 0): "blue", ("units", 1): "blue sky", ("units", 2): "text"})
    assert res[("units", 0)]["status"] == "confirmed", res
    assert res[("units", 0)]["kind"] == "colour" and res[("units", 0)]["target"] == "blue"
    assert res[("units", 0)]["auc"] >= 0.9 and res[("units", 0)]["effect"] >= 1.0
    assert res[("units", 1)]["status"] == "not confirmed" and res[("units", 1)]["effect"] < 0, res  # a red unit
    assert res[("units", 2)]["status"] == "confirmed" and res[("units", 2)]["kind"] == "text", res
    wrong = run(rec, {("units", 0): "text", ("units", 1): "red", ("units", 2): "green"})
    assert wrong[("units", 0)]["status"] == "not confirmed", wrong  # blueness does not follow letters
    assert wrong[("units", 1)]["status"] == "confirmed", wrong
    assert wrong[("units", 2)]["status"] == "not confirmed", wrong  # contrast is not a colour


def test_a_specific_word_needs_more_than_any_text(rec):
    """"the word stop" is tested against other words of the same length: a unit that reads any text is not a
    detector of that word (its word effect is near zero); it is then tested, and confirmed, as "text". A unit that
    does not read text is confirmed neither way."""
    res = run(rec, {("units", 2): "the word stop", ("units", 0): "the word stop"})
    r = res[("units", 2)]
    assert r["kind"] == "text" and r["target"] == "text" and r["status"] == "confirmed", r
    assert abs(r["word_effect"]) < 1.0 and r["word_auc"] < 0.8 and r["effect"] >= 1.0, r
    r0 = res[("units", 0)]
    assert r0["status"] == "not confirmed" and r0["target"] == "text" and "word_effect" in r0, r0


def test_quiet_images_and_seed_make_the_result_reproducible(rec):
    a = run(rec, {("units", 0): "blue", ("units", 2): "letters"})
    b = run(rec, {("units", 0): "blue", ("units", 2): "letters"})
    assert a == b
    assert all(r["n"] == 12 for r in a.values())  # the quiet half of 24 images
    r, lm = rec
    other = verify_units(r, lm, {("units", 0): "blue"}, VerifyConfig(images=24), seed=1, device=torch.device("cpu"))
    assert other[("units", 0)]["effect"] != a[("units", 0)]["effect"]  # another seed, other images and edits


def test_null_draws_confirm_nothing(rec):
    """``null=True``: the treatment is a second control draw, so the words play no part."""
    res = run(rec, {("units", 0): "blue", ("units", 1): "red", ("units", 2): "text"}, null=True)
    assert all(v["status"] == "not confirmed" for v in res.values()), res
    assert abs(res[("units", 2)]["effect"]) < 1.0 and abs(res[("units", 0)]["effect"]) < 1.0, res


def test_objects_are_pasted_from_other_units_with_that_description(rec):
    """Units 0 and 3 (both blueness) are described "sky": each is shown the other's exemplar crops (blue regions)
    against crops of units described otherwise, and confirmed; a description no other unit has is unverifiable."""
    res = run(rec, {("units", 0): "sky", ("units", 3): "sky", ("units", 1): "fire", ("units", 2): "stripes"})
    assert res[("units", 0)]["kind"] == res[("units", 3)]["kind"] == "object"
    assert res[("units", 0)]["status"] == res[("units", 3)]["status"] == "confirmed", res
    assert res[("units", 1)]["status"] == res[("units", 2)]["status"] == "unverifiable" and "why" in res[("units", 1)]


def test_units_of_one_fold_share_forward_passes_and_get_what_they_would_alone(rec, monkeypatch):
    """Three units described "sky" (units 0 and 2 one fold): each unit's own exemplar images are kept out of its
    crops, so the units of a fold make different edits only where the drawn crop is of one of their images. Passed
    forward once per distinct edited image, every unit gets exactly the figures of its own intervention's edits."""
    from neuroscribe.datasets.splits import stratified_sample
    from neuroscribe.describe import verify
    descriptions = {("units", 0): "sky", ("units", 1): "sky", ("units", 2): "sky", ("units", 3): "fire"}
    made = {}
    make = verify.INTERVENTIONS["object"]
    monkeypatch.setitem(verify.INTERVENTIONS, "object", lambda d, u, p: made.__setitem__(u, make(d, u, p)) or made[u])
    seen = []
    maxima = verify._maxima
    monkeypatch.setattr(verify, "_maxima", lambda m, r, ls, images, *a: seen.append(len(images)) or maxima(
        m, r, ls, images, *a))
    shared = run(rec, descriptions)
    n_shared = sum(seen)
    assert made[("units", 0)].key == made[("units", 2)].key == "object:sky:0"
    assert made[("units", 0)].variant != made[("units", 2)].variant  # their own images differ: two variants
    assert shared[("units", 0)]["kind"] == "object" and shared[("units", 3)]["status"] == "unverifiable"
    # each unit measured alone on the edits of its own intervention (the verifier's sample, seeds and measure)
    r, lm = rec
    ids = stratified_sample([int(y) for y in r.labels], 24, 0, exclude=r.skipped_ids, purpose="verify")
    base = [r.image(i).convert("RGB") for i in ids]
    cpu = torch.device("cpu")
    acts0 = maxima(lm.module, r, ["units"], base, 32, cpu)["units"]  # the model as it is: nothing folded
    for u in [("units", 0), ("units", 1), ("units", 2)]:
        iv = made[u]
        t, c = ([edit(im, random.Random(verify._seed(0, iv.key, i))) for im, i in zip(base, ids)]
                for edit in (iv.treat, iv.control))
        want = verify.measure(acts0, maxima(lm.module, r, ["units"], t, 32, cpu)["units"],
                              maxima(lm.module, r, ["units"], c, 32, cpu)["units"], u[1])
        assert {k: shared[u][k] for k in want} == pytest.approx(want), u
    seen.clear()
    digest = iter(range(10 ** 9))  # every edited image distinct: nothing shared
    monkeypatch.setattr(verify, "_digest", lambda im: next(digest))
    assert run(rec, descriptions) == shared
    assert sum(seen) > n_shared, (sum(seen), n_shared)


def test_measure_uses_the_quiet_half_and_a_floored_sd():
    from neuroscribe.describe.verify import measure
    base = np.array([[0.0, 5.0, 1.0], [1.0, 5.0, 2.0], [2.0, 5.0, 3.0], [3.0, 5.0, 4.0]])  # unit 1 is constant
    treated = np.array([[4.0, 6.0, 0.0], [4.0, 6.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
    control = np.zeros((4, 3))
    control[:, 1] = 5.0
    r = measure(base, treated, control, 0)  # quiet: images 0 and 1 (<= median 1.5); sd of 0..3 = 1.291
    assert r["n"] == 2 and r["auc"] == 1.0 and r["effect"] == pytest.approx(4.0 / np.std([0, 1, 2, 3], ddof=1))
    # a constant unit: sd 0, floored at 10 % of the layer's median sd (1.291 -> 0.129), not 1e-6
    r1 = measure(base, treated, control, 1)
    assert r1["n"] == 4 and r1["effect"] == pytest.approx(0.5 / (0.1 * np.std([0, 1, 2, 3], ddof=1)))
    assert r1["auc"] == pytest.approx((2 * 1.0 + 2 * 0.5) / 4)
    # the response: treated - unedited on EVERY image (not the quiet half), over the same floored sd
    assert r["response"] == pytest.approx(np.mean([4 - 0, 4 - 1, 0 - 2, 0 - 3]) / np.std([0, 1, 2, 3], ddof=1))
    assert r1["response"] == pytest.approx(0.5 / (0.1 * np.std([0, 1, 2, 3], ddof=1)))


def _box(a: np.ndarray, a0: np.ndarray) -> tuple[int, int, int, int]:
    changed = np.abs(a.astype(int) - a0.astype(int)).sum(2) > 0
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _iou(p, q) -> float:
    inter = max(0, min(p[1], q[1]) - max(p[0], q[0])) * max(0, min(p[3], q[3]) - max(p[2], q[2]))
    return inter / ((p[1] - p[0]) * (p[3] - p[2]) + (q[1] - q[0]) * (q[3] - q[2]) - inter)


def test_text_edit_and_its_control_differ_only_in_the_word():
    from neuroscribe.describe.interventions import _draw_words, _same_length_word
    words = Pools(words=["house", "table", "green", "water", "step", "stop", "shop", "ship"])
    iv = intervention_for("The word STOP", ("l", 0), words)
    assert iv.kind == "text" and iv.key == "word:stop"
    img = Image.new("RGB", (128, 128), (120, 130, 140))
    a0 = np.asarray(img)
    for s in range(20):  # same font, size, ink and place, another word of the same length
        t, c = np.asarray(iv.treat(img, random.Random(s))), np.asarray(iv.control(img, random.Random(s)))
        assert not np.array_equal(t, c) and _iou(_box(t, a0), _box(c, a0)) > 0.6, s
        r = random.Random(s)
        r.random()
        assert np.array_equal(t, np.asarray(_draw_words(img, "stop", r)))  # the treatment renders the word itself
        assert _same_length_word("STOP", words.words, random.Random(s)) in {"step", "shop", "ship"}
    phrase = intervention_for("the word french horn", ("l", 0), words)  # a name of two words: each replaced
    assert phrase.kind == "text" and phrase.key == "word:french horn" and phrase.target == "the word french horn"
    r = random.Random(3)
    pick = random.Random(r.random())  # the draw both make first (the control's choice of words)
    want = " ".join(_same_length_word(w, words.words, pick) for w in ("french", "horn"))
    assert len(want.split()) == 2 and want != "french horn"
    for text, edit in (("french horn", phrase.treat), (want, phrase.control)):
        r = random.Random(3)
        r.random()
        assert np.array_equal(np.asarray(edit(img, random.Random(3))), np.asarray(_draw_words(img, text, r)))
    generic = intervention_for("letters", ("l", 0), words)
    tb, cb = generic.treat(img, random.Random(5)), generic.control(img, random.Random(5))
    edge = lambda x: np.abs(np.diff(np.asarray(x.convert("L"), dtype=float), axis=1)).sum()  # noqa: E731
    assert edge(tb) > 3 * edge(cb)  # the control is the same ink blurred unreadable


def test_registry_order_kinds_and_objects_never_use_the_units_own_crops():
    crop = {u: Image.new("RGB", (20, 20), (u[1] * 40, 0, 0)) for u in [("a", 0), ("a", 1), ("a", 2), ("b", 0)]}
    pools = Pools(words=["house"], crops={"golf ball": [(u, crop[u], 10 + u[1]) for u in [("a", 0), ("a", 1),
                                                                                             ("a", 2)]],
                                          "tench": [(("b", 0), crop[("b", 0)], 20)]})
    assert intervention_for("red letters", ("a", 0), pools).kind == "text"  # text before colour
    assert intervention_for("red letters", ("a", 0), pools, ["colour"]).target == "red"
    assert intervention_for("Grey", ("a", 0), pools).target == "gray"
    assert intervention_for("tench", ("b", 0), pools) is None  # no other unit shows a tench
    iv0, iv1 = (intervention_for("Golf  Ball", ("a", u), pools) for u in (0, 1))
    assert iv0.kind == "object" and iv0.key != iv1.key  # two folds
    base = Image.new("RGB", (64, 64), (0, 0, 255))
    reds = {int(np.asarray(iv0.treat(base, random.Random(s)))[..., 0].max()) for s in range(40)}
    assert reds == {40}, reds  # unit ("a", 0) sees only the other fold's crops: ("a", 1)'s, never its own
    # a crop of an image that is one of the unit's own exemplars is never pasted for it (nor as its control)
    pools.own = {("a", 1): {10}, ("a", 3): {11}}
    iv1b = intervention_for("golf ball", ("a", 1), pools)  # fold 1 is shown fold 0's crops: images 10 and 12
    assert iv1b.key == iv1.key and (iv1.variant, iv1b.variant) == ((), (10,))  # one fold, another variant
    assert {int(np.asarray(iv1b.treat(base, random.Random(s)))[..., 0].max()) for s in range(40)} == {80}
    iv3 = intervention_for("golf ball", ("a", 3), pools)  # not in a fold: every crop but image 11's
    assert {int(np.asarray(iv3.treat(base, random.Random(s)))[..., 0].max()) for s in range(60)} == {0, 80}
    seen = []
    INTERVENTIONS["always"] = lambda d, u, p: seen.append(d) or Intervention(
        "always", d, "k", lambda im, r: im, lambda im, r: im)
    try:
        assert intervention_for("anything at all", ("a", 0), pools).kind == "always" and seen == ["anything at all"]
    finally:
        del INTERVENTIONS["always"]


def test_flags_need_the_words_and_the_experiment():
    from neuroscribe.ablate.flag import flag_units
    from neuroscribe.config import FlagConfig
    rows = [{"layer": "l", "unit": 0, "description": "text", "verify_status": "confirmed"},
            {"layer": "l", "unit": 1, "description": "letters", "verify_status": "not confirmed"},
            {"layer": "l", "unit": 2, "description": "the word stop"},  # verification off: the words alone
            {"layer": "l", "unit": 3, "description": "dog", "verify_status": "confirmed"},
            {"layer": "l", "unit": 4, "description": "a sign", "verify_status": "unverifiable"}]  # no experiment
    flags = flag_units(rows, FlagConfig(embedder=None))
    assert [f.unit for f in flags] == [0, 2] and flags[0].verified == "confirmed" and flags[1].verified is None
    rows_all = flag_units(rows, FlagConfig(embedder=None), all_rows=True)
    assert [f.unit for f in rows_all if f.by_description] == [0, 2]  # the set the ablate stage's variant uses
    assert [f.unit for f in rows_all if f.by_keyword] == [0, 1, 2, 4]
    assert "verification by experiment: confirmed" in flags[0].reasons
    assert [f.unit for f in flag_units(rows, FlagConfig(embedder=None, verified=False))] == [0, 1, 2, 4]


class DetectorsAfterNorm(Detectors):
    """The same detectors behind a 1x1 conv and a batch norm that together compute the identity: verification runs
    on a copy with the norm folded into the conv (neuroscribe.fusion), and must measure what the model measures."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 3, 1, bias=False), torch.nn.BatchNorm2d(3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1) * 2.0)
            self.bn.running_mean.fill_(0.3), self.bn.running_var.fill_(4.0 - self.bn.eps)
            self.bn.weight.fill_(1.0), self.bn.bias.fill_(0.15)  # (2x - 0.3) / 2 + 0.15 = x

    def forward(self, x):
        return super().forward(self.bn(self.conv(x)))


def test_verification_runs_on_the_folded_copy_and_measures_what_the_model_measures(tmp_path, monkeypatch):
    from neuroscribe.describe import verify
    pre = models.Preprocess(resize=SIZE, crop=SIZE)
    monkeypatch.setitem(models._REGISTRY, "test-detectors-bn",
                        lambda **_: models.LoadedModel("test-detectors-bn", DetectorsAfterNorm().eval(), pre))
    cfg = load_config(None, {"model": "test-detectors-bn", "layers": ["units"], "out": str(tmp_path), "progress": False,
                             "device": "cpu", "batch_size": 32, "workers": 0, "record": {"k": 8},
                             "data": {"root": str(sample_root()), "split": "val"}})
    rec = (Recording(record(cfg)), models.load_model("test-detectors-bn"))
    descriptions = {("units", 0): "blue", ("units", 1): "red", ("units", 2): "text", ("units", 3): "green"}
    made = []
    fold = verify.fold_for_inference
    monkeypatch.setattr(verify, "fold_for_inference", lambda m, x, keep: made.append((fold(m, x, keep), keep))
                        or made[-1][0])
    folded = run(rec, descriptions)
    (module, info), keep = made[0]
    assert keep == ["units"] and info["batchnorm"] == 1 and isinstance(module.bn, torch.nn.Identity)
    monkeypatch.setattr(verify, "fold_for_inference", lambda m, x, keep: (m, {}))
    plain = run(rec, descriptions)
    assert {k: r["status"] for k, r in folded.items()} == {k: r["status"] for k, r in plain.items()}
    assert folded[("units", 0)]["status"] == "confirmed" and folded[("units", 1)]["status"] == "confirmed"
    for k in descriptions:
        for f in ("effect", "auc", "response"):  # the confirmation's figures and the flag score alike
            assert folded[k][f] == pytest.approx(plain[k][f], rel=1e-4, abs=1e-6), (k, f)
