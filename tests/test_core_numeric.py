"""Exact, fast tests of the numeric core, sized for mutation testing (``make mutation``, benchmarks/mutation.py).

Covers :mod:`neuroscribe.record.stats` (streaming top-k, quantiles, cascade sums), the accuracy / bootstrap
arithmetic of :mod:`neuroscribe.ablate.evaluate` and the derived numbers of :mod:`neuroscribe.report.robustness`.
Every expected value is computed independently (sorted Python lists, numpy's 'linear' quantile, hand arithmetic,
the documented bootstrap draws); tensors are tiny so each test takes milliseconds.
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch

from neuroscribe.ablate.evaluate import _ci, accuracy_report, correct, paired_bootstrap_diff
from neuroscribe.record.stats import CascadeSum, QuantileSketch, TopK, _chunks, _keep_mask, merge_topk
from neuroscribe.report import robustness as rb
from neuroscribe.report import schema

NO_ID = torch.iinfo(torch.int64).max

if os.environ.get("MUTANT_UNDER_TEST"):
    # Under mutmut (benchmarks/mutation.py): a mutant that makes a tensor on torch's default device fails in
    # torch.cat's meta kernel, which imports torch._dynamo (~8 s) on first use. Import it once here, in the process
    # mutmut forks every mutant from, instead of in each forked mutant.
    import torch._dynamo  # noqa: F401


# =============================================================================================== helpers
def ref_topk(acts: torch.Tensor, ids: torch.Tensor, k: int):
    """Exact top-k per unit by (score desc, id asc) from sorted Python lists: (scores, ids, maps) per unit."""
    n, u = acts.shape[:2]
    score = acts.flatten(2).amax(2)
    out = []
    for j in range(u):
        rows = sorted(range(n), key=lambda r: (-float(score[r, j]), int(ids[r])))[:k]
        out.append(([float(score[r, j]) for r in rows], [int(ids[r]) for r in rows],
                    torch.stack([acts[r, j] for r in rows]).half() if rows else None))
    return out


def assert_topk(tk: TopK, acts: torch.Tensor, ids: torch.Tensor, k: int) -> None:
    want = ref_topk(acts, ids, k)
    assert tk.width == min(k, acts.shape[0])
    assert tk.ids.dtype == torch.long and tk.maps.dtype == torch.float16 and tk.scores.dtype == torch.float32
    for j, (s, i, m) in enumerate(want):
        assert tk.scores[j].tolist() == s, j
        assert tk.ids[j].tolist() == i, j
        assert torch.equal(tk.maps[j], m), j


def int_acts(n: int, u: int, h: int = 2, w: int = 3, seed: int = 0, hi: int = 4) -> torch.Tensor:
    """Small integer activations: many tied scores, maps that differ between images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hi, (n, u, h, w), generator=g).float()


def shuffled_ids(n: int, seed: int = 0) -> torch.Tensor:
    """Distinct image ids in a scrambled order (so id order is never batch order)."""
    ids = list(range(3, 3 + 5 * n, 5))
    random.Random(seed).shuffle(ids)
    return torch.tensor(ids)


def spy(monkeypatch, cls, calls: list):
    """Record (u0, units) of every ``cls._merge_chunk`` call."""
    orig = cls._merge_chunk

    def wrapped(self, u0, v, *rest):
        calls.append((u0, v.shape[0]))
        return orig(self, u0, v, *rest)

    monkeypatch.setattr(cls, "_merge_chunk", wrapped)


# =============================================================================================== _chunks
def test_chunks():
    assert list(_chunks(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(_chunks(3, 1)) == [(0, 1), (1, 2), (2, 3)]
    assert list(_chunks(6, 2)) == [(0, 2), (2, 4), (4, 6)]
    assert list(_chunks(5, 9)) == [(0, 5)]
    for off in (None, 0, -1):
        assert list(_chunks(5, off)) == [(0, 5)]
    assert list(_chunks(0, 3)) == []


# =============================================================================================== merge_topk
def test_merge_topk_ties_go_to_the_lower_id_among_many():
    # 60 candidates, three score levels: an unstable sort would scramble the ties (torch does past ~32)
    g = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 3, (2, 60), generator=g).float()
    ids = torch.stack([torch.randperm(60, generator=g) for _ in range(2)]) * 7 + 1
    extra = ids * 10
    maps = torch.arange(2 * 60 * 2 * 3).view(2, 60, 2, 3)
    s, i, e, m = merge_topk(scores, ids, 25, extra, maps)
    for j in range(2):
        order = sorted(range(60), key=lambda c: (-float(scores[j, c]), int(ids[j, c])))[:25]
        assert s[j].tolist() == [float(scores[j, c]) for c in order]
        assert i[j].tolist() == [int(ids[j, c]) for c in order]
        assert e[j].tolist() == [int(ids[j, c]) * 10 for c in order]
        assert torch.equal(m[j], maps[j, order])


def test_merge_topk_small_cases():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, -math.inf]])
    i = torch.tensor([[4, 9, 2, 0], [8, 1, 6, 0]])
    e = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    ss, ii, ee = merge_topk(s, i, 3, e)
    assert ii.tolist() == [[2, 9, 0], [1, 6, 8]] and ee.tolist() == [[12, 11, 13], [21, 22, 20]]
    assert ss.tolist() == [[3, 3, 2], [5, 5, 5]]
    ss, ii = merge_topk(s, i, 9)  # k > n: every column, sorted
    assert ii.tolist() == [[2, 9, 0, 4], [1, 6, 8, 0]]


# =============================================================================================== TopK
def test_topk_starts_empty_and_grows_with_empty_slots():
    tk = TopK(3, 4, (2, 5))
    assert tk.width == 0 and tk.scores.shape == (3, 0) and tk.ids.shape == (3, 0) and tk.maps.shape == (3, 0, 2, 5)
    assert tk.ids.dtype == torch.long and tk.maps.dtype == torch.float16
    tk.grow(1)
    tk.grow(3)
    tk.grow(2)  # never shrinks
    assert tk.width == 3 and tk.maps.shape == (3, 3, 2, 5) and tk.maps.dtype == torch.float16
    assert tk.scores.dtype == torch.float32 and bool((tk.scores == -math.inf).all())
    assert tk.ids.dtype == torch.long and bool((tk.ids == NO_ID).all()) and not tk.maps.any()
    # an image whose activations are all -inf still beats an empty slot (its id is lower)
    acts = torch.full((1, 3, 2, 5), -math.inf)
    acts[0, 1] = 2.0
    tk.update(acts, torch.tensor([7]))
    assert tk.ids[:, 0].tolist() == [7, 7, 7] and tk.ids[:, 1:].eq(NO_ID).all()
    assert tk.scores[:, 0].tolist() == [-math.inf, 2.0, -math.inf]


def test_topk_update_chunked_matches_exact():
    n, u, k = 40, 7, 5
    acts, ids = int_acts(n, u, seed=1), shuffled_ids(n, 1)
    sizes = [1, 2, 1, 9, 3, 1, 12, 4, 7]  # single images, batches below and above k
    tk = TopK(u, k, (2, 3))
    s = 0
    for b in sizes:
        tk.update(acts[s:s + b], ids[s:s + b], chunk=3)  # chunks 0:3, 3:6, 6:7
        s += b
        assert_topk(tk, acts[:s], ids[:s], k)
    assert s == n


def test_topk_update_one_chunk_and_wide_batch():
    n, u, k = 50, 4, 3
    acts, ids = int_acts(n, u, seed=2, hi=3), shuffled_ids(n, 2)
    tk = TopK(u, k, (2, 3))
    tk.update(acts[:0], ids[:0])  # an empty batch changes nothing
    assert tk.width == 0
    tk.update(acts[:45], ids[:45])
    tk.update(acts[45:], ids[45:], chunk=0)
    assert_topk(tk, acts, ids, k)


def test_topk_single_changed_unit():
    tk = TopK(3, 2, (1, 1))
    tk.update(torch.tensor([[[[5.0]], [[5.0]], [[5.0]]]]), torch.tensor([4]))
    tk.update(torch.tensor([[[[1.0]], [[9.0]], [[0.5]]]]), torch.tensor([2]))  # grows: every unit changes
    tk.update(torch.tensor([[[[0.0]], [[7.0]], [[0.0]]]]), torch.tensor([9]))  # only unit 1 changes
    assert tk.ids.tolist() == [[4, 2], [2, 9], [4, 2]]
    assert tk.scores.tolist() == [[5, 1], [9, 7], [5, 0.5]]
    assert tk.maps.flatten(1).tolist() == [[5, 1], [9, 7], [5, 0.5]]
    tk.update(torch.tensor([[[[-1.0]], [[-1.0]], [[-1.0]]]]), torch.tensor([0]))  # enters nowhere
    assert tk.ids.tolist() == [[4, 2], [2, 9], [4, 2]]


def test_topk_last_slot_kept_and_last_unit_changes():
    # unit 1 (the last) keeps its old last slot while a better image enters ahead of it
    tk = TopK(2, 3, (1, 2))
    a = torch.tensor([[[[3.0, 0.0]], [[3.0, 1.0]]], [[[2.0, 0.0]], [[2.0, 1.0]]], [[[1.0, 0.0]], [[1.0, 1.0]]]])
    tk.update(a, torch.tensor([0, 1, 2]))
    tk.update(torch.tensor([[[[0.0, 0.5]], [[2.5, 0.25]]]]), torch.tensor([3]))
    assert tk.ids.tolist() == [[0, 1, 2], [0, 3, 1]]
    assert tk.maps[1].tolist() == [[[3.0, 1.0]], [[2.5, 0.25]], [[2.0, 1.0]]]
    assert tk.maps[0].tolist() == [[[3.0, 0.0]], [[2.0, 0.0]], [[1.0, 0.0]]]


def test_topk_chunks_bound_every_merge(monkeypatch):
    calls: list = []
    spy(monkeypatch, TopK, calls)
    acts, ids = int_acts(6, 5, seed=3), torch.arange(6)
    a, b = TopK(5, 4, (2, 3)), TopK(5, 4, (2, 3))
    a.update(acts[:3], ids[:3], chunk=2)
    assert calls == [(0, 2), (2, 2), (4, 1)]
    b.update(acts[3:], ids[3:], 2)
    calls.clear()
    a.merge(b, chunk=2)
    assert calls == [(0, 2), (2, 2), (4, 1)]
    calls.clear()
    a.merge(b, 3)
    assert calls == [(0, 3), (3, 2)]


@pytest.mark.parametrize("chunk", [None, 2])
def test_topk_merge_of_narrow_shards_is_exact(chunk):
    # both shards hold fewer than k images: the merge must grow the width (to k here) and cover every chunk
    n, u, k = 9, 5, 6
    acts, ids = int_acts(n, u, seed=5), shuffled_ids(n, 5)
    a, b = TopK(u, k, (2, 3)), TopK(u, k, (2, 3))
    a.update(acts[:4], ids[:4])
    b.update(acts[4:], ids[4:], chunk=2)
    assert a.width == 4 and b.width == 5
    c = TopK(u, 20, (2, 3))  # k above everything seen: width = images seen
    c.merge(a)
    c.merge(b, chunk)
    assert_topk(c, acts, ids, 20)
    b.merge(a, chunk)
    assert_topk(b, acts, ids, k)


def test_topk_add_pieces_like_a_rank_merge():
    # merge_ranks: grow once to the summed width, then add unit pieces with start=u0 and grow=False
    n, u, k = 12, 5, 4
    acts, ids = int_acts(n, u, seed=6), shuffled_ids(n, 6)
    main, other = TopK(u, k, (2, 3)), TopK(u, k, (2, 3))
    main.update(acts[:2], ids[:2])
    other.update(acts[2:], ids[2:])
    main.grow(min(k, main.width + other.width))
    for u0, u1 in [(0, 2), (2, 4), (4, 5)]:
        main.add(other.scores[u0:u1], other.ids[u0:u1], other.maps[u0:u1], start=u0, grow=False)
    assert_topk(main, acts, ids, k)


def test_topk_add_default_growth():
    acts, ids = int_acts(7, 3, seed=7), shuffled_ids(7, 7)
    src = TopK(3, 5, (2, 3))
    src.update(acts[2:], ids[2:])  # images 2-6; the tests below hold images 0-1

    def mine():
        tk = TopK(3, 5, (2, 3))
        tk.update(acts[:2], ids[:2])
        return tk

    top2 = ref_topk(acts, ids, 2)
    t = mine()
    t.add(src.scores[1:3, :3], src.ids[1:3, :3], src.maps[1:3, :3], start=1)  # a partial piece: no growth
    assert t.width == 2
    assert t.ids[0].tolist() == ref_topk(acts[:2], ids[:2], 2)[0][1]
    assert [t.ids[j].tolist() for j in (1, 2)] == [top2[1][1], top2[2][1]]
    t = mine()
    t.add(src.scores[:2, :3], src.ids[:2, :3], src.maps[:2, :3])  # a partial piece from unit 0: no growth
    assert t.width == 2 and [t.ids[j].tolist() for j in (0, 1)] == [top2[0][1], top2[1][1]]
    t = mine()
    t.add(src.scores, src.ids, src.maps, start=0, grow=False)  # every unit, told not to grow
    assert t.width == 2 and [t.ids[j].tolist() for j in range(3)] == [top2[j][1] for j in range(3)]
    t = mine()
    t.add(src.scores[1:, :1], src.ids[1:, :1], src.maps[1:, :1], start=1, grow=True)  # a piece, told to grow
    assert t.width == 3
    t = mine()
    t.add(src.scores, src.ids, src.maps)  # every unit from 0: grows
    assert_topk(t, acts, ids, 5)


def test_topk_state_round_trip():
    acts, ids = int_acts(4, 3, seed=8), torch.arange(4)
    tk = TopK(3, 3, (2, 3))
    tk.update(acts, ids)
    st = tk.state()
    assert set(st) == {"scores", "ids", "maps"}
    other = TopK(3, 3, (2, 3))
    other.load({k: v.clone() for k, v in st.items()})
    assert other.width == 3
    for key in st:
        assert torch.equal(other.state()[key], st[key])


# =============================================================================================== hashed sample
def ref_hash(i: int, p: int) -> int:
    """The documented hash of (image id, position), in plain Python integers: a value in [0, 2**32)."""
    x = i * 1_000_003 + p + 0x9E3779B9
    x = ((x ^ (x >> 16)) * 0x45D9F3B) % 2 ** 32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) % 2 ** 32
    return x ^ (x >> 16)


def ref_keep(i: int, p: int, rate: float) -> bool:
    return ref_hash(i, p) < rate * 2 ** 32


def test_keep_mask_is_the_documented_hash():
    ids = torch.tensor([0, 1, 7, 250, 999, 5000])
    for rate in (0.3, 0.7):
        got = _keep_mask(ids, 12, rate)
        assert got.shape == (6, 12) and got.dtype == torch.bool
        assert got.tolist() == [[ref_keep(int(i), p, rate) for p in range(12)] for i in ids]
        assert torch.equal(_keep_mask(ids.int(), 12, rate), got)  # the ids' integer type does not matter
    assert _keep_mask(ids, 12, 1.0).all() and not _keep_mask(ids, 12, 0.0).any()
    # kept iff hash < rate * 2**32, compared exactly: a pair is dropped at rate = h / 2**32 and kept at
    # (h + 1) / 2**32, which pins each probed pair's whole 32-bit hash (the last mixing steps only move low bits,
    # which a threshold test at a round rate almost never sees)
    for i in (0, 3, 77, 4096):
        for p in range(0, 40, 5):
            h = ref_hash(i, p)
            assert not _keep_mask(torch.tensor([i]), p + 1, h / 2 ** 32)[0, p], (i, p)
            assert _keep_mask(torch.tensor([i]), p + 1, (h + 1) / 2 ** 32)[0, p], (i, p)
    frac = float(_keep_mask(torch.arange(200), 200, 0.25).float().mean())
    assert abs(frac - 0.25) < 0.01


# =============================================================================================== QuantileSketch
def test_quantile_needed_values():
    qs = QuantileSketch(1, 0.5, 1, 1, 1e9)
    assert [qs.needed(n) for n in (0, 1, 2, 10, 11)] == [1, 1, 2, 6, 6]
    qs.q = 0.99
    assert qs.needed(1000) == 11  # 1000 - floor(989.01)
    qs.q = 1.0
    assert qs.needed(7) == 1
    qs.q = 0.0
    assert qs.needed(7) == 7


def test_quantile_budget_boundary_and_sample_rate():
    # 3 units, q=0.5 over 20 images x 5 positions = 100 values: m = 100 - floor(0.5 * 99) = 51
    exact = QuantileSketch(3, 0.5, 20, 5, budget_bytes=3 * 51 * 4)
    assert exact.m == 51 and exact.rate == 1.0 and exact.count == 0 and exact.width == 0
    assert exact.top.shape == (3, 0) and exact.rank_error() == 0.0 and exact.q == 0.5 and exact.positions == 5
    s = QuantileSketch(3, 0.5, 20, 5, budget_bytes=3 * 51 * 4 - 1)
    rate = (3 * 51 * 4 - 1) / (3 * 51 * 4) * 0.9
    assert s.rate == pytest.approx(rate, rel=1e-12)
    n = math.ceil(100 * rate * 1.05) + 64  # 159 values planned for the sample: m = 159 - 79 = 80
    assert n == 159 and s.m == 80
    tiny = QuantileSketch(3, 0.9, 20, 6, budget_bytes=1e-12)
    assert tiny.rate == 1e-9


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_quantile_exact_matches_numpy_linear(q):
    n, u, h, w = 13, 5, 2, 3
    acts = int_acts(n, u, h, w, seed=9, hi=6) + torch.rand(n, u, h, w, generator=torch.Generator().manual_seed(9))
    acts[:, 0] = acts[:, 0].round()  # ties
    qs = QuantileSketch(u, q, n, h * w, budget_bytes=1e9)
    s = 0
    for b in (1, 3, 1, 6, 2):
        qs.update(acts[s:s + b], torch.arange(s, s + b), chunk=2)
        s += b
        vals = acts[:s].transpose(0, 1).reshape(u, -1).numpy()
        assert qs.count == s * h * w and qs.width == min(qs.m, s * h * w)
        want = np.quantile(vals, q, axis=1)
        np.testing.assert_allclose(qs.value().numpy(), want, rtol=1e-6, atol=1e-6)
    assert qs.rate == 1.0 and qs.rank_error() == 0.0


def test_quantile_small_cases():
    qs = QuantileSketch(2, 0.25, 4, 1, budget_bytes=1e9)
    v = qs.value()
    assert v.shape == (2,) and bool(v.isnan().all())
    qs.update(torch.zeros(0, 2, 1, 1), torch.zeros(0, dtype=torch.long))
    assert qs.count == 0 and qs.width == 0
    qs.update(torch.tensor([[[[3.0]], [[-2.0]]]]), torch.tensor([0]))  # a single value
    assert qs.count == 1 and qs.value().tolist() == [3.0, -2.0]
    qs.update(torch.tensor([[[[1.0]], [[-2.0]]]]), torch.tensor([1]))  # one value above each floor
    qs.update(torch.tensor([[[[5.0]], [[4.0]]]]), torch.tensor([2]))
    qs.update(torch.tensor([[[[2.0]], [[0.0]]]]), torch.tensor([3]))
    # unit 0: 1 2 3 5 -> q=0.25 at pos 0.75: 1 + 0.75 * (2 - 1); unit 1: -2 -2 0 4 -> -2
    assert qs.value().tolist() == [1.75, -2.0]
    mx = QuantileSketch(2, 1.0, 4, 2, budget_bytes=1e9)  # m = 1: the maximum
    mn = QuantileSketch(2, 0.0, 4, 2, budget_bytes=1e9)  # m = n: the minimum
    a = torch.tensor([[[[1.0, 4.0]], [[0.0, -1.0]]], [[[2.0, 3.0]], [[-5.0, 6.0]]]])
    for sk in (mx, mn):
        sk.update(a[:1], torch.tensor([0]))
        sk.update(a[1:], torch.tensor([1]))
    assert mx.m == 1 and mx.value().tolist() == [4.0, 6.0]
    assert mn.m == 8 and mn.value().tolist() == [1.0, -5.0]


def test_quantile_more_values_than_planned_clamps():
    # planned 2 images x 2 positions at q=0.5: m = 4 - 1 = 3; fed 5 images: the 3rd largest is returned
    qs = QuantileSketch(1, 0.5, 2, 2, budget_bytes=1e9)
    vals = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0, 0.0]).view(5, 1, 1, 2)
    qs.update(vals, torch.arange(5))
    assert qs.m == 3 and qs.count == 10 and qs.top.tolist() == [[9.0, 8.0, 7.0]]
    assert qs.value().tolist() == [7.0]


def test_quantile_width_grows_by_what_came():
    qs = QuantileSketch(2, 0.5, 10, 3, budget_bytes=1e9)  # m = 30 - 14 = 16
    qs.update(int_acts(2, 2, 1, 3, seed=10), torch.arange(2))
    assert qs.width == 6
    qs.update(int_acts(4, 2, 1, 3, seed=11), torch.arange(2, 6))
    assert qs.width == 16 and qs.top.shape == (2, 16)
    qs.grow(10)
    assert qs.width == 16
    qs.grow(17)
    assert qs.width == 17 and qs.top[:, -1].tolist() == [-math.inf, -math.inf]


def test_quantile_chunks_bound_every_merge(monkeypatch):
    calls: list = []
    spy(monkeypatch, QuantileSketch, calls)
    a = QuantileSketch(5, 0.5, 4, 6, budget_bytes=1e9)
    b = QuantileSketch(5, 0.5, 4, 6, budget_bytes=1e9)
    acts = int_acts(4, 5, seed=12)
    a.update(acts[:2], torch.arange(2), chunk=2)
    assert calls == [(0, 2), (2, 2), (4, 1)]
    b.update(acts[2:], torch.arange(2, 4), 2)
    calls.clear()
    a.merge(b, chunk=3)
    assert calls == [(0, 3), (3, 2)]
    calls.clear()
    a.add(b.top, chunk=2)
    assert calls == [(0, 2), (2, 2), (4, 1)]


@pytest.mark.parametrize("chunk", [None, 2])
def test_quantile_merge_of_narrow_shards_is_exact(chunk):
    n, u, h, w, q = 6, 5, 1, 2, 0.2
    acts = int_acts(n, u, h, w, seed=13, hi=9)
    a = QuantileSketch(u, q, n, h * w, budget_bytes=1e9)  # m = 12 - floor(0.2 * 11) = 10
    b = QuantileSketch(u, q, n, h * w, budget_bytes=1e9)
    a.update(acts[:2], torch.arange(2))
    b.update(acts[2:], torch.arange(2, n), chunk=2)
    assert a.width == 4 and b.width == 8
    b.merge(a, chunk)
    assert b.count == 12 and b.width == 10
    want = np.quantile(acts.transpose(0, 1).reshape(u, -1).numpy(), q, axis=1)
    np.testing.assert_allclose(b.value().numpy(), want, rtol=1e-6)


def test_quantile_add_pieces_like_a_rank_merge():
    n, u, h, w, q = 8, 5, 2, 2, 0.7
    acts = int_acts(n, u, h, w, seed=14, hi=20)
    main = QuantileSketch(u, q, n, h * w, budget_bytes=1e9)
    other = QuantileSketch(u, q, n, h * w, budget_bytes=1e9)
    main.update(acts[:1], torch.arange(1))
    other.update(acts[1:], torch.arange(1, n))
    main.grow(min(main.m, main.width + other.width))
    main.count += other.count
    for u0, u1 in [(0, 2), (2, 4), (4, 5)]:
        main.add(other.top[u0:u1], start=u0, grow=False)
    want = np.quantile(acts.transpose(0, 1).reshape(u, -1).numpy(), q, axis=1)
    np.testing.assert_allclose(main.value().numpy(), want, rtol=1e-6)
    fresh = QuantileSketch(u, q, n, h * w, budget_bytes=1e9)
    fresh.add(other.top[1:3], start=1)  # a partial piece: no growth, nothing to merge into
    fresh.add(other.top[:2])  # a partial piece from unit 0: no growth either
    assert fresh.width == 0
    fresh.add(other.top[1:3, :2], start=1, grow=True)
    assert fresh.width == 2 and fresh.top[1:3].tolist() == other.top[1:3, :2].tolist()
    assert fresh.top[0].tolist() == [-math.inf] * 2


def test_quantile_sampled_is_the_exact_quantile_of_the_hashed_sample():
    n, u, h, w, q = 12, 3, 2, 4, 0.8
    acts = int_acts(n, u, h, w, seed=15, hi=50) / 7
    ids = shuffled_ids(n, 15)
    qs = QuantileSketch(u, q, n, h * w, budget_bytes=100)  # exact would need 3 x 20 x 4 B
    assert qs.rate == pytest.approx(100 / 240 * 0.9)
    for s, b in [(0, 5), (5, 1), (6, 6)]:
        qs.update(acts[s:s + b], ids[s:s + b], chunk=2)
    keep = torch.tensor([[ref_keep(int(i), p, qs.rate) for p in range(h * w)] for i in ids])
    sample = acts.flatten(2).transpose(0, 1)[:, keep]  # [u, kept]
    assert qs.count == int(keep.sum()) > 0 and qs.width == min(qs.m, qs.count)
    np.testing.assert_allclose(qs.value().numpy(), np.quantile(sample.numpy(), q, axis=1), rtol=1e-6)
    assert qs.rank_error() == pytest.approx(math.sqrt(math.log(2 / 0.01) / (2 * qs.count)), rel=1e-12)
    assert qs.rank_error(0.1) == pytest.approx(math.sqrt(math.log(20) / (2 * qs.count)), rel=1e-12)
    # sharded by image: the same sample, the same value
    a = QuantileSketch(u, q, n, h * w, budget_bytes=100)
    b = QuantileSketch(u, q, n, h * w, budget_bytes=100)
    a.update(acts[::2], ids[::2])
    b.update(acts[1::2], ids[1::2])
    a.merge(b)
    assert a.count == qs.count and torch.equal(a.value(), qs.value())


def test_quantile_sampled_rank_error_before_any_value_and_an_empty_batch():
    qs = QuantileSketch(2, 0.9, 50, 16, budget_bytes=40)
    assert 0 < qs.rate < 1
    assert qs.rank_error() == pytest.approx(math.sqrt(math.log(200) / 2), rel=1e-12)
    ids = torch.tensor([3])
    while any(ref_keep(int(ids), p, qs.rate) for p in range(2)):  # an image with neither position sampled
        ids += 1
    qs.update(torch.ones(1, 2, 1, 2), ids)
    assert qs.count == 0 and qs.width == 0


def test_quantile_state_round_trip():
    qs = QuantileSketch(2, 0.5, 3, 2, budget_bytes=1e9)
    qs.update(int_acts(3, 2, 1, 2, seed=16), torch.arange(3))
    st = qs.state()
    assert set(st) == {"top", "count"} and st["count"].dtype == torch.long and st["count"].tolist() == [6]
    other = QuantileSketch(2, 0.5, 3, 2, budget_bytes=1e9)
    other.load({k: v.clone() for k, v in st.items()})
    assert other.count == 6 and torch.equal(other.top, qs.top) and torch.equal(other.value(), qs.value())


# =============================================================================================== CascadeSum
def ref_tree(leaves: dict[int, torch.Tensor]) -> torch.Tensor:
    """Sum along the fixed binary tree over leaf indices: node = left + right, a missing child skipped."""
    top = max(leaves).bit_length()

    def node(level, i):
        if level == 0:
            return leaves.get(i)
        left, right = node(level - 1, 2 * i), node(level - 1, 2 * i + 1)
        return right if left is None else left if right is None else left + right

    return node(top, 0)


def rounding_leaves(n: int, u: int = 3) -> dict[int, torch.Tensor]:
    """float32 leaves whose float64 sum depends on the association order: 1e16, 1, -1e16, 1, ... (x [1, 2))."""
    g = torch.Generator().manual_seed(n)
    scale = torch.tensor([1e16, 1.0, -1e16, 1.0], dtype=torch.float64)
    vals = (1 + torch.rand(n, u, generator=g, dtype=torch.float64)) * scale[torch.arange(n) % 4][:, None]
    return {i: vals[i].float() for i in range(n)}


def test_cascade_sum_is_the_fixed_tree_sum_in_any_order_and_split():
    leaves = rounding_leaves(11)
    want = ref_tree({i: v.double() for i, v in leaves.items()})
    seq = sum((v.double() for v in leaves.values()), torch.zeros(3, dtype=torch.float64))
    assert not torch.equal(want, seq)  # the data really depends on the association
    one = CascadeSum(3)
    for i in range(11):
        one.add(i, leaves[i])
    assert one.total().dtype == torch.float64 and torch.equal(one.total(), want)
    rng = random.Random(0)
    for _ in range(3):
        cut = sorted(rng.sample(range(1, 11), 2))
        parts = []
        for part in (range(0, cut[0]), range(cut[0], cut[1]), range(cut[1], 11)):
            s, order = CascadeSum(3), list(part)
            rng.shuffle(order)
            for i in order:
                s.add(i, leaves[i])
            parts.append(s)
        parts[1].merge(parts[2])
        parts[1].merge(parts[0])
        assert torch.equal(parts[1].total(), want)


def test_cascade_sum_sparse_leaves_and_empty():
    empty = CascadeSum(4)
    t = empty.total()
    assert t.dtype == torch.float64 and t.tolist() == [0.0] * 4
    leaves = rounding_leaves(14)
    for pick in ([5], [0, 2], [1, 6, 7, 13], [3, 4, 9, 10, 12], [2, 3, 8]):
        s = CascadeSum(3)
        for i in reversed(pick):
            s.add(i, leaves[i])
        assert torch.equal(s.total(), ref_tree({i: leaves[i].double() for i in pick})), pick


def test_cascade_sum_nodes_and_state():
    s = CascadeSum(2)
    for i in (2, 0, 1, 4):
        s.add(i, torch.tensor([float(i), 1.0]))
    assert sorted(s.nodes) == [(0, 2), (0, 4), (1, 0)]
    s.add(3, torch.tensor([3.0, 1.0]))
    assert sorted(s.nodes) == [(0, 4), (2, 0)]
    st = s.state()
    assert set(st) == {"level", "index", "values"}
    assert st["level"].tolist() == [0, 2] and st["index"].tolist() == [4, 0]
    assert st["level"].dtype == st["index"].dtype == torch.long and st["values"].dtype == torch.float64
    assert st["values"].tolist() == [[4.0, 1.0], [6.0, 4.0]]
    back = CascadeSum(2)
    back.load({"level": st["level"], "index": st["index"], "values": st["values"].float()})
    assert back.nodes.keys() == s.nodes.keys() and torch.equal(back.total(), s.total())
    assert all(v.dtype == torch.float64 for v in back.nodes.values())
    e = CascadeSum(3).state()
    assert e["values"].shape == (0, 3) and e["values"].dtype == torch.float64
    assert e["level"].dtype == e["index"].dtype == torch.long and e["level"].numel() == 0
    z = CascadeSum(3)
    z.load(e)
    assert z.nodes == {}


def test_cascade_sum_merge_joins_complete_siblings():
    parts = [CascadeSum(1) for _ in range(3)]
    for s, leaves in zip(parts, ([0, 1], [2, 3], [4, 5, 6, 7])):
        for i in leaves:
            s.add(i, torch.tensor([float(2 ** i)]))
    a = parts[0]
    a.merge(parts[1])
    assert sorted(a.nodes) == [(2, 0)]
    a.merge(parts[2])
    assert sorted(a.nodes) == [(3, 0)] and a.total().tolist() == [255.0]
    b, c = CascadeSum(1), CascadeSum(1)
    for i in (1, 2):
        b.add(i, torch.tensor([1.0]))
    for i in (0, 3):
        c.add(i, torch.tensor([1.0]))
    b.merge(c)  # (0,1) (0,2) + (0,0) (0,3) -> (1,0) (1,1) -> (2,0)
    assert sorted(b.nodes) == [(2, 0)] and b.total().tolist() == [4.0]


def test_cascade_sum_refuses_double_counting():
    def cs(*leaves):
        s = CascadeSum(1)
        for i in leaves:
            s.add(i, torch.ones(1))
        return s

    with pytest.raises(ValueError, match="batch 3 was added twice"):
        cs(3).add(3, torch.ones(1))
    with pytest.raises(ValueError, match="twice"):
        cs(0, 1).add(1, torch.ones(1))  # under a complete node
    with pytest.raises(ValueError, match="twice"):
        cs(*range(8)).add(5, torch.ones(1))  # under the top node
    for mine, theirs in [((0, 1), (1,)), ((1,), (0, 1)), ((4, 5, 6, 7), (4, 5)), ((6, 7), (4, 5, 6, 7)),
                         ((2, 3), (0, 1, 2, 3)), ((0, 1, 2, 3, 4, 5, 6, 7), (4, 5))]:
        with pytest.raises(ValueError, match="counted twice"):
            cs(*mine).merge(cs(*theirs))
    ok = cs(4)
    ok.merge(cs(0, 1, 2, 3))
    ok.merge(cs(5, 6))
    assert ok.total().tolist() == [7.0]
    add_after = cs(0, 1)
    add_after.merge(cs(2, 3))
    add_after.add(4, torch.ones(1))
    with pytest.raises(ValueError, match="twice"):
        add_after.add(2, torch.ones(1))
    assert add_after.total().tolist() == [5.0]


def test_state_is_made_on_the_requested_device_whatever_the_default():
    """Every state tensor is created on the device asked for, not on torch's default device (here: meta)."""
    acts, ids = int_acts(7, 3, seed=17), shuffled_ids(7, 17)
    ref = TopK(3, 4, (2, 3))
    ref.update(acts, ids)
    with torch.device("meta"):
        tk, other = TopK(3, 4, (2, 3), device="cpu"), TopK(3, 4, (2, 3), device="cpu")
        tk.update(acts[:3], ids[:3], chunk=2)
        other.update(acts[3:], ids[3:])
        tk.merge(other, chunk=2)
        tk.grow(5)
        qs = QuantileSketch(3, 0.5, 7, 6, budget_bytes=1e9, device="cpu")
        qs.update(acts, ids, chunk=2)
        qs.grow(qs.m + 1)
        sampled = QuantileSketch(3, 0.5, 7, 6, budget_bytes=20, device="cpu")
        sampled.update(acts, ids)
        cs, cs2 = CascadeSum(3, device="cpu"), CascadeSum(3, device="cpu")
        zero, none = cs.total(), cs.state()["values"]
        cs.add(0, acts[0, :, 0, 0])
        cs2.add(1, acts[1, :, 0, 0])
        cs.merge(cs2)
    for t in (tk.scores, tk.ids, tk.maps, qs.top, sampled.top, zero, none, *cs.nodes.values()):
        assert t.device.type == "cpu"
    assert torch.equal(tk.ids[:, :4], ref.ids) and bool((tk.ids[:, 4] == NO_ID).all())
    assert sampled.count > 0 and cs.total().tolist() == (acts[0, :, 0, 0] + acts[1, :, 0, 0]).tolist()


# =============================================================================================== evaluate
def test_correct():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert correct(logits, np.array([[1], [1], [1]])).tolist() == [True, False, True]
    assert correct(np.array([0, 2, 1]), [0, 1, 1]).tolist() == [True, False, True]
    assert correct(np.array([[[1]], [[0]]]), [1, 1]).tolist() == [True, False]  # class ids of any shape
    with pytest.raises(ValueError, match="1 of 3 images have no label"):
        correct(np.array([0, 2, 1]), np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        correct(np.zeros(3, int), np.zeros(2, int))


def test_ci_is_the_2_5_and_97_5_percentile():
    x = np.arange(201, dtype=float)
    assert _ci(x) == (5.0, 195.0)
    assert _ci(None) == (None, None)


def _boot(rng, n, acc, b):
    return rng.binomial(n, acc, size=b) / n


def test_accuracy_report_reproduces_the_documented_bootstrap():
    preds = np.array([0, 1, 1, 0, 2, 2, 1, 0, 0, 1])
    labels = np.array([0, 1, 0, 0, 2, 1, 1, 1, 0, 1])  # 7 of 10 right
    groups = ["b", "a", "b", "c", "a", "b", "a", "c", "c", "a"]
    r = accuracy_report(preds, labels, groups, bootstrap=300, seed=5)
    rng = np.random.default_rng(5)
    overall = _boot(rng, 10, 0.7, 300)
    assert r["acc"] == 0.7 and r["n"] == 10 and r["bootstrap"] == 300
    assert (r["ci_low"], r["ci_high"]) == tuple(np.percentile(overall, [2.5, 97.5]))
    # groups in sorted order: a 4/4 right, b 1/3 (ids 0, 2, 5 -> right, wrong, wrong), c 2/3
    want = {"a": (1.0, 4), "b": (1 / 3, 3), "c": (2 / 3, 3)}
    boots = []
    for g in ("a", "b", "c"):
        acc, n = want[g]
        bg = _boot(rng, n, acc, 300)
        boots.append(bg)
        pg = r["per_group"][g]
        assert pg["acc"] == acc and pg["n"] == n
        assert (pg["ci_low"], pg["ci_high"]) == tuple(np.percentile(bg, [2.5, 97.5]))
    assert r["per_group"]["a"]["ci_low"] == 1.0
    wg = r["worst_group"]
    assert wg["group"] == "b" and wg["acc"] == 1 / 3 and wg["n"] == 3
    assert (wg["ci_low"], wg["ci_high"]) == tuple(np.percentile(np.min(np.stack(boots), axis=0), [2.5, 97.5]))
    ag = r["average_group"]  # the unweighted mean of the group accuracies (GroupDRO / DFR), n = all images
    assert ag["acc"] == pytest.approx((1.0 + 1 / 3 + 2 / 3) / 3) and ag["n"] == r["n"]
    assert (ag["ci_low"], ag["ci_high"]) == tuple(np.percentile(np.mean(np.stack(boots), axis=0), [2.5, 97.5]))
    assert set(r) == {"acc", "ci_low", "ci_high", "n", "bootstrap", "per_group", "worst_group", "average_group"}


def test_accuracy_report_defaults_and_edges():
    preds, labels = np.array([1, 1, 0, 1]), np.array([1, 0, 0, 1])
    many = np.arange(997) < 601  # 601 of 997 right: a bootstrap fine enough that the seed shows
    r = accuracy_report(many.astype(int), np.ones(997, int))
    assert r["bootstrap"] == 1000 and r["acc"] == 601 / 997
    want = np.percentile(_boot(np.random.default_rng(0), 997, 601 / 997, 1000), [2.5, 97.5])
    assert (r["ci_low"], r["ci_high"]) == tuple(want)
    assert r["per_group"] == {} and r["worst_group"] is None and r["average_group"] is None
    one = accuracy_report(np.array([[0.2, 0.8]]), np.array([1]), ["g"], bootstrap=10)
    assert one["acc"] == 1.0 and one["ci_low"] == one["ci_high"] == 1.0 and one["per_group"]["g"]["n"] == 1
    none = accuracy_report(preds, labels, ["x", "y", "x", "y"], bootstrap=0)
    assert none["ci_low"] is None and none["ci_high"] is None and none["bootstrap"] == 0
    assert none["per_group"] == {"x": {"acc": 1.0, "ci_low": None, "ci_high": None, "n": 2},
                                 "y": {"acc": 0.5, "ci_low": None, "ci_high": None, "n": 2}}
    assert none["worst_group"] == {"group": "y", "acc": 0.5, "ci_low": None, "ci_high": None, "n": 2}
    assert none["average_group"] == {"acc": 0.75, "ci_low": None, "ci_high": None, "n": 4}
    skew = accuracy_report(np.array([1, 1, 1, 0]), np.array([1, 1, 1, 1]), ["a", "a", "a", "b"], bootstrap=0)
    assert skew["acc"] == 0.75 and skew["average_group"]["acc"] == 0.5  # each group counts once, not each image
    tie = accuracy_report(np.array([1, 1, 0, 0]), labels, ["q", "p", "p", "q"], bootstrap=0)  # both 1/2
    assert tie["worst_group"]["group"] == "p"
    with pytest.raises(ValueError, match="bootstrap must be >= 0"):
        accuracy_report(preds, labels, bootstrap=-1)
    with pytest.raises(ValueError, match="^accuracy of an empty set$"):
        accuracy_report(np.zeros(0, int), np.zeros(0, int))
    with pytest.raises(ValueError, match="3 group names but 4 predictions"):
        accuracy_report(preds, labels, ["a", "b", "c"])


def test_paired_bootstrap_diff_reproduces_the_documented_bootstrap():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], bool)
    b = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 1], bool)
    groups = ["y", "x", "x", "y", "y", "x", "y", "x", "x", "y"]
    r = paired_bootstrap_diff(a[:, None], b, bootstrap=200, seed=3, groups=groups)
    # cells: both right 4 (0, 3, 6, 9), a only 3 (1, 5, 8), b only 1 (4), both wrong 2 (2, 7)
    cells = np.array([4, 3, 1, 2])
    rng = np.random.default_rng(3)
    counts = rng.multinomial(10, cells / 10, size=200)
    boot = (counts[:, 1] - counts[:, 2]) / 10
    assert r["diff"] == 0.2 and r["n"] == 10 and r["n_a_only"] == 3 and r["n_b_only"] == 1
    assert r["acc_a"] == 0.7 and r["acc_b"] == 0.5 and r["bootstrap"] == 200
    assert (r["ci_low"], r["ci_high"]) == tuple(np.percentile(boot, [2.5, 97.5]))
    # groups in sorted order, drawn after the overall replicates: x = 1, 2, 5, 7, 8; y = 0, 3, 4, 6, 9
    for g, gcells, diff in (("x", [0, 3, 0, 2], 0.6), ("y", [4, 0, 1, 0], -0.2)):
        c = np.array(gcells)
        cnt = rng.multinomial(5, c / 5, size=200)
        pg = r["per_group"][g]
        assert pg["diff"] == pytest.approx(diff, abs=1e-15) and pg["n"] == 5
        assert pg["n_a_only"] == gcells[1] and pg["n_b_only"] == gcells[2]
        assert (pg["ci_low"], pg["ci_high"]) == tuple(np.percentile((cnt[:, 1] - cnt[:, 2]) / 5, [2.5, 97.5]))
    assert set(r) == {"diff", "ci_low", "ci_high", "n", "acc_a", "acc_b", "n_a_only", "n_b_only", "bootstrap",
                      "per_group"}


def test_paired_bootstrap_diff_defaults_and_edges():
    a, b = np.array([1, 0, 1, 1]), np.array([0, 0, 1, 1])
    idx = np.arange(997)  # cells: 500 both right, 250 a only, 100 b only, 147 neither
    big_a, big_b = (idx < 750).astype(int), ((idx < 500) | (idx >= 750) & (idx < 850))[:, None]
    r = paired_bootstrap_diff(big_a, big_b)
    cnt = np.random.default_rng(0).multinomial(997, np.array([500, 250, 100, 147]) / 997, size=1000)
    assert r["bootstrap"] == 1000 and r["per_group"] == {} and (r["n_a_only"], r["n_b_only"]) == (250, 100)
    assert (r["ci_low"], r["ci_high"]) == tuple(np.percentile((cnt[:, 1] - cnt[:, 2]) / 997, [2.5, 97.5]))
    one = paired_bootstrap_diff(np.array([0]), np.array([1]), bootstrap=5)
    assert one["diff"] == -1.0 and one["ci_low"] == one["ci_high"] == -1.0 and one["n_b_only"] == 1
    z = paired_bootstrap_diff(a, b, bootstrap=0, groups=["g"] * 4)
    assert z["ci_low"] is None and z["ci_high"] is None and z["per_group"]["g"]["diff"] == 0.25
    with pytest.raises(ValueError, match="bootstrap must be >= 0"):
        paired_bootstrap_diff(a, b, bootstrap=-1)
    with pytest.raises(ValueError, match="^paired comparison of an empty set$"):
        paired_bootstrap_diff(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="same images: 4 vs 3"):
        paired_bootstrap_diff(a, b[:3])
    with pytest.raises(ValueError, match="2 group names but 4 results"):
        paired_bootstrap_diff(a, b, groups=["a", "b"])


# =============================================================================================== report numbers
def _acc(acc, lo=None, hi=None, n=100, **kw):
    return {"acc": acc, "lo": lo, "hi": hi, "n": n, **kw}


def _results(variants: dict, test_sets: dict | None = None) -> dict:
    return {"model": {"spec": "m"}, "job": {"dir": "j"},
            "validation": {"name": "hold", "description": "d", "n": 10},
            "test_sets": test_sets or {"clean": {"description": "c", "n": 100, "in_distribution": True},
                                       "shift": {"description": "s", "n": 100}},
            "ablation": {"method": "zero", "flagged_by": "f", "chosen_n": 1, "selection": "s"},
            "variants": variants}


def test_report_derived_numbers():
    groups = {"g1": {"acc": 0.5, "lo": 0.4, "hi": 0.6, "n": 3}, "g0": {"acc": 0.5, "n": 1}, "a": {"acc": 0.9, "n": 4},
              "g2": {"acc": 0.25, "n": 0}, "g3": {"acc": 0.75, "n": 2}}
    draws = [{"results": {"shift": _acc(x, n=n)}} for x, n in ((0.25, 80), (0.5, 90), (0.75, 70))]
    r = _results({"zz": {"n_units": 2, "label": "Z!", "draws": [{"results": {"clean": _acc(0.5)}}]},
                  "random": {"n_units": 1, "draws": draws + [{"results": {"shift": _acc(1.0)}},
                                                             {"results": {"shift": _acc(0.5)}}]},
                  "base": {"n_units": 0, "results": {"clean": _acc(0.75, 0.7, 0.8), "shift": _acc(0.5, n=60,
                                                                                             groups=groups)}},
                  "two": {"n_units": 1, "draws": draws[:2]},
                  "ablated": {"n_units": 1, "results": {"hold": _acc(0.375), "shift": _acc(
                      0.625, 0.5, 0.75, worst_group={"name": "g9", "acc": 0.125, "n": 5})}}})
    d = rb._derive(rb._validate(r))
    assert d["columns"] == ["hold", "clean", "shift"] and d["in_distribution"] == "clean"
    assert d["variant_order"] == ["base", "ablated", "random", "zz", "two"]
    assert d["labels"] == {"base": "base model", "ablated": "ablated (flagged by descriptions)",
                           "random": "random units (control)", "zz": "Z!", "two": "two"}
    assert set(d) == {"columns", "variant_order", "in_distribution", "cells", "labels"}
    c = d["cells"]
    base = c["base"]
    assert base["hold"] is None and base["clean"]["interval"] == "ci95" and base["shift"]["interval"] == "none"
    assert base["clean"]["delta_vs_base"] == 0.0 and base["clean"]["gap_to_id"] is None
    assert base["shift"]["gap_to_id"] == -0.25 and base["shift"]["n"] == 60
    # groups with n = 0 are dropped; the worst is the lowest accuracy, ties to the first name
    assert set(base["shift"]["groups"]) == {"a", "g0", "g1", "g3"} and base["shift"]["groups"]["g1"]["lo"] == 0.4
    assert base["shift"]["worst_group"] == {"name": "g0", "acc": 0.5, "lo": None, "hi": None, "n": 1}
    assert base["clean"]["groups"] is None and base["clean"]["worst_group"] is None
    ab = c["ablated"]
    assert ab["clean"] is None and ab["hold"]["delta_vs_base"] is None and ab["hold"]["gap_to_id"] is None
    assert ab["shift"]["delta_vs_base"] == 0.125 and ab["shift"]["gap_to_id"] is None  # no clean result
    assert ab["shift"]["worst_group"] == {"name": "g9", "acc": 0.125, "lo": None, "hi": None, "n": 5}
    rnd = c["random"]["shift"]
    assert rnd["acc"] == 0.6 and rnd["lo"] == 0.25 and rnd["hi"] == 1.0 and rnd["n"] == 80 and rnd["draws"] == 5
    assert rnd["interval"] == "range" and rnd["sd"] == pytest.approx(np.std([0.25, 0.5, 0.75, 1.0, 0.5], ddof=1))
    assert rnd["delta_vs_base"] == pytest.approx(0.1) and rnd["groups"] is None and rnd["worst_group"] is None
    assert c["random"]["hold"] is None and c["random"]["clean"] is None
    assert c["two"]["shift"]["sd"] == pytest.approx(np.std([0.25, 0.5], ddof=1)) and c["two"]["shift"]["n"] == 80
    zz = c["zz"]
    assert zz["hold"] is None and zz["shift"] is None and zz["clean"]["sd"] == 0.0 and zz["clean"]["draws"] == 1
    assert zz["clean"]["delta_vs_base"] == -0.25 and zz["clean"]["gap_to_id"] is None
    assert base["clean"]["cell"] == "75.0% [70.0, 80.0]" and rnd["cell"] == "60.0% [25.0, 100.0]†"
    assert base["shift"]["cell"] == "50.0%"


def test_report_derived_without_an_in_distribution_set():
    r = _results({"base": {"n_units": 0, "results": {"a": _acc(0.5), "b": _acc(0.25)}},
                  "zz": {"n_units": 0, "draws": [{"results": {"b": _acc(0.5)}}]}},
                 {"a": {"description": "a", "n": 1}, "b": {"description": "b", "n": 1}})
    d = rb._derive(rb._validate(r))
    assert d["columns"] == ["a", "b"] and d["in_distribution"] is None
    assert d["cells"]["base"]["b"]["gap_to_id"] is None and d["cells"]["base"]["b"]["delta_vs_base"] == 0.0
    assert d["cells"]["zz"]["a"] is None and d["cells"]["zz"]["b"]["delta_vs_base"] == 0.25


def test_report_cell_text():
    assert rb._pct(None) == "—" and rb._pct(0.12345) == "12.3" and rb._pct(1.0) == "100.0"
    assert rb._interval({"lo": None, "hi": None}) == "" and rb._interval({}) == ""
    assert rb._interval({"lo": 0.1, "hi": 0.25}) == " [10.0, 25.0]"
    assert rb._cell(None) == "—"
    assert rb._cell({"acc": 0.5, "lo": 0.25, "hi": 0.75, "interval": "ci95"}) == "50.0% [25.0, 75.0]"
    assert rb._cell({"acc": 0.5, "lo": 0.25, "hi": 0.75, "interval": "range"}) == "50.0% [25.0, 75.0]†"
    assert rb._cell({"acc": 0.5, "lo": None, "hi": None, "interval": "none"}) == "50.0%"


def test_report_fractions():
    assert [schema._frac(v) for v in (0.0, 0.5, 1.0)] == [0.0, 0.5, 1.0]
    for v, hint in ((-0.5, True), (1.5, True), (100.0, True), (100.5, False), (250.0, False)):
        with pytest.raises(ValueError) as e:
            schema._frac(v)
        assert str(e.value) == f"must be a fraction in [0, 1], got {v}" + (" (a percentage?)" if hint else "")
