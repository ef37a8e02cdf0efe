"""Adaptive-size search: full-size vs prefix vs funnel search on 1M nested vectors, same run.

A nested transform (PCA and SS2D, 1280 -> 512) is fitted on the real
EfficientNet-Lite2 (GeM, 260 px) embeddings of the Caltech-101 train split.

- **Speed** (``--n`` vectors, default 1M): the real Caltech embeddings (train +
  test, 8677 x 1280) are grown with ``_common.RealDerived`` (a gallery vector is
  a Dirichlet(1,1,1) mixture of a real embedding and two of its 10 nearest real
  neighbours plus jitter of 0.25 x the median real NN distance, re-normalised;
  queries start from held-out real embeddings), in 1280-d, then mapped by the
  fitted SS2D to 512-d nested vectors. One :class:`~galleria.index.adaptive.PrefixIndex`
  holds them; a batch of ``--queries`` queries (k = 10, ``--threads`` threads)
  is timed, interleaved (``interleaved_best``): full-size exact search (512-d),
  prefix search at 128 / 64 / 32, and funnel search (32-d shortlist of 200,
  re-scored with the full 512-d vectors). Recall@10 of each against the full-size
  top 10 says how much of the full result each keeps.
- **Retention** on real tasks (exact, no synthetic data): Caltech-101 (test
  queries vs train gallery; fitted on train) and SMVS (400 phone photos vs 500
  images; fitted transductively on the 500): mAP of funnel search (its ranking is
  the 200-long shortlist re-scored) divided by the mAP of full-size search
  (complete ranking), per nested transform.

Run:  .venv/bin/python benchmarks/bench_adaptive.py [--quick] [--n 1000000]
Writes benchmarks/results/adaptive.{json,md} (``--quick``: adaptive_quick.*).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    MemoryMonitor,
    RealDerived,
    interleaved_best,
    machine_info,
    machine_md,
    markdown_table,
    peak_rss_mb,
    set_threads,
    write_results,
)

D_MAX = 512
PREFIXES = [128, 64, 32]
#: (shortlist prefix, shortlist length); the first is the issue's configuration
FUNNELS = [(32, 200), (32, 100), (64, 200), (64, 100)]
SHORTLIST_DIM, SHORTLIST = FUNNELS[0]
K = 10
#: SS2D: library defaults (linear student, temperature 0.05, batch 256) with the
#: step budget of bench_transforms.py; teacher: see --teacher.
SS2D_PARAMS: dict[str, Any] = {"epochs": 100_000, "max_steps": 2000}


def lite2(task_name: str, size: int) -> tuple[Any, np.ndarray, np.ndarray]:
    from galleria.eval.datasets import load_task
    from galleria.eval.embed import task_embeddings
    from galleria.extractors.registry import create_extractor

    task = load_task(task_name)
    q, g = task_embeddings(task, create_extractor("effnet-lite2", size=size))
    return task, q, g


def fit_nested(kind: str, X: np.ndarray, teacher: str, quick: bool) -> Any:
    from galleria.transforms.registry import create_transform

    if kind == "pca":
        return create_transform("pca", dim=D_MAX).fit(X)
    params = dict(SS2D_PARAMS)
    if quick:
        params["max_steps"] = 60
    tparams: dict[str, Any] = {"dim": D_MAX}
    if teacher == "aesvc":
        tparams.update({"epochs": 100_000, "max_steps": 60 if quick else 1000,
                        "batch_size": 512})
    t = create_transform(teacher, **tparams).fit(X)
    return create_transform("ss2d", dim=D_MAX, teacher=t, **params).fit(X)


# ----------------------------------------------------------------------------- retention
def retention(task: Any, tr: Any, q: np.ndarray, g: np.ndarray, metric: str) -> dict[str, Any]:
    """Full-size vs prefix vs funnel quality of one nested transform on one real task."""
    from galleria.index.adaptive import PrefixIndex

    qv, gv = tr.transform(q), tr.transform(g)
    index = PrefixIndex(D_MAX, shortlist_dim=SHORTLIST_DIM, shortlist=SHORTLIST)
    index.add(np.arange(gv.shape[0]), gv)
    n = gv.shape[0]
    runs: dict[str, tuple[Any, int | None]] = {
        "full (complete ranking)": (index.search(qv, n), None),
        f"prefix {SHORTLIST_DIM} (complete ranking)": (index.search(qv, n, dim=SHORTLIST_DIM),
                                                       None),
    }
    for sd, sl in FUNNELS:
        runs[f"full (top {sl})"] = (index.search(qv, sl), None)
        # the funnel returns its whole re-scored shortlist: the ranking a user can page through
        runs[f"funnel {sd}->{D_MAX}, shortlist {sl}"] = (
            index.funnel_search(qv, sl, shortlist_dim=sd, shortlist=sl), sl)
    out: dict[str, Any] = {}
    for name, (res, _) in runs.items():
        m = task.evaluate(res)
        out[name] = {k: round(m[k], 3) for k in (metric, "R@1", "mAP@100") if k in m}
    full = out["full (complete ranking)"]
    for name, (_, sl) in runs.items():
        v = out[name]
        vals = {k: v[k] for k in (metric, "R@1", "mAP@100") if k in v}
        v["retention"] = {k: round(x / full[k], 4) for k, x in vals.items() if full[k]}
        if sl is not None:  # against full-size search returning as many results
            same = out[f"full (top {sl})"]
            v["retention_same_length"] = {k: round(x / same[k], 4) for k, x in vals.items()
                                          if same[k]}
    return out


# ----------------------------------------------------------------------------- speed
def grow(tr: Any, base: np.ndarray, n: int, n_queries: int, chunk: int = 65536,
         ) -> tuple[np.ndarray, np.ndarray, float]:
    """``n`` real-derived 1280-d vectors mapped by ``tr`` to ``(n, 512)``, and queries."""
    rd = RealDerived(base, seed=0, jitter=0.25)
    t0 = time.perf_counter()
    out = np.empty((n, D_MAX), np.float32)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        out[c0:c1] = tr.transform(rd.gallery(c1 - c0))
    queries = tr.transform(rd.queries(n_queries))
    return out, queries, time.perf_counter() - t0


def recall_at(ids: np.ndarray, ref: np.ndarray) -> float:
    hits = [np.intersect1d(a[a >= 0], b[b >= 0]).size for a, b in zip(ids, ref, strict=True)]
    return float(np.sum(hits) / np.sum(ref >= 0))


def speed(vectors: np.ndarray, queries: np.ndarray, threads: int, rounds: int) -> dict[str, Any]:
    from galleria.index.adaptive import PrefixIndex

    set_threads(threads)
    n = vectors.shape[0]
    with MemoryMonitor() as mon:
        index = PrefixIndex(D_MAX, shortlist_dim=SHORTLIST_DIM, shortlist=SHORTLIST)
        index.add(np.arange(n), vectors)
    index_mb = mon.held_mb
    units = {"full-size exact (512-d)": lambda: index.search(queries, K)}
    for d in PREFIXES:
        units[f"prefix {d}-d"] = lambda d=d: index.search(queries, K, dim=d)
    for sd, sl in FUNNELS:
        units[f"funnel {sd}-d shortlist {sl} -> 512-d"] = (
            lambda sd=sd, sl=sl: index.funnel_search(queries, K, shortlist_dim=sd, shortlist=sl))
    # the funnel's two stages alone (first configuration): where its time goes
    from galleria.index.adaptive import funnel_rescore, prefix
    from galleria.index.exact import inner_product_topk

    q_sd = prefix(queries, SHORTLIST_DIM)
    g_sd = index._gallery_prefix(SHORTLIST_DIM)
    _, cand = inner_product_topk(q_sd, g_sd, SHORTLIST)
    units[f"  stage 1: top-{SHORTLIST} of the {SHORTLIST_DIM}-d prefixes"] = (
        lambda: inner_product_topk(q_sd, g_sd, SHORTLIST))
    units[f"  stage 2: re-score {SHORTLIST} candidates at 512-d"] = (
        lambda: funnel_rescore(queries, index._table.vectors, cand, K))
    # results and recall against the full-size top-k (also warms the prefix caches)
    ref = index.search(queries, K).ids
    recalls = {name: round(recall_at(fn().ids, ref), 4) for name, fn in units.items()
               if not name.startswith("  stage")}
    load0 = os.getloadavg()
    with MemoryMonitor() as mon2:
        best = interleaved_best(units, rounds=rounds, min_unit_s=0.0)
    load1 = os.getloadavg()
    full_s = best["full-size exact (512-d)"]["wall"]
    rows = []
    for name, t in best.items():
        rows.append({"search": name, "wall_s": round(t["wall"], 4), "cpu_s": round(t["cpu"], 4),
                     "qps": round(queries.shape[0] / t["wall"], 1),
                     "speedup_vs_full": round(full_s / t["wall"], 2),
                     "recall@10_vs_full": recalls.get(name)})
    return {"n": n, "queries": int(queries.shape[0]), "k": K, "threads": threads,
            "rounds": rounds, "rows": rows, "index_mb": round(index_mb, 1),
            "prefix_cache_mb": round(sum(a.nbytes for a in index._prefix_cache.values()) / 2**20,
                                     1),
            "search_peak_extra_mb": round(mon2.peak_mb, 1),
            "load_average_before": load0, "load_average_after": load1}


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100k vectors, short training")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--teacher", default="pca-whiten-reg",
                    help="SS2D teacher kind (pca-whiten-reg, aesvc, center, ...)")
    ap.add_argument("--caltech-size", type=int, default=260)
    ap.add_argument("--smvs-size", type=int, default=512)
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.n = min(args.n, 100_000)
        args.rounds = 1

    import torch

    set_threads(args.threads)
    torch.set_num_threads(args.torch_threads)
    info = machine_info(args.threads)
    t_start = time.perf_counter()

    cal_task, cal_q, cal_g = lite2("caltech101", args.caltech_size)
    smvs_task, smvs_q, smvs_g = lite2("smvs", args.smvs_size)
    ret: dict[str, Any] = {}
    fitted: dict[str, Any] = {}
    fit_s: dict[str, float] = {}
    for kind in ("pca", "ss2d"):
        for ds, task, q, g, metric, note in (
            ("caltech101", cal_task, cal_q, cal_g, "mAP@R", "fitted on train (disjoint queries)"),
            ("smvs", smvs_task, smvs_q, smvs_g, "mAP", "fitted on all 500 (transductive)"),
        ):
            t0 = time.perf_counter()
            tr = fit_nested(kind, g, args.teacher, args.quick)
            fit_s[f"{kind}/{ds}"] = round(time.perf_counter() - t0, 1)
            if ds == "caltech101":
                fitted[kind] = tr
            ret[f"{kind}/{ds}"] = {"kind": kind, "dataset": ds, "fit": note,
                                   "metric": metric, "runs": retention(task, tr, q, g, metric)}
            r = ret[f"{kind}/{ds}"]["runs"]
            print(f"[retention] {kind} {ds}: " + "; ".join(
                f"{name}: {v[metric]:.2f} ({v['retention'].get(metric, 0):.3f})"
                for name, v in r.items()), flush=True)

    base = np.concatenate([cal_g, cal_q])
    vectors, queries, grow_s = grow(fitted["ss2d"], base, args.n, args.queries)
    print(f"[data] {vectors.shape} grown + transformed in {grow_s:.0f} s", flush=True)
    sp = speed(vectors, queries, args.threads, args.rounds)
    del vectors
    gc.collect()
    for r in sp["rows"]:
        print(f"[speed] {r}", flush=True)

    info["load_average_at_end"] = os.getloadavg()
    payload = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "ss2d_params": SS2D_PARAMS, "ss2d_teacher": args.teacher,
               "fit_seconds": fit_s, "retention": ret, "speed": sp,
               "grow_seconds": round(grow_s, 1),
               "total_seconds": round(time.perf_counter() - t_start, 1),
               "peak_rss_mb": round(peak_rss_mb(), 1)}
    stem = "adaptive_quick" if args.quick else "adaptive"
    write_results(stem, payload, report_md(payload), results_dir=args.results_dir)
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)


def report_md(p: dict[str, Any]) -> str:
    sp = p["speed"]
    md = ["# Adaptive-size search: full size vs prefix vs funnel", "",
          f"## Speed on {sp['n']:,} nested 512-d vectors ({sp['queries']} queries per batch, "
          f"k = {sp['k']}, {sp['threads']} threads, best of {sp['rounds']} interleaved rounds)",
          "",
          "Vectors: SS2D (teacher " + p["ss2d_teacher"] + ") outputs of real-derived "
          "EfficientNet-Lite2 Caltech-101 embeddings (see the script docstring). Recall@10: "
          "share of the full-size exact top 10 that each search returns.", "",
          markdown_table(["search", "q/s", "speed-up vs full", "recall@10 vs full",
                          "wall s / batch", "CPU s / batch"],
                         [[r["search"], f"{r['qps']:,.0f}", f"{r['speedup_vs_full']:.2f}x",
                           "" if r["recall@10_vs_full"] is None
                           else f"{r['recall@10_vs_full']:.3f}", r["wall_s"], r["cpu_s"]]
                          for r in sp["rows"]]), "",
          f"Index {sp['index_mb']:.0f} MB, prefix caches {sp['prefix_cache_mb']:.0f} MB; load "
          f"average before/after the timing {sp['load_average_before']} / "
          f"{sp['load_average_after']}.", "",
          "## Retention on real tasks (exact search on the real gallery)", "",
          "Retention = metric of the search / metric of full-size search with the complete "
          "ranking. The funnel's ranking is its re-scored shortlist (S items): relevant "
          "items outside it count as not retrieved, so for classes with more than S "
          "relevant images (Caltech mAP@R) even a perfect funnel loses; 'same length' "
          "compares with full-size search returning S results.", ""]
    for r in p["retention"].values():
        m = r["metric"]
        md += [f"**{r['kind']}, {r['dataset']}** ({r['fit']})", "",
               markdown_table(["search", m, "R@1", f"retention {m}", "retention R@1",
                               f"retention {m}, same length"],
                              [[name, f"{v[m]:.2f}", f"{v['R@1']:.2f}",
                                f"{v['retention'].get(m, float('nan')):.3f}",
                                f"{v['retention'].get('R@1', float('nan')):.3f}",
                                f"{v['retention_same_length'][m]:.3f}"
                                if "retention_same_length" in v else ""]
                               for name, v in r["runs"].items()]), ""]
    md += [f"Fit seconds: {p['fit_seconds']}", "", "## Machine", "", machine_md(p["machine"]),
           f"Total {p['total_seconds']:.0f} s, peak RSS {p['peak_rss_mb']:.0f} MB.", ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()
