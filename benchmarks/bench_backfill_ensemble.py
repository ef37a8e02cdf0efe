"""Rule ``ensemble`` through the product's code: its candidate search against the formula,
and its query cost.

On cached real embeddings (Caltech-101: test queries -> train gallery, mAP@R;
SMVS: 400 phone photos -> the 500 covers, mAP), for effnet-lite0 -> effnet-lite2
and opennsfw-r50 -> effnet-lite0, random order (seed 0), at 10 / 25 / 50 / 75 %
moved. At each fraction phi is fitted as the job fits it
(:func:`galleria.upgrade.phi.fit_phi` on the moved items' pairs and the 500
pseudo-query pairs of benchmarks/_backfill_sim.py), the cohort is the job's
(the pseudo-query pairs, then the first 1 000 moved pairs), and:

- *exact*: the formula of rule ensemble over every item (brute force,
  :func:`galleria.upgrade.ensemble.brute_force`);
- *searched*: what the searcher answers -- the old part by
  :func:`galleria.upgrade.ensemble.search_unmoved` (the product's candidate
  search on an exact index of the items not moved yet), the moved items by the
  formula of rule ``both``, merged by :func:`galleria.upgrade.merge.merge_results`.

Reported: the share of queries whose top-k is identical (k = 10 and 100), the
recall of the exact top-100 in the searched top-100, the metric of the exact
formula (full ranking) and of both top-100 lists (truncated at 100: the same
cut for both), and the milliseconds per query (batch 1, one BLAS thread, median)
of the old part's stage of ``ensemble`` (stats, two index searches, reading and
mapping the candidates, scoring) against the same stage of ``both`` (one index
search): what ``ensemble`` adds per query beside the two forward passes; and what
the pseudo-query check adds for it (two fold maps, 500 pseudo-queries searched).

Run:  nice -n 10 .venv/bin/python benchmarks/bench_backfill_ensemble.py [--quick]
Writes benchmarks/results/backfill-ensemble.{json,md}. Needs the cached
embeddings of benchmarks/bench_backfill_online.py (computed on the first run).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _backfill_sim import load, random_order
from _common import machine_info, machine_md, md_table, set_threads, write_results
from galleria.index.exact import ExactIndex
from galleria.upgrade.ensemble import (
    EnsembleScorer,
    brute_force,
    candidate_depth,
    search_unmoved,
)
from galleria.upgrade.jobcal import COHORT_TOP
from galleria.upgrade.merge import CohortNorm, cohort_stats, merge_results
from galleria.upgrade.oldonly import top_ids
from galleria.upgrade.phi import fit_phi, pseudo_folds

PAIRS = [("effnet-lite0", "effnet-lite2"), ("opennsfw-r50", "effnet-lite0")]
SHORT = {"effnet-lite0": "lite0", "effnet-lite2": "lite2", "opennsfw-r50": "nsfw-r50"}
FRACTIONS = (0.10, 0.25, 0.50, 0.75)
CALIB_SIZE = 1000
PSEUDO = 500


def searched(scorer: EnsembleScorer, qo: np.ndarray, qn: np.ndarray, go: np.ndarray,
             gn: np.ndarray, moved: np.ndarray, k: int) -> Any:
    """The searcher's answer (string ids = gallery rows) for ``(Q, D)`` queries."""
    ids = np.array([str(i) for i in range(len(go))], dtype=object)
    rest = np.flatnonzero(~moved)
    idx = ExactIndex(go.shape[1])
    idx.add(rest.astype(np.int64), go[rest])
    view = SimpleNamespace(count=len(rest), search=idx.search, ids=SimpleNamespace(
        lookup=lambda keys: np.where(keys >= 0, ids[np.maximum(keys, 0)], None)))
    st = scorer.stats(qo, qn)
    mo, so, mn, sn, _, _ = st
    old_part, _ = search_unmoved(scorer, qo, qn, st, view, candidate_depth(k),
                                 lambda keys, _ids: go[keys])
    rows = np.flatnonzero(moved)
    z = 0.5 * ((qo @ go[rows].T - mo) / so + (qn @ gn[rows].T - mn) / sn)
    return merge_results([old_part, top_ids(z, ids[rows], len(qo), k)], k)


def stage_ms(scorer: EnsembleScorer, qo: np.ndarray, qn: np.ndarray, go: np.ndarray,
             moved: np.ndarray, k: int, n: int) -> dict[str, float]:
    """Median ms per query (batch 1) of the old part's stage: ensemble against both."""
    rest = np.flatnonzero(~moved)
    idx = ExactIndex(go.shape[1])
    idx.add(rest.astype(np.int64), go[rest])
    ids = np.array([str(i) for i in range(len(go))], dtype=object)
    view = SimpleNamespace(count=len(rest), search=idx.search, ids=SimpleNamespace(
        lookup=lambda keys: np.where(keys >= 0, ids[np.maximum(keys, 0)], None)))
    ens, both = [], []
    for r in range(min(n, len(qo))):
        a, b = qo[r:r + 1], qn[r:r + 1]
        t = time.perf_counter()
        st = scorer.stats(a, b)
        search_unmoved(scorer, a, b, st, view, candidate_depth(k), lambda keys, _i: go[keys])
        ens.append(time.perf_counter() - t)
        t = time.perf_counter()
        cohort_stats(a, scorer.cohort.old_cohort, top=COHORT_TOP)
        idx.search(a, k)
        both.append(time.perf_counter() - t)
    return {"ensemble_old_part_ms": round(1000 * float(np.median(ens)), 3),
            "both_old_part_ms": round(1000 * float(np.median(both)), 3)}


def metric_of_lists(task: Any, ranking: np.ndarray) -> float:
    return float(np.mean(task.evaluate(ranking, np.arange(len(ranking)))[task.metric]))


def run_row(task: Any, old: str, new: str, frac: float, *, quick: bool) -> dict[str, Any]:
    go, gn, qo, qn = task.g[old], task.g[new], task.q[old], task.q[new]
    if quick:
        qo, qn = qo[:200], qn[:200]
    order = random_order(len(go), 0)
    done = order[: round(frac * len(go))]
    moved = np.zeros(len(go), bool)
    moved[done] = True
    po, pn = task.pseudo[old], task.pseudo[new]
    t = time.perf_counter()
    phi = fit_phi(go[done], gn[done], po, pn, old_fingerprint=old, new_fingerprint=new)
    fit_s = time.perf_counter() - t
    cohort = done[:CALIB_SIZE]
    norm = CohortNorm(np.concatenate([po, go[cohort]]), np.concatenate([pn, gn[cohort]]),
                      top=COHORT_TOP)
    scorer = EnsembleScorer(phi, norm)
    exact = brute_force(scorer, qo, qn, go, gn, moved)
    row: dict[str, Any] = {"data": task.name, "pair": f"{SHORT[old]} -> {SHORT[new]}",
                           "moved": f"{round(100 * frac)} %", "queries": len(qo),
                           "phi_fit_s": round(fit_s, 2)}
    row["exact"] = round(100 * metric_of_lists(task, exact), 2)
    for k in (10, 100):
        res = searched(scorer, qo, qn, go, gn, moved, k)
        got = np.array([[int(i) if i is not None else -1 for i in r] for r in res.ids])
        ref = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        row[f"same_top{k}"] = round(100 * float(np.mean((got == ref).all(axis=1))), 1)
        if k == 100:
            rec = [len(set(a) & set(b)) / k for a, b in zip(got.tolist(), ref.tolist(),
                                                           strict=True)]
            row["recall100"] = round(100 * float(np.mean(rec)), 2)
            row["exact_top100"] = round(100 * metric_of_lists(task, ref), 2)
            row["searched_top100"] = round(100 * metric_of_lists(task, got), 2)
    row.update(stage_ms(scorer, qo, qn, go, moved, 10, 20 if quick else 50))
    # the check's extra work for ensemble: two fold maps, then the pseudo-queries searched
    # (depth 100, as OnlineConfig.depth) with one of them
    folds = pseudo_folds(len(po), seed=0)
    t = time.perf_counter()
    fold = [fit_phi(go[done], gn[done], po[folds != f], pn[folds != f], old_fingerprint=old,
                    new_fingerprint=new) for f in (0, 1)]
    row["check_fold_fits_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    searched(EnsembleScorer(fold[0], norm), po, pn, go, gn, moved, 100)
    row["check_search_s"] = round(time.perf_counter() - t, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 queries, 25 / 75 % only")
    ap.add_argument("--tasks", nargs="+", default=["caltech101", "smvs"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_threads(1)
    info = machine_info(threads=1)
    rows = []
    for name in args.tasks:
        for old, new in PAIRS:
            task = load(name, [old, new], pseudo_n=PSEUDO, seed=0)
            for frac in ((0.25, 0.75) if args.quick else FRACTIONS):
                rows.append(run_row(task, old, new, frac, quick=args.quick))
                print(rows[-1], flush=True)
    info["load_average_at_end"] = os.getloadavg()
    cols = [("data", "data"), ("pair", "pair"), ("moved", "moved"), ("queries", "queries"),
            ("exact", "exact formula (metric, %)"),
            ("exact_top100", "exact top-100"), ("searched_top100", "searched top-100"),
            ("same_top10", "same top-10 (% queries)"), ("same_top100", "same top-100"),
            ("recall100", "recall of exact top-100"), ("phi_fit_s", "phi fit (s)"),
            ("ensemble_old_part_ms", "ensemble old part (ms/q)"),
            ("both_old_part_ms", "both old part (ms/q)"),
            ("check_fold_fits_s", "check: 2 fold maps (s)"),
            ("check_search_s", "check: 500 pseudo-queries searched (s)")]
    md = ("# Rule ensemble: candidate search against the formula, and its cost\n\n"
          "Real embeddings (cached), random order, seed 0; phi on the moved pairs + 500 "
          "pseudo-query pairs (served phi, not cross-fitted: this measures search, not the "
          "check). Metric: mAP@R on Caltech-101, mAP on SMVS; *top-100* columns: the "
          "metric of the top-100 list (the same truncation for both). ms/q: batch 1, one "
          "thread, median; the old part's stage only (forward passes excluded). *check*: what "
          "the pseudo-query check adds for ensemble (the two fold maps of its cross-fit, "
          "then the 500 pseudo-queries searched at depth 100, every query at once).\n\n"
          + md_table(rows, cols) + "\n" + machine_md(info)
          + ("\nCommand: `nice -n 10 .venv/bin/python benchmarks/bench_backfill_ensemble.py"
             + (" --quick" if args.quick else "") + "`\n"))
    write_results("backfill-ensemble", {"rows": rows, "machine": info,
                                        "quick": args.quick}, md)


if __name__ == "__main__":
    main()
