"""Thread counts, chosen at entry points only (CLI, benchmarks, services).

:func:`set_threads` sets torch's intra-op pool, FAISS's OpenMP pool, OpenCV's
pool (when installed) and every OpenBLAS loaded in the process (numpy's own
included) to ``n`` threads.
Library code never calls it (nor anything else that changes process-wide thread
settings: the kernels use the BLAS with whatever thread count the entry point
chose). OpenBLAS's ``openblas_set_num_threads_local``
is no alternative in the pthreads build numpy bundles: it calls the global
``openblas_set_num_threads`` (driver/others/openblas_set_num_threads.c).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any


def _loaded_openblas() -> list[str]:
    libs = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.split()[-1] if "/" in line else ""
                if "openblas" in os.path.basename(path).lower() and path not in libs:
                    libs.append(path)
    except OSError:
        pass
    return libs


_BLAS_FNS: list[tuple[str, Any, Any]] | None = None


def _blas_fns() -> list[tuple[str, Any, Any]]:
    """(path, set_num_threads, get_num_threads) of every loaded OpenBLAS, looked up once."""
    global _BLAS_FNS
    if _BLAS_FNS is None:
        fns = []
        for path in _loaded_openblas():
            try:
                lib: Any = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""),
                                   ("openblas_", "64_"), ("openblas_", "")):
                setter = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    fns.append((path, setter, getter))
                    break
        _BLAS_FNS = fns
    return _BLAS_FNS


def set_threads(n: int | None = None) -> int:
    """Use ``n`` compute threads (default ``$GALLERIA_THREADS`` or all cores); returns n."""
    n = n or int(os.environ.get("GALLERIA_THREADS", "0")) or (os.cpu_count() or 1)
    try:
        import torch  # lazy: torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    try:
        import faiss  # lazy: faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    try:  # OpenCV's own pool (SIFT, findHomography); only when OpenCV is installed
        import cv2  # lazy: cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass
    import numpy  # noqa: F401  (load numpy's OpenBLAS so it is found below)

    global _BLAS_FNS
    _BLAS_FNS = None  # pick up libraries loaded since the last call
    for _, setter, _ in _blas_fns():
        setter(ctypes.c_int(n))
    return n
