"""Shared benchmark helpers: threads, machine info, memory, timing, real data, result files.

Results go to ``benchmarks/results/<name>.json`` and ``<name>.md`` (written
atomically), each with the machine they were measured on.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import math
import os
import platform
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# -- threads -------------------------------------------------------------------------


def _loaded_openblas() -> list[str]:
    libs = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.rsplit(" ", 1)[-1].strip()
                if "openblas" in os.path.basename(path).lower() and path not in libs:
                    libs.append(path)
    except OSError:
        pass
    return libs


def set_threads(n: int) -> dict[str, Any]:
    """Use ``n`` threads in FAISS (OpenMP), torch and every loaded OpenBLAS (numpy's too)."""
    done: dict[str, Any] = {}
    import faiss

    faiss.omp_set_num_threads(n)
    done["faiss_omp"] = faiss.omp_get_max_threads()
    try:
        import torch

        torch.set_num_threads(n)
        done["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    blas = []
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in (
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                blas.append(os.path.basename(path))
                break
    done["openblas"] = blas
    return done


# -- machine ---------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Date, CPU, cores, memory, library versions and load average of this machine."""
    import faiss

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gb": _mem_total_gb(),
        "threads": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "load_average_at_start": os.getloadavg(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    try:
        cfg = np.show_config(mode="dicts")  # type: ignore[call-arg]
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older numpy
        info["numpy_blas"] = None
    return info


# -- memory ----------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    """Current resident set size (MB)."""
    return _status_kb("VmRSS") / 1024


def anon_mb() -> float:
    """Current anonymous resident memory (MB): heap and arrays, not mapped files."""
    return _status_kb("RssAnon") / 1024


def peak_rss_mb() -> float:
    """Peak RSS of the whole process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryMonitor:
    """Samples anonymous RSS every ``interval`` s in a thread; reports what a phase added.

    ``peak_mb``: highest anonymous RSS during the phase minus the value at its
    start (transient buffers included); ``held_mb``: what is still held at the
    end (e.g. the index). Anonymous RSS leaves out memory-mapped input files.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self.held_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> MemoryMonitor:
        self._base = anon_mb()
        self._max = self._base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, anon_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        end = anon_mb()
        self._max = max(self._max, end)
        self.peak_mb = self._max - self._base
        self.held_mb = end - self._base


# -- timing ----------------------------------------------------------------------------


def interleaved_best(
    units: dict[str, Callable[[], object]], *, rounds: int, min_unit_s: float = 0.25
) -> dict[str, dict[str, float]]:
    """Best seconds per call of each unit, measured in interleaved rounds.

    Each round runs every unit once in turn (``A B A B ...``), so a burst of
    load from other processes hits all of them alike; the minimum over rounds
    is reported, on two clocks: ``wall`` (elapsed) and ``cpu`` (CPU time of
    this process, all threads). On a shared machine the CPU clock is the
    robust one for single-threaded work (it does not count time spent
    descheduled); for multi-threaded work it also counts spin-waiting threads.
    A unit faster than ``min_unit_s`` is repeated within a round.
    """
    reps = {}
    for name, fn in units.items():  # warm-up and calibration
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        reps[name] = max(1, math.ceil(min_unit_s / max(dt, 1e-6)))
    best = {name: {"wall": math.inf, "cpu": math.inf} for name in units}
    for _ in range(rounds):
        for name, fn in units.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(reps[name]):
                fn()
            wall = (time.perf_counter() - t0) / reps[name]
            cpu = (time.process_time() - c0) / reps[name]
            best[name]["wall"] = min(best[name]["wall"], wall)
            best[name]["cpu"] = min(best[name]["cpu"], cpu)
    return best


# -- data ------------------------------------------------------------------------------


def load_fvecs(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a ``.fvecs`` file (per row: int32 dim, then dim float32 values) -> ``(N, D)``."""
    raw = np.fromfile(path, dtype=np.int32)
    if raw.size == 0:
        raise ValueError(f"{path} is empty")
    d = int(raw[0])
    rows = raw.reshape(-1, d + 1)
    if not (rows[:, 0] == d).all():
        raise ValueError(f"{path}: rows of different dimension")
    return rows[:, 1:].copy().view(np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def knn_graph(x: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``x``: indices into ``pool`` of its ``k`` nearest rows (self excluded
    when ``x`` is ``pool``) and the distance to the nearest one."""
    s = x @ pool.T
    if x is pool:
        np.fill_diagonal(s, -np.inf)
    nn = np.argpartition(-s, k, axis=1)[:, :k]
    best = np.take_along_axis(s, nn, 1).max(axis=1)
    return nn, np.sqrt(np.maximum(2 - 2 * best, 0))


class RealDerived:
    """Grow N vectors from a real base, real-derived rather than isotropic noise.

    Base: ``(M, d0)`` real descriptors, L2-normalised; 10 % are held out as query
    seeds, the rest are gallery seeds. A gallery vector is a Dirichlet(1, 1, 1)
    convex combination of a random gallery seed and two of its 10 nearest
    gallery seeds (a point on the real data manifold, in the low-dimensional
    span of real neighbours), plus isotropic Gaussian jitter whose norm is
    ``jitter`` x the median real nearest-neighbour distance, re-normalised.
    A query is the same with a held-out seed and Dirichlet(4, 1, 1) weights (it
    stays near its held-out real vector). With ``lift_to`` > d0 the vectors
    are mapped by a fixed random orthonormal ``d0 -> lift_to`` embedding (plus
    the same relative jitter in the full space): the fallback for 1280-d when
    no real 1280-d base is given; intrinsic structure stays that of the base.
    """

    def __init__(
        self,
        base: np.ndarray,
        *,
        seed: int = 0,
        neighbours: int = 10,
        jitter: float = 0.25,
        lift_to: int | None = None,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        base = normalize(base)
        m = base.shape[0]
        perm = self.rng.permutation(m)
        n_hold = max(1, m // 10)
        self.hold = base[perm[:n_hold]]
        self.pool = np.ascontiguousarray(base[perm[n_hold:]])
        self.nn, nn_dist = knn_graph(self.pool, self.pool, neighbours)
        self.hold_nn, _ = knn_graph(self.hold, self.pool, neighbours)
        self.delta = float(np.median(nn_dist))
        self.jitter = jitter
        d0 = base.shape[1]
        self.dim = lift_to or d0
        self.lift = None
        if lift_to and lift_to != d0:
            g = self.rng.standard_normal((lift_to, d0))
            q, _ = np.linalg.qr(g)  # (lift_to, d0), orthonormal columns
            self.lift = np.ascontiguousarray(q.T, dtype=np.float32)  # (d0, lift_to)

    def _make(self, seeds: np.ndarray, nn: np.ndarray, seed_vecs: np.ndarray, alpha) -> np.ndarray:
        n = seeds.size
        pick = nn[seeds][np.arange(n)[:, None], self.rng.integers(0, nn.shape[1], (n, 2))]
        w = self.rng.dirichlet(alpha, n).astype(np.float32)
        v = w[:, :1] * seed_vecs
        v += w[:, 1:2] * self.pool[pick[:, 0]] + w[:, 2:] * self.pool[pick[:, 1]]
        d0 = v.shape[1]
        v += self.rng.standard_normal(v.shape, dtype=np.float32) * (
            self.jitter * self.delta / math.sqrt(d0)
        )
        if self.lift is not None:
            v = v @ self.lift
            v += self.rng.standard_normal(v.shape, dtype=np.float32) * (
                self.jitter * self.delta / math.sqrt(self.dim)
            )
        return normalize(v)

    def gallery(self, n: int, out: np.ndarray | None = None, chunk: int = 65536) -> np.ndarray:
        out = np.empty((n, self.dim), np.float32) if out is None else out
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            seeds = self.rng.integers(0, self.pool.shape[0], c1 - c0)
            out[c0:c1] = self._make(seeds, self.nn, self.pool[seeds], (1.0, 1.0, 1.0))
        return out

    def queries(self, n: int) -> np.ndarray:
        seeds = self.rng.integers(0, self.hold.shape[0], n)
        return self._make(seeds, self.hold_nn, self.hold[seeds], (4.0, 1.0, 1.0))


def roxford_lopq(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real ROxford5k LOPQ descriptors: ``(X (5063, 128), query rows, gallery rows)``.

    Rows follow ``order.txt``; query rows are the 70 ``qimlist`` names of the
    official ``gnd_roxford5k.pkl``, gallery rows the 4993 others.
    """
    import pickle  # the official revisitop ground truth is a pickle (read-only data)

    x = load_fvecs(root / "oxford5k_lopq128" / "oxford_features.fvecs")
    order = (root / "oxford5k_lopq128" / "order.txt").read_text().split()
    with open(root / "revisitop" / "gnd_roxford5k.pkl", "rb") as fh:
        gnd = pickle.load(fh)
    pos = {name: i for i, name in enumerate(order)}
    qrows = np.array([pos[q] for q in gnd["qimlist"]], np.int64)
    grows = np.setdiff1d(np.arange(len(order)), qrows)
    return x, qrows, grows


# -- results ---------------------------------------------------------------------------


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table from a header and rows of cells (cells are str()-ed)."""
    out = ["| " + " | ".join(str(h) for h in header) + " |"]
    out.append("|" + "|".join("---" for _ in header) + "|")
    out += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def md_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table; ``columns`` = ``[(key, header)]``; floats to 3 significant digits."""

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    out = ["| " + " | ".join(h for _, h in columns) + " |"]
    out.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(key)) for key, _ in columns) + " |")
    return "\n".join(out) + "\n"


def write_results(
    name: str, payload: dict[str, Any], markdown: str, *, results_dir: Path | None = None
) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md`` atomically.

    ``results_dir`` (default ``benchmarks/results``; env ``GALLERIA_BENCH_RESULTS``)
    is where they go.
    """
    from galleria.io.atomic import write_bytes, write_json

    out = Path(results_dir or os.environ.get("GALLERIA_BENCH_RESULTS") or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "peak_rss_mb_process": round(peak_rss_mb(), 1)}
    jpath = out / f"{name}.json"
    mpath = out / f"{name}.md"
    write_json(jpath, payload)
    write_bytes(mpath, markdown.encode())
    return jpath, mpath


def machine_md(info: dict[str, Any]) -> str:
    keys = ["date", "cpu", "cores", "threads", "mem_total_gb", "numpy", "numpy_blas", "torch",
            "faiss", "python", "load_average_at_start", "load_average_at_end"]
    return "\n".join(f"- {k}: {info.get(k)}" for k in keys if k in info) + "\n"
