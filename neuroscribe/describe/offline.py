"""The offline describer: the tagger (ImageNet classifier + WordNet, OCR, colours) and the contrastive summariser.

Speed: a unit's exemplar images repeat across units (a probe set of N images feeds every unit's top-k), so the
classifier and OCR run once per distinct image and are cached; per view, only the mask-dependent parts (which OCR
words overlap the mask, the colours inside it) are computed. With ``tagger.view: image`` (default) the object
labels describe the whole exemplar image; ``tagger.view: crop`` classifies the crop around the mask region instead
(more specific to the unit's region, and one classifier pass per exemplar rather than per image: slower).
Colour words are kept only where a unit's colour is unusual for the probe set: its share over the unit's masks is
at least ``tagger.colour_lift`` times the share over a seeded sample of ``tagger.colour_images`` probe images.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from ..config import DescribeConfig, TaggerConfig
from ..fusion import fold_for_inference
from ..models import load_model, to_layout, uses_conv2d
from .contrast import contrast
from .describers import Described, UnitViews
from ..text import SentenceEmbedder
from .views import pixel_key
from .ocr import OCRHit, OCRReader, _binary_mask, mask_2d, text_phrases, words_in_mask
from .tagger import Candidate, Tagger


class CachedOCR(OCRReader):
    """OCR each distinct image once; a mask then only selects which lines and words count.

    Images are enlarged (bicubic) to at least ``min_side`` pixels a side before reading, boxes scaled back:
    RapidOCR's detector misses faint or small text in small inputs (a semi-transparent watermark 22 px high in a
    224 px view: 60% of photos read at 224, 90% at 320; its own default enlarges to 736, ~6x slower than 224)."""

    def __init__(self, min_side: int = 320, **kw):
        super().__init__(**kw)
        self.min_side = int(min_side)
        self._cache: dict[str, list[OCRHit]] = {}

    def read(self, img: Image.Image, mask: np.ndarray | None = None) -> list[OCRHit]:
        key = pixel_key(img)
        if key not in self._cache:
            s = max(1.0, self.min_side / min(img.size))
            big = img if s == 1.0 else img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
            self._cache[key] = [OCRHit(h.text, h.confidence, tuple((x / s, y / s) for x, y in h.box), 1.0)
                                for h in super().read(big, None)]
        hits = self._cache[key]
        if not hits:  # most images: nothing read, no mask to render (only its shape is checked)
            if mask is not None:
                mask_2d(mask)
            return []
        return words_in_mask(hits, _binary_mask(mask, img.size), self.min_mask_overlap)


def describer_ocr(t: TaggerConfig) -> CachedOCR:
    """The tagger backend's OCR reader, as ``describe.tagger`` configures it.

    Two RapidOCR settings differ from its defaults, both measured on 120 val photos at 224 px (half with a faint
    class name; OCR 17.1 -> 12.4 s): no angle classifier (``use_cls``: it turned some upright lines by 180 degrees
    and lost them, e.g. a "srixon" golf ball; views are never upside down), and each batch of lines is recognised
    at its widest line's width (``rec_img_shape`` 48 x 48) instead of being padded to at least 320 px: the same
    words on 114 of 120 photos, the other 6 as good or better ("service" for "SERVICE)", a stray "pd" gone)."""
    return CachedOCR(min_side=t.ocr_min_side, det_limit_side_len=t.ocr_side, det_limit_type="max",
                     use_cls=False, rec_img_shape=[3, 48, 48])


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
        self._module: torch.nn.Module | None = None
        self._nhwc = False

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        keys = [pixel_key(im) for im in images]
        todo = {k: im for k, im in zip(keys, images) if k not in self._cache}
        items = list(todo.items())
        for s in range(0, len(items), self.batch_size):
            chunk = items[s:s + self.batch_size]
            x = torch.stack([self.transform(im.convert("RGB")) for _, im in chunk]).to(self.device)
            if self._module is None:  # batch norm and pads folded into the convs (neuroscribe.fusion), and
                self._module = fold_for_inference(self.lm.module, x[:2])[0]  # NHWC kernels (~1.5x faster on CPU)
                self._nhwc = uses_conv2d(self._module)  # once: the module is this classifier's own
                if self._nhwc:
                    self._module.to(memory_format=torch.channels_last)
            p = torch.softmax(self._module(to_layout(x, self._nhwc)).float(), 1).cpu().numpy()
            for (k, _), row in zip(chunk, p):
                self._cache[k] = row
        return np.stack([self._cache[k] for k in keys])


class TaggerDescriber:
    """Describer backend ``tagger``: works with no network on models shipped inside PyPI wheels.

    Each unit's views are tagged (objects and colours of the view or crop; text read on the exemplar image, only
    the words inside the unit's mask) and the description is chosen by :func:`~neuroscribe.describe.contrast.
    contrast` against the fixed ImageNet background: ``score`` is in nats of evidence per view, comparable across
    units, layers and models (``extra`` adds ``typicality``, ``pmi`` and ``support``)."""

    name = "tagger"

    def __init__(self, cfg: DescribeConfig, device: torch.device, seed: int = 0):
        t = cfg.tagger
        self.view = t.view
        self.classify = ImageNetClassifier(t.classifier, device)
        self.ocr = describer_ocr(t) if t.ocr else None
        self.tagger = Tagger(self.classify, ocr=False, colours=t.colours, top_labels=t.top_labels,
                             colour_lift=t.colour_lift)
        self.colour_images = t.colour_images
        self.embedder = SentenceEmbedder(cfg.embedder)
        self.alpha = cfg.alpha
        self.seed = seed

    def prepare(self, recording) -> None:
        """The probe's colour baseline: the share of each basic colour over a seeded sample of whole probe images
        at the view size (what colour words are judged unusual against). The background the words are contrasted
        with is fixed (:class:`~neuroscribe.describe.background.Background`), never sampled from the probe set."""
        ok = [i for i in range(len(recording.image_paths)) if i not in recording.skipped_ids]
        if not self.tagger.colours or not ok:
            return
        size = getattr(recording, "view_size", None)
        ids = sorted(random.Random(f"colours:{self.seed}").sample(ok, min(self.colour_images, len(ok))))
        self.tagger.fit_colour_baseline([recording.image(i) if size is None else recording.image(i, size)
                                         for i in ids])

    def tag(self, units: list[UnitViews]) -> list[list[Candidate]]:
        """Candidate lists, one per view of every unit in order: the tagger's objects and colours, plus the text
        read on the exemplar image inside its mask (in ``crop`` view too, so a crop's margin lends no words)."""
        groups = [k for k, uv in enumerate(units) for _ in uv.image_ids]  # colours are judged per unit
        if self.view == "crop":
            cands = self.tagger.tag([im for uv in units for im in uv.crops], None, groups)
        else:
            cands = self.tagger.tag([im for uv in units for im in uv.images], [m for uv in units for m in uv.masks],
                                    groups)
        if self.ocr is None:
            return cands
        out = []
        images, masks = [im for uv in units for im in uv.images], [m for uv in units for m in uv.masks]
        for view, img, mask in zip(cands, images, masks):
            best = {c.phrase: c for c in view}
            for phrase, w in text_phrases(self.ocr.read(img, mask)):
                if phrase not in best or w > best[phrase].weight:
                    best[phrase] = Candidate(phrase, "text", float(w))
            out.append(sorted(best.values(), key=lambda c: (-c.weight, c.phrase)))
        return out

    def describe(self, units: list[UnitViews]) -> list[Described]:
        cands = self.tag(units)
        out, pos = [], 0
        for uv in units:
            n = len(uv.image_ids)
            ranked = contrast(cands[pos:pos + n], self.tagger.background, self.embedder, top=5, alpha=self.alpha)
            pos += n
            best = ranked[0] if ranked else None
            out.append(Described(
                layer=uv.layer, unit=uv.unit, backend=self.name,
                description=best.description if best else "",
                score=float(best.score) if best else float("nan"),
                candidates=[(r.description, round(float(r.score), 4)) for r in ranked],
                extra={"support": best.support if best else 0, "views": n,
                       "typicality": round(best.typicality, 4) if best else 0.0,
                       "pmi": round(best.pmi, 4) if best else float("nan")}))
        return out
