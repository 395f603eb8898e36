"""Record throughput with 1 process vs N torchrun processes (gloo, CPU) on the same images.

    python benchmarks/record_ranks.py --quick          # < 2 min on 2 cores: 64 photos at 128 px
    python benchmarks/record_ranks.py                  # the 500 shipped photos at the model's 224 px
    python benchmarks/record_ranks.py --data /path/to/imagenette --split val --limit 2000 --nproc 4

Both runs get the same number of cores: the single process uses ``nproc x threads-per-rank`` intra-op threads,
each rank ``threads-per-rank``. Throughput is images per second of the recording pass (``run.json``), excluding
start-up and model loading, which are reported separately as wall time. The ratio printed last is
``N-rank throughput / 1-process throughput``. Artifacts are also compared (exemplar ids; bytes may differ in the
last bit because the thread counts differ -- see ``neuroscribe.record.recorder``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(label: str, launcher: list[str], out: Path, args: argparse.Namespace, threads: int) -> dict:
    cmd = [*launcher, "-m", "neuroscribe", "record", "--model", args.model, "--layers", args.layers,
           "--out", str(out), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--device", "cpu", "--quiet", "--set", f"data.limit={args.limit}"]
    if args.data:
        cmd += ["--data", args.data]
    if args.split:
        cmd += ["--split", args.split]
    if args.crop:
        cmd += ["--set", f"preprocess.resize={args.crop}", "--set", f"preprocess.crop={args.crop}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{label} failed:\n{res.stdout}\n{res.stderr}")
    key_dir = out / json.loads((out / "record.json").read_text())["path"]
    info = json.loads((key_dir / "run.json").read_text())
    info.update(wall=wall, key_dir=key_dir)
    print(f"{label:<22} {info['images_this_run']:>6} img  pass {info['pass_seconds']:7.2f}s  "
          f"{info['images_per_second']:7.2f} img/s  (wall incl. start-up {wall:6.1f}s)", flush=True)
    return info


def same_exemplars(a: Path, b: Path) -> tuple[bool, bool]:
    """(identical exemplar ids in every layer, identical bytes of every artifact but run.json)."""
    from safetensors.torch import load_file
    ids = all(load_file(str(f))["ids"].equal(load_file(str(b / "layers" / f.name))["ids"])
              for f in sorted((a / "layers").iterdir()))
    files = [p.relative_to(a) for p in sorted(a.rglob("*")) if p.is_file() and p.name != "run.json"]
    return ids, all((a / p).read_bytes() == (b / p).read_bytes() for p in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 photos at 128 px (< 2 min on 2 cores)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the torchrun run")
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--layers", default="_blocks.4,_blocks.10,_fc")
    ap.add_argument("--data", help="image folder or manifest (default: the photos shipped in the package)")
    ap.add_argument("--split")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--crop", type=int, default=None, help="resize+crop size (default: the model's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0, help="data-loading processes per rank")
    ap.add_argument("--single-thread-baseline", action="store_true",
                    help="also time one process with one thread (and check it matches the ranks bit for bit)")
    args = ap.parse_args()
    if args.quick:
        args.limit = args.limit or 64
        args.crop = args.crop or 128
    args.limit = args.limit or 500
    total_threads = args.nproc * args.threads_per_rank
    print(f"# {args.model} [{args.layers}] on {args.limit} images, batch {args.batch_size}, crop "
          f"{args.crop or 'model default'}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="ns-bench-") as tmp:
        tmp = Path(tmp)
        one = run(f"1 process x {total_threads} thr", [sys.executable], tmp / "one", args, total_threads)
        many = run(f"{args.nproc} ranks x {args.threads_per_rank} thr",
                   [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(args.nproc)], tmp / "many", args, args.threads_per_rank)
        single = None
        if args.single_thread_baseline and total_threads > 1:
            single = run("1 process x 1 thr", [sys.executable], tmp / "single", args, 1)
        ids, identical = same_exemplars(one["key_dir"], many["key_dir"])
        print(f"exemplar ids identical: {ids}; artifacts byte-identical: {identical}"
              + ("" if identical else " (allowed: the runs use different intra-op thread counts)"))
        if single is not None:
            print(f"1 process x 1 thr vs {args.nproc} ranks x 1 thr byte-identical: "
                  f"{same_exemplars(single['key_dir'], many['key_dir'])[1]}")
        ratio = many["images_per_second"] / max(one["images_per_second"], 1e-9)
        print(f"throughput ratio {args.nproc} ranks / 1 process = {ratio:.2f}")


if __name__ == "__main__":
    main()
