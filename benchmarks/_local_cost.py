"""Cost sections of bench_local.py: per-query cost, bytes per image, scale, extraction.

``cost``
    a gallery of every real image under ../shared/datasets (all data sets, ~11.4k
    images); 100 SMVS phone photos query it (their own image excluded). Per
    pipeline: ms per query at the benchmark's thread count, bytes per image of what
    the pipeline keeps in memory, and R@1 of the right cover among all those
    distractors.
``scale`` (synthetic, labelled so)
    ASMK: inverted files of 25k-100k synthetic images whose word counts and word
    frequencies are drawn from the real 11.4k SIFT index (random binary codes),
    queried with real query codes; CANN: the real IVF-PQ quantizer filled with
    synthetic descriptors (real descriptors + noise). Memory and ms/query are
    measured at each size and projected linearly to 1M images.
``extract``
    images/s of sift and xfeat at 1 and 2 threads (decoding workers = threads) on
    100 SMVS + 100 rparis250 images.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from galleria.cache import cache_dir
from galleria.eval.datasets import load_task
from galleria.eval.local import build_local_index
from galleria.eval.paths import datasets_root
from galleria.extract.embed import embed_items, extract_local_items
from galleria.extractors.registry import create_extractor
from galleria.fingerprint import digest, slug
from galleria.images.sources import SourceItem
from galleria.index.exact import ExactIndex
from galleria.io.atomic import write_npy
from galleria.local.cann import PRESETS
from galleria.local.features import PackedFeatures, load_packed, pack, save_packed
from galleria.search.pipelines import (
    GlobalPipeline,
    GlobalSVPipeline,
    LocalMDSPipeline,
    LocalPipeline,
    QueryBatch,
)
from galleria.threads import set_threads

log = logging.getLogger(__name__)
COST_SECTIONS = ("cost", "scale", "extract")
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp"}
N_QUERIES = 100


def all_images() -> list[Path]:
    root = datasets_root()
    assert root is not None
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.is_file())


def _all_features(paths: list[Path], local: str, threads: int) -> PackedFeatures:
    ext = create_extractor(local)
    key = digest([str(p) for p in paths], ext.fingerprint)
    folder = cache_dir("local-features") / f"all-{slug(ext.fingerprint)}-{key}"
    if (folder / "header.json").is_file():
        return load_packed(folder, fingerprint=ext.fingerprint)[0]
    t0 = time.perf_counter()
    feats = _from_task_caches(paths, ext)  # the quality section's per-task caches
    todo = [i for i, f in enumerate(feats) if f is None]
    print(f"{local}: {len(paths) - len(todo)} images from the task caches, {len(todo)} to "
          "extract", flush=True)
    items = [SourceItem(id=str(i), path=paths[i]) for i in todo]
    got, failures = extract_local_items(items, ext, workers=threads, batch_size=16)
    if failures:
        raise RuntimeError(f"{len(failures)} images failed: {failures[:3]}")
    for i, f in zip(todo, got, strict=True):
        feats[i] = f
    packed = pack(feats, dim=ext.dim)  # type: ignore[arg-type]
    save_packed(folder, packed, fingerprint=ext.fingerprint,
                extra={"key": key, "seconds": round(time.perf_counter() - t0, 1)})
    return packed


def _from_task_caches(paths: list[Path], ext: Any) -> list[Any]:
    """Features of ``paths`` found in the per-task caches of
    :func:`galleria.eval.local_features.task_local_features` (same extractor, whole
    image, no crop); ``None`` where no cache holds the image. A cache is used only when
    its key matches the task's image list (as that function checks)."""
    import ast
    import json

    from galleria.eval.embed import _items

    out: list[Any] = [None] * len(paths)
    want = {str(p): i for i, p in enumerate(paths)}
    for folder in sorted(cache_dir("local-features").glob(f"*-{slug(ext.fingerprint)}-*")):
        try:
            head = json.loads((folder / "header.json").read_text())
            items, _, _ = _items(load_task(head["task"]))
        except Exception:  # not a task cache, or its data set is not here
            continue
        ident = [(str(it.path), None if it.bbox is None else [float(v) for v in it.bbox])
                 for it in items]
        canon = sorted(set(map(repr, ident)))
        if head.get("key") != digest(canon, ext.fingerprint):
            continue
        feats = load_packed(folder, fingerprint=ext.fingerprint)[0].to_list()
        for row, c in enumerate(canon):
            path, bbox = ast.literal_eval(c)
            if bbox is None and path in want and out[want[path]] is None:
                out[want[path]] = feats[row]
    return out


def _all_vectors(paths: list[Path], threads: int) -> np.ndarray:
    ext = create_extractor("effnet-lite0")
    key = digest([str(p) for p in paths], ext.fingerprint)
    f = cache_dir("embeddings") / f"all-{slug(ext.fingerprint)}-{key}.npy"
    if f.is_file():
        return np.load(f)
    vecs = np.zeros((len(paths), ext.dim), np.float32)
    found = _vectors_from_task_caches(paths, ext, vecs)
    todo = np.flatnonzero(~found)
    print(f"effnet-lite0: {found.sum()} images from the task caches, {todo.size} to embed",
          flush=True)
    items = [SourceItem(id=str(i), path=paths[i]) for i in todo]
    if items:
        got, ok, failures = embed_items(items, ext, workers=threads)
        assert ok.all(), failures[:3]
        vecs[todo] = got
    write_npy(f, vecs)
    return vecs


def _vectors_from_task_caches(paths: list[Path], ext: Any, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` rows from :func:`galleria.eval.embed.task_embeddings` caches (same
    model, uncropped images, key checked as that function does) -> ``(N,)`` bool found."""
    from galleria.eval.embed import _items
    from galleria.io.atomic import read_json

    found = np.zeros(len(paths), bool)
    want = {str(p): i for i, p in enumerate(paths)}
    for head in sorted(cache_dir("embeddings").glob(f"*-{slug(ext.fingerprint)}-*.json")):
        try:
            meta = read_json(head)
            items, _, _ = _items(load_task(meta["task"]))
        except Exception:  # not a task cache, or its data set is not here
            continue
        if meta.get("fingerprint") != ext.fingerprint or meta.get("key") != digest(
                [(it.id, it.bbox) for it in items], ext.fingerprint):
            continue
        arr = np.load(head.with_suffix(".npy"))
        for row, it in enumerate(items):
            i = want.get(str(it.path))
            if it.bbox is None and i is not None and not found[i]:
                out[i], found[i] = arr[row], True
    return found


def _smvs_queries(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Rows (in ``paths``) of the first 100 SMVS phone photos, and every image's SMVS group
    (-1 outside SMVS)."""
    task = load_task("smvs")
    pos = {str(p): i for i, p in enumerate(paths)}
    group = np.full(len(paths), -1, np.int64)
    for p, g in zip(task.gallery_files(), task.gallery_labels, strict=True):
        group[pos[str(p)]] = int(g)
    rows = np.array([pos[str(p)] for p in task.query_files()[:N_QUERIES]], np.int64)
    return rows, group


def _timed(fn: Any, reps: int = 1) -> tuple[Any, float]:
    best, out = np.inf, None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _r1(res: Any, qrows: np.ndarray, group: np.ndarray) -> float:
    top = res.ids[:, 0]
    return float(100 * np.mean([group[t] == group[q] for t, q in zip(top, qrows, strict=True)]))


def run_cost(threads: int, locals_: tuple[str, ...] = ("sift", "xfeat")) -> dict[str, Any]:
    paths = all_images()
    n = len(paths)
    qrows, group = _smvs_queries(paths)
    vecs = _all_vectors(paths, threads)
    gidx = ExactIndex(vecs.shape[1])
    gidx.add(np.arange(n), vecs)
    out: dict[str, Any] = {"gallery_images": n, "queries": int(qrows.size), "rows": []}
    qvec = vecs[qrows]
    base = QueryBatch(vectors=qvec, exclude=qrows)
    res, sec = _timed(lambda: GlobalPipeline(gidx).search(base, 100), reps=3)
    out["rows"].append({"pipeline": "global", "local": None, "ms_per_query":
                        1000 * sec / qrows.size, "bytes_per_image": vecs.shape[1] * 4 + 8,
                        "R@1": _r1(res, qrows, group)})
    print("cost global", out["rows"][-1], flush=True)
    for local in locals_:
        packed = _all_features(paths, local, threads)
        ext = create_extractor(local)
        feats = packed.to_list()
        counts = packed.counts
        feat_bytes = float(np.mean(counts) * (16 + packed.descriptors.itemsize *
                                              packed.descriptors.shape[1]))
        out[f"{local}_keypoints_per_image"] = float(np.mean(counts))
        q = QueryBatch(vectors=qvec, local=[feats[int(r)] for r in qrows], exclude=qrows)
        ck = digest("all-images", n, counts.tolist())
        t0 = time.perf_counter()
        asmk = build_local_index("asmk", feats, dim=ext.dim, fingerprint=ext.fingerprint,
                                 cache_key=ck)
        t_asmk = time.perf_counter() - t0
        t0 = time.perf_counter()
        cann = build_local_index("cann", feats, dim=ext.dim, fingerprint=ext.fingerprint,
                                 params=dict(PRESETS[local]), cache_key=ck)
        t_cann = time.perf_counter() - t0
        out[f"{local}_indexes"] = {
            "asmk": {"params": asmk.params(), "build_or_load_s": round(t_asmk, 1),
                     "entries_per_image": float(sum(s.size for s in asmk._segs) / n),
                     "inverted_file_bytes_per_image": float(
                         sum(s.rows.nbytes + s.codes.nbytes for s in asmk._segs) / n)},
            "cann": {"params": cann.params(), "build_or_load_s": round(t_cann, 1)}}
        def fetch(keys: np.ndarray, f: list = feats) -> list:
            return [f[int(k)] for k in keys]

        pipes = [
            ("global+sv", GlobalSVPipeline(gidx, fetch), vecs.shape[1] * 4 + 8 + feat_bytes),
            ("local: ASMK", LocalPipeline(asmk), asmk.nbytes() / n),
            ("local: CANN", LocalPipeline(cann), cann.nbytes() / n),
            ("local+mds (ASMK)", LocalMDSPipeline(asmk), asmk.nbytes() / n),
            ("local+mds (ASMK), k=70 / 160", LocalMDSPipeline(asmk, k=70, candidates=160),
             asmk.nbytes() / n),
        ]
        for name, pipe, nbytes in pipes:
            nq = 20 if name.startswith("local+mds (ASMK)") and "k=" not in name else qrows.size
            sub = QueryBatch(vectors=qvec[:nq], local=q.local[:nq], exclude=qrows[:nq])
            res, sec = _timed(lambda p=pipe, s=sub: p.search(s, 100))
            row = {"pipeline": name, "local": local, "ms_per_query": 1000 * sec / nq,
                   "queries_timed": nq, "bytes_per_image": nbytes,
                   "R@1": _r1(res, qrows[:nq], group)}
            if hasattr(pipe, "params"):
                row["params"] = pipe.params()
            out["rows"].append(row)
            print("cost", local, row, flush=True)
    return out


def run_extract(threads: int) -> dict[str, Any]:
    del threads
    smvs = load_task("smvs").gallery_files()[:100]
    rp = load_task("rparis250").gallery_files()[:100]
    items = [SourceItem(id=str(i), path=p) for i, p in enumerate(smvs + rp)]
    rows = []
    for local in ("sift", "xfeat"):
        ext = create_extractor(local)
        extract_local_items(items[:8], ext, workers=1)  # warm-up
        for t in (1, 2):
            set_threads(t)
            _, sec = _timed(lambda e=ext, t=t: extract_local_items(items, e, workers=t,
                                                                   batch_size=16), reps=2)
            rows.append({"local": local, "threads": t, "images": len(items),
                         "images_per_s": round(len(items) / sec, 2)})
            print("extract", rows[-1], flush=True)
    return {"rows": rows, "images": "100 SMVS (640 px) + 100 rparis250 (1024 px)"}


def run_cost_section(section: str, *, threads: int,
                     locals_: tuple[str, ...] = ("sift", "xfeat")) -> dict[str, Any]:
    if section == "cost":
        return run_cost(threads, locals_)
    if section == "extract":
        out = run_extract(threads)
        set_threads(threads)
        return out
    from _local_scale import run_scale

    return run_scale(threads)


def cost_markdown(payload: dict[str, Any]) -> list[str]:
    md: list[str] = []
    c = payload.get("cost")
    if c:
        md += [f"## Cost per query on a gallery of every real image ({c['gallery_images']:,} "
               "images, all data sets)", "",
               f"{c['queries']} SMVS phone photos query the whole gallery (their own image "
               "excluded); ms/query at the benchmark's threads (see Machine: load), bytes per "
               "image of what the pipeline holds in memory (global+sv: the global vectors plus "
               "the stored local features it verifies; ASMK includes its codebook). R@1: the "
               "right cover first among all 11k images.", "",
               "| pipeline | local | ms/query | bytes/image | R@1 | params |",
               "|---|---|---|---|---|---|"]
        for r in c["rows"]:
            md.append(f"| {r['pipeline']} | {r['local'] or '-'} | {r['ms_per_query']:.1f} | "
                      f"{r['bytes_per_image']:,.0f} | {r['R@1']:.0f} | {r.get('params', '')} |")
        for local in ("sift", "xfeat"):
            ix = c.get(f"{local}_indexes")
            if ix:
                a = ix["asmk"]
                md.append(f"\n{local}: {c[f'{local}_keypoints_per_image']:.0f} keypoints per "
                          f"image; ASMK codebook {a['params']['codebook_size']} words, "
                          f"{a['entries_per_image']:.0f} entries / "
                          f"{a['inverted_file_bytes_per_image']:,.0f} inverted-file bytes per "
                          f"image; CANN {ix['cann']['params']['index']}.")
        md.append("")
    s = payload.get("scale")
    if s:
        from _local_scale import scale_markdown

        md += scale_markdown(s)
    e = payload.get("extract")
    if e:
        md += ["## Extraction speed", "", f"{e['images']}; decoding threads = threads.", "",
               "| local | threads | images/s |", "|---|---|---|"]
        md += [f"| {r['local']} | {r['threads']} | {r['images_per_s']} |" for r in e["rows"]]
        md.append("")
    return md
