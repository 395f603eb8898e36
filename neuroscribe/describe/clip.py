"""``clip`` backend: CLIP-Dissect (Oikarinen & Weng, ICLR 2023) with open_clip and soft-WPMI over a vocabulary.

Every probe image that is some unit's exemplar and every concept of the vocabulary is embedded once with an
open_clip model (:meth:`ClipDissectDescriber.prepare`); a unit's description is the concept with the highest
soft-WPMI between the concept and the unit's top-activating images (:func:`soft_wpmi`).

**Formula.** ``sim[n, c]`` is the cosine similarity of image ``n`` and concept ``c``. For a unit ``u`` with
top images ``ids[u, 0..k-1]`` (rank 0 = most activating; ``-1`` = no image)::

    P[n, c]          = softmax_c(scale * sim[n, c])                            p(concept | image)
    w_r              = p_start - (r / k) * (p_start - p_end),  r = 0..k-1     soft membership of rank r
                       (w_r = 0 where ids[u, r] == -1)
    log p(c | E_u)   = sum_r log(1 - w_r + w_r * P[ids[u, r], c] + min_prob)
    log p(c)         = (logsumexp_u(a * log p(c | E_u)) - log U) / a           over the U units of the layer
    score[u, c]      = log p(c | E_u) - lam * log p(c)

``p(c | E_u)`` is the probability that concept ``c`` holds for *all* images of the soft top set (each rank-``r``
image is in the set with probability ``w_r`` and, if it is, shows ``c`` with probability ``P``); ``p(c)`` is a
soft maximum of it over the layer's units, so concepts that fit every unit ("photo", "image") are penalised. This
is the reference implementation's ``soft_wpmi`` (``a = 10``, ``p_start = 0.998``, ``p_end = 0.97``,
``min_prob = 1e-7``, ``lam = 1``). Note that with ``lam = 1`` a score is at most ``log(U) / a`` (0.62 for 512
units), reached by every concept that one unit has far more than all others; such concepts rank by how far
ahead of the other units this one is, so scores are comparable within a layer, not across layers of different
size.

**Deviations from the reference**, all forced by what a recording holds or chosen to match our conventions:

- The top set is the recording's top-``k`` per unit (``Recording.tensors(layer)["ids"]``; ``record.k``, 15 by
  default, vs. the paper's 100), ranked by the unit's *spatial maximum* activation (the reference ranks by the
  spatial mean by default). ``top_k`` uses only the first ``top_k`` of them. The rank schedule ``w_r`` is spread
  over our ``k`` exactly as the reference spreads it over its ``top_k``.
- ``scale`` defaults to the CLIP model's own ``logit_scale.exp()`` (100 for the OpenAI models; the temperature
  CLIP was trained with), where the reference uses ``a = 10`` for this softmax too; pass ``scale=10`` to match it.
- Only images that are an exemplar of some recorded unit are embedded: ``P`` is a per-image softmax, so the other
  probe images never enter the formula. Images are embedded in the recording's model geometry
  (:meth:`Recording.image`: the target model's resize + centre crop, i.e. what the unit saw), cut from the source
  at the view size (``Recording.view_size``, as the other describers' views), then CLIP's own preprocessing.
- ``log p(c)`` runs over every recorded unit of the unit's layer (as the reference runs over the layer's
  neurons), whichever units ``describe`` is asked about.
- Concepts are embedded as plain text (``template="{}"``, as the reference does); the default vocabulary is the
  20,000 most common English words from ``wordfreq`` (the paper's "20k" set is the same idea), kept when
  alphabetic and at least 3 letters long.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..models import ModelSpecError
from .describers import Described, UnitViews
from .wpmi import SoftWPMI, default_vocabulary, load_vocabulary, rank_weights, soft_wpmi

if TYPE_CHECKING:  # pragma: no cover
    from ..record.exemplars import Recording

__all__ = [
    "DEFAULT_CLIP",
    "ClipDissectDescriber",
    "ClipLoadError",
    "SoftWPMI",
    "default_vocabulary",
    "load_clip",
    "load_vocabulary",
    "parse_spec",
    "rank_weights",
    "soft_wpmi",
]

log = logging.getLogger("neuroscribe.describe.clip")

DEFAULT_CLIP = "ViT-B-32@openai"


class ClipLoadError(ModelSpecError):
    """The open_clip model could not be resolved or loaded; the message says how to get it."""


# ------------------------------------------------------------------------------------------------ vocabulary
def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"ViT-B-32@openai"`` -> ``("ViT-B-32", "openai")``; an ``open_clip:`` prefix is allowed;
    ``"hf-hub:ORG/REPO"`` -> ``("hf-hub:ORG/REPO", None)``."""
    spec = spec.strip()
    spec = spec.removeprefix("open_clip:")
    if spec.startswith("hf-hub:"):
        return spec, None
    arch, _, tag = spec.partition("@")
    return arch, (tag or None)


def load_clip(spec: str, device: torch.device | str = "cpu") -> tuple[Any, Any, Any]:
    """``(model, tokenizer, preprocess)`` for an open_clip spec ``ARCH@PRETRAINED`` (or ``hf-hub:ORG/REPO``).

    ``PRETRAINED`` is an open_clip pretrained tag (``open_clip.list_pretrained_tags_by_model(ARCH)``) or the path
    of a local checkpoint file. Raises :class:`ClipLoadError` naming the tag and how to get the weights.
    """
    import open_clip
    arch, tag = parse_spec(spec)
    if not arch.startswith("hf-hub:"):
        if arch not in open_clip.list_models():
            import difflib
            raise ClipLoadError(f"open_clip has no architecture {arch!r} (spec {spec!r}); close: "
                                f"{difflib.get_close_matches(arch, open_clip.list_models(), n=5)}; list them with "
                                "open_clip.list_models()")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag is None:
            raise ClipLoadError(f"CLIP spec {spec!r} names no weights: write {arch}@TAG with an open_clip pretrained "
                                f"tag, one of {tags}, or {arch}@/path/to/checkpoint.bin (random weights cannot "
                                "describe anything)")
        if tag not in tags and not Path(tag).expanduser().is_file():
            raise ClipLoadError(f"{tag!r} is neither an open_clip pretrained tag of {arch} ({tags}) nor a "
                                "checkpoint file")
    is_file = bool(tag) and Path(tag).expanduser().is_file()
    try:
        if tag and not is_file:  # fetch (or find in the cache) first: fail before building a large model
            from open_clip.pretrained import download_pretrained
            download_pretrained(open_clip.get_pretrained_cfg(arch, tag))
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=str(Path(tag).expanduser()) if is_file else tag, device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as e:  # open_clip raises RuntimeError, OSError, hub errors...
        hub = None
        if tag and not arch.startswith("hf-hub:"):
            hub = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub")
        where = f" (Hugging Face repo {hub.rstrip('/')})" if hub else ""
        raise ClipLoadError(
            f"could not load open_clip model {arch!r} with pretrained tag {tag!r}{where}: "
            f"{type(e).__name__}: {str(e).strip()[:400]}\nThe weights are downloaded on first use. Run once on a "
            f"machine with a network (`python -c \"import open_clip; open_clip.create_model_and_transforms("
            f"'{arch}', pretrained='{tag}')\"`), which caches them under $HF_HOME (default ~/.cache/huggingface); or "
            f"copy that cache here and point HF_HOME at it; or download the checkpoint file and use the spec "
            f"'{arch}@/path/to/open_clip_pytorch_model.bin'.") from e
    return model.eval(), tokenizer, preprocess


# ------------------------------------------------------------------------------------------------ describer
class ClipDissectDescriber:
    """CLIP-Dissect: each unit gets the vocabulary concepts with the highest soft-WPMI with its top images.

    ``spec``: open_clip ``ARCH@PRETRAINED`` (default :data:`DEFAULT_CLIP`), loaded on :meth:`prepare`; or inject
    ``model_obj`` (anything with ``encode_image``/``encode_text`` and optionally ``logit_scale``), ``tokenizer``
    (``list[str] -> LongTensor``) and ``preprocess`` (PIL -> tensor) together. ``vocabulary``: see
    :func:`load_vocabulary`. ``top_k``: top images used per unit (``None`` = all recorded). ``lam``, ``a``,
    ``p_start``, ``p_end``, ``scale`` (``None`` = the model's ``logit_scale.exp()``): see :func:`soft_wpmi`.
    ``n_candidates``: ranked concepts returned per unit. ``template``: how a concept is written for the text
    encoder (``"{}"``: the concept alone).
    """

    name = "clip"

    def __init__(self, spec: str = DEFAULT_CLIP, *, model_obj: Any = None, tokenizer: Any = None,
                 preprocess: Any = None, vocabulary: list[str] | str | Path | None = None, top_k: int | None = None,
                 lam: float = 1.0, batch_size: int = 64, device: str = "auto", n_candidates: int = 5,
                 template: str = "{}", a: float = 10.0, scale: float | None = None, p_start: float = 0.998,
                 p_end: float = 0.97):
        injected = [x is not None for x in (model_obj, tokenizer, preprocess)]
        if any(injected) and not all(injected):
            raise ValueError("pass model_obj, tokenizer and preprocess together (an injected model needs all three)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None; got {top_k}")
        if n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1; got {n_candidates}")
        if "{}" not in template:
            raise ValueError(f"template must contain {{}} where the concept goes; got {template!r}")
        self.spec = spec  # with an injected model, only a name for it
        self._model, self._tokenizer, self._preprocess = model_obj, tokenizer, preprocess
        self._placed = False
        self._vocab_arg = vocabulary
        self._vocabulary: list[str] | None = None
        self.top_k, self.lam, self.a, self.scale = top_k, float(lam), float(a), scale
        self.p_start, self.p_end = float(p_start), float(p_end)
        self.batch_size, self.device_name = int(batch_size), device
        self.n_candidates, self.template = int(n_candidates), template
        self.recording: Recording | None = None
        self.text_features: torch.Tensor | None = None      # [C, D], unit norm
        self.image_features: torch.Tensor | None = None     # [N_embedded, D], unit norm
        self.image_rows: dict[int, int] = {}                 # probe image id -> row of image_features
        self._layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.encode_calls = {"image": 0, "text": 0}

    # -- pieces ------------------------------------------------------------------------------------
    @property
    def vocabulary(self) -> list[str]:
        if self._vocabulary is None:
            self._vocabulary = load_vocabulary(self._vocab_arg)
        return self._vocabulary

    def _device(self) -> torch.device:
        from ..runtime import resolve_device
        return resolve_device(self.device_name)

    def _load(self) -> None:
        if self._placed:
            return
        if self._model is None:
            device = self._device()
            log.info("clip: loading open_clip %s on %s", self.spec, device)
            self._model, self._tokenizer, self._preprocess = load_clip(self.spec, device)
        elif self.device_name != "auto":  # an injected model stays where it is under "auto"
            self._model.to(self._device())
        self._model.eval()
        self._placed = True

    @property
    def model(self) -> Any:
        self._load()
        return self._model

    def _model_device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None) if hasattr(self.model, "parameters") else None
        return p.device if p is not None else torch.device("cpu")

    def logit_scale(self) -> float:
        """The softmax scale: ``scale`` if given, else the model's ``logit_scale.exp()`` (capped at 100, as in
        CLIP training), else 100."""
        if self.scale is not None:
            return float(self.scale)
        ls = getattr(self.model, "logit_scale", None)
        if ls is None:
            return 100.0
        return float(min(torch.as_tensor(ls).detach().float().exp().item(), 100.0))

    @torch.inference_mode()
    def encode_text(self, concepts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[len(concepts), D]`` (float32, CPU), in batches of ``batch_size``."""
        self._load()
        device = self._model_device()
        out = []
        for s in range(0, len(concepts), self.batch_size):
            tokens = self._tokenizer([self.template.format(c) for c in concepts[s:s + self.batch_size]])
            f = self._model.encode_text(tokens.to(device)).float()
            self.encode_calls["text"] += 1
            out.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def encode_images(self, images: list) -> torch.Tensor:
        """Unit-norm image embeddings ``[len(images), D]`` (float32, CPU) of PIL images, in batches."""
        self._load()
        device = self._model_device()
        out = []
        for s in range(0, len(images), self.batch_size):
            x = torch.stack([self._preprocess(im.convert("RGB")) for im in images[s:s + self.batch_size]])
            f = self._model.encode_image(x.to(device)).float()
            self.encode_calls["image"] += 1
            out.append(torch.nn.functional.normalize(f, dim=-1).cpu())
        return torch.cat(out)

    # -- protocol ----------------------------------------------------------------------------------
    def prepare(self, recording: Recording) -> None:
        """Embed the vocabulary (once per describer) and every exemplar image of the recording (once per call)."""
        self._load()
        if self.text_features is None:
            log.info("clip: embedding %d concepts", len(self.vocabulary))
            self.text_features = self.encode_text(self.vocabulary)
        ids = sorted({int(i) for layer in recording.layers
                      for i in recording.tensors(layer)["ids"].reshape(-1).tolist() if int(i) >= 0})
        log.info("clip: embedding %d exemplar images", len(ids))
        feats = []
        workers = max(1, min(8, os.cpu_count() or 1))
        size = getattr(recording, "view_size", None)  # the describer's views, cut from the source files
        load = recording.image if size is None else functools.partial(recording.image, size=size)
        with ThreadPoolExecutor(workers) as pool:
            for s in range(0, len(ids), self.batch_size):  # decode one batch at a time (bounded memory)
                images = list(pool.map(load, ids[s:s + self.batch_size]))
                feats.append(self.encode_images(images))
        dim = self.text_features.shape[1]
        self.image_features = torch.cat(feats) if feats else torch.zeros(0, dim)
        self.image_rows = {i: r for r, i in enumerate(ids)}
        self.recording = recording
        self._layers = {}

    def _layer_scores(self, layer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(top concept indices [U, n], their scores [U, n], log p(c|E) of those [U, n])`` for a layer."""
        if layer not in self._layers:
            ids = self.recording.tensors(layer)["ids"]
            rows = torch.tensor([[self.image_rows.get(int(i), -1) for i in row] for row in ids.tolist()],
                                dtype=torch.long).reshape(ids.shape)
            device = self._model_device()
            # float64 (where the device has it): many concepts sit near the lam=1 ceiling (module docstring), and
            # float32 rounding would decide their order
            dtype = torch.float32 if device.type == "mps" else torch.float64
            sim = self.image_features.to(device, dtype) @ self.text_features.to(device, dtype).T
            res = soft_wpmi(sim, rows, scale=self.logit_scale(), lam=self.lam, a=self.a, p_start=self.p_start,
                            p_end=self.p_end, top_k=self.top_k)
            n = min(self.n_candidates, res.score.shape[1])
            # stable descending sort: ties go to the earlier (more common) concept
            order = torch.sort(res.score, dim=1, descending=True, stable=True).indices[:, :n]
            self._layers[layer] = (order.cpu(), res.score.gather(1, order).cpu(),
                                   res.log_p_given_e.gather(1, order).cpu())
        return self._layers[layer]

    def describe(self, units: list[UnitViews]) -> list[Described]:
        """The best concepts of each unit (by soft-WPMI over its layer), in order of ``units``."""
        if self.recording is None:
            raise RuntimeError("ClipDissectDescriber.describe needs prepare(recording) first (the top sets and the "
                               "layer-wide prior come from the recording)")
        out = []
        vocab = self.vocabulary
        for u in units:
            n_units = self.recording.units(u.layer)  # KeyError naming the recorded layers if absent
            if not 0 <= u.unit < n_units:
                raise IndexError(f"unit {u.unit} is out of range for layer {u.layer!r} (units 0..{n_units - 1})")
            idx, score, lpe = (t[u.unit] for t in self._layer_scores(u.layer))
            cands = [(vocab[int(i)], float(s)) for i, s in zip(idx, score)]
            extra = {"spec": self.spec, "log_p_given_e": [float(x) for x in lpe], "lam": self.lam,
                     "scale": self.logit_scale(), "top_k": self.top_k, "vocabulary_size": len(vocab)}
            out.append(Described(u.layer, u.unit, cands[0][0], cands[0][1], self.name, cands, extra))
        return out
