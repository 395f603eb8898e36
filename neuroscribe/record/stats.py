"""Streaming, mergeable per-unit statistics: running top-k exemplars and activation quantiles.

Both keep O(units x budget) memory whatever the number of images, and both merge exactly across shards
(distributed ranks), so a sharded run writes the same artifacts as a single process.

Top-k order is (score descending, image id ascending): ties go to the lower image id, independent of batch
boundaries and of how images are split between ranks.

The quantile sketch lives in :mod:`.quantile` (re-exported here).

Both fold a batch in unit chunks (``chunk`` units at a time), so the scratch memory of an update is bounded by the
chunk, not by the layer's width; the state may live on another device than the activations (host memory for a
GPU run whose state does not fit), and only the values and maps that enter the state cross over. A per-unit sum
over batches (the mean activation) is kept by :class:`CascadeSum`, whose rounding depends on batch indices only.
"""

from __future__ import annotations

import math

import torch

from ..hooks import spatial_max
from .quantile import QuantileSketch, _chunks, _keep_mask, _prime_at_least  # noqa: F401 (re-exported)


_ID_SPAN = 2 ** 32 - 1  # image ids must stay below this: the id is the low 32 bits of the order key
_NAN = float("nan")


def _order_key(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is (score desc, id asc), as a stable float sort orders scores.

    High 32 bits: the float32 score as a signed integer of the same order (``-0.0`` is made ``+0.0`` and every
    NaN the one positive NaN, so both compare as a float sort compares them: zeros equal, NaN above ``+inf``);
    low 32 bits: ``2**32 - 1 - id`` (an empty slot's id clamps to 0 and loses every tie).
    """
    s = scores.float()
    s = torch.where(s.isnan(), _NAN, s + 0.0)
    bits = s.view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits * 2 ** 32 + (_ID_SPAN - ids.clamp(max=_ID_SPAN))


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int, *extra: torch.Tensor):
    """Keep the best ``k`` columns of ``scores [U, n]`` by (score desc, id asc); gather ``extra [U, n, ...]``."""
    idx = torch.topk(_order_key(scores, ids), min(k, scores.shape[1]), dim=1, sorted=True).indices
    out = [torch.gather(scores, 1, idx), torch.gather(ids, 1, idx)]
    for e in extra:
        shape = idx.shape + (1,) * (e.dim() - 2)
        out.append(torch.gather(e, 1, idx.view(shape).expand(idx.shape + e.shape[2:])))
    return out


_NO_ID = torch.iinfo(torch.int64).max  # id of an empty slot: loses every tie
PREFILTER_MIN_UNITS = 64  # chunks of at least this many units first find the units a batch can change ...
PREFILTER_MAX_SHARE = 0.5  # ... and merge only those when they are at most this share of the chunk,
PREFILTER_MIN_SEEN = 2  # once update() has seen this many times (batch size x k) images (before, most units change)


def _maps_of(a: torch.Tensor, image: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``a[image, unit]`` (``a [B, c, h, w]``): the maps ``[E, h, w]`` of the exemplars that enter."""
    image, unit = image.to(a.device), unit.to(a.device)
    if a.is_contiguous():  # one row gather (much cheaper than two-index advanced indexing)
        return a.view(-1, *a.shape[2:]).index_select(0, image * a.shape[1] + unit)
    return a[image, unit]


class TopK:
    """Running top-k images per unit, with each exemplar's low-resolution activation map.

    ``scores``/``ids`` ``[U, w]`` (rank order) and :attr:`maps` ``[U, w, h, w]`` (float16, rank order) live on
    ``device`` (which may differ from the device the activations come from); ``w = min(k, images seen)``. The
    maps are stored in a slot table: ``slot[u, r]`` is where rank ``r``'s map lies, so a merge writes only the
    maps of exemplars that enter (each into the slot of one it evicts) and never moves kept ones. :meth:`update`
    walks the units in chunks of ``chunk``, so its scratch memory is O(chunk x (B + k)) plus the entering maps.
    """

    def __init__(self, units: int, k: int, map_shape: tuple[int, int], device="cpu"):
        self.k = k
        self.seen = 0  # images folded in by update() (a speed heuristic only: not part of the state)
        self.scores = torch.full((units, 0), -math.inf, device=device)
        self.ids = torch.zeros((units, 0), dtype=torch.long, device=device)
        self.maps = torch.zeros((units, 0, *map_shape), dtype=torch.float16, device=device)

    @property
    def maps(self) -> torch.Tensor:
        """``[U, w, h, w]`` in rank order (gathered from the slot table)."""
        return self.maps_of()

    @maps.setter
    def maps(self, value: torch.Tensor) -> None:
        self._maps = value
        u, w = value.shape[:2]
        self.slot = torch.arange(w, device=value.device).repeat(u, 1)

    def maps_of(self, u0: int = 0, u1: int | None = None) -> torch.Tensor:
        """Maps of units ``u0:u1`` in rank order, ``[u1 - u0, w, h, w]``."""
        u1 = self.slot.shape[0] if u1 is None else u1
        w = self.width
        rows = torch.arange(u0, u1, device=self.slot.device)[:, None] * w + self.slot[u0:u1]
        flat = self._maps.view(-1, *self._maps.shape[2:])
        return flat.index_select(0, rows.flatten()).view(u1 - u0, w, *self._maps.shape[2:])

    @property
    def width(self) -> int:
        return self.scores.shape[1]

    def grow(self, width: int) -> None:
        """Pad every unit to ``width`` slots with empty ones (score -inf, id max): they lose to any image."""
        pad = width - self.width
        if pad <= 0:
            return
        u, dev, w = self.scores.shape[0], self.scores.device, self.width
        self.scores = torch.cat([self.scores, torch.full((u, pad), -math.inf, device=dev)], 1)
        self.ids = torch.cat([self.ids, torch.full((u, pad), _NO_ID, dtype=torch.long, device=dev)], 1)
        self._maps = torch.cat([self._maps, torch.zeros((u, pad, *self._maps.shape[2:]), dtype=self._maps.dtype,
                                                        device=dev)], 1)
        self.slot = torch.cat([self.slot, torch.arange(w, width, device=dev).repeat(u, 1)], 1)

    def update(self, acts: torch.Tensor, ids: torch.Tensor, chunk: int | None = None) -> None:
        """``acts [B, U, H, W]`` for images ``ids [B]`` (each below ``2**32 - 1``); score = spatial max."""
        b, u = acts.shape[:2]
        if b == 0:
            return
        if int(ids.max()) >= _ID_SPAN or int(ids.min()) < 0:
            raise ValueError(f"image ids must lie in [0, {_ID_SPAN}); got {int(ids.min())}..{int(ids.max())}")
        self.grow(min(self.k, self.width + b))
        bid = ids.to(acts.device)
        # a unit changes in about min(1, b k / seen) of the batches: look for the few that do only once that is low
        prefilter = self.seen >= PREFILTER_MIN_SEEN * b * self.k
        for u0, u1 in _chunks(u, chunk):
            a = acts[:, u0:u1]
            score = spatial_max(a).float().T  # [c, B]
            self._merge_chunk(u0, score, bid.expand(u1 - u0, b), lambda eu, ej, a=a: _maps_of(a, ej, eu), prefilter)
        self.seen += b

    def _merge_chunk(self, u0: int, s: torch.Tensor, i: torch.Tensor, fetch, prefilter: bool = True) -> None:
        """Merge candidates ``s, i [c, n]`` into units ``u0:u0+c`` at the current width, in place.

        ``fetch(unit_in_chunk [E], candidate_column [E]) -> maps [E, h, w]`` returns the maps of the candidates that
        enter (on any device); nothing is copied for units whose top-k does not change. The ranks a merge evicts
        are a unit's worst old ones (old ranks are in the same order), so the j-th entering exemplar of a unit
        takes the slot of its j-th evicted rank and every kept exemplar keeps its slot.
        """
        dev, w = self.scores.device, self.width
        c, n = s.shape
        if n == 0 or c == 0 or w == 0:
            return
        u1 = u0 + c
        s, i = s.to(dev), i.to(dev)
        old_s, old_i = self.scores[u0:u1], self.ids[u0:u1]
        local = None  # the chunk's rows that can change (None: all of them)
        if prefilter and c >= PREFILTER_MIN_UNITS:  # a candidate enters iff it beats the unit's worst kept exemplar
            hit = (_order_key(s, i) > _order_key(old_s[:, w - 1:], old_i[:, w - 1:])).any(1)
            n_hit = int(hit.sum())
            if n_hit == 0:
                return
            if n_hit <= c * PREFILTER_MAX_SHARE:  # merge those rows only (in a long pass, most units change rarely)
                local = hit.nonzero().squeeze(1)
                s, i, old_s, old_i = s[local], i[local], old_s[local], old_i[local]
        r = old_s.shape[0]
        ns, ni, org = merge_topk(torch.cat([old_s, s], 1), torch.cat([old_i, i], 1), w,
                                 torch.arange(w + n, device=dev).expand(r, w + n))
        entered = org >= w  # [r, w]
        changed = entered.any(1).nonzero().squeeze(1)
        if changed.numel() == 0:
            return
        if local is None:
            self.scores[u0:u1] = ns
            self.ids[u0:u1] = ni
        else:
            self.scores.index_copy_(0, u0 + local, ns)
            self.ids.index_copy_(0, u0 + local, ni)
        o, ent = org[changed], entered[changed]
        changed = changed if local is None else local[changed]  # rows of the chunk
        rows = u0 + changed
        taken = w - ent.sum(1, keepdim=True) + torch.cumsum(ent, 1) - 1  # old rank whose slot an entrant takes
        slot = torch.gather(self.slot.index_select(0, rows), 1, torch.where(ent, taken, o))
        self.slot.index_copy_(0, rows, slot)
        ec, ej = ent.nonzero(as_tuple=True)
        got = fetch(changed[ec], o[ec, ej] - w)
        flat = self._maps.view(-1, *self._maps.shape[2:])
        flat.index_copy_(0, rows[ec] * w + slot[ec, ej], got.to(device=dev, dtype=self._maps.dtype))

    def add(self, scores: torch.Tensor, ids: torch.Tensor, maps: torch.Tensor, start: int = 0,
            chunk: int | None = None, grow: bool | None = None) -> None:
        """Merge candidate exemplars ``[c, n]`` (+ maps ``[c, n, h, w]``) into units ``start:start+c``.

        With ``grow`` (default: when the candidates cover every unit) the width first grows to
        ``min(k, width + n)``; without, it stays as it is (a chunked merge of shards calls :meth:`grow` once).
        """
        c, n = scores.shape
        if grow if grow is not None else (c == self.scores.shape[0] and start == 0):
            self.grow(min(self.k, self.width + n))
        for u0, u1 in _chunks(c, chunk):
            m = maps[u0:u1]
            self._merge_chunk(start + u0, scores[u0:u1], ids[u0:u1],
                              lambda eu, ec, m=m: m[eu.to(m.device), ec.to(m.device)])

    def merge(self, other: "TopK", chunk: int | None = None) -> None:
        self.add(other.scores, other.ids, other.maps, chunk=chunk)

    def state(self) -> dict[str, torch.Tensor]:
        return {"scores": self.scores, "ids": self.ids, "maps": self.maps}

    def load(self, st: dict[str, torch.Tensor]) -> None:
        dev = self.scores.device
        self.scores, self.ids = st["scores"].to(dev).contiguous(), st["ids"].to(dev).contiguous()
        self.maps = st["maps"].to(dev).contiguous()  # rank order: slot r holds rank r


class CascadeSum:
    """Per-unit float64 sum of one vector per batch, added along a fixed binary tree over *global* batch indices.

    Node ``(level, i)`` holds the sum of leaves ``i*2^level ..`` as ``left + right``; only complete nodes are
    formed while adding, and :meth:`total` combines what is left by the same rule (a missing child is skipped).
    Every rounding is therefore fixed by the batch indices alone: the result is bit-identical whatever the order
    the leaves arrive in and however they are split between shards (and resumed runs). A contiguous range of
    leaves keeps O(log n) nodes.
    """

    def __init__(self, units: int, device="cpu"):
        self.units = units
        self.device = torch.device(device)
        self.nodes: dict[tuple[int, int], torch.Tensor] = {}

    def _overlaps(self, level: int, i: int) -> bool:
        """Does a stored node cover any leaf of node ``(level, i)`` (itself, an ancestor or a descendant)?"""
        top = max((lv for lv, _ in self.nodes), default=-1)
        if any((lv, i >> (lv - level)) in self.nodes for lv in range(level, top + 1)):
            return True
        return any(lv < level and j >> (level - lv) == i for lv, j in self.nodes)

    def add(self, index: int, v: torch.Tensor) -> None:
        v = v.to(self.device, torch.float64)
        level, i = 0, int(index)
        if self._overlaps(0, i):
            raise ValueError(f"batch {index} was added twice")
        while (level, i ^ 1) in self.nodes:
            sib = self.nodes.pop((level, i ^ 1))
            v = sib + v if i & 1 else v + sib
            level, i = level + 1, i >> 1
        self.nodes[(level, i)] = v

    def merge(self, other: "CascadeSum") -> None:
        for key in sorted(other.nodes):
            if self._overlaps(*key):
                raise ValueError(f"the same batches were counted twice (node {key})")
            self.nodes[key] = other.nodes[key].to(self.device)
        merged = True
        while merged:  # join complete sibling pairs, as add() does: same values, fewer nodes
            merged = False
            for lv, i in sorted(self.nodes):
                if i % 2 == 0 and (lv, i + 1) in self.nodes:
                    self.nodes[(lv + 1, i // 2)] = self.nodes.pop((lv, i)) + self.nodes.pop((lv, i + 1))
                    merged = True
                    break

    def total(self) -> torch.Tensor:
        if not self.nodes:
            return torch.zeros(self.units, dtype=torch.float64, device=self.device)
        top = max(lvl + i.bit_length() for lvl, i in self.nodes)  # (top, 0) is above every node

        def value(level: int, i: int):
            if (level, i) in self.nodes:
                return self.nodes[(level, i)]
            if level == 0 or not any(lv < level and (j >> (level - lv)) == i for lv, j in self.nodes):
                return None
            left, right = value(level - 1, 2 * i), value(level - 1, 2 * i + 1)
            if left is None or right is None:
                return left if right is None else right
            return left + right

        return value(top, 0)

    def state(self) -> dict[str, torch.Tensor]:
        keys = sorted(self.nodes)
        vals = (torch.stack([self.nodes[k] for k in keys]) if keys
                else torch.zeros((0, self.units), dtype=torch.float64, device=self.device))
        return {"level": torch.tensor([k[0] for k in keys], dtype=torch.long),
                "index": torch.tensor([k[1] for k in keys], dtype=torch.long), "values": vals}

    def load(self, st: dict[str, torch.Tensor]) -> None:
        vals = st["values"].to(self.device, torch.float64)
        self.nodes = {(int(lv), int(i)): vals[j].clone()
                      for j, (lv, i) in enumerate(zip(st["level"].tolist(), st["index"].tolist()))}
