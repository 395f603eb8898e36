"""Describe stage: (job config, recording) -> descriptions for every unit, exports, gallery.

Outputs in the job directory: ``descriptions.csv`` / ``.jsonl`` / ``.parquet``, ``gallery/index.html``,
``describe/<key>/`` (per-unit progress log ``units.jsonl`` and exemplar grids ``views/``) and ``describe.json``
(summary: backend, counts, timings, the final-layer check). Resumable per batch of units: finished units are
appended to ``units.jsonl`` (one fsynced JSON line each) and skipped on rerun; a torn last line is ignored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from .. import io
from ..config import JobConfig
from .describers import Described
from ..heap import reuse_freed_memory
from ..record.exemplars import Recording
from ..runtime import resolve_device, silence_progress

log = logging.getLogger("neuroscribe.describe")
# 2: the tagger contrasts against a fixed ImageNet background (#13); 3: views cut from the source at the view size;
# colour words only where unusual (#18); 4: names of several words read by OCR ("the word french horn"); 5: OCR
# without the angle classifier, lines recognised at their own width; 6: a name of several words as rare as one word
# -- unit logs of older versions are not reused
FORMAT_VERSION = 6


def make_describer(cfg: JobConfig, device: torch.device):
    """One place where ``describe.backend`` becomes a describer object."""
    d = cfg.describe
    if d.backend == "tagger":
        from .offline import TaggerDescriber
        return TaggerDescriber(d, device, seed=cfg.seed)
    if d.backend == "captioner":
        from .captioner import CaptionerDescriber
        c = d.captioner
        from ..text import SentenceEmbedder
        return CaptionerDescriber(c.model, device=str(device), batch_size=c.batch_size,
                                  max_new_tokens=c.max_new_tokens, prompt=c.prompt, seed=cfg.seed,
                                  alpha=d.alpha, dim=d.dim, embedder=SentenceEmbedder(d.embedder))
    from .clip import ClipDissectDescriber
    c = d.clip
    return ClipDissectDescriber(c.spec, vocabulary=str(c.vocabulary) if c.vocabulary else None, lam=c.lam,
                                device=str(device))


def _key(cfg: JobConfig, rec: Recording) -> str:
    d = cfg.describe.model_dump(mode="json", exclude={"gallery", "batch_units", "faithfulness_images", "verify",
                                                         "cache_mb"})
    ident = {"v": FORMAT_VERSION, "record": rec.meta["key"], "describe": d, "seed": cfg.seed}
    return hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=8).hexdigest()


def _read_done(path: Path) -> dict[tuple[str, int], dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from an interrupted run
            done[(row["layer"], int(row["unit"]))] = row
    return done


def _append(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` as JSON lines, first ending a torn last line (an interrupted write) so that it cannot swallow
    the first new row."""
    with open(path, "a+b") as f:  # appends go to the end whatever the position read from
        torn = False
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write(("\n" if torn else "").encode() + "".join(json.dumps(r) + "\n" for r in rows).encode())
        f.flush()
        os.fsync(f.fileno())


@functools.lru_cache(maxsize=None)
def class_terms(name: str) -> tuple[str, ...]:
    """Lower-cased words that count as naming the class ``name`` (the final-layer check and faithfulness):

    * the name itself and its WordNet synonyms (the lemmas of the ImageNet class(es) it names: "chain saw" and
      "chainsaw"; "English springer" and "English springer spaniel");
    * its hyponyms among the 1000 ImageNet classes (:meth:`~neuroscribe.describe.wordnet.ImageNetVocabulary.
      hyponyms`: a unit described "English springer" or "spaniel" names a class called "dog");
    * never its hypernyms: "dog" does not name "English springer", "ball" does not name "golf ball" (a hypernym is
      true of the class's images but does not single the class out).

    :func:`names_any` finds them anywhere in a description, so "the word tench" names "tench": a unit of a model
    trained with class names written on its images that fires on the written name is faithfully described so."""
    from .wordnet import default_vocabulary
    vocab = default_vocabulary()
    return tuple(sorted(vocab.synonyms(name) | vocab.hyponyms(name)))


def names_any(description: str, terms) -> bool:
    """Whether ``description`` contains one of ``terms`` as whole words (case-insensitive, plural "s" allowed)."""
    text = description.lower()
    return any(re.search(rf"\b{re.escape(t.lower())}s?\b", text) for t in terms)


def final_layer_targets(rec: Recording) -> tuple[str, dict[int, str]] | None:
    """The logit layer and, per probe class, its logit unit, if the model has one: matched by name, or by a WordNet
    synonym when the probe and the model spell the class differently ("chainsaw" / "chain saw")."""
    model_names = rec.meta.get("lm_class_names") or []
    probe_names = rec.meta.get("class_names") or []
    if not model_names or not probe_names:
        return None
    layers = [l for l in rec.layers if rec.units(l) == len(model_names) and rec.meta["layers"][l]["kind"] == "flat"]
    if not layers:
        return None
    from .wordnet import default_vocabulary
    vocab = default_vocabulary()
    lower = {n.lower(): i for i, n in enumerate(model_names)}
    units = {}
    for n in probe_names:
        hit = lower.get(n.lower())
        if hit is None:
            hit = min((lower[s] for s in vocab.synonyms(n) if s in lower), default=None)
        if hit is not None and hit not in units:
            units[hit] = n
    return (layers[-1], units) if units else None


def recorded_model(cfg: JobConfig, rec: Recording, device):
    """The model the recording was made with (its spec and arch from meta.json), checked against the recorded
    weights' hash: faithfulness must measure the units that were described, whatever the job's config says now."""
    from ..models import load_model
    info = rec.meta.get("model_info") or {}
    lm = load_model(rec.meta["model"], arch=info.get("arch") or cfg.model.arch,
                    num_classes=cfg.model.num_classes, allow_pickle=cfg.model.allow_pickle, device=device,
                    seed=rec.meta.get("dataset", {}).get("seed", cfg.seed))
    if rec.meta.get("weights") and lm.fingerprint() != rec.meta["weights"]:
        raise ValueError(f"the model {rec.meta['model']!r} no longer has the weights it was recorded with "
                         f"(recording {rec.path}): record again")
    lm.preprocess = rec.preprocess
    return lm


@torch.no_grad()
def faithfulness(cfg: JobConfig, rec: Recording, rows: list[Described]) -> dict[tuple[str, int], dict]:
    """CoSy-style check on real probe images: for units whose description names a probe class, the AUC and
    MAD (mean activation difference in units of the control std) of the unit's spatial-max activation on
    images of that class vs all other labelled images. Every other described unit gets ``{"note": why not}``."""
    from sklearn.metrics import roc_auc_score
    names = rec.meta.get("class_names") or []
    if not names:
        return {(r.layer, r.unit): {"note": "the probe set has no class names"} for r in rows}
    if cfg.describe.faithfulness_images == 0:
        return {(r.layer, r.unit): {"note": "describe.faithfulness_images is 0"} for r in rows}
    terms = {c: class_terms(n) for c, n in enumerate(names)}
    wanted, out = {}, {}
    for r in rows:
        hit = [c for c, t in terms.items() if names_any(r.description, t)]
        if len(hit) == 1:
            wanted[(r.layer, r.unit)] = hit[0]
        else:
            out[(r.layer, r.unit)] = {"note": "the description names no probe class" if not hit else
                                      "the description names several probe classes: " +
                                      ", ".join(names[c] for c in hit)}
    if not wanted:
        return out
    from ..datasets.probe import ImageLoadError
    from ..hooks import run, spatial_max, trace, unit_view
    device = resolve_device(cfg.device)
    lm = recorded_model(cfg, rec, device)
    labelled = [i for i in range(len(rec.labels)) if rec.labels[i] >= 0 and i not in rec.skipped_ids]
    rng = np.random.default_rng(cfg.seed)
    ids = sorted(rng.choice(labelled, min(len(labelled), cfg.describe.faithfulness_images), replace=False).tolist())
    layers = sorted({l for l, _ in wanted})
    transform = rec.preprocess.transform()
    acts = {l: [] for l in layers}
    labels = []
    for s in range(0, len(ids), cfg.batch_size):
        xs, ys = [], []
        for i in ids[s:s + cfg.batch_size]:
            try:
                xs.append(transform(rec.probe_image(i)))
                ys.append(int(rec.labels[i]))
            except ImageLoadError:
                continue
        if not xs:
            continue
        with trace(lm.module, layers, stop=True) as tr:
            run(lm.module, torch.stack(xs).to(device))
        for l in layers:
            acts[l].append(spatial_max(unit_view(tr[l], rec.meta["layers"][l]["prefix_tokens"], rec.layout(l)))
                           .float().cpu())
        labels += ys
    labels = np.array(labels)
    for (l, u), c in wanted.items():
        a = torch.cat(acts[l])[:, u].numpy()
        pos, neg = a[labels == c], a[labels != c]
        if len(pos) == 0 or len(neg) == 0:
            out[(l, u)] = {"concept": names[c], "note": ("no image" if len(pos) == 0 else "only images") +
                           f" of {names[c]!r} among the {len(ids)} sampled probe images"}
            continue
        out[(l, u)] = {"concept": names[c], "auc": float(roc_auc_score(labels == c, a)),
                       "mad": float((pos.mean() - neg.mean()) / (neg.std() + 1e-8)), "n_pos": int(len(pos)),
                       "n_neg": int(len(neg))}
    return out


def verification(cfg: JobConfig, rec: Recording, rows: list[Described], ddir: Path) -> dict[tuple[str, int], dict]:
    """Every described unit's verification by experiment (:mod:`.verify`) on the recording's own model, kept in
    ``<describe dir>/verify.json`` under a key of the descriptions and ``describe.verify`` (reused on rerun)."""
    v = cfg.describe.verify
    if not v.enabled or not rows:
        return {}
    descriptions = {(r.layer, r.unit): r.description for r in rows}
    from .verify import VERIFY_VERSION
    key = io.artifact_key(VERIFY_VERSION, sorted(descriptions.items()), v.model_dump(mode="json"), cfg.seed,
                          rec.meta["key"])
    path = ddir / "verify.json"
    done = io.current(path, key)
    if done is None:
        from .verify import verify_units
        device = resolve_device(cfg.device)
        t0 = time.perf_counter()
        res = verify_units(rec, recorded_model(cfg, rec, device), descriptions, v, cfg.seed, device,
                           cfg.batch_size, progress=cfg.progress)
        done = {"key": key, "seconds": round(time.perf_counter() - t0, 2),
                "units": [dict(layer=l, unit=u, **r) for (l, u), r in res.items()]}
        io.write_json(path, done)
    return {(r["layer"], int(r["unit"])): r for r in done["units"]}


def describe(cfg: JobConfig) -> Path | None:
    """Run the describe stage for the job in ``cfg.out``; returns the path of ``descriptions.csv``.

    Under torchrun (``torchrun --nproc-per-node N -m neuroscribe describe ...``) the remaining units are split in
    contiguous blocks across ranks, each rank logs its own ``units.rank<r>.jsonl``, and rank 0 writes the
    exports and gallery (other ranks return None)."""
    from .. import distributed
    if not cfg.progress:
        silence_progress()  # the embedder's and captioner's loading bars too
    with distributed.session(cfg.device) as ctx, reuse_freed_memory():  # batches reuse freed pages (heap.py)
        return _describe(cfg, ctx)


def _describe(cfg: JobConfig, ctx) -> Path | None:
    from .. import distributed
    from .views import unit_grid, unit_views, view_size
    job = Path(cfg.out)
    rec = Recording.open(job)
    rec.view_size = view_size(rec.preprocess.crop, cfg.describe.view_size)
    rec.cache_bytes = int(cfg.describe.cache_mb * 2**20)  # the image caches' size (views.image_cache)
    layers = cfg.describe.layers or rec.layers
    for l in layers:
        rec.units(l)  # raises naming the recorded layers
    todo = [(l, u) for l in layers for u in range(min(rec.units(l), cfg.describe.units or math.inf))]
    target = final_layer_targets(rec)
    if target:
        todo += [(target[0], u) for u in sorted(target[1]) if (target[0], u) not in set(todo)]
    key = _key(cfg, rec)
    ddir = job / "describe" / key
    ddir.mkdir(parents=True, exist_ok=True)
    done = {}
    for log_file in sorted(ddir.glob("units*.jsonl")):
        done.update(_read_done(log_file))
    # every rank works from rank 0's view of what is left, read before anyone writes
    remaining = distributed.broadcast_object([t for t in todo if t not in done] if ctx.is_main else None)
    remaining = [tuple(t) for t in remaining]
    progress = ddir / ("units.jsonl" if ctx.world == 1 else f"units.rank{ctx.rank}.jsonl")
    mine = distributed.shard_units(remaining)
    t0 = time.perf_counter()
    device = distributed.compute_device(cfg.device, ctx) or resolve_device(cfg.device)
    if mine:
        describer = make_describer(cfg, device)
        describer.prepare(rec)
        from tqdm.auto import tqdm
        bar = tqdm(total=len(mine), unit="unit", desc="describe", dynamic_ncols=True,
                   disable=not cfg.progress or not ctx.is_main)
        bs = cfg.describe.batch_units
        for s in range(0, len(mine), bs):
            chunk = mine[s:s + bs]
            uvs = [unit_views(rec, l, u, dim=cfg.describe.dim) for l, u in chunk]
            rows = []
            for uv, d in zip(uvs, describer.describe(uvs)):
                grid = ddir / "views" / re.sub(r"[^A-Za-z0-9_.-]", "_", uv.layer) / f"{uv.unit:05d}.jpg"
                with io.atomic_path(grid) as tmp:
                    unit_grid(uv).save(tmp, format="JPEG", quality=88)
                rows.append({"layer": d.layer, "unit": d.unit, "description": d.description, "score": d.score,
                             "backend": d.backend, "candidates": d.candidates, "extra": d.extra,
                             "exemplar_ids": uv.image_ids, "grid": str(grid.relative_to(job))})
            _append(progress, rows)
            done.update({(r["layer"], r["unit"]): r for r in rows})
            bar.update(len(chunk))
        bar.close()
    seconds = time.perf_counter() - t0
    if ctx.world > 1:
        distributed.barrier()
        if not ctx.is_main:
            return None
        for log_file in sorted(ddir.glob("units*.jsonl")):
            done.update(_read_done(log_file))
    ordered = [done[t] for t in todo]
    described = [Described(r["layer"], r["unit"], r["description"], r["score"], r["backend"],
                           [tuple(c) for c in r["candidates"]], dict(r["extra"], exemplar_ids=r["exemplar_ids"]))
                 for r in ordered]
    faith = faithfulness(cfg, rec, described)
    verified = verification(cfg, rec, described, ddir)
    views = {(r["layer"], r["unit"]): {"grid": job / r["grid"], "views": []} for r in ordered}
    from .exports import write_descriptions
    paths = write_descriptions(described, rec, job, views, faith, job_dir=job, verification=verified)
    if cfg.describe.gallery:
        from .gallery import write_gallery
        write_gallery(described, job, views, rec=rec, faithfulness=faith, verification=verified)
    summary = {"key": key, "backend": cfg.describe.backend, "units": len(ordered), "layers": layers,
               "seconds_this_run": round(seconds, 2), "units_described_this_run": len(remaining),
               "units_per_second": round(len(remaining) / seconds, 3) if remaining and seconds > 0 else None,
               "faithfulness_units": sum("auc" in f for f in faith.values()),
               "faithfulness_notes": sum("auc" not in f for f in faith.values())}
    if verified:
        status = [r["status"] for r in verified.values()]
        summary["verification"] = {s: status.count(s) for s in ("confirmed", "not confirmed", "unverifiable")}
    if target:
        layer, units = target
        hits = {names: names_any(done[(layer, u)]["description"], class_terms(names)) for u, names in units.items()}
        summary["final_layer_check"] = {
            "layer": layer, "accuracy": sum(hits.values()) / len(hits), "classes": len(hits),
            "per_class": {n: {"unit": u, "description": done[(layer, u)]["description"], "names_class": hits[n]}
                          for u, n in units.items()}}
    io.write_json(job / "describe.json", summary)
    log.info("describe: %d units (%d this run) in %.1fs", len(ordered), len(remaining), seconds)
    return paths["csv"]
