"""The online backfill of the product, end to end on real images (issue 21).

Caltech-101 (test queries -> train gallery, 5,784 images): the gallery is
indexed with opennsfw-r50 by the Python API (``index_images``; item id = the
gallery row), then upgraded to effnet-lite0 with the default online config
(``start_upgrade(..., order="random", online=OnlineConfig())``) and moved by
``run_upgrade(limit=...)`` steps to 10 / 25 / 50 / 75 / 100 %, each step
running the job's own online fits and pseudo-query checks as ``galleria upgrade
run`` does. The 0 % point is measured twice: before any run (no decision yet:
``auto`` serves the old answers) and after a first run of one item (the job's
start check has run on the gallery as it is).

At each point the job's published decision is recorded and the real test
queries (embedded with both models by ``galleria.eval.embed.task_embeddings``,
the same extractors as the gallery's spaces: fingerprints asserted) are
answered by ``BackfillSearcher.open(g, rule=R, with_models=False)`` for R in
auto / old-only / both / ensemble / rank-merge, top-K with K = the largest class
of the gallery (so mAP@R is exact, no truncation). No label is seen by the job.

After ``finish_upgrade`` the gallery's top-10 (``open_searcher``, the searcher
of the CLI / API / service) is compared with exact search of the effnet-lite0
task embeddings of the gallery images (no second index).

Run:  nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_backfill_product.py
      [--classes N] (a seeded subset of N classes: their train images and test queries)
Writes benchmarks/results/backfill-product.{json,md} (``--out NAME`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from galleria.decision.open import open_searcher
from galleria.eval.datasets import load_task
from galleria.eval.embed import task_embeddings
from galleria.eval.metrics import per_query_metrics
from galleria.extract.job import index_images
from galleria.extractors.registry import create_extractor
from galleria.images.sources import SourceItem
from galleria.io.atomic import write_bytes, write_json
from galleria.store.gallery import Gallery
from galleria.upgrade.finish import finish_upgrade
from galleria.upgrade.job import order_ids, run_upgrade, start_upgrade
from galleria.upgrade.merge import area_under_curve, linear_area
from galleria.upgrade.online import OnlineConfig, decide_with_old
from galleria.upgrade.ridge import RidgePsi
from galleria.upgrade.search import BackfillSearcher
from galleria.upgrade.state import UpgradeError, require_upgrade

OUT = Path(__file__).resolve().parent / "results"
OLD, NEW = "opennsfw-r50", "effnet-lite0"
RULES = ("auto", "old-only", "both", "ensemble", "rank-merge")
FRACTIONS = (0.10, 0.25, 0.50, 0.75)
SIM = {"fractions": [0.10, 0.25, 0.50, 0.75], "auto_mapr": [58.0, 59.0, 60.3, 61.4],
       "old": 50.51, "new": 63.35, "auc_gain_pct_gap": 23.0,
       "source": "benchmarks/results/backfill-online.md (simulation on cached embeddings)"}


def uptime() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}  (load {os.getloadavg()[0]:.2f})", flush=True)


def subset(task: Any, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gallery rows and query rows kept (all, or those of ``classes`` seeded classes)."""
    g_rows = np.arange(task.num_gallery)
    q_rows = np.arange(task.num_queries)
    if classes:
        labels = np.unique(task.gallery_labels)
        keep = np.random.default_rng(seed).choice(labels, classes, replace=False)
        g_rows = np.flatnonzero(np.isin(task.gallery_labels, keep))
        q_rows = np.flatnonzero(np.isin(task.query_labels, keep))
    return g_rows, q_rows


def evaluate(g: Path, qo: np.ndarray, qn: np.ndarray, q_labels: np.ndarray,
             g_labels: np.ndarray, k: int) -> dict[str, Any]:
    """Each rule's R@1 / mAP@R (%) on the real queries, and what ``auto`` resolves to."""
    out: dict[str, Any] = {}
    with Gallery.open(g) as gal:
        for rule in RULES:
            t = time.perf_counter()
            try:
                s = BackfillSearcher.open(gal, rule=rule, with_models=False)
            except UpgradeError as exc:  # e.g. ensemble before the first phi fit
                out[rule] = {"mAP@R": None, "R@1": None, "served": None, "error": str(exc)}
                continue
            res = s.search_vectors(old_queries=qo, new_queries=qn, k=k)
            ranking = np.array([[int(i) if i not in ("", None) else -1 for i in row]
                                for row in res.ids], np.int64)
            m = per_query_metrics(ranking, q_labels, g_labels, metrics=("mAP@R", "R@1"))
            out[rule] = {"mAP@R": round(100 * float(m["mAP@R"].mean()), 2),
                         "R@1": round(100 * float(m["R@1"].mean()), 2),
                         "served": s.rule, "search_s": round(time.perf_counter() - t, 2)}
    return out


def decision_of(g: Path) -> dict[str, Any]:
    with Gallery.open(g) as gal:
        st = require_upgrade(gal)
        d = dict(st.online.get("decision") or {})
        moved = len(gal.ids(st.new_space))
        total = len(gal.ids())
    keep = ("rule", "verdict", "pairs", "moved", "phi_pairs", "fit_s", "phi_fit_s", "check_s",
            "total_s", "alpha")
    out = {k: d[k] for k in keep if k in d}
    scores = d.get("scores") or {}
    out["scores_mrr"] = {r: round(float(v["mrr"]), 4) if isinstance(v, dict) and "mrr" in v
                         else v for r, v in scores.items()}
    out["scores"] = scores  # per rule: mrr, gain over rank-merge, one-sided 95 % lower bound
    out["moved_now"], out["total"] = moved, total
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=0, help="seeded subset of N classes (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="backfill-product")
    ap.add_argument("--sim-order", action="store_true",
                    help="move items in the simulation's random order (np.random.default_rng("
                         "seed).permutation, as benchmarks/_backfill_sim.py), through the job's "
                         "`priority` order (item meta), instead of the job's own random order")
    ap.add_argument("--sim-check", action="store_true",
                    help="the simulation's own 10 %% check (benchmarks/_backfill_sim.py, cached "
                         "embeddings) on the moved sets of the product's orders")
    ap.add_argument("--replot", action="store_true", help="rewrite the markdown from the JSON")
    args = ap.parse_args()
    if args.sim_check:
        write_json(OUT / f"{args.out}-simcheck.json", sim_check())
        return 0
    if args.replot:
        result = json.loads((OUT / f"{args.out}.json").read_text())
        runs = [json.loads(f.read_text()) for f in sorted(OUT.glob(f"{args.out}-*.json"))
                if not f.name.endswith(".partial.json")]
        runs = [r for r in runs if "points" in r]
        text = render(result) + (render_runs([result, *runs]) if runs else "")
        sim = OUT / f"{args.out}-simcheck.json"
        if sim.is_file():
            text += render_sim_check(json.loads(sim.read_text()))
        write_bytes(OUT / f"{args.out}.md", text.encode())
        return 0
    t_all = time.perf_counter()
    load_start = uptime()
    task = load_task("caltech101")
    g_rows, q_rows = subset(task, args.classes, args.seed)
    old_ext = create_extractor(OLD, threads=args.threads)
    new_ext = create_extractor(NEW, threads=args.threads)
    log("task embeddings (cached on disk)")
    qo_all, go_all = task_embeddings(task, create_extractor(OLD, threads=args.threads))
    qn_all, gn_all = task_embeddings(task, create_extractor(NEW, threads=args.threads))
    qo, qn = qo_all[q_rows], qn_all[q_rows]
    gn = gn_all[g_rows]
    q_labels, g_labels = task.query_labels[q_rows], task.gallery_labels[g_rows]
    k = int(np.bincount(np.unique(g_labels, return_inverse=True)[1]).max())
    n = len(g_rows)
    files = task.gallery_files()
    meta = [{} for _ in range(n)]
    if args.sim_order:  # rank r in the simulation's permutation -> priority n - r
        for rank, j in enumerate(np.random.default_rng(args.seed).permutation(n)):
            meta[int(j)] = {"priority": str(n - rank)}
    items = [SourceItem(id=str(j), path=files[int(r)], meta=meta[j])
             for j, r in enumerate(g_rows)]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-backfill-product-"))
    g = work / "gallery"
    if g.exists():
        shutil.rmtree(g)
    log(f"index {n} images with {OLD} into {g}")
    t = time.perf_counter()
    rep = index_images(items, g, model=old_ext, threads=args.threads)
    index_s = time.perf_counter() - t
    log(f"indexed {rep.embedded} in {index_s:.1f} s, {len(rep.failures)} failures")
    with Gallery.open(g) as gal:
        assert gal.primary_space == old_ext.fingerprint, (gal.primary_space, old_ext.fingerprint)
    order = "priority" if args.sim_order else "random"
    st = start_upgrade(g, NEW, order=order, seed=args.seed, online=OnlineConfig(),
                       threads=args.threads)
    assert st.old_space == old_ext.fingerprint, (st.old_space, old_ext.fingerprint)
    assert st.new_space == new_ext.fingerprint, (st.new_space, new_ext.fingerprint)
    points: list[dict[str, Any]] = []

    def point(label: str, frac: float, run: dict[str, Any] | None) -> None:
        d = decision_of(g)
        ev = evaluate(g, qo, qn, q_labels, g_labels, k)
        points.append({"label": label, "fraction": frac, "run": run, "decision": d,
                       "rules": ev, "load": uptime()})
        log(f"{label}: moved {d['moved_now']}/{n} decision {d.get('rule')} "
            f"scores {d.get('scores_mrr')} | " +
            " ".join(f"{r}={v['mAP@R']}/{v['R@1']}" + (f"[{v['served']}]" if r == "auto" else "")
                     for r, v in ev.items()))
        write_json(OUT / f"{args.out}.partial.json", {"points": points})

    point("0 % (before any run)", 0.0, None)

    def step(target: int) -> dict[str, Any]:
        with Gallery.open(g) as gal:
            moved = len(gal.ids(st.new_space))
        t = time.perf_counter()
        r = run_upgrade(g, limit=target - moved, threads=args.threads, workers=1)
        out = {"limit": target - moved, "seconds": round(time.perf_counter() - t, 1),
               "moved": getattr(r, "moved", None), "load": uptime()}
        if args.sim_order:  # the moved items are the simulation's first `target`
            with Gallery.open(g) as gal:
                done = {int(i) for i in gal.ids(st.new_space)}
            want = np.random.default_rng(args.seed).permutation(n)[:target]
            out["moved_as_simulation"] = done == {int(j) for j in want}
        return out

    point("0 % (after the start check, 1 item moved)", 1 / n, step(1))
    for f in FRACTIONS:
        point(f"{round(100 * f)} %", f, step(round(f * n)))
    last = step(n)
    d100 = decision_of(g)
    log(f"100 % moved: {d100['moved_now']}/{n}")
    t = time.perf_counter()
    fin = finish_upgrade(g)
    finish_s = time.perf_counter() - t
    # after finish: the product's searcher vs exact search of the effnet-lite0 task embeddings
    s = open_searcher(g, with_models=False)
    res = s.search({new_ext.fingerprint: qn}, k=10)
    got = np.array([[int(i) for i in row] for row in res.ids], np.int64)
    ref = np.argsort(-(qn @ gn.T), axis=1, kind="stable")[:, :10]
    same_rows = float(np.mean(np.all(got == ref, axis=1)))
    same_sets = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, ref, strict=True)]))
    with Gallery.open(g) as gal:
        keys, vecs = gal.load_vectors(new_ext.fingerprint)
        ids = np.array([int(i) for i in gal.ids_of(keys)])
    vec_diff = float(np.abs(vecs - gn[ids]).max())
    m_new = per_query_metrics(np.argsort(-(qn @ gn.T), axis=1)[:, :k], q_labels, g_labels,
                              metrics=("mAP@R", "R@1"))
    m_old = per_query_metrics(np.argsort(-(qo @ go_all[g_rows].T), axis=1)[:, :k], q_labels,
                              g_labels, metrics=("mAP@R", "R@1"))
    old_m, new_m = 100 * float(m_old["mAP@R"].mean()), 100 * float(m_new["mAP@R"].mean())
    finished = {"finish_s": round(finish_s, 2), "top10_rows_equal": same_rows,
                "top10_overlap": same_sets, "max_vector_diff": vec_diff,
                "report": {k_: v for k_, v in vars(fin).items() if k_ != "dropped"}}
    log(f"finish: top-10 rows equal {same_rows:.4f}, overlap {same_sets:.4f}, "
        f"max vector diff {vec_diff:.2e}")
    # AUC of auto on the 6-point grid (0 % = after the start check; also before any run)
    grid = [0.0, 0.10, 0.25, 0.50, 0.75, 1.0]
    auc: dict[str, Any] = {}
    for name, p0 in (("after start check", points[1]), ("before any run", points[0])):
        vals = [p0["rules"]["auto"]["mAP@R"]] + [p["rules"]["auto"]["mAP@R"]
                                                 for p in points[2:]] + [new_m]
        a = area_under_curve(grid, vals)
        lin = linear_area(old_m, new_m)
        auc[name] = {"values": vals, "auc": round(a, 3), "line": round(lin, 3),
                     "gain": round(a - lin, 3),
                     "gain_pct_gap": round(100 * (a - lin) / (new_m - old_m), 1)}
    result = {"title": "Online backfill through the product on real images",
              "task": "caltech101", "order": order, "classes": args.classes or "all",
              "seed": args.seed,
              "gallery": n, "queries": len(q_rows), "k": k, "old": OLD, "new": NEW,
              "old_mapr": round(old_m, 2), "new_mapr": round(new_m, 2),
              "old_r1": round(100 * float(m_old["R@1"].mean()), 2),
              "new_r1": round(100 * float(m_new["R@1"].mean()), 2),
              "index_s": round(index_s, 1), "index_failures": len(rep.failures),
              "points": points, "last_step": last, "decision_100": d100,
              "finish": finished, "auc": auc, "simulation": SIM, "threads": args.threads,
              "load_start": load_start, "load_end": uptime(),
              "wall_s": round(time.perf_counter() - t_all, 1)}
    write_json(OUT / f"{args.out}.json", result)
    write_bytes(OUT / f"{args.out}.md", render(result).encode())
    (OUT / f"{args.out}.partial.json").unlink(missing_ok=True)
    log(f"done in {result['wall_s']} s")
    return 0


def render(r: dict[str, Any]) -> str:
    sub = "" if r["classes"] == "all" else \
        f" -- SUBSET: {r['classes']} seeded classes (seed {r['seed']})"
    how = ("the simulation's random order (job order `priority`)"
           if r.get("order") == "priority" else "random order (the job's own)")
    lines = [f"# {r['title']}: Caltech-101, {r['old']} -> {r['new']}, {how}{sub}", "",
             f"Produced by benchmarks/bench_backfill_product.py. Gallery: {r['gallery']} "
             f"train images indexed with {r['old']} by `index_images`; {r['queries']} real test "
             f"queries; upgrade to {r['new']} by `start_upgrade(order="
             f"'{r.get('order', 'random')}', seed="
             f"{r['seed']}, online=OnlineConfig())` and `run_upgrade(limit=...)` steps (the "
             "job's own fits and pseudo-query checks); each rule answered by "
             f"`BackfillSearcher.open(rule=R, with_models=False).search_vectors(k={r['k']})` "
             f"(k = the largest class: mAP@R exact). Old alone {r['old_mapr']} / new alone "
             f"{r['new_mapr']} mAP@R (R@1 {r['old_r1']} / {r['new_r1']}). Threads "
             f"{r['threads']}; load at start / end {r['load_start']} / {r['load_end']}.", "",
             "| point | moved | decision (check) | pseudo MRR per rule | phi pairs | auto serves "
             "| auto | old-only | both | ensemble | rank-merge | run step s "
             "| psi fit / phi fit / check s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["points"]:
        d, ev = p["decision"], p["rules"]
        mrr = ", ".join(f"{k} {v}" for k, v in d.get("scores_mrr", {}).items()) or "--"
        cells = [f"{ev[x]['mAP@R']} / {ev[x]['R@1']}" if ev[x]["mAP@R"] is not None
                 else "n/a (not fitted yet)" for x in RULES]
        run = p["run"]["seconds"] if p["run"] else "--"
        fitted = "phi_fit_s" in d  # a recheck (same maps) carries the last fit's fit_s only
        fc = (f"{d.get('fit_s', '--') if fitted else 'recheck'} / "
              f"{d.get('phi_fit_s', '--')} / {d.get('check_s', '--')}" if d.get("rule") else "--")
        lines.append(f"| {p['label']} | {d['moved_now']} | {d.get('rule', '(none yet)')} | "
                     f"{mrr} | {d.get('phi_pairs', '--')} | {ev['auto']['served']} | "
                     + " | ".join(cells) + f" | {run} | {fc} |")
    lines += ["", "Cells: mAP@R / R@1 (%), real test queries. `auto serves`: the rule "
              "`BackfillSearcher.open(rule='auto')` resolved to at that moment. *pairs* of "
              "the decision in the JSON: the moved items the last psi / phi fit used (fits "
              "run after a commit once the pairs have doubled, so at commit boundaries); "
              "*phi pairs* adds the 500 pseudo-query pairs. Times: the last check's psi fit / "
              "phi fit / check (`recheck`: no fit at that check, same maps).", ""]
    lines.append("| default (auto) | 0 % | 10 % | 25 % | 50 % | 75 % | 100 % | AUC | line | "
                 "AUC - line | % of gap |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, a in r["auc"].items():
        lines.append(f"| product, 0 % {name} | " + " | ".join(f"{v:.2f}" for v in a["values"])
                     + f" | {a['auc']:.2f} | {a['line']:.2f} | {a['gain']:+.2f} | "
                     f"{a['gain_pct_gap']:+.1f} % |")
    s = r["simulation"]
    lines.append(f"| simulation (cached embeddings) | {s['old']} | "
                 + " | ".join(str(v) for v in s["auto_mapr"])
                 + f" | {s['new']} | | | +3.00 | +{s['auc_gain_pct_gap']:.0f} % |")
    f = r["finish"]
    lines += ["", f"Index: {r['index_s']} s ({r['index_failures']} failures). Last run step "
              f"(to 100 %): {r['last_step']['seconds']} s. Finish: {f['finish_s']} s; after it "
              "the product's searcher (`open_searcher`) vs exact search of the effnet-lite0 "
              "task embeddings of the gallery: top-10 identical for "
              f"{100 * f['top10_rows_equal']:.2f} % of queries, overlap "
              f"{100 * f['top10_overlap']:.2f} %; stored vectors max "
              f"abs difference {f['max_vector_diff']:.2e}. Wall {r['wall_s']} s.", ""]
    return "\n".join(lines)


def sim_check(seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    """The simulation's pseudo-query check at 10 %% (578 items moved) on the moved set of
    each order (the simulation's permutation, the job's sha256 order per seed), with
    phi / psi fitted on the first 512 moved pairs (the simulation's schedule) or on all
    578 (the product's: fits run at commit boundaries)."""
    import sys  # the simulation module lives beside this script, not in the package

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _backfill_sim import (
        Fit,
        fit_phi,
        load,
        pseudo_folds,
        pseudo_rr,
        random_order,
        use_pseudo_cohort,
    )

    task = load("caltech101", [OLD, NEW], pseudo_n=500)
    use_pseudo_cohort(task, OLD, NEW)  # as bench_backfill_online (and the job) do
    cfg = OnlineConfig()
    n = task.g[OLD].shape[0]
    folds = pseudo_folds(len(task.pseudo_rows), cfg.seed)

    def fit_at(order: np.ndarray, m: int) -> Any:
        done = order[:m]
        psi = RidgePsi(max_pairs=cfg.max_pairs, seed=cfg.seed).fit(task.g[NEW][done],
                                                                  task.g[OLD][done])
        return Fit(m, psi, "", {}, 0.0, fit_phi(task, OLD, NEW, done, cfg),
                   [(rows, fit_phi(task, OLD, NEW, done, cfg, other))
                    for rows, other in zip(folds, folds[::-1], strict=True)])

    orders = {"simulation's, seed 0": random_order(n, 0)}
    for sd in seeds:
        orders[f"job's random, seed {sd}"] = np.array(
            [int(i) for i in order_ids([str(i) for i in range(n)], "random", seed=sd)])
    out = []
    nb = round(0.10 * n)
    for name, order in orders.items():
        for m in (512, nb):
            rr = pseudo_rr(task, OLD, NEW, order[:nb], fit_at(order, m))
            rule, sc, vd = decide_with_old(rr, mode="until-better")
            out.append({"order": name, "moved": nb, "fit_pairs": m, "rule": rule,
                        "ensemble_mrr": sc["ensemble"]["mrr"], "old_mrr": sc["old-only"]["mrr"],
                        "verdict": vd})
            log(f"sim check {name} moved {nb} fit {m}: {rule} {out[-1]}")
    return {"checks": out}


def render_sim_check(d: dict[str, Any]) -> str:
    lines = ["", "## The simulation's check on the same moved sets (10 %)", "",
             "`--sim-check`: the simulation's pseudo-query check (benchmarks/_backfill_sim.py, "
             "cached embeddings, the same 500 pseudo-queries) with 578 items moved in each "
             "order, phi / psi fitted on the first 512 moved pairs (the simulation's fit "
             "schedule) or on all 578 (the product's fit at its commit). Pseudo MRR (%).", "",
             "| order | fit pairs | rule | ensemble | old-only | gain | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in d["checks"]:
        v = c["verdict"]
        lines.append(f"| {c['order']} | {c['fit_pairs']} | {c['rule']} | {c['ensemble_mrr']} | "
                     f"{c['old_mrr']} | {v.get('gain')} | {v.get('merged_vs_old')} |")
    return "\n".join(lines) + "\n"


def render_runs(runs: list[dict[str, Any]]) -> str:
    """One line per run (orders / seeds): the check's rule and auto's mAP@R per fraction."""
    lines = ["## Every run of this script (same gallery, other backfill orders)", "",
             "Each run indexes afresh and moves the items in its order; `--sim-order` moves "
             "them in the simulation's permutation (checked: the moved items are the "
             "simulation's first ones at every step). Cells: the published decision's rule / "
             "auto's mAP@R (%) on the real queries; ensemble's own mAP@R in brackets; "
             "AUC - line on the 6-point grid (0 % after the start check).", "",
             "| order | seed | 0 % | 10 % | 25 % | 50 % | 75 % | AUC - line | % of gap | "
             "10 % check: its best merge rule - old-only (pseudo MRR) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        cells = []
        for p in r["points"][1:]:
            ev = p["rules"]
            ens = ev["ensemble"]["mAP@R"]
            cells.append(f"{p['decision'].get('rule')} / {ev['auto']['mAP@R']} [{ens}]")
        a = r["auc"]["after start check"]
        p10 = r["points"][2]["decision"]
        v10 = p10.get("verdict") or {}
        gain = f"{v10.get('merge_rule')} {v10.get('gain'):+}" if v10 else "--"
        order = "simulation's" if r.get("order") == "priority" else "job's random"
        lines.append(f"| {order} | {r['seed']} | " + " | ".join(cells)
                     + f" | {a['gain']:+.2f} | {a['gain_pct_gap']:+.1f} % | {gain} |")
    s = runs[0]["simulation"]
    lines.append(f"| simulation | 0 | old-only / {s['old']} [55.95] | " + " | ".join(
        f"ensemble / {v}" for v in s["auto_mapr"]) + f" | +3.00 | +{s['auc_gain_pct_gap']:.0f} % "
        "| ensemble +3.0 (75.9 - 72.9) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
