"""Crash safety: SIGKILL a real record run at random points, resume, get the same bytes as an uninterrupted run.

Also: whatever a killed run leaves behind is never taken for a finished recording, and broken or foreign
checkpoints are ignored rather than trusted.
"""
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
from neuroscribe.record.exemplars import Recording, RecordingError
from neuroscribe.record.recorder import Recorder, prepare, record, run_pass, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def job_dict(out: Path) -> dict:
    return {"model": "efficientnet-lite0", "layers": ["_blocks.4", "_blocks.10"], "out": str(out),
            "data": {"root": str(sample_root()), "limit": 48}, "preprocess": {"resize": 128, "crop": 128},
            "record": {"k": 6, "checkpoint_every": 1}, "batch_size": 4, "workers": 0, "progress": False,
            "seed": 3}


def artifact_bytes(key_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(key_dir).as_posix(): p.read_bytes() for p in sorted(key_dir.rglob("*"))
            if p.is_file() and p.name != "run.json"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "job"
    path = record(load_config(None, job_dict(out)))
    return path, artifact_bytes(path)


def check_never_mistaken(job: Path, key: str, want: dict[str, bytes]) -> None:
    """What a killed run leaves is either nothing readable or the complete, correct recording."""
    final = job / "record" / key
    assert not final.exists() or (final / "meta.json").is_file(), "a key directory without meta.json"
    try:
        rec = Recording.open(job)
    except RecordingError:
        return
    assert artifact_bytes(rec.path) == want


def test_sigkill_at_random_points_then_resume_is_byte_identical(reference, tmp_path):
    ref_path, want = reference
    key = ref_path.name
    job = tmp_path / "job"
    jf = tmp_path / "job.yaml"
    jf.write_text(yaml.safe_dump(job_dict(job)))
    cmd = [sys.executable, "-m", "neuroscribe", "record", str(jf), "--quiet"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    rng = random.Random(20240611)
    state = job / "record" / f"{key}.partial" / "rank0-of-1" / "state.safetensors"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}garbage")  # torn/foreign: must be ignored
    kills = 0
    # kill points: a random moment of start-up, a random moment after a checkpoint, and the moment the
    # artifact directory is being built
    for trigger in ("startup", "checkpoint", "artifacts"):
        before = state.stat().st_mtime_ns if state.exists() else 0
        t0 = time.monotonic()
        wait = rng.uniform(0.2, 2.0)
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = t0 + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if trigger == "startup" and time.monotonic() - t0 > wait:
                break
            if trigger == "checkpoint" and state.exists() and state.stat().st_mtime_ns != before:
                time.sleep(rng.uniform(0, 0.8))
                break
            if trigger == "artifacts" and list((job / "record").glob(f".{key}.*.tmp")):
                break
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(30)
        check_never_mistaken(job, key, want)
    assert kills >= 2, "the runs finished before they could be killed"
    assert (job / "record" / f"{key}.partial").is_dir()
    done = subprocess.run(cmd + ["-v"], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "resuming record" in done.stderr, done.stderr
    final = job / "record" / key
    got = artifact_bytes(final)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], f"{name} differs after {kills} kills and a resume"
    # nothing is left behind: no checkpoint, no half-built directory (config.yaml is the config it recorded with)
    assert sorted(p.name for p in (job / "record").iterdir()) == sorted([key, "config.yaml"])
    assert json.loads((job / "record.json").read_text())["path"] == f"record/{key}"


def test_checkpoint_of_another_shard_or_batch_size_starts_over(tmp_path):
    cfg = load_config(None, dict(job_dict(tmp_path / "j"), layers=["_blocks.2"], preprocess={"crop": 64, "resize": 64},
                                 data={"root": str(sample_root()), "limit": 12}))
    lm, probe = prepare(cfg, torch.device("cpu"))
    part = tmp_path / "partial"
    rec = Recorder(cfg, lm, probe, torch.device("cpu"))
    run_pass(rec, list(range(8)), part, final_checkpoint=True)
    assert (part / "state.safetensors").is_file()
    again = Recorder(cfg, lm, probe, torch.device("cpu"))  # same shard: nothing left to do
    assert run_pass(again, list(range(8)), part)["images_this_run"] == 0
    assert torch.equal(again.states["_blocks.2"].topk.ids, rec.states["_blocks.2"].topk.ids)
    other = Recorder(cfg, lm, probe, torch.device("cpu"))  # another shard: starts over
    assert run_pass(other, list(range(4, 12)), part)["images_this_run"] == 8
    cfg.batch_size = 2  # another batch size: the batch tree of the mean would not fit, start over
    fresh = Recorder(cfg, lm, probe, torch.device("cpu"))
    save_checkpoint(rec, part / "state.safetensors", {"done": 8, "skipped": [], "resume_id": "x"})
    assert run_pass(fresh, list(range(8)), part)["images_this_run"] == 8


def test_finished_recording_with_leftover_checkpoint_is_reused_and_cleaned(reference, tmp_path):
    ref_path, want = reference
    job = tmp_path / "job"
    shutil.copytree(ref_path, job / "record" / ref_path.name)
    stale = job / "record" / f"{ref_path.name}.partial" / "rank0-of-1"
    stale.mkdir(parents=True)
    (stale / "state.safetensors").write_bytes(b"stale")
    half = job / "record" / f".{ref_path.name}.abc123.tmp"  # a half-built directory from a killed run
    half.mkdir()
    assert record(load_config(None, job_dict(job))) == job / "record" / ref_path.name
    assert not stale.parent.exists()
    assert artifact_bytes(job / "record" / ref_path.name) == want


def test_atomic_dir_without_replace_keeps_the_copy_another_writer_finished(tmp_path):
    """Two jobs materialising the same folder (e.g. DFR's drawn slice) at once: the second to finish keeps the
    first's copy instead of swapping the folder under a reader; the default still replaces."""
    from neuroscribe import io
    target = tmp_path / "slice"
    with io.atomic_dir(target, replace=False) as mine:
        (mine / "mine.txt").write_text("mine")
        with io.atomic_dir(target) as theirs:  # the other writer finishes first
            (theirs / "theirs.txt").write_text("theirs")
        inode = target.stat().st_ino
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert target.stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == ["slice"]  # our temporary copy is gone
    with io.atomic_dir(target) as new:
        (new / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def _append_many(path: str, tag: str, n: int) -> None:
    from neuroscribe import io
    for i in range(n):
        io.append_line(path, f"{tag} {i}")


def test_append_line_keeps_every_row_of_two_writers(tmp_path):
    """Two processes appending to one log at once (two runs of a job ending together, each adding its row to
    runs.jsonl): every line of both is there, whole; a bare read-modify-rewrite loses lines here."""
    import multiprocessing
    log = tmp_path / "runs.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(log), tag, 150)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = log.read_text().splitlines()
    assert sorted(lines) == sorted(f"{t} {i}" for t in "ab" for i in range(150))
    for t in "ab":  # each writer's lines in its own order
        assert [x for x in lines if x.startswith(t)] == [f"{t} {i}" for i in range(150)]


def _append_after(path: str, go, started) -> None:
    go.wait(30)
    started.set()  # about to append: from here only the lock can hold it back
    _append_many(path, "second", 1)


def test_append_line_waits_for_the_folder_lock(tmp_path):
    """A writer that finds the folder locked waits, then appends (what keeps the row of the other run)."""
    import multiprocessing
    from neuroscribe import io
    log = tmp_path / "runs.jsonl"
    io.append_line(log, "first")
    ctx = multiprocessing.get_context("fork")
    go, started = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_append_after, args=(str(log), go, started))
    p.start()  # before the lock is taken: a child forked inside the block would share (and keep) it
    with io.folder_lock(tmp_path):
        go.set()
        assert started.wait(30)
        time.sleep(1.0)
        assert log.read_text() == "first\n"  # blocked while we hold the lock
        assert p.is_alive()
    p.join(30)
    assert p.exitcode == 0
    assert log.read_text() == "first\nsecond 0\n"


def test_folder_lock_falls_back_to_no_lock_where_flock_is_refused(tmp_path, monkeypatch):
    """On a file system that refuses ``flock`` on a folder (NFS: EBADF) the row is still written, unlocked."""
    import fcntl
    from neuroscribe import io

    def refuse(fd, op):
        raise OSError(9, "Bad file descriptor")
    monkeypatch.setattr(fcntl, "flock", refuse)
    io.append_line(tmp_path / "runs.jsonl", "row")
    assert (tmp_path / "runs.jsonl").read_text() == "row\n"
