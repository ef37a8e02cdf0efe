"""Online backfilling: accuracy during the backfill for every merge rule and baseline.

Simulation on real embeddings (cached per model by ``galleria.eval.embed``):
the gallery is re-embedded item by item in a seeded random order; at each
backfilled fraction 0, 10, ..., 100 % the items already done hold new-model
vectors, the others old-model vectors, and every query is answered with one
rule. Ranking the full merged score matrix is exactly what merging the two
parts' full lists gives (``galleria.upgrade.merge.merged_scores``; the live
``BackfillSearcher`` merges top-k lists with the same maps).

Pairs (old -> new): effnet-lite0 -> effnet-lite2, opennsfw-r50 -> effnet-lite2.
Data:
- Caltech-101: psi, the metric-compatible psi, the BCT head and the train-split
  calibrations are trained on the *train* split (paired embeddings + labels);
  the *test* split is the gallery being backfilled and the queries
  (leave-one-out: each test image queries the other test images).
- SMVS DVD covers: gallery = all 500 images, queries = the 400 phone photos
  (self excluded); every map is the one trained on Caltech-101 train.

Rules (old part query / merge scale):
- ``old-only -> switch``: old model until 100 %, then the new index (needs the
  full new index built on the side: shadow mode).
- ``naive``: old(q) / new(q), raw cosine.
- ``rank-merge (z-score|quantile|platt, train cal.)``: old(q) / new(q), scores
  calibrated on Caltech train pairs (platt uses its labels).
- ``rank-merge (quantile, self-cal.)``: a global quantile map fitted on the
  first <= 1000 backfilled items' (old, new) pairs (the job's pair store).
- ``rank-merge ([top-100] z-norm, self-cohort)``: per-query Z-norm of each part
  against the same <= 1000 backfilled items as cohort (top-100: statistics of
  the query's 100 most similar cohort items). The live default, label-free.
- ``psi``: psi(new(q)) / new(q) raw; with quantile or top-100 z-norm.
- ``fused``: norm(old(q) + 0.5 psi(new(q))) / new(q), top-100 z-norm (two
  passes; the weight was set a priori, not tuned).
- ``metric-compatible``: psi_mc(new(q)) / new(q) raw; with quantile or z-norm.
- ``BCT (no backfill)``: h(new(q)) against the old gallery at every fraction.
- ``BCT + backfill``: h(new(q)) against old(x) or h(new(x)) (one space, no merge).

Metrics: mAP@R (Caltech) or mAP (SMVS), and R@1, at each fraction (mean over
seeds), area under the curve vs the straight line between the old model's
value (0 %) and the new model's (100 %), and the negative-flip rate (queries
whose top-1 was right with the old model and is wrong under the rule; mean over
the interior fractions 10..90 % and max). Query cost: forward passes and
measured milliseconds per query of each stage.

Run:  .venv/bin/python benchmarks/bench_backfill.py [--quick]
Writes benchmarks/results/backfill.{json,md} and backfill-<dataset>.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galleria.cache import cache_dir
from galleria.cli.common import set_threads
from galleria.eval.datasets import load_task
from galleria.eval.embed import task_embeddings
from galleria.eval.metrics import per_query_metrics
from galleria.extractors.registry import create_extractor
from galleria.fingerprint import digest, slug
from galleria.upgrade.bct import BCTHead
from galleria.upgrade.jobcal import COHORT_TOP, MIN_PAIRS, fuse_queries
from galleria.upgrade.merge import (
    Calibration,
    CohortNorm,
    area_under_curve,
    fit_calibration,
    linear_area,
    merged_scores,
    negative_flip_rate,
)
from galleria.upgrade.psi import CrossModelMap, ReverseTransform, load_cross_map

OUT = Path(__file__).resolve().parent / "results"
PAIRS = [("effnet-lite0", "effnet-lite2"), ("opennsfw-r50", "effnet-lite2")]
SHORT = {"effnet-lite0": "lite0", "effnet-lite2": "lite2", "opennsfw-r50": "opennsfw-r50"}
FRACTIONS = np.round(np.linspace(0.0, 1.0, 11), 2)
CALIB_SIZE = 1000
PLOT_LABEL_FREE = [
    "old-only -> switch", "naive", "rank-merge (quantile, self-cal.)",
    "rank-merge (top-100 z-norm, self-cohort)", "psi", "psi (top-100 z-norm, self-cohort)",
    "fused: old(q) + psi (top-100 z-norm)",
]
PLOT_LABELLED = [
    "old-only -> switch", "rank-merge (top-100 z-norm, self-cohort)",
    "fused: old(q) + psi (top-100 z-norm)", "metric-compatible", "BCT (no backfill)",
    "BCT + backfill",
]

log = logging.getLogger("bench_backfill")


@dataclass
class Split:
    """Embeddings of one evaluation: queries and gallery per model, labels, self index."""

    name: str
    metric: str
    q: dict[str, np.ndarray]
    g: dict[str, np.ndarray]
    q_labels: np.ndarray
    g_labels: np.ndarray
    qgi: np.ndarray


def load_data(models: list[str]) -> tuple[dict[str, Any], list[Split]]:
    cal = load_task("caltech101")
    smvs = load_task("smvs")
    train: dict[str, np.ndarray] = {}
    c_te: dict[str, np.ndarray] = {}
    s_q: dict[str, np.ndarray] = {}
    s_g: dict[str, np.ndarray] = {}
    fps: dict[str, str] = {}
    for m in models:
        ext = create_extractor(m)
        fps[m] = ext.fingerprint
        te, tr = task_embeddings(cal, ext)
        train[m], c_te[m] = tr, te
        s_q[m], s_g[m] = task_embeddings(smvs, ext)
    n = len(cal.query_labels)
    splits = [
        Split("caltech101", "mAP@R", c_te, c_te, cal.query_labels, cal.query_labels,
              np.arange(n, dtype=np.int64)),
        Split("smvs", "mAP", s_q, s_g, smvs.query_labels, smvs.gallery_labels,
              smvs.query_gallery_index),
    ]
    return {"train": train, "train_labels": cal.gallery_labels, "fingerprints": fps}, splits


def trained_map(kind: str, make: Callable[[], CrossModelMap], new: np.ndarray, old: np.ndarray,
                labels: np.ndarray | None, fps: tuple[str, str]) -> CrossModelMap:
    """Train (or load from the cache) one map on Caltech train."""
    m = make()
    key = digest(kind, m.get_params(), fps, new.shape, old.shape, float(new.sum()),
                 float(old.sum()))
    folder = cache_dir("bench-backfill") / f"{kind}-{slug(fps[1])}-{slug(fps[0])}-{key}"
    if (folder / "header.json").is_file():
        return load_cross_map(folder, old_fingerprint=fps[0], new_fingerprint=fps[1])
    t = time.perf_counter()
    m.fit(new, old, labels=labels, new_fingerprint=fps[1], old_fingerprint=fps[0])
    m.info_["fit_seconds"] = round(time.perf_counter() - t, 1)
    m.save(folder)
    print(f"  trained {kind} in {time.perf_counter() - t:.0f} s", flush=True)
    return m


def evaluate(split: Split, scores: np.ndarray) -> dict[str, np.ndarray]:
    metrics = (split.metric, "R@1") if split.metric != "mAP" else ("mAP", "R@1")
    return per_query_metrics(scores, split.q_labels, split.g_labels, metrics=metrics,
                             query_gallery_index=split.qgi)


def run_pair(old: str, new: str, data: dict[str, Any], splits: list[Split], seeds: list[int],
             ) -> dict[str, Any]:
    fps = (data["fingerprints"][old], data["fingerprints"][new])
    o_tr, n_tr = data["train"][old], data["train"][new]
    y_tr = data["train_labels"]
    maps = {
        "psi": trained_map("psi-regression", lambda: ReverseTransform(loss="regression"),
                           n_tr, o_tr, None, fps),
        "mc": trained_map("psi-mc", lambda: ReverseTransform(loss="metric-compatible"),
                          n_tr, o_tr, y_tr, fps),
        "bct": trained_map("bct", BCTHead, n_tr, o_tr, y_tr, fps),
    }
    train_cal = {
        kind: fit_calibration(kind, old_queries=o_tr, old_gallery=o_tr, new_embeddings=n_tr,
                              labels=y_tr)
        for kind in ("affine", "quantile", "platt")
    }
    out: dict[str, Any] = {"old": old, "new": new, "fingerprints": list(fps),
                           "maps": {k: {"fingerprint": m.fingerprint, "info": m.info_}
                                    for k, m in maps.items()},
                           "datasets": {}}
    for split in splits:
        out["datasets"][split.name] = run_split(split, old, new, maps, train_cal, seeds)
    return out


def run_split(split: Split, old: str, new: str, maps: dict[str, CrossModelMap],
              train_cal: dict[str, Calibration], seeds: list[int]) -> dict[str, Any]:
    qo, qn = split.q[old], split.q[new]
    go, gn = split.g[old], split.g[new]
    s_oo = qo @ go.T
    s_nn = qn @ gn.T
    p_psi, p_mc, p_bct = (maps[k].transform(qn) for k in ("psi", "mc", "bct"))
    s_psi, s_mc, s_bct = p_psi @ go.T, p_mc @ go.T, p_bct @ go.T
    q_fused = fuse_queries(qo, p_psi)
    s_fused = q_fused @ go.T
    s_bct_new = p_bct @ maps["bct"].transform(gn).T
    n_g = go.shape[0]
    ref = {"old": evaluate(split, s_oo), "new": evaluate(split, s_nn)}
    old_correct = ref["old"]["R@1"] > 0.5

    def self_cal(sample: np.ndarray, q_old: Callable[[np.ndarray], np.ndarray],
                 fallback: Calibration | None) -> Calibration:
        if sample.size < MIN_PAIRS:
            return fallback or Calibration.identity()
        return fit_calibration("quantile", old_queries=q_old(sample), old_gallery=go[sample],
                               new_embeddings=gn[sample])

    def znorm(s_old: np.ndarray, q_old: np.ndarray, mask: np.ndarray, sample: np.ndarray,
              top: int | None = COHORT_TOP) -> np.ndarray:
        """Query-adaptive Z-norm of both parts against the backfilled cohort."""
        if sample.size < MIN_PAIRS:
            return merged_scores(s_old, s_nn, mask)
        return merged_scores(s_old, s_nn, mask, CohortNorm(go[sample], gn[sample], top=top),
                             old_queries=q_old, new_queries=qn)

    psi_stored = maps["psi"].calibration("quantile")
    mc_stored = maps["mc"].calibration("quantile")
    rules: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
        "old-only -> switch": lambda m, s, f: s_nn if f >= 1.0 else s_oo,
        "naive": lambda m, s, f: merged_scores(s_oo, s_nn, m),
        "rank-merge (z-score, train cal.)":
            lambda m, s, f: merged_scores(s_oo, s_nn, m, train_cal["affine"]),
        "rank-merge (quantile, train cal.)":
            lambda m, s, f: merged_scores(s_oo, s_nn, m, train_cal["quantile"]),
        "rank-merge (platt, train cal.)":
            lambda m, s, f: merged_scores(s_oo, s_nn, m, train_cal["platt"]),
        "rank-merge (quantile, self-cal.)":
            lambda m, s, f: merged_scores(s_oo, s_nn, m, self_cal(s, lambda i: go[i], None)),
        "rank-merge (z-norm, self-cohort)": lambda m, s, f: znorm(s_oo, qo, m, s, top=None),
        "rank-merge (top-100 z-norm, self-cohort)": lambda m, s, f: znorm(s_oo, qo, m, s),
        "psi": lambda m, s, f: merged_scores(s_psi, s_nn, m),
        "psi (quantile, self-cal.)": lambda m, s, f: merged_scores(
            s_psi, s_nn, m, self_cal(s, lambda i: maps["psi"].transform(gn[i]), psi_stored)),
        "psi (top-100 z-norm, self-cohort)": lambda m, s, f: znorm(s_psi, p_psi, m, s),
        "fused: old(q) + psi (top-100 z-norm)": lambda m, s, f: znorm(s_fused, q_fused, m, s),
        "metric-compatible": lambda m, s, f: merged_scores(s_mc, s_nn, m),
        "metric-compatible (quantile, self-cal.)": lambda m, s, f: merged_scores(
            s_mc, s_nn, m, self_cal(s, lambda i: maps["mc"].transform(gn[i]), mc_stored)),
        "metric-compatible (top-100 z-norm, self-cohort)":
            lambda m, s, f: znorm(s_mc, p_mc, m, s),
        "BCT (no backfill)": lambda m, s, f: s_bct,
        "BCT + backfill": lambda m, s, f: np.where(m[None, :], s_bct_new, s_bct),
    }
    metric_names = list(ref["old"])
    res: dict[str, Any] = {
        "queries": int(qo.shape[0]), "gallery": int(n_g), "metric": split.metric,
        "old": {k: float(100 * np.nanmean(v)) for k, v in ref["old"].items()},
        "new": {k: float(100 * np.nanmean(v)) for k, v in ref["new"].items()},
        "fractions": FRACTIONS.tolist(), "rules": {},
    }
    for name, rule in rules.items():
        t0 = time.perf_counter()
        curves = {k: np.zeros((len(seeds), len(FRACTIONS))) for k in metric_names}
        nfr = np.zeros((len(seeds), len(FRACTIONS)))
        for si, seed in enumerate(seeds):
            perm = np.random.default_rng(seed).permutation(n_g)
            for fi, f in enumerate(FRACTIONS):
                if si > 0 and f in (0.0, 1.0):  # no randomness at the end points
                    for k in metric_names:
                        curves[k][si, fi] = curves[k][0, fi]
                    nfr[si, fi] = nfr[0, fi]
                    continue
                nb = round(float(f) * n_g)
                mask = np.zeros(n_g, bool)
                mask[perm[:nb]] = True
                sample = perm[: min(nb, CALIB_SIZE)]
                pq = evaluate(split, rule(mask, sample, float(f)))
                for k in metric_names:
                    curves[k][si, fi] = 100 * np.nanmean(pq[k])
                nfr[si, fi] = 100 * negative_flip_rate(old_correct, pq["R@1"] > 0.5)
        entry: dict[str, Any] = {}
        for k in metric_names:
            mean = curves[k].mean(0)
            o, n = res["old"][k], res["new"][k]
            auc = area_under_curve(FRACTIONS, mean)
            entry[k] = {
                "curve": np.round(mean, 3).tolist(),
                "curve_std": np.round(curves[k].std(0), 3).tolist(),
                "auc": round(auc, 3),
                "auc_minus_line": round(auc - linear_area(o, n), 3),
                "min_minus_old": round(float(mean.min() - o), 3),
                "never_below_old": bool(np.all(curves[k] >= o - 1e-9)),
            }
        interior = slice(1, len(FRACTIONS) - 1)
        entry["nfr"] = {
            "curve": np.round(nfr.mean(0), 3).tolist(),
            "mean_interior": round(float(nfr[:, interior].mean()), 3),
            "max": round(float(nfr.mean(0).max()), 3),
            "at_100": round(float(nfr.mean(0)[-1]), 3),
        }
        res["rules"][name] = entry
        gain = entry[split.metric]["auc_minus_line"]
        print(f"  {split.name:<10} {name:<42} {split.metric} AUC-line {gain:+7.2f}  "
              f"NFR {entry['nfr']['mean_interior']:5.2f}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    return res


# --------------------------------------------------------------------------- #
# query cost
# --------------------------------------------------------------------------- #


def _median_ms(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def measure_costs(models: list[str], maps_by_pair: dict[str, dict[str, CrossModelMap]],
                  gallery_size: int, n_queries: int = 24) -> dict[str, Any]:
    """Median ms per query of each stage, one query at a time (batch 1, real images).

    Run with ``OPENBLAS_NUM_THREADS=1`` on a quiet machine for stable numbers
    (``--costs-only``): small matmuls with a multi-threaded BLAS on a loaded
    machine spin and time out.
    """
    from galleria.extract.embed import embed_items
    from galleria.images.sources import SourceItem
    from galleria.types import SearchResult
    from galleria.upgrade.merge import cohort_stats, merge_results, znorm_result

    smvs = load_task("smvs")
    files = smvs.query_files()[:n_queries]
    items = [SourceItem(id=str(p), path=p) for p in files]
    fwd: dict[str, float] = {}
    for m in models:
        ext = create_extractor(m)
        embed_items(items[:2], ext, batch_size=1, workers=1)  # warm-up
        it = iter(items * 2)
        fwd[m] = _median_ms(lambda e=ext, i=it: embed_items([next(i)], e, batch_size=1,
                                                             workers=1), n_queries)
    rng = np.random.default_rng(0)
    g = rng.standard_normal((gallery_size, 1280)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = g[:1]
    k = 100
    search_ms = _median_ms(lambda: np.argpartition(-(q @ g.T), k, axis=1)[:, :k], 50)
    parts = [SearchResult(np.sort(rng.random((1, k)).astype(np.float32))[:, ::-1].copy(),
                          rng.integers(0, gallery_size, (1, k))) for _ in range(2)]
    merge_ms = _median_ms(lambda: merge_results(parts, k), 50)
    cohort = g[:1000]

    def znorm_merge() -> None:
        m, s = cohort_stats(q, cohort, top=COHORT_TOP)
        merge_results([znorm_result(parts[0], m, s), znorm_result(parts[1], m, s)], k)

    znorm_ms = _median_ms(znorm_merge, 50)
    map_ms: dict[str, float] = {}
    for pair, maps in maps_by_pair.items():
        for kind, mp in maps.items():
            x = rng.standard_normal((1, mp.new_dim_)).astype(np.float32)
            mp.transform(x)
            map_ms[f"{pair}:{kind}"] = _median_ms(lambda m=mp, v=x: m.transform(v), 50)
    return {"forward_ms": fwd, "search_ms_one_part_exact": search_ms,
            "gallery_size_for_search": gallery_size, "merge_ms_k100": merge_ms,
            "znorm_merge_ms_k100_cohort1000": znorm_ms, "map_ms": map_ms,
            "queries": n_queries, "statistic": "median over calls, batch 1",
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default")}


def rule_costs(old: str, new: str, pair: str, c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    fo, fn = c["forward_ms"][old], c["forward_ms"][new]
    s, mg = c["search_ms_one_part_exact"], c["merge_ms_k100"]
    zm = c.get("znorm_merge_ms_k100_cohort1000", mg)
    mp = {k.split(":")[1]: v for k, v in c["map_ms"].items() if k.startswith(pair + ":")}
    two = {"passes": 2, "ms": fo + fn + 2 * s + mg}
    two_z = {"passes": 2, "ms": fo + fn + 2 * s + zm}
    return {
        "old-only -> switch": {"passes": 1, "ms": fo + s,
                               "note": "during the backfill; new model after"},
        "naive": two,
        "rank-merge (z-norm)": two_z,
        "psi (z-norm)": {"passes": 1, "ms": fn + mp["psi"] + 2 * s + zm},
        "fused (z-norm)": {"passes": 2, "ms": fo + fn + mp["psi"] + 2 * s + zm},
        "metric-compatible": {"passes": 1, "ms": fn + mp["mc"] + 2 * s + mg},
        "BCT (no backfill)": {"passes": 1, "ms": fn + mp["bct"] + s},
        "new model alone (after finish)": {"passes": 1, "ms": fn + s},
    }


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #


MERGE_RULES = [n for n in PLOT_LABEL_FREE if not n.startswith("old-only")] + [
    "rank-merge (z-score, train cal.)", "rank-merge (quantile, train cal.)",
    "rank-merge (z-norm, self-cohort)", "psi (quantile, self-cal.)",
]


def _min_before_end(e: dict[str, Any], old: float) -> float:
    """Lowest point of the curve over 0..90 % minus the old model (100 % is the new model)."""
    return float(min(e["curve"][:-1]) - old)


CLAIM_RULES = [
    "rank-merge (top-100 z-norm, self-cohort)", "psi (top-100 z-norm, self-cohort)",
    "fused: old(q) + psi (top-100 z-norm)",
]


def summary_rows(results: dict[str, Any]) -> list[str]:
    """The three claims, per pair and data set, for the live rules; and who meets all three."""
    rows = ["| pair | data | metric | rule | AUC - line | min - old (0-90 %) | "
            "NFR rule / naive | all three? |", "|---|---|---|---|---|---|---|---|"]
    for pair in results["pairs"]:
        for ds, r in pair["datasets"].items():
            m = r["metric"]
            naive = r["rules"]["naive"]["nfr"]["mean_interior"]

            def claims(name: str, r: dict[str, Any] = r, m: str = m,
                       naive: float = naive) -> tuple[float, float, float, bool]:
                e = r["rules"][name]
                gain = e[m]["auc_minus_line"]
                low = _min_before_end(e[m], r["old"][m])
                nfr = e["nfr"]["mean_interior"]
                return gain, low, nfr, gain > 0 and low >= 0 and nfr < naive

            for name in CLAIM_RULES:
                gain, low, nfr, ok = claims(name)
                rows.append(f"| {SHORT[pair['old']]} -> {SHORT[pair['new']]} | {ds} | {m} | "
                            f"{name} | {gain:+.2f} | {low:+.2f} | {nfr:.2f} / {naive:.2f} | "
                            f"{'yes' if ok else 'no'} |")
            meet = [n for n in MERGE_RULES if claims(n)[3]]
            rows.append(f"| | | | *label-free merge rules meeting all three:* "
                        f"{', '.join(meet) if meet else 'none'} | | | | |")
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Online backfilling benchmark", "",
             f"Machine: {results['machine']}. Seeds (backfill orders): {results['seeds']}. "
             f"Total {results['seconds']:.0f} s. Produced by benchmarks/bench_backfill.py "
             "(simulation on cached real embeddings; see its docstring for the protocol).", "",
             "Values in percent, mean over seeds. AUC = mean height of the curve over the "
             "backfilled fraction; *vs line* = AUC minus the straight line between the old "
             "model (0 %) and the new model (100 %). *min-old* = lowest point of the curve "
             "over 0..90 % minus the old model's value (at 100 % every rule but BCT is the new "
             "model). NFR = negative-flip rate (top-1 right with the old model, wrong now), "
             "mean over 10..90 % / max over 0..100 %. Label-trained rules (metric-compatible, "
             "BCT) use Caltech-101 train labels.", "",
             "## Summary: the three claims (AUC above the straight line, never below the old "
             "model before 100 %, fewer negative flips than the naive merge)", ""]
    lines += summary_rows(results)
    lines.append("")
    for pair in results["pairs"]:
        for ds, r in pair["datasets"].items():
            metric = r["metric"]
            for mname in (metric, "R@1"):
                lines.append(f"## {SHORT[pair['old']]} -> {SHORT[pair['new']]}, {ds}, {mname} "
                             f"(old {r['old'][mname]:.2f}, new {r['new'][mname]:.2f})")
                lines.append("")
                head = ["rule"] + [f"{int(100 * f)}%" for f in r["fractions"]] + \
                    ["AUC", "vs line", "min-old"] + (["NFR mean/max"] if mname == "R@1" else [])
                lines.append("| " + " | ".join(head) + " |")
                lines.append("|" + "---|" * len(head))
                for name, e in r["rules"].items():
                    row = [name] + [f"{v:.1f}" for v in e[mname]["curve"]] + [
                        f"{e[mname]['auc']:.2f}", f"{e[mname]['auc_minus_line']:+.2f}",
                        f"{_min_before_end(e[mname], r['old'][mname]):+.2f}"]
                    if mname == "R@1":
                        row.append(f"{e['nfr']['mean_interior']:.2f} / {e['nfr']['max']:.2f}")
                    lines.append("| " + " | ".join(row) + " |")
                lines.append("")
    c = results["costs"]
    lines += ["## Query cost", "",
              "Forward pass per query image (batch 1, ms): "
              + ", ".join(f"{SHORT[m]} {v:.1f}" for m, v in c["forward_ms"].items())
              + f"; exact search of one part ({c['gallery_size_for_search']} x 1280): "
              f"{c['search_ms_one_part_exact']:.2f} ms; merge of two top-100 lists: "
              f"{c['merge_ms_k100']:.3f} ms raw, "
              f"{c.get('znorm_merge_ms_k100_cohort1000', float('nan')):.3f} ms with the "
              "top-100 Z-norm against a 1000-item cohort; maps (psi / BCT head, batch 1): "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in c["map_ms"].items())
              + f". {c.get('statistic', '')}, BLAS threads {c.get('blas_threads', '?')}. "
              "With a multi-threaded BLAS next to ONNX Runtime's spinning threads the "
              "sub-millisecond matmuls (psi, search) were measured at 20-30 ms: see "
              "docs/upgrade.md.", "",
              "| pair | rule | model forward passes / query | ms / query |", "|---|---|---|---|"]
    for pair, rules in results["rule_costs"].items():
        for name, e in rules.items():
            lines.append(f"| {pair} | {name} | {e['passes']} | {e['ms']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """One figure per data set: rows = (metric, label-free rules), (R@1, label-free rules),
    (metric, rules trained with labels); columns = model pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pairs = results["pairs"]
    for ds in pairs[0]["datasets"]:
        fig, axes = plt.subplots(3, len(pairs), figsize=(6.5 * len(pairs), 13), squeeze=False)
        for j, pair in enumerate(pairs):
            r = pair["datasets"][ds]
            x = 100 * np.asarray(r["fractions"])
            rows = [(r["metric"], PLOT_LABEL_FREE, "label-free rules"),
                    ("R@1", PLOT_LABEL_FREE, "label-free rules"),
                    (r["metric"], PLOT_LABELLED, "rules trained with Caltech labels")]
            for i, (mname, names, what) in enumerate(rows):
                ax = axes[i, j]
                for name in names:
                    e = r["rules"][name][mname]
                    style = "--" if name.startswith(("old-only", "BCT")) else "-"
                    ax.plot(x, e["curve"], style, marker="o", ms=3,
                            label=f"{name} ({e['auc_minus_line']:+.2f})")
                ax.plot([0, 100], [r["old"][mname], r["new"][mname]], ":", color="grey",
                        label="straight line old -> new")
                ax.axhline(r["old"][mname], color="grey", lw=0.5)
                ax.set_title(f"{ds}: {SHORT[pair['old']]} -> {SHORT[pair['new']]}, {mname}, "
                             f"{what}", fontsize=9)
                ax.set_xlabel("backfilled %")
                ax.set_ylabel(mname)
                ax.legend(fontsize=7, title="rule (AUC - line)", title_fontsize=7)
                ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out / f"backfill-{ds}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written


def costs_for(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measure the query costs with the maps the pairs were run with (from the cache)."""
    models = sorted({m for p in PAIRS for m in p})
    maps_by_pair: dict[str, dict[str, CrossModelMap]] = {}
    for pair in results["pairs"]:
        old_fp, new_fp = pair["fingerprints"]
        key = f"{SHORT[pair['old']]}->{SHORT[pair['new']]}"
        maps_by_pair[key] = {}
        for kind, name in (("psi", "psi-regression"), ("mc", "psi-mc"), ("bct", "bct")):
            want = pair["maps"][kind]["fingerprint"]
            for folder in cache_dir("bench-backfill").glob(
                    f"{name}-{slug(new_fp)}-{slug(old_fp)}-*"):
                candidate = load_cross_map(folder)
                if candidate.fingerprint == want:
                    maps_by_pair[key][kind] = candidate
                    break
            else:
                raise SystemExit(f"the {kind} map {want} is not in the cache: rerun the benchmark")
    costs = measure_costs(models, maps_by_pair,
                          gallery_size=int(results.get("gallery_size_for_costs", 2893)))
    per_rule = {f"{SHORT[o]}->{SHORT[n]}": rule_costs(o, n, f"{SHORT[o]}->{SHORT[n]}", costs)
                for o, n in PAIRS}
    return costs, per_rule


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--costs-only", action="store_true",
                    help="re-measure the query costs into an existing backfill.json "
                         "(run with OPENBLAS_NUM_THREADS=1 on a quiet machine)")
    ap.add_argument("--replot", action="store_true",
                    help="rewrite the markdown and plots from an existing backfill.json")
    args = ap.parse_args()
    if args.costs_only:
        out = Path(args.out)
        results = json.loads((out / "backfill.json").read_text())
        set_threads(args.threads or 1)
        results["costs"], results["rule_costs"] = costs_for(results)
        (out / "backfill.json").write_text(json.dumps(results, indent=1))
        args.replot = True
    if args.replot:
        out = Path(args.out)
        results = json.loads((out / "backfill.json").read_text())
        (out / "backfill.md").write_text(markdown(results))
        for p in plot(results, out):
            print(f"wrote {p}")
        return 0
    logging.basicConfig(level=logging.WARNING)
    threads = set_threads(args.threads)
    t0 = time.perf_counter()
    seeds = [0] if args.quick else list(range(args.seeds))
    models = sorted({m for p in PAIRS for m in p})
    data, splits = load_data(models)
    pairs = []
    for old, new in PAIRS:
        print(f"{old} -> {new}", flush=True)
        pairs.append(run_pair(old, new, data, splits, seeds))
    results = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {threads} threads, "
                   f"python {platform.python_version()}",
        "seeds": seeds,
        "pairs": pairs,
        "gallery_size_for_costs": int(splits[0].g[models[0]].shape[0]),
        "seconds": time.perf_counter() - t0,
    }
    results["costs"], results["rule_costs"] = costs_for(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backfill.json").write_text(json.dumps(results, indent=1))
    (out / "backfill.md").write_text(markdown(results))
    for p in plot(results, out):
        print(f"wrote {p}")
    print(f"wrote {out / 'backfill.json'} and {out / 'backfill.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
