"""MILAN's re-fit variant: the last linear layer re-fitted on training images with the units still ablated."""
import numpy as np
import pytest
import torch

from neuroscribe.ablate.edit import ablation_edits
from neuroscribe.ablate.refit import last_linear, refit_last_layer
from neuroscribe.datasets.probe import load_image, sample_root
from neuroscribe.hooks import trace
from neuroscribe.models import load_model


def test_refit_learns_the_training_labels_and_keeps_the_ablation():
    torch.manual_seed(0)
    lm = load_model("torchvision:resnet18@none", num_classes=3)
    tf = lm.preprocess.with_overrides(resize=64, crop=64).transform()
    wnids = sorted(p.name for p in (sample_root() / "train").iterdir() if p.is_dir())[:3]
    xs, ys = [], []
    for c, w in enumerate(wnids):
        for p in sorted((sample_root() / "train" / w).glob("*.jpg"))[:20]:
            xs.append(tf(load_image(p)))
            ys.append(c)
    x, y = torch.stack(xs), torch.tensor(ys)
    loader = [(x[i:i + 20], y[i:i + 20]) for i in range(0, len(x), 20)]
    units = [("layer4.1.bn2", 3), ("layer4.1.bn2", 7)]
    assert last_linear(lm.module) == "fc"
    before = lm.module.fc.weight.clone()
    refit = refit_last_layer(lm.module, units, loader, "zero", device="cpu")
    assert torch.equal(lm.module.fc.weight, before)  # the original model is untouched
    edits = ablation_edits(refit, {"layer4.1.bn2": [3, 7]}, "zero")
    with torch.no_grad(), trace(refit, retain=["layer4.1.bn2"], edit=edits) as tr:
        out = refit(x)
    assert torch.all(tr["layer4.1.bn2"][:, [3, 7]] == 0)
    with torch.no_grad():
        base_acc = (lm.module(x).argmax(1) == y).float().mean().item()
    acc = (out.argmax(1) == y).float().mean().item()
    assert acc >= 0.8 and acc > base_acc, (acc, base_acc)  # random-init head ~ chance; the re-fit head fits


# =============================================================================================== DFR
class _Toy(torch.utils.data.Dataset):
    """2-D 'images' (core feature, cue feature) with labels and groups, items as the pipeline's sets give them."""

    def __init__(self, x, y, g):
        from types import SimpleNamespace
        self.x, self.y, self.g = x, y, g
        self.samples = [SimpleNamespace(label=int(a), group=b) for a, b in zip(y, g)]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), {"group": self.g[i]}


def _toy(n_agree: int, n_conflict: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n_agree + n_conflict,), generator=g)
    cue = torch.cat([y[:n_agree], 1 - y[n_agree:]])  # the cue names the label on the first n_agree images
    core = (2 * y - 1).float() + 0.8 * torch.randn(len(y), generator=g)
    x = torch.stack([core, 3.0 * (2 * cue - 1).float()], 1)
    groups = ["agree"] * n_agree + ["conflict"] * n_conflict
    return _Toy(x, y, groups)


def _shortcut_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2))
    with torch.no_grad():  # reads the cue only: right on every cue-agrees image, wrong on every cue-conflicts one
        model[1].weight.copy_(torch.tensor([[0.0, -1.0], [0.0, 1.0]]))
        model[1].bias.zero_()
    return model


def test_dfr_refits_on_a_group_balanced_half_and_drops_the_shortcut():
    from neuroscribe.ablate.refit import DFR_C, dfr_last_layer
    model = _shortcut_model()
    held = _toy(300, 100, seed=1)  # cue independent of the label only once the cells are balanced
    test = _toy(0, 200, seed=2)  # every image's cue names the wrong class
    batches = lambda d: torch.utils.data.DataLoader(d, batch_size=64)  # noqa: E731
    before = model[1].weight.clone()
    dfr, info = dfr_last_layer(model, [], held, batches, seed=0)
    assert torch.equal(model[1].weight, before)  # the original model is untouched
    with torch.no_grad():
        base = (model(test.x).argmax(1) == test.y).float().mean().item()
        acc = (dfr(test.x).argmax(1) == test.y).float().mean().item()
    assert base == 0.0 and acc > 0.8, (base, acc)
    w = dfr[1].weight
    assert (w[1, 0] - w[0, 0]).abs() > (w[1, 1] - w[0, 1]).abs()  # the core feature now outweighs the cue
    # group-balanced fit half, disjoint choose half (sizes), C from the grid
    assert info["cells"] == info["fit_cells"] == ["0/agree", "0/conflict", "1/agree", "1/conflict"]
    sizes = {c: sum(1 for y, g in zip(held.y.tolist(), held.g) if f"{y}/{g}" == c) for c in info["cells"]}
    assert info["fit_per_cell"] == min(n // 2 for n in sizes.values()) and info["fit"] == 4 * info["fit_per_cell"]
    assert info["choose"] == sum(n - n // 2 for n in sizes.values()) and info["images"] == 400
    assert info["C"] in DFR_C and set(info["worst_group_by_C"]) == {str(c) for c in DFR_C}
    assert info["worst_group_by_C"][str(info["C"])] == max(info["worst_group_by_C"].values())
    again, info2 = dfr_last_layer(model, [], held, batches, seed=0)
    assert info2 == info and torch.equal(again[1].weight, dfr[1].weight)  # seeded


def test_dfr_cuts_two_copies_of_the_same_photos_alike():
    """A holdout given clean and cued (clean copies first, same order): every photo is fitted in both groups or
    scored in both, never fitted in one and scored in the other."""
    from neuroscribe.ablate.refit import dfr_split, labels_and_groups
    one = _toy(0, 60, seed=3)
    n = len(one)
    both = _Toy(torch.cat([one.x, one.x]), torch.cat([one.y, one.y]), ["clean"] * n + ["conflict"] * n)
    fit, choose = map(set, dfr_split(*labels_and_groups(both), seed=0))
    assert fit and choose and not fit & choose
    assert {i % n for i in fit}.isdisjoint({i % n for i in choose})  # no photo on both sides
    assert {i for i in fit if i < n} == {i - n for i in fit if i >= n}  # the same photos in both groups


def test_dfr_final_fit_uses_the_whole_slice_and_does_not_depend_on_feature_scale():
    """C is tuned on halves, but the head is fitted on balanced subsets of every image (DFR's final fit), on
    standardised features: scaling a feature by 1000 gives the same predictions (unstandardised, an L2 penalty
    would weigh that feature 10^6 times less)."""
    from neuroscribe.ablate.refit import dfr_last_layer
    held = _toy(300, 100, seed=1)
    seen = []
    # a grid up to 3.0, where this toy's best C (1.0) is clear: over the default grid (up to 0.3) its worst groups
    # differ by one choose image between C values, and the 1000x scale's rounding may flip which one wins
    grid = (0.001, 0.01, 0.1, 1.0, 3.0)

    def batches(d):
        seen.append(list(d.indices))
        return torch.utils.data.DataLoader(d, batch_size=64)
    dfr, info = dfr_last_layer(_shortcut_model(), [], held, batches, seed=0, cs=grid)
    assert seen == [list(range(len(held)))]  # one pass over every image
    smallest = min(sum(1 for y, g in zip(held.y.tolist(), held.g) if f"{y}/{g}" == c) for c in info["cells"])
    assert info["final"]["per_cell"] == smallest and info["final"]["images"] == 4 * smallest
    assert info["final"]["images"] > info["fit"]  # more than the tuning half
    scaled = _Toy(held.x * torch.tensor([1000.0, 1.0]), held.y, held.g)
    model2 = _shortcut_model()
    with torch.no_grad():
        model2[1].weight[:, 0] /= 1000.0  # the same (cue-only) model on the scaled input
    dfr2, info2 = dfr_last_layer(model2, [], scaled, lambda d: torch.utils.data.DataLoader(d, batch_size=64), seed=0,
                                 cs=grid)
    test = _toy(0, 200, seed=2)
    with torch.no_grad():
        p1 = dfr(test.x).argmax(1)
        p2 = dfr2(test.x * torch.tensor([1000.0, 1.0])).argmax(1)
    assert info2["C"] == info["C"] and (p1 == p2).float().mean() > 0.99


def test_dfr_chooses_c_by_the_worst_cue_group_not_the_worst_cell():
    """The worst group is the cue condition with the lowest class-averaged accuracy on the choose half."""
    from neuroscribe.ablate.refit import dfr_last_layer
    _, info = dfr_last_layer(_shortcut_model(), [], _toy(300, 100, seed=1),
                             lambda d: torch.utils.data.DataLoader(d, batch_size=64), seed=0)
    for c, groups in info["group_acc_by_C"].items():
        assert set(groups) == {"agree", "conflict"}
        assert info["worst_group_by_C"][c] == min(groups.values())
        assert info["worst_cell_by_C"][c] <= min(groups.values())
    best = max(info["worst_group_by_C"].values())
    assert info["C"] == min(float(c) for c, v in info["worst_group_by_C"].items() if v == best)  # ties: smaller C


def test_dfr_needs_two_cells():
    from neuroscribe.ablate.refit import dfr_last_layer
    one = _Toy(torch.randn(20, 2), torch.zeros(20, dtype=torch.long), ["g"] * 20)
    with pytest.raises(ValueError, match=r"two \(class, group\) cells.*0/g"):
        dfr_last_layer(_shortcut_model(), [], one, lambda d: torch.utils.data.DataLoader(d, batch_size=8))


def test_dfr_shift_must_be_its_own():
    from neuroscribe.config import load_config
    base = {"shifts": [{"name": "p", "data": {}}, {"name": "v", "data": {}}, {"name": "d", "data": {}}],
            "probe": "p", "ablate": {"validation": "v"}}
    for bad in ("p", "v", "nope"):
        with pytest.raises(ValueError, match="ablate.dfr"):
            load_config(None, dict(base, ablate={"validation": "v", "dfr": bad}))
    assert load_config(None, dict(base, ablate={"validation": "v", "dfr": "d"})).ablate.dfr == "d"


def test_dfr_holdout_is_accepted_only_with_a_training_holdout():
    from neuroscribe.config import load_config
    base = {"shifts": [{"name": "p", "data": {}}], "probe": "p"}
    cfg = load_config(None, dict(base, train={"holdout": 0.1}, ablate={"validation": "holdout", "dfr": "holdout"}))
    assert cfg.ablate.dfr == "holdout"
    for bad in ({"holdout": 0.0}, None):
        with pytest.raises(ValueError, match="train.holdout"):
            load_config(None, dict(base, **({"train": bad} if bad else {}), ablate={"dfr": "holdout"}))


def test_holdout_halves_split_validation_and_dfr_disjoint_and_stratified(tmp_path):
    from pathlib import Path
    """With validation and DFR both on the training holdout, choosing N and fitting DFR see disjoint, class-
    stratified halves of it; with validation elsewhere DFR takes the whole holdout."""
    import csv
    import json
    from neuroscribe.config import load_config
    from PIL import Image
    from neuroscribe.datasets.sets import dfr_set, holdout_halves, validation_set
    labels = [c for c in range(4) for _ in range(7)]  # class-sorted, 7 per class
    val, dfr = holdout_halves(labels, seed=3)
    assert not set(val) & set(dfr) and sorted(val + dfr) == list(range(28))
    assert [sum(labels[i] == c for i in dfr) for c in range(4)] == [3, 3, 3, 3]  # each class cut in half
    skewed = [0] * 20 + [1] * 3 + [2] * 2  # a small class is on both sides too, never all on one
    v2, d2 = holdout_halves(skewed, seed=0)
    assert [sum(skewed[i] == c for i in d2) for c in range(3)] == [10, 1, 1]
    assert [sum(skewed[i] == c for i in v2) for c in range(3)] == [10, 2, 1]
    assert dfr != list(range(14)) and holdout_halves(labels, seed=3) == (val, dfr)
    # a job folder with a trained holdout manifest (28 real photos, 4 classes)
    hold = tmp_path / "train" / "seed0" / "holdout" / "cued"
    hold.mkdir(parents=True)
    wnids = sorted(p.name for p in (sample_root() / "train").iterdir() if p.is_dir())[:4]
    with (hold / "manifest.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        for c, wn in enumerate(wnids):
            for p in sorted((sample_root() / "train" / wn).glob("*.jpg"))[:7]:
                (hold / p.name).write_bytes(p.read_bytes())
                w.writerow([p.name, wn, "cue-disagrees"])
    clean = hold.parent / "clean"  # the same photos clean, as the train stage writes them (split.json names it)
    clean.mkdir()
    with (hold / "manifest.csv").open() as f, (clean / "manifest.csv").open("w", newline="") as g:
        rows = list(csv.DictReader(f))
        w = csv.writer(g)
        w.writerow(["path", "label", "group"])
        for r in rows:
            (clean / r["path"]).write_bytes((hold / r["path"]).read_bytes())
            w.writerow([r["path"], r["label"], "clean"])
    (tmp_path / "train.json").write_text(json.dumps({"holdout_manifest": str(hold / "manifest.csv"),
                                                     "class_names": wnids,
                                                     "checkpoint": str(hold.parents[1] / "model.safetensors")}))
    (hold.parents[1] / "split.json").write_text(json.dumps({"holdout_clean_manifest": "holdout/clean/manifest.csv"}))
    base = {"shifts": [{"name": "p", "data": {}}, {"name": "v", "data": {}}], "probe": "p", "out": str(tmp_path),
            "train": {"holdout": 0.1, "cue": {"kind": "text"}}}
    pre = load_model("torchvision:resnet18@none", num_classes=4).preprocess
    both = load_config(None, dict(base, ablate={"validation": "holdout", "dfr": "holdout"}))
    v_ds, _, v_desc = validation_set(both, pre)
    d_ds, _, d_desc = dfr_set(both, pre)
    # validation: each of its photos clean and cued (the clean accuracy a choice costs weighs as much as the cued
    # accuracy it gains); DFR: its photos in the same two groups; the two never share a photo
    v_groups = [s.group for s in v_ds.samples]
    assert v_groups.count("clean") == v_groups.count("cue-disagrees") == len(v_ds) // 2
    v_photos = {Path(s.path).name for s in v_ds.samples}
    d_photos = {Path(s.path).name for s in d_ds.samples[:len(d_ds) // 2]}  # its clean half: the photos themselves
    assert len(v_photos) + len(d_photos) == 28 and not v_photos & d_photos and len(v_ds) == 2 * len(v_photos)
    assert len(d_ds) == 2 * len(d_photos)
    assert "half kept for validation" in v_desc and "half kept for dfr" in d_desc and "twice" in v_desc
    assert {s.label for s in d_ds.samples} == {0, 1, 2, 3}
    # DFR's cued copies (ablate.dfr_cue: random, the default) are drawn again from its clean photos with the cue
    # naming a random class, the right one too: independent of the label, not always wrong (anti-correlated)
    n = len(d_ds) // 2
    clean_half, cued_half = d_ds.samples[:n], d_ds.samples[n:]
    assert {s.group for s in clean_half} == {"clean"} and {s.group for s in cued_half} == {"cued"}
    assert [s.label for s in clean_half] == [s.label for s in cued_half]
    assert all(Path(s.path).parent.parent.parent == tmp_path / "dfr-slice" for s in cued_half)
    with (Path(cued_half[0].path).parents[1] / "manifest.csv").open() as f:
        drawn = list(csv.DictReader(f))
    agree = [int(r["cue_class"]) == int(r["label"]) for r in drawn]
    assert any(agree) and not all(agree) and all(r["has_cue"] == "1" for r in drawn), drawn
    assert all(np.asarray(Image.open(c.path).convert("RGB")).shape == np.asarray(Image.open(k.path)).shape
               and (np.asarray(Image.open(c.path).convert("RGB")) != np.asarray(Image.open(k.path))).any()
               for c, k in zip(clean_half, cued_half))  # the text is drawn on each photo
    stamp = Path(cued_half[0].path).stat().st_mtime_ns
    assert [s.path for s in dfr_set(both, pre)[0].samples] == [s.path for s in d_ds.samples]  # written once, reused
    assert Path(cued_half[0].path).stat().st_mtime_ns == stamp and "independent of the label" in d_desc
    wrong = load_config(None, dict(base, ablate={"validation": "holdout", "dfr": "holdout", "dfr_cue": "wrong"}))
    w_ds, _, w_desc = dfr_set(wrong, pre)  # the holdout's own cued copies, every one naming a wrong class
    assert sorted({s.group for s in w_ds.samples}) == ["clean", "cue-disagrees"] and len(w_ds) == len(d_ds)
    assert [s.path for s in w_ds.samples[:n]] == [s.path for s in clean_half] and "never names the label" in w_desc
    whole = load_config(None, dict(base, ablate={"validation": "v", "dfr": "holdout"}))
    assert len(dfr_set(whole, pre)[0]) == 56
    alone = load_config(None, dict(base, ablate={"validation": "holdout"}))
    assert len(validation_set(alone, pre)[0]) == 56
    no_cue = load_config(None, dict(base, train={"holdout": 0.1}, ablate={"validation": "holdout"}))
    assert len(validation_set(no_cue, pre)[0]) == 28  # no cue in training: the holdout is clean once


def test_toward_head_is_sklearns_objective_with_another_centre():
    """Centred at zero it is sklearn's multinomial logistic regression (same C); as C -> 0 it stays at the prior."""
    from sklearn.linear_model import LogisticRegression
    from neuroscribe.ablate.refit import _TowardHead
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64).numpy()
    y = ((x[:, 0] + 0.5 * x[:, 1] + 0.3 * torch.randn(300, generator=g, dtype=torch.float64).numpy()) > 0).astype(int)
    y[::7] = 2  # three classes
    zero = (np.zeros((3, 4)), np.zeros(3))
    for c in (0.01, 1.0):
        ours = _TowardHead(zero, c).fit(x, y)
        ref = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(x, y)
        assert np.allclose(ours.coef_, ref.coef_, atol=1e-4) and np.allclose(ours.intercept_, ref.intercept_, atol=1e-4)
        assert (ours.predict(x) == ref.predict(x)).all()
    prior = (np.arange(12.0).reshape(3, 4) / 10, np.zeros(3))
    stay = _TowardHead(prior, 1e-9).fit(x, y)
    assert np.allclose(stay.coef_, prior[0], atol=1e-5)  # no room to move: the prior's weights
    assert not np.allclose(_TowardHead(prior, 1.0).fit(x, y).coef_, prior[0], atol=1e-2)  # room to move: it moves


def test_dfr_toward_the_trained_head_keeps_it_when_c_is_tiny_and_drops_the_shortcut_when_not():
    from neuroscribe.ablate.refit import dfr_last_layer
    model = _shortcut_model()
    held, test = _toy(300, 100, seed=1), _toy(0, 200, seed=2)
    batches = lambda d: torch.utils.data.DataLoader(d, batch_size=64)  # noqa: E731
    kept, info = dfr_last_layer(model, [], held, batches, seed=0, cs=(1e-9,), toward="head")
    assert info["toward"] == "head" and info["C"] == 1e-9
    with torch.no_grad():  # the same function as the trained head (logits up to a shift shared by the classes)
        d0, d1 = (model(test.x).diff(dim=1), kept(test.x).diff(dim=1))
    assert torch.allclose(d0, d1, atol=1e-4)
    moved, info = dfr_last_layer(model, [], held, batches, seed=0, toward="head")
    with torch.no_grad():
        assert (moved(test.x).argmax(1) == test.y).float().mean().item() > 0.8  # the shortcut model gets 0 here
    with pytest.raises(ValueError, match="toward='nowhere'"):
        dfr_last_layer(model, [], held, batches, seed=0, toward="nowhere")


def _toy3(n: int, agree: float, seed: int):
    """3 classes; features: the class's core signal (3), a cue naming a class (3), noise (4). The cue names the label
    on ``agree`` of the images and a random other class on the rest (groups agree / conflict)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    n_agree = int(agree * n)
    cue = torch.cat([y[:n_agree], (y[n_agree:] + torch.randint(1, 3, (n - n_agree,), generator=g)) % 3])
    x = torch.cat([torch.nn.functional.one_hot(y, 3).float() * 2 + 0.7 * torch.randn(n, 3, generator=g),
                   torch.nn.functional.one_hot(cue, 3).float() * 3, torch.randn(n, 4, generator=g)], 1)
    return _Toy(x, y, ["agree"] * n_agree + ["conflict"] * (n - n_agree))


def test_dfr_l1_is_dfrs_own_sparse_one_vs_rest_fit():
    from neuroscribe.ablate.refit import DFR_C_L1, dfr_last_layer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(10, 3))
    with torch.no_grad():  # the shortcut: reads the cue only
        model[1].weight.zero_()
        model[1].weight[:, 3:6] = torch.eye(3)
        model[1].bias.zero_()
    held, test = _toy3(600, 0.5, seed=1), _toy3(300, 0.0, seed=2)
    batches = lambda d: torch.utils.data.DataLoader(d, batch_size=64)  # noqa: E731
    fits = {p: dfr_last_layer(model, [], held, batches, seed=0, penalty=p) for p in ("l1", "l2")}
    l1, info = fits["l1"]
    assert info["penalty"] == "l1" and set(info["worst_group_by_C"]) == {str(c) for c in DFR_C_L1}
    with torch.no_grad():
        assert (model(test.x).argmax(1) == test.y).float().mean().item() == 0.0
        for p, (m, _) in fits.items():  # three classes: the one-vs-rest scores are the logits
            assert (m(test.x).argmax(1) == test.y).float().mean().item() > 0.8, p
    sparse, _ = dfr_last_layer(model, [], held, batches, seed=0, penalty="l1", cs=(0.02,))
    assert (sparse[1].weight[:, 6:] == 0).float().mean() > 0.5  # L1 drops noise features outright
    assert (fits["l2"][0][1].weight[:, 6:] != 0).all()  # L2 only shrinks them
    with pytest.raises(ValueError, match="penalty='l1' with toward='head'"):
        dfr_last_layer(model, [], held, batches, seed=0, penalty="l1", toward="head")


def test_dfr_extra_images_join_every_fit_and_are_never_scored(monkeypatch):
    """``extra`` (the job's training photos, ``ablate.dfr_train``) joins the fits of the C search and the final fit,
    never the choose half that picks C. Here only ``extra`` holds a third class: with it the re-fit predicts that class
    where its images lie, without it never; every regression (each C, each final fit) gets the 200 extra images; C is
    chosen on the slice's own groups with the same choose half."""
    from neuroscribe.ablate import refit as refit_mod
    from neuroscribe.ablate.refit import DFR_C, DFR_RETRAINS, dfr_last_layer
    sizes, real_fit = [], refit_mod._fit
    monkeypatch.setattr(refit_mod, "_fit", lambda x, y, *a, **k: sizes.append(len(y)) or real_fit(x, y, *a, **k))
    held = _toy(300, 100, seed=1)
    g = torch.Generator().manual_seed(7)
    x3 = torch.stack([6 + 0.3 * torch.randn(200, generator=g), 3.0 * torch.randn(200, generator=g).sign()], 1)
    extra = _Toy(x3, torch.full((200,), 2), ["other"] * 200)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 3))
    with torch.no_grad():  # classes 0/1 read the cue only; class 2 never wins
        model[1].weight.copy_(torch.tensor([[0.0, -1.0], [0.0, 1.0], [0.0, 0.0]]))
        model[1].bias.copy_(torch.tensor([0.0, 0.0, -10.0]))
    seen = []

    def batches(d):
        seen.append(len(d))
        return torch.utils.data.DataLoader(d, batch_size=64)
    plain, info0 = dfr_last_layer(model, [], held, batches, seed=0)
    dfr, info = dfr_last_layer(model, [], held, batches, seed=0, extra=extra)
    assert seen == [400, 400, 200]  # one pass over the slice each, one over extra
    fits = len(DFR_C) + DFR_RETRAINS
    assert len(sizes) == 2 * fits and [b - a for a, b in zip(sizes[:fits], sizes[fits:])] == [200] * fits
    assert info0["extra"] == 0 and info["extra"] == 200
    assert info["choose"] == info0["choose"] and info["fit"] == info0["fit"]
    assert all(set(groups) == {"agree", "conflict"} for groups in info["group_acc_by_C"].values())  # never scored
    with torch.no_grad():
        assert (dfr(x3).argmax(1) == 2).float().mean() > 0.95
        assert not (plain(x3).argmax(1) == 2).any()
        test = _toy(0, 200, seed=2)
        assert (dfr(test.x).argmax(1) == test.y).float().mean() > 0.8  # the slice's classes are still told apart


def test_dfr_with_extra_images_starts_each_fit_from_the_last_and_reaches_the_same_fit(monkeypatch):
    """With ``extra`` every L2 fit starts from the previous solution (the chosen C's for the final fits): the same C
    and the same head as fitting each from zero, to the solver's tolerance, in fewer L-BFGS iterations. Not for
    the L1 or head-centred fits (their solvers start from their own points)."""
    from neuroscribe.ablate.refit import DFR_C, DFR_RETRAINS, dfr_last_layer
    g = torch.Generator().manual_seed(3)
    centres = 1.5 * torch.randn(4, 24, generator=g)

    def images(n, cued):
        y = torch.randint(0, 4, (n,), generator=g)
        return _Toy(centres[y] + torch.randn(n, 24, generator=g), y, ["cued" if cued else "clean"] * n)
    a, b, extra = images(200, False), images(200, True), images(1200, False)
    held = _Toy(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), a.g + b.g)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(24, 4))

    def batches(d):
        return torch.utils.data.DataLoader(d, batch_size=256)
    from neuroscribe.ablate import refit as refit_mod
    starts, real_fit = [], refit_mod._fit
    monkeypatch.setattr(refit_mod, "_fit", lambda *a, start=None, **k: starts.append(start and start.C)
                        or real_fit(*a, start=start, **k))
    warm, info = dfr_last_layer(model, [], held, batches, seed=0, extra=extra)
    monkeypatch.undo()
    grid = list(DFR_C)
    assert starts[:len(grid)] == [None] + grid[:-1] and info["C"] != grid[-1]  # the grid in order, each from the last
    assert starts[len(grid):] == [info["C"]] * DFR_RETRAINS  # the final fits from the chosen C's
    cold, info0 = dfr_last_layer(model, [], held, batches, seed=0, extra=extra, warm_start=False)
    _, plain = dfr_last_layer(model, [], held, batches, seed=0)
    _, l1 = dfr_last_layer(model, [], held, batches, seed=0, extra=extra, penalty="l1")
    assert info["warm_start"] and not info0["warm_start"] and not plain["warm_start"] and not l1["warm_start"]
    assert info["C"] == info0["C"] and info["group_acc_by_C"] == info0["group_acc_by_C"]
    assert info["solver_iterations"] < 0.7 * info0["solver_iterations"]
    w, w0 = warm[1].weight.detach(), cold[1].weight.detach()
    assert (w - w0).abs().max() < 0.02 * w0.abs().max()
    with torch.no_grad():
        assert torch.equal(warm(held.x).argmax(1), cold(held.x).argmax(1))


def test_in_memory_set_holds_the_same_items_read_once(tmp_path, monkeypatch):
    """DFR's sets are read once for all of a stage's fits (:class:`~neuroscribe.datasets.sets.InMemory`): real photos
    with the cue drawn, the same tensors, labels and groups as reading them again, an unreadable photo still None,
    later passes touch no file and start no worker; a set over the memory limit is read from disk as before."""
    from types import SimpleNamespace
    import torchvision.transforms as T
    from neuroscribe.ablate.refit import labels_and_groups
    from neuroscribe.datasets import probe as probe_mod, sets
    from neuroscribe.datasets.cues import TextCue
    from neuroscribe.datasets.probe import Sample, open_probe_set, sample_root
    from neuroscribe.datasets.shifts import CuedDataset
    probe = open_probe_set(sample_root(), split="val")
    photos = [Sample(s.path, s.label, "clean") for c in range(10) for s in [x for x in probe.samples
                                                                             if x.label == c][:2]]
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    photos.insert(7, Sample(tmp_path / "bad.jpg", 3, "clean"))
    to_tensor = T.Compose([T.Resize(48), T.CenterCrop(48), T.ToTensor()])
    cued = CuedDataset([(s.path, s.label) for s in photos], probe.class_names, TextCue(), fraction=1.0,
                       correlation="random", seed=0, transform=T.ToTensor(), geometry=T.Compose([T.Resize(48),
                                                                                                T.CenterCrop(48)]))
    ds = sets._TrainCopies(sets.Labelled(photos, to_tensor, probe.class_names), cued)
    cfg = SimpleNamespace(workers=1, batch_size=8)
    mem = sets.in_memory(cfg, ds)
    assert isinstance(mem, sets.InMemory) and len(mem) == len(ds) == 42
    assert mem[7] is None and mem[28] is None  # the unreadable photo, clean and cued
    for i in range(len(ds)):
        if i not in (7, 28):
            (x, y, g), (x0, y0, g0) = mem[i], ds[i]
            assert torch.equal(x, x0) and (y, g) == (y0, g0)
    assert labels_and_groups(mem) == labels_and_groups(ds) and mem.samples is ds.samples
    reads = []
    from neuroscribe.datasets import shifts as shifts_mod
    for mod in (probe_mod, shifts_mod):  # the clean and the cued half read photos through these
        monkeypatch.setattr(mod, "load_image", lambda *a, **k: reads.append(a) or None)
    with pytest.raises(TypeError):  # the patch sees a read
        ds[len(photos)]
    reads.clear()
    batches = list(sets.loader(cfg, torch.utils.data.Subset(mem, range(len(mem)))))
    assert not reads and sum(len(b[1]) for b in batches) == 40
    assert sets.loader(cfg, torch.utils.data.Subset(mem, [0])).num_workers == 0 and sets.loader(cfg, ds).num_workers
    monkeypatch.undo()
    monkeypatch.setattr(sets, "IN_MEMORY_BYTES", 3 * 48 * 48 * 4 * 41)  # one image short of the whole set
    assert sets.in_memory(cfg, ds) is ds and sets.in_memory(cfg, None) is None
