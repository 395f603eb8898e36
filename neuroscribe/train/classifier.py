"""Train a classifier (from scratch by default) on images with a planted spurious cue.

Reproduces MILAN section 7 (Hernandez et al., ICLR 2022: ResNet-18 from random weights on 10 ImageNet classes, the
class name written on half the training images) and plants any cue of :mod:`neuroscribe.datasets.cues` into users'
own data the same way. :func:`train_classifier` does, in order:

1. **Decode once.** ``cfg.data`` (ImageFolder or manifest) is opened with ``open_probe_set``; every image is decoded
   ONCE, resized (shorter side) and centre-cropped to ``R = cfg.resolution`` into a uint8 cache reused by all epochs:
   ``N x 3 x R x R`` bytes (9,469 Imagenette images: 465 MB at 128 px, 1.43 GB at 224 px). Unreadable images are
   skipped and listed in ``split.json``.
2. **Holdout.** A seeded (``cfg.data_seed``) share ``cfg.holdout`` of the images, stratified per class, is held out.
   On it the cue is DECORRELATED from the label: every holdout image carries the cue naming a uniformly random WRONG
   class (``fraction=1, correlation='wrong'``; a watermark names no class and is simply on every image). That is the
   cue-conflicting group, the worst group under the shortcut that group-balanced validation (DFR, Kirichenko et al.
   2023) guards against, and the same shift as MILAN's test set: a model that follows the cue scores below chance
   there, one that ignores it scores as on clean images. The holdout is written as lossless PNGs at ``R x R`` (so
   the model's ``Preprocess`` is the identity on them): ``holdout/clean/manifest.csv`` (group ``clean``, column
   ``source`` = the original image) and ``holdout/cued/manifest.csv`` (``shifts.materialise`` output: ``group``,
   ``has_cue``, ``cue_class``...). The pipeline validates on the very pixels validated here.
3. **Cue after augmentation.** ``CuedDataset(fraction, correlation, strength, seed=cfg.data_seed).plan()`` decides
   which training image carries which cue. Each epoch an image is augmented (random resized crop, scale 0.6-1, ratio
   3/4-4/3, then horizontal flip; ``cfg.augment``) and THEN the cue is drawn at ``R`` px: the text is never mirrored
   or cropped away and always has the configured size relative to the input. Random cue choices (``random-corner``)
   are fixed per image.
4. **Train.** ``cfg.arch`` (``torchvision:NAME`` or ``timm:NAME``) is built with random weights and one output per
   class; naming pretrained weights (``torchvision:resnet18@IMAGENET1K_V1``) fine-tunes them with a new last linear
   layer, as does ``efficientnet-lite0`` (the offline ImageNet weights shipped in the wheel). SGD + momentum,
   weight decay on every parameter, cosine learning-rate decay per step from ``cfg.lr`` to 0, no warm-up,
   cross-entropy, the weights' mean/std normalisation (ImageNet's for random weights).
5. **Determinism.** Initialisation uses ``torch.manual_seed(seed)`` inside a forked RNG (the caller's RNG is left
   alone); batch order and augmentation derive from ``(seed, epoch, index)`` only, so ``workers`` does not change the
   result. On CPU the same seed gives bit-identical weights (same torch build and thread count); on CUDA cuDNN runs in
   deterministic mode (close, not guaranteed bit-identical).
6. **Outputs** (atomic): ``model.safetensors`` + ``model.safetensors.spec.json`` (arch, num_classes, class_names,
   preprocess at ``R`` with the normalisation used, seed, cue config, data fingerprint, history: what
   ``load_model('checkpoint:PATH')`` reads), ``history.json`` (per epoch: loss, accuracy on all / cued / clean
   training images, holdout accuracy with the wrong-class cue and clean, lr, seconds) and ``split.json``.
7. **Resume.** ``resume.pt`` (model, optimizer, scheduler, RNG, history) is saved after each epoch; a re-run with the
   same settings continues after the last finished epoch (same final weights as an uninterrupted CPU run), and a
   finished run is returned without training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from neuroscribe.config import TrainConfig
from neuroscribe.datasets.cues import cue_uses_class, parse_cue
from neuroscribe.datasets.probe import open_probe_set
from neuroscribe.datasets.shifts import CuedDataset
from neuroscribe.heap import reuse_freed_memory
from neuroscribe.io import atomic_path, save_tensors, write_json
from neuroscribe.models import LoadedModel, Preprocess, channels_last, load_model, to_layout

from .data import TrainError, _decode_all, _holdout_sets, _split, _sub_seed, _TrainSet

__all__ = ["TrainError", "TrainResult", "train_classifier"]


@dataclass
class TrainResult:
    """What :func:`train_classifier` wrote. Ids are indices into ``open_probe_set(cfg.data...)`` (its ``samples``)."""

    checkpoint: Path
    spec_path: Path
    history: list[dict]
    holdout_ids: list[int]
    class_names: list[str]
    train_ids: list[int] = field(default_factory=list)
    holdout_manifest: Path | None = None  # validation set: wrong-class cue (clean when no cue); None if no holdout
    holdout_clean_manifest: Path | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    model: nn.Module | None = None  # the trained module (eval mode, on the training device)


def _random_spec(arch: str) -> tuple[str, bool]:
    """(the spec that rebuilds ``arch`` with random weights, whether ``arch`` names pretrained weights)."""
    if arch == "efficientnet-lite0":  # the offline pretrained model: always fine-tuned (its checkpoint rebuilds it)
        return arch, True
    prefix, _, rest = arch.partition(":")
    if prefix not in ("torchvision", "timm") or not rest:
        raise TrainError(f"train.arch {arch!r}: training supports torchvision:NAME[@WEIGHTS], "
                         "timm:NAME[@none] and efficientnet-lite0 (fine-tuned) architectures")
    name, _, tag = rest.partition("@")
    if prefix == "torchvision":
        import torchvision
        if name not in torchvision.models.list_models():
            raise TrainError(f"train.arch {arch!r}: torchvision has no model {name!r} "
                             "(see torchvision.models.list_models())")
    return f"{prefix}:{name}@none", bool(tag) and tag.lower() != "none"


def _build_model(arch: str, n: int) -> LoadedModel:
    """``arch`` with ``n`` outputs: random weights, or pretrained ones with a new last linear layer."""
    random_spec, pretrained = _random_spec(arch)
    if not pretrained:
        return load_model(random_spec, num_classes=n, seed=None)  # the caller seeded the RNG
    lm = load_model(arch)
    last = [(k, m) for k, m in lm.module.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise TrainError(f"train.arch {arch!r}: no linear classifier layer to replace")
    key, lin = last[-1]
    parent = lm.module.get_submodule(key.rpartition(".")[0]) if "." in key else lm.module
    setattr(parent, key.rpartition(".")[2], nn.Linear(lin.in_features, n))
    lm.class_names = None
    return lm


def _train_epoch(model: nn.Module, loader, opt, sched, norm, dev: torch.device) -> dict:
    """One pass over ``loader``; returns summed loss and hit counts (all and cued images)."""
    model.train()
    tot = {"loss": 0.0, "n": 0, "ok": 0, "n_cued": 0, "ok_cued": 0}
    for x, y, cued in loader:
        x, y = norm(x.to(dev, non_blocking=True)), y.to(dev, non_blocking=True)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        hit = (logits.detach().argmax(1) == y).cpu()
        tot["loss"] += float(loss.detach()) * len(y)
        tot["n"] += len(y)
        tot["ok"] += int(hit.sum())
        tot["n_cued"] += int(cued.sum())
        tot["ok_cued"] += int(hit[cued].sum())
    return tot


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, norm, device, bs: int) -> float:
    """Top-1 accuracy of ``model`` on uint8 ``images`` (eval mode)."""
    if len(labels) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for s in range(0, len(labels), bs):
        correct += int((model(norm(images[s:s + bs].to(device))).argmax(1).cpu() == labels[s:s + bs]).sum())
    return correct / len(labels)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(device)


@reuse_freed_memory()  # every batch reuses the pages the one before freed (heap.py)
def train_classifier(cfg: TrainConfig, out_dir: str | Path, device: str = "auto", seed: int | None = None,
                     progress: bool = True, *, workers: int = 0, resume: bool = True) -> TrainResult:
    """Train ``cfg.arch`` on ``cfg.data`` with the planted cue; write the model and its records to ``out_dir``.

    ``seed`` (default ``cfg.seeds[0]``) drives initialisation, batch order and augmentation; ``cfg.data_seed`` the
    holdout split and cue plan. ``workers`` data-loading processes (results do not depend on it). With ``resume``
    an interrupted run continues from its last finished epoch and a finished one is returned as it is. See the
    module docstring for every step: data (:func:`_data`), the loop (:func:`_fit`), the checkpoint (the end of
    this function).
    """
    out = Path(out_dir)
    seed = cfg.seeds[0] if seed is None else int(seed)
    dev = _resolve_device(device)
    say = (lambda msg: print(f"[train] {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    probe, labels, names, cue = _open_data(cfg)
    run = {"train": cfg.model_dump(mode="json", exclude={"seeds", "checkpoint"}), "seed": seed,
           "data_fingerprint": probe.fingerprint(), "num_classes": len(names)}
    run_fp = hashlib.blake2b(json.dumps(run, sort_keys=True).encode(), digest_size=16).hexdigest()
    model_path, spec_path = out / "model.safetensors", out / "model.safetensors.spec.json"
    if resume and spec_path.is_file() and model_path.is_file():
        spec = json.loads(spec_path.read_text())
        if spec.get("run_fingerprint") == run_fp:
            say(f"{out} already holds this finished run; not training again")
            split = json.loads((out / "split.json").read_text())
            model = load_model(f"checkpoint:{model_path}", device=dev).module
            return _result(out, spec["history"], split, names, model)
    d = _data(cfg, out, probe, labels, names, cue, seed, workers, progress)
    model, pre, history = _fit(cfg, d, len(names), seed, dev, out / "resume.pt", run_fp if resume else None,
                               workers, say)
    spec = {"arch": _random_spec(cfg.arch)[0], "source_arch": cfg.arch, "num_classes": len(names),
            "class_names": names, "preprocess": pre.to_dict(), "seed": seed, "data_seed": cfg.data_seed,
            "run_fingerprint": run_fp, "cue": None if cue is None else cue.model_dump(mode="json"),
            "fraction": cfg.fraction, "correlation": cfg.correlation, "strength": cfg.strength,
            "holdout": {"share": cfg.holdout, "n": len(d.hold_ids), "validation": "the cue on every image, naming a "
                        "random wrong class" if cue is not None else "clean images"},
            "data": {"root": str(probe.root), "fingerprint": probe.fingerprint(), "n_images": len(probe),
                     "n_train": len(d.train_ids), "n_holdout": len(d.hold_ids), "n_skipped": len(d.skipped)},
            "augmentation": "random resized crop 0.6-1 + flip, then the cue" if cfg.augment else "none",
            "train": cfg.model_dump(mode="json"), "device": str(dev), "torch": torch.__version__, "history": history}
    save_tensors(model_path, model.state_dict(), metadata={"arch": spec["arch"], "run_fingerprint": run_fp})
    write_json(out / "history.json", history)
    write_json(spec_path, spec)
    (out / "resume.pt").unlink(missing_ok=True)
    return _result(out, history, d.split, names, model)


def _open_data(cfg: TrainConfig):
    """``(probe, labels, class names, cue)`` of ``cfg.data``, checked: every image labelled, >= 2 classes."""
    probe = open_probe_set(cfg.data.root, cfg.data.format, cfg.data.split, cfg.data.limit, seed=cfg.data_seed,
                           target=cfg.data.target, spurious=cfg.data.spurious)
    labels = probe.labels()
    if (labels < 0).any():
        raise TrainError(f"train.data: {int((labels < 0).sum())} images of {probe.root} have no label; training "
                         "needs class folders or a manifest 'label' column")
    names = list(probe.class_names) if probe.class_names else [str(k) for k in range(int(labels.max()) + 1)]
    if len(names) < 2:
        raise TrainError(f"train.data: found {len(names)} class under {probe.root}; training needs at least 2")
    cue = None
    if cfg.cue is not None:
        try:
            cue = parse_cue(cfg.cue)
        except ValueError as e:
            raise TrainError(f"train.cue is invalid: {e}") from None
    return probe, labels, names, cue


@dataclass
class _Data:
    train_set: _TrainSet
    train_ids: list[int]
    hold_ids: list[int]
    hold_y: torch.Tensor
    hold_clean: torch.Tensor
    hold_cued: torch.Tensor
    split: dict
    skipped: list


def _data(cfg: TrainConfig, out: Path, probe, labels, names, cue, seed: int, workers: int, progress: bool) -> _Data:
    """Steps 1-3: decode once, split off the holdout (written with wrong-class cues), plan the training cues."""
    r = cfg.resolution
    cache, ok, skipped = _decode_all(probe, Preprocess(resize=r, crop=r), workers, progress)
    train_ids, hold_ids = _split(labels, ok, cfg.holdout, cfg.data_seed)
    if not train_ids:
        raise TrainError(f"train.data: no decodable training images under {probe.root}")
    tokens: list = [None] * len(train_ids)
    if cue is not None:
        try:
            plan = CuedDataset([(probe.samples[i].path, int(labels[i])) for i in train_ids], names, cue,
                               fraction=cfg.fraction, correlation=cfg.correlation, strength=cfg.strength,
                               seed=cfg.data_seed).plan()
        except ValueError as e:
            raise TrainError(f"train cue settings (cue/fraction/correlation/strength): {e}") from None
        tokens = [None if not p["has_cue"] else p["cue_class"] if cue_uses_class(cue) else p["cue_token"]
                  for p in plan]
    cue_seeds = [_sub_seed(cfg.data_seed, "cue-draw", i) for i in train_ids]
    train_set = _TrainSet(cache, train_ids, [int(labels[i]) for i in train_ids], cue, tokens, cue_seeds, seed,
                          cfg.augment)
    hold_y = torch.tensor([int(labels[i]) for i in hold_ids], dtype=torch.long)
    clean_manifest, cued_manifest, hold_clean, hold_cued = _holdout_sets(out, cache, probe, hold_ids, names, cue,
                                                                         cfg.data_seed)
    split = {"data_root": str(probe.root), "data_fingerprint": probe.fingerprint(), "train_ids": train_ids,
             "holdout_ids": hold_ids, "holdout_sources": [probe.relpath(i) for i in hold_ids],
             "holdout_manifest": None if cued_manifest is None else str(cued_manifest.relative_to(out)),
             "holdout_clean_manifest": None if clean_manifest is None else str(clean_manifest.relative_to(out)),
             "skipped": skipped, "class_names": names}
    write_json(out / "split.json", split)
    return _Data(train_set, train_ids, hold_ids, hold_y, hold_clean, hold_cued, split, skipped)


def _fit(cfg: TrainConfig, d: _Data, n_classes: int, seed: int, dev: torch.device, state_path: Path,
         run_fp: str | None, workers: int, say) -> tuple[nn.Module, Preprocess, list[dict]]:
    """Step 4-5 and 7: build the model in a seeded forked RNG, SGD with cosine decay, one checkpoint per epoch
    (``run_fp`` None: no resume state read or written). Returns the model (eval mode), its preprocessing, history."""
    n = len(d.train_set)
    bs = min(cfg.batch_size, n)
    drop_last = n % bs == 1  # a batch of one breaks BatchNorm
    steps = (n // bs if drop_last else math.ceil(n / bs)) * cfg.epochs
    history: list[dict] = []
    cuda_devs = [dev.index or 0] if dev.type == "cuda" else []
    cudnn_flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with torch.random.fork_rng(devices=cuda_devs), contextlib.ExitStack() as stack:
            torch.manual_seed(seed)
            lm = _build_model(cfg.arch, n_classes)
            model = lm.module.to(dev)
            r = cfg.resolution
            pre = Preprocess(resize=r, crop=r, mean=tuple(lm.preprocess.mean), std=tuple(lm.preprocess.std))
            mean = torch.tensor(pre.mean, device=dev).view(1, 3, 1, 1)
            std = torch.tensor(pre.std, device=dev).view(1, 3, 1, 1)
            layout = stack.enter_context(channels_last(model))  # NHWC: ~1.2x faster training on CPU

            def norm(x: torch.Tensor) -> torch.Tensor:
                return to_layout((x.float() / 255.0 - mean) / std, layout)

            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps)
                                                                                       / steps)))
            history, start = _resume(state_path, run_fp, model, opt, sched, say, cfg.epochs)
            for epoch in range(start, cfg.epochs):
                history.append(_epoch(cfg, d, model, opt, sched, norm, dev, epoch, seed, bs, drop_last, workers))
                _say_epoch(say, history[-1], cfg.epochs)
                if run_fp is not None and epoch + 1 < cfg.epochs:
                    with atomic_path(state_path) as tmp:
                        torch.save({"run_fingerprint": run_fp, "epoch": epoch, "model": model.state_dict(),
                                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                    "rng": torch.get_rng_state(), "history": json.dumps(history)}, tmp)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags
    return model.eval(), pre, history


def _resume(state_path: Path, run_fp: str | None, model, opt, sched, say, epochs: int) -> tuple[list[dict], int]:
    """(history, first epoch to run): from ``resume.pt`` when it belongs to this run, else a fresh start."""
    if run_fp is None or not state_path.is_file():
        return [], 0
    st = torch.load(state_path, map_location="cpu", weights_only=True)
    if st.get("run_fingerprint") != run_fp:
        return [], 0
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["rng"])
    start = int(st["epoch"]) + 1
    say(f"resuming after epoch {start}/{epochs}")
    return json.loads(st["history"]), start


def _epoch(cfg: TrainConfig, d: _Data, model, opt, sched, norm, dev, epoch: int, seed: int, bs: int,
           drop_last: bool, workers: int) -> dict:
    """One epoch in the seeded order; its history row (training and holdout accuracies)."""
    t0 = time.perf_counter()
    d.train_set.epoch = epoch
    order = torch.randperm(len(d.train_set), generator=torch.Generator().manual_seed(_sub_seed(seed, "order", epoch)))
    loader = torch.utils.data.DataLoader(
        d.train_set, batch_size=bs, sampler=order.tolist(), num_workers=workers, drop_last=drop_last,
        generator=torch.Generator().manual_seed(_sub_seed(seed, "loader", epoch)), pin_memory=dev.type == "cuda")
    tot = _train_epoch(model, loader, opt, sched, norm, dev)
    if not math.isfinite(tot["loss"]):
        raise TrainError(f"training diverged in epoch {epoch + 1} (loss {tot['loss']}); lower train.lr")
    n_clean = tot["n"] - tot["n_cued"]
    return {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": tot["loss"] / tot["n"],
            "train_acc": tot["ok"] / tot["n"],
            "train_acc_cued": tot["ok_cued"] / tot["n_cued"] if tot["n_cued"] else None,
            "train_acc_clean": (tot["ok"] - tot["ok_cued"]) / n_clean if n_clean else None,
            "holdout_acc": _accuracy(model, d.hold_cued, d.hold_y, norm, dev, bs) if d.hold_ids else None,
            "holdout_clean_acc": _accuracy(model, d.hold_clean, d.hold_y, norm, dev, bs) if d.hold_ids else None,
            "seconds": round(time.perf_counter() - t0, 3)}


def _say_epoch(say, row: dict, epochs: int) -> None:
    say(f"epoch {row['epoch']}/{epochs} loss {row['train_loss']:.3f} acc {row['train_acc']:.1%} "
        f"holdout {_pct(row['holdout_acc'])} (clean {_pct(row['holdout_clean_acc'])}) {row['seconds']:.1f}s")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _result(out: Path, history: list[dict], split: dict, names: list[str], model: nn.Module) -> TrainResult:
    def path(key: str) -> Path | None:
        return None if split.get(key) is None else out / split[key]
    return TrainResult(out / "model.safetensors", out / "model.safetensors.spec.json", history,
                       list(split["holdout_ids"]), names, list(split["train_ids"]), path("holdout_manifest"),
                       path("holdout_clean_manifest"), [tuple(s) for s in split["skipped"]], model)
