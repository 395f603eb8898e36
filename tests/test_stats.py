"""Running top-k and quantile estimators against exact numpy on random data (many batches, ties)."""
import math

import numpy as np
import pytest
import torch

from neuroscribe.record.quantile import SAMPLE_MAX_RATE, rank_error_of, sample_size
from neuroscribe.hooks import spatial_max
from neuroscribe.record.stats import QuantileSketch, TopK, merge_topk


def exact_topk(scores: np.ndarray, k: int):
    """scores [N, U] -> ids [U, k] by (score desc, id asc)."""
    n, u = scores.shape
    out = np.zeros((u, min(k, n)), dtype=np.int64)
    for j in range(u):
        order = np.lexsort((np.arange(n), -scores[:, j]))
        out[j] = order[:k]
    return out


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_topk_matches_exact_with_ties(batch):
    g = torch.Generator().manual_seed(batch)
    n, u, k = 300, 9, 15
    acts = torch.randint(0, 6, (n, u, 3, 4), generator=g).float()  # heavy ties on purpose
    tk = TopK(u, k, (3, 4))
    for s in range(0, n, batch):
        tk.update(acts[s:s + batch], torch.arange(s, min(s + batch, n)))
    want = exact_topk(acts.flatten(2).amax(2).numpy(), k)
    ids, maps = tk.ids, tk.maps
    assert np.array_equal(ids.numpy(), want)
    # maps are the unit's own maps on those images
    for j in range(u):
        assert torch.equal(maps[j].float(), acts[ids[j], j].half().float())



@pytest.mark.parametrize("chunk", [None, 70])
def test_topk_of_many_units_merges_only_the_units_a_batch_changes_and_stays_exact(chunk, monkeypatch):
    """Wide chunks first find the units a batch can change (a candidate beating the worst kept exemplar) and merge
    those alone: the same ids, scores and maps as the exact answer, with NaN, -inf and heavy ties, in a shuffled id
    order (ties must still go to the lower id), and as with the prefilter off."""
    from neuroscribe.record import stats
    g = torch.Generator().manual_seed(3)
    n, u, k = 400, 150, 6
    acts = torch.randint(0, 9, (n, u, 2, 3), generator=g).float()
    acts[torch.rand(acts.shape, generator=g) < 0.002] = float("nan")
    acts[:, :5] = -math.inf  # units that never exceed their empty slots' score
    order = torch.randperm(n, generator=g)  # images arrive in no particular id order
    merged_rows = []
    real = stats.merge_topk
    monkeypatch.setattr(stats, "merge_topk", lambda sc, *a: merged_rows.append(sc.shape[0]) or real(sc, *a))
    results = []
    for share in (stats.PREFILTER_MAX_SHARE, -1.0):  # -1: never restrict (every row merged, the plain path)
        monkeypatch.setattr(stats, "PREFILTER_MAX_SHARE", share)
        tk = TopK(u, k, (2, 3))
        for s in range(0, n, 20):
            ids = order[s:s + 20]
            tk.update(acts[ids], ids, chunk)
        results.append((tk.ids.clone(), tk.scores.clone(), tk.maps.clone()))
        if share > 0:
            restricted, merged_rows[:] = list(merged_rows), []
    scores = acts.flatten(2).amax(2).numpy()
    want = np.zeros((u, k), dtype=np.int64)
    key = np.where(np.isnan(scores), np.inf, scores)  # a float sort puts NaN above +inf
    for j in range(u):
        want[j] = np.lexsort((np.arange(n), -key[:, j]))[:k]
    (ids, sc, maps), (ids2, sc2, maps2) = results
    assert np.array_equal(ids.numpy(), want)
    assert torch.equal(ids, ids2) and torch.equal(sc.nan_to_num(9e9), sc2.nan_to_num(9e9))
    assert torch.equal(maps.nan_to_num(9e4), maps2.nan_to_num(9e4))
    for j in range(u):
        assert torch.equal(maps[j].float().nan_to_num(9e4), acts[ids[j], j].half().float().nan_to_num(9e4))
    full = u if chunk is None else chunk
    assert max(restricted) <= full and min(restricted) < full // 2  # later batches merged a few rows only
    sizes = [u] if chunk is None else [70, 70, 10]
    early = stats.PREFILTER_MIN_SEEN * 20 * k // 20  # batches before the prefilter starts: every row merged
    assert restricted[:early * len(sizes)] == sizes * early
    assert restricted[early * len(sizes):] != sizes * (n // 20 - early)


def test_spatial_max_of_a_channels_last_batch_is_amax_by_pooling_and_its_top_k_the_same(monkeypatch):
    """A channels-last batch (the folded record pass's layout) gets its spatial max by max pooling -- the same values
    as ``amax`` (NaN and -inf included), in every dtype the record pass sees -- and the top-k of such a batch is the
    top-k of its NCHW copy; other layouts keep ``amax``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 9, 6, generator=g)
    x[1, 2, 3, 4], x[3, 5] = float("nan"), -math.inf
    nhwc = x.contiguous(memory_format=torch.channels_last)
    pooled = []
    real = torch.nn.functional.max_pool2d
    monkeypatch.setattr(torch.nn.functional, "max_pool2d", lambda a, k: pooled.append(a.shape) or real(a, k))
    for dtype in (torch.float32, torch.float64, torch.float16):
        ref = x.to(dtype).flatten(2).amax(2)
        torch.testing.assert_close(spatial_max(nhwc.to(dtype)), ref, rtol=0, atol=0, equal_nan=True)
    assert len(pooled) == 3
    torch.testing.assert_close(spatial_max(x), x.flatten(2).amax(2), rtol=0, atol=0, equal_nan=True)
    assert len(pooled) == 3  # NCHW: amax, no pooling
    a, b = TopK(7, 3, (9, 6)), TopK(7, 3, (9, 6))
    y = torch.randn(5, 7, 9, 6, generator=g)
    a.update(y.contiguous(memory_format=torch.channels_last), torch.arange(5))
    b.update(y, torch.arange(5))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_topk_merge_of_shards_equals_single_pass():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(200, 5, 2, 2, generator=g).round(decimals=1)
    ids = torch.arange(200)
    full = TopK(5, 10, (2, 2))
    full.update(acts, ids)
    a, b = TopK(5, 10, (2, 2)), TopK(5, 10, (2, 2))
    for s in range(0, 200, 16):  # interleaved shards, as ranks get them
        (a if (s // 16) % 2 == 0 else b).update(acts[s:s + 16], ids[s:s + 16])
    b.merge(a)
    assert torch.equal(b.ids, full.ids) and torch.equal(b.scores, full.scores) and torch.equal(b.maps, full.maps)


def test_merge_topk_gathers_extra():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    i = torch.tensor([[4, 9, 2, 0]])
    e = torch.tensor([[10, 11, 12, 13]])
    ss, ii, ee = merge_topk(s, i, 3, e)
    assert ii.tolist() == [[2, 9, 0]] and ee.tolist() == [[12, 11, 13]] and ss.tolist() == [[3, 3, 2]]


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 0.995])
@pytest.mark.parametrize("batch", [3, 50])
def test_quantile_exact_matches_numpy(q, batch):
    g = torch.Generator().manual_seed(1)
    n, u, h, w = 120, 4, 5, 6
    acts = torch.randn(n, u, h, w, generator=g)
    acts[:, 0] = acts[:, 0].round()  # ties
    qs = QuantileSketch(u, q, n, h * w, budget_bytes=1e9)
    for s in range(0, n, batch):
        qs.update(acts[s:s + batch], torch.arange(s, min(s + batch, n)))
    assert qs.rate == 1.0 and qs.rank_error() == 0.0
    want = np.quantile(acts.transpose(0, 1).reshape(u, -1).numpy(), q, axis=1)
    np.testing.assert_allclose(qs.value().numpy(), want, rtol=0, atol=1e-5)


def test_quantile_sampled_within_documented_bound():
    g = torch.Generator().manual_seed(2)
    n, u, h, w, q = 400, 3, 16, 16, 0.99
    acts = torch.rand(n, u, h, w, generator=g) ** 2
    budget = 4_000  # bytes: below the exact need (3 units x 1,025 values x 4 B = 12.3 kB)
    qs = QuantileSketch(u, q, n, h * w, budget_bytes=budget)
    for s in range(0, n, 32):
        qs.update(acts[s:s + 32], torch.arange(s, min(s + 32, n)))
    assert qs.rate < 1.0 and qs.top.numel() * 4 <= budget * 1.2
    eps = qs.rank_error(0.01)
    assert 0 < eps < 0.05
    flat = acts.transpose(0, 1).reshape(u, -1).numpy()
    lo = np.quantile(flat, max(q - eps, 0), axis=1)
    hi = np.quantile(flat, min(q + eps, 1), axis=1)
    v = qs.value().numpy()
    assert np.all(v >= lo) and np.all(v <= hi), (lo, v, hi)


def test_quantile_sample_is_independent_of_batching_and_sharding():
    g = torch.Generator().manual_seed(3)
    acts = torch.randn(100, 2, 8, 8, generator=g)
    ids = torch.arange(100)
    one = QuantileSketch(2, 0.99, 100, 64, budget_bytes=200)
    one.update(acts, ids)
    a = QuantileSketch(2, 0.99, 100, 64, budget_bytes=200)
    b = QuantileSketch(2, 0.99, 100, 64, budget_bytes=200)
    a.update(acts[::2], ids[::2])
    b.update(acts[1::2], ids[1::2])
    a.merge(b)
    assert one.rate < 1 and a.count == one.count
    assert torch.equal(a.value(), one.value())
    assert not math.isnan(float(one.value()[0]))


# ---------------------------------------------------------------- rank-error target (record.quantile_rank_error)
def _bernstein_by_bisection(q: float, s: int, delta: float = 0.01) -> float:
    """The smallest eps with s eps^2 >= ln(2/delta) (2 v + 2 eps / 3), v the larger of p(1-p) at q -/+ eps."""
    big_l = math.log(2 / delta)

    def holds(eps):
        v = max(p * (1 - p) for p in (min(1, max(0, q - eps)), min(1, max(0, q + eps))))
        return s * eps ** 2 >= big_l * (2 * v + 2 * eps / 3)

    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    return hi


@pytest.mark.parametrize("q,s", [(0.99, 118_814), (0.99, 5_000), (0.9, 40_000), (0.5, 25), (0.995, 1_000_000)])
def test_rank_error_is_the_smaller_of_bernstein_and_dkw(q, s):
    dkw = math.sqrt(math.log(200) / (2 * s))
    want = min(dkw, _bernstein_by_bisection(q, s))
    assert rank_error_of(q, s) == pytest.approx(want, rel=1e-9)
    if q >= 0.99 and s >= 5_000:
        assert rank_error_of(q, s) < dkw / 3  # the tail: Bernstein is much the tighter


@pytest.mark.parametrize("q,eps", [(0.99, 0.001), (0.99, 0.002), (0.95, 0.001), (0.5, 0.01)])
def test_sample_size_is_the_smallest_meeting_the_target(q, eps):
    s = sample_size(q, eps)
    assert rank_error_of(q, s) <= eps < rank_error_of(q, s - 1)


def test_rank_error_target_keeps_a_fixed_sample_whatever_the_images():
    """The sample is sized by the target alone (memory flat in images); small totals stay exact."""
    want = math.ceil(sample_size(0.99, 0.001) * 1.05) + 64
    sketches = {n: QuantileSketch(8, 0.99, n, 12544, budget_bytes=1e12, rank_error=0.001) for n in (1000, 4000)}
    for n, qs in sketches.items():
        assert qs.rate == pytest.approx(want / (n * 12544), rel=1e-12)
    assert sketches[1000].m == sketches[4000].m < 2 * 0.01 * want
    # under SAMPLE_MAX_RATE of the values the sample would not pay: exact
    few = QuantileSketch(8, 0.99, 40, 49, budget_bytes=1e12, rank_error=0.001)
    assert few.rate == 1.0 and few.m == few.needed(40 * 49)
    assert want > SAMPLE_MAX_RATE * 40 * 49
    # the memory budget still caps the sample
    capped = QuantileSketch(8, 0.99, 4000, 12544, budget_bytes=8 * 200 * 4, rank_error=0.001)
    assert capped.rate < sketches[4000].rate and capped.m * 8 * 4 <= 8 * 200 * 4 * 1.2


def test_rank_error_target_is_met_on_a_spatial_trend():
    """Activations rise along the map (a sample that favoured some positions would be off); the sampled
    quantile's true rank lies within the reported bound of q for every unit, and the sample was really drawn."""
    g = torch.Generator().manual_seed(11)
    n, u, h, w, q = 300, 6, 32, 32, 0.99
    trend = torch.linspace(0, 3, h * w).view(1, 1, h, w)
    acts = torch.randn(n, u, h, w, generator=g) + trend * torch.rand(1, u, 1, 1, generator=g)
    qs = QuantileSketch(u, q, n, h * w, budget_bytes=1e12, rank_error=0.002)
    for s in range(0, n, 32):
        qs.update(acts[s:s + 32], torch.arange(s, min(s + 32, n)))
    assert 0 < qs.rate < SAMPLE_MAX_RATE and qs.count < 0.2 * n * h * w
    eps = qs.rank_error()
    assert eps <= 0.002
    flat = acts.transpose(0, 1).reshape(u, -1)
    rank = (flat <= qs.value()[:, None]).double().mean(1)  # the true fraction at or below the estimate
    assert torch.all((rank - q).abs() <= eps), (rank, eps)
    # and the estimate is no exact quantile in disguise: it differs from numpy's on the full data
    assert not np.allclose(qs.value().numpy(), np.quantile(flat.numpy(), q, axis=1), rtol=0, atol=1e-6)
