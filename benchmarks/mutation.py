"""Mutation testing of the numeric core with mutmut 3 (``make mutation``; slow, not run by CI).

Each source file in :data:`TARGETS` is mutated on its own, with only the tests listed for it (fast, exact tests:
a mutant is run against the listed tests that reach the mutated function), in a scratch copy of the project,
``build/mutation/<file>/``: the package, the listed test files + ``tests/conftest.py``, and ``pyproject.toml``
whose ``[tool.mutmut]`` is the committed one plus ``only_mutate`` and the test selection of that file. ``functions``
(optional) restricts a file to some of its functions (``name`` or ``Class.method``); without it every function of
the file is mutated. mutmut runs with one worker (``--max-children 1``).

Results are read from mutmut's meta files (``mutants/<file>.meta``). Mutants listed in
``benchmarks/mutation_equivalent.txt`` -- one line each, ``NAME :: MUTATED LINE :: WHY IT CANNOT CHANGE A RESULT``
(MUTATED LINE is the mutant's changed source line, stripped, so a list made stale by renumbered mutants is caught)
-- are left out of the score. Timeouts count as killed. The last line printed is
``mutation score: K/N killed (P %)`` over the non-equivalent mutants; the exit status is non-zero when P < 95, a
run fails, or an equivalent-list entry is stale (unknown name, different line, or killed). Surviving mutants are
written, with their changed lines, to ``build/mutation/<file>/survivors.txt`` (and the first ones printed).

    python benchmarks/mutation.py                         # every target, fresh
    python benchmarks/mutation.py --only neuroscribe/record/stats.py
    python benchmarks/mutation.py --only neuroscribe/record/stats.py --keep \\
        --mutants 'neuroscribe.record.stats.xǁTopKǁadd__mutmut_*'   # rerun some mutants in the kept copy

Adding a file is one entry in TARGETS: the file, the tests that cover it and (optionally) its functions to mutate.
mutmut leaves decorated functions alone (``@contextlib.contextmanager``, ``@property``, ...), so what they compute
must live in a plain function to be covered (e.g. :func:`neuroscribe.hooks._layer_hook` of ``trace``).
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: mutmut depends on toml there
    import toml as tomllib

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "mutation"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.txt"
THRESHOLD = 95.0
FAST = ["tests/test_core_numeric.py"]

# source file -> tests that must kill its mutants (paths or pytest node ids) and, optionally, the functions to
# mutate (the numeric and geometric ones; I/O, rendering and plumbing are left to the other tests). Each file's own
# fast test file: test_core_numeric.py (stats, evaluate, robustness, schema), test_core_hooks.py (hooks),
# test_core_edit.py (the ablation edit), test_core_masks.py (exemplar masks and view geometry).
TARGETS: dict[str, dict] = {
    "neuroscribe/record/stats.py": {"tests": FAST + ["tests/test_core_stats.py"]},  # streaming top-k, cascade sums
    "neuroscribe/record/quantile.py": {"tests": FAST + ["tests/test_core_stats.py"]},  # streaming quantiles
    "neuroscribe/ablate/evaluate.py": {  # accuracy, per-group / worst-group accuracy, bootstrap CIs
        "tests": FAST, "functions": ["correct", "_ci", "accuracy_report", "paired_bootstrap_diff"]},
    "neuroscribe/report/robustness.py": {  # the report's numbers: means over draws, deltas, gaps, worst groups
        "tests": FAST, "functions": ["_pct", "_interval", "_cell", "_derive"]},
    "neuroscribe/report/schema.py": {"tests": FAST, "functions": ["_frac"]},  # every accuracy a fraction
    "neuroscribe/hooks.py": {  # reading and editing a layer: hooks, unit views (NCHW/NHWC/tokens/flat), layouts
        "tests": ["tests/test_core_hooks.py"],
        "functions": ["_first_tensor", "_replace_first", "_layer_hook", "run", "prefix_tokens", "unit_view",
                      "layer_kind", "_valid_layout", "declare_layouts", "module_width", "module_layout",
                      "channel_count", "detect_layout", "_how_to_declare", "layout_from_resize", "layer_layout",
                      "layer_catalogue"]},
    "neuroscribe/ablate/edit.py": {  # the ablation edit: unit lists, zero/mean through a hook or baked into weights
        "tests": ["tests/test_core_edit.py"],
        "functions": ["as_unit_dict", "_as_list", "unit_axis", "_check_range", "_mean_vector", "_check_means_length",
                      "UnitAblation.__init__", "UnitAblation._index_and_values", "UnitAblation._axis",
                      "UnitAblation.__call__", "_prepare", "_layout_of", "ablation_edits", "_edit_weights",
                      "permanent_edit", "_hook_output"]},
    "neuroscribe/record/exemplars.py": {  # exemplar masks: MILAN's and the edge upsampling, thresholds, exemplars
        "tests": ["tests/test_core_masks.py"],
        "functions": ["milan_upsample", "Recording.units", "Recording.layout", "Recording._check", "Recording._unit",
                      "Recording.exemplars", "Recording.threshold", "Recording.upsampled", "Recording.masks"]},
    "neuroscribe/describe/views.py": {  # view geometry: the dimmed view, its outline, the crop box
        "tests": ["tests/test_core_masks.py"], "functions": ["dim_outside", "_ring", "crop_box", "crop_view"]},
    "neuroscribe/ablate/cut.py": {  # the cut model that scores units from one pass up to their layer
        "tests": ["tests/test_cut.py"],
        "functions": ["_LeafTracer.__init__", "_LeafTracer.is_leaf_module", "LayerGraph.__init__", "LayerGraph.trace",
                      "LayerGraph.order", "LayerGraph.split", "LayerGraph._split", "hooks_skipped", "_state", "_same",
                      "_same_dict", "_restore", "_fresh", "cut_correct"]},
}

KILLED = {"killed", "timeout", "segfault"}  # the tests failed (a timeout or a crash is a failure too)


@dataclass
class Equivalent:
    name: str
    line: str
    reason: str
    lineno: int


@dataclass
class FileResult:
    path: str
    seconds: float
    rc: int
    status: dict[str, str] = field(default_factory=dict)  # mutant name -> mutmut status
    changed: dict[str, list[str]] = field(default_factory=dict)  # mutant name -> its changed lines


def module_of(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def slug(path: str) -> str:
    return path.removesuffix(".py").replace("/", "-")


def patterns(path: str, functions: list[str] | None) -> list[str]:
    """mutmut mutant-name globs for ``functions`` (``name`` or ``Class.method``) of ``path``; [] = all."""
    mod = module_of(path)
    out = []
    for f in functions or []:
        cls, _, name = f.rpartition(".")
        out.append(f"{mod}.xǁ{cls}ǁ{name}__mutmut_*" if cls else f"{mod}.x_{name}__mutmut_*")
    return out


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def mutmut_config(path: str, tests: list[str]) -> dict:
    """The committed ``[tool.mutmut]`` with this file's ``only_mutate`` and test selection."""
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    cfg = dict(base)
    cfg.update(source_paths=["neuroscribe"], only_mutate=[path], pytest_add_cli_args_test_selection=list(tests),
               use_git_change_detection=False)
    return cfg


def prepare(path: str, tests: list[str], keep: bool) -> Path:
    """``build/mutation/<file>/``: package, the listed tests, a pyproject.toml configured for this file."""
    work = WORK / slug(path)
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    # the package, with its source mtimes (mutmut compares them with its mutants' to know what to regenerate)
    shutil.copytree(ROOT / "neuroscribe", work / "neuroscribe", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if (work / "tests").exists():
        shutil.rmtree(work / "tests")
    (work / "tests").mkdir()
    for f in {"tests/conftest.py", *(t.split("::")[0] for t in tests)}:
        shutil.copy2(ROOT / f, work / f)
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
    text += "\n[tool.mutmut]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in mutmut_config(path, tests).items())
    (work / "pyproject.toml").write_text(text)
    return work


def mutmut_command() -> list[str]:
    exe = Path(sys.executable).with_name("mutmut")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from mutmut.__main__ import cli; sys.exit(cli())"]


def function_sources(work: Path, path: str) -> dict[str, list[str]]:
    """Source lines of every generated function (original and mutants) of the mutated file, by name."""
    spans = json.loads((work / "mutants" / (path + ".spans")).read_text())["spans"]
    lines = (work / "mutants" / path).read_text().splitlines()
    return {name: lines[a - 1:b] for name, (a, b) in spans.items()}


def changed_lines(sources: dict[str, list[str]], key: str) -> list[str]:
    """The lines a mutant changes (stripped), from its function and the original (``..__mutmut_orig``)."""
    fn = key.rsplit(".", 1)[1]
    base = fn.rsplit("__mutmut_", 1)[0]
    orig, mut = sources.get(base + "__mutmut_orig"), sources.get(fn)
    if orig is None or mut is None:
        return []
    mut = [line.replace(fn, base + "__mutmut_orig") for line in mut]  # the def lines differ in the name only
    return [line[2:].strip() for line in difflib.ndiff(orig, mut) if line.startswith("+ ")]


def run_file(path: str, spec: dict, args) -> FileResult:
    from mutmut.stats import status_by_exit_code

    tests = spec["tests"]
    globs = patterns(path, spec.get("functions"))
    work = prepare(path, tests, args.keep)
    names = args.mutants or globs
    cmd = mutmut_command() + ["run", "--max-children", str(args.max_children), *names]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    log = work / "mutmut.log"
    print(f"{path}: mutmut on {', '.join(spec.get('functions') or ['every function'])} with {' '.join(tests)} "
          f"(log: {log.relative_to(ROOT)})", flush=True)
    t0 = time.monotonic()
    with open(log, "w") as out:
        rc = subprocess.call(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    res = FileResult(path, time.monotonic() - t0, rc)
    meta = work / "mutants" / (path + ".meta")
    if not meta.exists():
        return res
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    sources = function_sources(work, path)
    for key, code in codes.items():
        if names and not any(fnmatch.fnmatchcase(key, g) for g in names):
            continue
        res.status[key] = status_by_exit_code[code]
        res.changed[key] = changed_lines(sources, key)
    return res


def read_equivalent() -> tuple[list[Equivalent], list[str]]:
    entries, errors = [], []
    if not EQUIVALENT.exists():
        return entries, errors
    for i, raw in enumerate(EQUIVALENT.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(" :: ", 2)]
        if len(parts) != 3 or not all(parts):
            errors.append(f"{EQUIVALENT.name}:{i}: expected 'NAME :: MUTATED LINE :: REASON'")
            continue
        entries.append(Equivalent(parts[0], parts[1], parts[2], i))
    return entries, errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", metavar="FILE", help="run only this target (repeatable)")
    ap.add_argument("--keep", action="store_true", help="reuse build/mutation/<file>/ (mutmut's cached results)")
    ap.add_argument("--mutants", nargs="+", metavar="GLOB", help="(re)run only these mutant names (with --only)")
    ap.add_argument("--max-children", type=int, default=1, help="mutmut worker processes (default 1)")
    ap.add_argument("--show", type=int, default=20, help="surviving mutants to print per file")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.only or []) - set(TARGETS))
    if unknown:
        ap.error(f"not in TARGETS: {unknown}; known: {sorted(TARGETS)}")
    if args.mutants and len(args.only or []) != 1:
        ap.error("--mutants needs exactly one --only FILE")
    equivalent, errors = read_equivalent()
    by_name = {e.name: e for e in equivalent}
    total_k = total_n = 0
    lines = []
    t_all = time.monotonic()
    for path, spec in TARGETS.items():
        if args.only and path not in args.only:
            continue
        res = run_file(path, spec, args)
        if res.rc != 0 or not res.status:
            errors.append(f"{path}: mutmut exited with {res.rc} ({len(res.status)} mutants read); "
                          f"see {(WORK / slug(path) / 'mutmut.log').relative_to(ROOT)}")
        counts: dict[str, int] = {}
        survivors, n_equiv = [], 0
        for key, status in res.status.items():
            e = by_name.get(key)
            if e is not None:
                if e.line not in res.changed[key]:
                    errors.append(f"{EQUIVALENT.name}:{e.lineno}: {key} now changes {res.changed[key]}, "
                                  f"not {e.line!r} (stale entry: mutants renumbered?)")
                elif status in KILLED:
                    errors.append(f"{EQUIVALENT.name}:{e.lineno}: {key} is listed as equivalent but was {status}")
                else:
                    n_equiv += 1
                    continue
            counts[status] = counts.get(status, 0) + 1
            if status not in KILLED:
                survivors.append(key)
        if not args.mutants:  # a full run sees every mutant of the file: list entries it never produced
            mod = module_of(path) + "."
            for e in equivalent:
                if e.name.startswith(mod) and e.name not in res.status and (
                        not spec.get("functions") or any(fnmatch.fnmatchcase(e.name, g)
                                                          for g in patterns(path, spec.get("functions")))):
                    errors.append(f"{EQUIVALENT.name}:{e.lineno}: {e.name} is not a mutant of this run")
        n = sum(counts.values())
        k = sum(v for s, v in counts.items() if s in KILLED)
        total_k, total_n = total_k + k, total_n + n
        report = WORK / slug(path) / "survivors.txt"
        report.write_text("".join(f"{key} [{res.status[key]}]\n" + "".join(f"    {l}\n" for l in res.changed[key])
                                  for key in survivors))
        for key in survivors[:args.show]:
            print(f"  {res.status[key]}: {key}: {' | '.join(res.changed[key])}")
        if len(survivors) > args.show:
            print(f"  ... {len(survivors) - args.show} more in {report.relative_to(ROOT)}")
        other = ", ".join(f"{v} {s}" for s, v in sorted(counts.items()) if s != "killed")
        lines.append(f"{path}: {k}/{n} killed ({100 * k / max(n, 1):.1f} %), {n_equiv} equivalent"
                     + (f"; {other}" if other else "") + f"; {res.seconds / 60:.1f} min")
        print(lines[-1], flush=True)
    for e in errors:
        print("error:", e)
    print(f"total time {(time.monotonic() - t_all) / 60:.1f} min")
    for line in lines:
        print(line)
    score = 100 * total_k / max(total_n, 1)
    print(f"mutation score: {total_k}/{total_n} killed ({score:.1f} %)")
    return 1 if errors or score < THRESHOLD or total_n == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
