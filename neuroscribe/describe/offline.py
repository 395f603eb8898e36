"""The offline describer: the tagger (ImageNet classifier + WordNet, OCR, colours) and the contrastive summariser.

Speed: a unit's exemplar images repeat across units (a probe set of N images feeds every unit's top-k), so the
classifier and OCR run once per distinct image and are cached; per view, only the mask-dependent parts (which OCR
lines overlap the mask, the colours inside it) are computed. With ``tagger.view: image`` (default) the object
labels describe the whole exemplar image; ``tagger.view: crop`` classifies the crop around the mask region instead
(more specific to the unit's region, and one classifier pass per exemplar rather than per image: slower).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from ..config import DescribeConfig
from ..models import load_model
from .describers import Described, UnitViews
from ..text import SentenceEmbedder
from .summarise import summarise
from .tagger import OCRHit, OCRReader, Tagger, _binary_mask, _polygon_fraction


def _image_key(img: Image.Image) -> str:
    return hashlib.blake2b(img.tobytes() + repr(img.size).encode(), digest_size=12).hexdigest()


class CachedOCR(OCRReader):
    """OCR each distinct image once; a mask then only selects which lines count."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._cache: dict[str, list[OCRHit]] = {}

    min_side = 224  # low-resolution models' views are enlarged before reading (boxes scaled back)

    def read(self, img: Image.Image, mask: np.ndarray | None = None) -> list[OCRHit]:
        key = _image_key(img)
        if key not in self._cache:
            s = max(1.0, self.min_side / min(img.size))
            big = img if s == 1.0 else img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
            self._cache[key] = [OCRHit(h.text, h.confidence, tuple((x / s, y / s) for x, y in h.box), 1.0)
                                for h in super().read(big, None)]
        hits = self._cache[key]
        binary = _binary_mask(mask, img.size)
        if binary is None:
            return list(hits)
        if not binary.any():
            return []
        out = []
        for h in hits:
            frac = _polygon_fraction(h.box, binary)
            if frac > self.min_mask_overlap:
                out.append(OCRHit(h.text, h.confidence, h.box, frac))
        return out


class ImageNetClassifier:
    """``classify(list[PIL]) -> [N, 1000]`` probabilities from a model spec, cached per distinct image."""

    def __init__(self, spec: str, device: torch.device, batch_size: int = 32):
        self.lm = load_model(spec, device=device)
        if not self.lm.class_names or len(self.lm.class_names) != 1000:
            raise ValueError(f"describe.tagger.classifier {spec!r} must be an ImageNet-1k classifier (1000 "
                             "classes, standard order): e.g. efficientnet-lite0 or torchvision:resnet50")
        self.device = device
        self.batch_size = batch_size
        self.transform = self.lm.preprocess.transform()
        self._cache: dict[str, np.ndarray] = {}

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        keys = [_image_key(im) for im in images]
        todo = {k: im for k, im in zip(keys, images) if k not in self._cache}
        items = list(todo.items())
        for s in range(0, len(items), self.batch_size):
            chunk = items[s:s + self.batch_size]
            x = torch.stack([self.transform(im.convert("RGB")) for _, im in chunk]).to(self.device)
            p = torch.softmax(self.lm.module(x).float(), 1).cpu().numpy()
            for (k, _), row in zip(chunk, p):
                self._cache[k] = row
        return np.stack([self._cache[k] for k in keys])


class TaggerDescriber:
    """Describer backend ``tagger``: works with no network on models shipped inside PyPI wheels."""

    name = "tagger"

    def __init__(self, cfg: DescribeConfig, device: torch.device, seed: int = 0, background_images: int = 64):
        t = cfg.tagger
        self.view = t.view
        self.classify = ImageNetClassifier(t.classifier, device)
        ocr = CachedOCR(det_limit_side_len=t.ocr_side, det_limit_type="max", use_angle_cls=False) if t.ocr else False
        self.tagger = Tagger(self.classify, ocr=ocr, colours=t.colours, top_labels=t.top_labels)
        self.embedder = SentenceEmbedder(cfg.embedder)
        self.alpha = cfg.alpha
        self.seed = seed
        self.background_images = background_images
        self.background: list = []
        self.hypernym_discount = 0.7

    def _prior(self, cands: list) -> list:
        """Specific before general: hypernym weights are discounted, so a class label that explains the views
        as well as its hypernym wins (MILAN's annotators name the most specific concept they see)."""
        return [replace(c, weight=c.weight * self.hypernym_discount) if c.source == "hypernym" else c
                for c in cands]

    def prepare(self, recording) -> None:
        """Background candidates: the tags of a seeded sample of whole probe images (no mask)."""
        ok = [i for i, p in enumerate(recording.image_paths) if i not in recording.skipped_ids]
        ids = sorted(random.Random(self.seed).sample(ok, min(self.background_images, len(ok))))
        images = [recording.image(i) for i in ids]
        self.background = [self._prior(c) for c in self.tagger.tag(images)]  # one list per background view

    def describe(self, units: list[UnitViews]) -> list[Described]:
        if self.view == "crop":
            ims = [im for uv in units for im in uv.crops]
            masks = [None] * len(ims)
        else:
            ims = [im for uv in units for im in uv.images]
            masks = [m for uv in units for m in uv.masks]
        cands = [self._prior(c) for c in self.tagger.tag(ims, masks)]
        out, pos = [], 0
        for uv in units:
            n = len(uv.image_ids)
            ranked = summarise(cands[pos:pos + n], self.background, self.embedder, top=5, alpha=self.alpha)
            pos += n
            best = ranked[0] if ranked else None
            out.append(Described(
                layer=uv.layer, unit=uv.unit, backend=self.name,
                description=best.description if best else "",
                score=float(best.score) if best else float("nan"),
                candidates=[(r.description, round(float(r.score), 4)) for r in ranked],
                extra={"support": best.support if best else 0, "views": n}))
        return out
