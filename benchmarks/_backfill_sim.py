"""Simulation of an online backfill on cached real embeddings (bench_backfill_online).

One *run* of the simulation: a gallery, an (old, new) model pair, a backfill
order. At each backfilled fraction the items already done hold new-model
vectors, the others old-model vectors; queries are answered by each rule over
the full merged score matrix (ranking it equals the live merge of the two
parts' lists, ``galleria.upgrade.merge.merged_scores``).

The online psi is simulated as the live job runs it
(``galleria.upgrade.online``): a ridge psi is fitted on the first ``m`` done
items' (old, new) pairs at ``m = first_at * growth**i``; right after each fit
the pseudo-query check runs on the gallery *as it is at that moment* (the first
``m`` items done) and ``decide`` picks the rule; at a fraction with ``nb``
items done the last fit with ``m <= nb`` is in force. Pseudo-queries are
phone-like views of a seeded sample of the gallery's own images
(``galleria.images.pseudo``), embedded with both models; no label and no test
query is used by any decision.

Orders: ``random`` (a seeded permutation) and ``queries`` (the live order of
``galleria.upgrade.querylog``: the items a *traffic* half of the queries got
as answers from the old model, weighted by rank, plus the neighbours of the
1000 most-weighted items, first; the rest in the random order). The queries
of the other half are evaluated (two folds: every query is evaluated once, by
an order its own answers did not shape).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from galleria.cache import cache_dir
from galleria.eval.datasets import load_task
from galleria.eval.embed import task_embeddings
from galleria.eval.metrics import per_query_metrics
from galleria.extractors.registry import create_extractor
from galleria.fingerprint import digest, slug
from galleria.images.decode import load_image
from galleria.images.pseudo import make_views, sample_ids
from galleria.io.atomic import write_npy
from galleria.upgrade.jobcal import COHORT_TOP, FUSE_WEIGHT, MIN_PAIRS
from galleria.upgrade.merge import CohortNorm, cohort_stats, fit_calibration, merged_scores
from galleria.upgrade.online import OnlineConfig, decide, decide_with_old, next_fit_at
from galleria.upgrade.querylog import add_neighbours, front_load, query_priorities
from galleria.upgrade.ridge import RidgePsi
from galleria.validate import l2_normalize

CALIB_SIZE = 1000
ENSEMBLE = "ensemble (both models on every item; phi for items not moved)"
PREVIOUS = "auto without ensemble (the previous default)"
RULES = ["old-only -> switch", "naive", "rank-merge (quantile, self-cal.)",
         "rank-merge (top-100 z-norm)", "rank-merge (top-100 z-norm, + pseudo cohort)",
         "psi online (top-100 z-norm)",
         "fused online (top-100 z-norm)", "both models on moved items (z-norm mean)",
         "auto before (merge rules, checked at fits)", "auto: merge unless old wins",
         "auto: old until rank-merge / psi / fused wins",
         "ensemble (both models on every item; phi for items not moved)",
         "auto without ensemble (the previous default)",
         "auto (default): old until a merge rule wins"]
DEFAULT = "auto (default): old until a merge rule wins"
BEFORE = "auto before (merge rules, checked at fits)"
VARIANTS = {DEFAULT: "until-better", "auto: merge unless old wins": "unless-worse",
            "auto: old until rank-merge / psi / fused wins": "until-better",
            PREVIOUS: "until-better"}
NO_BOTH = "auto: old until rank-merge / psi / fused wins"
WITHOUT = {NO_BOTH: ("both", "ensemble"), PREVIOUS: ("ensemble",)}
"""Candidates a variant leaves out of its check."""
CANDIDATES = {"old-only": "old-only -> switch",
              "rank-merge": "rank-merge (top-100 z-norm, + pseudo cohort)",
              "psi": "psi online (top-100 z-norm)", "fused": "fused online (top-100 z-norm)",
              "both": "both models on moved items (z-norm mean)", "ensemble": ENSEMBLE}


@dataclass
class Task:
    """Embeddings of one data set: queries and gallery per model, labels, self index."""

    name: str
    metric: str
    q: dict[str, np.ndarray]
    g: dict[str, np.ndarray]
    q_labels: np.ndarray
    g_labels: np.ndarray
    qgi: np.ndarray
    pseudo_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pseudo: dict[str, np.ndarray] = field(default_factory=dict)

    def evaluate(self, scores: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        return per_query_metrics(scores, self.q_labels[rows], self.g_labels,
                                 metrics=(self.metric, "R@1"), query_gallery_index=self.qgi[rows])


TASKS = {"caltech101": "mAP@R", "smvs": "mAP", "ukbench56": "mAP"}


def load(name: str, models: list[str], *, pseudo_n: int, seed: int = 0) -> Task:
    """Embeddings (cached by galleria.eval.embed) and pseudo-query embeddings (cached here)."""
    t = load_task(name)
    q, g, fps = {}, {}, {}
    for m in models:
        ext = create_extractor(m)
        fps[m] = ext.fingerprint
        q[m], g[m] = task_embeddings(t, ext)
    # ukbench: leave-one-out (the protocol's N-S counts the query itself; a backfill
    # curve of a saturated self-match says nothing)
    qgi = np.arange(len(t.query_paths)) if name == "ukbench56" else t.query_gallery_index
    task = Task(name, TASKS[name], q, g, t.query_labels, t.gallery_labels, qgi)
    ids = [str(i) for i in range(len(t.gallery_paths))]
    chosen = sample_ids(ids, pseudo_n, seed=seed)
    task.pseudo_rows = np.array([int(i) for i in chosen], np.int64)
    files = t.gallery_files()
    images = None
    for m in models:
        key = digest("pseudo", name, chosen, seed, fps[m])
        path = cache_dir("bench-backfill-online") / f"pseudo-{name}-{slug(fps[m])}-{key}.npy"
        if path.is_file():
            task.pseudo[m] = np.load(path)
            continue
        if images is None:
            pq = make_views([(i, load_image(files[int(i)])) for i in chosen], seed=seed)
            images = pq.images
        task.pseudo[m] = create_extractor(m).embed_images(images)
        write_npy(path, task.pseudo[m])
    return task


# --------------------------------------------------------------------------- #
# orders
# --------------------------------------------------------------------------- #


def random_order(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def hub_order(task: Task, old: str, seed: int, k: int = 10) -> np.ndarray:
    """Without traffic: the items most often among the old model's ``k`` nearest
    neighbours of the other items first (k-occurrence, hubness), ties in random order."""
    go = task.g[old]
    s = go @ go.T
    np.fill_diagonal(s, -np.inf)
    top = np.argpartition(-s, k, axis=1)[:, :k]
    occ = np.bincount(top.ravel(), minlength=go.shape[0])
    base = random_order(go.shape[0], seed)
    rank_in_base = np.empty_like(base)
    rank_in_base[base] = np.arange(base.size)
    return np.lexsort((rank_in_base, -occ))


def popularity(task: Task, seed: int) -> np.ndarray:
    """``(Q,)`` how often users ask each query: Zipf (1 / rank) over the query groups
    (classes, covers, objects) in a seeded order, shared by the group's queries."""
    groups, inverse = np.unique(task.q_labels, return_inverse=True)
    rank = np.random.default_rng(2000 + seed).permutation(len(groups))
    per_group = 1.0 / (1.0 + rank)
    counts = np.bincount(inverse, minlength=len(groups))
    w = per_group[inverse] / counts[inverse]
    return w / w.sum()


def query_driven_order(task: Task, old: str, traffic: np.ndarray, seed: int, *,
                       hot_limit: int = 1000, k_nb: int = 5,
                       weights: np.ndarray | None = None) -> np.ndarray:
    """The live ``queries`` order for a log of the old model's answers to ``traffic``.

    ``weights``: popularity of each query; the log then holds ``2 * len(traffic)``
    requests drawn from ``traffic`` with those weights (seeded).
    """
    if weights is not None:
        p = weights[traffic] / weights[traffic].sum()
        traffic = np.random.default_rng(3000 + seed).choice(traffic, 2 * len(traffic), p=p)
    qo, go = task.q[old][traffic], task.g[old]
    s = qo @ go.T
    own = task.qgi[traffic]
    rows = np.flatnonzero(own >= 0)
    s[rows, own[rows]] = -np.inf
    top = np.argsort(-s, axis=1)[:, :10]
    records = [(0.0, [str(j) for j in row]) for row in top]
    prio = query_priorities(records, now=0.0)
    hot = sorted(prio, key=lambda i: -prio[i])[:hot_limit]
    hv = go[[int(i) for i in hot]]
    nbs = np.argsort(-(hv @ go.T), axis=1)[:, : k_nb + 1]
    neighbours = {i: [str(j) for j in row if str(j) != i][:k_nb] for i, row in zip(hot, nbs,
                                                                                     strict=True)}
    near = add_neighbours(prio, neighbours)
    base = [str(i) for i in random_order(go.shape[0], seed)]
    return np.array([int(i) for i in front_load(base, prio, near)], np.int64)


# --------------------------------------------------------------------------- #
# one run
# --------------------------------------------------------------------------- #


@dataclass
class Fit:
    """One online fit: psi (new -> old) and phi (old -> new, on the moved pairs and the
    pseudo-query pairs; ``folds``: phi without each fold's pseudo pairs, for the check)."""

    m: int
    psi: RidgePsi | None
    rule: str
    scores: dict[str, Any]
    fit_s: float
    phi: RidgePsi | None = None
    folds: list[tuple[np.ndarray, RidgePsi]] = field(default_factory=list)


@dataclass
class Check:
    """The pseudo-query check on the gallery as it is with ``nb`` items done."""

    nb: int
    fit_m: int | None
    rr: dict[str, np.ndarray]
    rules: dict[str, str]
    scores: dict[str, Any]


EXTRA_COHORT: dict[str, np.ndarray] = {}
"""The pseudo-queries' embeddings, added to the cohort (set by :func:`use_pseudo_cohort`)."""


def use_pseudo_cohort(task: Task | None, old: str = "", new: str = "") -> None:
    EXTRA_COHORT.clear()
    if task is not None:
        EXTRA_COHORT.update(old=task.pseudo[old], new=task.pseudo[new])


def _znorm(s_old: np.ndarray, s_new: np.ndarray, q_old: np.ndarray, q_new: np.ndarray,
           mask: np.ndarray, go: np.ndarray, gn: np.ndarray, cohort: np.ndarray) -> np.ndarray:
    co, cn = go[cohort], gn[cohort]
    if EXTRA_COHORT:
        co = np.concatenate([co, EXTRA_COHORT["old"]])
        cn = np.concatenate([cn, EXTRA_COHORT["new"]])
    if len(co) < MIN_PAIRS:
        return merged_scores(s_old, s_new, mask)
    return merged_scores(s_old, s_new, mask, CohortNorm(co, cn, top=COHORT_TOP),
                         old_queries=q_old, new_queries=q_new)


def _both(s_old: np.ndarray, s_new: np.ndarray, q_old: np.ndarray, q_new: np.ndarray,
          mask: np.ndarray, go: np.ndarray, gn: np.ndarray, cohort: np.ndarray) -> np.ndarray:
    """Rule ``both``: every item scored by the old model (Z-normed; the moved items by the
    old vectors the job keeps), the moved items also by the new one: the mean of the
    two Z-scores there (``s_old``: old-model scores of *every* item)."""
    co, cn = go[cohort], gn[cohort]
    if EXTRA_COHORT:
        co = np.concatenate([co, EXTRA_COHORT["old"]])
        cn = np.concatenate([cn, EXTRA_COHORT["new"]])
    if len(co) < MIN_PAIRS:
        return np.where(mask, 0.5 * (s_old + s_new), s_old)
    mo, so = cohort_stats(q_old, co, top=COHORT_TOP)
    mn, sn = cohort_stats(q_new, cn, top=COHORT_TOP)
    zo = (s_old - mo) / so
    return np.where(mask, 0.5 * (zo + (s_new - mn) / sn), zo)


def _pseudo_rr(s: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Reciprocal rank of each pseudo-query's source row in its score row."""
    own = s[np.arange(len(truth)), truth][:, None]
    rank = (s > own).sum(axis=1)
    return 1.0 / (1.0 + rank)


def _cohorts(go: np.ndarray, gn: np.ndarray, cohort: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    co, cn = go[cohort], gn[cohort]
    if EXTRA_COHORT:
        co = np.concatenate([co, EXTRA_COHORT["old"]])
        cn = np.concatenate([cn, EXTRA_COHORT["new"]])
    return co, cn


def _ensemble(s_old: np.ndarray, s_new: np.ndarray, q_old: np.ndarray, q_new: np.ndarray,
              mask: np.ndarray, go: np.ndarray, gn: np.ndarray, cohort: np.ndarray,
              phi: RidgePsi, ghat: np.ndarray) -> np.ndarray:
    """Rule ``ensemble``: ``0.5 (z_old + z_new)`` on every item; the new side of an item not
    moved yet from ``ghat = l2norm(phi(old vector))`` (``(N, D_new)``), Z-normed against
    ``phi`` of the old cohort; moved items as rule ``both``."""
    co, cn = _cohorts(go, gn, cohort)
    s_est = q_new @ ghat.T
    if len(co) < MIN_PAIRS:
        return 0.5 * (s_old + np.where(mask, s_new, s_est))
    mo, so = cohort_stats(q_old, co, top=COHORT_TOP)
    mn, sn = cohort_stats(q_new, cn, top=COHORT_TOP)
    me, se = cohort_stats(q_new, phi.transform(co), top=COHORT_TOP)
    return 0.5 * ((s_old - mo) / so + np.where(mask, (s_new - mn) / sn, (s_est - me) / se))


def fit_phi(task: Task, old: str, new: str, done: np.ndarray, config: OnlineConfig,
            pseudo_rows: np.ndarray | None = None) -> RidgePsi:
    """phi (old -> new ridge, L2-normalised output) on the moved items' pairs and the
    pseudo-queries' pairs (``pseudo_rows``: a subset of them; ``None``: all)."""
    po, pn = task.pseudo[old], task.pseudo[new]
    if pseudo_rows is not None:
        po, pn = po[pseudo_rows], pn[pseudo_rows]
    return RidgePsi(max_pairs=config.max_pairs, seed=config.seed).fit(
        np.concatenate([task.g[old][done], po]), np.concatenate([task.g[new][done], pn]))


def pseudo_folds(n: int, seed: int) -> list[np.ndarray]:
    """Two seeded halves of the pseudo-queries (the check's cross-fit of phi)."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(perm[: n // 2]), np.sort(perm[n // 2:])]


def pseudo_rr(task: Task, old: str, new: str, done: np.ndarray, fit: Fit | None
              ) -> dict[str, np.ndarray]:
    """Pseudo-query reciprocal ranks of every candidate rule with the items ``done`` moved
    (``ensemble`` cross-fitted: each fold's queries with the phi that never saw them)."""
    go, gn = task.g[old], task.g[new]
    po, pn = task.pseudo[old], task.pseudo[new]
    truth = task.pseudo_rows
    n = go.shape[0]
    mask = np.zeros(n, bool)
    mask[done] = True
    cohort = done[:CALIB_SIZE]
    s_new = pn @ gn.T
    s_old = po @ go.T
    rr = {"old-only": _pseudo_rr(s_old, truth),
          "rank-merge": _pseudo_rr(_znorm(s_old, s_new, po, pn, mask, go, gn, cohort), truth),
          "both": _pseudo_rr(_both(s_old, s_new, po, pn, mask, go, gn, cohort), truth)}
    if fit is not None and fit.psi is not None:
        psi = fit.psi
        ps = psi.transform(pn)
        pf = l2_normalize(po + FUSE_WEIGHT * ps)
        rr["psi"] = _pseudo_rr(_znorm(ps @ go.T, s_new, ps, pn, mask, go, gn, cohort), truth)
        rr["fused"] = _pseudo_rr(_znorm(pf @ go.T, s_new, pf, pn, mask, go, gn, cohort), truth)
    if fit is not None and fit.folds:
        ens = np.zeros(len(truth))
        for rows, phi in fit.folds:
            ens[rows] = _pseudo_rr(_ensemble(
                s_old[rows], s_new[rows], po[rows], pn[rows], mask, go, gn, cohort, phi,
                phi.transform(go)), truth[rows])
        rr["ensemble"] = ens
    return rr


def fits_for(task: Task, old: str, new: str, order: np.ndarray, config: OnlineConfig
             ) -> list[Fit]:
    """The online fits of one order, each with the decision of its pseudo-query check
    (the merge rules only: the rule before the old-model guard)."""
    import time

    go, gn = task.g[old], task.g[new]
    n = go.shape[0]
    folds = pseudo_folds(len(task.pseudo_rows), config.seed)
    # the job's first check, before any item moves: phi on the pseudo-query pairs alone
    fits: list[Fit] = [Fit(0, None, "rank-merge", {}, 0.0,
                           fit_phi(task, old, new, order[:0], config),
                           [(rows, fit_phi(task, old, new, order[:0], config, other))
                            for rows, other in zip(folds, folds[::-1], strict=True)])]
    m = next_fit_at(config, None)
    while m <= min(n, config.max_pairs):
        done = order[:m]
        t = time.perf_counter()
        psi = RidgePsi(max_pairs=config.max_pairs, seed=config.seed).fit(gn[done], go[done])
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        phi = fit_phi(task, old, new, done, config)
        phi_s = time.perf_counter() - t
        fit = Fit(m, psi, "", {}, fit_s, phi,
                  [(rows, fit_phi(task, old, new, done, config, other))
                   for rows, other in zip(folds, folds[::-1], strict=True)])
        fit.scores = {"phi_fit_s": round(phi_s, 4)}
        rr = pseudo_rr(task, old, new, done, fit)
        for gone in ("old-only", "both", "ensemble"):  # the previous default's merge rules
            rr.pop(gone, None)
        fit.rule, scores = decide(rr)
        fit.scores.update(scores)
        fits.append(fit)
        nxt = next_fit_at(config, m)
        if nxt <= m:
            break
        m = nxt
    return fits


def checks_for(task: Task, old: str, new: str, order: np.ndarray, fits: list[Fit],
               fractions: np.ndarray) -> dict[int, Check]:
    """The check of the live job at each interior fraction: on the gallery as it is
    then (``nb`` items moved), with the last psi fitted by then; every guard mode."""
    n = task.g[old].shape[0]
    out: dict[int, Check] = {}
    for f in fractions:
        nb = round(float(f) * n)
        if nb < 0 or nb >= n:  # 0 %: the job's first check, before any item moves
            continue
        fit = next((x for x in reversed(fits) if x.m <= nb), None)
        rr = pseudo_rr(task, old, new, order[:nb], fit)
        rules, scores, verdict = {}, {}, {}
        for name, mode in VARIANTS.items():
            cands = {k: v for k, v in rr.items() if k not in WITHOUT.get(name, ())}
            rules[name], sc, vd = decide_with_old(cands, mode=mode)
            if name == DEFAULT:
                scores, verdict = sc, vd
        scores = {**scores, "verdict": verdict}
        out[nb] = Check(nb, None if fit is None else fit.m, rr, rules, scores)
    return out


def run_curves(task: Task, old: str, new: str, order: np.ndarray, rows: np.ndarray,
               fractions: np.ndarray, fits: list[Fit], checks: dict[int, Check]
               ) -> dict[str, Any]:
    """Per-query metrics of every rule at every fraction for the queries ``rows``."""
    qo, go = task.q[old][rows], task.g[old]
    qn, gn = task.q[new][rows], task.g[new]
    s_oo, s_nn = qo @ go.T, qn @ gn.T
    n = go.shape[0]
    out: dict[str, Any] = {r: [] for r in RULES}
    out["decision"] = []
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def psi_queries(fit: Fit) -> tuple[np.ndarray, np.ndarray]:
        assert fit.psi is not None
        if fit.m not in cache:
            ps = fit.psi.transform(qn)
            cache[fit.m] = (ps, l2_normalize(qo + FUSE_WEIGHT * ps))
        return cache[fit.m]

    for f in fractions:
        nb = round(float(f) * n)
        mask = np.zeros(n, bool)
        mask[order[:nb]] = True
        cohort = order[: min(nb, CALIB_SIZE)]
        fit = next((x for x in reversed(fits) if x.m <= nb), None)
        done = f >= 1.0
        rank = s_nn if done else _znorm(s_oo, s_nn, qo, qn, mask, go, gn, cohort)
        if not done and EXTRA_COHORT:  # the rank-merge of the job as it was before
            saved = dict(EXTRA_COHORT)
            EXTRA_COHORT.clear()
            plain = _znorm(s_oo, s_nn, qo, qn, mask, go, gn, cohort)
            EXTRA_COHORT.update(saved)
        else:
            plain = rank
        res: dict[str, np.ndarray] = {
            "old-only -> switch": s_nn if done else s_oo,
            "naive": merged_scores(s_oo, s_nn, mask),
            "rank-merge (top-100 z-norm)": plain,
            "rank-merge (top-100 z-norm, + pseudo cohort)": rank,
        }
        if done or cohort.size < MIN_PAIRS:
            res["rank-merge (quantile, self-cal.)"] = res["naive"] if not done else s_nn
        else:
            cal = fit_calibration("quantile", old_queries=go[cohort], old_gallery=go[cohort],
                                  new_embeddings=gn[cohort])
            res["rank-merge (quantile, self-cal.)"] = merged_scores(s_oo, s_nn, mask, cal)
        if fit is None or fit.psi is None or done:
            res["psi online (top-100 z-norm)"] = rank
            res["fused online (top-100 z-norm)"] = rank
            chosen = "rank-merge"
        else:
            ps, pf = psi_queries(fit)
            res["psi online (top-100 z-norm)"] = _znorm(ps @ go.T, s_nn, ps, qn, mask, go, gn,
                                                        cohort)
            res["fused online (top-100 z-norm)"] = _znorm(pf @ go.T, s_nn, pf, qn, mask, go,
                                                          gn, cohort)
            chosen = fit.rule
        res["both models on moved items (z-norm mean)"] = s_nn if done else _both(
            s_oo, s_nn, qo, qn, mask, go, gn, cohort)
        if fit is None or done or fit.phi is None:
            res[ENSEMBLE] = res["both models on moved items (z-norm mean)"]
        else:
            res[ENSEMBLE] = _ensemble(s_oo, s_nn, qo, qn, mask, go, gn, cohort, fit.phi,
                                      fit.phi.transform(go))
        by_rule = {"both": res["both models on moved items (z-norm mean)"],
                   "ensemble": res[ENSEMBLE],
                   "rank-merge": rank, "psi": res["psi online (top-100 z-norm)"],
                   "fused": res["fused online (top-100 z-norm)"], "old-only": res[
                       "old-only -> switch"]}
        res[BEFORE] = by_rule[chosen]
        check = checks.get(nb)
        for name in VARIANTS:
            res[name] = by_rule[check.rules[name]] if check is not None else \
                (s_nn if done else s_oo)
        entry: dict[str, Any] = {"fraction": float(f), "rule": chosen,
                                 "fit_pairs": None if fit is None else fit.m}
        if check is not None:
            real = {c: task.evaluate(by_rule[c], rows)[task.metric] for c in check.rr}
            entry.update(rules=check.rules, check_fit=check.fit_m,
                         pseudo_mrr={c: round(100 * float(v.mean()), 3)
                                     for c, v in check.rr.items()},
                         real={c: round(100 * float(np.nanmean(v)), 3) for c, v in real.items()},
                         scores=check.scores)
        out["decision"].append(entry)
        for r in RULES:
            out[r].append(task.evaluate(res[r], rows))
    return out


def simulate(task: Task, old: str, new: str, order_kind: str, seed: int,
             fractions: np.ndarray, config: OnlineConfig,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Curves (per-query metrics over all queries) of every rule for one order and seed.

    ``random``: every query weighs the same. ``queries``: users ask the query groups
    with Zipf popularity (:func:`popularity`); the traffic half's requests follow it
    and the evaluated half is weighted by it (``weights`` in the result: what users
    see); ``queries-uniform``: the same order mechanism with uniform traffic.
    """
    n_q, n = len(task.q_labels), task.g[old].shape[0]
    weights = np.full(n_q, 1.0 / n_q)
    if order_kind in ("random", "hubs"):
        order = random_order(n, seed) if order_kind == "random" else hub_order(task, old, seed)
        parts = [(np.arange(n_q), order, fits_for(task, old, new, order, config))]
    else:
        if order_kind == "queries":
            weights = popularity(task, seed)
        split = np.random.default_rng(1000 + seed).permutation(n_q)
        halves = [np.sort(split[: n_q // 2]), np.sort(split[n_q // 2:])]
        parts = []
        for traffic, evaluated in ((halves[0], halves[1]), (halves[1], halves[0])):
            order = query_driven_order(task, old, traffic, seed,
                                       weights=weights if order_kind == "queries" else None)
            parts.append((evaluated, order, fits_for(task, old, new, order, config)))
    merged: dict[str, Any] = {}
    rows_all = np.concatenate([p[0] for p in parts])
    decisions = []
    for rows, order, fits in parts:
        checks = checks_for(task, old, new, order, fits, fractions)
        cur = run_curves(task, old, new, order, rows, fractions, fits, checks)
        decisions.append({"fits": [{"pairs": x.m, "rule": x.rule, "scores": x.scores,
                                    "fit_s": round(x.fit_s, 4)} for x in fits],
                          "in_force": cur.pop("decision")})
        for r, per_f in cur.items():
            if r not in merged:
                merged[r] = [dict(pf) for pf in per_f]
            else:
                for acc, pf in zip(merged[r], per_f, strict=True):
                    for k in acc:
                        acc[k] = np.concatenate([acc[k], pf[k]])
    back = np.argsort(rows_all)
    for r in merged:
        for acc in merged[r]:
            for k in acc:
                acc[k] = acc[k][back]
    return {"curves": merged, "decisions": decisions, "weights": weights}
