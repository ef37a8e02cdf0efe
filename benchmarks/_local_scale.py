"""Synthetic scale projection of the local indexes to 1M images (bench_local ``scale``).

Everything here is SYNTHETIC and labelled so in the results:

- ASMK: N synthetic images, each with a word count drawn from the real 11.4k-image
  SIFT index and words drawn from its real word frequencies, with random binary
  codes, added with ``AsmkIndex.add_encoded`` to an index holding the real
  codebook. Queried with the real codes of SMVS phone photos, so each query
  touches the lists a real query touches, at N images' length.
- CANN: the real trained IVF-PQ quantizer filled with N x 1000 synthetic
  descriptors (real SIFT descriptors + Gaussian noise, re-normalised).

Memory (``nbytes``) and ms/query are measured at several N and fitted by a line;
the 1M-image value is that line's extrapolation (a projection, not a measurement).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from _local_cost import _all_features, _smvs_queries, all_images
from galleria.eval.local import build_local_index
from galleria.extractors.registry import create_extractor
from galleria.fingerprint import digest
from galleria.local.asmk import AsmkIndex
from galleria.local.cann import ID_SHIFT, PRESETS, CannIndex
from galleria.local.features import float_descriptors
from galleria.local.kernels import code_words

ASMK_SIZES = (25_000, 50_000, 100_000)
CANN_DESCRIPTORS = (5_000_000, 10_000_000)
TARGET = 1_000_000


def _fit(ns: list[int], ys: list[float]) -> tuple[float, float]:
    a, b = np.polyfit(np.asarray(ns, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def _asmk_scale(real: AsmkIndex, queries: list, rng: np.random.Generator) -> dict[str, Any]:
    nw = int(real.codebook_size)
    freq = np.zeros(nw)
    for s in real._segs:
        freq += np.diff(s.offsets)
    prob = freq / freq.sum()
    counts = real._nwords[real._rows.alive()]
    cw = code_words(real.dim)
    idx = AsmkIndex(real.dim, codebook_size=nw, multiple_assignment=real.multiple_assignment,
                    quantizer=real.quantizer)
    assert real.centroids_ is not None
    idx._set_codebook(real.centroids_)
    qcodes = [idx.query_codes(q) for q in queries]  # real query codes
    rows, added = [], 0
    for target in ASMK_SIZES:
        while added < target:
            m = min(20_000, target - added)
            enc = []
            for c in rng.choice(counts, m):
                w = np.unique(rng.choice(nw, int(c), p=prob))
                enc.append((w.astype(np.int64), rng.integers(0, 2**63, (w.size, cw),
                                                             dtype=np.uint64)))
            idx.add_encoded(np.arange(added, added + m), enc)
            added += m
        t0 = time.perf_counter()
        for qw, qc in qcodes:
            sc = np.zeros(idx._rows.capacity)
            for seg in idx._segs:
                idx._accumulate(seg, qw, qc, sc)
            np.argpartition(-sc, 100)[:100]
        ms = 1000 * (time.perf_counter() - t0) / len(qcodes)
        rows.append({"images": target, "bytes": idx.nbytes(), "ms_per_query_scoring": ms})
        print("scale asmk", rows[-1], flush=True)
    return {"rows": rows}


def _cann_scale(real: CannIndex, pool: np.ndarray, queries: list,
                rng: np.random.Generator) -> dict[str, Any]:
    import faiss

    base = faiss.clone_index(real._faiss)
    base.reset()  # trained coarse quantizer + PQ, no vectors
    rows, added = [], 0
    for target in CANN_DESCRIPTORS:
        while added < target:
            m = min(1_000_000, target - added)
            x = pool[rng.integers(0, pool.shape[0], m)]
            x = x + rng.normal(0, 0.05, x.shape).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            ids = np.arange(added, added + m, dtype=np.int64)
            base.add_with_ids(x, (ids // 1000 << ID_SHIFT) + ids % 1000)
            added += m
        params = faiss.SearchParametersIVF(nprobe=real.nprobe)
        t0 = time.perf_counter()
        for q in queries:
            base.search(float_descriptors(q.descriptors), real.knn, params=params)
        ms = 1000 * (time.perf_counter() - t0) / len(queries)
        nbytes = int(faiss.serialize_index(base).nbytes)
        rows.append({"descriptors": target, "images_at_1000": target // 1000,
                     "bytes": nbytes, "ms_per_query_knn": ms})
        print("scale cann", rows[-1], flush=True)
    del base
    return {"rows": rows, "nlist": int(faiss.extract_index_ivf(real._faiss).nlist),
            "nprobe": real.nprobe}


def run_scale(threads: int) -> dict[str, Any]:
    del threads
    paths = all_images()
    qrows, _ = _smvs_queries(paths)
    packed = _all_features(paths, "sift", 2)
    feats = packed.to_list()
    ext = create_extractor("sift")
    ck = digest("all-images", len(paths), packed.counts.tolist())
    asmk = build_local_index("asmk", feats, dim=ext.dim, fingerprint=ext.fingerprint,
                             cache_key=ck)
    cann = build_local_index("cann", feats, dim=ext.dim, fingerprint=ext.fingerprint,
                             params=dict(PRESETS["sift"]), cache_key=ck)
    rng = np.random.default_rng(0)
    queries = [feats[int(r)] for r in qrows[:20]]
    a = _asmk_scale(asmk, queries, rng)  # type: ignore[arg-type]
    ns = [r["images"] for r in a["rows"]]
    ka, kb = _fit(ns, [r["bytes"] for r in a["rows"]])
    ta, tb = _fit(ns, [r["ms_per_query_scoring"] for r in a["rows"]])
    a["projection_1M"] = {"bytes": ka * TARGET + kb, "ms_per_query_scoring": ta * TARGET + tb}
    pool = float_descriptors(packed.descriptors[rng.integers(0, packed.descriptors.shape[0],
                                                             1_000_000)])
    c = _cann_scale(cann, pool, queries, rng)  # type: ignore[arg-type]
    ns = [r["descriptors"] for r in c["rows"]]
    ka, kb = _fit(ns, [r["bytes"] for r in c["rows"]])
    ta, tb = _fit(ns, [r["ms_per_query_knn"] for r in c["rows"]])
    c["projection_1M"] = {"descriptors": TARGET * 1000, "bytes": ka * TARGET * 1000 + kb,
                          "ms_per_query_knn_same_nlist": ta * TARGET * 1000 + tb}
    return {"synthetic": True, "asmk": a, "cann": c,
            "note": "SYNTHETIC: real codebook / quantizer and real queries, synthetic "
                    "gallery codes / descriptors; the 1M values are linear projections"}


def scale_markdown(s: dict[str, Any]) -> list[str]:
    md = ["## Scale projection to 1M images (SYNTHETIC gallery data)", "", s["note"] + ".", "",
          "| index | gallery (synthetic) | memory | ms/query |", "|---|---|---|---|"]
    for r in s["asmk"]["rows"]:
        md.append(f"| ASMK (scoring) | {r['images']:,} images | {r['bytes'] / 2**20:,.0f} MiB | "
                  f"{r['ms_per_query_scoring']:.0f} |")
    p = s["asmk"]["projection_1M"]
    md.append(f"| ASMK, projected | 1,000,000 images | {p['bytes'] / 2**30:,.1f} GiB | "
              f"{p['ms_per_query_scoring']:.0f} |")
    for r in s["cann"]["rows"]:
        md.append(f"| CANN IVF-PQ (k-NN) | {r['descriptors']:,} descriptors "
                  f"(~{r['images_at_1000']:,} images) | {r['bytes'] / 2**20:,.0f} MiB | "
                  f"{r['ms_per_query_knn']:.0f} |")
    p = s["cann"]["projection_1M"]
    md.append(f"| CANN, projected (nlist {s['cann']['nlist']}) | 1,000,000 images (1e9 "
              f"descriptors) | {p['bytes'] / 2**30:,.1f} GiB | "
              f"{p['ms_per_query_knn_same_nlist']:.0f} |")
    md.append("")
    return md
