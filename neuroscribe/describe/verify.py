"""Verification by experiment, per unit: a description's words alone become an intervention on images where the
unit is quiet, and the unit is measured against a matched control (the same edit with other words or colours).

What MAIA does with an agent: the interventions, a small registry (:data:`INTERVENTIONS`; a new kind is one
function), are in :mod:`.interventions`; this module draws the images, runs the model and measures.

Measurement (:func:`verify_units`): ``images`` probe images, a class-stratified seeded sample drawn for this
purpose; a unit is measured on those where it is quiet (spatial-max activation at most its median over the
sample). With ``t_i``, ``c_i`` the unit's spatial-max activation on the treated and control edit of image ``i``::

    effect = mean_i(t_i - c_i) / sd(base),  auc = P(t > c) over all (treated, control) pairs

where ``sd(base)`` is the sample sd over the whole sample, floored at 10 % of the layer's median sd (a nearly
constant unit cannot get a huge effect from a tiny change). ``confirmed`` when ``effect >= effect_min`` and
``auc >= auc_min`` (``describe.verify``). Beside them, over EVERY image of the sample (``b_i`` the unedited one)::

    response = mean_i(t_i - b_i) / sd(base)

how far the edit the words became moves the unit at all: the flag score that orders units by their words (the
control says the words are specific, the response how strongly they drive the unit; on the study's five text-trained
models it ranks the units the cue moves most better than the effect does, README "The flag score").

Edits that share their words share their images: ``images x (1 + 2 x distinct interventions)`` forward passes; an
object's units of one fold differ only in the images where the drawn crop is of one of their own, and only those
are passed again.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..fusion import channels_last, fold_for_inference
from ..text import common_words
from .views import pixel_key
from .interventions import INTERVENTIONS, Intervention, Pools, UnitKey, intervention_for, normalise, register

__all__ = ["INTERVENTIONS", "VERIFY_VERSION", "Intervention", "Pools", "intervention_for", "measure", "normalise",
           "register", "verify_units"]

VERIFY_VERSION = 6  # part of verify.json's key: results of an older verifier are not reused


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _crop_pools(rec, rows: Mapping[UnitKey, str], seed: int, per_description: int = 8,
                extra_units: int = 32) -> dict[str, list[tuple[UnitKey, Image.Image, int]]]:
    """Exemplar crops (every exemplar, under the unit's mask) of up to ``per_description`` units of every description
    that several units share, and of ``extra_units`` other units (control material)."""
    from .views import crop_box
    groups: dict[str, list[UnitKey]] = {}
    for key, d in rows.items():
        groups.setdefault(normalise(d), []).append(key)
    rng = random.Random(_seed(seed, "crops"))
    chosen = []
    for d, units in sorted(groups.items()):
        if len(units) > 1:
            chosen += rng.sample(units, min(per_description, len(units)))
    singles = sorted(k for d, units in groups.items() if len(units) == 1 for k in units)
    chosen += rng.sample(singles, min(extra_units, len(singles)))
    out: dict[str, list[tuple[UnitKey, Image.Image, int]]] = {}
    for layer, unit in sorted(set(chosen)):
        exemplars = rec.exemplars(layer, unit)
        if not exemplars:
            continue
        masks = rec.masks(layer, unit)
        for ex in exemplars:
            try:
                im = rec.image(ex.image_id)
            except OSError:
                continue
            out.setdefault(normalise(rows[(layer, unit)]), []).append(((layer, unit),
                                                                      im.crop(crop_box(masks[ex.rank])), ex.image_id))
    return out


@torch.no_grad()
def _maxima(module, rec, layers: Sequence[str], images: Sequence[Image.Image], batch: int, device) -> dict:
    """Each unit's spatial-max activation on each image: ``{layer: [n, units]}`` (float64 numpy)."""
    from ..hooks import run, spatial_max, trace, unit_view
    from ..fusion import to_layout
    to_tensor, out = rec.preprocess.to_tensor(), {l: [] for l in layers}
    for s in range(0, len(images), batch):
        x = torch.stack([to_tensor(im) for im in images[s:s + batch]]).to(device)
        with channels_last(module) as nhwc, trace(module, list(layers), stop=True) as tr:  # NHWC: ~1.5x
            run(module, to_layout(x, nhwc))
        for l in layers:
            v = unit_view(tr[l], rec.meta["layers"][l]["prefix_tokens"], rec.layout(l))
            out[l].append(spatial_max(v).double().cpu().numpy())
    return {l: np.concatenate(v) for l, v in out.items()}


def _digest(img: Image.Image) -> str:
    """What identifies an edited image for sharing its forward pass: its size, mode and pixels (memoised)."""
    return pixel_key(img)


def _auc(t: np.ndarray, c: np.ndarray) -> float:
    """P(t > c) + P(t == c) / 2 over all pairs (Mann-Whitney)."""
    gt = (t[:, None] > c[None, :]).mean()
    eq = (t[:, None] == c[None, :]).mean()
    return float(gt + 0.5 * eq)


def measure(base: np.ndarray, treated: np.ndarray, control: np.ndarray, unit: int) -> dict:
    """Effect, AUC and response of column ``unit`` of ``[images, units]`` spatial maxima (see the module
    docstring): effect and AUC on the images where the unit is at most its median on ``base``, the response on
    every image; sd over all of ``base``, floored at 10 % of the median sd of the layer's units."""
    sd = base.std(0, ddof=1)
    s = max(float(sd[unit]), max(1e-6, 0.1 * float(np.median(sd))))
    quiet = base[:, unit] <= np.median(base[:, unit])
    t, c = treated[quiet, unit], control[quiet, unit]
    return {"effect": float((t - c).mean() / s), "auc": _auc(t, c),
            "response": float((treated[:, unit] - base[:, unit]).mean() / s), "n": int(quiet.sum())}


def verify_units(rec, lm, descriptions: Mapping[UnitKey, str], cfg, seed: int, device, batch_size: int = 32,
                 progress: bool = False, null: bool = False) -> dict[UnitKey, dict]:
    """Verify each unit's description by experiment (see the module docstring); ``cfg`` is ``describe.verify``.

    ``null=True`` replaces the treatment by a second, independently seeded control draw: the effects and AUCs
    then come from the null distribution (what the thresholds must reject; ``tools/verify_thresholds.py``).

    Returns ``{(layer, unit): {"kind", "target", "status", "effect", "auc", "response", "n"}}``; ``status`` is
    ``confirmed``, ``not confirmed`` or ``unverifiable`` (no intervention for the words; then ``why``)."""
    from ..datasets.splits import stratified_sample
    labels = [int(y) for y in rec.labels]
    ids = stratified_sample(labels, cfg.images, seed, exclude=rec.skipped_ids, purpose="verify")
    base, kept = [], []
    for i in ids:
        try:
            base.append(rec.image(i).convert("RGB"))
            kept.append(i)
        except OSError:
            continue
    if len(base) < 4:
        raise ValueError(f"describe.verify needs at least 4 readable probe images; got {len(base)}")
    pools = Pools(words=common_words())
    ivs = {k: intervention_for(d, k, Pools(pools.words), cfg.kinds) for k, d in descriptions.items()}
    if "object" in cfg.kinds:
        rest = {k: d for k, d in descriptions.items() if ivs[k] is None}
        pools.crops = _crop_pools(rec, rest, seed) if rest else {}
        pools.own = {k: {ex.image_id for ex in rec.exemplars(*k)} for k in rest}
        ivs.update({k: intervention_for(d, k, pools, ["object"]) for k, d in rest.items()})
    layers = sorted({l for l, _ in descriptions}, key=rec.layers.index)
    x0 = torch.stack([rec.preprocess.to_tensor()(im) for im in base[:2]]).to(device)  # batch norm and pads folded
    module = fold_for_inference(lm.module, x0, keep=layers)[0]  # into the convs: same values, less time (fusion.py)
    with channels_last(module):  # NHWC once for every pass below (~1.5x), not converted batch by batch
        acts0 = _maxima(module, rec, layers, base, batch_size, device)
        by_key: dict[str, list[UnitKey]] = {}
        for k, iv in ivs.items():
            if iv is not None:
                by_key.setdefault(iv.key, []).append(k)
        from tqdm.auto import tqdm

        def run_edit(units: list[UnitKey], iv: Intervention | None = None) -> dict[UnitKey, dict]:
            """``units`` of one key, each by its intervention (or ``iv``); every distinct edited image passed once."""
            ls = sorted({l for l, _ in units}, key=rec.layers.index)
            variants: dict[tuple, list[UnitKey]] = {}
            for k in units:
                variants.setdefault((iv or ivs[k]).variant, []).append(k)
            rows: dict[str, dict] = {}  # an edited image's digest -> its spatial maxima on the layers
            res = {}
            for group in variants.values():
                one = iv or ivs[group[0]]
                treated = [one.control(im, random.Random(_seed(seed, one.key, i, "null"))) if null else
                           one.treat(im, random.Random(_seed(seed, one.key, i))) for im, i in zip(base, kept)]
                control = [one.control(im, random.Random(_seed(seed, one.key, i))) for im, i in zip(base, kept)]
                digests = [_digest(im) for im in treated + control]
                todo = {d: im for d, im in zip(digests, treated + control) if d not in rows}
                if todo:
                    acts = _maxima(module, rec, ls, list(todo.values()), batch_size, device)
                    rows.update({d: {l: acts[l][j] for l in ls} for j, d in enumerate(todo)})
                n = len(treated)
                at = {l: np.stack([rows[d][l] for d in digests[:n]]) for l in ls}
                ac = {l: np.stack([rows[d][l] for d in digests[n:]]) for l in ls}
                for l, u in group:
                    r = measure(acts0[l], at[l], ac[l], u)
                    ok = r["effect"] >= cfg.effect_min and r["auc"] >= cfg.auc_min
                    res[(l, u)] = {"kind": one.kind, "target": one.target,
                                   "status": "confirmed" if ok else "not confirmed", **r}
            return res

        out: dict[UnitKey, dict] = {}
        for key, units in tqdm(sorted(by_key.items()), desc="verify", unit="edit", disable=not progress):
            out.update(run_edit(units))
        # "the word X" not confirmed: the words still say text; tested as text (the word's own figures kept)
        words = [k for k, r in out.items() if r["target"].startswith("the word ") and r["status"] != "confirmed"]
        if words:
            for k, r in run_edit(words, intervention_for("text", ("", -1), pools)).items():
                out[k] = {**r, "word_effect": out[k]["effect"], "word_auc": out[k]["auc"],
                          "word_response": out[k]["response"]}
        for k, iv in ivs.items():
            if iv is None:
                out[k] = {"kind": None, "target": None, "status": "unverifiable", "effect": None, "auc": None,
                          "response": None, "n": 0,
                          "why": "no intervention kind of " + str(list(cfg.kinds)) + " reads these words"
                                 + (" (an object needs another unit with the same description)"
                                    if "object" in cfg.kinds else "")}
        return out
