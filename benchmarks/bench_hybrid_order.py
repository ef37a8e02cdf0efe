"""Issue 18: where the verified ``hybrid`` overturns the global top-1, and the label quirk.

Two sections, one JSON + one markdown file each (``benchmarks/results/``):

``diagnose`` -> ``hybrid-order.{json,md}``
    per row, the same seeded query sample as ``local-hybrid.md`` (``--max-queries``,
    ``--row-max``): ``global`` and ``hybrid`` (its default parameters, or ``--params``),
    with the hybrid's own trace (candidates, fused order, inliers of the verified ones).
    Every query whose hybrid first result is not the global first result is listed with
    both results' classes (or relevance), inliers and global cosines, and counted by
    kind: the global top-1 verified and overtaken by a candidate with more inliers, or
    not verified.
``merged`` -> ``hybrid-faces-merged.{json,md}``
    Caltech-101 test -> train with ``Faces`` and ``Faces_easy`` counted as one class
    (``Faces_easy`` holds cropped copies of ``Faces`` photos: the same people, the same
    sessions), for ``global``, ``local`` and ``hybrid``, beside the standard labels.
    A secondary row: the standard one stays the benchmark's.

Run from the repository root::

    nice -n 10 env OMP_NUM_THREADS=1 GALLERIA_DATASETS=../shared/datasets \\
        .venv/bin/python benchmarks/bench_hybrid_order.py --sections diagnose,merged \\
        --max-queries 40 --row-max caltech101=200 --threads 1 [--rows ...] \\
        [--params JSON] [--name=-x]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import galleria.eval.local as eval_local
from _common import machine_info, machine_md, set_threads, write_results
from bench_local_hybrid import RESULTS, ROWS, _tail, load_row
from galleria.eval.datasets import RetrievalTask
from galleria.eval.embed import task_embeddings
from galleria.eval.local import LocalEvalConfig, evaluate_pipeline, sample_queries
from galleria.extractors.registry import create_extractor
from galleria.search.pipelines import HybridConfig
from galleria.types import SearchResult

GLOBAL_MODEL = "effnet-lite0"
#: the metrics of local-hybrid.md shown per row
HEADLINE = ("R@1", "mAP", "mAP@R", "N-S", "E_mAP", "M_mAP", "H_mAP")


def _relevant(task: RetrievalTask, qi: int, g: int) -> bool | None:
    """Is gallery item ``g`` a right answer of (sampled) query ``qi``? ``None``: junk or
    no ground truth of that kind."""
    if task.query_labels is not None and task.gallery_labels is not None:
        return bool(task.query_labels[qi] == task.gallery_labels[g])
    if task.gnd is not None:
        e = task.gnd[qi]
        if g in set(e.get("junk", np.zeros(0)).tolist()):
            return None
        return g in set(e.get("easy", np.zeros(0)).tolist()) | set(
            e.get("hard", np.zeros(0)).tolist())
    return None


def captured(task: RetrievalTask, cfg: LocalEvalConfig, workers: int
             ) -> tuple[dict[str, Any], Any, list[SearchResult]]:
    """``evaluate_pipeline(task, cfg)`` -> ``(its result, the pipeline it built, the
    rankings it returned)``; a ``hybrid`` pipeline's trace is switched on."""
    made: list[Any] = []
    ranks: list[SearchResult] = []
    orig = eval_local.make_pipeline

    def capture(name: str, **parts: Any) -> Any:  # the pipeline evaluate_pipeline builds
        pipe = orig(name, **parts)
        if name == "hybrid":
            pipe.trace = []
        search = pipe.search

        def keep(queries: Any, k: int) -> SearchResult:
            ranks.append(search(queries, k))
            return ranks[-1]

        pipe.search = keep
        made.append(pipe)
        return pipe

    eval_local.make_pipeline = capture
    try:
        res = evaluate_pipeline(task, cfg, workers=workers)
    finally:
        eval_local.make_pipeline = orig
    return res, made[0], ranks


def traced_hybrid(task: RetrievalTask, max_queries: int | None, workers: int,
                  params: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """``evaluate_pipeline`` of ``hybrid`` with the pipeline's trace switched on."""
    res, pipe, _ = captured(task, LocalEvalConfig(pipeline="hybrid", max_queries=max_queries,
                                                  pipeline_params=params or None), workers)
    return res, pipe.trace


def diagnose_row(row: str, max_queries: int | None, workers: int,
                 params: dict[str, Any]) -> dict[str, Any]:
    full = load_row(row)
    task, keep = sample_queries(full, max_queries)
    q_vecs, g_vecs = task_embeddings(full, create_extractor(GLOBAL_MODEL), workers=workers)
    q_vecs = q_vecs[keep]
    glob = evaluate_pipeline(full, LocalEvalConfig(pipeline="global", max_queries=max_queries),
                             workers=workers)
    hyb, trace = traced_hybrid(full, max_queries, workers, params)
    bar = int(hyb["pipeline_params"]["min_inliers"])
    if len(trace) != task.num_queries:
        raise RuntimeError(f"{len(trace)} traces for {task.num_queries} queries")
    cases: list[dict[str, Any]] = []
    kinds = {"top1_verified_overtaken": 0, "top1_not_verified": 0}
    verified_top1 = 0
    for qi, (ids, _fused, inl) in enumerate(trace):
        g_top = int(glob["top1"][qi])
        h_top = int(hyb["top1"][qi])
        at = {int(k): j for j, k in enumerate(ids.tolist())}
        g_inl = int(inl[at[g_top]]) if g_top in at else 0
        verified_top1 += g_inl >= bar
        if h_top == g_top:
            continue
        kind = "top1_verified_overtaken" if g_inl >= bar else "top1_not_verified"
        kinds[kind] += 1
        cos = g_vecs[[g_top, h_top]] @ q_vecs[qi]
        cases.append({
            "query": _tail(task.query_paths[qi]), "kind": kind,
            "global_top1": _tail(task.gallery_paths[g_top]),
            "global_top1_right": _relevant(task, qi, g_top),
            "global_top1_inliers": g_inl, "global_top1_cos": round(float(cos[0]), 4),
            "hybrid_top1": _tail(task.gallery_paths[h_top]),
            "hybrid_top1_right": _relevant(task, qi, h_top),
            "hybrid_top1_inliers": int(inl[at[h_top]]) if h_top in at else 0,
            "hybrid_top1_cos": round(float(cos[1]), 4),
            "hybrid_top1_global_rank": int(np.sum(g_vecs @ q_vecs[qi] > cos[1])) + 1})
    out = {"row": row, "queries": task.num_queries, "queries_full": full.num_queries,
           "protocol": task.protocol, "min_inliers": bar, "hybrid_params": hyb["pipeline_params"],
           "metrics": {"global": glob["metrics"], "hybrid": hyb["metrics"]},
           "global_top1_verified": int(verified_top1), "changed_top1": len(cases), **kinds,
           "cases": cases}
    print(f"{row:<20} global {glob['metrics']} hybrid {hyb['metrics']} changed {len(cases)} "
          f"{kinds}", flush=True)
    return out


def _yn(x: bool | None) -> str:
    return "-" if x is None else ("yes" if x else "no")


def _class_pairs(cases: list[dict[str, Any]]) -> list[tuple[tuple[str, str, str, str], int]]:
    """``((query class, the loser's first result's class, winner, kind), count)``, most
    frequent first, over the cases whose two first results differ in correctness."""
    out: Counter[tuple[str, str, str, str]] = Counter()
    for x in cases:
        if bool(x["global_top1_right"]) == bool(x["hybrid_top1_right"]):
            continue
        win = "global" if x["global_top1_right"] else "hybrid"
        lose = x["hybrid_top1"] if win == "global" else x["global_top1"]
        out[(x["query"].split("/")[0], lose.split("/")[0], win, x["kind"])] += 1
    return sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))


def diagnose_markdown(payload: dict[str, Any], info: dict[str, Any]) -> str:
    lines = ["# Where the verified hybrid overturns the global top-1 (issue 18)", "",
             "Per row, the queries of the `queries` column (a seeded sample where fewer than "
             "all: 40, and 200 on Caltech-101, is the sample of `local-hybrid.md`); `hybrid` with "
             f"{payload['label']}. `changed`: queries whose hybrid first result is not the "
             "global first result. `verified, overtaken`: the global top-1 itself has >= "
             "min_inliers inliers and another candidate has more; `not verified`: it has "
             "fewer (or none). `right`: the first result's class (Caltech-101: the folder) "
             "or relevance is the query's. Inliers: MAGSAC++ homography inliers of the "
             "hybrid's verification (0: not verified or fewer tentative matches than the "
             "bar); cos: the global (effnet-lite0 GeM) cosine to the query.", "",
             "| row | queries | global top-1 verified | changed | verified, overtaken | "
             "not verified | changed, hybrid right / global right | R@1 global | R@1 hybrid | "
             "hybrid, the row's metrics |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        c = r["cases"]
        hr = sum(1 for x in c if x["hybrid_top1_right"] and not x["global_top1_right"])
        gr = sum(1 for x in c if x["global_top1_right"] and not x["hybrid_top1_right"])
        r1 = [r["metrics"][p].get("R@1") for p in ("global", "hybrid")]
        lines.append(f"| {r['row']} | {r['queries']} of {r['queries_full']} | "
                     f"{r['global_top1_verified']} | {r['changed_top1']} | "
                     f"{r['top1_verified_overtaken']} | {r['top1_not_verified']} | {hr} / {gr} | "
                     + " | ".join("-" if v is None else f"{v:.1f}" for v in r1) + " | "
                     + ", ".join(f"{k} {v:.2f}" if k == "N-S" else f"{k} {v:.1f}"
                                 for k, v in r["metrics"]["hybrid"].items()
                                 if k in HEADLINE) + " |")
    pairs = [(r["row"], k, n) for r in payload["rows"] if r["protocol"] == "class"
             for k, n in _class_pairs(r["cases"])]
    if pairs:
        lines += ["", "Where the first results differ in correctness, by the query's class and "
                  "the class of the other first result (class rows; `winner`: the pipeline "
                  "whose first result is right):", "",
                  "| row | query class | the other's class | winner | kind | queries |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {row} | {k[0]} | {k[1]} | {k[2]} | {k[3].replace('_', ' ')} | {n} |"
                  for row, k, n in pairs]
    for r in payload["rows"]:
        if not r["cases"]:
            continue
        lines += ["", f"### {r['row']}: the {r['changed_top1']} queries whose first result "
                  "changed", "",
                  "| query | global top-1 | right | inliers | cos | hybrid top-1 | right | "
                  "inliers | cos | its global rank | kind |", "|" + "---|" * 11]
        for x in r["cases"]:
            lines.append(
                f"| {x['query']} | {x['global_top1']} | {_yn(x['global_top1_right'])} | "
                f"{x['global_top1_inliers']} | {x['global_top1_cos']:.3f} | {x['hybrid_top1']} | "
                f"{_yn(x['hybrid_top1_right'])} | {x['hybrid_top1_inliers']} | "
                f"{x['hybrid_top1_cos']:.3f} | {x['hybrid_top1_global_rank']} | "
                f"{x['kind'].replace('_', ' ')} |")
    lines += ["", "## Machine", "", machine_md(info)]
    return "\n".join(lines) + "\n"


def merged_faces(task: RetrievalTask) -> RetrievalTask:
    """Caltech-101 with ``Faces_easy`` labelled ``Faces`` (same images, same features)."""
    def m(labels: np.ndarray | None) -> np.ndarray:
        assert labels is not None
        return np.where(labels == "Faces_easy", "Faces", labels)

    return replace(task, query_labels=m(task.query_labels), gallery_labels=m(task.gallery_labels))


def run_merged(max_queries: int | None, workers: int, params: dict[str, Any]) -> dict[str, Any]:
    std = load_row("caltech101")
    merged = sample_queries(merged_faces(std), max_queries)[0]
    rows = []
    for pipe in ("global", "local", "hybrid"):  # one search, two label sets
        res, _, ranks = captured(std, LocalEvalConfig(
            pipeline=pipe, max_queries=max_queries,
            pipeline_params=(params or None) if pipe == "hybrid" else None), workers)
        ids = np.concatenate([r.ids for r in ranks])
        for labels, metrics in (("standard (102 classes)", res["metrics"]),
                                ("Faces = Faces_easy (101 classes)", merged.evaluate(ids))):
            rows.append({"labels": labels, "pipeline": pipe, "queries": res["queries"],
                         "metrics": {k: round(float(v), 4) for k, v in metrics.items()},
                         "pipeline_params": res["pipeline_params"]})
            print("merged", labels, pipe, rows[-1]["metrics"], flush=True)
    return {"rows": rows, "queries_full": std.num_queries}


def merged_markdown(payload: dict[str, Any], info: dict[str, Any]) -> str:
    q = payload["rows"][0]["queries"]
    lines = ["# Caltech-101 with Faces and Faces_easy as one class (issue 18, secondary row)",
             "", "Caltech-101 test -> train, the seeded query sample of `local-hybrid.md` "
             f"({q} of {payload['queries_full']}), the same features and rankings; only the "
             "labels differ: `Faces_easy` holds cropped copies of `Faces` photos (the same "
             "people and sessions), so a `Faces` query answered by a `Faces_easy` image "
             "counts as wrong under the standard labels and right under the merged ones. "
             f"`hybrid`: {payload['label']}. A secondary row: the benchmark's row is the "
             "standard one. Percent.", "",
             "| labels | metric | global | local | hybrid | hybrid - max(global, local) |",
             "|---|---|---|---|---|---|"]
    by: dict[str, dict[str, dict[str, float]]] = {}
    for r in payload["rows"]:
        by.setdefault(r["labels"], {})[r["pipeline"]] = r["metrics"]
    for labels, cells in by.items():
        for j, metric in enumerate(("R@1", "mAP@R")):
            v = [cells[p][metric] for p in ("global", "local", "hybrid")]
            lines.append(f"| {labels if j == 0 else ''} | {metric} | "
                         + " | ".join(f"{x:.1f}" for x in v) + f" | {v[2] - max(v[:2]):+.1f} |")
    lines += ["", "## Machine", "", machine_md(info)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="diagnose,merged")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--max-queries", type=int, default=40)
    ap.add_argument("--row-max", default="caltech101=200")
    ap.add_argument("--params", default="",
                    help='hybrid options as JSON, e.g. \'{"keep_first": 0}\' '
                         '(default: its defaults)')
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="", help="suffix of the result files")
    args = ap.parse_args()
    set_threads(args.threads)
    info = machine_info(args.threads)
    info["load_average_at_start"] = os.getloadavg()
    info["command"] = " ".join(sys.argv)
    params = json.loads(args.params) if args.params else {}
    d = HybridConfig()
    label = (", ".join(f"`{k} = {v}`" for k, v in params.items()) if params else
             f"its default parameters (`order_verified = {d.order_verified}`, "
             f"`keep_first = {d.keep_first}`)")
    row_max = dict(x.split("=") for x in args.row_max.split(",") if x)
    sections = args.sections.split(",")
    if "diagnose" in sections:
        payload: dict[str, Any] = {"rows": [], "label": label, "params": params}
        for row in args.rows.split(","):
            t0 = time.perf_counter()
            mq = int(row_max.get(row, args.max_queries))
            payload["rows"].append(diagnose_row(row, mq, args.threads, params))
            payload["rows"][-1]["seconds"] = round(time.perf_counter() - t0, 1)
            info["load_average_at_end"] = os.getloadavg()
            write_results(f"hybrid-order{args.name}", {**payload, "machine": info},
                          diagnose_markdown(payload, info))
    if "render" in sections:  # the markdown again from the JSON (no search)
        from galleria.io.atomic import read_json

        for stem, render in (("hybrid-order", diagnose_markdown),
                             ("hybrid-faces-merged", merged_markdown)):
            if (RESULTS / f"{stem}{args.name}.json").is_file():
                old = read_json(RESULTS / f"{stem}{args.name}.json")
                write_results(f"{stem}{args.name}", old, render(old, old["machine"]))
    if "merged" in sections:
        mq = int(row_max.get("caltech101", args.max_queries))
        payload = {**run_merged(mq, args.threads, params), "label": label}
        info["load_average_at_end"] = os.getloadavg()
        write_results(f"hybrid-faces-merged{args.name}", {**payload, "machine": info},
                      merged_markdown(payload, info))


if __name__ == "__main__":
    main()
