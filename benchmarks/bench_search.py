"""Search speed: galleria indexes side by side with FAISS used directly.

For each gallery size N and dimension D (real-derived vectors, see
``_common.RealDerived``), in one run:

* exact: galleria ``ExactIndex`` vs ``faiss.IndexFlatIP`` - same vectors, same
  queries, same threads - at query batch 1 and a large batch;
* ANN (HNSW32, IVF{nlist},Flat): the smallest efSearch / nprobe whose
  recall@10 against exact search is >= the target (0.95), then q/s of
  galleria's ``FaissIndex`` vs FAISS used directly with the same factory string
  and setting; build time and memory of each;
* the pure-real case: the 5063 ROxford LOPQ descriptors (70 query rows vs the
  4993 gallery rows).

Timings are interleaved (A B A B ...) and the best round is kept, so load from
other processes hits both sides alike. Results: ``benchmarks/results/search.json``
and ``search.md`` (``search_quick.*`` with ``--quick``).

    python benchmarks/bench_search.py                  # 100k and 1M x 128, 1280
    python benchmarks/bench_search.py --quick          # smoke run, ~1 min
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import build_base_sets as B

log = logging.getLogger("bench_search")

K = 10
HNSW_EF = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
IVF_NPROBE = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[128, 1280])
    p.add_argument("--queries", type=int, default=1000, help="queries in the large batch")
    p.add_argument("--single", type=int, default=20,
                   help="queries timed one at a time (exact search)")
    p.add_argument("--single-ann", type=int, default=200,
                   help="queries timed one at a time (ANN: ~0.1 ms each, so more of them)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--recall", type=float, default=0.95, help="recall@10 target for ANN")
    p.add_argument("--specs", nargs="*", default=["HNSW32", "IVF"],
                   help="ANN factory strings; 'IVF' = IVF{2^round(log2 sqrt N)},Flat; "
                        "none: exact search only")
    p.add_argument("--max-gb", type=float, default=18.0, help="skip configs estimated above")
    p.add_argument("--max-build-s", type=float, default=600.0,
                   help="skip an ANN index whose estimated build time exceeds this; build "
                        "FAISS-direct separately only if twice the estimate fits")
    p.add_argument("--datasets", type=Path, default=None, help="shared datasets root")
    p.add_argument("--skip-real", action="store_true", help="leave out the ROxford real case")
    p.add_argument("--quick", action="store_true", help="small smoke configuration")
    p.add_argument("--out", default=None, help="result name (default search / search_quick)")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="where to write <out>.json/.md (default benchmarks/results)")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.dims, a.queries, a.single, a.rounds = [20_000], [128, 256], 200, 5, 2
        a.single_ann = 50
        a.max_build_s = 60.0
    a.out = a.out or ("search_quick" if a.quick else "search")
    return a


def recall_at(ids: np.ndarray, gt: np.ndarray) -> float:
    hit = (ids[:, :, None] == gt[:, None, :]) & (gt[:, None, :] >= 0)
    return float(hit.any(axis=2).sum() / max(1, (gt >= 0).sum()))


def qps_pair(
    galleria_search, faiss_search, queries: np.ndarray, *, single: int, rounds: int
) -> dict[str, float]:
    """q/s of both searchers at batch 1 (``single`` queries one by one) and full batch."""
    one = queries[:single]

    def loop(fn):
        def run():
            for i in range(one.shape[0]):
                fn(one[i : i + 1])

        return run

    out = {}
    b1 = C.interleaved_best(
        {"galleria": loop(galleria_search), "faiss": loop(faiss_search)},
        rounds=2 * rounds, min_unit_s=0.1,
    )
    for side in ("galleria", "faiss"):
        out[f"qps1_{side}"] = one.shape[0] / b1[side]["wall"]
        out[f"cpu_qps1_{side}"] = one.shape[0] / b1[side]["cpu"]
    bb = C.interleaved_best(
        {"galleria": lambda: galleria_search(queries), "faiss": lambda: faiss_search(queries)},
        rounds=rounds,
    )
    for side in ("galleria", "faiss"):
        out[f"qpsB_{side}"] = queries.shape[0] / bb[side]["wall"]
    out["ratio1"] = out["qps1_galleria"] / out["qps1_faiss"]
    out["cpu_ratio1"] = out["cpu_qps1_galleria"] / out["cpu_qps1_faiss"]
    out["ratioB"] = out["qpsB_galleria"] / out["qpsB_faiss"]
    return out


def ivf_spec(n: int) -> str:
    nlist = 2 ** max(4, round(math.log2(math.sqrt(n))))
    nlist = min(nlist, max(16, n // 39))
    return f"IVF{nlist},Flat"


def run_exact(x: np.ndarray, q: np.ndarray, args) -> tuple[dict[str, Any], np.ndarray, Any]:
    import faiss

    from galleria.index.exact import ExactIndex

    n, d = x.shape
    keys = np.arange(n, dtype=np.int64)
    row: dict[str, Any] = {"kind": "exact", "spec": "exact vs IndexFlatIP", "N": n, "D": d}
    gal = ExactIndex(d)
    with C.MemoryMonitor() as mg:
        t0 = time.perf_counter()
        gal.add(keys, x)
        row["build_s_galleria"] = time.perf_counter() - t0
    flat = faiss.IndexFlatIP(d)
    with C.MemoryMonitor() as mf:
        t0 = time.perf_counter()
        flat.add(x)
        row["build_s_faiss"] = time.perf_counter() - t0
    row.update(qps_pair(
        lambda v: gal.search(v, K), lambda v: flat.search(v, K), q,
        single=args.single, rounds=args.rounds,
    ))
    with C.MemoryMonitor() as sg:
        res = gal.search(q, K)
    with C.MemoryMonitor() as sf:
        fd, fi = flat.search(q, K)
    row["mem_mb_galleria"] = mg.held_mb
    row["mem_mb_faiss"] = mf.held_mb
    row["search_peak_mb_galleria"] = sg.peak_mb
    row["search_peak_mb_faiss"] = sf.peak_mb
    row["recall_galleria"] = 1.0
    row["recall_faiss"] = recall_at(fi, res.ids)  # agreement of the two exact searches
    row["max_score_diff"] = float(np.abs(res.scores - fd).max())
    flat.reset()  # free its copy now
    return row, res.ids, gal


def sweep(index, settings, name, q, gt, target) -> tuple[int | None, float, list]:
    curve = []
    for v in settings:
        index.set_search_params(**{name: v})
        r = recall_at(index.search(q, K).ids, gt)
        curve.append((v, r))
        if r >= target:
            return v, r, curve
    return None, curve[-1][1] if curve else float("nan"), curve


def estimate_hnsw_build_s(x: np.ndarray, sample: int = 20_000) -> float:
    import faiss

    n, d = x.shape
    m = min(n, sample)
    idx = faiss.index_factory(d, "HNSW32", faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    idx.add(np.ascontiguousarray(x[:m]))
    dt = time.perf_counter() - t0
    # per-vector cost grows ~log N; 1.3x margin
    return dt * (n / m) * max(1.0, math.log(n) / math.log(m)) * 1.3


def run_ann(spec: str, x: np.ndarray, q: np.ndarray, gt: np.ndarray, args) -> dict[str, Any]:
    import faiss

    from galleria.index.faiss_index import FaissIndex

    n, d = x.shape
    keys = np.arange(n, dtype=np.int64)
    is_hnsw = spec.startswith("HNSW")
    name, settings, fname = (
        ("ef_search", HNSW_EF, "efSearch") if is_hnsw else ("nprobe", IVF_NPROBE, "nprobe")
    )
    row: dict[str, Any] = {"kind": "ann", "spec": spec, "N": n, "D": d}
    separate = True
    if is_hnsw:
        est = estimate_hnsw_build_s(x)
        row["est_build_s"] = est
        if est > args.max_build_s:
            row["note"] = f"skipped: estimated HNSW build {est:.0f} s > --max-build-s"
            return row
        separate = 2 * est <= args.max_build_s
    rng = np.random.default_rng(1)
    train = None
    if not is_hnsw:
        nlist = int(spec[3:].split(",")[0])
        ntrain = min(n, 64 * nlist)
        train = np.ascontiguousarray(x[np.sort(rng.choice(n, ntrain, replace=False))])
    gal = FaissIndex(spec, d)
    with C.MemoryMonitor() as mg:
        t0 = time.perf_counter()
        if train is not None:
            gal.train(train)
        gal.add(keys, x)
        row["build_s_galleria"] = time.perf_counter() - t0
    row["mem_mb_galleria"] = mg.held_mb
    if separate:
        direct = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        with C.MemoryMonitor() as mf:
            t0 = time.perf_counter()
            if train is not None:
                direct.train(train)
            direct.add(x)
            row["build_s_faiss"] = time.perf_counter() - t0
        row["mem_mb_faiss"] = mf.held_mb
    else:
        # the same built graph, searched by FAISS directly (no galleria code on the path)
        direct = faiss.downcast_index(gal.index_).index
        row["note"] = "FAISS direct searches galleria's built HNSW graph (one build in budget)"
    best, rec, curve = sweep(gal, settings, name, q, gt, args.recall)
    row["curve"] = curve
    if best is None:
        row["note"] = f"recall {rec:.3f} < {args.recall} at the largest {name}"
        return row
    row["setting"] = f"{fname}={best}"
    faiss.ParameterSpace().set_index_parameter(direct, fname, best)
    row["recall_galleria"] = rec
    _, di = direct.search(q, K)
    row["recall_faiss"] = recall_at(di, gt)
    row.update(qps_pair(
        lambda v: gal.search(v, K), lambda v: direct.search(v, K), q,
        single=args.single_ann, rounds=args.rounds,
    ))
    return row


def run_config(n: int, d: int, gen: C.RealDerived, args, tmp: Path, notes: list[str]) -> list:
    rows = []
    t0 = time.perf_counter()
    # the gallery lives in a memory-mapped file: only the indexes hold anonymous copies
    x = np.lib.format.open_memmap(tmp / f"x_{n}_{d}.npy", mode="w+", dtype=np.float32,
                                  shape=(n, d))
    gen.gallery(n, out=x)
    x.flush()
    q = gen.queries(args.queries)
    gen_s = time.perf_counter() - t0
    log.info("N=%d D=%d generated in %.1f s", n, d, gen_s)
    row, gt, gal = run_exact(x, q, args)
    row["gen_s"] = gen_s
    rows.append(row)
    log.info("exact: %s", {k: row[k] for k in ("ratio1", "ratioB")})
    del gal
    gc.collect()
    for spec in args.specs:
        s = ivf_spec(n) if spec == "IVF" else spec
        try:
            r = run_ann(s, x, q, gt, args)
        except MemoryError as exc:
            r = {"kind": "ann", "spec": s, "N": n, "D": d, "note": f"MemoryError: {exc}"}
        rows.append(r)
        log.info("%s: %s", s, {k: r.get(k) for k in ("setting", "ratio1", "ratioB", "note")})
        gc.collect()
    del x
    (tmp / f"x_{n}_{d}.npy").unlink()
    return rows


def run_real(root: Path, args) -> list:
    from galleria.index.exact import ExactIndex

    x, qrows, grows = C.roxford_lopq(root)
    x = C.normalize(x)
    g = np.ascontiguousarray(x[grows])
    q = np.ascontiguousarray(x[qrows])
    row, gt, _ = run_exact(g, q, argparse.Namespace(**{**vars(args), "single": len(q)}))
    row["spec"] = "exact vs IndexFlatIP (ROxford LOPQ, real)"
    rows = [row]
    for spec in ("HNSW32", "IVF64,Flat") if args.specs else ():
        r = run_ann(spec, g, q, gt, argparse.Namespace(**{**vars(args), "single_ann": len(q)}))
        r["spec"] = f"{spec} (ROxford LOPQ, real)"
        rows.append(r)
    del ExactIndex
    return rows


COLUMNS = [
    ("spec", "index"), ("N", "N"), ("D", "D"), ("setting", "setting"),
    ("recall_galleria", "recall@10 galleria"), ("recall_faiss", "recall@10 faiss"),
    ("qps1_galleria", "q/s b=1 galleria"), ("qps1_faiss", "q/s b=1 faiss"), ("ratio1", "ratio b=1"),
    ("cpu_ratio1", "ratio b=1 (CPU time)"),
    ("qpsB_galleria", "q/s batch galleria"), ("qpsB_faiss", "q/s batch faiss"),
    ("ratioB", "ratio batch"), ("build_s_galleria", "build s galleria"),
    ("build_s_faiss", "build s faiss"), ("mem_mb_galleria", "MB galleria"),
    ("mem_mb_faiss", "MB faiss"), ("note", "note"),
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    threads = C.set_threads(args.threads)
    info = C.machine_info(args.threads)
    info["thread_settings"] = threads
    from galleria.eval.paths import datasets_root

    root = args.datasets or datasets_root()
    notes: list[str] = []
    # real bases, built by build_base_sets.py from ../shared alone (cached in benchmarks/out)
    x128 = B.real_base("lopq-128", root=root)
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if not args.skip_real:
        rows += run_real(root, args)
    base_1280 = B.real_base("lite2-1280", root=root) if 1280 in args.dims else None
    with tempfile.TemporaryDirectory(prefix="bench_search_") as td:
        for d in args.dims:
            for n in args.sizes:
                need_gb = 2.2 * n * d * 4 / 1e9 + 1.0
                if need_gb > args.max_gb:
                    notes.append(f"N={n} D={d} skipped: needs ~{need_gb:.1f} GB > --max-gb")
                    continue
                if d == 128:
                    gen = C.RealDerived(x128, seed=n)
                    base = B.label("lopq-128", x128.shape[0])
                elif base_1280 is not None and d == base_1280.shape[1]:
                    gen = C.RealDerived(base_1280, seed=n)
                    base = B.label("lite2-1280", base_1280.shape[0])
                else:
                    gen = C.RealDerived(x128, seed=n, lift_to=d)
                    base = f"ROxford LOPQ 128-d lifted to {d}-d (FALLBACK: no real {d}-d base)"
                for r in run_config(n, d, gen, args, Path(td), notes):
                    r["base"] = base
                    rows.append(r)
                _write(args, info, rows, notes, time.perf_counter() - t_start, partial=True)
    _write(args, info, rows, notes, time.perf_counter() - t_start, partial=False)
    return 0


def _write(args, info, rows, notes, elapsed, *, partial: bool) -> None:
    info = {**info, "load_average_at_end": os.getloadavg()}
    payload = {"benchmark": "search", "args": {k: str(v) for k, v in vars(args).items()},
               "machine": info, "rows": rows, "notes": notes, "elapsed_s": elapsed,
               "partial": partial}
    exact = [r for r in rows if r["kind"] == "exact"]
    ann = [r for r in rows if r["kind"] == "ann"]
    md = ["# Search speed: galleria vs FAISS direct\n",
          f"k={K}; batch = {args.queries} queries (70 for the real ROxford rows); "
          f"b=1 = {args.single} (exact) or {args.single_ann} (ANN) queries one at a time; "
          f"{args.threads} threads everywhere; "
          f"best of {args.rounds} interleaved rounds ({2 * args.rounds} for b=1). "
          "ratio = galleria q/s / FAISS q/s (wall clock); 'CPU time' ratio = the same on "
          "process CPU time, robust to other processes on a shared machine for the "
          "single-threaded b=1 ANN searches (it also counts spin-waiting threads, so it "
          "is not meaningful for multi-threaded exact search). "
          f"ANN setting = smallest efSearch/nprobe with recall@10 >= {args.recall} against "
          "exact search. MB = anonymous memory held after build.\n",
          "\n## Exact: galleria ExactIndex vs faiss.IndexFlatIP\n", C.md_table(exact, COLUMNS),
          "\n## ANN: galleria FaissIndex vs FAISS direct (same factory string and setting)\n",
          C.md_table(ann, COLUMNS),
          "\n## Data\n", *sorted({f"- {r.get('base')}\n" for r in rows if r.get('base')}),
          "- real: ROxford5k LOPQ 128-d, 70 query rows vs 4993 gallery rows\n",
          "\n## Notes\n", *(f"- {n}\n" for n in notes),
          f"- elapsed: {elapsed:.0f} s{' (partial run)' if partial else ''}\n",
          "\n## Machine\n", C.machine_md(info)]
    C.write_results(args.out, payload, "".join(md), results_dir=args.results_dir)


if __name__ == "__main__":
    sys.exit(main())
