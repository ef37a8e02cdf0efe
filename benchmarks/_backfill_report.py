"""Markdown report of bench_backfill_online (kept apart: the bench stays short)."""

from __future__ import annotations

from typing import Any

import numpy as np

from _backfill_sim import BEFORE, CANDIDATES, DEFAULT, RULES, VARIANTS
from galleria.upgrade.merge import area_under_curve, linear_area

ORACLE = "oracle: best rule on the REAL queries at each check (uses labels)"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _pct(e: dict[str, Any]) -> str:
    return "-" if e["gain_pct_of_gap"] is None else f"{e['gain_pct_of_gap']:+.0f}"


def claims_table(res: dict[str, Any], short: dict[str, str]) -> list[str]:
    lines = ["| data | pair | order | old | new | gap | noise | default AUC - line | % of gap "
             "| 15 % resolvable | min - old (0-75 %) | NFR default / naive | AUC >= 15 % "
             "| never below | NFR below | merge unless old wins, % | old until rank-merge / "
             "psi / fused wins, % | previous default (no ensemble), % | before, % |",
             "|" + "---|" * 19]
    others = [n for n in VARIANTS if n != DEFAULT]
    for r in res["rows"]:
        d = r["rules"][DEFAULT]
        c = d["claims"]
        lines.append(
            f"| {r['task']} | {short[r['old_model']]} -> {short[r['new_model']]} | {r['order']} "
            f"| {r['old']:.2f} | {r['new']:.2f} | {r['gap']:+.2f} | {r.get('noise', 0):.2f} "
            f"| {d['auc_minus_line']:+.2f} | {_pct(d)} | "
            f"{'yes' if r.get('resolvable') else 'no'} | {d['min_minus_old']:+.2f} | "
            f"{d['nfr_interior']:.2f} / {r['rules']['naive']['nfr_interior']:.2f} | "
            f"{_yes(c['auc'])} | {_yes(c['never_below_old'])} | {_yes(c['nfr_below_naive'])} "
            + "".join(f"| {_pct(r['rules'][o])} " for o in others)
            + f"| {_pct(r['rules'][BEFORE])} |")
    return lines


def agreement_table(res: dict[str, Any], short: dict[str, str]) -> list[str]:
    lines = ["| data | pair | order | checks | pseudo-queries | rule pairs compared | "
             "pseudo order = real order | default's regret (points) | checks choosing old |",
             "|" + "---|" * 9]
    for r in res["rows"]:
        a = r.get("agreement") or {}
        if not a:
            continue
        agree = "-" if a["agree_pct"] is None else f"{a['agree_pct']:.0f} %"
        regret = "-" if a["regret"] is None else f"{a['regret']:.2f}"
        old = "-" if a["old_only_pct"] is None else f"{a['old_only_pct']:.0f} %"
        lines.append(f"| {r['task']} | {short[r['old_model']]} -> {short[r['new_model']]} | "
                     f"{r['order']} | {a['checks']} | {r.get('pseudo_queries', '?')} | "
                     f"{a['pairs']} | {agree} | {regret} | {old} |")
    return lines


def decisions_text(r: dict[str, Any]) -> str:
    """The default's rule at each fraction (first seed / fold), with the check's MRRs."""
    d = r["decisions"][0][0]
    parts = []
    for x in d["in_force"]:
        if "rules" not in x:
            continue
        mrr = ", ".join(f"{k} {v:.1f}" for k, v in x["pseudo_mrr"].items())
        real = ", ".join(f"{k} {v:.1f}" for k, v in x["real"].items())
        parts.append(f"{int(100 * x['fraction'])}%: **{x['rules'][DEFAULT]}** (pseudo MRR "
                     f"{mrr}; real {real})")
    fits = ", ".join(str(f["pairs"]) for f in d["fits"] if f["pairs"])
    return ("at each check (first seed): " + "; ".join(parts)
            + f". psi fits at {fits or 'none (fewer pairs than first_at)'} pairs (phi at "
            "each of them and, before any item moves, on the pseudo-query pairs alone).")


def oracle(r: dict[str, Any], fractions: np.ndarray) -> dict[str, Any] | None:
    """The curve of choosing, at each check, the candidate rule best on the real queries
    (old-only, rank-merge, both, psi, fused, ensemble, with the psi and phi in force): the
    ceiling of any label-free choice among these rules. From the per-check real metrics
    the bench stores (``decisions[seed][fold].in_force[].real``); at a fraction no check
    has reached yet, the best of the candidates' mean curves. ``None`` for the ``queries``
    order (its curves are popularity-weighted; the stored per-check metrics are not)."""
    if r["order"] == "queries" or not r.get("decisions"):
        return None
    cands = [r["rules"][name]["curve"] for name in CANDIDATES.values() if name in r["rules"]]
    per_seed = []
    for folds in r["decisions"]:
        if len(folds) != 1:
            return None
        curve = []
        for i, e in enumerate(folds[0]["in_force"]):
            if i == len(fractions) - 1:
                curve.append(r["new"])
            elif i == 0 and not e.get("real"):
                curve.append(r["old"])
            elif e.get("real"):
                curve.append(max(e["real"].values()))
            else:
                curve.append(max(c[i] for c in cands))
        per_seed.append(curve)
    mean = np.mean(per_seed, axis=0)
    gain = area_under_curve(fractions, mean) - linear_area(r["old"], r["new"])
    return {"curve": np.round(mean, 3).tolist(), "auc_minus_line": round(float(gain), 3),
            "gain_pct_of_gap": round(100 * gain / abs(r["gap"]), 1) if abs(r["gap"]) > 1e-9
            else None}


def oracle_table(res: dict[str, Any], short: dict[str, str], fractions: np.ndarray
                 ) -> list[str]:
    lines = ["| data | pair | order | gap | default AUC - line | default % of gap | oracle "
             "AUC - line | oracle % of gap |", "|" + "---|" * 8]
    for r in res["rows"]:
        o = oracle(r, fractions)
        d = r["rules"][DEFAULT]
        head = (f"| {r['task']} | {short[r['old_model']]} -> {short[r['new_model']]} | "
                f"{r['order']} | {r['gap']:+.2f} | {d['auc_minus_line']:+.2f} | {_pct(d)} | ")
        lines.append(head + ("n/a (popularity-weighted curves) | n/a |" if o is None else
                             f"{o['auc_minus_line']:+.2f} | {_pct(o)} |"))
    return lines


def seed_exceptions(res: dict[str, Any]) -> str:
    """`` (caltech101: [0])`` for the rows run with other seeds (``--update`` runs)."""
    other = sorted({(r["task"], r["order"], tuple(r["seeds"])) for r in res["rows"]
                    if r.get("seeds") is not None and list(r["seeds"]) != list(res["seeds"])})
    return (" (" + "; ".join(f"{t} {o} order: {list(s)}" for t, o, s in other) + ")") \
        if other else ""


def report_markdown(res: dict[str, Any], short: dict[str, str], fractions: np.ndarray,
                    target: float) -> str:
    lines = [
        "# Online backfilling with no labels: online psi, pseudo-query check, query order",
        "",
        f"Machine: {res['machine'].get('cpu', '?')}, one thread. Seeds: {res['seeds']}"
        f"{seed_exceptions(res)}. "
        f"Total {res.get('seconds', 0):.0f} s. Load: {res.get('load_before', '?')}. Produced "
        "by benchmarks/bench_backfill_online.py (simulation on cached real embeddings; "
        "protocol in benchmarks/_backfill_sim.py).",
        "",
        "Values in percent, mean over seeds (random order: 3 permutations; query order: 3 "
        "seeded splits of the queries into a traffic half that shapes the order and an "
        "evaluated half, both ways; hubs order: the items most often among the old "
        "model's 10 nearest neighbours of the others first, no traffic). *default* = "
        "`auto`: at each check the job's pseudo-query check picks the best merge rule "
        "(rank-merge, or both / psi / fused / ensemble when they beat it) and serves it only "
        "once it beats the old model's own answers (old-only) by a one-sided 95 % bound; "
        "old answers until then, the new model at finish. "
        "AUC = mean height over 0-100 %; *line* = straight line old -> new; gap = new - old. "
        "NFR = negative-flip rate (top-1 right with the old model, wrong now), mean over "
        "10-75 % (where neither the default nor the naive merge flips any query, NFR below "
        "is counted as met). AUC is on the 6-point grid: serving the old answers until "
        "100 % scores +37.5 % of |gap| on it. "
        "Caltech-101: test queries -> train gallery, mAP@R; SMVS: 400 phone photos "
        "-> all 500 images (self excluded), mAP; UKBench56: leave-one-out mAP.",
        "",
        f"## The issue's claims for the default (AUC - line >= {int(100 * target)} % of "
        "|gap|, never below the old model before 100 %, NFR below the naive merge)", "",
    ]
    lines += claims_table(res, short)
    lines += ["", "*noise*: the larger of the default's AUC - line spread over seeds and its "
              "bootstrap spread over the queries (points); *15 % resolvable*: 15 % of |gap| "
              "is at least twice the noise (rows marked no cannot show the criterion either "
              "way). *merge unless old wins* and *before* (the rule of the previous default: "
              "merge rules only, checked at psi fits) in % of gap; *previous default*: "
              "this default without the candidate ensemble. *ensemble*: every item by the "
              "mean of its Z-normed old-model and new-model scores, the new side of an item "
              "not moved yet from phi (a ridge map old -> new fitted on the moved items' "
              "pairs and the pseudo-queries' pairs at each psi fit).", "",
              "## The pseudo-query check against the real queries", "",
              "At each interior fraction the check runs on the gallery as it is (the items "
              "moved so far) with the candidates old-only, rank-merge, both and, once psi and "
              "phi are fitted, psi, fused and ensemble (its pseudo-query ranks cross-fitted: "
              "each half of the pseudo-queries answered with a phi fitted without that "
              "half's pairs). *pseudo order = real order*: over every pair of "
              "candidates whose real-query metric differs by more than 0.1 point, how "
              "often the pseudo-query MRR orders them the same way; *regret*: real metric of "
              "the best candidate minus the default's choice, mean over checks.", ""]
    lines += agreement_table(res, short)
    lines.append("")
    lines += ["## Oracle: the ceiling of a label-free rule choice (uses labels)", "",
              "**Not a method: it reads the real queries' labels.** At each check, the "
              "candidate rule (old-only, rank-merge, both, psi, fused, ensemble; psi and phi "
              "as fitted by then) that is best on the real queries' metric at that point, from the "
              "per-check real metrics this bench stores; before the first check, the best "
              "candidate curve. No label-free choice among the existing rules can do better, "
              "so a row whose oracle is below 15 % of |gap| cannot meet the criterion by "
              "choosing better among them. Computed from the JSON (no re-run); the "
              "`queries` order is left out (its curves weight queries by popularity, the "
              "stored per-check metrics do not).", ""]
    lines += oracle_table(res, short, fractions)
    lines.append("")
    lines += ["## Curves", ""]
    for r in res["rows"]:
        lines.append(f"### {r['task']}, {short[r['old_model']]} -> {short[r['new_model']]}, "
                     f"{r['order']} order ({r['metric']}; old {r['old']:.2f}, new "
                     f"{r['new']:.2f}; {r['queries']} queries, {r['gallery']} gallery items)")
        lines.append("")
        head = ["rule"] + [f"{int(100 * f)}%" for f in fractions] + [
            "AUC - line", "% of gap", "min - old", "NFR"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for name in RULES:
            e = r["rules"][name]
            pct = "" if e["gain_pct_of_gap"] is None else f"{e['gain_pct_of_gap']:+.0f}"
            lines.append("| " + " | ".join(
                [("**" + name + "**") if name == DEFAULT else name]
                + [f"{v:.2f}" for v in e["curve"]]
                + [f"{e['auc_minus_line']:+.2f}", pct, f"{e['min_minus_old']:+.2f}",
                   f"{e['nfr_interior']:.2f}"]) + " |")
        o = oracle(r, fractions)
        if o is not None:
            pct = "" if o["gain_pct_of_gap"] is None else f"{o['gain_pct_of_gap']:+.0f}"
            lines.append("| " + " | ".join([ORACLE] + [f"{v:.2f}" for v in o["curve"]]
                                           + [f"{o['auc_minus_line']:+.2f}", pct, "", ""])
                         + " |")
        lines += ["", "Default's rule " + decisions_text(r), ""]
    lines += ["## Cost", "", "Online psi (ridge, closed form; one thread): seconds per fit "
              "at each pair count of the schedule, phi (old -> new, the same ridge on the moved "
              "and the pseudo-query pairs) at the same points, and the pseudo-query check "
              "(its merged searches of the pseudo-queries, and the two fold phis of "
              "ensemble's cross-fit, before any item moves included) over all fits of one "
              "backfill "
              f"(load before: {res.get('load_before_costs', '?')}).", "",
              "| data, pair | psi fits: pairs (s) | all psi fits (s) | all phi fits (s) | "
              "all checks, with their fold phis (s) | gallery |",
              "|---|---|---|---|---|---|"]
    for key, c in res["fit_costs"].items():
        fits = ", ".join(f"{f['pairs']} ({f['fit_s']:.3f})" for f in c["fits"]) or "none"
        phi = c.get("phi_fit_total_s")
        lines.append(f"| {key} | {fits} | {c['fit_total_s']:.2f} | "
                     f"{'-' if phi is None else f'{phi:.2f}'} | {c['check_total_s']:.2f} "
                     f"| {c['gallery']} |")
    q = res["query_costs"]
    lines += ["", "Query cost (ms per query, batch 1, one thread; forward: "
              + ", ".join(f"{short[m]} {v:.1f}" for m, v in q["forward_ms"].items())
              + f"; exact search of one part ({q['gallery']} x 1280) {q['search_ms']:.2f}; "
              f"merge {q['merge_ms']:.3f}, Z-norm merge {q['znorm_merge_ms']:.3f}; "
              f"psi {q['psi_ms']:.3f}):", "",
              "| rule | " + " | ".join(res["rule_costs"]) + " |",
              "|---|" + "---|" * len(res["rule_costs"])]
    names = list(next(iter(res["rule_costs"].values())))
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{c[name]:.1f}"
                                                  for c in res["rule_costs"].values()) + " |")
    lines.append("")
    return "\n".join(lines)
