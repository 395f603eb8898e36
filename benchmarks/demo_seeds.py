"""The demo's protocol on other spurious models: how much of the demo's result is its model's seed (not a test).

The demo ships one model (the study's seed 0). This runs the demo job unchanged (``neuroscribe/data/demo.yaml``: the
same probe, holdout and test photos) with the model swapped for each checkpoint given, e.g. the study's other seeds,
which held out the same photos (``train.data_seed`` is shared by all seeds), and writes every seed's headline and
accuracies to one JSON.

    python benchmarks/demo_seeds.py --out jobs/demo-seeds --json benchmarks/results/demo_seeds.json \\
        [seed0=resnet18-imagenette-text] seed1=checkpoint:JOB/seed1/train/seed1/model.safetensors ...

Each job skips the stages whose artifacts are current, so a rerun over the same ``--out`` only collects.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", metavar="NAME=SPEC")
    ap.add_argument("--out", default="jobs/demo-seeds")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    from neuroscribe.config import load_config
    from neuroscribe.demo import demo_config_path
    from neuroscribe.pipeline import run
    rows = {}
    for item in a.models:
        name, _, spec = item.partition("=")
        cfg = load_config(demo_config_path(), {"model": spec, "out": str(Path(a.out) / name), "progress": False})
        t0 = time.perf_counter()
        rep = json.loads(Path(run(cfg)["json"]).read_text())
        h, v = rep["headline"], rep["variants"]
        acc = {var: {s: round(100 * r["acc"], 1) for s, r in v[var]["results"].items()}
               for var in ("base", "ablated") if v.get(var, {}).get("results")}
        rows[name] = {"model": spec, "n_units": h["n_units"], "gain": round(h["gain"], 1),
                      "ci95": [round(h["gain_lo"], 1), round(h["gain_hi"], 1)],
                      "random_best": round(h["random_best"], 1), "random_mean": round(h["random_mean"], 1),
                      "excludes_random_best": h["excludes_random_best"], "accuracy": acc,
                      "seconds_this_call": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps(rows[name]), flush=True)
    gains = [r["gain"] for r in rows.values()]
    out = {"command": "python benchmarks/demo_seeds.py " + " ".join(sys.argv[1:]), "job": str(demo_config_path().name),
           "per_model": rows, "mean_gain": round(sum(gains) / len(gains), 1),
           "excludes_random_best": sum(r["excludes_random_best"] for r in rows.values()), "n_models": len(rows)}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"mean gain {out['mean_gain']:+.1f} points; CI excludes the best random draw in "
          f"{out['excludes_random_best']} of {len(rows)}")


if __name__ == "__main__":
    main()
