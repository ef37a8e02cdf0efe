"""Compressed exact search: galleria exact / exact-bf16 / exact-int8 vs FAISS flat indexes.

One run, side by side, for each gallery (grown from real vectors by
``build_base_sets.py``; N in ``--sizes``, D = 128 and 1280) and the pure-real
ROxford5k LOPQ set (4993 x 128, 70 queries):

* ``faiss.IndexFlatIP`` (the baseline every ratio refers to), FAISS's own
  compressed flat indexes ``IndexScalarQuantizer`` fp16 / 8-bit / bf16 (where
  this FAISS has them), galleria ``exact``, ``exact-bf16``, ``exact-int8``;
* q/s for a batch of ``--queries`` queries and one query at a time, k = 10,
  ``--threads`` threads everywhere (FAISS OpenMP, torch, OpenBLAS); each method
  is timed interleaved with IndexFlatIP (A B A B ...), best round kept, loops
  bounded by ``--budget-s``;
* recall@10 against IndexFlatIP, and agreement with galleria ``exact``;
* memory: bytes of the scored copy (the array a search scans) and the anonymous
  RSS the index added (its codes plus keys and bookkeeping); build time.

The compressed galleria indexes re-score against the gallery's float32
vectors through a vector source over the memory-mapped gallery file (what the
gallery store provides from its segment files), so the float32 vectors are
not held twice; on the 5k real set they are standalone (their own mapped file,
which makes them take the small-gallery float32 path).

    python benchmarks/bench_compressed.py                       # 100k and 1M, 128 and 1280
    python benchmarks/bench_compressed.py --quick               # 20k, a smoke run
Writes benchmarks/results/compressed.{json,md} (``--quick``: compressed_quick.*).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import build_base_sets as B

log = logging.getLogger("bench_compressed")
K = 10
FAISS_SQ = [("faiss SQfp16", "QT_fp16"), ("faiss SQ8", "QT_8bit"), ("faiss SQbf16", "QT_bf16")]
GALLERIA = ["exact", "exact-bf16", "exact-int8"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[128, 1280], choices=[128, 1280])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--budget-s", type=float, default=20.0,
                   help="time bound of one timed loop (batch repeats, single-query loop)")
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods to run")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--skip-grown", action="store_true", help="the real ROxford set only")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--results-dir", type=Path, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.queries, a.rounds, a.budget_s = [20_000], 200, 2, 3.0
    a.out = a.out or ("compressed_quick" if a.quick else "compressed")
    return a


def recall_at(ids: np.ndarray, gt: np.ndarray) -> float:
    hit = (ids[:, :, None] == gt[:, None, :]) & (gt[:, None, :] >= 0)
    return float(hit.any(axis=2).sum() / max(1, (gt >= 0).sum()))


class Method:
    """One index under test: ``search(q) -> (scores, ids)``, its memory and build time."""

    def __init__(self, name: str, x: np.ndarray, source: Any | None) -> None:
        import faiss

        from galleria.index.factory import create_index

        self.name = name
        n, d = x.shape
        t0 = time.perf_counter()
        with C.MemoryMonitor() as mon:
            if name == "faiss IndexFlatIP":
                idx = faiss.IndexFlatIP(d)
                idx.add(np.ascontiguousarray(x))
                self.scored = n * d * 4
                self._search = idx.search
            elif name.startswith("faiss SQ"):
                qt = dict(FAISS_SQ)[name]
                idx = faiss.IndexScalarQuantizer(d, getattr(faiss.ScalarQuantizer, qt),
                                                 faiss.METRIC_INNER_PRODUCT)
                if not idx.is_trained:
                    rng = np.random.default_rng(0)
                    sample = np.sort(rng.choice(n, min(n, 100_000), replace=False))
                    idx.train(np.ascontiguousarray(x[sample]))
                idx.add(np.ascontiguousarray(x))
                self.scored = int(idx.code_size) * n
                self._search = idx.search
            else:
                kw = {"source": source} if source is not None and name != "exact" else {}
                idx = create_index(name, d, **kw)
                idx.add(np.arange(n, dtype=np.int64), x)  # one add: no growth copies
                self.scored = n * d * 4 if name == "exact" else idx.scored_bytes
                self._search = lambda q, k, idx=idx: (lambda r: (r.scores, r.ids))(idx.search(q, k))
        self.build_s = time.perf_counter() - t0
        self.anon_mb = mon.held_mb
        self.index = idx

    def search(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._search(q, K)


def _available_bytes() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    return float("inf")


def timed(fn, budget_s: float) -> tuple[float, int]:
    """Seconds per call of ``fn`` (repeated while under ``budget_s``) and the call count."""
    t0 = time.perf_counter()
    n = 0
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if el >= budget_s or (n >= 3 and el >= 0.5):
            return el / n, n


def one_by_one(m: Method, q: np.ndarray, budget_s: float) -> tuple[float, float]:
    """Queries per second one at a time (wall clock, process CPU time), looping over ``q``
    until ``budget_s`` (>= 20 queries)."""
    t0, c0 = time.perf_counter(), time.process_time()
    i = 0
    while True:
        m.search(q[i % q.shape[0] : i % q.shape[0] + 1])
        i += 1
        el = time.perf_counter() - t0
        if (el >= budget_s and i >= 20) or (i >= 2000 and el >= 0.5) or el >= 4 * budget_s:
            return i / el, i / max(time.process_time() - c0, 1e-9)


def measure(x: np.ndarray, q: np.ndarray, args, *, label: str, real: bool) -> list[dict]:
    """Every method on one gallery, each timed interleaved with IndexFlatIP."""
    from galleria.index.vectors import ArraySource

    n, d = x.shape
    source = None if real else ArraySource(np.arange(n, dtype=np.int64), x)
    methods = [name for name, _ in FAISS_SQ] + GALLERIA
    if args.methods:
        methods = [m for m in methods if m in args.methods]
    flat = Method("faiss IndexFlatIP", x, None)
    _, gt = flat.search(q)
    base = {"data": label, "N": n, "D": d, "queries": int(q.shape[0])}
    flat_best = {"batch": np.inf, "single": 0.0, "single_cpu": 0.0}
    rows = []
    exact_ids = None
    for name in methods:
        gc.collect()
        need = n * d * (4 if name == "exact" else 2) * 1.1  # the largest copies
        if need > _available_bytes():
            rows.append({**base, "method": name,
                         "note": f"skipped: {need / 2**30:.1f} GB needed, "
                                 f"{_available_bytes() / 2**30:.1f} GB available"})
            continue
        try:
            m = Method(name, x, source)
        except Exception as exc:  # e.g. a quantizer this FAISS lacks
            rows.append({**base, "method": name, "note": f"unavailable: {exc}"})
            continue
        t0 = time.perf_counter()
        m.search(q[:10])
        per_q = (time.perf_counter() - t0) / 10
        # a method far slower than the budget (FAISS SQ built without SIMD) is timed on
        # fewer queries: its q/s do not depend on the batch size (one scan per query)
        slow = name.startswith("faiss SQ") and per_q * q.shape[0] > args.budget_s
        nb = max(20, int(args.budget_s / per_q)) if slow else q.shape[0]
        qm = q[:nb]
        s, ids = m.search(qm)  # also warms up
        row = {**base, "method": name, "build_s": m.build_s, "scored_mb": m.scored / 2**20,
               "scored_vs_flat": m.scored / (n * d * 4), "anon_mb": m.anon_mb,
               "recall": recall_at(ids, gt[:nb])}
        if nb < q.shape[0]:
            row["note"] = f"timed and scored on the first {nb} queries (slow)"
        if name == "exact":
            exact_ids, exact_s = ids, s
        elif exact_ids is not None and name.startswith("exact"):
            row["same_ids_as_exact"] = float((ids == exact_ids).mean())
            row["max_score_diff_vs_exact"] = float(np.abs(s - exact_s).max())
        if name.startswith("exact") and name != "exact" and hasattr(m.index, "has_own_vectors"):
            from galleria.index import compressed as _cmp

            small = m.index.has_own_vectors and n * d <= _cmp._SMALL_VALUES
            row["path"] = "float32 rows (small gallery)" if small else "compressed scan"
        best_b, best_1, best_1c = np.inf, 0.0, 0.0
        load0 = os.getloadavg()[0]
        for _ in range(args.rounds):
            tb, _ = timed(lambda f=flat: f.search(q), args.budget_s)
            flat_best["batch"] = min(flat_best["batch"], tb)
            tb, _ = timed(lambda m=m, qm=qm: m.search(qm), args.budget_s)
            best_b = min(best_b, tb)
            one_q = q[: min(q.shape[0], 200)]
            r1, c1 = one_by_one(flat, one_q, args.budget_s / 4)
            flat_best["single"] = max(flat_best["single"], r1)
            flat_best["single_cpu"] = max(flat_best["single_cpu"], c1)
            r1, c1 = one_by_one(m, one_q, args.budget_s / 4)
            best_1, best_1c = max(best_1, r1), max(best_1c, c1)
        row["qps_batch"] = nb / best_b
        row["qps_single"] = best_1
        row["cpu_qps_single"] = best_1c
        row["load_1min"] = [load0, os.getloadavg()[0]]
        rows.append(row)
        log.info("%s %s: %s", label, name, {k: row.get(k) for k in
                                             ("qps_batch", "qps_single", "recall", "scored_mb")})
        del m
    rows.insert(0, {**base, "method": "faiss IndexFlatIP", "build_s": flat.build_s,
                    "scored_mb": flat.scored / 2**20, "scored_vs_flat": 1.0,
                    "anon_mb": flat.anon_mb, "recall": 1.0,
                    "qps_batch": q.shape[0] / flat_best["batch"],
                    "qps_single": flat_best["single"],
                    "cpu_qps_single": flat_best["single_cpu"]})
    for r in rows:
        if "qps_batch" in r:
            r["ratio_batch"] = r["qps_batch"] / rows[0]["qps_batch"]
            r["ratio_single"] = r["qps_single"] / rows[0]["qps_single"]
            r["cpu_ratio_single"] = r["cpu_qps_single"] / rows[0]["cpu_qps_single"]
    del flat
    gc.collect()
    return rows


COLUMNS = [
    ("data", "data"), ("N", "N"), ("D", "D"), ("method", "method"),
    ("qps_batch", "q/s batch"), ("ratio_batch", "x FlatIP batch"),
    ("qps_single", "q/s 1 query"), ("ratio_single", "x FlatIP 1 query"),
    ("cpu_ratio_single", "x FlatIP 1 query (CPU time)"),
    ("recall", "recall@10 vs FlatIP"), ("scored_mb", "scored copy MB"),
    ("scored_vs_flat", "x FlatIP memory"), ("anon_mb", "RSS delta MB"),
    ("build_s", "build s"), ("path", "path"), ("note", "note"),
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    info = C.machine_info(args.threads)
    info["thread_settings"] = C.set_threads(args.threads)
    import faiss

    info["faiss_compile_options"] = faiss.get_compile_options()
    rows: list[dict] = []
    notes: list[str] = []
    t_start = time.perf_counter()
    if not args.skip_real:
        from galleria.eval.paths import datasets_root

        x, qrows, grows = C.roxford_lopq(datasets_root())
        x = C.normalize(x)
        rows += measure(np.ascontiguousarray(x[grows]), np.ascontiguousarray(x[qrows]), args,
                        label="ROxford5k LOPQ (real, 70 queries)", real=True)
        _write(args, info, rows, notes, t_start, partial=True)
    for d in [] if args.skip_grown else args.dims:
        kind = "lopq-128" if d == 128 else "lite2-1280"
        for n in args.sizes:
            xg, qg, lab = B.grown(kind, n, queries=args.queries)
            notes.append(f"{n} x {d}: {lab}")
            rows += measure(xg, qg, args, label=f"grown {d}-d", real=False)
            del xg
            _write(args, info, rows, notes, t_start, partial=True)
    _write(args, info, rows, notes, t_start, partial=False)
    return 0


def _write(args, info, rows, notes, t_start, *, partial: bool) -> None:
    elapsed = time.perf_counter() - t_start
    info = {**info, "load_average_at_end": os.getloadavg()}
    payload = {"benchmark": "compressed", "args": {k: str(v) for k, v in vars(args).items()},
               "machine": info, "rows": rows, "notes": notes, "elapsed_s": elapsed,
               "partial": partial}
    md = ["# Compressed exact search: galleria vs FAISS flat indexes\n",
          f"k={K}; batch = {args.queries} queries (70 on the real ROxford set), 1 query = "
          "queries one at a time; "
          f"{args.threads} threads everywhere; each method timed interleaved with "
          f"IndexFlatIP, best of {args.rounds} rounds, loops bounded by {args.budget_s:.0f} s. "
          "'x FlatIP' = q/s ratio to faiss.IndexFlatIP in the same run; '(CPU time)' = the "
          "same on process CPU time, robust to other processes for single-threaded work "
          "(one query on a small gallery), not meaningful for multi-threaded searches. "
          "Scored copy = bytes "
          "of the array a search scans (galleria's compressed indexes re-score a short list "
          "against the float32 vectors, read from the gallery's memory-mapped file through a "
          "vector source, not held in RAM). RSS delta = anonymous memory the index added.\n\n",
          C.md_table(rows, COLUMNS),
          "\n## Data\n", "- real: ROxford5k LOPQ 128-d, 70 query rows vs 4993 gallery rows\n",
          *(f"- {n}\n" for n in notes),
          f"\n- FAISS compile options: {info.get('faiss_compile_options')}\n",
          f"- elapsed: {elapsed:.0f} s{' (partial run)' if partial else ''}\n",
          "\n## Machine\n", C.machine_md(info)]
    C.write_results(args.out, payload, "".join(md), results_dir=args.results_dir)


if __name__ == "__main__":
    sys.exit(main())
