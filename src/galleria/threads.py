"""Thread counts, chosen at entry points only (CLI, benchmarks, services).

:func:`set_threads` sets torch's intra-op pool, FAISS's OpenMP pool and every
OpenBLAS loaded in the process (numpy's own included) to ``n`` threads.
Library code never calls it.
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


def set_threads(n: int | None = None) -> int:
    """Use ``n`` compute threads (default ``$GALLERIA_THREADS`` or all cores); returns n."""
    n = n or int(os.environ.get("GALLERIA_THREADS", "0")) or (os.cpu_count() or 1)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass
    import numpy  # noqa: F401  (load numpy's OpenBLAS so it is found below)

    for path in _loaded_openblas():
        try:
            lib: Any = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                    "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                break
    return n
