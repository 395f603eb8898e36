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
    """``units`` outputs (B, 3, H/4, W/4): blueness, redness and local contrast, each pooled over 4 x 4 cells."""

    def __init__(self):
        super().__init__()
        self.units = torch.nn.Identity()
        self.head = torch.nn.Linear(3, 10)

    def forward(self, x):
        rgb = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
            1, 3, 1, 1)
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        lum = rgb.mean(1, keepdim=True)
        contrast = (lum - torch.nn.functional.avg_pool2d(lum, 3, 1, 1, count_include_pad=False)).abs()[:, 0]
        maps = torch.stack([b - (r + g) / 2, r - (g + b) / 2, 4 * contrast], 1)
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
                             "device": "cpu", "batch_size": 32, "workers": 0, "record": {"k": 4},
                             "data": {"root": str(sample_root()), "split": "val"}})
    r = Recording(record(cfg))
    yield r, models.load_model("test-detectors")
    mp.undo()


def run(rec, descriptions, **cfg):
    r, lm = rec
    return verify_units(r, lm, descriptions, VerifyConfig(images=24, **cfg), seed=0, device=torch.device("cpu"))


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
    detector of that word (its effect is near zero), while "text" is confirmed for it."""
    res = run(rec, {("units", 2): "the word stop"})[("units", 2)]
    assert res["kind"] == "text" and res["target"] == "the word stop"
    assert res["status"] == "not confirmed" and abs(res["effect"]) < 1.0, res


def test_quiet_images_and_seed_make_the_result_reproducible(rec):
    a = run(rec, {("units", 0): "blue", ("units", 2): "letters"})
    b = run(rec, {("units", 0): "blue", ("units", 2): "letters"})
    assert a == b
    assert all(r["n"] == 12 for r in a.values())  # the quiet half of 24 images


def test_text_edit_and_its_control_differ_only_in_readability():
    words = Pools(words=["house", "table", "green", "water"])
    iv = intervention_for("The word STOP", ("l", 0), words)
    assert iv.kind == "text" and iv.key == "word:stop"
    img = Image.new("RGB", (96, 96), (120, 130, 140))
    t, c = iv.treat(img, random.Random(3)), iv.control(img, random.Random(3))
    at, ac, a0 = (np.asarray(x, dtype=np.int16) for x in (t, c, img))
    changed_t, changed_c = np.abs(at - a0).sum(2) > 0, np.abs(ac - a0).sum(2) > 0
    assert changed_t.any() and changed_c.any() and not np.array_equal(at, ac)
    rows_t, rows_c = np.flatnonzero(changed_t.any(1)), np.flatnonzero(changed_c.any(1))
    assert abs(int(rows_t.mean()) - int(rows_c.mean())) <= 2  # same place and size, other word
    generic = intervention_for("letters", ("l", 0), words)
    tb, cb = generic.treat(img, random.Random(5)), generic.control(img, random.Random(5))
    edge = lambda x: np.abs(np.diff(np.asarray(x.convert("L"), dtype=float), axis=1)).sum()  # noqa: E731
    assert edge(tb) > 3 * edge(cb)  # the control is the same ink blurred unreadable


def test_registry_order_kinds_and_objects_never_use_the_units_own_crops():
    crop = {u: Image.new("RGB", (20, 20), (u[1] * 40, 0, 0)) for u in [("a", 0), ("a", 1), ("a", 2), ("b", 0)]}
    pools = Pools(words=["house"], crops={"golf ball": [(u, crop[u]) for u in [("a", 0), ("a", 1), ("a", 2)]],
                                          "tench": [(("b", 0), crop[("b", 0)])]})
    assert intervention_for("red letters", ("a", 0), pools).kind == "text"  # text before colour
    assert intervention_for("red letters", ("a", 0), pools, ["colour"]).target == "red"
    assert intervention_for("Grey", ("a", 0), pools).target == "gray"
    assert intervention_for("tench", ("b", 0), pools) is None  # no other unit shows a tench
    iv0, iv1 = (intervention_for("Golf  Ball", ("a", u), pools) for u in (0, 1))
    assert iv0.kind == "object" and iv0.key != iv1.key  # two folds
    base = Image.new("RGB", (64, 64), (0, 0, 255))
    reds = {int(np.asarray(iv0.treat(base, random.Random(s)))[..., 0].max()) for s in range(40)}
    assert reds == {40}, reds  # unit ("a", 0) sees only the other fold's crops: ("a", 1)'s, never its own
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
            {"layer": "l", "unit": 2, "description": "the word stop"},  # not verified: the words alone
            {"layer": "l", "unit": 3, "description": "dog", "verify_status": "confirmed"}]
    flags = flag_units(rows, FlagConfig(embedder=None))
    assert [f.unit for f in flags] == [0, 2] and flags[0].verified == "confirmed" and flags[1].verified is None
    assert "verification by experiment: confirmed" in flags[0].reasons
    assert [f.unit for f in flag_units(rows, FlagConfig(embedder=None, verified=False))] == [0, 1, 2]
