"""Real base sets for the search benchmarks, and galleries grown from them.

Every search benchmark reads its vectors from here, so each run is reproducible
from the repository and ``../shared/datasets`` alone.

Real bases (built once, cached under ``benchmarks/out/base_sets/``, gitignored):

* ``lite2-1280``: EfficientNet-Lite2 GeM embeddings (1280-d, 260 px, galleria's
  own extractor, ``galleria.eval.embed.task_embeddings``) of every image of the
  shared Caltech-101 (8677, BACKGROUND_Google left out), SMVS DVD covers (500),
  RParis250 (250 photos + 12 query crops), UKBench56, COIL-20 (1000), ORL faces
  (400) and Oxford affine (48) sets; duplicate rows (queries that are gallery
  images) are dropped. About 11k real vectors.
* ``lopq-128``: the 5063 real ROxford5k LOPQ CNN descriptors (128-d,
  ``oxford5k_lopq128``), L2-normalised.

Grown galleries (``grown(kind, n)``, cached as ``.npy`` files that are memory
mapped on read): ``_common.RealDerived`` with ``seed=n``. 10 % of the real
vectors are held out as query seeds. A gallery vector is a Dirichlet(1, 1, 1)
convex combination of a random real vector and two of its 10 nearest real
neighbours, plus isotropic Gaussian jitter of norm 0.25 x the median real
nearest-neighbour distance, re-normalised: a point on the real data manifold
near real neighbours, not isotropic noise. A query is the same around a
held-out real vector with Dirichlet(4, 1, 1) weights. Tables label these rows
"grown from M real vectors".

    python benchmarks/build_base_sets.py                 # real bases only
    python benchmarks/build_base_sets.py --grow 100000 1000000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

log = logging.getLogger("build_base_sets")

OUT = Path(os.environ.get("GALLERIA_BENCH_OUT") or Path(__file__).resolve().parent / "out")
BASE_DIR = OUT / "base_sets"
FORMAT_VERSION = 1

#: tasks whose images make the 1280-d real base (every image of each, once)
LITE2_TASKS = ("caltech101", "smvs", "rparis250", "ukbench56", "coil20", "orl_faces",
               "oxford_affine")
LITE2_SIZE = 260
KINDS = ("lite2-1280", "lopq-128")


def _describe(kind: str, n_real: int) -> str:
    if kind == "lite2-1280":
        return (f"{n_real} real EfficientNet-Lite2 GeM 1280-d embeddings "
                f"(Caltech-101, SMVS, RParis250, UKBench56, COIL-20, ORL, Oxford affine)")
    return f"{n_real} real ROxford5k LOPQ 128-d descriptors"


def _build_lite2(root: Path | None) -> tuple[np.ndarray, dict[str, Any]]:
    from galleria.eval.datasets import load_task
    from galleria.eval.embed import task_embeddings
    from galleria.extractors.registry import create_extractor

    if root is not None:
        os.environ.setdefault("GALLERIA_DATASETS", str(root))
    ext = create_extractor("effnet-lite2", size=LITE2_SIZE)
    parts, counts = [], {}
    for name in LITE2_TASKS:
        t0 = time.perf_counter()
        task = load_task(name)
        q, g = task_embeddings(task, ext)
        v = np.unique(np.concatenate([g, q]).astype(np.float32), axis=0)
        parts.append(v)
        counts[name] = int(v.shape[0])
        log.info("%s: %d unique vectors (%.0f s)", name, v.shape[0], time.perf_counter() - t0)
    x = np.unique(np.concatenate(parts), axis=0)
    # a fixed order independent of np.unique's sort: a seeded permutation
    x = x[np.random.default_rng(0).permutation(x.shape[0])]
    return C.normalize(x), {"fingerprint": ext.fingerprint, "counts": counts,
                            "size": LITE2_SIZE}


def _build_lopq(root: Path) -> tuple[np.ndarray, dict[str, Any]]:
    x, _, _ = C.roxford_lopq(root)
    return C.normalize(x), {"source": "oxford5k_lopq128/oxford_features.fvecs"}


def real_base(kind: str, *, root: Path | None = None, rebuild: bool = False) -> np.ndarray:
    """The ``(M, D)`` float32 real base ``kind`` (built and cached on first use)."""
    from galleria.io.atomic import read_json, write_json, write_npy

    if kind not in KINDS:
        raise ValueError(f"unknown base set {kind!r}; known: {KINDS}")
    path, meta_path = BASE_DIR / f"real_{kind}.npy", BASE_DIR / f"real_{kind}.json"
    if not rebuild and path.is_file() and meta_path.is_file():
        meta = read_json(meta_path)
        if meta.get("format_version") == FORMAT_VERSION:
            return np.load(path)
    if root is None:
        from galleria.eval.paths import datasets_root

        root = datasets_root()
    t0 = time.perf_counter()
    x, info = _build_lite2(root) if kind == "lite2-1280" else _build_lopq(root)
    BASE_DIR.mkdir(parents=True, exist_ok=True)
    write_npy(path, x)
    write_json(meta_path, {"type": "bench-base-set", "format_version": FORMAT_VERSION,
                           "kind": kind, "shape": list(x.shape),
                           "build_s": time.perf_counter() - t0,
                           "description": _describe(kind, x.shape[0]), **info})
    log.info("built %s: %s in %.0f s", kind, x.shape, time.perf_counter() - t0)
    return x


def label(kind: str, n_real: int | None = None) -> str:
    """Table label of a gallery grown from base ``kind``."""
    if n_real is None:
        n_real = int(np.load(BASE_DIR / f"real_{kind}.npy", mmap_mode="r").shape[0])
    return f"grown from {n_real} real vectors ({_describe(kind, n_real)})"


def grown(kind: str, n: int, *, queries: int = 1000, root: Path | None = None,
          cache: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """``(gallery (n, D) memory-mapped, queries (Q, D), label)`` grown from base ``kind``.

    Deterministic (``RealDerived(base, seed=n)``); cached as
    ``grown_<kind>_<n>.npy`` + ``_q<Q>.npy`` next to the real base.
    """
    from galleria.io.atomic import write_npy

    base = real_base(kind, root=root)
    gpath = BASE_DIR / f"grown_{kind}_{n}.npy"
    qpath = BASE_DIR / f"grown_{kind}_{n}_q{queries}.npy"
    if cache and gpath.is_file() and qpath.is_file():
        return np.load(gpath, mmap_mode="r"), np.load(qpath), label(kind, base.shape[0])
    t0 = time.perf_counter()
    gen = C.RealDerived(base, seed=n)
    BASE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = gpath.with_suffix(f".tmp{os.getpid()}.npy")
    x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, base.shape[1]))
    gen.gallery(n, out=x)
    q = gen.queries(queries)
    x.flush()
    del x
    os.replace(tmp, gpath)
    write_npy(qpath, q)
    log.info("grew %s to %d in %.0f s", kind, n, time.perf_counter() - t0)
    return np.load(gpath, mmap_mode="r"), q, label(kind, base.shape[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--grow", type=int, nargs="*", default=[], help="gallery sizes to grow")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--rebuild", action="store_true", help="re-embed the real base")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--datasets", type=Path, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    C.set_threads(a.threads)
    for kind in a.kinds:
        x = real_base(kind, root=a.datasets, rebuild=a.rebuild)
        print(f"{kind}: {x.shape} -> {BASE_DIR / f'real_{kind}.npy'}")
        for n in a.grow:
            g, _, lab = grown(kind, n, queries=a.queries, root=a.datasets)
            print(f"  {n}: {g.shape} ({lab})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
