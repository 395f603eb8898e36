"""The glibc heap settings (neuroscribe/heap.py): freed large blocks are reused instead of page-faulted in again,
and every stage's entry runs inside them."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from neuroscribe import heap
from neuroscribe.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]

FAULTS = textwrap.dedent("""
    import resource, torch
    from neuroscribe.heap import reuse_freed_memory

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def churn():  # 64 MiB blocks, above glibc's largest dynamic mmap threshold (32 MiB)
        f = faults()
        for _ in range(4):
            torch.ones(16 * 2**20).sum()
        return faults() - f

    churn()
    plain = churn()
    with reuse_freed_memory() as on:
        churn()
        reused = churn()
    after = churn()
    print(int(on), plain, reused, after)
""")


def test_freed_blocks_are_reused_inside_the_settings():
    if heap._glibc() is None:
        pytest.skip("not glibc (or malloc tunables set in the environment): the settings are a no-op there")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=120,
                         cwd=str(REPO), env=env)
    assert out.returncode == 0, out.stderr
    on, plain, reused, after = map(int, out.stdout.split())
    assert on == 1
    pages = 4 * 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert plain > pages // 2, f"{plain} faults for 4 fresh 64 MiB blocks: the measurement is not working"
    assert reused < pages // 20, f"{reused} faults inside the settings (outside: {plain})"
    assert after > pages // 2, f"{after} faults after leaving: the settings were not restored"


def test_settings_nest_and_report_their_state():
    assert not heap.active()
    with heap.reuse_freed_memory() as on:
        assert heap.active() == on
        with heap.reuse_freed_memory() as inner:
            assert inner == on
        assert heap.active() == on  # the inner block leaves the outer one in charge
    assert not heap.active()


class _Seen(Exception):
    pass


def _probe(*_, **__):
    raise _Seen(heap.active())


def test_every_stage_entry_runs_inside_the_settings(tmp_path, monkeypatch):
    if heap._glibc() is None:
        pytest.skip("not glibc: the settings are a no-op there")
    from neuroscribe.ablate import measure, stage as ablate_stage
    from neuroscribe.describe import stage as describe_stage
    from neuroscribe.train import classifier
    monkeypatch.setattr(ablate_stage, "Path", _probe)  # each stage's first look at the job directory
    monkeypatch.setattr(measure, "Path", _probe)
    monkeypatch.setattr(describe_stage.Recording, "open", _probe)
    monkeypatch.setattr(classifier, "_open_data", _probe)
    cfg = load_config(None, {"model": "efficientnet-lite0", "out": str(tmp_path), "device": "cpu"})
    entries = {"describe": lambda: describe_stage.describe(cfg),
               "flag": lambda: ablate_stage.flag(cfg), "ablate": lambda: ablate_stage.ablate(cfg),
               "evaluate": lambda: measure.evaluate(cfg),
               "train": lambda: classifier.train_classifier(TrainConfig(), tmp_path / "train", device="cpu")}
    for name, call in entries.items():
        with pytest.raises(_Seen) as seen:
            call()
        assert seen.value.args == (True,), f"{name} ran outside the heap settings"
    assert not heap.active()
