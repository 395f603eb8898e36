"""The labelled image sets the robustness stages read: test sets (in-distribution and every shift), the validation
set that choices are made on, and loaders over them. Items are ``(tensor, label, {'group': g})`` in the model's
preprocessing; unreadable images are dropped by :func:`collate`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import JobConfig, ShiftSetConfig


class Labelled(torch.utils.data.Dataset):
    """``(tensor, label, {'group': g})`` per sample; unreadable images give None (dropped by :func:`collate`).

    Images as they are on disk, no cue drawn: :meth:`render` gives what :func:`~neuroscribe.datasets.shifts.materialise`
    writes (``geometry`` first, as a :class:`~neuroscribe.datasets.shifts.CuedDataset` does), so any shift, planted
    or on disk, can be written as the probe set."""

    def __init__(self, samples, transform, class_names=None, geometry=None):
        self.samples, self.transform = samples, transform
        self.class_names, self.geometry = class_names, geometry

    def render(self, index: int):
        """The PIL image of sample ``index`` (after ``geometry``) and its info, without ``transform``; the group is
        the sample's own (from the data), ``has_cue`` False."""
        from .probe import load_image
        s = self.samples[index]
        img = load_image(s.path)
        img = self.geometry(img) if self.geometry is not None else img
        return img, {"index": index, "has_cue": False, "cue_token": "", "cue_class": -1, "group": s.group or "",
                     "cue_box": (0, 0, 0, 0)}

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from .probe import ImageLoadError, load_image
        s = self.samples[i]
        try:
            return self.transform(load_image(s.path)), int(s.label), {"group": s.group or "all"}
        except ImageLoadError:
            return None


def collate(batch):
    return torch.utils.data.default_collate([b for b in batch if b is not None])


def held_out(job: str | Path) -> set[Path]:
    """The images a trained job held out as its validation set (resolved source paths; empty without training).
    Sets that choose or fit something on training images (probe, evidence, re-fit) must not contain them."""
    tj = Path(job) / "train.json"
    if not tj.is_file():
        return set()
    split_file = Path(json.loads(tj.read_text())["checkpoint"]).parent / "split.json"
    if not split_file.is_file():
        return set()
    split = json.loads(split_file.read_text())
    root = Path(split["data_root"])
    return {(root / rel).resolve() for rel in split.get("holdout_sources") or []}


def shift_set(shift: ShiftSetConfig, pre, seed: int, classes: list[str] | None = None,
              exclude: set[Path] | frozenset = frozenset()):
    """``(dataset, class_names, description)`` for one test set, items in the model's preprocessing ``pre``.
    A manifest's integer labels index ``classes`` (the model's class list); images in ``exclude`` (resolved paths,
    e.g. :func:`held_out`) are left out. With a cue, the model's geometry (resize + crop) comes first and the cue is
    drawn on that, as in training, so a corner cue is never cropped away."""
    from .probe import open_probe_set
    d = shift.data
    probe = open_probe_set(d.root, d.format, d.split, d.limit, seed, classes, target=d.target, spurious=d.spurious)
    if exclude:
        probe.samples = [s for s in probe.samples if Path(s.path).resolve() not in exclude]
    if (probe.labels() < 0).any():
        raise ValueError(f"shift {shift.name!r}: every image needs a label (class folders or a label column)")
    names = probe.class_names or [str(i) for i in range(int(probe.labels().max()) + 1)]
    if shift.cue is None:
        return Labelled(probe.samples, pre.transform(), names), names, f"{len(probe)} images from {probe.root}"
    from .shifts import CuedDataset
    ds = CuedDataset([(s.path, s.label) for s in probe.samples], names, shift.cue, fraction=shift.fraction,
                     correlation=shift.correlation, strength=shift.strength, seed=shift.seed,
                     transform=pre.to_tensor(), geometry=pre.geometry())
    from .cues import describe_cue
    return ds, names, (f"{len(probe)} images from {probe.root}; {shift.fraction:.0%} of them with "
                       f"{describe_cue(shift.cue, shift.correlation)}")


def check_disjoint(cfg: JobConfig) -> None:
    """Refuse a job whose choosing sets (``probe``, the ``ablate.validation`` shift, ``flag.evidence_shift``,
    ``flag.group_shift``, ``ablate.dfr``, ``train.data`` under ``ablate.dfr_train``) share an image with a test set
    (``data`` and every other shift), or the DFR shift with the probe or validation shift, compared by resolved source
    path: anything chosen or fitted there would have seen those images (``ablate.dfr: holdout`` is the training
    holdout, which a validation shift leaves out, see :func:`validation_set`). Raises ``ValueError`` naming both."""
    from .probe import open_probe_set

    def paths(d) -> set[Path]:
        ps = open_probe_set(d.root, d.format, d.split, d.limit, cfg.seed, None, target=d.target, spurious=d.spurious)
        return {Path(s.path).resolve() for s in ps.samples}

    choosing = {cfg.probe, cfg.ablate.validation, cfg.flag.evidence_shift, cfg.flag.group_shift, cfg.ablate.dfr}
    chosen = {f"shift {s.name!r}": paths(s.data) for s in cfg.shifts if s.name in choosing}
    if cfg.ablate.dfr_train and cfg.train is not None:  # DFR also fits on the photos the model trained on
        d = cfg.train.data
        ps = open_probe_set(d.root, d.format, d.split, d.limit, cfg.train.data_seed, None, target=d.target,
                            spurious=d.spurious)
        chosen["train.data (ablate.dfr_train)"] = {Path(s.path).resolve() for s in ps.samples}
    if not chosen:
        return
    tests = [("data", cfg.data)] + [(f"shifts[{s.name}]", s.data) for s in cfg.shifts if s.name not in choosing]
    for other in (cfg.probe, cfg.ablate.validation) if f"shift {cfg.ablate.dfr!r}" in chosen else ():  # DFR's own
        shared = chosen[f"shift {cfg.ablate.dfr!r}"] & chosen.get(f"shift {other!r}", set())
        if shared:
            raise ValueError(f"ablate.dfr shift {cfg.ablate.dfr!r} shares {len(shared)} images with shift {other!r}: "
                             "DFR re-fits the last layer on its images, so they must be disjoint from the probe and "
                             "the validation set (e.g. another split, or data.limit samples of other folders)")
    for where, d in tests:
        mine = paths(d)
        for name, theirs in chosen.items():
            if mine & theirs:
                raise ValueError(f"{where} (a test set) shares {len(mine & theirs)} images with {name}, "
                                 "which chooses units or N or fits a layer (probe, validation, evidence, DFR): give "
                                 "them disjoint data, e.g. the data's own train/val/test splits (data.split)")


def loader(cfg: JobConfig, ds):
    held = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds  # in memory: nothing to decode, no workers
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate,
                                       num_workers=0 if isinstance(held, InMemory) else cfg.workers)


#: The most an :class:`InMemory` set may hold; a larger set is read from disk on every pass.
IN_MEMORY_BYTES = 2 << 30


class InMemory(torch.utils.data.Dataset):
    """``ds`` read once (one pass, ``workers`` processes) and its items kept: a set that several fits pass over (DFR's
    slice and training photos, for each point of ablate's ``dfr_ns`` curve) is decoded and its cues drawn once.
    The same items as ``ds`` (cues are drawn per index, seeded), the same attributes; an unreadable image stays None.
    :func:`in_memory` builds it only when the items fit in :data:`IN_MEMORY_BYTES`."""

    def __init__(self, ds, workers: int = 0, batch_size: int = 64):
        self.ds, self.items = ds, []
        for good, x, rest in torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                                         collate_fn=_stacked):
            x, k = x.clone(), 0  # out of the workers' shared memory (one storage a batch: few file descriptors)
            for g in good:
                self.items.append((x[k], *rest[k]) if g else None)
                k += g

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def __getattr__(self, name):  # samples, group, pair, class_names... of the set it holds
        if name in ("ds", "items"):
            raise AttributeError(name)
        return getattr(self.ds, name)


def _stacked(batch):
    """A batch of items as ``(which are images, their tensors stacked, (label, info) of each)``."""
    good = [it for it in batch if it is not None]
    return [it is not None for it in batch], torch.stack([it[0] for it in good]) if good else torch.zeros(0), \
        [tuple(it[1:]) for it in good]


def in_memory(cfg: JobConfig, ds):
    """``ds`` as an :class:`InMemory` set when its items, ``(tensor, ...)`` of one shape, fit in
    :data:`IN_MEMORY_BYTES` (judged by the first readable one), else ``ds`` itself (None stays None)."""
    if ds is None or not len(ds):
        return ds
    first = next((it for it in map(ds.__getitem__, range(min(len(ds), 8))) if it is not None), None)
    if not (isinstance(first, tuple) and isinstance(first[0], torch.Tensor)) \
            or first[0].numel() * first[0].element_size() * len(ds) > IN_MEMORY_BYTES:
        return ds
    return InMemory(ds, cfg.workers, cfg.batch_size)


def test_sets(cfg: JobConfig, pre, classes: list[str] | None = None) -> dict[str, tuple]:
    """In-distribution (the job's clean probe images) plus every ``shifts`` entry except the probe, the validation
    and the DFR one."""
    sets = {"in-distribution": shift_set(ShiftSetConfig(name="in-distribution", data=cfg.data), pre, cfg.seed,
                                         classes)}
    for s in cfg.shifts:
        if s.name not in (cfg.ablate.validation, cfg.probe, cfg.ablate.dfr):
            sets[s.name] = shift_set(s, pre, cfg.seed, classes)
    return sets


#: How the holdout is read (in the ablation's cache key: a job chosen under another rule is chosen again).
HOLDOUT_RULE = "holdout v2: validation clean + cued copies; dfr per-class halves, copies cut alike"


def _holdout(cfg: JobConfig, what: str):
    """The trained job's holdout (training images held out before training): ``(cued, clean, class_names)``, the
    probe set with the cue naming a wrong class and the same images clean (None when training had no cue or
    the clean copy is missing)."""
    tj = Path(cfg.out) / "train.json"
    t = json.loads(tj.read_text()) if tj.is_file() else {}
    if not t.get("holdout_manifest"):
        raise ValueError(f"{what} is 'holdout' but this job trained no model with a holdout (set train: with "
                         "holdout > 0), or name a shift there")
    from .probe import manifest
    cued = manifest(t["holdout_manifest"], t["class_names"])
    split = Path(t["checkpoint"]).parent / "split.json" if t.get("checkpoint") else None
    rel = json.loads(split.read_text()).get("holdout_clean_manifest") if split and split.is_file() else None
    clean = None
    if cfg.train is not None and cfg.train.cue is not None:
        if not (rel and (split.parent / rel).is_file()):
            import logging
            logging.getLogger(__name__).warning("%s: the holdout's clean copy is missing (split.json / "
                                                "holdout_clean_manifest): %s uses the cued copies only", cfg.out, what)
        else:
            clean = manifest(split.parent / rel, t["class_names"])
            if len(clean) != len(cued) or [s.label for s in clean.samples] != [s.label for s in cued.samples]:
                raise ValueError(f"{split.parent / rel} does not list the images of {t['holdout_manifest']} in the "
                                 "same order: delete the job's train folder to write the holdout again")
    return cued, clean, t["class_names"]


def holdout_halves(labels, seed: int) -> tuple[list[int], list[int]]:
    """``(validation, dfr)`` indices: the holdout split in two disjoint, seeded halves, each class cut in half (the
    odd photo to validation), when both ``ablate.validation`` and ``ablate.dfr`` are 'holdout' (choosing N and
    fitting DFR never share a photo, and every class with two photos or more is on both sides)."""
    from .splits import _rng
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    dfr = []
    for y, ids in sorted(by_class.items()):
        _rng(seed, "holdout: dfr half", y).shuffle(ids)
        dfr += ids[:len(ids) // 2]
    taken = set(dfr)
    return [i for i in range(len(labels)) if i not in taken], sorted(dfr)


def _random_cue_copy(cfg: JobConfig, photos: list, names: list[str]) -> list:
    """``photos`` (the holdout's clean copies) with the training cue naming a uniformly random class -- the right
    one 1 time in k, so the cue is independent of the label -- written once under ``<out>/dfr-slice/`` (atomic; the
    folder is named by the photos, the cue and the seed). Their group is ``cued``: split by whether the cue agrees,
    DFR's cell balancing would cut every cell to the agreeing ~1/k and make the cue predictive again."""
    from .. import io
    from .probe import Sample, manifest
    from .shifts import CuedDataset, materialise
    draw = CuedDataset([(s.path, int(s.label)) for s in photos], names, cfg.train.cue, fraction=1.0,
                       correlation="random", seed=cfg.seed)
    folder = Path(cfg.out) / "dfr-slice" / io.artifact_key([(str(s.path), int(s.label)) for s in photos],
                                                           draw.config.model_dump(mode="json"), names)
    if not (folder / "manifest.csv").is_file():
        try:  # a job writing the same slice at the same time keeps its copy (the same draw, never swapped under it)
            materialise(draw, folder, overwrite=folder.exists())
        except FileExistsError:
            pass
    cued = manifest(folder / "manifest.csv", list(names)).samples
    return [Sample(s.path, s.label, "cued") for s in cued]


def _holdout_part(cfg: JobConfig, pre, part: str):
    """The holdout as ``part`` sees it. Validation: every held-out image twice, clean and with the wrong-class
    cue (groups ``clean`` / ``cue-conflicts``), so a choice made there weighs the clean accuracy it costs as much
    as the cued accuracy it gains. DFR: the same two groups, its (class, group) cells balanced by DFR itself."""
    cued, clean, names = _holdout(cfg, f"ablate.{part}")
    ids = list(range(len(cued)))
    both = cfg.ablate.validation == "holdout" and cfg.ablate.dfr == "holdout"
    if both:
        ids = dict(zip(("validation", "dfr"), holdout_halves([int(s.label) for s in cued.samples], cfg.seed)))[part]
    samples = [cued.samples[i] for i in ids]
    from .cues import describe_cue
    tied = (f"each with {describe_cue(cfg.train.cue, 'wrong')}, so the cue never names the label"
            if cfg.train.cue is not None else "clean")
    if part == "dfr" and cfg.ablate.dfr_cue == "random" and cfg.train.cue is not None and clean is not None:
        samples = _random_cue_copy(cfg, [clean.samples[i] for i in ids], names)
        tied = (f"each with {describe_cue(cfg.train.cue, 'random')} (ablate.dfr_cue: random), so the cue is "
                "independent of the label")
    if clean is not None:  # the same photos clean, first, in the same order (DFR cuts both groups alike)
        samples = [clean.samples[i] for i in ids] + samples
        tied = f"each twice: clean and {tied}"
    half = f"; the class-stratified half kept for {part}" if both else ""
    desc = (f"{len(samples)} images of {len(ids)} training photos held out before training ({cfg.train.holdout:.0%} "
            f"per class{half}), {tied}")
    return Labelled(samples, pre.transform()), names, desc


def validation_set(cfg: JobConfig, pre, classes: list[str] | None = None):
    """``(dataset, class_names, description)`` of the validation data that choices are made on."""
    if cfg.ablate.validation == "holdout":
        return _holdout_part(cfg, pre, "validation")
    shift = next(s for s in cfg.shifts if s.name == cfg.ablate.validation)
    # DFR fits on the training holdout: a validation shift over the training folder must not hold those photos
    return shift_set(shift, pre, cfg.seed, classes, held_out(cfg.out) if cfg.ablate.dfr == "holdout" else frozenset())


def dfr_set(cfg: JobConfig, pre, classes: list[str] | None = None):
    """``(dataset, class_names, description)`` that DFR re-fits the last layer on: the ``ablate.dfr`` shift (less the
    job's holdout images), or with ``ablate.dfr: holdout`` the training holdout itself (its other half when
    ``ablate.validation`` is the holdout too)."""
    if cfg.ablate.dfr == "holdout":
        return _holdout_part(cfg, pre, "dfr")
    shift = next(s for s in cfg.shifts if s.name == cfg.ablate.dfr)
    return shift_set(shift, pre, cfg.seed, classes, held_out(cfg.out))


class _TrainCopies(torch.utils.data.Dataset):
    """Photos twice: as they are (group ``clean``), then as ``cued`` draws them (group ``cued``), same order."""

    def __init__(self, clean: Labelled, cued):
        from .probe import Sample
        self.clean, self.cued = clean, cued
        self.samples = clean.samples + [Sample(s.path, s.label, "cued") for s in clean.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from .probe import ImageLoadError
        if i < len(self.clean):
            return self.clean[i]
        try:
            x, y, _ = self.cued[i - len(self.clean)]
        except ImageLoadError:
            return None
        return x, int(y), {"group": "cued"}


def dfr_train_set(cfg: JobConfig, pre):
    """``(dataset, description)`` of the training photos that DFR also fits on (``ablate.dfr_train``; None when 0):
    that share of the photos the ``train`` stage trained on (class-stratified, seeded), each clean and, with a
    training cue, again with that cue naming a uniformly random class (the right one 1 time in k: independent of
    the label), drawn after the model's resize and crop as in training. Their features tell the re-fit what the
    classes look like; the held-out slice alone chooses C (:func:`~neuroscribe.ablate.refit.dfr_last_layer`)."""
    share = cfg.ablate.dfr_train
    if not share:
        return None
    tj = Path(cfg.out) / "train.json"
    t = json.loads(tj.read_text()) if tj.is_file() else {}
    split_file = Path(t["checkpoint"]).parent / "split.json" if t.get("checkpoint") else None
    if cfg.train is None or split_file is None or not split_file.is_file():
        raise ValueError(f"ablate.dfr_train fits DFR on the training photos too, but {cfg.out} has no trained model "
                         "(train.json, split.json): run the train stage first, or set ablate.dfr_train: 0")
    split = json.loads(split_file.read_text())
    from .probe import Sample, open_probe_set
    from .splits import stratified_sample
    d = cfg.train.data
    probe = open_probe_set(d.root, d.format, d.split, d.limit, seed=cfg.train.data_seed, target=d.target,
                           spurious=d.spurious)
    if probe.fingerprint() != split["data_fingerprint"]:
        raise ValueError(f"ablate.dfr_train: the training data under {probe.root} changed since the train stage "
                         f"wrote {split_file}: train again, or set ablate.dfr_train: 0")
    labels = [int(probe.samples[i].label) for i in split["train_ids"]]
    keep = stratified_sample(labels, round(share * len(labels)), cfg.seed, purpose="dfr train")
    photos = [Sample(probe.samples[split["train_ids"][i]].path, labels[i], "clean") for i in keep]
    clean = Labelled(photos, pre.transform(), split["class_names"])
    if cfg.train.cue is None:
        return clean, f"{len(photos)} training photos ({share:.0%}, class-stratified), clean"
    from .cues import describe_cue
    from .shifts import CuedDataset
    cued = CuedDataset([(s.path, s.label) for s in photos], split["class_names"], cfg.train.cue, fraction=1.0,
                       correlation="random", seed=cfg.seed, transform=pre.to_tensor(), geometry=pre.geometry())
    tied = describe_cue(cfg.train.cue, "random")
    return _TrainCopies(clean, cued), (f"{2 * len(photos)} images of {len(photos)} training photos ({share:.0%}, "
                                       f"class-stratified), each twice: clean and {tied}")


def class_index(lm, names):
    from .labels import label_map
    if lm.class_names is None or list(lm.class_names) == list(names):
        return None
    return label_map(names, lm.class_names)
