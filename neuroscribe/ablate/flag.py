"""Flagging units tied to spurious cues: by what their descriptions say, and by how much the cue moves them.

Descriptions (:func:`flag_units`). For every unit and every cue of :class:`~neuroscribe.config.FlagConfig` ``cues``
(``cue name -> keywords``):

* keyword match: a keyword occurs in the description as whole words (case-insensitive; multi-word keywords match
  as a sequence; simple plurals are folded, so ``letter`` matches "letters", ``digits`` matches "digit" and ``box``
  matches "boxes", while ``text`` does not match "context" or ``sign`` "signal");
* embedding similarity: ``max_k cos(e(description), e(keyword_k))`` with a sentence embedder (unit-norm
  embeddings); it is always recorded, and flags when ``>= embedding_threshold``.

The description flags the unit when either holds and, with ``verified`` (the default), its verification by
experiment (``verify_status`` of the row, :mod:`neuroscribe.describe.verify`) is ``confirmed``; a row without a
verification flags by its words alone. Evidence (optional): ``evidence[(layer, unit)]``, usually
:func:`cue_effect`, flags a unit when it is among the top ``evidence_top`` share of units ranked by effect (within
its layer, or over all units with ``evidence_scope='all'``) and its effect exceeds ``evidence_min``. ``use`` decides
what counts: ``description``, ``evidence``, ``both`` (description and evidence) or ``either``.

Cue effect (:func:`cue_effect`): for each unit ``u``, with ``a_u(x)`` its spatial-max activation on image ``x``
(the max over the conv map or over patch tokens, CLS excluded; the value itself for flat units) and ``n`` image
pairs (clean ``x_i``, cued ``x'_i``, the same photo with the cue drawn on)::

    effect_u = mean_i[a_u(x'_i) - a_u(x_i)] / (sd_i[a_u(x_i)] + 1e-6)

where ``sd`` is the sample standard deviation (n - 1) over the clean images: how many clean-image standard
deviations the cue moves the unit, on average. Positive = the unit responds more to cued images.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import FlagConfig
from ..hooks import layer_layout, prefix_tokens, run, spatial_max, trace, unit_view

__all__ = [
    "EFFECT_EPS",
    "Flag",
    "LayerEffect",
    "cue_effect",
    "cue_effect_stats",
    "cue_pairs",
    "flag_units",
    "keyword_matches",
]

Unit = tuple[str, int]
#: The smallest clean-image standard deviation :func:`cue_effect` divides by (a unit constant on clean images).
EFFECT_EPS = 1e-6
#: ... and at least this share of the layer's median standard deviation: a unit nearly constant on clean images
#: (sd ~ 0) would otherwise get an effect of 10^5 from any small change and top every ranking.
STD_FLOOR_SHARE = 0.1


def floored_std(std: torch.Tensor) -> torch.Tensor:
    """Per-unit sd floored at ``max(EFFECT_EPS, STD_FLOOR_SHARE * median sd of the layer)``."""
    floor = max(EFFECT_EPS, STD_FLOOR_SHARE * float(std.median())) if std.numel() else EFFECT_EPS
    return std.clamp_min(floor)
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class Flag:
    """One (unit, cue) judgement. ``flagged`` says whether it counts under ``FlagConfig.use``; ``similarity`` is
    NaN without a description or an embedder; ``evidence`` is None where no evidence applies to this cue."""

    layer: str
    unit: int
    cue: str
    by_keyword: bool
    keyword: str | None
    similarity: float
    by_evidence: bool
    evidence: float | None
    reasons: list[str] = field(default_factory=list)
    by_embedding: bool = False
    description: str | None = None
    flagged: bool = True
    verified: str | None = None  # the description's verification status (describe.verify), None: not verified
    by_description: bool = False  # the words flag it (keyword or embedding) and, with ``verified``, were confirmed

    @property
    def key(self) -> Unit:
        return (self.layer, self.unit)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (NaN similarity becomes None)."""
        d = asdict(self)
        if isinstance(d["similarity"], float) and math.isnan(d["similarity"]):
            d["similarity"] = None
        return d


def _singular(w: str) -> str:
    """Fold simple English plurals: letters -> letter, boxes -> box, categories -> category (glass, bus stay)."""
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("es") and w[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def keyword_matches(description: str, keywords: Sequence[str]) -> list[str]:
    """The keywords that occur in ``description`` as whole words (plurals folded), earliest occurrence first (at
    the same place, a keyword spelled exactly as the description comes before a plural/singular variant)."""
    raw = _WORD.findall(str(description).lower())
    toks = [_singular(w) for w in raw]
    found = []
    for order, kw in enumerate(keywords):
        kraw = _WORD.findall(str(kw).lower())
        kt = [_singular(w) for w in kraw]
        if not kt:
            continue
        pos = next((i for i in range(len(toks) - len(kt) + 1) if toks[i:i + len(kt)] == kt), None)
        if pos is not None:
            found.append((pos, raw[pos:pos + len(kt)] != kraw, order, kw))
    return [kw for *_, kw in sorted(found)]


def _read_descriptions(descriptions: Iterable[Mapping[str, Any]]) -> dict[Unit, str]:
    out: dict[Unit, str] = {}
    for i, row in enumerate(descriptions):
        if not isinstance(row, Mapping):
            raise TypeError(f"descriptions[{i}] must be a dict with layer, unit, description; got {row!r}")
        missing = [k for k in ("layer", "unit", "description") if k not in row]
        if missing:
            raise ValueError(f"descriptions[{i}] lacks {missing}; it has {sorted(row)}")
        unit = row["unit"]
        if isinstance(unit, bool) or not isinstance(unit, (int, np.integer)) or unit < 0:
            raise ValueError(f"descriptions[{i}]: unit must be an int >= 0; got {unit!r}")
        key = (str(row["layer"]), int(unit))
        if key in out:
            raise ValueError(f"descriptions[{i}]: unit {key} is described twice (one description per unit)")
        out[key] = "" if row["description"] is None else str(row["description"])
    return out


def _evidence_flags(evidence: Mapping[Unit, float], cfg: FlagConfig) -> dict[Unit, str]:
    """Units flagged by evidence -> the reason (rank within its layer, or among all units)."""
    values: dict[Unit, float] = {}
    for key, v in evidence.items():
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str)):
            raise ValueError(f"evidence keys must be (layer, unit); got {key!r}")
        if v is None or not math.isfinite(float(v)):
            raise ValueError(f"evidence[{key}] is {v!r}; every cue effect must be a finite number")
        values[(key[0], int(key[1]))] = float(v)
    scopes: dict[str, list[Unit]] = {}
    for key in values:
        scopes.setdefault(key[0] if cfg.evidence_scope == "layer" else "all units", []).append(key)
    out = {}
    for scope, keys in scopes.items():
        keys.sort(key=lambda k: (-values[k], k))
        top = max(1, math.ceil(cfg.evidence_top * len(keys)))
        for rank, k in enumerate(keys[:top], 1):
            if values[k] > cfg.evidence_min:
                where = f"layer {scope!r}" if cfg.evidence_scope == "layer" else scope
                out[k] = (f"cue effect {values[k]:.3g} ranks {rank} of {len(keys)} in {where} "
                          f"(top {cfg.evidence_top:.3g} share, > {cfg.evidence_min:g})")
    return out


def flag_units(descriptions: Iterable[Mapping[str, Any]], cfg: FlagConfig, embedder: Any = None,
               evidence: Mapping[Unit, float] | None = None, *, evidence_cue: str | None = None,
               all_rows: bool = False) -> list[Flag]:
    """Flag units whose descriptions (and/or cue effects) tie them to a cue; see the module docstring.

    ``descriptions``: dicts with ``layer``, ``unit``, ``description`` (other keys ignored; one row per unit).
    ``embedder``: an object with ``encode(list[str]) -> [n, dim]`` unit-norm array (e.g.
    :class:`~neuroscribe.text.SentenceEmbedder`); None builds ``cfg.embedder`` (None there too: keyword
    matching only). ``evidence``: ``{(layer, unit): effect}``; it applies to ``evidence_cue``, which defaults to the
    only cue when ``cfg.cues`` has one. Returns the flags that count under ``cfg.use`` (``all_rows=True``: every
    (unit, cue) row, with ``flagged`` saying whether it counts), ordered by layer (first seen), unit, cue.
    An empty list is a valid answer (nothing flagged).
    """
    if not cfg.cues:
        raise ValueError("flag.cues is empty: give at least one cue name with its keywords")
    descriptions = list(descriptions)
    desc = _read_descriptions(descriptions)
    status = {(str(r["layer"]), int(r["unit"])): r.get("verify_status") for r in descriptions}
    if evidence is None and cfg.use != "description":
        raise ValueError(f"flag.use={cfg.use!r} needs cue-effect evidence, but none was given (set "
                             "flag.evidence_shift to a shift with a cue, or use flag.use='description')")
    ev_cue = None
    if evidence is not None:
        if evidence_cue is None:
            if len(cfg.cues) != 1:
                raise ValueError(f"evidence was given but flag.cues has several cues {sorted(cfg.cues)}: pass "
                                 "evidence_cue to say which cue the evidence measures")
            evidence_cue = next(iter(cfg.cues))
        if evidence_cue not in cfg.cues:
            raise ValueError(f"evidence_cue {evidence_cue!r} is not one of flag.cues {sorted(cfg.cues)}")
        ev_cue = evidence_cue
    ev_values = {(str(k[0]), int(k[1])): float(v) for k, v in (evidence or {}).items()
                 if isinstance(k, tuple) and len(k) == 2}
    ev_flags = _evidence_flags(evidence, cfg) if evidence is not None else {}
    if desc and embedder is None and cfg.embedder:
        from ..text import SentenceEmbedder
        embedder = SentenceEmbedder(cfg.embedder)
    keys = list(desc) + [k for k in ev_values if k not in desc]
    order = {layer: i for i, layer in enumerate(dict.fromkeys(k[0] for k in keys))}
    keys.sort(key=lambda k: (order[k[0]], k[1]))
    sims: dict[str, dict[Unit, tuple[float, str]]] = {c: {} for c in cfg.cues}
    if desc and embedder is not None:
        texts = list(desc.values())
        words = sorted({kw for kws in cfg.cues.values() for kw in kws})
        emb = np.asarray(embedder.encode(texts + words), dtype=np.float64)
        d_emb, k_emb = emb[:len(texts)], emb[len(texts):]
        cos = d_emb @ k_emb.T
        col = {w: j for j, w in enumerate(words)}
        for cue, kws in cfg.cues.items():
            cols = [col[w] for w in kws]
            if not cols:
                continue
            sub = cos[:, cols]
            best = sub.argmax(1)
            for r, key in enumerate(desc):
                sims[cue][key] = (float(sub[r, best[r]]), kws[best[r]])
    out: list[Flag] = []
    for key in keys:
        text = desc.get(key)
        for cue, kws in cfg.cues.items():
            hits = keyword_matches(text, kws) if text else []
            sim, near = sims[cue].get(key, (float("nan"), None))
            by_emb = bool(not math.isnan(sim) and sim >= cfg.embedding_threshold)
            reasons = []
            if hits:
                reasons.append(f"description {text!r} contains keyword {hits[0]!r}"
                               + (f" (also {hits[1:]})" if len(hits) > 1 else ""))
            if by_emb:
                reasons.append(f"description {text!r} is similar to keyword {near!r} (cosine {sim:.2f} >= "
                               f"{cfg.embedding_threshold:g})")
            by_ev = cue == ev_cue and key in ev_flags
            if by_ev:
                reasons.append(ev_flags[key])
            by_desc = bool(hits) or by_emb
            ver = status.get(key)
            if by_desc and cfg.verified and ver is not None:
                by_desc = ver == "confirmed"
                reasons.append(f"verification by experiment: {ver}")
            counts = {"description": by_desc, "evidence": by_ev, "both": by_desc and by_ev,
                      "either": by_desc or by_ev}[cfg.use]
            if counts or all_rows:
                out.append(Flag(key[0], key[1], cue, bool(hits), hits[0] if hits else None, sim, by_ev,
                                ev_values.get(key) if cue == ev_cue else None, reasons, by_emb, text, counts,
                                status.get(key), by_desc))
    return out


# ------------------------------------------------------------------------------------------------ cue effect
@dataclass
class LayerEffect:
    """Per-unit cue-effect statistics of one layer (arrays aligned with ``units``)."""

    units: np.ndarray
    mean_diff: np.ndarray  # mean over pairs of a(cued) - a(clean)
    clean_std: np.ndarray  # sample sd of a(clean)
    effect: np.ndarray  # mean_diff / floored_std(clean_std)
    n: int


def _spatial_max(t: torch.Tensor, model: nn.Module, layout: str | None) -> torch.Tensor:
    n_prefix = prefix_tokens(model, t.shape[1]) if t.dim() == 3 else None
    return spatial_max(unit_view(t, n_prefix, layout)).float()


def cue_effect_stats(model: nn.Module, layers: Mapping[str, Sequence[int] | None] | Sequence[str],
                     pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, device: str | torch.device | None = None
                     ) -> dict[str, LayerEffect]:
    """The statistics behind :func:`cue_effect`, per layer (``layers``: ``{layer: units or None for all}``)."""
    from ..hooks import resolve_layers
    spec = {name: None for name in layers} if not isinstance(layers, Mapping) else dict(layers)
    if not spec:
        raise ValueError("cue_effect: no layers given")
    resolve_layers(model, list(spec))
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    acc: dict[str, list] = {}
    calls: dict[str, int] | None = None
    layouts: dict[str, str | None] = {}
    n = 0
    was_training = model.training
    model.eval()
    try:
        for b, pair in enumerate(pairs):
            clean, cued = pair
            if clean.shape != cued.shape:
                raise ValueError(f"pair batch {b}: clean {tuple(clean.shape)} and cued {tuple(cued.shape)} differ")
            if clean.shape[0] == 0:
                continue
            x = torch.cat([clean, cued]).to(dev)
            with torch.no_grad(), trace(model, retain=list(spec), stop=calls is not None, calls=calls) as tr:
                run(model, x)
            if calls is None:
                calls = dict(tr.calls)
            bsz = clean.shape[0]
            for name in spec:
                if name not in layouts:  # decided as recording and ablation decide it
                    layouts[name] = layer_layout(model, name, tuple(tr[name].shape))
                a = _spatial_max(tr[name], model, layouts[name]).double().cpu()
                if name not in acc:
                    width = a.shape[1]
                    chosen = spec[name]
                    units = list(range(width)) if chosen is None else list(dict.fromkeys(int(u) for u in chosen))
                    bad = [u for u in units if not 0 <= u < width]
                    if bad:
                        raise IndexError(f"unit {bad[0]} is out of range for layer {name!r}, which has units "
                                         f"0..{width - 1}")
                    acc[name] = [torch.tensor(units), torch.zeros(len(units), dtype=torch.float64),
                                 torch.zeros(len(units), dtype=torch.float64),
                                 torch.zeros(len(units), dtype=torch.float64)]
                idx, s, ss, sd = acc[name]
                a = a[:, idx]
                a_clean, a_cued = a[:bsz], a[bsz:]
                s += a_clean.sum(0)
                ss += (a_clean ** 2).sum(0)
                sd += (a_cued - a_clean).sum(0)
            n += bsz
    finally:
        model.train(was_training)
    if n < 2:
        raise ValueError(f"cue_effect needs at least 2 image pairs (a standard deviation); got {n}")
    out = {}
    for name, (idx, s, ss, sd) in acc.items():
        mean = s / n
        var = ((ss - n * mean ** 2) / (n - 1)).clamp_min(0)
        std = var.sqrt()
        md = sd / n
        out[name] = LayerEffect(idx.numpy(), md.numpy(), std.numpy(), (md / floored_std(std)).numpy(), n)
    return out


def cue_effect(model: nn.Module, layers: Mapping[str, Sequence[int] | None] | Sequence[str],
               pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, device: str | torch.device | None = None
               ) -> dict[Unit, float]:
    """``{(layer, unit): effect}``: how far adding the cue moves each unit's spatial-max activation, in clean-image
    standard deviations (formula in the module docstring).

    ``layers``: ``{layer: unit indices, or None for all units}`` (or a list of layer names). ``pairs``: batches
    ``(clean [B,3,H,W], cued [B,3,H,W])`` of the same images without and with the cue (e.g. :func:`cue_pairs`);
    each pair batch goes through the model as one batch of 2B images, read with
    :func:`neuroscribe.hooks.trace` (``retain``; the pass stops after the last retained layer).
    """
    stats = cue_effect_stats(model, layers, pairs, device=device)
    return {(name, int(u)): float(e) for name, st in stats.items() for u, e in zip(st.units, st.effect)}


def cue_pairs(dataset: Any, transform: Callable, indices: Sequence[int] | None = None, batch_size: int = 32,
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(clean, cued)`` from a :class:`~neuroscribe.datasets.shifts.CuedDataset`'s ``pair(i)`` (the cue is
    always drawn on the cued image), each image put through ``transform`` (e.g. ``preprocess.transform()``).
    Images that cannot be loaded are skipped."""
    from ..datasets.probe import ImageLoadError
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    ids = range(len(dataset)) if indices is None else indices
    clean, cued = [], []
    for i in ids:
        try:
            a, b = dataset.pair(int(i))
        except ImageLoadError:
            continue
        clean.append(transform(a))
        cued.append(transform(b))
        if len(clean) == batch_size:
            yield torch.stack(clean), torch.stack(cued)
            clean, cued = [], []
    if clean:
        yield torch.stack(clean), torch.stack(cued)
