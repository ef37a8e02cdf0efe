"""Issue 18: local search vs the plain RootSIFT voting script at every gallery size.

One table, ``benchmarks/results/local-sizes-variants.{json,md}``: per gallery size,
R@1 and mAP of the same seeded sample of SMVS phone photos for

- ``baseline``: ``_local_baseline.py`` (RootSIFT, FAISS ``IndexFlatL2`` over every
  gallery descriptor, Lowe ratio 0.8, one vote per match; exact voting, nothing
  approximated), with its peak memory (anonymous RSS added while it runs);
- ``local``: ASMK with the shipped ``sift-v1`` codebook (the default local index);
- ``local (gallery codebook)``: the old default, a codebook trained on the gallery
  (small galleries only: k-means of 16k words on the 11.4k gallery is not run);
- ``local+mds``: ``local`` re-ranked by the MDS embedding (library defaults).

Sizes:

``smvs200-30``, ``smvs200-100``, ``smvs200-100+d400``
    ``variants.py``: 30 / 100 SMVS covers at 200 px (+ 400 Caltech-101 distractors of
    classes the codebook never saw), their phone photos as queries, searched through
    :func:`galleria.eval.local.evaluate_pipeline` (features cached per variant).
``all-11.4k``
    the gallery ``benchmarks/build_g11k.py`` builds with the default
    ``galleria index --model effnet-lite0 --local sift`` recipe from every real image
    of ``$GALLERIA_DATASETS`` (``--gallery``, default ``/work/scratch/g11k``). The
    local index and features are the gallery's own (its saved ASMK snapshot, read
    through :func:`galleria.search.gallery_pipeline.open_pipeline`); SMVS phone
    photos query it, each query's own image excluded; relevant = the other images of
    its SMVS cover (the all-vs-all protocol inside 11.4k images).

Queries: ``--queries N`` (default 60) seeded (``--seed``) per row, the same sample for
every method of a row. Search is one thread; ms/query is search only (features
stored). Rows are written after each one and merged with the rows already in the
JSON (so sizes can run in separate processes). Run from the repository root::

    nice -n 10 env OMP_NUM_THREADS=1 GALLERIA_DATASETS=../shared/datasets \\
        .venv/bin/python benchmarks/bench_local_sizes.py \\
        [--sizes smvs200-30,smvs200-100,smvs200-100+d400,all-11.4k] [--queries 60] \\
        [--gallery /work/scratch/g11k] [--methods baseline,local,local+mds]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MemoryMonitor, machine_info, machine_md, set_threads, write_results
from _local_baseline import vote_scores
from galleria.eval.local import LocalEvalConfig, evaluate_pipeline, sample_queries
from galleria.eval.local_features import task_local_features
from galleria.extractors.registry import create_extractor
from variants import load_variant

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "local-sizes-variants"
SIZES = ("smvs200-30", "smvs200-100", "smvs200-100+d400", "all-11.4k")
METHODS = ("baseline", "local", "local (gallery codebook)", "local+mds",
           "local+mds (no evidence gate)")
#: pipeline options of the local+mds methods
MDS_METHODS = {"local+mds": {}, "local+mds (no evidence gate)": {"evidence": 0.0}}
CODEBOOK_DIR = (Path(__file__).resolve().parents[1] / "src" / "galleria" / "local" / "codebooks"
                / "sift-v1")


def average_precision(ranked_relevant: np.ndarray, n_relevant: int) -> float:
    """AP of one ranking: ``ranked_relevant`` (n,) bool in rank order, ``n_relevant``
    relevant items in total (those never ranked count as missed)."""
    if n_relevant <= 0:
        return float("nan")
    hits = np.flatnonzero(ranked_relevant)
    return float(np.sum(np.arange(1, hits.size + 1) / (hits + 1)) / n_relevant)


def blas_threshold(value: int = 20) -> None:
    """FAISS flat search through BLAS for every query batch above ``value`` rows.

    FAISS 1.15 ships ``distance_compute_blas_threshold = 128000``: a batch of fewer
    query descriptors (all of ours: <= 1,000 per image) takes the one-by-one SIMD path,
    7x slower than BLAS here (300 x 200k x 128, one thread) with identical neighbours.
    The baseline is exact voting either way; this gives it its fast exact path (the
    historical FAISS default, 20). Process-wide: set once by this benchmark.
    """
    import faiss  # heavy optional dependency

    faiss.cvar.distance_compute_blas_threshold = int(value)


def vote_scores_excluding(gallery: list[Any], queries: list[Any], exclude: np.ndarray, *,
                          ratio: float = 0.8, fetch: int = 8) -> np.ndarray:
    """``_local_baseline.vote_scores`` with ``exclude`` (a gallery index per query), exact,
    through FAISS's BLAS path: FAISS searches with an ``IDSelector`` take a path ~5x
    slower, so the 2 nearest descriptors outside the query's own image are found among
    the ``fetch`` nearest overall (the own image's descriptors dropped); a descriptor
    whose ``fetch`` nearest hold fewer than 2 others is searched again with the selector.
    Same votes as ``vote_scores(..., exclude=exclude)`` (checked in :func:`main` on a
    small gallery with ``--check-baseline``). ``(Q, G)`` float32."""
    import faiss  # heavy optional dependency

    from galleria.local.features import float_descriptors

    x = np.concatenate([float_descriptors(f.descriptors) for f in gallery])
    owner = np.concatenate([np.full(len(f), i, np.int64) for i, f in enumerate(gallery)])
    start = np.r_[0, np.cumsum([len(f) for f in gallery])]
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(x)
    del x
    out = np.zeros((len(queries), len(gallery)), np.float32)
    for j, q in enumerate(queries):
        if not len(q):
            continue
        own = int(exclude[j])
        qd = float_descriptors(q.descriptors)
        d2, nn = flat.search(qd, fetch)
        other = owner[np.maximum(nn, 0)] != own
        other &= nn >= 0
        # the first two neighbours of each row outside the own image
        rank = np.cumsum(other, axis=1)
        two = np.zeros((len(qd), 2), np.float32)
        idx = np.full((len(qd), 2), -1, np.int64)
        for r in (1, 2):
            hit = other & (rank == r)
            has = hit.any(axis=1)
            col = np.argmax(hit, axis=1)
            two[has, r - 1] = d2[has, col[has]]
            idx[has, r - 1] = nn[has, col[has]]
        redo = np.flatnonzero(idx[:, 1] < 0)
        if redo.size:  # fewer than 2 others among the fetched: the selector path
            sel = faiss.IDSelectorNot(faiss.IDSelectorRange(int(start[own]),
                                                            int(start[own + 1])))
            rd, rn = flat.search(qd[redo], 2, params=faiss.SearchParameters(sel=sel))
            two[redo], idx[redo] = rd, rn
        d = np.sqrt(np.maximum(two, 0))
        ok = (d[:, 0] < ratio * d[:, 1]) & (idx[:, 0] >= 0)
        out[j] = np.bincount(owner[idx[ok, 0]], minlength=len(gallery))
        out[j, own] = -1
    return out


# ----------------------------------------------------------------------------- variants
def variant_row(name: str, n_queries: int, seed: int, methods: list[str],
                threads: int) -> dict[str, Any]:
    full = load_variant(name)
    row: dict[str, Any] = {"row": name, "gallery": full.num_gallery}
    if "baseline" in methods:
        ext = create_extractor("sift")
        packed, g_rows, q_rows = task_local_features(full, ext, workers=threads)
        task, keep = sample_queries(full, n_queries, seed)
        gal = [packed[int(i)] for i in g_rows]
        qs = [packed[int(q_rows[i])] for i in keep]
        with MemoryMonitor() as mem:
            t0 = time.perf_counter()
            votes = vote_scores(gal, qs, ratio=0.8)
            sec = time.perf_counter() - t0
        m = task.evaluate(votes)
        row.update({"queries": task.num_queries, "baseline R@1": float(m["R@1"]),
                    "baseline mAP": float(m["mAP"]),
                    "baseline ms/q": 1000 * sec / task.num_queries,
                    "baseline peak MB": round(mem.peak_mb, 1),
                    "descriptors": int(sum(len(f) for f in gal)),
                    "feature bytes/image": float(sum(f.descriptors.nbytes + f.keypoints.nbytes
                                                     for f in gal) / len(gal))})
        print(name, "baseline", {k: v for k, v in row.items() if k.startswith("baseline")},
              flush=True)
    cfgs = {"local": LocalEvalConfig(pipeline="local"),
            "local (gallery codebook)": LocalEvalConfig(pipeline="local",
                                                        index_params={"codebook": "gallery"}),
            "local+mds": LocalEvalConfig(pipeline="local+mds"),
            "local+mds (no evidence gate)": LocalEvalConfig(pipeline="local+mds",
                                                         pipeline_params={"evidence": 0.0})}
    for label in [m for m in methods if m in cfgs]:
        res = evaluate_pipeline(full, dataclasses.replace(cfgs[label], max_queries=n_queries,
                                                          query_seed=seed), workers=threads)
        row["queries"] = res["queries"]
        row[f"{label} R@1"] = res["metrics"]["R@1"]
        row[f"{label} mAP"] = res["metrics"]["mAP"]
        row[f"{label} ms/q"] = res["search_ms_per_query"]
        row[f"{label} codebook"] = res["index"]["params"]["codebook"]
        row[f"{label} bytes/image"] = res["index"]["bytes_per_image"]
        if label in MDS_METHODS:
            row[f"{label} params"] = res["pipeline_params"]
        print(name, label, res["metrics"], res["search_ms_per_query"], "ms/q", flush=True)
    return row


# ----------------------------------------------------------------------------- 11.4k
def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def gallery_row(gallery: str, n_queries: int, seed: int, methods: list[str],
                baseline_queries: int, mds_queries: int | None = None) -> dict[str, Any]:
    """The 11.4k row over the gallery ``build_g11k.py`` built (see the module docstring)."""
    from _local_cost import all_images
    from galleria.eval.datasets import load_task
    from galleria.eval.paths import datasets_root
    from galleria.search.gallery_pipeline import gallery_spaces, open_pipeline
    from galleria.search.pipelines import QueryBatch
    from galleria.store.gallery import Gallery

    root = datasets_root()
    assert root is not None, "set GALLERIA_DATASETS"
    smvs = load_task("smvs")
    rel = [Path(p).resolve().relative_to(root.resolve()).as_posix()
           for p in smvs.gallery_files()]
    label_of = dict(zip(rel, smvs.gallery_labels.tolist(), strict=True))
    qids = [Path(p).resolve().relative_to(root.resolve()).as_posix()
            for p in smvs.query_files()]
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(qids), min(n_queries, len(qids)), replace=False))
    qids = [qids[i] for i in pick]
    row: dict[str, Any] = {"row": "all-11.4k", "queries": len(qids), "gallery_path": gallery}
    with Gallery.open(gallery, readonly=True) as g:
        gspace, lspace = gallery_spaces(g)
        assert lspace is not None, f"{gallery} has no local features"
        ids = [p.relative_to(root).as_posix() for p in all_images()]  # build_g11k's ids
        keys = g.keys_of(ids)
        ids = [i for i, k in zip(ids, keys.tolist(), strict=True) if k >= 0]
        keys = keys[keys >= 0]
        n = int(keys.size)
        group = np.array([label_of.get(str(i), -1) for i in ids], np.int64)
        row["gallery"] = n
        qkeys = g.keys_of(qids)
        assert (qkeys >= 0).all(), "a query image is not in the gallery"
        pos = {int(k): j for j, k in enumerate(keys.tolist())}
        qpos = np.array([pos[int(k)] for k in qkeys])
        qfeats = g.get_local(qkeys, space=lspace)
        qgroup = group[qpos]
        n_rel = np.array([int(np.sum(group == gq)) - 1 for gq in qgroup])
        lspace_dir = g.path / "segments" / _slug_dir(g, lspace)

        # the baseline's own seeded sub-sample (exact voting over 3.6M descriptors costs
        # minutes per query); every method is also scored on it
        bsub = np.sort(np.random.default_rng(seed).choice(len(qids), min(baseline_queries,
                                                                        len(qids)),
                                                          replace=False))
        row["baseline queries"] = int(bsub.size)
        row["baseline query positions"] = bsub.tolist()

        def score_ranking(rank_keys: np.ndarray, label: str, sec: float,
                          rows_: np.ndarray | None = None) -> None:
            rows_ = np.arange(len(qids)) if rows_ is None else rows_
            r1, aps = [], []
            for a, j in enumerate(rows_):
                ks = rank_keys[a][rank_keys[a] >= 0]
                ks = ks[ks != qkeys[j]]
                rel_ = group[[pos[int(k)] for k in ks]] == qgroup[j]
                r1.append(bool(rel_[0]) if rel_.size else False)
                aps.append(average_precision(rel_, int(n_rel[j])))
            r1a, apa = np.array(r1), np.array(aps)
            row[f"{label} R@1"] = 100 * float(np.mean(r1a))
            row[f"{label} mAP"] = 100 * float(np.mean(apa))
            row[f"{label} ms/q"] = 1000 * sec / len(rows_)
            # per query (positions in the 60-query sample): any sub-sample is compared
            row[f"{label} per-query"] = {"q": [int(j) for j in rows_], "R@1": r1a.tolist(),
                                         "AP": apa.tolist()}
            print("all-11.4k", label, row[f"{label} R@1"], row[f"{label} mAP"],
                  f"{row[f'{label} ms/q']:.0f} ms/q", flush=True)

        q = QueryBatch(local=qfeats, exclude=qkeys)
        if "local" in methods:
            s = open_pipeline(g, "local", with_models=False)
            pipe, view = s.build(g.views(s.spaces))
            index = s.local_index(view)
            t0 = time.perf_counter()
            res = pipe.search(q, n)
            score_ranking(res.ids, "local", time.perf_counter() - t0)
            row["local codebook"] = index.params()["codebook"]
            row["local bytes/image"] = index.nbytes() / n
            row["local inverted-file bytes/image"] = float(
                sum(sg.rows.nbytes + sg.codes.nbytes for sg in index._segs) / n)
        for mlabel in [m for m in methods if m in MDS_METHODS]:
            mds = open_pipeline(g, "local+mds", with_models=False, **MDS_METHODS[mlabel])
            mpipe, _ = mds.build(g.views(mds.spaces))
            msub = np.arange(len(qids))
            if mds_queries is not None and mds_queries < len(qids):  # bsub + seeded others
                rest = np.setdiff1d(msub, bsub)
                more = np.random.default_rng(seed + 1).choice(
                    rest, max(0, mds_queries - bsub.size), replace=False)
                msub = np.sort(np.r_[bsub, more]).astype(np.int64)
            qm = QueryBatch(local=[qfeats[int(j)] for j in msub], exclude=qkeys[msub])
            t0 = time.perf_counter()
            res = mpipe.search(qm, n)
            score_ranking(res.ids, mlabel, time.perf_counter() - t0, msub)
            row[f"{mlabel} queries"] = int(msub.size)
            row[f"{mlabel} params"] = mpipe.params()
            row[f"{mlabel} bytes/image"] = mpipe.index.nbytes() / n
        if lspace_dir.is_dir():
            row["feature bytes/image"] = _dir_bytes(lspace_dir) / n
        if gspace:
            gdir = g.path / "segments" / _slug_dir(g, gspace)
            if gdir.is_dir():
                row["global bytes/image"] = _dir_bytes(gdir) / n
        if "baseline" in methods:
            feats = g.get_local(keys, space=lspace)
            row["descriptors"] = int(sum(len(f) for f in feats))
            with MemoryMonitor() as mem:
                t0 = time.perf_counter()
                votes = vote_scores_excluding(feats, [qfeats[int(j)] for j in bsub],
                                              qpos[bsub], ratio=0.8)
                sec = time.perf_counter() - t0
            order = np.argsort(-votes, axis=1, kind="stable")
            score_ranking(keys[order], "baseline", sec, bsub)
            row["baseline peak MB"] = round(mem.peak_mb, 1)
    return row


def _slug_dir(g: Any, space: str) -> str:
    """The segment folder name of ``space`` (``name-fingerprint`` with ``@`` -> ``-``)."""
    base = g.path / "segments"
    want = space.split("@")[0]
    hits = [p.name for p in base.iterdir() if p.name.startswith(want)] if base.is_dir() else []
    return hits[0] if len(hits) == 1 else space


# ----------------------------------------------------------------------------- ablation
#: local+mds variants re-scored from the library's pure functions: (floor the unmatched
#: pairs, local_blend, map the cosine to [0, 1] before blending, evidence gate)
ABLATION = {"cosine alone, before (no floor)": (False, 0.0, False, 0.0),
            "cosine alone, floored": (True, 0.0, False, 0.0),
            "blend 0.5, before (no floor, cosine in [-1, 1])": (False, 0.5, False, 0.0),
            "blend 0.5, floored, cosine in [-1, 1]": (True, 0.5, False, 0.0),
            "blend 0.5, no floor, cosine in [0, 1]": (False, 0.5, True, 0.0),
            "blend 0.5, floored, cosine in [0, 1], no evidence gate": (True, 0.5, True, 0.0),
            "blend 0.5, floored, cosine in [0, 1], evidence 3 (the default now)":
                (True, 0.5, True, 3.0)}


def ablation_row(name: str, n_queries: int, seed: int, threads: int) -> dict[str, Any]:
    """Each :data:`ABLATION` variant of local+mds on one task (the pipeline's candidate
    lists and sizes, re-scored here), beside ``local``; R@1 / mAP of the same queries."""
    from galleria.eval.datasets import load_task
    from galleria.eval.local import build_local_index
    from galleria.fingerprint import digest
    from galleria.rerank.mds import floor_unmatched, mds_rerank_scores
    from galleria.search.pipelines import LocalMDSPipeline, LocalPipeline, QueryBatch

    full = load_variant(name) if name.startswith("smvs200") else load_task(name)
    ext = create_extractor("sift")
    packed, g_rows, q_rows = task_local_features(full, ext, workers=threads)
    task, keep = sample_queries(full, n_queries, seed)
    gal = [packed[int(i)] for i in g_rows]
    qs = [packed[int(q_rows[i])] for i in keep]
    G = task.num_gallery
    idx = build_local_index("asmk", gal, dim=ext.dim, fingerprint=ext.fingerprint,
                            cache_key=digest(full.name, G, [len(f) for f in gal]))
    ex = (np.where(task.query_gallery_index >= 0, task.query_gallery_index, -1)
          if task.exclude_self else None)
    base = LocalPipeline(idx).search(QueryBatch(local=qs, exclude=ex), G)
    kr, cand = LocalMDSPipeline(idx).sizes()
    out: dict[str, Any] = {"row": name, "gallery": G, "queries": task.num_queries,
                           "k": kr, "candidates": cand}
    m = task.evaluate(base.ids)
    out["local"] = {"R@1": float(m["R@1"]), "mAP": float(m["mAP"])}
    for label, (floor, lb, mapped, ev) in ABLATION.items():
        ids_all = base.ids.copy()
        for i in range(len(qs)):
            ids, sc = base.ids[i], base.scores[i].astype(np.float64)
            valid = (ids >= 0) & np.isfinite(sc)
            ids, sc = ids[valid], sc[valid]
            n_emb = min(cand, int(np.count_nonzero(sc[:cand] > 0)))
            if ev and n_emb > 2:
                top = sc[:n_emb]
                n_emb = int(np.count_nonzero(top > top.mean() + ev * top.std()))
            n_re = min(kr, n_emb)
            if n_re < 2:
                continue
            pair = idx.pairwise(ids[:n_emb])
            if floor:
                pair = floor_unmatched(sc[:n_emb], pair)
            new = mds_rerank_scores(sc[:n_emb], pair)[:n_re].astype(np.float64)
            if lb:
                new = (1 - lb) * ((new + 1) / 2 if mapped else new) + lb * sc[:n_re] / sc[0]
            order = np.argsort(-new, kind="stable")
            ids_all[i, :n_re] = ids[:n_re][order]
        m = task.evaluate(ids_all)
        out[label] = {"R@1": float(m["R@1"]), "mAP": float(m["mAP"])}
        print(name, label, out[label], flush=True)
    return out


def ablation_markdown(payload: dict[str, Any], info: dict[str, Any]) -> str:
    rows = payload["rows"]
    labels = ["local", *ABLATION]
    lines = ["# local+mds: what each part of the fix does (issue 18)", "",
             "R@1 / mAP (%) of a seeded query sample (the same for every column of a row). "
             "The local (ASMK, shipped codebook) candidate lists and the pipeline's sizes "
             "(k re-ranked of the candidates embedded, the paper's 700 / 1,600 scaled to the "
             "gallery) re-scored with `galleria.rerank.mds` (`mds_rerank_scores`, "
             "`floor_unmatched`): with or without flooring the pairwise zeros, with or "
             "without the local blend, the cosine in [-1, 1] or mapped to [0, 1]. Rows: "
             "`smvs200-100+d400` = 100 SMVS covers at 200 px + 400 Caltech-101 images, phone "
             "photos as queries; `smvs` = SMVS all-vs-all (the query's own image excluded).",
             "", "| variant | " + " | ".join(f"{r['row']} ({r['gallery']} images, "
                                             f"{r['queries']} q, k {r['k']} of "
                                             f"{r['candidates']})" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for lab in labels:
        lines.append(f"| {lab} | " + " | ".join(
            f"{r[lab]['R@1']:.1f} / {r[lab]['mAP']:.1f}" for r in rows) + " |")
    lines += ["", "## Machine", "", machine_md(info)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- report
def codebook_info() -> dict[str, Any]:
    head = json.loads((CODEBOOK_DIR / "header.json").read_text())
    return {"fingerprint": head["fingerprint"],
            "bytes": sum(f.stat().st_size for f in CODEBOOK_DIR.iterdir()),
            "build": {k: v for k, v in head["params"].get("build", {}).items()
                      if k not in ("classes", "command")},
            "command": head["params"].get("build", {}).get("command")}


def _subsample_metrics(r: dict[str, Any]) -> None:
    """Fill ``<method> R@1 / mAP (<sub> queries)`` from the per-query results of the
    11.4k row: every method on the baseline's and on local+mds's sub-samples."""
    for k in [k for k in r if k.endswith(" queries)")]:  # recomputed, never stale
        del r[k]
    for sub in ("baseline", *MDS_METHODS):
        want = (r.get("baseline query positions") if sub == "baseline" else
                (r.get(f"{sub} per-query") or {}).get("q"))
        if not want or (sub != "baseline" and r.get(f"{sub} queries") == r.get("queries")):
            continue
        for m in METHODS:
            pq = r.get(f"{m} per-query")
            if not pq or m == sub:
                continue
            at = {q: i for i, q in enumerate(pq["q"])}
            if not all(q in at for q in want):
                continue
            r[f"{m} R@1 ({sub} queries)"] = 100 * float(np.mean([pq["R@1"][at[q]]
                                                                 for q in want]))
            r[f"{m} mAP ({sub} queries)"] = 100 * float(np.mean([pq["AP"][at[q]]
                                                                 for q in want]))
        r[f"{sub} R@1 ({sub} queries)"] = r.get(f"{sub} R@1")
        r[f"{sub} mAP ({sub} queries)"] = r.get(f"{sub} mAP")


def _f(r: dict[str, Any], key: str, fmt: str = "{:.1f}") -> str:
    v = r.get(key)
    return "" if v is None else fmt.format(v)


def markdown(payload: dict[str, Any], info: dict[str, Any]) -> str:
    order = {s: i for i, s in enumerate(SIZES)}
    rows = sorted(payload["rows"], key=lambda r: order.get(r["row"], 99))
    lines = [
        "# Local search vs the plain RootSIFT voting script at every gallery size", "",
        "R@1 / mAP (%) of a seeded sample of SMVS phone photos (the same sample for every "
        "method of a row). Baseline: `benchmarks/_local_baseline.py` (RootSIFT, FAISS flat "
        "over every gallery descriptor, Lowe ratio 0.8, one vote per match: exact). `local`: "
        "ASMK with the shipped `sift-v1` codebook (the default). `local (gallery codebook)`: "
        "the previous default, a codebook trained on the gallery's own descriptors (not run "
        "at 11.4k). `local+mds`: `local` re-ranked by MDS (library defaults, params in the "
        "JSON). Sizes 30 / 100: SMVS covers at 200 px (`variants.py`); 500: 100 covers + 400 "
        "Caltech-101 distractors of classes the codebook never saw; 11.4k: the gallery "
        "`benchmarks/build_g11k.py` builds from every real image of ../shared with the default "
        "`galleria index --model effnet-lite0 --local sift` recipe (the phone photo's own "
        "image excluded; relevant = the other images of its cover). `ok`: local R@1 >= "
        "baseline R@1 - 3; `mds ok`: local+mds R@1 >= local R@1 (a mAP more than 1 point below "
        "`local` is flagged). ms/query: search only, one thread; the load differed between "
        "runs (Machine).", "",
        "| gallery | images | queries | baseline | local | local (gallery codebook) | "
        "local+mds | local+mds (no evidence gate) | ok | mds ok |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        _subsample_metrics(r)
        for sub in ("", " (baseline queries)", *(f" ({m} queries)" for m in MDS_METHODS)):
            if sub and (sub.strip(" ()") not in r or r.get(sub.strip(" ()")) == r.get("queries")):
                continue
            nq = r.get("queries", "")
            if "baseline queries" in r:  # the baseline ran on a sub-sample only
                nq = r["baseline queries"] if sub else f"{nq} (sub-samples below)"
            cells = [f"{_f(r, m + ' R@1' + sub)} / {_f(r, m + ' mAP' + sub)}"
                     if (m + " R@1" + sub) in r else "" for m in METHODS]
            if not sub:  # methods run on a sub-sample only are shown on their lines
                for c, m in enumerate(METHODS):
                    if r.get(f"{m} queries", r.get("queries")) != r.get("queries"):
                        cells[c] = ""
            if sub == " (baseline queries)":
                cells[0] = f"{_f(r, 'baseline R@1')} / {_f(r, 'baseline mAP')}"
            mds_sub = sub not in ("", " (baseline queries)")
            if mds_sub:
                nq = r[sub.strip(" ()")]
                cells[0] = ""
            lr = r.get("local R@1" + sub)
            ok = ("yes" if lr >= r["baseline R@1"] - 3 else "**no**") \
                if "baseline R@1" in r and lr is not None and not mds_sub \
                and (sub or "baseline queries" not in r) else ""
            mr = r.get("local+mds R@1" + sub) if cells[3] else None
            mok = ("yes" if mr >= lr else "**no**") if mr is not None and lr is not None else ""
            mm, lm = r.get("local+mds mAP" + sub), r.get("local mAP" + sub)
            if mok and mm is not None and lm is not None and mm < lm - 1:
                mok += f" (mAP **{mm - lm:+.1f}**)"
            lines.append(f"| {r['row']}{sub.replace('queries', 'sub-sample')} | "
                         f"{r['gallery']} | {nq} | " + " | ".join(cells) + f" | {ok} | {mok} |")
    lines += ["", "Cost (one thread; bytes per image: `local` = the ASMK index in memory, "
              "codebook and quantizer included; features = the stored RootSIFT keypoints + "
              "descriptors the baseline indexes; baseline peak = anonymous RSS its FAISS flat "
              "index and search added):", "",
              "| gallery | descriptors | ms/q baseline | ms/q local | ms/q local+mds | "
              "ms/q local+mds (no evidence gate) | bytes/image local | bytes/image features | "
              "baseline peak MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {_f(r, 'descriptors', '{:,}')} | "
                     f"{_f(r, 'baseline ms/q', '{:,.0f}')} | {_f(r, 'local ms/q', '{:,.0f}')} | "
                     f"{_f(r, 'local+mds ms/q', '{:,.0f}')} | "
                     f"{_f(r, 'local+mds (no evidence gate) ms/q', '{:,.0f}')} | "
                     f"{_f(r, 'local bytes/image', '{:,.0f}')} | "
                     f"{_f(r, 'feature bytes/image', '{:,.0f}')} | "
                     f"{_f(r, 'baseline peak MB', '{:,.0f}')} |")
    cb = payload.get("codebook") or {}
    if cb:
        lines += ["", "## The shipped codebook", "",
                  f"`{cb['fingerprint']}`: {cb['bytes']:,} bytes on disk "
                  f"(`src/galleria/local/codebooks/sift-v1/`), build parameters "
                  f"`{json.dumps(cb['build'])}`. Built from the repository root by "
                  f"`{cb['command']}` (`--check` rebuilds into a temporary folder and "
                  "compares fingerprints)."]
    build = payload.get("g11k_build")
    if build:
        lines += ["", "## The 11.4k gallery build", "", build]
    lines += ["", "## Machine", "", machine_md(info)]
    for r in rows:
        for k, v in r.items():
            if k.startswith("load"):  # "load": the row's last run (first version)
                what = k[6:-1] if k != "load" else "the last run of this row (local+mds)"
                lines.append(f"- {r['row']}, 1-minute load while {what} ran: {v}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--methods", default="baseline,local,local (gallery codebook),local+mds")
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mds-queries", type=int, default=None,
                    help="11.4k: local+mds on a seeded sub-sample of this many queries (the "
                         "baseline's included)")
    ap.add_argument("--baseline-queries", type=int, default=20,
                    help="11.4k: the baseline runs on a seeded sub-sample of this many queries")
    ap.add_argument("--gallery", default="/work/scratch/g11k")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="drop the rows already in the JSON")
    ap.add_argument("--check-baseline", action="store_true",
                    help="check the fast exclusion against _local_baseline on 150 SMVS images")
    ap.add_argument("--ablation", default="",
                    help="instead of the sizes: the local+mds ablation on these tasks "
                         "(e.g. smvs200-100+d400,smvs) -> local-sizes-variants-mds-ablation.md")
    ap.add_argument("--build-note", default=None, help="text of the 11.4k build section")
    args = ap.parse_args()
    set_threads(args.threads)
    blas_threshold()
    info = machine_info(args.threads)
    info["load_average_at_start"] = os.getloadavg()
    info["command"] = " ".join(sys.argv)
    methods = [m.strip() for m in args.methods.split(",")]
    if args.check_baseline:  # the fast exclusion gives the script's votes
        from galleria.eval.datasets import load_task

        t = load_task("smvs")
        ext = create_extractor("sift")
        packed, g_rows, _ = task_local_features(t, ext, workers=args.threads)
        gal = [packed[int(i)] for i in g_rows[:150]]
        qi = np.arange(0, 150, 15)
        qs = [gal[int(i)] for i in qi]
        a = vote_scores(gal, qs, ratio=0.8, exclude=qi)
        b = vote_scores_excluding(gal, qs, qi, ratio=0.8)
        print("baseline check: identical votes", bool(np.array_equal(a, b)), flush=True)
        assert np.array_equal(a, b)
        return
    if args.ablation:
        rows = [ablation_row(t, args.queries, args.seed, args.threads)
                for t in args.ablation.split(",")]
        info["load_average_at_end"] = os.getloadavg()
        write_results(f"{NAME}-mds-ablation", {"rows": rows, "machine": info},
                      ablation_markdown({"rows": rows}, info))
        return
    jpath = RESULTS / f"{NAME}.json"
    old = json.loads(jpath.read_text()) if jpath.is_file() and not args.fresh else {}
    keep_rows = [r for r in old.get("rows", []) if "baseline mAP" in r or "local mAP" in r]
    payload: dict[str, Any] = {"rows": keep_rows, "queries": args.queries, "seed": args.seed,
                               "codebook": codebook_info(),
                               "g11k_build": args.build_note or old.get("g11k_build")}
    names = [n for n in args.sizes.split(",") if n]
    if not names:  # re-render the table (e.g. with a new --build-note)
        info = old.get("machine", info)
        write_results(NAME, {**payload, "machine": info}, markdown(payload, info))
    for name in names:
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        row = (gallery_row(args.gallery, args.queries, args.seed, methods, args.baseline_queries,
                           args.mds_queries)
               if name == "all-11.4k" else
               variant_row(name, args.queries, args.seed, methods, args.threads))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row[f"load ({', '.join(methods)})"] = (f"{load0[0]:.1f} at start, "
                                               f"{os.getloadavg()[0]:.1f} at end")
        # merged with what other processes wrote meanwhile (sizes may run in parallel)
        now = json.loads(jpath.read_text()) if jpath.is_file() else {}
        current = {r["row"]: r for r in payload["rows"]}
        current.update({r["row"]: r for r in now.get("rows", []) if r["row"] != name
                        and "seconds" in r})
        prev = current.get(name, {})
        current[name] = {**prev, **row}
        payload["rows"] = list(current.values())
        info["load_average_at_end"] = os.getloadavg()
        write_results(NAME, {**payload, "machine": info}, markdown(payload, info))
        print("row", json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
    main()
