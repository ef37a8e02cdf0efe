"""Filtered search vs unfiltered search on a gallery of 100k items.

A gallery of N vectors *grown from real EfficientNet-Lite2 embeddings*
(``build_base_sets.grown``; labelled so in every table) is stored with payloads
chosen so that filters match a known fraction of the items, independently of
the vectors: booleans ``s50`` / ``s20`` / ... true for 50 % / 20 % / ... of the
items (equality filters) and ``year`` uniform over 1,000 values (range filters of
the same selectivities). For each selectivity it measures, in interleaved rounds
(best of ``--rounds``), queries per second of:

- unfiltered exact search (``Gallery.search``), the baseline;
- filtered search as galleria answers it (``strategy=auto``: pre- or post-filter
  by :func:`galleria.store.filtered.choose_strategy`);
- both strategies forced (``pre``: scan the matching items; ``post``: index
  search with over-fetch), which places the crossover the rule is set from;
- the key-set evaluation itself, cold (cache cleared) and warm;

as a batch of ``--queries`` queries and one query at a time, and checks every
filtered answer against brute force (numpy over the matching items).

    nice -n 10 .venv/bin/python benchmarks/bench_filters.py            # 100k x 1280
    .venv/bin/python benchmarks/bench_filters.py --quick               # 20k x 128, ~1 min

Writes ``benchmarks/results/filters.{json,md}`` (``filters_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
from build_base_sets import grown

log = logging.getLogger("bench_filters")

SELECTIVITIES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001)
MAIN = (0.5, 0.05, 0.001)
YEARS = 1000


def _flag(s: float) -> str:
    return "s" + f"{s * 100:g}".replace(".", "_")


def build_gallery(path: Path, x: np.ndarray, seed: int = 0) -> dict[str, Any]:
    from galleria.store.gallery import Gallery

    rng = np.random.default_rng(seed)
    n = x.shape[0]
    u = {s: rng.random(n) < s for s in SELECTIVITIES}
    year = rng.integers(0, YEARS, n)
    g = Gallery.create(path)
    t0 = time.perf_counter()
    step = 20_000
    for a in range(0, n, step):
        b = min(n, a + step)
        metas = [{**{_flag(s): bool(u[s][i]) for s in SELECTIVITIES}, "year": int(year[i])}
                 for i in range(a, b)]
        g.add([f"item{i:07d}" for i in range(a, b)], np.asarray(x[a:b], np.float32),
              space="space", meta=metas)
    g.save_index("space")
    build_s = time.perf_counter() - t0
    g.close()
    return {"build_s": round(build_s, 1),
            "fraction": {_flag(s): float(u[s].mean()) for s in SELECTIVITIES}}


def brute(x: np.ndarray, keys_rows: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    s = q @ np.asarray(x[keys_rows]).T
    return keys_rows[np.argsort(-s, axis=1, kind="stable")[:, :k]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="gallery size")
    p.add_argument("--kind", default="lite2-1280", choices=["lite2-1280", "lopq-128"])
    p.add_argument("--queries", type=int, default=200, help="queries in the batch")
    p.add_argument("--single", type=int, default=20, help="queries searched one at a time")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, default=None, help="gallery folder (default: a temp)")
    p.add_argument("--selectivities", type=float, nargs="+", default=list(SELECTIVITIES),
                   help="fractions of the items the filters match")
    p.add_argument("--forms", nargs="+", default=["equality", "range"],
                   choices=["equality", "range"], help="filter forms measured")
    p.add_argument("--quick", action="store_true", help="20k x 128, fewer rounds")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.quick:
        args.n, args.kind, args.rounds, args.queries, args.single = 20_000, "lopq-128", 2, 100, 10
    info = C.machine_info(args.threads)
    C.set_threads(args.threads)
    from galleria.store.filtered import PREFILTER_FRACTION, PREFILTER_MIN, search_filtered
    from galleria.store.gallery import Gallery

    x, qs, label = grown(args.kind, args.n, queries=max(args.queries, args.single))
    qb = np.ascontiguousarray(qs[: args.queries], np.float32)
    q1 = [np.ascontiguousarray(qs[i : i + 1], np.float32) for i in range(args.single)]
    tmp = None
    if args.work is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-filters-"))
        work = tmp / "g"
    else:
        work = args.work
        if work.exists():
            shutil.rmtree(work)
    try:
        built = build_gallery(work, x)
        log.info("gallery built in %s s", built["build_s"])
        g = Gallery.open(work)
        k = args.k
        keys_of_row = g.keys_of([f"item{i:07d}" for i in range(args.n)])
        row_of_key = {int(kk): i for i, kk in enumerate(keys_of_row)}
        base = C.interleaved_best({
            "batch": lambda: g.search(qb, k, space="space"),
            "single": lambda: [g.search(q, k, space="space") for q in q1],
        }, rounds=args.rounds)
        rows: list[dict[str, Any]] = []
        for s in args.selectivities:
            if s not in SELECTIVITIES:
                raise SystemExit(f"selectivity {s} is not one of {SELECTIVITIES}")
            for form, where in (("equality", f"{_flag(s)}=true"),
                                ("range", f"year<{round(s * YEARS)}")):
                if form not in args.forms or (form == "range" and s * YEARS < 1):
                    continue
                keys = g.match_keys(where)
                matching = int(keys.size)
                # correctness: every strategy equals brute force over the matching items
                rows_m = np.array(sorted(row_of_key[int(kk)] for kk in keys), np.int64)
                want = brute(x, rows_m, qb[:20], k)
                for strat in ("auto", "pre", "post"):
                    res, _ = search_filtered(g, qb[:20], k, space="space", where=where,
                                             strategy=strat)
                    got = np.array([[row_of_key[int(kk)] for kk in g.keys_of(list(r))]
                                    for r in res.ids])
                    assert (got == want).all(), (where, strat)
                _, plan = search_filtered(g, qb, k, space="space", where=where)

                def cold(where=where):
                    g.payload_cache.__init__()
                    g.match_keys(where)

                units = {
                    "keys_cold": cold,
                    "keys_warm": lambda where=where: g.match_keys(where),
                }
                for strat in ("auto", "pre", "post"):
                    units[f"{strat}_batch"] = (
                        lambda strat=strat, where=where: search_filtered(
                            g, qb, k, space="space", where=where, strategy=strat))
                    units[f"{strat}_single"] = (
                        lambda strat=strat, where=where: [search_filtered(
                            g, q, k, space="space", where=where, strategy=strat) for q in q1])
                t = C.interleaved_best(units, rounds=args.rounds)
                nb, ns = len(qb), len(q1)
                row = {"selectivity": s, "form": form, "where": where, "matching": matching,
                       "strategy": plan.strategy,
                       "keys_cold_ms": 1e3 * t["keys_cold"]["wall"],
                       "keys_warm_ms": 1e3 * t["keys_warm"]["wall"],
                       "unfiltered_batch_qps": nb / base["batch"]["wall"],
                       "unfiltered_single_qps": ns / base["single"]["wall"]}
                for strat in ("auto", "pre", "post"):
                    row[f"{strat}_batch_qps"] = nb / t[f"{strat}_batch"]["wall"]
                    row[f"{strat}_single_qps"] = ns / t[f"{strat}_single"]["wall"]
                row["auto_vs_unfiltered_batch"] = row["auto_batch_qps"] / row[
                    "unfiltered_batch_qps"]
                row["auto_vs_unfiltered_single"] = row["auto_single_qps"] / row[
                    "unfiltered_single_qps"]
                rows.append(row)
                log.info("%s (%d matching): %s, %.0f / %.0f q/s (unfiltered %.0f / %.0f)",
                         where, matching, plan.strategy, row["auto_batch_qps"],
                         row["auto_single_qps"], row["unfiltered_batch_qps"],
                         row["unfiltered_single_qps"])
        g.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    info["load_average_at_end"] = list(os.getloadavg())
    cross = {}
    for mode in ("batch", "single"):
        pre_wins = [r["selectivity"] for r in rows if r["form"] == "equality"
                    and r[f"pre_{mode}_qps"] >= r[f"post_{mode}_qps"]]
        cross[mode] = max(pre_wins) if pre_wins else None
    payload = {"args": {k2: (str(v) if isinstance(v, Path) else v)
                        for k2, v in vars(args).items()},
               "gallery": {"n": args.n, "dim": int(x.shape[1]), "vectors": label, **built},
               "rule": {"PREFILTER_MIN": PREFILTER_MIN, "PREFILTER_FRACTION": PREFILTER_FRACTION},
               "largest_selectivity_where_pre_wins": cross, "rows": rows, "machine": info}
    cols = [("where", "filter"), ("matching", "matching"), ("strategy", "auto chose"),
            ("unfiltered_batch_qps", "unfiltered q/s (batch)"),
            ("auto_batch_qps", "filtered q/s (batch)"),
            ("auto_vs_unfiltered_batch", "x unfiltered"),
            ("unfiltered_single_qps", "unfiltered q/s (1 query)"),
            ("auto_single_qps", "filtered q/s (1 query)"),
            ("auto_vs_unfiltered_single", "x unfiltered"),
            ("pre_batch_qps", "pre q/s (batch)"), ("post_batch_qps", "post q/s (batch)"),
            ("pre_single_qps", "pre q/s (1)"), ("post_single_qps", "post q/s (1)"),
            ("keys_cold_ms", "key set ms (cold)"), ("keys_warm_ms", "key set ms (warm)")]
    main_rows = [r for r in rows if r["selectivity"] in MAIN and r["form"] == "equality"]
    md = (f"# Filtered vs unfiltered search ({args.n:,} x {x.shape[1]}, k = {k})\n\n"
          f"Vectors: **{label}** (synthetic: grown, not real images). Payload filters are "
          "independent of the vectors. Exact index; q/s are the best of "
          f"{args.rounds} interleaved rounds, a batch of {len(qb)} queries and {len(q1)} "
          "queries one at a time; every strategy's answer equals brute force over the "
          "matching items (checked on 20 queries per filter).\n\n"
          "## The three selectivities (equality filters)\n\n" + C.md_table(main_rows, cols)
          + "\n## Every selectivity, equality and range filters\n\n" + C.md_table(rows, cols)
          + f"\nRule in force: pre-filter when matching <= max({PREFILTER_MIN}, "
          f"{PREFILTER_FRACTION} x N). Largest selectivity at which the forced pre-filter "
          f"was at least as fast as the forced post-filter: batch {cross['batch']}, one "
          f"query {cross['single']}.\n\n## Machine\n\n" + C.machine_md(info))
    name = "filters_quick" if args.quick else "filters"
    j, m = C.write_results(name, payload, md, results_dir=args.results_dir)
    print(md)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
