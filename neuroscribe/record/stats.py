"""Streaming, mergeable per-unit statistics: running top-k exemplars and activation quantiles.

Both keep O(units x budget) memory whatever the number of images, and both merge exactly across shards
(distributed ranks), so a sharded run writes the same artifacts as a single process.

Top-k order is (score descending, image id ascending): ties go to the lower image id, independent of batch
boundaries and of how images are split between ranks.

Quantiles use numpy's default ("linear") definition over all spatial positions of all images. The q-quantile of
n values only depends on the ``m = n - floor(q (n-1))`` largest of them, so the estimator keeps, per unit, the m
largest values seen -- exact. When ``units x m`` values would exceed the memory budget, it instead keeps each
(image, position) with probability ``rate`` (decided by a hash of image id and position, so the sample does not
depend on batching or sharding) and returns the exact quantile of that sample. For a sample of s values the
Dvoretzky-Kiefer-Wolfowitz inequality (which also holds for sampling without replacement) bounds the rank error:
with probability >= 1 - delta, the returned value lies between the true (q - eps)- and (q + eps)-quantiles, with
``eps = sqrt(ln(2/delta) / (2 s))``; :meth:`QuantileSketch.rank_error` reports it for delta = 0.01.

Both fold a batch in unit chunks (``chunk`` units at a time), so the scratch memory of an update is bounded by the
chunk, not by the layer's width; the state may live on another device than the activations (host memory for a
GPU run whose state does not fit), and only the values and maps that enter the state cross over. A per-unit sum
over batches (the mean activation) is kept by :class:`CascadeSum`, whose rounding depends on batch indices only.
"""

from __future__ import annotations

import math

import torch


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int, *extra: torch.Tensor):
    """Keep the best ``k`` columns of ``scores [U, n]`` by (score desc, id asc); gather ``extra [U, n, ...]``."""
    order = torch.argsort(ids, dim=1, stable=True)
    scores = torch.gather(scores, 1, order)
    ids = torch.gather(ids, 1, order)
    order2 = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    idx = torch.gather(order, 1, order2)
    out = [torch.gather(scores, 1, order2), torch.gather(ids, 1, order2)]
    for e in extra:
        shape = idx.shape + (1,) * (e.dim() - 2)
        out.append(torch.gather(e, 1, idx.view(shape).expand(idx.shape + e.shape[2:])))
    return out


_NO_ID = torch.iinfo(torch.int64).max  # id of an empty slot: loses every tie


def _chunks(units: int, chunk: int | None):
    chunk = units if not chunk or chunk <= 0 else chunk
    for u0 in range(0, units, chunk):
        yield u0, min(units, u0 + chunk)


def _fetch_batch(a: torch.Tensor, pos: torch.Tensor, unit: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Maps ``a[pos[unit, col], unit]`` (``a [B, c, H, W]``, ``pos [c, kb]`` batch positions) for entering exemplars."""
    unit, col = unit.to(a.device), col.to(a.device)
    return a[pos[unit, col], unit]


class TopK:
    """Running top-k images per unit, with each exemplar's low-resolution activation map.

    ``scores``/``ids`` ``[U, w]`` and ``maps [U, w, h, w]`` (float16) live on ``device`` (which may differ from
    the device the activations come from); ``w = min(k, images seen)``. :meth:`update` walks the units in chunks
    of ``chunk`` and only copies the maps of exemplars that actually enter the top-k, so its scratch memory is
    O(chunk x (B + k) x h x w) whatever the number of units.
    """

    def __init__(self, units: int, k: int, map_shape: tuple[int, int], device="cpu"):
        self.k = k
        self.scores = torch.full((units, 0), -math.inf, device=device)
        self.ids = torch.zeros((units, 0), dtype=torch.long, device=device)
        self.maps = torch.zeros((units, 0, *map_shape), dtype=torch.float16, device=device)

    @property
    def width(self) -> int:
        return self.scores.shape[1]

    def grow(self, width: int) -> None:
        """Pad every unit to ``width`` slots with empty ones (score -inf, id max): they lose to any image."""
        pad = width - self.width
        if pad <= 0:
            return
        u, dev = self.scores.shape[0], self.scores.device
        self.scores = torch.cat([self.scores, torch.full((u, pad), -math.inf, device=dev)], 1)
        self.ids = torch.cat([self.ids, torch.full((u, pad), _NO_ID, dtype=torch.long, device=dev)], 1)
        self.maps = torch.cat([self.maps, torch.zeros((u, pad, *self.maps.shape[2:]), dtype=self.maps.dtype,
                                                      device=dev)], 1)

    def update(self, acts: torch.Tensor, ids: torch.Tensor, chunk: int | None = None) -> None:
        """``acts [B, U, H, W]`` for images ``ids [B]``; score = spatial max."""
        b, u = acts.shape[:2]
        if b == 0:
            return
        kb = min(self.k, b)  # only the batch's own top-k can enter
        self.grow(min(self.k, self.width + kb))
        bid = ids.to(acts.device)
        for u0, u1 in _chunks(u, chunk):
            a = acts[:, u0:u1]
            score = a.flatten(2).amax(2).float().T  # [c, B]
            c = u1 - u0
            s_b, i_b, pos = merge_topk(score, bid.expand(c, b), kb, torch.arange(b, device=a.device).expand(c, b))
            self._merge_chunk(u0, s_b, i_b, lambda eu, ep, a=a, pos=pos: _fetch_batch(a, pos, eu, ep))

    def _merge_chunk(self, u0: int, s: torch.Tensor, i: torch.Tensor, fetch) -> None:
        """Merge candidates ``s, i [c, n]`` into units ``u0:u0+c`` at the current width, in place.

        ``fetch(unit_in_chunk [E], candidate_column [E]) -> maps [E, h, w]`` returns the maps of the candidates that
        enter (on any device); nothing is copied for units whose top-k does not change.
        """
        dev, w = self.scores.device, self.width
        c, n = s.shape
        if n == 0 or c == 0:
            return
        u1 = u0 + c
        ns, ni, org = merge_topk(torch.cat([self.scores[u0:u1], s.to(dev)], 1),
                                 torch.cat([self.ids[u0:u1], i.to(dev)], 1), w,
                                 torch.arange(w + n, device=dev).expand(c, w + n))
        entered = org >= w  # [c, w]
        changed = entered.any(1).nonzero().squeeze(1)
        if changed.numel() == 0:
            return
        self.scores[u0:u1] = ns
        self.ids[u0:u1] = ni
        o, ent = org[changed], entered[changed]
        rows = u0 + changed
        # new maps of the changed units: kept slots from the old maps (flat row gathers, no index expansion) ...
        flat = self.maps.view(-1, *self.maps.shape[2:])
        new = flat.index_select(0, (rows[:, None] * w + o.clamp(max=w - 1)).flatten())  # [C*w, h, w]
        ec, ej = ent.nonzero(as_tuple=True)
        if ec.numel():  # ... and the entering exemplars' maps from the candidates
            got = fetch(changed[ec], o[ec, ej] - w)
            new.index_copy_(0, ec * w + ej, got.to(device=dev, dtype=self.maps.dtype))
        self.maps.index_copy_(0, rows, new.view(-1, w, *self.maps.shape[2:]))

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
        self.maps = st["maps"].to(dev).contiguous()


def _keep_mask(ids: torch.Tensor, positions: int, rate: float) -> torch.Tensor:
    """Deterministic Bernoulli(rate) per (image id, position), from an integer hash; ``[B, positions]``."""
    p = torch.arange(positions, dtype=torch.int64, device=ids.device)
    x = ids.to(torch.int64)[:, None] * 1_000_003 + p[None, :] + 0x9E3779B9
    x = (x ^ (x >> 16)) * 0x45D9F3B % (1 << 32)
    x = (x ^ (x >> 16)) * 0x45D9F3B % (1 << 32)
    x = x ^ (x >> 16)
    return (x % (1 << 32)).to(torch.float64) < rate * (1 << 32)


class QuantileSketch:
    """Per-unit q-quantile over every spatial activation: exact top-m buffer, or a hashed sample past a budget.

    ``top [U, w]`` (sorted descending, ``w = min(m, values seen)``) lives on ``device``; :meth:`update` walks the
    units in chunks and only moves values above each unit's current m-th largest.
    """

    def __init__(self, units: int, q: float, n_expected: int, positions: int, budget_bytes: float,
                 device="cpu"):
        self.q = q
        self.positions = positions
        self.rate = 1.0
        m = self.needed(n_expected * positions)
        if units * m * 4 > budget_bytes:
            self.rate = max(budget_bytes / (units * m * 4) * 0.9, 1e-9)
            m = self.needed(math.ceil(n_expected * positions * self.rate * 1.05) + 64)
        self.m = m
        self.count = 0  # values seen (after sampling)
        self.top = torch.full((units, 0), -math.inf, device=device)

    def needed(self, n: int) -> int:
        return max(1, n - math.floor(self.q * (n - 1)))

    @property
    def width(self) -> int:
        return self.top.shape[1]

    def grow(self, width: int) -> None:
        """Pad every unit to ``width`` slots of -inf (values that never change a top-m multiset)."""
        pad = width - self.width
        if pad > 0:
            self.top = torch.cat([self.top, torch.full((self.top.shape[0], pad), -math.inf,
                                                       device=self.top.device)], 1)

    def update(self, acts: torch.Tensor, ids: torch.Tensor, chunk: int | None = None) -> None:
        b, u = acts.shape[:2]
        if b == 0:
            return
        keep = None
        if self.rate < 1.0:
            keep = _keep_mask(ids.to(acts.device), acts.shape[2] * acts.shape[3], self.rate)  # [B, P]
            n_new = int(keep.sum())
        else:
            n_new = b * acts.shape[2] * acts.shape[3]
        self.count += n_new
        if n_new == 0:
            return
        self.grow(min(self.m, self.width + n_new))
        for u0, u1 in _chunks(u, chunk):
            v = acts[:, u0:u1].flatten(2).transpose(0, 1)  # [c, B, P] (view)
            v = (v[:, keep] if keep is not None else v.reshape(u1 - u0, -1)).float()
            self._merge_chunk(u0, v)

    def _merge_chunk(self, u0: int, v: torch.Tensor) -> None:
        """Merge values ``v [c, n]`` into units ``u0:u0+c`` at the current width (no growth)."""
        c = v.shape[0]
        w = self.width
        if v.shape[1] == 0 or c == 0 or w == 0:
            return
        top = self.top[u0:u0 + c]
        floor = top[:, -1:].to(v.device)  # only values above the current w-th largest can enter
        n_above = int((v > floor).sum(1).max())
        if n_above == 0:
            return
        if n_above < v.shape[1]:
            v = torch.topk(v, n_above, dim=1, sorted=False).values
        self.top[u0:u0 + c] = torch.topk(torch.cat([top, v.to(top.device)], 1), w, dim=1, sorted=True).values

    def add(self, top: torch.Tensor, start: int = 0, chunk: int | None = None, grow: bool | None = None) -> None:
        """Merge another sketch's ``top [c, n]`` for units ``start:start+c`` (counts are the caller's business).

        With ``grow`` (default: when ``top`` covers every unit) the width first grows to ``min(m, width + n)``.
        """
        c = top.shape[0]
        if grow if grow is not None else (c == self.top.shape[0] and start == 0):
            self.grow(min(self.m, self.width + top.shape[1]))
        for u0, u1 in _chunks(c, chunk):
            self._merge_chunk(start + u0, top[u0:u1])

    def merge(self, other: "QuantileSketch", chunk: int | None = None) -> None:
        self.count += other.count
        self.add(other.top, chunk=chunk)

    def value(self) -> torch.Tensor:
        """The q-quantile per unit (numpy 'linear' definition over the values seen)."""
        n = self.count
        if n == 0:
            return torch.full((self.top.shape[0],), math.nan)
        pos = self.q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        # ascending index j is descending index n-1-j; clamp only matters if more values came than planned
        last = self.top.shape[1] - 1
        v_lo = self.top[:, min(n - 1 - lo, last)]
        v_hi = self.top[:, min(n - 1 - hi, last)]
        return (v_lo + (v_hi - v_lo) * (pos - lo)).cpu()

    def rank_error(self, delta: float = 0.01) -> float:
        """0 when exact; else the DKW bound on |rank error| (as a fraction) holding with prob. 1-delta."""
        if self.rate >= 1.0:
            return 0.0
        return math.sqrt(math.log(2 / delta) / (2 * max(self.count, 1)))

    def state(self) -> dict[str, torch.Tensor]:
        return {"top": self.top, "count": torch.tensor([self.count], dtype=torch.long)}

    def load(self, st: dict[str, torch.Tensor]) -> None:
        self.top, self.count = st["top"].to(self.top.device), int(st["count"][0])


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
