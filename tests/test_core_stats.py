"""The record pass's fast paths give exactly what the plain ones give.

- QuantileSketch: the sparse merge (only values above each unit's floor are picked out), the pilot floor of the first
  batch and its fall-back, against the dense merge alone (``_sparse`` switched off), bit for bit, on continuous,
  tied, NaN-holding and stride-aliased activations; the unsorted buffer reads sorted; merges deferred over
  many batches give the same buffer at every read.
- TopK's slot table: kept exemplars never move, every row of slots is a permutation, maps come back in rank order.
(The recorder's folding of same-shape layers into one state: tests/test_record_fused.py.)
"""
import math

import numpy as np
import pytest
import torch

from neuroscribe.record.stats import QuantileSketch, TopK, _prime_at_least


def _feed(qs: QuantileSketch, acts: torch.Tensor, batch: int, chunk=None) -> None:
    for s in range(0, len(acts), batch):
        qs.update(acts[s:s + batch], torch.arange(s, min(len(acts), s + batch)), chunk)


def _dense_only(monkeypatch):
    monkeypatch.setattr(QuantileSketch, "_sparse", lambda self, u0, a: False)


def _paths(monkeypatch) -> dict:
    """Count which way each chunk was merged: sparse above a kept floor, sparse above a pilot, or dense."""
    seen = {"sparse": 0, "pilot": 0, "pilot_refused": 0}
    pilot_fn, sparse_fn = QuantileSketch._pilot_floor, QuantileSketch._sparse

    def pilot(self, a, top):
        out = pilot_fn(self, a, top)
        seen["pilot" if out is not None else "pilot_refused"] += 1
        return out

    def sparse(self, u0, a):
        done = sparse_fn(self, u0, a)
        seen["sparse"] += done
        return done

    monkeypatch.setattr(QuantileSketch, "_pilot_floor", pilot)
    monkeypatch.setattr(QuantileSketch, "_sparse", sparse)
    return seen


def _acts(kind: str, n=60, u=3, h=20, w=20) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if kind == "continuous":
        return torch.randn(n, u, h, w, generator=g).relu() * torch.rand(n, u, 1, 1, generator=g)
    if kind == "ties":  # few distinct values: floors fall on ties
        return torch.randint(0, 5, (n, u, h, w), generator=g).float()
    if kind == "nan":
        a = torch.randn(n, u, h, w, generator=g)
        a[7, 1, 3, 4] = a[30, 2, 0, 0] = a[55, 0, 19, 19] = math.nan
        a[40, 1, 5, 5] = -math.nan  # a NaN with the sign bit set
        return a
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["continuous", "ties", "nan"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_sparse_and_pilot_merges_equal_the_dense_merge(monkeypatch, kind, chunk):
    acts = _acts(kind)
    # 60 images x 400 positions at q=0.99: m = 241 values; batches of 20 give 8,000 values each
    with monkeypatch.context() as mp:
        _dense_only(mp)
        ref = QuantileSketch(3, 0.99, 60, 400, budget_bytes=1e9)
        _feed(ref, acts, 20, chunk)
    qs = QuantileSketch(3, 0.99, 60, 400, budget_bytes=1e9)
    seen = _paths(monkeypatch)
    _feed(qs, acts, 20, chunk)
    assert qs.m == ref.m == 241 and qs.count == ref.count == 60 * 400
    torch.testing.assert_close(qs.top, ref.top, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(qs.value(), ref.value(), rtol=0, atol=0, equal_nan=True)
    vals = acts.transpose(0, 1).reshape(3, -1).numpy()
    if kind != "nan":
        np.testing.assert_array_equal(qs.value().numpy(), np.quantile(vals, 0.99, axis=1).astype(np.float32))
    chunks = 1 if chunk is None else 2
    assert seen["pilot"] == 0  # w = 241 < 256: the first batch goes dense
    if kind != "nan":
        assert seen["pilot_refused"] == chunks and seen["sparse"] == 2 * chunks  # later batches: sparse
    else:  # a NaN kept in a unit's buffer (NaN ranks above +inf) sends its chunk to the dense merge from then on
        assert seen["sparse"] < 2 * chunks


def test_pilot_floor_first_batch_and_its_fall_back(monkeypatch):
    # 40 images x 1,600 positions at q=0.99: m = 641 >= 256 and 4 m <= one batch of 20 (32,000 values)
    g = torch.Generator().manual_seed(1)
    smooth = torch.randn(40, 2, 40, 40, generator=g)
    s = _prime_at_least(641 // 64)
    assert s == 11
    aliased = smooth.clone()  # unit 1: large values only on the positions the pilot's stride visits
    aliased[:, 1] = 0.0
    aliased.view(40, 2, -1)[:, 1, ::s] = 1.0 + torch.rand(40, math.ceil(1600 / s), generator=g)
    for acts, want_pilot in ((smooth, True), (aliased, False)):
        with monkeypatch.context() as mp:
            _dense_only(mp)
            ref = QuantileSketch(2, 0.99, 40, 1600, budget_bytes=1e9)
            _feed(ref, acts, 20)
        with monkeypatch.context() as mp:
            seen = _paths(mp)
            qs = QuantileSketch(2, 0.99, 40, 1600, budget_bytes=1e9)
            qs.update(acts[:20], torch.arange(20))
            first = dict(seen)
            qs.update(acts[20:], torch.arange(20, 40))
        assert qs.m == 641
        # the pilot floor is always computed; on aliased data too few values reach it and the dense merge runs
        assert first["pilot"] == 1 and first["sparse"] == int(want_pilot)
        torch.testing.assert_close(qs.top, ref.top, rtol=0, atol=0)
        want = np.quantile(acts.transpose(0, 1).reshape(2, -1).numpy(), 0.99, axis=1)
        np.testing.assert_allclose(qs.value().numpy(), want, rtol=1e-6)


def test_pilot_is_refused_when_it_cannot_pay():
    qs = QuantileSketch(2, 0.99, 40, 1600, budget_bytes=1e9)
    a = torch.rand(20, 2, 1600)
    qs.grow(641)
    assert qs._pilot_floor(a, qs._top) is not None
    assert qs._pilot_floor(a[:1], qs._top) is None  # 4 w above the batch's 1,600 values
    small = QuantileSketch(2, 0.9, 10, 16, budget_bytes=1e9)  # w = 16 < 256
    small.grow(16)
    assert small._pilot_floor(torch.rand(20, 2, 16), small._top) is None
    qs._top[1, 0] = 1.0  # a buffer that is not empty
    assert qs._pilot_floor(a, qs._top) is None
    qs._top[1, 0] = -math.inf
    a[3, 0, ::11] = math.nan  # a NaN in the subsample
    assert qs._pilot_floor(a, qs._top) is None


def test_deferred_merges_keep_the_exact_multiset_and_reads_flush_them(monkeypatch):
    """A full buffer's candidates are merged later, many batches at once (at m // 4 or 256 columns): the buffer read
    at any point equals merging every batch densely, and a read flushes what is pending."""
    g = torch.Generator().manual_seed(3)
    acts = torch.randn(390, 3, 8, 8, generator=g)
    qs = QuantileSketch(3, 0.95, 390, 64, budget_bytes=1e9)
    pending, read_at = [], []
    for s in range(0, 390, 10):
        qs.update(acts[s:s + 10], torch.arange(s, s + 10))
        pending.append(sum(c.shape[1] for cands in qs._pending.values() for c in cands))
        merged_some = any(b < a for a, b in zip(pending, pending[1:]))  # pending fell: merged at the limit
        if pending[-1] and (merged_some and not read_at or s + 10 == 390):
            read_at.append(s + 10)
            ref = QuantileSketch(3, 0.95, 390, 64, budget_bytes=1e9)
            with monkeypatch.context() as m:
                _dense_only(m)
                _feed(ref, acts[:s + 10], 10)
            assert torch.equal(qs.top, ref.top) and not qs._pending, f"read after {s + 10} images"
    assert len(read_at) == 2, f"reads with candidates pending: {read_at} (pending by batch: {pending})"
    exact = np.quantile(acts.transpose(0, 1).reshape(3, -1).double().numpy(), 0.95, axis=1)
    assert np.allclose(qs.value().double().numpy(), exact, rtol=0, atol=1e-6)


def test_deferred_merges_with_a_nan_give_what_merging_every_batch_gives(monkeypatch):
    """A NaN candidate ranks above every value in a merge's selection: merged with later batches' candidates it would
    displace another value than merged alone (a case found in review). NaN batches are merged as they come."""
    cases = ([list(range(1, 9)), [math.nan, -10, -10, -10], [100, 9, -10, -10], [50, 51, 52, 53]],  # NaN waits
             [list(range(1, 9)), [20, 21, -10, -10], [math.nan, 30, -10, -10], [50, 51, 52, 53]])  # others wait
    for batches in cases:
        _assert_nan_batches_merge_as_dense(monkeypatch, batches)


def _assert_nan_batches_merge_as_dense(monkeypatch, batches):
    tops = []
    for dense in (False, True):
        qs = QuantileSketch(1, 0.9, 10, 4, budget_bytes=1e9)  # m = 5
        with monkeypatch.context() as m:
            if dense:
                _dense_only(m)
            for i, vals in enumerate(batches):
                acts = torch.tensor(vals, dtype=torch.float32).view(-1, 1, 2, 2)
                qs.update(acts, torch.arange(2 * i, 2 * i + len(acts)))
        tops.append(qs.top)
    torch.testing.assert_close(tops[0], tops[1], rtol=0, atol=0, equal_nan=True)  # NaN kept alike


def test_prime_stride():
    assert [_prime_at_least(n) for n in (0, 1, 2, 3, 4, 8, 14, 24, 90)] == [2, 2, 2, 3, 5, 11, 17, 29, 97]


def test_buffer_is_kept_unsorted_and_read_sorted():
    qs = QuantileSketch(2, 0.5, 4, 3, budget_bytes=1e9)  # m = 12 - 5 = 7
    qs.update(torch.tensor([[[[1.0, 5.0, 3.0]], [[2.0, 2.0, 9.0]]]]), torch.tensor([0]))
    qs.update(torch.tensor([[[[4.0, 0.0, 7.0]], [[8.0, 1.0, 6.0]]]]), torch.tensor([1]))
    assert not qs._is_sorted
    assert qs.top.tolist() == [[7.0, 5.0, 4.0, 3.0, 1.0, 0.0], [9.0, 8.0, 6.0, 2.0, 2.0, 1.0]]
    assert qs._is_sorted and qs.state()["top"].tolist() == qs.top.tolist()


# =============================================================================================== TopK slots
def test_topk_kept_exemplars_never_move_and_slots_stay_a_permutation():
    g = torch.Generator().manual_seed(2)
    tk = TopK(6, 5, (2, 3))
    acts = torch.randn(40, 6, 2, 3, generator=g)
    ids = torch.randperm(1000, generator=g)[:40]
    before = None
    for s in range(0, 40, 4):
        tk.update(acts[s:s + 4], ids[s:s + 4], chunk=4)
        slots = {(u, int(i)): int(tk.slot[u, r]) for u in range(6) for r, i in enumerate(tk.ids[u])}
        for u in range(6):
            assert sorted(tk.slot[u].tolist()) == list(range(tk.width))
        if before is not None:
            kept = slots.keys() & before.keys()
            assert kept and all(slots[key] == before[key] for key in kept)
        before = slots
        where = {int(i): j for j, i in enumerate(ids[:s + 4])}
        for u in range(6):  # maps read in rank order: each exemplar's own map
            for r, i in enumerate(tk.ids[u].tolist()):
                assert torch.equal(tk.maps[u, r], acts[where[i], u].half())


def test_topk_refuses_ids_outside_32_bits():
    tk = TopK(2, 3, (1, 1))
    with pytest.raises(ValueError, match="image ids"):
        tk.update(torch.zeros(1, 2, 1, 1), torch.tensor([2 ** 32 - 1]))
    with pytest.raises(ValueError, match="image ids"):
        tk.update(torch.zeros(1, 2, 1, 1), torch.tensor([-1]))
    tk.update(torch.zeros(1, 2, 1, 1), torch.tensor([2 ** 32 - 2]))
    assert tk.ids[:, 0].tolist() == [2 ** 32 - 2] * 2


# =============================================================================================== order key
def test_order_key_matches_a_stable_float_sort():
    from neuroscribe.record.stats import merge_topk
    one_up = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    scores = torch.tensor([[-0.0, 0.0, 1e-10, 2e-10, 1.0, one_up]])
    ids = torch.tensor([[1, 2, 3, 4, 0, 2 ** 31]])
    s, i = merge_topk(scores, ids, 6)
    # adjacent floats order by score whatever the ids; tiny scores stay apart; -0.0 ties +0.0 (the lower id first)
    assert i.tolist() == [[2 ** 31, 0, 4, 3, 1, 2]]
    ref = sorted(range(6), key=lambda c: (-float(scores[0, c]), int(ids[0, c])))
    assert i[0].tolist() == [int(ids[0, c]) for c in ref]


def test_maps_of_a_unit_range():
    g = torch.Generator().manual_seed(4)
    tk = TopK(5, 3, (2, 2))
    acts = torch.randn(9, 5, 2, 2, generator=g)
    for s in range(0, 9, 3):
        tk.update(acts[s:s + 3], torch.arange(s, s + 3))
    full = tk.maps
    assert tk.maps_of(1, 4).shape == (3, 3, 2, 2) and torch.equal(tk.maps_of(1, 4), full[1:4])
    assert torch.equal(tk.maps_of(2), full[2:]) and torch.equal(tk.maps_of(), full)
