"""Cost section of bench_tune.py: tuning time, query latency of the default, record size.

Two galleries, features already extracted (as after ``galleria index``):

* the 500 SMVS images (``smvs`` row of bench_tune, effnet-lite0 + SIFT);
* every real image under ../shared/datasets (11,398 images; the features come from
  bench_local's ``all-*`` caches, built from the per-task caches), put into a real
  galleria gallery once (``benchmarks/out/tune/galleries/all``).

Each is tuned from scratch (``tune_gallery``: pseudo-query views, their embedding
in each space, every candidate's search, the equivalents check), timed at 2
threads (the benchmark's ``--threads``) with the load average printed beside it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from _local_cost import _all_features, _all_vectors, all_images
from _tune_rows import OUT, load_row_task, task_data, task_gallery
from galleria.extract.spaces import space_info
from galleria.extractors.registry import create_extractor
from galleria.io.atomic import write_json
from galleria.store.gallery import Gallery
from galleria.threads import set_threads
from galleria.tune.tuner import TuneConfig, tune_gallery

TUNE_DIR = OUT / "tune"
ALL_IMAGES = 11_398


def all_gallery(threads: int) -> Gallery:
    """The gallery of every shared image (ids ``a00000``...), built once."""
    folder = TUNE_DIR / "galleries" / "all"
    if (folder / "built.json").is_file():
        return Gallery.open(folder)
    paths = all_images()
    vecs = _all_vectors(paths, threads)
    feats = _all_features(paths, "sift", threads).to_list()
    gext, lext = create_extractor("effnet-lite0"), create_extractor("sift")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    g = Gallery.open_or_create(folder)
    ids = [f"a{i:05d}" for i in range(len(paths))]
    meta = [{"path": str(p.resolve())} for p in paths]
    t0 = time.perf_counter()
    for ext, kind in ((gext, "global"), (lext, "local")):
        g.register_space(ext.fingerprint, ext.dim, space_info(ext), kind=kind)
    for i in range(0, len(ids), 2048):
        sl = slice(i, i + 2048)
        g.add(ids[sl], vecs[sl], space=gext.fingerprint, meta=meta[sl])
        g.add_local(ids[sl], feats[sl], space=lext.fingerprint, meta=meta[sl])
    for sp in (gext.fingerprint, lext.fingerprint):
        g.compact(sp)
        g.save_index(sp)
    write_json(folder / "built.json", {"items": len(ids),
                                       "seconds": round(time.perf_counter() - t0, 1)})
    return g


def _bytes_per_item(g: Gallery, items: int) -> dict[str, Any]:
    """Bytes on disk per item: the whole gallery folder (database, vectors, local
    features, saved indexes) and its parts by top-level entry."""
    parts: dict[str, int] = {}
    for p in g.path.rglob("*"):
        if p.is_file():
            top = p.relative_to(g.path).parts[0]
            parts[top] = parts.get(top, 0) + p.stat().st_size
    total = sum(parts.values())
    return {"total": round(total / max(items, 1)),
            "parts": {k: round(v / max(items, 1)) for k, v in sorted(parts.items())}}


def _timed_tune(g: Gallery, n: int, seed: int) -> dict[str, Any]:
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    rec = tune_gallery(g, TuneConfig(n=n, seed=seed))
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    chosen = next(c for c in rec["candidates"] if c["key"] == rec["key"])
    return {"items": rec["state"]["items"], "tune_seconds": round(sec, 1),
            "tune_cpu_seconds": round(cpu, 1),
            "pseudo_queries": rec["queries"], "chosen": rec["key"], "reason": rec["reason"],
            "chosen_ms_per_query": chosen["ms_per_query"],
            "chosen_search_ms": chosen["search_ms"], "chosen_embed_ms": chosen["embed_ms"],
            "chosen_pseudo": {k: chosen.get(k) for k in ("r1", "r10", "mrr")},
            "candidates": {c["key"]: {"search_ms": c.get("search_ms"),
                                      "embed_ms": c.get("embed_ms"), "mrr": c.get("mrr"),
                                      "error": c.get("error")}
                           for c in rec["candidates"]},
            "equivalents": rec["equivalents"],
            "record_bytes": len(json.dumps(rec)),
            "gallery_bytes_per_item": _bytes_per_item(g, rec["state"]["items"]),
            "load_average_before": load0, "load_average_after": os.getloadavg()}


def complete(path: Path) -> bool:
    """A gallery at ``path`` whose every space holds every item and has a saved index (a
    finished index run)."""
    if not (path / "gallery.sqlite").is_file():
        return False
    with Gallery.open(path, readonly=True) as g:
        st = g.state()
        counts = [s.count for s in st.spaces]
    saved = [d for d in (path / "indexes").iterdir() if d.is_dir()]
    every_index = len(saved) >= 2 and all(any(d.iterdir()) for d in saved)
    return len(counts) >= 2 and min(counts) >= ALL_IMAGES and every_index


def run_cost(n: int, seed: int, threads: int = 2, all_path: Path | None = None,
             which: tuple[str, ...] = ("smvs_500", "all_images"), previous: dict | None = None
             ) -> dict[str, Any]:
    """Tuning time (default mode) of the 500-image SMVS gallery and of the 11.4k gallery.

    ``all_path``: an existing, complete gallery of every shared image (e.g. one built by
    ``galleria index``), opened read-only; ``None``: the gallery built by
    :func:`all_gallery` (hours of extraction on a cold cache).
    """
    set_threads(threads)
    out: dict[str, Any] = {**(previous or {}), "threads": threads, "n": n, "seed": seed}
    if "smvs_500" in which:
        task = load_row_task("smvs")
        g500 = task_gallery(task, TUNE_DIR / "galleries" / "smvs", task_data(task))
        out["smvs_500"] = _timed_tune(g500, n, seed)
        print("cost smvs 500", out["smvs_500"], flush=True)
    if "all_images" not in which:
        pass
    elif all_path is not None:
        if complete(all_path):
            with Gallery.open(all_path, readonly=True) as g_all:
                out["all_images"] = {**_timed_tune(g_all, n, seed), "gallery": str(all_path)}
        else:
            out["all_images"] = {"gallery": str(all_path),
                                 "error": "not a complete gallery of every shared image yet"}
    else:
        out["all_images"] = _timed_tune(all_gallery(threads), n, seed)
    if "all_images" in out:
        print("cost all", out["all_images"], flush=True)
    out["note"] = ("tune_seconds: from scratch in the default mode (pseudo-query views of a "
                   "fixed seeded sample, their embedding in each space, the default pipeline's "
                   "search, equivalents, calibration), features of the gallery already "
                   "extracted")
    return out
