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


class TopK:
    """Running top-k images per unit, with each exemplar's low-resolution activation map."""

    def __init__(self, units: int, k: int, map_shape: tuple[int, int], device="cpu"):
        self.k = k
        self.scores = torch.full((units, 0), -math.inf, device=device)
        self.ids = torch.zeros((units, 0), dtype=torch.long, device=device)
        self.maps = torch.zeros((units, 0, *map_shape), dtype=torch.float16, device=device)

    def update(self, acts: torch.Tensor, ids: torch.Tensor) -> None:
        """``acts [B, U, H, W]`` for images ``ids [B]``; score = spatial max."""
        b, u = acts.shape[:2]
        if b == 0:
            return
        score = acts.flatten(2).amax(2).float().T  # [U, B]
        # only the batch's own top-k can enter; select before touching the maps
        kb = min(self.k, b)
        bid = ids.to(score.device).expand(u, b)
        s_b, i_b, pos = merge_topk(score, bid, kb, torch.arange(b, device=score.device).expand(u, b))
        maps_b = acts.to(torch.float16).transpose(0, 1)  # [U, B, H, W] (view)
        sel = torch.gather(maps_b, 1, pos[:, :, None, None].expand(-1, -1, *maps_b.shape[2:]))
        self.add(s_b, i_b, sel)

    def add(self, scores: torch.Tensor, ids: torch.Tensor, maps: torch.Tensor) -> None:
        self.scores, self.ids, self.maps = merge_topk(torch.cat([self.scores, scores], 1),
                                                      torch.cat([self.ids, ids], 1), self.k,
                                                      torch.cat([self.maps, maps], 1))

    def merge(self, other: "TopK") -> None:
        self.add(other.scores, other.ids, other.maps)

    def state(self) -> dict[str, torch.Tensor]:
        return {"scores": self.scores, "ids": self.ids, "maps": self.maps}

    def load(self, st: dict[str, torch.Tensor]) -> None:
        self.scores, self.ids, self.maps = st["scores"], st["ids"], st["maps"]


def _keep_mask(ids: torch.Tensor, positions: int, rate: float) -> torch.Tensor:
    """Deterministic Bernoulli(rate) per (image id, position), from an integer hash; ``[B, positions]``."""
    p = torch.arange(positions, dtype=torch.int64, device=ids.device)
    x = ids.to(torch.int64)[:, None] * 1_000_003 + p[None, :] + 0x9E3779B9
    x = (x ^ (x >> 16)) * 0x45D9F3B % (1 << 32)
    x = (x ^ (x >> 16)) * 0x45D9F3B % (1 << 32)
    x = x ^ (x >> 16)
    return (x % (1 << 32)).to(torch.float64) < rate * (1 << 32)


class QuantileSketch:
    """Per-unit q-quantile over every spatial activation: exact top-m buffer, or a hashed sample past a budget."""

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

    def update(self, acts: torch.Tensor, ids: torch.Tensor) -> None:
        b, u = acts.shape[:2]
        v = acts.reshape(b, u, -1).float()
        if self.rate < 1.0:
            keep = _keep_mask(ids.to(v.device), v.shape[2], self.rate)  # [B, P]
            v = v.transpose(0, 1)[:, keep]  # [U, kept]
        else:
            v = v.transpose(0, 1).reshape(u, -1)
        self.count += v.shape[1]
        if v.shape[1] == 0:
            return
        if self.top.shape[1] >= self.m:  # cheap filter: only values above the current m-th largest can enter
            floor = self.top[:, -1:]
            n_above = int((v > floor).sum(1).max())
            if n_above == 0:
                return
            v = torch.topk(v, min(n_above, v.shape[1]), dim=1, sorted=False).values
        elif v.shape[1] > self.m:
            v = torch.topk(v, self.m, dim=1, sorted=False).values
        self.top = torch.sort(torch.cat([self.top, v], 1), dim=1, descending=True).values[:, : self.m]

    def merge(self, other: "QuantileSketch") -> None:
        self.count += other.count
        self.top = torch.sort(torch.cat([self.top, other.top], 1), dim=1, descending=True).values[:, : self.m]

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
        self.top, self.count = st["top"], int(st["count"][0])
