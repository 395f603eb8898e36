"""The MILAN study's tables: the variants, mean and 95 % CI over seeds, the share of the gap closed (alone and paired
per seed against the controls), the issues' verdicts and the Markdown report. Kept apart from ``milan_study.py``
(which runs the jobs) so ``--markdown-only`` and the tests read results without running anything."""

import numpy as np
from scipy import stats

from neuroscribe.datasets.cues import describe_cue
from neuroscribe.pipeline import STAGES

SETS = ["in-distribution", "wrong-text", "wrong-text-new-style"]  # clean, the cued test set, the new style: see
# use_sets (the names of the config's non-probe shifts: another cue kind's study names its own)


def use_sets(names) -> None:
    """Point :data:`SETS` at ``["in-distribution", cued test set, new-style test set]``."""
    SETS[:] = ["in-distribution", *list(names)[:2]]


VARIANTS = ("base", "ablated", "ablated_evidence", "ablated_both", "refit", "dfr", "ablated_dfr", "ablated_dfr_tuned",
            "random", "sort_all")


def in_order(d: dict) -> list[str]:
    """The keys of ``d`` in VARIANTS order (others after, as they come)."""
    return [v for v in VARIANTS if v in d] + [v for v in d if v not in VARIANTS]


LABEL = {"base": "spurious model, no ablation", "ablated": "ablated: flagged by descriptions (headline)",
         "ablated_evidence": "ablated: flagged by evidence", "ablated_both": "ablated: descriptions + evidence",
         "refit": "descriptions + last layer re-fit", "dfr": "DFR alone (group-balanced last-layer re-fit)",
         "ablated_dfr": "descriptions + DFR", "ablated_dfr_tuned": "descriptions + DFR, N chosen with DFR",
         "random": "control: random units (5 draws, mean)",
         "sort_all": "control: sort-all units", "reference": "reference: trained on clean images"}


def mean_ci(values) -> dict:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if len(a) == 0:
        return {"mean": None, "ci95_half": None, "n": 0}
    half = float(stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else None
    return {"mean": float(a.mean()), "ci95_half": half, "n": int(len(a))}


def fmt(m: dict, scale: float = 100.0, sign: bool = False) -> str:
    if m["mean"] is None:
        return "-"
    s = f"{scale * m['mean']:+.1f}" if sign else f"{scale * m['mean']:.1f}"
    return s + (f" ± {scale * m['ci95_half']:.1f}" if m["ci95_half"] is not None else "")


def fmt_auc(m: dict) -> str:
    if m["mean"] is None:
        return "-"
    return f"{m['mean']:.2f}" + (f" ± {m['ci95_half']:.2f}" if m["ci95_half"] is not None else "")


def gap_closed_share(per: dict, refs: list, variants) -> tuple[dict, dict]:
    """``({variant: mean_ci of gain / gap}, {"reference_drop": mean_ci})`` on wrong-text: per seed, the variant's
    gain over the spurious model divided by the gap from that model to the clean-trained reference (the mean over
    reference seeds); the reference's drop from clean to wrong-text val is what the drawn cue costs a model that
    never used it. Both empty without a reference."""
    if not refs:
        return {}, {}
    ref_wrong = float(np.mean([r["results"][SETS[1]]["acc"] for r in refs]))
    drop = mean_ci([r["results"]["in-distribution"]["acc"] - r["results"][SETS[1]]["acc"] for r in refs])
    return ({v: mean_ci([_share(per[k]["accuracy"][v][SETS[1]] - per[k]["accuracy"]["base"][SETS[1]], ref_wrong,
                                per[k]["accuracy"]["base"][SETS[1]]) for k in per]) for v in variants},
            {"reference_drop": drop})


def _share(diff: float, ref_wrong: float, base_wrong: float) -> float | None:
    """``diff`` as a share of the seed's gap (reference minus spurious model on the cued set); None when the model
    is not below the reference there (no gap to close: a share would be meaningless or huge). ``mean_ci`` skips it."""
    gap = ref_wrong - base_wrong
    return diff / gap if gap > 0 else None


PAIRED = {"ablated - best random draw": ("ablated", "random_best"), "ablated - sort-all": ("ablated", "sort_all"),
          "ablated + DFR - DFR alone": ("ablated_dfr", "dfr"),
          "ablated + DFR (N chosen with DFR) - DFR alone": ("ablated_dfr_tuned", "dfr")}


def paired_gap_closed(per: dict, refs: list) -> dict:
    """``{comparison: mean_ci}`` of per-seed paired differences in the share of the gap closed on wrong-text (the
    same denominator as :func:`gap_closed_share`): the headline minus the best of its random draws (the strongest
    control of that seed), minus sort-all, and descriptions + DFR minus DFR alone. A CI whose lower end is above 0
    is the issue's "CI lower end above the control". Empty without a reference or a variant."""
    if not refs:
        return {}
    ref_wrong = float(np.mean([r["results"][SETS[1]]["acc"] for r in refs]))
    out = {}
    for name, (a, b) in PAIRED.items():
        rows = []
        for k in per:
            acc = per[k]["accuracy"]
            if a not in acc or (b not in acc and b != "random_best"):
                break
            other = acc["random_range"][SETS[1]][1] if b == "random_best" else acc[b][SETS[1]]
            rows.append(_share(acc[a][SETS[1]] - other, ref_wrong, acc["base"][SETS[1]]))
        else:
            out[name] = mean_ci(rows)
    return out


def lower_end(m: dict) -> float | None:
    """The 95 % CI's lower end of a ``mean_ci``; None without an interval (one seed gives none)."""
    return None if m.get("mean") is None or m.get("ci95_half") is None else m["mean"] - m["ci95_half"]


def merged_origin(m: dict) -> list[str]:
    """Where the carried seeds of a ``--merge`` came from when the old run was itself merged or had its flag
    quality measured again: one line each, down the chain."""
    lines = []
    if m.get("flag_truth_command"):
        lines.append(f"Their flag quality as measured again there: {m['flag_truth_command']}.")
    if (o := m.get("merged_from")):
        lines.append(f"That run had itself merged seeds {', '.join(map(str, o['seeds'])) or 'none'} and references "
                     f"{', '.join(map(str, o['references'])) or 'none'} from the run of {o['finished']} ({o['file']}).")
        lines += merged_origin(o)
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def verdict(res: dict) -> list[str]:
    """The targets of the robustness and description issues (#14, #13), each judged on every part it names (mean,
    the 95% CI's lower end, every seed); MILAN's own figure beside them. Without an interval (one seed) a target
    that names a CI is not met."""
    per, agg = res["per_seed"], res["aggregate"]
    gain, closed = agg["gain"], agg.get("gap_closed") or {}
    paired = paired_gap_closed(per, res.get("reference") or [])
    seeds = list(per)
    none = {"mean": None, "ci95_half": None, "n": 0}

    def seed_pts(v, s=SETS[1]):
        return ", ".join(f"{100 * (per[k]['accuracy'][v][s] - per[k]['accuracy']['base'][s]):+.1f}" for k in seeds)

    def share(m):
        lo = lower_end(m)
        return f"{fmt(m)} % (95% CI lower end " + ("-: no interval" if lo is None else f"{100 * lo:.1f}") + ")"

    def above(m):  # a paired difference whose CI lower end is above 0
        lo = lower_end(m)
        return lo is not None and lo > 0, ("no interval" if lo is None else f"lower end {100 * lo:+.1f}")

    out = []
    if closed.get("ablated", none)["mean"] is not None:
        m, d = closed["ablated"], paired.get("ablated - best random draw", none)
        ok, lo = above(d)
        out.append(f"description-chosen ablation closes {share(m)} of the gap; paired against each seed's best "
                   f"random draw {fmt(d, sign=True)} % of the gap ({lo}; against sort-all "
                   f"{fmt(paired.get('ablated - sort-all', none), sign=True)}). Target >= 30 % with the CI's lower "
                   f"end above the best control: {_met(m['mean'] >= 0.30 and ok)} (mean "
                   + (">=" if m["mean"] >= 0.30 else "<") + f" 30 %; paired {lo}" + (" > 0)" if ok else ")"))
    for v, pair, how in (("ablated_dfr", "ablated + DFR - DFR alone", "the headline's N"),
                         ("ablated_dfr_tuned", "ablated + DFR (N chosen with DFR) - DFR alone",
                          "N chosen on validation for ablation + DFR together")):
        if closed.get(v, none)["mean"] is None:
            continue
        m, d = closed[v], paired.get(pair, none)
        ok, lo = above(d)
        beats = [per[k]["accuracy"][v][SETS[1]] > per[k]["accuracy"]["dfr"][SETS[1]] for k in seeds]
        out.append(f"ablation + DFR ({how}) closes {share(m)}; DFR alone {share(closed.get('dfr', none))}; + DFR - "
                   f"DFR alone paired {fmt(d, sign=True)} ({lo}; higher in {sum(beats)} of {len(beats)} seeds). Target "
                   f">= 60 % and above DFR alone: {_met(m['mean'] >= 0.60 and ok)}")
    for v in ("ablated", "ablated_dfr", "ablated_dfr_tuned"):
        if v in gain:
            drops = [per[k]["accuracy"][v]["in-distribution"] - per[k]["accuracy"]["base"]["in-distribution"]
                     for k in seeds]
            within = sum(d >= -0.01 for d in drops)
            out.append(f"clean val change, {LABEL[v]}: per seed {seed_pts(v, 'in-distribution')} points; within 1 "
                       f"point in {within} of {len(drops)} seeds. Target every seed: {_met(within == len(drops))}")
    fl = agg.get("flags", {}).get("description")
    if fl:
        parts = []
        for key, label, goal, scale, le in (("share", "share", 0.15, 100, True), ("precision", "precision", 0.5, 100,
                                            False), ("recall", "recall", 0.7, 100, False), ("auc", "ranking AUC", 0.9,
                                                                                           1, False)):
            m = fl.get(key, none)
            shown = fmt_auc(m) if scale == 1 else f"{fmt(m)} %"
            ok = m["mean"] is not None and (m["mean"] <= goal if le else m["mean"] >= goal)
            parts.append(f"{label} {shown} ({'<=' if le else '>='} {goal * scale:g}: {_met(ok)})")
        out.append("description flags (means over seeds): " + ", ".join(parts))
    n_of = {"text": len(seeds), "clean": len(res.get("reference") or [])}
    for who, key in (("text-trained", "text"), ("clean-trained reference", "clean")):
        f = (agg.get("final_layer") or {}).get(key)
        if f:
            ok = sum(n >= 0.9 * f["units"] for n in f["per_seed"])
            out.append(f"final layer, {who}: " + ", ".join(f"{n}/{f['units']}" for n in f["per_seed"])
                       + f" named; >= 9/10 in {ok} of {n_of[key]} seeds. Target every seed: {_met(ok == n_of[key])}")
    g = gain["ablated"][SETS[1]]
    milan = ("MILAN (section 7) reports +4.9 points on wrong-text" if SETS[1] == "wrong-text" else
             f"MILAN (section 7) reports +4.9 points on its text cue (it has no {SETS[1]} set)")
    out.append(f"{milan}; here, on {SETS[1]}, {fmt(g, sign=True)} (per seed "
               f"{seed_pts('ablated')}); controls with the same N: random units "
               f"{fmt(gain['random'][SETS[1]], sign=True)}, sort-all {fmt(gain['sort_all'][SETS[1]], sign=True)}")
    return out


def stage_minutes(seconds: dict | None) -> str:
    """" (train 5.8, probe 0.0, ...)": a seed's stage minutes in pipeline order (JSON files hold them key-sorted)."""
    if not seconds:
        return ""
    order = {k: i for i, k in enumerate(STAGES)}
    return " (" + ", ".join(f"{k} {v / 60:.1f}" for k, v in sorted(seconds.items(), key=lambda kv: (
        order.get(kv[0], len(order)), kv[0]))) + ")"


def markdown(res: dict) -> str:
    per, agg = res["per_seed"], res["aggregate"]
    seeds = list(per)
    c = res["config"]
    cue = c["job"]["train"]["cue"]
    L = [f"# MILAN section 7 on Imagenette: a spurious {cue['kind']} cue, described, flagged, "
         f"ablated ({len(seeds)} seeds)", "",
         f"Run {res['finished']} on {res['machine']}; {res['command']}.", "",
         *([f"Merged (`--merge`): seeds {', '.join(map(str, m['seeds'])) or 'none'} and references "
            f"{', '.join(map(str, m['references'])) or 'none'} as measured by the run of {m['finished']} "
            f"({m['file']}: {m['command']}); every other figure from this run.", *merged_origin(m), ""]
           if (m := res.get("merged_from")) else []),
         *([f"Flag quality measured again on the same jobs (the same flags; the ranking's AUC by the current rule): "
            f"{res['flag_truth_command']}.", ""] if res.get("flag_truth_command") else []),
         f"Setting: ResNet-18 from scratch at **{c['resolution']} px, {c['epochs']} epochs** (reduced from MILAN's "
         f"224 px so one seed fits ~30 min on 2 CPU cores), {describe_cue(cue, 'match')} on {c['fraction']:.0%} of "
         f"{c['n_train']} training photos; validation = {c['n_validation']} images of held-out training photos "
         f"({'half of them, the other half fitting DFR; ' if c['job']['ablate'].get('dfr') == 'holdout' else ''}"
         f"each photo clean and with {describe_cue(cue, 'wrong')}, the cue decorrelated from the label); probe = "
         f"{c['n_probe']} training photos; test = the {c['n_test']} Imagenette val photos, never used to choose "
         "anything. Accuracy in %, mean ± 95% CI half-width over seeds (t-distribution).", "",
         f"| variant | clean val | {SETS[1]} val | {SETS[2]} val |", "|---|---|---|---|"]
    for v in (*VARIANTS, "reference"):
        if v in agg["accuracy"]:
            L.append(f"| {LABEL[v]} | " + " | ".join(fmt(agg["accuracy"][v][s]) for s in SETS) + " |")
    L += ["", "Gain over the unablated spurious model (points; paired per seed):", "",
          f"| variant | clean val | {SETS[1]} val | {SETS[2]} val |", "|---|---|---|---|"]
    for v in in_order(agg["gain"]):  # the variants' order, whatever the JSON's (written with sorted keys)
        L.append(f"| {LABEL[v]} | " + " | ".join(fmt(agg["gain"][v][s], sign=True) for s in SETS) + " |")
    if agg.get("gap_closed"):
        drop = res["protocol"]["reference_drop"]
        L += ["", f"Share of the gap closed on {SETS[1]} val, gain / (clean-trained reference - spurious model), per "
              f"seed then mean ± 95% CI; the reference itself loses {fmt(drop)} points between clean and {SETS[1]} "
              "val (what the drawn cue costs a model that never used it):", "", "| variant | gap closed (%) |",
              "|---|---|"]
        L += [f"| {LABEL[v]} | {fmt(agg['gap_closed'][v])} |" for v in in_order(agg["gap_closed"])]
        pg = agg.get("paired_gap_closed", {})
        L += [f"| paired: {k} | {fmt(pg[k], sign=True)} |" for k in PAIRED if k in pg]  # PAIRED's order
    L += ["", f"Per seed ({SETS[1]} val %, base -> descriptions-ablated; N units chosen on validation):", ""]
    for s in seeds:
        a = per[s]["accuracy"]
        L.append(f"- seed {s}: {100 * a['base'][SETS[1]]:.1f} -> {100 * a['ablated'][SETS[1]]:.1f} "
                 f"(N = {per[s]['chosen_n'].get('description')} of {per[s]['candidates'].get('description')} "
                 f"candidates); clean {100 * a['base']['in-distribution']:.1f} -> "
                 f"{100 * a['ablated']['in-distribution']:.1f}; random draws {SETS[1]} range "
                 f"{100 * a['random_range'][SETS[1]][0]:.1f}-{100 * a['random_range'][SETS[1]][1]:.1f}; "
                 f"{per[s]['seconds'] / 60:.1f} min" + stage_minutes(per[s].get("stage_seconds")))
        if per[s].get("dfr_tuned"):
            t = per[s]["dfr_tuned"]
            L[-1] += ("; ablation + DFR, validation % by N: " + ", ".join(f"{n}: {100 * v:.1f}" for n, v in t["curve"])
                      + f" -> N = {t['chosen_n']}, {SETS[1]} {100 * a['ablated_dfr_tuned'][SETS[1]]:.1f}")
    L += ["", "Validation curves (accuracy % on the validation photos with N units of each flag set ablated, "
          "N = 0, 1, ...; the chosen N has the highest value, ties to the smaller N):", ""]
    for s in seeds:
        for k, curve in per[s]["curves"].items():
            L.append(f"- seed {s}, {k}: " + " ".join("-" if a is None else f"{100 * a:.1f}" for _, a in curve)
                     + f" -> N = {per[s]['chosen_n'][k]}")
    L += ["", "Flags (mean over seeds) and precision/recall against counterfactual ground truth "
          f"(top {100 * res['truth_share']:.0f}% of units per layer by the cue's effect ({SETS[1]}) on "
          f"{res['truth_images']} paired val photos):", "",
          "| flag set | units flagged | share | chosen N | precision | recall | ranking AUC |",
          "|---|---|---|---|---|---|---|"]
    pooled = agg.get("flags_pooled") or {}
    for k, m in [*agg["flags"].items(), *((f"{k}, pooled truth", m) for k, m in pooled.items())]:
        L.append(f"| {k} | {m['flagged']['mean']:.0f} | {fmt(m.get('share', {'mean': None}))} | "
                 f"{m['chosen_n']['mean']:.1f} | {fmt(m['precision'])} | {fmt(m['recall'])} | "
                 f"{fmt_auc(m.get('auc', {'mean': None}))} |")
    if pooled:
        L += ["", f"\"Pooled truth\": the top {100 * res['truth_share']:.0f}% of all units at once by the same effect "
              "(in clean-image standard deviations, comparable across layers) -- the issue's wording; the per-layer "
              "truth above stays the headline and the verdict's."]
    L += ["", "Final-layer check (the fc logit of each class described on the probe photos names that class):", ""]
    for r in res.get("reference", []):
        f = r.get("final_layer")
        if f:
            L.append(f"- clean-trained reference seed {r['seed']} (probe photos without the cue): "
                     f"{f['named']}/{f['units']}" + (f"; misses: {f['misses']}" if f["misses"] else ""))
    for s in seeds:
        f = per[s]["final_layer_check"]
        if f:
            bad = [f"{n} -> '{r['description']}'" for n, r in f["per_class"].items() if not r["names_class"]]
            L.append(f"- seed {s}: {round(f['accuracy'] * f['classes'])}/{f['classes']}"
                     + (f"; misses: {', '.join(bad)}" if bad else ""))
    L += ["", "Targets (issues #14 and #13; shares of the gap in %, paired per seed):", ""]
    for line in res["verdict"]:
        L.append(f"- {line}")
    return "\n".join(L) + "\n"
