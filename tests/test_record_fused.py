"""Recorder: same-shape small layers folded in as one state (one set of tensor operations per batch instead of one
per layer) write byte-identical artifacts, a checkpoint of fused layers resumes to the same state, and two shards
merged as under torchrun equal one pass (deferred quantile candidates pending on both sides)."""
import torch
from torch import nn

from neuroscribe.config import load_config
from neuroscribe.datasets.probe import sample_root
from neuroscribe.models import LoadedModel, Preprocess, register_model
from neuroscribe.record import recorder as record_mod
from neuroscribe.record import state as state_mod


class _Small(nn.Module):
    """Three layers on 4x4 maps (folded in together), one on 16x16 (alone), one flat."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 6, 4, stride=4)  # 16x16 at 64 px
        self.a = nn.Conv2d(6, 5, 4, stride=4)  # 4x4
        self.b = nn.Conv2d(5, 7, 3, padding=1)
        self.c = nn.Conv2d(7, 4, 1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        return self.head(self.c(self.b(self.a(self.stem(x)))).mean((2, 3)))


@register_model("test-small-fused")
def _small(**_):
    return LoadedModel("", _Small(), Preprocess(resize=64, crop=64), None, {"test": True})


def _cfg(out, **extra):
    return load_config(None, {"model": "test-small-fused", "layers": ["stem", "a", "b", "c", "head"],
                              "out": str(out), "data": {"root": str(sample_root()), "limit": 20},
                              "record": {"k": 4}, "batch_size": 6, "workers": 0, "progress": False,
                              "device": "cpu", **extra})


def test_fused_layers_write_byte_identical_artifacts(tmp_path, monkeypatch):
    def run(out, fuse):
        monkeypatch.setattr(state_mod, "FUSE_MAX_POSITIONS", fuse)
        path = record_mod.record(_cfg(out))
        return {p.name: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != "run.json"}

    fused, alone = run(tmp_path / "a", 256), run(tmp_path / "b", 0)
    assert fused.keys() == alone.keys() and all(fused[k] == alone[k] for k in fused)
    lm, probe = record_mod.prepare(_cfg(tmp_path / "c"), torch.device("cpu"))
    for fuse, groups in ((256, [["stem"], ["a", "b", "c"], ["head"]]), (0, [["stem"], ["a"], ["b"], ["c"], ["head"]])):
        monkeypatch.setattr(state_mod, "FUSE_MAX_POSITIONS", fuse)
        rec = state_mod.Recorder(_cfg(tmp_path / "c"), lm, probe, torch.device("cpu"))
        rec.probe_shapes()
        assert [names for names, _ in rec.groups] == groups


def test_fused_layers_resume_from_a_checkpoint(tmp_path):
    cfg = _cfg(tmp_path)
    lm, probe = record_mod.prepare(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(6, 3, 64, 64, generator=g) for _ in range(4)]

    def steps(rec, which):
        for b in which:
            rec.step(xs[b], torch.arange(6 * b, 6 * b + 6), b)

    whole = state_mod.Recorder(cfg, lm, probe, torch.device("cpu"))
    steps(whole, range(4))
    first = state_mod.Recorder(cfg, lm, probe, torch.device("cpu"))
    steps(first, range(2))
    flat = first.state()
    assert not any(a.data_ptr() == b.data_ptr() for a in flat.values() for b in flat.values() if a is not b)
    again = state_mod.Recorder(cfg, lm, probe, torch.device("cpu"))
    again.probe_shapes()
    again.load(flat)
    steps(again, range(2, 4))
    assert whole.state().keys() == again.state().keys()
    for key, v in whole.state().items():
        torch.testing.assert_close(again.state()[key], v, rtol=0, atol=0)


def test_fused_layers_merge_across_ranks_with_quantile_candidates_pending(tmp_path, monkeypatch):
    """Two shards folded by two recorders, merged as under torchrun (``merge_ranks``, its gathers replayed in one
    process), equal one recorder over every batch: fused layers' deferred quantile candidates (still pending on both
    sides when the merge starts) included."""
    from neuroscribe import distributed
    cfg = _cfg(tmp_path)
    lm, probe = record_mod.prepare(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(6, 3, 64, 64, generator=g) for _ in range(4)]
    recs = [state_mod.Recorder(cfg, lm, probe, torch.device("cpu")) for _ in range(3)]
    for b, x in enumerate(xs):  # recs[0]: every batch; recs[1] and recs[2]: the even and the odd ones
        for rec in (recs[0], recs[1 + b % 2]):
            rec.step(x, torch.arange(6 * b, 6 * b + 6), b)
    fused = next(f for names, f in recs[2].groups if f is not None)
    assert fused.quant._pending and next(f for _, f in recs[1].groups if f is not None).quant._pending, \
        "no quantile candidates pending before the merge: the case is not exercised"
    res = {"skipped": [], "images_this_run": 12, "seconds": 1.0}
    sent = []  # rank 1's messages, in order
    monkeypatch.setattr(distributed, "gather_objects", lambda obj, dst=0: sent.append(obj))
    record_mod.merge_ranks(recs[2], res, distributed.Context(rank=1, world=2))
    replies = iter(sent)
    monkeypatch.setattr(distributed, "gather_objects", lambda obj, dst=0: [obj, next(replies)])
    record_mod.merge_ranks(recs[1], res, distributed.Context(rank=0, world=2))
    whole, merged = recs[0].state(), recs[1].state()
    for key in (k for k in whole if "::quant." in k or "::topk.scores" in k):
        torch.testing.assert_close(merged[key], whole[key], rtol=0, atol=0, msg=key)


def test_reading_a_fused_state_keeps_its_layers_views_of_it(tmp_path):
    """A fused group's own buffer read (flushed and sorted) between batches: its layers' states stay views of it (a
    merge into the group reaches them), and reading those layers after a batch whose candidates all wait there (the
    group still marked sorted) gives what a recorder that never read the group gives: the first layer's read flushes
    the group, which changes the other layers' rows too."""
    cfg = _cfg(tmp_path)
    lm, probe = record_mod.prepare(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(6, 3, 64, 64, generator=g) for _ in range(4)]
    read, plain = (state_mod.Recorder(cfg, lm, probe, torch.device("cpu")) for _ in range(2))
    for b, x in enumerate(xs):
        for rec in (read, plain):
            rec.step(x, torch.arange(6 * b, 6 * b + 6), b)
        names, fused = next((n, f) for n, f in read.groups if f is not None)
        if b < 3:
            fused.quant.top  # noqa: B018 -- the read under test (flush + sort)
    assert fused.quant._is_sorted and fused.quant._pending, "the last batch merged: the case is not exercised"
    whole, again = plain.state(), read.state()  # the layers read one by one, the group not read first
    for key in (k for k in whole if "::quant." in k):
        torch.testing.assert_close(again[key], whole[key], rtol=0, atol=0, msg=key)
    fused.quant.top  # noqa: B018
    members = [read.states[n].quant for n in names]
    base = fused.quant._top.data_ptr()
    assert all(base <= q._top.data_ptr() < base + fused.quant._top.nbytes for q in members), \
        "a read of the fused state left its layers' states on another buffer"
    fused.quant._top.fill_(7.0)  # what a later merge into the group writes: its layers must see it
    assert all(bool((q._top == 7.0).all()) for q in members)
