"""Sharded recording with torchrun (2 gloo processes on CPU) writes the same bytes as one process.

Real EfficientNet-Lite0 weights and real Imagenette photos; one layer takes the exact quantile path and one the
sampled one; one image is corrupt (skipped by the second rank); the torchrun run is SIGKILLed once after its first
checkpoints and resumed. Both sides use one intra-op thread (what torchrun gives each rank): the model's CPU
kernels round differently with other thread counts.
"""
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from neuroscribe.config import load_config
from neuroscribe.datasets.probe import sample_root
from neuroscribe.record.recorder import LayerState, record
from neuroscribe.record.stats import CascadeSum
from neuroscribe.distributed import shard_range

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _torchrun_temp(tmp_path, monkeypatch):
    """torchrun makes a ``torchelastic_*`` log folder under TMPDIR per run and leaves it: keep them in the test's own
    temporary folder (pytest prunes old ones), not in the user's /tmp."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def artifact_bytes(key_dir: Path) -> dict[str, bytes]:
    """Every artifact file of a recording except run.json (timings)."""
    return {p.relative_to(key_dir).as_posix(): p.read_bytes() for p in sorted(key_dir.rglob("*"))
            if p.is_file() and p.name != "run.json"}


def key_dir(job: Path) -> Path:
    return job / json.loads((job / "record.json").read_text())["path"]


def env1() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def torchrun(args: list[str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "neuroscribe", *args]
    return subprocess.Popen(cmd, env=env1(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **kw)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once, as a machine failure would."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """30 real photos of two classes plus one corrupt JPEG (the last image: rank 1's shard)."""
    root = tmp_path_factory.mktemp("probe")
    for cls in ("n03445777", "n03888257"):  # golf ball, parachute
        (root / cls).mkdir()
        for p in sorted((sample_root() / "train" / cls).glob("*.jpg"))[:15]:
            shutil.copy(p, root / cls / p.name)
    (root / "n03888257" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def job_dict(data: Path, out: Path) -> dict:
    # _blocks.4: 40 units x 16x16 maps -> the 10 kB quantile budget forces the sampled sketch; _fc: exact
    return {"model": "efficientnet-lite0", "layers": ["_blocks.4", "_fc"], "out": str(out),
            "data": {"root": str(data)}, "preprocess": {"resize": 128, "crop": 128},
            "record": {"k": 5, "quantile_budget_mb": 0.01, "checkpoint_every": 1},
            "batch_size": 4, "workers": 0, "progress": False, "seed": 0}


# --------------------------------------------------------------------------------------------- unit level
@pytest.mark.parametrize("n,world,align", [(31, 2, 6), (100, 3, 7), (5, 4, 2), (0, 2, 4), (17, 1, 5), (64, 8, 1)])
def test_shard_range_is_a_partition_of_whole_batches(n, world, align):
    blocks = [shard_range(n, world, r, align) for r in range(world)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    for (a0, a1), (b0, b1) in zip(blocks, blocks[1:]):
        assert a1 == b0  # contiguous, no overlap, rank order = data order
    for a, b in blocks:
        assert a % align == 0 and (b % align == 0 or b == n)


def test_cascade_sum_is_bitwise_independent_of_order_and_sharding():
    g = torch.Generator().manual_seed(0)
    leaves = (torch.randn(37, 5, generator=g, dtype=torch.float64) * torch.logspace(-8, 8, 37,
                                                                                   dtype=torch.float64)[:, None])
    one = CascadeSum(5)
    for i in range(37):
        one.add(i, leaves[i])
    rng = random.Random(1)
    for _ in range(5):
        cut = sorted(rng.sample(range(1, 37), 2))
        parts = [range(0, cut[0]), range(cut[0], cut[1]), range(cut[1], 37)]
        sums = []
        for part in parts:
            s = CascadeSum(5)
            order = list(part)
            rng.shuffle(order)
            for i in order:
                s.add(i, leaves[i])
            sums.append(s)
        merged = sums[2]
        merged.merge(sums[0])
        merged.merge(sums[1])
        assert torch.equal(merged.total(), one.total())
    assert torch.allclose(one.total(), leaves.sum(0), rtol=1e-12)
    with pytest.raises(ValueError, match="twice"):
        one.add(3, leaves[3])


def _layer_state(chunk=None):
    return LayerState(37, (3, 4), k=6, q=0.9, n_images=90, budget_bytes=1e9, device="cpu", chunk=chunk)


@pytest.mark.parametrize("budget", [1e9, 2_000])
def test_layer_state_chunked_sharded_merge_equals_single(budget):
    """Unit chunks, shards (ranks) and the chunked merge all give the single-pass state bit for bit."""
    g = torch.Generator().manual_seed(5)
    acts = torch.randint(0, 7, (90, 37, 3, 4), generator=g).float() / 3  # ties on purpose
    ids = torch.arange(90)

    def fresh(chunk=None):
        return LayerState(37, (3, 4), k=6, q=0.9, n_images=90, budget_bytes=budget, device="cpu", chunk=chunk)

    single = fresh()
    for s in range(0, 90, 8):
        single.update(acts[s:s + 8], ids[s:s + 8], s // 8)
    chunked = fresh(chunk=5)
    for s in range(0, 90, 8):
        chunked.update(acts[s:s + 8], ids[s:s + 8], s // 8)
    shards = [fresh(chunk=4), fresh(chunk=4)]
    for s in range(0, 90, 8):  # rank 0: batches 0-5, rank 1: 6-11
        shards[s // 8 >= 6].update(acts[s:s + 8], ids[s:s + 8], s // 8)
    shards[0].merge(shards[1])
    for st in (chunked, shards[0]):
        a, b = st.state(), single.state()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
        assert torch.equal(st.quant.value(), single.quant.value()) and torch.equal(st.sum, single.sum)
    # and the maps are the units' own maps on their exemplars
    for u in range(37):
        assert torch.equal(single.topk.maps[u].float(), acts[single.topk.ids[u], u].half().float())


# --------------------------------------------------------------------------------------------- end to end
def _helpers_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from neuroscribe import distributed as d
    with d.session("cpu") as ctx:
        mine = d.shard_units(list(range(11)))
        got = d.gather_objects(mine)
        every = d.gather_objects(ctx.rank, dst=None)
        b = d.broadcast_object("from0" if ctx.rank == 0 else None)
        d.barrier()
        row = [ctx.rank, ctx.world, ctx.backend, mine, got, every, b, d.is_main_process()]
    Path(out, f"rank{rank}.json").write_text(json.dumps(row + [d.context().world]))


def test_shard_units_and_gather_objects_on_two_gloo_processes(tmp_path):
    import multiprocessing as mp
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")  # cheap: the children reuse this interpreter's imports (no compute in them)
    procs = [ctx.Process(target=_helpers_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert rows[0][:4] == [0, 2, "gloo", [0, 1, 2, 3, 4]] and rows[1][:4] == [1, 2, "gloo", [5, 6, 7, 8, 9, 10]]
    assert rows[0][4] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]] and rows[1][4] is None  # gathered on rank 0
    assert rows[0][5] == rows[1][5] == [0, 1] and rows[0][6] == rows[1][6] == "from0"
    assert rows[0][7] is True and rows[1][7] is False
    assert rows[0][8] == rows[1][8] == 1  # the session left the group


def test_two_ranks_write_the_same_bytes_as_one_process(data, tmp_path):
    # one process, one thread, in this interpreter
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = record(load_config(None, job_dict(data, tmp_path / "single")))
    finally:
        torch.set_num_threads(threads)
    meta = json.loads((single / "meta.json").read_text())
    assert meta["n_images"] == 31 and meta["n_skipped"] == 1 and meta["skipped"][0][1].endswith("zz_corrupt.jpg")
    assert meta["layers"]["_blocks.4"]["quantile_method"] == "sampled"
    assert meta["layers"]["_fc"]["quantile_method"] == "exact"

    # two ranks; killed (SIGKILL, torchrun and workers) once rank 0 has checkpointed, then resumed
    out = tmp_path / "dist"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(data, out)))
    proc = torchrun(["record", str(job)])
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        if list(out.glob("record/*.partial/rank0-of-2/state.safetensors")):
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        kill_tree(proc)
    log = proc.communicate(timeout=60)[0].decode(errors="replace")
    # a checkpoint every batch of 4 photos, polled every 50 ms: the run cannot finish before the kill, unless it
    # never checkpointed -- then the resume below would test nothing, so say so
    assert killed, f"the two-rank record finished before rank 0's first checkpoint was seen: resume untested\n{log}"
    assert not (out / "record.json").exists() or (key_dir(out) / "meta.json").is_file(), log
    proc = torchrun(["-v", "record", str(job)])
    log = proc.communicate(timeout=240)[0].decode(errors="replace")
    assert proc.returncode == 0, log
    assert "resuming record" in log, log  # (at least) rank 0 resumed from its checkpoint
    assert log.count("recorded 1040 units") == 1, log  # only rank 0 reports
    sharded = key_dir(out)
    assert sharded.name == single.name
    a, b = artifact_bytes(single), artifact_bytes(sharded)
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:
        assert a[name] == b[name], f"{name} differs between 1 and 2 ranks"
    run = json.loads((sharded / "run.json").read_text())
    assert run["world_size"] == 2
    assert not list((out / "record").glob("*.partial")) and not list((out / "record").glob(".*"))


def test_describe_sharded_across_two_ranks_equals_one_process(tmp_path):
    """`describe` under torchrun: units split across 2 ranks, rank 0 writes the same exports as one process."""
    import shutil
    from neuroscribe.config import load_config
    from neuroscribe.datasets.probe import sample_root
    from neuroscribe.record.recorder import record
    from neuroscribe.describe.stage import describe
    one = tmp_path / "one"
    over = {"model": "efficientnet-lite0", "layers": ["_blocks.15"], "out": str(one), "progress": False,
            "workers": 0, "batch_size": 20, "data": {"root": str(sample_root()), "split": "val", "limit": 30},
            "describe": {"units": 8, "batch_units": 3, "faithfulness_images": 0, "gallery": False,
                         "verify": {"images": 8}}}
    cfg = load_config(None, over)
    record(cfg)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    describe(cfg)
    p = torchrun(["describe", "--out", str(two), "--layers", "_blocks.15", "--quiet", "--workers", "0",
                  "--set", "describe.units=8", "--set", "describe.batch_units=3",
                  "--set", "describe.faithfulness_images=0", "--set", "describe.gallery=false",
                  "--set", "describe.verify.images=8",
                  "--data", str(sample_root()), "--split", "val", "--limit", "30", "--batch-size", "20"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out.decode()[-3000:]
    logs = sorted((two / "describe").glob("*/units.rank*.jsonl"))
    assert [f.name for f in logs] == ["units.rank0.jsonl", "units.rank1.jsonl"]
    assert all(f.read_text().strip() for f in logs)  # both ranks described units
    import csv
    a = list(csv.DictReader((one / "descriptions.csv").read_text().replace(str(one), "JOB").splitlines()))
    b = list(csv.DictReader((two / "descriptions.csv").read_text().replace(str(two), "JOB").splitlines()))
    # the same words, exemplars and candidates; scores equal up to float rounding (each rank batches its own
    # units, views and phrases, which moves float results in the 7th digit: 1.07335782 vs 1.07335764 seen)
    # verification runs on rank 0 with its own thread count
    floats = ("score", "verify_effect", "verify_auc", "verify_response")
    assert [{k: v for k, v in r.items() if k not in floats} for r in a] == \
        [{k: v for k, v in r.items() if k not in floats} for r in b]
    for k in floats:
        assert any(r[k] for r in a), k  # compared on values, not on two empty columns
        assert [float(r[k] or "nan") for r in a] == pytest.approx([float(r[k] or "nan") for r in b], rel=1e-5,
                                                                  abs=1e-4, nan_ok=True), k  # 2.4e-6 seen


def test_torchrun_record_and_describe_then_flag_ablate_evaluate_report(tmp_path):
    """The whole chain after a sharded record and a sharded describe (2 gloo ranks): flag, ablate (which reads
    every rank's describe log), evaluate and report run on the job torchrun left behind."""
    from neuroscribe import pipeline
    job = tmp_path / "job.yaml"
    text = {"kind": "text", "size": 0.25, "position": "bottom-left"}
    spec = {"model": "efficientnet-lite0", "layers": ["_blocks.15"], "out": str(tmp_path / "out"),
            "progress": False, "workers": 0, "batch_size": 10,
            "data": {"root": str(sample_root()), "split": "val", "limit": 30}, "record": {"k": 5},
            "describe": {"units": 8, "batch_units": 3, "faithfulness_images": 0, "gallery": False,
                         "verify": {"images": 8}},
            "shifts": [{"name": "val-text", "data": {"root": str(sample_root()), "split": "train", "limit": 30},
                        "cue": text, "correlation": "wrong"},
                       {"name": "wrong-text", "data": {"root": str(sample_root()), "split": "val", "limit": 20},
                        "cue": text, "correlation": "wrong"}],
            "flag": {"embedder": None},
            "ablate": {"validation": "val-text", "max_units": 2, "control_candidates": 3},
            "evaluate": {"bootstrap": 50}}
    job.write_text(yaml.safe_dump(spec))
    for stage in ("record", "describe"):
        p = torchrun([stage, str(job), "--quiet"])
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out.decode()[-3000:]
    logs = sorted((tmp_path / "out" / "describe").glob("*/units*.jsonl"))
    assert [f.name for f in logs] == ["units.rank0.jsonl", "units.rank1.jsonl"]
    # flag on a word of a description rank 0 exported, so the flag set is not empty whatever the units are called
    # (colour words, which it used to rely on, are now named only where unusual for the probe)
    rows = [json.loads(l) for l in (tmp_path / "out" / "descriptions.jsonl").read_text().splitlines() if l.strip()]
    # what ablate and evaluate read the description scores from: every unit of both ranks' logs
    from neuroscribe.ablate.stage import described_rows
    assert len(rows) == 8 and set(described_rows(tmp_path / "out")) == {(r["layer"], r["unit"]) for r in rows}
    word = next(r["description"].split()[-1] for r in rows if r["description"])
    # words alone (flag.verified off): this tests the torchrun stages, not verification (tests/test_verify.py)
    job.write_text(yaml.safe_dump({**spec, "flag": {"cues": {"picked": [word]}, "embedder": None, "verified": False}}))
    cfg = load_config(job)
    assert pipeline.flag(cfg)["sets"]["description"], f"units described with {word!r} should be flagged"
    abl = pipeline.ablate(cfg)
    assert abl["variants"]["description"]["ordered"]
    ev = pipeline.evaluate(cfg)
    assert set(ev["test_sets"]) == {"in-distribution", "wrong-text"}
    assert pipeline.report(cfg)["json"].endswith("report.json")
