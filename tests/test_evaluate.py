"""Evaluation (predict, label maps, bootstrap CIs) and MILAN's selection procedure (order, curve, choose n, controls),
which only ever sees validation data."""
import inspect

import numpy as np
import pytest
import torch
from torch import nn

from neuroscribe.ablate import select
from neuroscribe.ablate.edit import ablation_edits, as_unit_dict
from neuroscribe.ablate.evaluate import accuracy_report, correct, label_map, paired_bootstrap_diff, predict
from neuroscribe.ablate.select import accuracy_curve, choose_n, order_units, random_units, sort_all, val_accuracy
from neuroscribe.models import imagenet_class_names


# ------------------------------------------------------------------------------------------- bootstrap CIs
def _correct(n, p, seed=0):
    return np.random.default_rng(seed).random(n) < p


def test_accuracy_ci_contains_estimate_and_narrows_with_n():
    widths = []
    for n in (50, 500, 5000):
        c = _correct(n, 0.7)
        r = accuracy_report(c.astype(int), np.ones(n, int), bootstrap=2000, seed=1)
        assert r["n"] == n and r["acc"] == pytest.approx(c.mean())
        assert r["ci_low"] <= r["acc"] <= r["ci_high"]
        widths.append(r["ci_high"] - r["ci_low"])
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] == pytest.approx(2 * 1.96 * np.sqrt(0.7 * 0.3 / 500), rel=0.15)  # the normal approximation


def test_binomial_bootstrap_matches_index_resampling():
    c = _correct(300, 0.62, seed=3)
    r = accuracy_report(c.astype(int), np.ones(300, int), bootstrap=4000, seed=0)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 300, size=(4000, 300))
    lo, hi = np.percentile(c[idx].mean(1), [2.5, 97.5])
    assert r["ci_low"] == pytest.approx(lo, abs=0.012) and r["ci_high"] == pytest.approx(hi, abs=0.012)


def test_accuracy_report_groups_logits_and_errors():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    logits = np.eye(3)[[0, 1, 2, 0, 0, 0, 0, 0]]  # last 4 right only where the label is 0
    groups = ["a", "a", "a", "a", "b", "b", "b", "b"]
    r = accuracy_report(logits, labels, groups, bootstrap=500)
    assert r["acc"] == pytest.approx(5 / 8)
    assert r["per_group"]["a"]["acc"] == 1.0 and r["per_group"]["b"]["acc"] == 0.25
    wg = r["worst_group"]
    assert wg["group"] == "b" and wg["acc"] == 0.25 and wg["ci_low"] <= 0.25 <= wg["ci_high"]
    r0 = accuracy_report(logits, labels, bootstrap=0)
    assert r0["ci_low"] is None and r0["per_group"] == {} and r0["worst_group"] is None
    with pytest.raises(ValueError, match="no label"):
        accuracy_report(np.zeros(3, int), np.array([0, -1, 0]))
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        correct(np.zeros(3, int), np.zeros(2, int))


def test_paired_bootstrap_diff():
    base = _correct(1000, 0.6, seed=1)
    ablated = base.copy()
    flip = np.random.default_rng(2).random(1000) < 0.1
    ablated[flip & ~base] = True  # ablation fixes some errors
    r = paired_bootstrap_diff(ablated, base, bootstrap=2000, groups=["x"] * 500 + ["y"] * 500)
    assert r["diff"] == pytest.approx(ablated.mean() - base.mean()) and r["diff"] > 0
    assert r["ci_low"] <= r["diff"] <= r["ci_high"] and r["ci_low"] > 0  # paired: tight, excludes 0
    assert r["n_a_only"] == int((ablated & ~base).sum()) and r["n_b_only"] == 0
    assert set(r["per_group"]) == {"x", "y"}
    same = paired_bootstrap_diff(base, base)
    assert same["diff"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap_diff(base, base[:10])


# --------------------------------------------------------------------------------------------- label maps
def test_label_map_subset_of_imagenet():
    names = imagenet_class_names()
    idx = label_map(["tench", "golf ball", "English springer"], names)
    assert idx == [0, names.index("golf ball"), names.index("English springer")]
    assert label_map(["Golf_Ball", "n01440764"], names) == [names.index("golf ball"), 0]  # loose names, wnids
    with pytest.raises(ValueError, match=r"does not know: \['golf club', 'zebra crossing'\]"):
        label_map(["tench", "golf club", "zebra crossing"], names)
    with pytest.raises(ValueError, match="same model class"):
        label_map(["tench", "Tench"], names)


def test_predict_real_photos_restricted_to_imagenette():
    from neuroscribe.datasets.cues import TextCue
    from neuroscribe.datasets.probe import open_probe_set, sample_root
    from neuroscribe.datasets.shifts import CuedDataset
    from neuroscribe.models import load_model
    lm = load_model("efficientnet-lite0")
    probe = open_probe_set(sample_root(), split="val")
    samples = [s for c in range(10) for s in [x for x in probe.samples if x.label == c][:2]]
    ds = CuedDataset(samples, probe.class_names, TextCue(), fraction=0.5, correlation="wrong", seed=0,
                     transform=lm.preprocess.transform())
    loader = torch.utils.data.DataLoader(ds, batch_size=10)
    cols = label_map(probe.class_names, lm.class_names)
    out, labels, groups = predict(lm.module, loader, "cpu", class_index=cols, progress=False)
    assert out.shape == (20, 10) and labels.tolist() == [s.label for s in samples]
    assert set(groups) <= {"clean", "cue-conflicts"} and len(set(groups)) == 2
    rep = accuracy_report(out, labels, groups, bootstrap=200)
    assert rep["acc"] >= 0.7 and set(rep["per_group"]) == set(groups)
    # edits go through the same hooks: zeroing the whole head kills the prediction signal
    lm.module.train()
    dead = predict(lm.module, loader, "cpu", ablation_edits(lm.module, {"_bn1": list(range(1280))}),
                   class_index=cols, keep_logits=False, progress=False)
    assert lm.module.training  # mode restored
    assert dead.outputs.ndim == 1 and accuracy_report(dead.outputs, dead.labels)["acc"] <= 0.3


# --------------------------------------------------------------------------------------------- selection
class Toy(nn.Module):
    """feat = identity over [signal, spurious, nothing, second signal]; head = signal + 2 spurious + 0.5 second."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.feat.weight.copy_(torch.eye(4))
            self.feat.bias.zero_()
            self.head.weight.copy_(torch.tensor([[0.0, 0, 0, 0], [1.0, 2.0, 0.0, 0.5]]))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.feat(x))


def _toy_batches(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    s = (2 * y - 1).float() + 0.9 * torch.randn(n, generator=g)
    spur = 1.5 * (2 * torch.randint(0, 2, (n,), generator=g) - 1).float()  # decorrelated on validation
    s2 = (2 * y - 1).float() + 0.9 * torch.randn(n, generator=g)  # a second, independent view of the label
    x = torch.stack([s, spur, torch.randn(n, generator=g), s2], 1)
    return [(x[i:i + 100], y[i:i + 100]) for i in range(0, n, 100)]


class Forbidden:
    """A test loader that fails if anything reads it."""

    def __iter__(self):
        raise AssertionError("selection read the test set")


def test_selection_orders_best_for_validation_first_and_chooses_n():
    model, val = Toy(), _toy_batches()
    flagged = [("feat", 3), ("feat", 1), ("feat", 2)]
    ordered = order_units(model, flagged, val, progress=False)
    assert [u for u, _ in ordered] == [("feat", 1), ("feat", 2), ("feat", 3)]
    accs = [a for _, a in ordered]
    assert accs == sorted(accs, reverse=True)
    base = val_accuracy(model, val)
    assert accs[0] > base and accs[1] == pytest.approx(base)  # unit 2 does nothing
    curve = accuracy_curve(model, ordered, val, max_n=3, progress=False)
    assert [n for n, _ in curve] == [0, 1, 2, 3] and curve[0][1] == pytest.approx(base)
    assert curve[1][1] == curve[2][1]  # a tie: the smaller n wins
    assert choose_n(curve) == 1
    assert choose_n([(0, 0.5), (1, 0.7), (2, 0.7), (3, 0.6)]) == 1 and choose_n([(0, 0.9), (1, 0.8)]) == 0
    assert accuracy_curve(model, ordered, val, max_n=1, progress=False) == curve[:2]
    # mean ablation with given means: unit 1 set to +50 everywhere pushes every image to class 1
    acc_mean = order_units(model, [("feat", 1)], val, "mean", {"feat": torch.tensor([0, 50.0, 0, 0])},
                           progress=False)[0][1]
    assert acc_mean == pytest.approx(float(torch.cat([y for _, y in val]).float().mean()))
    with pytest.raises(ValueError, match="flag set is empty"):
        order_units(model, [], val, progress=False)
    with pytest.raises(ValueError, match="curve is empty"):
        choose_n([])



def test_clean_curve_is_the_accuracy_on_the_clean_images_and_the_tolerance_bounds_what_n_costs_there():
    model, val = Toy(), _toy_batches()
    ordered = order_units(model, [("feat", 1), ("feat", 0)], val, progress=False)
    clean = [i % 3 == 0 for i in range(600)]
    rows = accuracy_curve(model, ordered, val, max_n=2, progress=False, clean=clean)
    assert [r[:2] for r in rows] == accuracy_curve(model, ordered, val, max_n=2, progress=False)
    xs, ys, m = torch.cat([x for x, _ in val]), torch.cat([y for _, y in val]), torch.tensor(clean)
    for n, row in enumerate(rows):  # the third entry: accuracy on the clean images alone, same edits
        edits = ablation_edits(model, as_unit_dict([u for u, _ in ordered[:n]]), "zero") if n else {}
        assert row[2] == val_accuracy(model, [(xs[m], ys[m])], edits)
    assert rows[1][2] > rows[0][2] + 0.2 and rows[0][2] != rows[0][1]  # not the overall accuracy again
    curve = [(0, 0.50, 0.80), (1, 0.60, 0.79), (2, 0.70, 0.75), (3, 0.65, 0.795)]
    assert choose_n(curve) == 2 and choose_n(curve, 0.05) == 2
    assert choose_n(curve, 0.02) == 3  # 2 costs 5 points of clean accuracy: the best within 2 points is 3
    assert choose_n(curve, 0.01) == 3 and choose_n(curve, 0.0) == 0
    assert choose_n([(1, 0.9, 0.1), (0, 0.5, 0.8)], 0.01) == 0  # n = 0 is found wherever it is, always a candidate
    with pytest.raises(ValueError, match="needs each row's clean accuracy"):
        choose_n([(0, 0.5), (1, 0.6)], 0.01)
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        choose_n(curve, -0.01)
    with pytest.raises(ValueError, match="marks no validation image as clean"):
        accuracy_curve(model, ordered, val, max_n=1, progress=False, clean=[False] * 600)
    with pytest.raises(ValueError, match="`clean` has 599 entries for 600 validation images"):
        accuracy_curve(model, ordered, val, max_n=1, progress=False, clean=clean[:599])


def test_controls_same_size_and_seeded():
    model, val = Toy(), _toy_batches()
    flagged = [("feat", 1), ("feat", 2)]
    all_units = {"feat": 4, "head": 2}
    draws = random_units(all_units, len(flagged), draws=5, seed=0)
    assert len(draws) == 5 and all(len(d) == len(flagged) and len(set(d)) == len(d) for d in draws)
    assert draws == random_units(all_units, 2, draws=5, seed=0) != random_units(all_units, 2, draws=5, seed=1)
    assert all(u not in flagged for d in random_units(all_units, 2, 5, 0, exclude=flagged) for u in d)
    with pytest.raises(ValueError, match=">= 5"):
        random_units(all_units, 2, draws=4)
    with pytest.raises(ValueError, match="cannot draw 7"):
        random_units(all_units, 7)
    top = sort_all(model, {"feat": 4}, val, len(flagged), progress=False)
    assert len(top) == len(flagged) and top[0] == ("feat", 1)
    capped = sort_all(model, {"feat": 4, "head": 2}, val, 2, max_candidates=3, seed=0, progress=False)
    assert len(capped) == 2
    with pytest.raises(ValueError, match="max_candidates"):
        sort_all(model, all_units, val, 3, max_candidates=2, progress=False)


def _cued_batches(n=600, seed=1):
    """Like :func:`_toy_batches`, but the spurious feature agrees with the label (as on a test set carrying the
    cue): there the spurious unit helps, and removing it costs accuracy."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    s = (2 * y - 1).float() + 0.9 * torch.randn(n, generator=g)
    spur = 1.5 * (2 * y - 1).float()
    s2 = (2 * y - 1).float() + 0.9 * torch.randn(n, generator=g)
    x = torch.stack([s, spur, torch.randn(n, generator=g), s2], 1)
    return [(x[i:i + 100], y[i:i + 100]) for i in range(0, n, 100)]


class Counted:
    """A loader that counts how often it is read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


def test_choosing_never_sees_test_data():
    # no choosing function can be handed a test set...
    for fn in (order_units, accuracy_curve, choose_n, sort_all, random_units, val_accuracy):
        params = inspect.signature(fn).parameters
        assert not [p for p in params if "test" in p.lower()], fn.__name__
    assert list(inspect.signature(choose_n).parameters) == ["curve", "tolerance"]  # both from validation
    assert "val_loader" in inspect.signature(select.order_units).parameters
    # ...and none keeps one from an earlier call: on a test set where the spurious unit agrees with the label the
    # flow would ablate nothing, on validation (spurious unit decorrelated) it ablates that unit. Run on the test
    # set first, evaluate on it, and the validation choice must still be validation's own.
    model, flagged = Toy(), [("feat", 1), ("feat", 2)]

    def choose(loader):
        ordered = order_units(model, flagged, loader, progress=False)
        n = choose_n(accuracy_curve(model, ordered, loader, progress=False))
        return [u for u, _ in ordered[:n]], sort_all(model, {"feat": 4}, loader, 1, progress=False)

    test = Counted(_cued_batches())
    assert choose(test) == ([], [("feat", 0)])  # what choosing on the test set would give (ties: input order)
    predict(model, test, progress=False)
    reads = test.reads
    val = _toy_batches(seed=0)
    assert choose(val) == ([("feat", 1)], [("feat", 1)])
    assert choose(Counted(val)) == ([("feat", 1)], [("feat", 1)])
    assert test.reads == reads  # the test set was not read again while choosing on validation
    assert len(random_units({"feat": 4}, 1, draws=5)[0]) == 1


def test_validation_batches_cached_when_they_fit():
    reads = []

    class Counting:
        def __iter__(self):
            reads.append(1)
            return iter(_toy_batches(200))

    val = select.ValBatches(Counting(), cache_mb=1)
    assert [len(x) for x, _ in val] == [100, 100] and [len(x) for x, _ in val] == [100, 100]
    assert len(reads) == 1  # the second pass came from memory
    big = select.ValBatches(Counting(), cache_mb=0)
    list(big), list(big)
    assert len(reads) == 3  # over budget: re-read each pass
    with pytest.raises(ValueError, match="label for every image"):
        list(select.ValBatches([(torch.zeros(2, 4), torch.tensor([0, -1]))]))


def test_shared_scores_give_the_same_orderings_with_fewer_passes(monkeypatch):
    model, val = Toy(), _toy_batches()
    passes = []  # one entry a unit scored: a full pass, or one edit set of a cut's passes
    full, cut = select.val_correct, select.cut_correct

    def cut_counted(*a, **k):
        right = cut(*a, **k)
        passes.extend([1] * len(right or []))
        return right
    monkeypatch.setattr(select, "val_correct", lambda *a, **k: passes.append(1) or full(*a, **k))
    monkeypatch.setattr(select, "cut_correct", cut_counted)
    a_alone = order_units(model, [("feat", 3), ("feat", 1)], val, progress=False)
    b_alone = order_units(model, [("feat", 1), ("feat", 2)], val, progress=False)
    top_alone = sort_all(model, {"feat": 4}, val, 2, progress=False)
    assert len(passes) == 2 + 2 + 4
    passes.clear()
    scores = {}
    assert order_units(model, [("feat", 3), ("feat", 1)], val, progress=False, scores=scores) == a_alone
    assert order_units(model, [("feat", 1), ("feat", 2)], val, progress=False, scores=scores) == b_alone
    assert sort_all(model, {"feat": 4}, val, 2, progress=False, scores=scores) == top_alone
    assert len(passes) == 4 and set(scores) == {("feat", u) for u in range(4)}  # each unit scored once


def test_channels_last_passes_match_and_restore_the_layout():
    import torchvision

    from neuroscribe.hooks import trace
    from neuroscribe.models import channels_last, to_layout
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64)
    edits = ablation_edits(m, {"layer3": [1, 5, 7]})
    with torch.no_grad():
        plain = m(x)
        with trace(m, edit=edits):
            plain_ablated = m(x)  # the usual layout
        with channels_last(m) as on:
            assert on and m.conv1.weight.is_contiguous(memory_format=torch.channels_last)
            fast = m(to_layout(x, on))
    assert all(p.is_contiguous() for p in m.parameters())  # layout restored on exit
    assert torch.allclose(plain, fast, atol=1e-4)
    pred = predict(m, [(x, torch.zeros(4, dtype=torch.long))], edits=edits, progress=False).outputs  # channels-last
    assert np.allclose(plain_ablated.numpy(), pred, atol=1e-4)
    assert not np.allclose(plain.numpy(), pred, atol=1e-3)  # the edit did change the logits
    assert all(p.is_contiguous() for p in m.parameters())
    with channels_last(nn.Linear(3, 2)) as on:
        assert not on  # no convolutions: nothing to change


def test_predict_scores_one_pass_by_several_heads_as_passes_of_their_own_models():
    """``predict(..., heads=, head=)``: each head applied to the input of the model's last layer gives, logit for
    logit, what a copy of the model with that head gives in a pass of its own, edits included."""
    import copy

    import torchvision

    from neuroscribe.ablate.measure import shared_passes
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=5).eval()
    other = copy.deepcopy(m)
    with torch.no_grad():
        other.fc.weight.normal_()
        other.fc.bias.normal_()
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 5
    edits = ablation_edits(m, {"layer3": [1, 5, 7]})
    got = predict(m, [(x, y)], edits=edits, progress=False, heads={"other": other.fc}, head="fc",
                  class_index=[4, 0, 2])
    alone = predict(other, [(x, y)], edits=ablation_edits(other, {"layer3": [1, 5, 7]}), progress=False,
                    class_index=[4, 0, 2])
    mine = predict(m, [(x, y)], edits=edits, progress=False, class_index=[4, 0, 2])
    assert np.array_equal(got["other"].outputs, alone.outputs) and np.array_equal(got[""].outputs, mine.outputs)
    assert not np.allclose(got["other"].outputs, got[""].outputs)  # the heads differ: so do their logits
    assert np.array_equal(got["other"].labels, alone.labels)
    with pytest.raises(ValueError, match="heads need head"):
        predict(m, [(x, y)], progress=False, heads={"other": other.fc})
    # which variants share a pass: the same body (a copy differing in fc only) and the same units
    changed = copy.deepcopy(m)
    with torch.no_grad():
        changed.layer1[0].conv1.weight.add_(1.0)
    head, passes = shared_passes(m, {"base": (m, []), "dfr": (other, []), "ablated": (m, [("layer3", 1)]),
                                     "ablated_dfr": (other, [("layer3", 1)]), "body": (changed, [])})
    assert head == "fc"
    assert {tuple(v) for v in passes.values()} == {("base", "dfr"), ("ablated", "ablated_dfr"), ("body",)}
