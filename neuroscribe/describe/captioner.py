"""``captioner`` backend: caption every exemplar view with a Hugging Face image-to-text model, then summarise.

This is MILAN's recipe (Hernandez et al., ICLR 2022) with an off-the-shelf captioner in place of MILAN's trained
one: each view of a unit (the MILAN-style view with everything outside the unit's mask dimmed, or a crop around
the mask with ``use_crops=True``) is captioned, the captions are split into candidate phrases, and
:func:`neuroscribe.describe.summarise.summarise` picks the phrases that are typical of this unit's views and
atypical of a background of other units' views (MILAN's ``log p(d | E) - lambda * log p(d)``).

Any transformers image-to-text model works: BLIP, BLIP-2, GIT, Florence-2, VisionEncoderDecoder models...
(``model`` is a Hub repo id or a local directory). The model class is found from the checkpoint's config
through the auto classes (:data:`_AUTO_CLASSES`) or, failing that, the config's ``architectures``.

Mechanics, all deterministic:

- **Batching.** All views of all units in one :meth:`CaptionerDescriber.describe` call are pooled, identical
  views (same pixels; e.g. the un-masked views of a classifier layer, shared by many units) are captioned once,
  and the pool is cut into batches of ``batch_size``: one ``generate()`` call per batch, across units. Captions
  are cached on the describer by pixel hash, so a repeated call captions nothing new.
- **Decoding.** Greedy (``do_sample=False, num_beams=1``), at most ``max_new_tokens`` new tokens. With a
  ``prompt`` (e.g. ``"a picture of"`` for BLIP, ``"<CAPTION>"`` for Florence-2, the default for Florence-2
  checkpoints) the prompt is fed to the processor as text and removed from the front of the decoded caption.
- **Candidates** (:func:`caption_candidates`): the cleaned caption itself (``source="caption"``) and its
  noun-phrase-like fragments (``source="phrase"``): the caption is cut at prepositions, conjunctions, common
  verbs and punctuation, leading determiners/numbers are dropped, and fragments made only of filler words
  ("picture", "close up", "view", ...) are dropped. "a dog sitting on a wooden bench" gives "a dog sitting on a
  wooden bench", "dog", "wooden bench". All weights are 1.0 (the captioner asserted them).
- **Background** (contrast), one candidate list per background view (the summariser's per-view mode): after
  :meth:`~CaptionerDescriber.prepare`, each layer gets, the first time one of its units is described, a seeded
  sample (generator seeded by ``(seed, layer)``) of ``background_size`` of its recorded (unit, exemplar) pairs,
  rendered with :func:`neuroscribe.describe.views.unit_views` (same ``dim``, views or crops as the units) and
  captioned once, in the same batches as the units' views; a unit's background is that sample minus its own
  views. So a unit's description does not depend on which other units share its ``describe`` call (the describe
  stage resumes in batches). Without a prepared recording, the background is instead a sample of the *other*
  units' views of the same call (generator seeded by ``(seed, layer, unit)``, over a canonical (layer, unit,
  rank) order, so the order of ``units`` does not matter).
- **Score**: :func:`neuroscribe.describe.summarise.summarise` with ``alpha`` (MILAN's lambda); a unit without
  views or with only empty captions gets ``description=""`` and a NaN score (as the tagger backend).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ..models import ModelSpecError
from .captions import caption_candidates, clean_caption
from .describers import Described, UnitViews
from .tagger import Candidate
from .views import pixel_key

if TYPE_CHECKING:  # pragma: no cover
    from ..record.exemplars import Recording
    from ..text import SentenceEmbedder

__all__ = [
    "DEFAULT_CAPTIONER",
    "CaptionerDescriber",
    "CaptionerLoadError",
    "caption_candidates",
    "clean_caption",
    "load_captioner",
]

log = logging.getLogger("neuroscribe.describe.captioner")

#: The default captioner: BLIP base fine-tuned on COCO captions (~1 GB, downloaded on first use).
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"

#: Auto classes tried in order to find a checkpoint's generation class (those missing from the installed
#: transformers are skipped; ``AutoModelForVision2Seq`` is gone in transformers 5).
_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM",
                 "AutoModelForSeq2SeqLM")

#: Prompts some model families need to caption at all (used when ``prompt`` is None).
_DEFAULT_PROMPTS = {"florence2": "<CAPTION>"}


class CaptionerLoadError(ModelSpecError):
    """The captioning model (or its processor) could not be loaded; the message says how to get it."""


# ------------------------------------------------------------------------------------------------ loading
def _load_hint(repo: str, e: BaseException) -> CaptionerLoadError:
    if not isinstance(e, OSError):  # the files are there, but this transformers cannot read them
        import transformers
        return CaptionerLoadError(
            f"could not load the captioning model {repo!r}: {type(e).__name__}: {str(e).strip()[:400]}\n"
            f"transformers {transformers.__version__} does not know this checkpoint's model or processor type: "
            f"upgrade transformers, or use a checkpoint converted for it (models that need trust_remote_code "
            f"are not loaded)")
    return CaptionerLoadError(
        f"could not load the captioning model {repo!r}: {type(e).__name__}: {str(e).strip()[:400]}\n"
        f"Its weights come from the Hugging Face Hub and are not in the local cache. Either run once on a machine "
        f"with a network (e.g. `python -c \"from transformers import AutoProcessor, AutoModelForImageTextToText as "
        f"M; AutoProcessor.from_pretrained('{repo}'); M.from_pretrained('{repo}')\"`), which caches them under "
        f"$HF_HOME (default ~/.cache/huggingface); or copy that cache here and point HF_HOME at it; or download the "
        f"repository (`hf download {repo} --local-dir DIR`) and pass the local directory as `model`.")


def _pretrained(fn, repo: str, **kw: Any):
    """``fn(repo)`` from the local cache first; then, unless the hub is offline, from the network."""
    try:
        return fn(repo, local_files_only=True, **kw)
    except OSError:
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            raise
        return fn(repo, **kw)


def _model_class(config: Any):
    import transformers
    for name in _AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        if auto is not None and type(config) in auto._model_mapping:
            return auto
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None and hasattr(cls, "generate"):
            return cls
    raise CaptionerLoadError(
        f"{getattr(config, 'model_type', type(config).__name__)!r} checkpoints are not image-to-text models known "
        f"to transformers {transformers.__version__} (none of {', '.join(_AUTO_CLASSES)} nor the config's "
        f"architectures {getattr(config, 'architectures', None)} can generate text); use a captioning model such "
        f"as {DEFAULT_CAPTIONER}")


def load_captioner(repo: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` for a Hub repo id or local directory, in eval mode on ``device``.

    The local cache is tried first, so a cached model never touches the network. Raises
    :class:`CaptionerLoadError` (naming ``repo`` and how to get it) when the files are not available.
    """
    from transformers import AutoConfig, AutoProcessor
    try:
        config = _pretrained(AutoConfig.from_pretrained, repo)
        processor = _pretrained(AutoProcessor.from_pretrained, repo)
    except (OSError, ValueError) as e:
        raise _load_hint(repo, e) from e
    cls = _model_class(config)
    kw = {}
    if dtype is not None:  # transformers renamed torch_dtype to dtype in 4.56
        import transformers
        from packaging.version import Version
        kw["dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"] = dtype
    try:
        model = _pretrained(cls.from_pretrained, repo, **kw)
    except OSError as e:
        raise _load_hint(repo, e) from e
    return model.eval().to(device), processor


# ------------------------------------------------------------------------------------------------ describer
class CaptionerDescriber:
    """Describe units by captioning their views with an image-to-text model and summarising contrastively.

    ``model``: a Hub repo id or local directory (default :data:`DEFAULT_CAPTIONER`), loaded on :meth:`prepare`
    or the first :meth:`describe`; or inject ``model_obj`` and ``processor`` (both required then; ``model``
    only names it). ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda[:N]``; an injected model stays
    where it is under ``auto``. ``dtype``: ``auto`` = bfloat16 (float16 without bf16 support) on CUDA, float32
    on CPU, or a torch dtype name. ``top``: descriptions kept per unit; ``alpha``: the summariser's weight on
    the background; ``dim``: the brightness outside the mask when rendering background views (pass the describe
    stage's ``describe.dim``). See the module docstring for batching, candidates and the background.
    """

    name = "captioner"

    def __init__(self, model: str | None = None, *, model_obj: Any = None, processor: Any = None,
                 device: str = "auto", batch_size: int = 16, max_new_tokens: int = 20, prompt: str | None = None,
                 use_crops: bool = False, embedder: SentenceEmbedder | None = None, background_size: int = 64,
                 seed: int = 0, top: int = 5, alpha: float = 1.0, dim: float = 0.25, dtype: str = "auto"):
        if (model_obj is None) != (processor is None):
            raise ValueError("pass model_obj and processor together (an injected model needs its processor)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if background_size < 0:
            raise ValueError(f"background_size must be >= 0; got {background_size}")
        if top < 1:
            raise ValueError(f"top must be >= 1; got {top}")
        if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must be auto or a torch dtype name (float32, bfloat16, float16); got {dtype!r}")
        self.model_id = model or (type(model_obj).__name__ if model_obj is not None else DEFAULT_CAPTIONER)
        self._model, self._processor, self._placed = model_obj, processor, False
        self.device_name, self.dtype_name = device, dtype
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self._prompt = prompt
        self.use_crops, self.background_size, self.seed, self.top = use_crops, int(background_size), int(seed), top
        self._embedder = embedder
        self.alpha, self.dim = float(alpha), float(dim)
        self.recording: Recording | None = None
        self._backgrounds: dict[str, list[tuple[int, list[Candidate]]]] = {}
        self._captions: dict[str, str] = {}
        self.generate_calls = 0  # generate() calls made so far (for tests and profiling)

    # -- model -------------------------------------------------------------------------------------
    def _resolve_device(self) -> torch.device:
        from ..runtime import resolve_device
        return resolve_device(self.device_name)

    def _load(self) -> None:
        if self._model is not None:
            if not self._placed and self.device_name != "auto":
                self._model.to(self._resolve_device())
            self._placed = True
            return
        device = self._resolve_device()
        if self.dtype_name == "auto":
            dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
                if device.type == "cuda" else torch.float32
        else:
            dtype = getattr(torch, self.dtype_name)
        self._placed = True
        log.info("captioner: loading %s on %s (%s)", self.model_id, device, dtype)
        self._model, self._processor = load_captioner(self.model_id, device, dtype)

    @property
    def model(self) -> Any:
        self._load()
        return self._model

    @property
    def processor(self) -> Any:
        self._load()
        return self._processor

    @property
    def prompt(self) -> str | None:
        if self._prompt is not None:
            return self._prompt or None
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        return _DEFAULT_PROMPTS.get(model_type)

    @property
    def embedder(self) -> SentenceEmbedder:
        if self._embedder is None:
            from ..text import SentenceEmbedder
            self._embedder = SentenceEmbedder()
        return self._embedder

    # -- protocol ----------------------------------------------------------------------------------
    def prepare(self, recording: Recording | None) -> None:
        """Load the model (errors surface here, before any work) and keep ``recording`` for the backgrounds."""
        self._load()
        if recording is not self.recording:
            self.recording = recording
            self._backgrounds = {}

    @torch.inference_mode()
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """Cleaned captions of ``images``, in order: uncached distinct images in batches of ``batch_size``."""
        keys = [pixel_key(im) for im in images]
        todo: dict[str, Image.Image] = {}
        for k, im in zip(keys, images):
            if k not in self._captions and k not in todo:
                todo[k] = im
        if todo:
            model, processor, prompt = self.model, self.processor, self.prompt
            params = next(iter(model.parameters()), None)
            device = params.device if params is not None else torch.device("cpu")
            dtype = params.dtype if params is not None else torch.float32
            pending = list(todo.items())
            for start in range(0, len(pending), self.batch_size):
                chunk = pending[start:start + self.batch_size]
                batch = [im.convert("RGB") for _, im in chunk]
                if prompt:
                    inputs = processor(images=batch, text=[prompt] * len(batch), return_tensors="pt", padding=True)
                else:
                    inputs = processor(images=batch, return_tensors="pt")
                inputs = {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device))
                          for k, v in inputs.items() if isinstance(v, torch.Tensor)}
                out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
                self.generate_calls += 1
                texts = processor.batch_decode(out, skip_special_tokens=True)
                for (k, _), text in zip(chunk, texts):
                    self._captions[k] = clean_caption(text, prompt)
        return [self._captions[k] for k in keys]

    def _background_plan(self, layer: str) -> list[tuple[int, Image.Image]]:
        """A seeded sample of ``background_size`` (unit, view) pairs of ``layer``, from the prepared recording."""
        from .views import unit_views
        ids = self.recording.tensors(layer)["ids"]
        valid = (ids >= 0).nonzero().tolist()  # [[unit, rank], ...] in (unit, rank) order
        n = min(self.background_size, len(valid))
        rng = np.random.default_rng([self.seed, zlib.crc32(layer.encode())])
        by_unit: dict[int, list[int]] = {}
        for p in sorted(rng.choice(len(valid), size=n, replace=False).tolist()) if n else []:
            by_unit.setdefault(valid[p][0], []).append(valid[p][1])
        out = []
        for unit, ranks in by_unit.items():
            uv = unit_views(self.recording, layer, unit, dim=self.dim)
            src = uv.crops if self.use_crops else uv.views
            out.extend((unit, src[r]) for r in ranks if r < len(src))  # ids of -1 only trail, so rank = index
        return out

    def describe(self, units: list[UnitViews]) -> list[Described]:
        """One :class:`Described` per unit, in order (see the module docstring for the method)."""
        from .summarise import summarise
        seen: set[tuple[str, int]] = set()
        for u in units:
            if (u.layer, u.unit) in seen:
                raise ValueError(f"unit {u.unit} of layer {u.layer!r} is listed twice")
            seen.add((u.layer, u.unit))
        views = [list(u.crops if self.use_crops else u.views) for u in units]
        # layers met for the first time get their background views captioned in the same batches
        plans: dict[str, list[tuple[int, Image.Image]]] = {}
        if self.recording is not None:
            for u in units:
                if u.layer not in self._backgrounds and u.layer not in plans:
                    plans[u.layer] = self._background_plan(u.layer)
        bg_images = [im for plan in plans.values() for _, im in plan]
        captions = self.caption(bg_images + [im for vs in views for im in vs])
        pos = 0
        for layer, plan in plans.items():
            self._backgrounds[layer] = [(unit, caption_candidates(c))
                                        for (unit, _), c in zip(plan, captions[pos:pos + len(plan)])]
            pos += len(plan)
        per_unit: list[list[str]] = []
        for vs in views:
            per_unit.append(captions[pos:pos + len(vs)])
            pos += len(vs)
        cands = [[caption_candidates(c) for c in caps] for caps in per_unit]
        if self.recording is None:
            in_call = self._in_call_backgrounds(units, cands)

        out = []
        for j, u in enumerate(units):
            if self.recording is not None:
                background = [c for unit, c in self._backgrounds[u.layer] if unit != u.unit]
            else:
                background = in_call[j]
            ranked = summarise(cands[j], background, self.embedder, top=self.top, alpha=self.alpha)
            extra = {"model": self.model_id, "captions": per_unit[j], "views": "crops" if self.use_crops else "views",
                     "support": {s.description: s.support for s in ranked}, "background_views": len(background)}
            if ranked:
                out.append(Described(u.layer, u.unit, ranked[0].description, ranked[0].score, self.name,
                                     [(s.description, s.score) for s in ranked], extra))
            else:  # no views, or only empty captions (NaN score, as the tagger backend)
                out.append(Described(u.layer, u.unit, "", float("nan"), self.name, [], extra))
        return out

    def _in_call_backgrounds(self, units: list[UnitViews], cands: list[list[list[Candidate]]]
                             ) -> list[list[list[Candidate]]]:
        """Without a recording: per unit, a seeded sample of the other units' views of this call."""
        # every view of every unit in a canonical (layer, unit, rank) order; unit j's own views are the slice
        # [first[j], first[j] + len(cands[j])) of it, skipped when sampling
        order = sorted(range(len(units)), key=lambda j: (units[j].layer, units[j].unit))
        pool = [(j, r) for j in order for r in range(len(cands[j]))]
        first: dict[int, int] = {}
        for pos, (j, _) in enumerate(pool):
            first.setdefault(j, pos)
        out = []
        for j, u in enumerate(units):
            own = len(cands[j])
            n_bg = min(self.background_size, len(pool) - own)
            rng = np.random.default_rng([self.seed, zlib.crc32(u.layer.encode()), u.unit])
            picks = sorted(rng.choice(len(pool) - own, size=n_bg, replace=False).tolist()) if n_bg else []
            start = first.get(j, 0)
            background = []
            for p in picks:
                jj, rr = pool[p + own if p >= start else p]
                background.append(cands[jj][rr])
            out.append(background)
        return out
