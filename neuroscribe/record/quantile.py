"""The per-unit activation quantile of the record pass (:class:`QuantileSketch`), exact or on a hashed sample.

Quantiles use numpy's default ("linear") definition over all spatial positions of all images. The q-quantile of
n values only depends on the ``m = n - floor(q (n-1))`` largest of them, so the estimator keeps, per unit, the m
largest values seen -- exact, with a buffer that grows with the number of images. A sketch may instead keep each
(image, position) with probability ``rate`` (decided by a hash of image id and position, so the sample does not
depend on batching or sharding) and return the exact quantile of that sample; it does so when a rank-error target
is set (``record.quantile_rank_error``, the default: the sample is then sized to meet it, a fixed size whatever the
number of images, as MILAN's and NetDissect's running quantiles are) and the sample would be under
``SAMPLE_MAX_RATE`` of the values, or when the exact buffer would exceed the memory budget.

The rank error of a sample of s values is bounded by Bernstein's inequality, which is much tighter than the
Dvoretzky-Kiefer-Wolfowitz bound (``sqrt(ln(2/delta) / (2 s))``, used where it is the smaller) in the tails where
mask quantiles sit: at a point x where the true fraction of
values below is F, the sample fraction deviates by eps or more with probability at most ``exp(-s eps^2 / (2 v +
2 eps / 3))``, ``v = F (1 - F)``. It holds for sampling without replacement (Hoeffding 1963, section 6: such sums
are dominated in convex order by sums with replacement), given the sample's size. Applied at the true (q - eps)-
and (q + eps)-quantiles: with probability >= 1 - delta the returned value lies between them, for ``eps`` solving
``s eps^2 = ln(2 / delta) (2 v + 2 eps / 3)`` with v the larger of the two points' variances;
:meth:`QuantileSketch.rank_error` reports it for delta = 0.01 (from the sample actually drawn), and
:func:`sample_size` inverts it.
"""

from __future__ import annotations

import math

import torch

SAMPLE_MAX_RATE = 0.25  # a rank-error target samples only below this share of the values (above it, exact: not
# much slower, at most 4x the sample's memory, and no error)
PENDING_MIN_COLUMNS = 256  # deferred candidates of a unit chunk are merged at max(m // 4, this) columns
DELTA = 0.01  # the confidence of reported rank errors: they hold with probability 1 - DELTA


def _variance(q: float, eps: float) -> float:
    """The larger Bernoulli variance at the two points the quantile claim is made at, q - eps and q + eps."""
    return max(p * (1 - p) for p in (min(1.0, max(0.0, q - eps)), min(1.0, max(0.0, q + eps))))


def rank_error_of(q: float, s: int, delta: float = DELTA) -> float:
    """The bound on the rank error of the q-quantile of a sample of ``s`` values: Bernstein's or, where it is
    smaller (small samples, central q), the Dvoretzky-Kiefer-Wolfowitz one, ``sqrt(ln(2/delta) / (2 s))``."""
    s = max(s, 1)
    big_l = math.log(2 / delta)
    dkw = math.sqrt(big_l / (2 * s))
    eps = dkw
    for _ in range(100):  # Bernstein's as a fixed point: v depends on eps (and moves little with it)
        v = _variance(q, eps)
        new = (2 / 3 * big_l + math.sqrt((2 / 3 * big_l) ** 2 + 8 * s * v * big_l)) / (2 * s)
        if abs(new - eps) < 1e-15:
            break
        eps = new
    return min(dkw, new)


def sample_size(q: float, eps: float, delta: float = DELTA) -> int:
    """A sample size whose :func:`rank_error_of` is at most ``eps`` (the smaller of the two bounds' sizes)."""
    big_l = math.log(2 / delta)
    return math.ceil(min(big_l * (2 * _variance(q, eps) + 2 * eps / 3), big_l / 2) / eps ** 2)


def _chunks(units: int, chunk: int | None):
    chunk = units if not chunk or chunk <= 0 else chunk
    for u0 in range(0, units, chunk):
        yield u0, min(units, u0 + chunk)


def _prime_at_least(n: int) -> int:
    n = max(n, 2)
    while any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def _keep_mask(ids: torch.Tensor, positions: int, rate: float) -> torch.Tensor:
    """Deterministic Bernoulli(rate) per (image id, position), from an integer hash; ``[B, positions]``."""
    p = torch.arange(0x9E3779B9, 0x9E3779B9 + positions, dtype=torch.int64, device=ids.device)
    x = ids.to(torch.int64)[:, None] * 1_000_003 + p[None, :]
    for _ in range(2):  # in place where torch allows (the shifts still make one [B, P] temporary each)
        x ^= x >> 16
        x *= 0x45D9F3B
        x &= 0xFFFFFFFF
    x ^= x >> 16
    # an integer h is below the real rate * 2**32 exactly when it is below its ceiling
    return x < math.ceil(rate * (1 << 32))


class QuantileSketch:
    """Per-unit q-quantile over every spatial activation: exact top-m buffer, or a hashed sample past a budget.

    ``top [U, w]`` (``w = min(m, values seen)``, read sorted descending) lives on ``device``. Between reads the
    buffer is kept unsorted: a batch's values above each unit's smallest kept value are picked out (a sparse
    pass over the activations, no copy of them), and the buffer plus those candidates are cut back to ``w`` by a
    partial selection -- once the buffer is full, for many batches at once (:meth:`_defer`); the sort happens once,
    when :attr:`top` is read (which merges whatever is still pending).
    """

    def __init__(self, units: int, q: float, n_expected: int, positions: int, budget_bytes: float,
                 device="cpu", rank_error: float = 0.0):
        self.q = q
        self.positions = positions
        self.rate = 1.0
        total = n_expected * positions
        m = self.needed(total)
        if rank_error > 0:  # a sample sized to the target (5 % over it: the hashed sample's size varies)
            want = math.ceil(sample_size(q, rank_error) * 1.05) + 64
            if want < SAMPLE_MAX_RATE * total:
                self.rate = want / total
                m = self.needed(math.ceil(total * self.rate * 1.05) + 64)
        if units * m * 4 > budget_bytes:
            self.rate = max(budget_bytes / (units * m * 4) * self.rate * 0.9, 1e-9)
            m = self.needed(math.ceil(total * self.rate * 1.05) + 64)
        self.m = m
        self.count = 0  # values seen (after sampling)
        self._parent = None  # the fused state whose _top this one's is a view of (see LayerState.show)
        self.top = torch.full((units, 0), -math.inf, device=device)

    def needed(self, n: int) -> int:
        return max(1, n - math.floor(self.q * (n - 1)))

    @property
    def top(self) -> torch.Tensor:
        """The kept values, ``[U, w]``, sorted descending."""
        return self._sorted_top()

    @top.setter
    def top(self, value: torch.Tensor) -> None:
        self._top, self._is_sorted, self._pending = value, False, {}

    def flush(self) -> None:
        """Merge the deferred candidates into the buffer (in place: views of it see them)."""
        for u0 in sorted(self._pending):
            self._flush_chunk(u0)

    def _flush_chunk(self, u0: int) -> None:
        cands = self._pending.pop(u0, None)
        if cands:
            self._merge_chunk(u0, torch.cat(cands, 1))

    def _defer(self, u0: int, cand: torch.Tensor) -> None:
        """Keep ``cand`` (values above a full buffer's floor) for a later merge: the O(m) selection of a merge is paid
        once per ~m/4 candidate columns instead of once per batch. The floor stays a lower bound of the true one, so
        later batches pick a superset of what can enter: the merged multiset is the same as merging every batch."""
        cands = self._pending.setdefault(u0, [])
        cands.append(cand)
        if sum(c.shape[1] for c in cands) >= max(self.m // 4, PENDING_MIN_COLUMNS):
            self._flush_chunk(u0)

    def _sorted_top(self) -> torch.Tensor:
        if self._parent is not None:  # a view of a fused state: its values may still wait there, and a merge or sort
            self._parent.flush()  # through that state (or another view) changes its rows without telling it
            self._is_sorted = self._is_sorted and self._parent._is_sorted
        if self._pending:
            self.flush()
        if not self._is_sorted:  # in place: the views of a fused state (or the state a view belongs to) stay current
            self._top.copy_(torch.sort(self._top, dim=1, descending=True).values)
            self._is_sorted = True
        return self._top

    @property
    def width(self) -> int:
        return self._top.shape[1]

    def grow(self, width: int) -> None:
        """Pad every unit to ``width`` slots of -inf (values that never change a top-m multiset)."""
        pad = width - self.width
        if pad > 0:
            self._top = torch.cat([self._top, torch.full((self._top.shape[0], pad), -math.inf,
                                                         device=self._top.device)], 1)

    def update(self, acts: torch.Tensor, ids: torch.Tensor, chunk: int | None = None) -> None:
        b, u = acts.shape[:2]
        if b == 0:
            return
        img = pos = None
        if self.rate < 1.0:
            keep = _keep_mask(ids.to(acts.device), acts.shape[2] * acts.shape[3], self.rate)  # [B, P]
            img, pos = keep.nonzero(as_tuple=True)  # the sampled (image, position) pairs, shared by all units
            n_new = img.shape[0]
        else:
            n_new = b * acts.shape[2] * acts.shape[3]
        self.count += n_new
        if n_new == 0:
            return
        self.grow(min(self.m, self.width + n_new))
        for u0, u1 in _chunks(u, chunk):
            a = acts[:, u0:u1].flatten(2)  # [B, c, P] (view)
            if img is not None:  # gather the sample only: [c, n_new]
                self._merge_chunk(u0, a[img, :, pos].T.float())
                continue
            if self._sparse(u0, a):
                continue
            self._merge_chunk(u0, a.transpose(0, 1).reshape(u1 - u0, -1).float())

    def _sparse(self, u0: int, a: torch.Tensor) -> bool:
        """Merge ``a [B, c, P]`` by picking out only the values above a floor per unit, without copying ``a``.

        The floor is the unit's smallest kept value; while the buffers are still empty it is a pilot floor read
        off a strided subsample of the batch (:meth:`_pilot_floor`), and is used only if at least ``w`` values lie
        at or above it for every unit (then the batch's ``w`` largest all do). Returns False, doing nothing, when no
        floor applies (a buffer partly filled, a NaN, fewer than ``w`` values at or above the pilot): the dense
        merge follows.
        A NaN activation is a candidate (``~(x <= floor)``), as it is for the dense merge.
        """
        b, c, p = a.shape
        top = self._top[u0:u0 + c]
        floor = top.amin(1).to(a.device)
        pilot = not bool((floor > -math.inf).all())
        if pilot:
            floor = self._pilot_floor(a, top)
            if floor is None:
                return False
        a = a.reshape(b, c * p)  # a view unless the chunk is a slice of the units or a channels-last layer
        # above the floor (a kept value: ties change nothing); at or above a pilot floor (it need not be kept)
        pick = (torch.lt if pilot else torch.le)(a, floor.repeat_interleave(p)).logical_not_()
        flat = pick.view(-1).nonzero().squeeze(1)  # in (image, unit, position) order
        n = flat.shape[0]
        if n == 0:
            return not pilot
        vals = torch.take(a, flat).float()
        row = torch.div(flat, p, rounding_mode="floor")  # image * c + unit: non-decreasing
        per_row = torch.bincount(row, minlength=b * c)
        grid = per_row.view(b, c)
        # slot of each value in its unit's row: values of earlier images of that unit + its place in its own row
        before = (torch.cumsum(grid, 0) - grid).view(-1) - (torch.cumsum(per_row, 0) - per_row)
        col = torch.arange(n, device=a.device) + torch.index_select(before, 0, row)
        count = grid.sum(0)
        if pilot and int(count.min()) < self.width:
            return False
        cand = torch.full((c, int(count.max())), -math.inf, device=a.device)
        cand.view(-1).index_put_((torch.remainder(row, c) * cand.shape[1] + col,), vals)
        if pilot or top.device != cand.device or bool(vals.isnan().any()):
            # a NaN candidate is merged batch by batch, as the dense merge does (a NaN ranks above every value in the
            # selection, so which values it displaces depends on what it is merged with): what waits goes first
            self._flush_chunk(u0)
            self._merge_chunk(u0, cand)
        else:  # a full buffer (width m, never grows again): merged later, in one selection for many batches
            self._defer(u0, cand)
        return True

    def _pilot_floor(self, a: torch.Tensor, top: torch.Tensor) -> torch.Tensor | None:
        """A floor per unit with about ``1.25 w`` of the batch's values above it, for buffers that are all empty.

        Read off every s-th position of each image (``s`` the first prime >= ``w // 64``: a prime stride does not
        alias with the map's rows, so the subsample visits every column) as the value with
        ``1.25 e + 3 sqrt(e) + 1`` subsample values above it, ``e`` being how many of the batch's ``w`` largest the
        subsample should hold. None when it
        would not pay (``w < 256``, ``w`` above a quarter of the batch, a buffer not empty) or the subsample holds
        a NaN.
        """
        b, c, p = a.shape
        w = self.width
        if w < 256 or 4 * w > b * p or bool((top.amax(1) > -math.inf).any()):
            return None
        sub = a[:, :, ::min(p, _prime_at_least(w // 64))].transpose(0, 1).reshape(c, -1).float()
        e = w * sub.shape[1] / (b * p)
        r = int(1.25 * e + 3 * math.sqrt(e)) + 1
        if r >= sub.shape[1]:
            return None
        floor = torch.kthvalue(sub, sub.shape[1] - r + 1, dim=1).values  # the r-th largest
        return None if bool(floor.isnan().any()) else floor

    def _merge_chunk(self, u0: int, v: torch.Tensor) -> None:
        """Merge values ``v [c, n]`` into units ``u0:u0+c`` at the current width (no growth)."""
        c = v.shape[0]
        w = self.width
        if v.shape[1] == 0 or c == 0 or w == 0:
            return
        top = self._top[u0:u0 + c]
        floor = top.amin(1, keepdim=True).to(v.device)  # only values above the current w-th largest can enter
        n_above = int((v > floor).sum(1, dtype=torch.int32).max())
        if n_above == 0:
            return
        if n_above < v.shape[1]:
            v = torch.topk(v, n_above, dim=1, sorted=False).values
        self._top[u0:u0 + c] = torch.topk(torch.cat([top, v.to(top.device)], 1), w, dim=1, sorted=False).values
        self._is_sorted = False

    def add(self, top: torch.Tensor, start: int = 0, chunk: int | None = None, grow: bool | None = None) -> None:
        """Merge another sketch's ``top [c, n]`` for units ``start:start+c`` (counts are the caller's business).

        With ``grow`` (default: when ``top`` covers every unit) the width first grows to ``min(m, width + n)``.
        """
        c = top.shape[0]
        if grow if grow is not None else (c == self._top.shape[0] and start == 0):
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
            return torch.full((self._top.shape[0],), math.nan)
        pos = self.q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        # ascending index j is descending index n-1-j; clamp only matters if more values came than planned
        top = self.top  # read once: a fused layer's view sorts again on every read
        last = top.shape[1] - 1
        v_lo = top[:, min(n - 1 - lo, last)]
        v_hi = top[:, min(n - 1 - hi, last)]
        return (v_lo + (v_hi - v_lo) * (pos - lo)).cpu()

    def rank_error(self, delta: float = DELTA) -> float:
        """0 when exact; else the Bernstein bound on |rank error| (a fraction) holding with prob. 1 - delta."""
        if self.rate >= 1.0:
            return 0.0
        return rank_error_of(self.q, self.count, delta)

    def state(self) -> dict[str, torch.Tensor]:
        return {"top": self.top, "count": torch.tensor([self.count], dtype=torch.long)}

    def load(self, st: dict[str, torch.Tensor]) -> None:
        self.top, self.count = st["top"].to(self._top.device), int(st["count"][0])
