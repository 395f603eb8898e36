"""Training data: every image decoded once into a uint8 cache, the seeded stratified holdout (written as lossless
PNGs with the cue naming a wrong class), and the training set that augments, then draws the planned cue.
Steps 1-3 of :mod:`neuroscribe.train.classifier`'s recipe."""

from __future__ import annotations

import csv
import hashlib
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from neuroscribe.datasets.cues import render_cue
from neuroscribe.datasets.probe import ImageDataset, ProbeSet, collate_skipping, load_image
from neuroscribe.datasets.shifts import CuedDataset, materialise
from neuroscribe.io import atomic_dir
from neuroscribe.models import Preprocess


class TrainError(ValueError):
    """Training cannot start or continue; the message names the setting or file at fault."""


def _sub_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions."""
    digest = hashlib.blake2b(":".join(map(str, ("neuroscribe.train", *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _pil_to_uint8(im: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class _ToUint8:
    """PIL image -> uint8 tensor [3, R, R] through the evaluation geometry (resize shorter side, centre crop)."""

    def __init__(self, pre: Preprocess):
        self.geometry = pre.geometry()

    def __call__(self, im: Image.Image) -> torch.Tensor:
        return _pil_to_uint8(self.geometry(im))


def _decode_all(probe: ProbeSet, pre: Preprocess, workers: int, progress: bool):
    """Decode every image once: (uint8 cache [N,3,R,R], ok mask, [(relpath, reason)])."""
    r = pre.crop
    cache = torch.zeros((len(probe), 3, r, r), dtype=torch.uint8)
    ok = np.zeros(len(probe), dtype=bool)
    skipped: list[tuple[str, str]] = []
    ds = ImageDataset(probe, _ToUint8(pre), resize=pre.resize)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=collate_skipping)
    t0 = time.perf_counter()
    for x, ids, failed in loader:
        if x is not None:
            cache[ids] = x
            ok[ids.numpy()] = True
        skipped += [(probe.relpath(i), reason) for i, reason in failed]
    if progress:
        print(f"[train] decoded {int(ok.sum())} images at {r} px in {time.perf_counter() - t0:.1f}s "
              f"({cache.numel() / 2**20:.0f} MiB cache), skipped {len(skipped)}", file=sys.stderr, flush=True)
    return cache, ok, skipped


def _split(labels: np.ndarray, ok: np.ndarray, share: float, seed: int) -> tuple[list[int], list[int]]:
    """Per-class seeded split of the decodable ids into (train, holdout); every class keeps >= 1 training image."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in np.flatnonzero(ok):
        by_class[int(labels[i])].append(int(i))
    hold: list[int] = []
    for c, ids in sorted(by_class.items()):
        k = min(len(ids) - 1, max(1 if share > 0 else 0, round(share * len(ids))))
        random.Random(_sub_seed(seed, "holdout", c)).shuffle(ids)
        hold += ids[:max(k, 0)]
    hold_set = set(hold)
    return [i for i in np.flatnonzero(ok).tolist() if i not in hold_set], sorted(hold)


class _TrainSet(torch.utils.data.Dataset):
    """Cached training images: augmentation (from (seed, epoch, index)), then the planned cue, as uint8 tensors."""

    def __init__(self, cache: torch.Tensor, ids: list[int], labels: list[int], cue, tokens: list,
                 cue_seeds: list[int], seed: int, augment: bool):
        self.cache, self.ids, self.labels, self.cue, self.tokens = cache, ids, labels, cue, tokens
        self.cue_seeds, self.seed, self.augment, self.epoch = cue_seeds, seed, augment, 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from torchvision import transforms as T
        x = self.cache[self.ids[i]]
        if self.augment:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_sub_seed(self.seed, "aug", self.epoch, i))
                top, left, h, w = T.RandomResizedCrop.get_params(x, scale=[0.6, 1.0], ratio=[3 / 4, 4 / 3])
                flip = bool(torch.rand(1) < 0.5)
            x = T.functional.resized_crop(x, top, left, h, w, [x.shape[-1]] * 2, antialias=True)
            x = x.flip(-1) if flip else x
        tok = self.tokens[i]
        if tok is not None:
            im = Image.fromarray(x.permute(1, 2, 0).numpy())
            x = _pil_to_uint8(render_cue(im, self.cue, tok, random.Random(self.cue_seeds[i])).image)
        return x, self.labels[i], tok is not None


def _holdout_sets(out: Path, cache: torch.Tensor, probe: ProbeSet, ids: list[int], names: list[str], cue,
                  data_seed: int) -> tuple[Path | None, Path | None, torch.Tensor, torch.Tensor]:
    """Write the clean and wrong-class-cue holdout manifests; return them and their uint8 images."""
    clean = cache[ids]
    if not ids:
        return None, None, clean, clean
    with atomic_dir(out / "holdout" / "clean") as tmp:  # PNG crops at R px + manifest (path, label, group, source)
        rows = []
        for j, i in enumerate(ids):
            rel = Path(str(probe.samples[i].label)) / f"{j:05d}.png"
            (tmp / rel.parent).mkdir(exist_ok=True)
            Image.fromarray(cache[i].permute(1, 2, 0).numpy()).save(tmp / rel, format="PNG")
            rows.append({"path": rel.as_posix(), "label": probe.samples[i].label, "group": "clean",
                         "source": probe.relpath(i)})
        with open(tmp / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["path", "label", "group", "source"])
            w.writeheader()
            w.writerows(rows)
    clean_manifest = out / "holdout" / "clean" / "manifest.csv"
    if cue is None:
        return clean_manifest, clean_manifest, clean, clean
    with clean_manifest.open(newline="", encoding="utf-8") as fh:
        crops = [(clean_manifest.parent / row["path"], int(row["label"])) for row in csv.DictReader(fh)]
    vds = CuedDataset(crops, names, cue, fraction=1.0, correlation="wrong",
                      seed=_sub_seed(data_seed, "holdout-cue") % 2**31)
    cued_manifest = materialise(vds, out / "holdout" / "cued", overwrite=True) / "manifest.csv"
    with cued_manifest.open(newline="", encoding="utf-8") as fh:
        cued = torch.stack([_pil_to_uint8(load_image(cued_manifest.parent / row["path"]))
                            for row in csv.DictReader(fh)])
    return clean_manifest, cued_manifest, clean, cued
