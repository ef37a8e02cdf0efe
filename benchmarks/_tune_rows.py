"""Rows of bench_tune.py: evaluation tasks as galleria galleries, every pipeline on each.

A row is a :class:`~galleria.eval.datasets.RetrievalTask` whose gallery side is
put into a real galleria store (effnet-lite0 GeM global vectors + SIFT local
features, from the evaluation caches of :mod:`galleria.eval.embed` and
:mod:`galleria.eval.local_features`, so nothing is extracted twice), indexed by
the store (its own ASMK codebook). Every pipeline is then run through
``galleria.open_searcher(gallery, pipeline=...)`` -- exactly what a user's
search runs -- with the task's real queries, and scored by the task's protocol.

The small-reference SMVS variants (the issue's small-gallery case) are built
here by :func:`smvs_small`: ``n`` covers (a seeded choice), each clean reference
downscaled to ``side`` px (longest side) as the gallery, the covers' 4 phone
photos (640 px) as queries.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from galleria.decision import open_searcher
from galleria.eval.datasets import RetrievalTask, load_task
from galleria.eval.embed import task_embeddings
from galleria.eval.local_features import task_local_features
from galleria.eval.paths import dataset_dir
from galleria.extract.queries import Queries
from galleria.extract.spaces import space_info
from galleria.extractors.registry import create_extractor
from galleria.io.atomic import write_json
from galleria.store.gallery import Gallery
from galleria.types import LocalFeatures

log = logging.getLogger(__name__)
OUT = Path(__file__).resolve().parent / "out"
GLOBAL, LOCAL = "effnet-lite0", "sift"


# ------------------------------------------------------------------ tasks


def smvs_small(n_covers: int, *, side: int = 200, seed: int = 0) -> RetrievalTask:
    """SMVS with ``n_covers`` covers (seeded), references downscaled to ``side`` px.

    Gallery: the downscaled clean references (written once under
    ``benchmarks/out/smvs-small/``, JPEG q90, Lanczos). Queries: the 4 phone photos
    of each chosen cover (as shipped, 640 px). Protocol: instance, R@1 / mAP.
    """
    src = dataset_dir("smvs_dvd_covers")
    with open(src / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    groups = sorted({int(r["group"]) for r in rows})
    pick = sorted(np.random.default_rng(seed).choice(groups, size=n_covers, replace=False)
                  .tolist()) if n_covers < len(groups) else groups
    chosen = set(pick)
    name = f"smvs-small{n_covers}-{side}px"
    root = OUT / "smvs-small" / f"{n_covers}-{side}-s{seed}"
    root.mkdir(parents=True, exist_ok=True)
    gal, glab, qry, qlab = [], [], [], []
    for r in rows:
        g = int(r["group"])
        if g not in chosen:
            continue
        if r["device"] == "Reference":
            out = root / f"ref-{g:03d}.jpg"
            if not out.is_file():
                img = Image.open(src / r["path"]).convert("RGB")
                f = side / max(img.size)
                img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))),
                                 Image.Resampling.LANCZOS)
                tmp = out.with_suffix(".tmp.jpg")
                img.save(tmp, quality=90)
                tmp.replace(out)
            gal.append(out.name)
            glab.append(g)
        else:
            qry.append(str((src / r["path"]).resolve()))
            qlab.append(g)
    write_json(root / "task.json", {"covers": pick, "side": side, "seed": seed})
    return RetrievalTask(
        name=name, root=root, gallery_paths=gal, query_paths=qry,
        query_gallery_index=np.full(len(qry), -1, np.int64), protocol="instance",
        query_labels=np.array(qlab, np.int64), gallery_labels=np.array(glab, np.int64),
        metrics=("R@1", "mAP"),
        description=f"SMVS {n_covers} covers, references at {side} px, phone photos as queries")


def load_row_task(name: str) -> RetrievalTask:
    if name.startswith("smvs-small"):
        n = int(name[len("smvs-small"):].split("-")[0])
        return smvs_small(n)
    return load_task(name)


# ------------------------------------------------------------------ galleries


def task_data(task: RetrievalTask, workers: int = 1) -> dict[str, Any]:
    """Cached global vectors and local features of a task's gallery and queries."""
    gext, lext = create_extractor(GLOBAL), create_extractor(LOCAL)
    qv, gv = task_embeddings(task, gext, workers=workers)
    packed, g_rows, q_rows = task_local_features(task, lext, workers=workers)
    return {"gext": gext, "lext": lext, "gv": gv, "qv": qv,
            "gl": [packed[int(i)] for i in g_rows], "ql": [packed[int(i)] for i in q_rows]}


def task_gallery(task: RetrievalTask, folder: Path, data: dict[str, Any]) -> Gallery:
    """A galleria gallery of the task's gallery side (ids ``g00000``...), built once."""
    G = task.num_gallery
    ids = [f"g{i:05d}" for i in range(G)]
    done = folder / "built.json"
    if done.is_file():
        return Gallery.open(folder)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    g = Gallery.open_or_create(folder)
    meta = [{"path": str(p.resolve())} for p in task.gallery_files()]
    for ext, kind in ((data["gext"], "global"), (data["lext"], "local")):
        g.register_space(ext.fingerprint, ext.dim, space_info(ext), kind=kind)
    t0 = time.perf_counter()
    g.add(ids, data["gv"], space=data["gext"].fingerprint, meta=meta)
    g.add_local(ids, data["gl"], space=data["lext"].fingerprint, meta=meta)
    for sp in (data["gext"].fingerprint, data["lext"].fingerprint):
        g.compact(sp)
        g.save_index(sp)
    write_json(done, {"task": task.name, "items": G,
                      "seconds": round(time.perf_counter() - t0, 1)})
    return g


def own_rows(task: RetrievalTask) -> np.ndarray:
    """``(Q,)`` gallery index to drop from each query's ranking (-1: none)."""
    if not task.exclude_self:
        return np.full(task.num_queries, -1, np.int64)
    return np.asarray(task.query_gallery_index, np.int64)


def run_pipeline(gallery: Gallery, task: RetrievalTask, data: dict[str, Any], pipeline: str,
                 params: dict[str, Any] | None = None, *, rows: np.ndarray | None = None,
                 k: int | None = None, batch: int = 16) -> dict[str, Any]:
    """One pipeline through ``open_searcher`` on the task's real queries.

    Returns ``{"ranking" (Q', K) gallery indices (-1 padding), "scores" (Q', K),
    "rows" (Q',), "ms_per_query", "blank"}``; ``rows``: a subset of the queries.
    """
    s = open_searcher(gallery, pipeline=pipeline, **(params or {}))
    gfp, lfp = data["gext"].fingerprint, data["lext"].fingerprint
    rows = np.arange(task.num_queries) if rows is None else np.asarray(rows)
    G = task.num_gallery
    k = G if k is None else min(k, G)
    own = own_rows(task)
    want = min(G, k + 1) if (own[rows] >= 0).any() else k
    ranking = np.full((len(rows), k), -1, np.int64)
    scores = np.full((len(rows), k), -np.inf, np.float32)
    blank = 0
    local_only = pipeline in ("local", "local+mds")
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        part = rows[i: i + batch]
        ok = [j for j in range(len(part))
              if not (local_only and len(data["ql"][part[j]]) == 0)]
        blank += len(part) - len(ok)
        if not ok:
            continue
        q: dict[str, Any] = {}
        if gfp in s.spaces:
            q[gfp] = data["qv"][part[ok]]
        if lfp in s.spaces:
            q[lfp] = [data["ql"][part[j]] for j in ok]
        res = s.search(Queries(q), want)
        for n, j in enumerate(ok):
            idx = np.array([int(x[1:]) if x is not None else -1 for x in res.ids[n]], np.int64)
            sc = res.scores[n]
            o = own[part[j]]
            if o >= 0:
                keep = idx != o
                idx, sc = idx[keep], sc[keep]
            m = min(k, idx.size)
            ranking[i + j, :m], scores[i + j, :m] = idx[:m], sc[:m]
    ms = 1000 * (time.perf_counter() - t0) / max(len(rows), 1)
    return {"ranking": ranking, "scores": scores, "rows": rows, "ms_per_query": ms,
            "blank": blank}


def evaluate_ranking(task: RetrievalTask, ranking: np.ndarray, rows: np.ndarray | None = None
                     ) -> dict[str, float]:
    """The task's metrics of a ``(Q', K)`` ranking (``rows``: the queries it covers)."""
    if rows is None or len(rows) == task.num_queries:
        return task.evaluate(ranking)
    sub = _subtask(task, rows)
    return sub.evaluate(ranking)


def _subtask(task: RetrievalTask, rows: np.ndarray) -> RetrievalTask:
    import dataclasses

    r = np.asarray(rows)
    kw: dict[str, Any] = {
        "query_paths": [task.query_paths[i] for i in r],
        "query_gallery_index": np.asarray(task.query_gallery_index)[r],
    }
    if task.query_bbx is not None:
        kw["query_bbx"] = [task.query_bbx[i] for i in r]
    if task.query_labels is not None:
        kw["query_labels"] = np.asarray(task.query_labels)[r]
    if task.gnd is not None:
        kw["gnd"] = tuple(task.gnd[i] for i in r)
    return dataclasses.replace(task, **kw)


def truth_matrix(task: RetrievalTask, ranking: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(Q', K)`` bool: the result is a true match of the query (same label; revisitop:
    easy or hard). Missing results are False."""
    out = np.zeros(ranking.shape, bool)
    for n, q in enumerate(rows):
        r = ranking[n]
        ok = r >= 0
        if task.gnd is not None:
            pos = np.r_[task.gnd[q]["easy"], task.gnd[q]["hard"]].astype(np.int64)
            out[n, ok] = np.isin(r[ok], pos)
        else:
            assert task.gallery_labels is not None and task.query_labels is not None
            out[n, ok] = np.asarray(task.gallery_labels)[r[ok]] == task.query_labels[q]
    return out


def n_relevant(task: RetrievalTask, rows: np.ndarray) -> int:
    """True matches that exist for the queries ``rows`` (recall's denominator)."""
    tot = 0
    own = own_rows(task)
    for q in rows:
        if task.gnd is not None:
            tot += len(task.gnd[q]["easy"]) + len(task.gnd[q]["hard"])
        else:
            assert task.gallery_labels is not None and task.query_labels is not None
            n = int(np.sum(np.asarray(task.gallery_labels) == task.query_labels[q]))
            tot += n - (1 if own[q] >= 0 else 0)
    return tot


def local_count(f: LocalFeatures) -> int:
    return len(f)
