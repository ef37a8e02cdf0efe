"""Retrieval tasks on the shared data sets (and on a user's own CSV manifest).

A :class:`RetrievalTask` says *what* to compare with *what* and how to score
it: the gallery and query images (paths relative to ``root``), crop boxes for
the queries, which gallery item a query is (for leave-one-out protocols), the
labels or official ground truth, and :meth:`RetrievalTask.evaluate` for a
``(Q, G)`` score matrix. Turning images into embeddings is the extraction
side's job; :mod:`galleria.eval.protocols` glues the two.

Data sets are found through :mod:`galleria.eval.paths`; a missing folder or
file raises :class:`~galleria.errors.DatasetMissingError` naming it. The
official revisitop ground truth is a pickle of plain lists; it is read with an
unpickler that refuses every class except a few numpy/builtins constructors.

Tasks (see :data:`TASKS`): ``roxford5k-lopq``, ``rparis250``, ``smvs``,
``smvs-ref``, ``ukbench56``, ``caltech101``, ``coil20``, ``orl_faces``,
``oxford_affine``; :func:`manifest_task` builds one from any CSV.
"""

from __future__ import annotations

import csv
import io
import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import DatasetMissingError, FormatError, InputError
from galleria.eval.metrics import DEFAULT_METRICS, retrieval_metrics, revisitop_evaluate
from galleria.eval.paths import dataset_dir
from galleria.types import SearchResult
from galleria.validate import l2_normalize

logger = logging.getLogger(__name__)

PROTOCOLS = ("revisitop", "instance", "class", "ukbench")
CLASS_METRICS: tuple[str, ...] = ("mAP@R", "mAP@100", "R@1", "R@5", "R@10")
BBox = tuple[float, float, float, float]


@dataclass(frozen=True, eq=False)
class RetrievalTask:
    """One retrieval benchmark: queries, gallery, ground truth and its metrics.

    Attributes:
        name: task name (a key of :data:`TASKS`, or the CSV stem).
        root: folder the paths are relative to.
        gallery_paths: ``G`` gallery items, relative to ``root`` (absolute paths
            stay absolute). They are the item ids. For descriptor-only tasks
            (``roxford5k-lopq``) they are image names without a file.
        query_paths: ``Q`` query items, same convention.
        query_gallery_index: ``(Q,)`` int64, the gallery index of each query's
            own image, ``-1`` when the query is not a gallery item. An extractor
            may reuse that gallery embedding for the query.
        protocol: ``"revisitop"``, ``"instance"``, ``"class"`` or ``"ukbench"``.
        query_bbx: ``Q`` crop boxes ``(x1, y1, x2, y2)`` in original-image pixels
            (revisitop queries), or ``None`` for full-image queries.
        query_labels: ``(Q,)`` labels (label protocols), else ``None``.
        gallery_labels: ``(G,)`` labels (label protocols), else ``None``.
        gnd: official ground truth (revisitop): per query a dict of int64 gallery
            indices ``"easy"``, ``"hard"``, ``"junk"``; else ``None``.
        metrics: metric names reported by :meth:`evaluate` (label protocols).
        exclude_self: remove a query's own gallery item (``query_gallery_index``)
            from its ranking; ``False`` for UKBench, whose score counts it.
        description: one line for listings.
        vectors_loader: returns precomputed ``(gallery, queries)`` descriptors,
            for descriptor-level tasks; see :meth:`vectors`.
    """

    name: str
    root: Path
    gallery_paths: list[str]
    query_paths: list[str]
    query_gallery_index: np.ndarray
    protocol: str
    query_bbx: list[BBox] | None = None
    query_labels: np.ndarray | None = None
    gallery_labels: np.ndarray | None = None
    gnd: tuple[dict[str, np.ndarray], ...] | None = None
    metrics: tuple[str, ...] = DEFAULT_METRICS
    exclude_self: bool = True
    description: str = ""
    vectors_loader: Callable[[], tuple[np.ndarray, np.ndarray]] | None = field(
        default=None, repr=False
    )

    def __post_init__(self) -> None:
        q, g = len(self.query_paths), len(self.gallery_paths)
        if self.protocol not in PROTOCOLS:
            raise InputError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if q == 0 or g == 0:
            raise InputError(f"task {self.name!r} has {q} queries and {g} gallery items")
        qgi = np.asarray(self.query_gallery_index)
        if qgi.shape != (q,) or not np.issubdtype(qgi.dtype, np.integer):
            raise InputError(f"query_gallery_index must be a ({q},) int array, got {qgi.shape}")
        if self.query_bbx is not None and len(self.query_bbx) != q:
            raise InputError(f"{len(self.query_bbx)} query boxes for {q} queries")
        if self.protocol == "revisitop":
            if self.gnd is None or len(self.gnd) != q:
                raise InputError("a revisitop task needs one gnd entry per query")
        else:
            ql, gl = self.query_labels, self.gallery_labels
            if ql is None or gl is None or len(ql) != q or len(gl) != g:
                raise InputError(f"a {self.protocol} task needs (Q,) and (G,) labels")

    @property
    def num_queries(self) -> int:
        return len(self.query_paths)

    @property
    def num_gallery(self) -> int:
        return len(self.gallery_paths)

    def gallery_files(self) -> list[Path]:
        """Absolute paths of the gallery items."""
        return [self.root / p for p in self.gallery_paths]

    def query_files(self) -> list[Path]:
        """Absolute paths of the query items."""
        return [self.root / p for p in self.query_paths]

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Precomputed ``(gallery (G, D), queries (Q, D))`` float32 descriptors.

        Only descriptor-level tasks (``roxford5k-lopq``) have them; other tasks
        raise :class:`InputError` (extract embeddings from the images instead).
        """
        if self.vectors_loader is None:
            raise InputError(
                f"task {self.name!r} has no precomputed descriptors; "
                "extract embeddings from its images"
            )
        return self.vectors_loader()

    def evaluate(self, scores: np.ndarray | SearchResult) -> dict[str, float]:
        """Score a ``(Q, G)`` similarity matrix (higher is better) with this task's protocol.

        A ``(Q, K)`` integer ranking of gallery indices (or a
        :class:`~galleria.types.SearchResult` from an index) is accepted too.

        Returns:
            Percent values: revisitop gives ``E_mAP``, ``M_mAP``, ``H_mAP`` and
            ``E_mP@1`` ... ``H_mP@10``; label protocols give :attr:`metrics`
            (``mAP``, ``mAP@R``, ``mAP@100``, ``R@1``, ...). ``N-S`` is not a
            percentage: it is the UKBench score in ``[0, 4]``.
        """
        arr = scores.ids if isinstance(scores, SearchResult) else np.asarray(scores)
        if arr.ndim != 2 or arr.shape[0] != self.num_queries:
            raise InputError(
                f"task {self.name!r} needs a ({self.num_queries}, {self.num_gallery}) "
                f"score matrix; got shape {arr.shape}"
            )
        if np.issubdtype(arr.dtype, np.floating) and arr.shape[1] != self.num_gallery:
            raise InputError(
                f"task {self.name!r} has {self.num_gallery} gallery items; "
                f"scores have {arr.shape[1]} columns"
            )
        if self.protocol == "revisitop":
            assert self.gnd is not None
            raw = revisitop_evaluate(arr, self.gnd)
        else:
            raw = retrieval_metrics(
                arr,
                self.query_labels,
                self.gallery_labels,
                metrics=self.metrics,
                query_gallery_index=self.query_gallery_index if self.exclude_self else None,
            )
        return {k: (v if k == "N-S" else 100.0 * v) for k, v in raw.items()}


# --------------------------------------------------------------------------- #
# File readers
# --------------------------------------------------------------------------- #

_PICKLE_ALLOWED = (
    {
        ("builtins", n)
        for n in (
            "list",
            "dict",
            "tuple",
            "set",
            "frozenset",
            "int",
            "float",
            "str",
            "bytes",
            "bool",
            "complex",
        )
    }
    | {
        (m, n)
        for m in ("numpy.core.multiarray", "numpy._core.multiarray")
        for n in ("_reconstruct", "scalar")
    }
    | {("numpy", "ndarray"), ("numpy", "dtype")}
)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise FormatError(f"refusing to unpickle {module}.{name}: not plain ground-truth data")


def load_revisitop_gnd(path: str | Path) -> dict[str, Any]:
    """Read an official ``gnd_*.pkl`` (dict with ``imlist``, ``qimlist``, ``gnd``).

    Only plain containers and numpy arrays are allowed in the pickle.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetMissingError(f"revisitop ground truth {p} is missing")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(p.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise FormatError(f"{p} is not a valid revisitop ground-truth pickle: {exc}") from exc
    if not isinstance(obj, dict) or not {"imlist", "qimlist", "gnd"} <= obj.keys():
        raise FormatError(f"{p} lacks the imlist / qimlist / gnd entries")
    if len(obj["gnd"]) != len(obj["qimlist"]):
        raise FormatError(f"{p}: {len(obj['gnd'])} gnd entries for {len(obj['qimlist'])} queries")
    return obj


def read_fvecs(path: str | Path) -> np.ndarray:
    """Read a ``.fvecs`` file (per row: int32 dimension, then that many float32).

    Returns:
        ``(N, D)`` float32.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetMissingError(f"descriptor file {p} is missing")
    raw = np.fromfile(p, dtype=np.int32)
    if raw.size == 0:
        raise FormatError(f"{p} is empty")
    d = int(raw[0])
    if d <= 0 or raw.size % (d + 1):
        raise FormatError(f"{p} is not an fvecs file (first dimension {d}, {raw.size} words)")
    rows = raw.reshape(-1, d + 1)
    if (rows[:, 0] != d).any():
        raise FormatError(f"{p}: rows of different dimensions (expected {d} everywhere)")
    return np.ascontiguousarray(rows[:, 1:]).view(np.float32)


def _read_csv(path: Path, required: Sequence[str], *, error: type[Exception]) -> list[dict]:
    if not path.is_file():
        raise error(f"manifest {path} is missing")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise error(f"manifest {path} is empty (no header line)")
        missing = [c for c in required if c not in header]
        if missing:
            raise error(
                f"manifest {path} lacks column(s) {missing}; it has {header}, "
                f"needs {list(required)}"
            )
        reader.fieldnames = header
        rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    rows = [r for r in rows if any(r.values())]
    if not rows:
        raise error(f"manifest {path} has a header but no rows")
    return rows


def _check_files(root: Path, paths: Sequence[str], *, what: str, error: type[Exception]) -> None:
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        shown = ", ".join(missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise error(
            f"{len(missing)} of {len(paths)} {what} files are missing under {root}: {shown}{more}"
        )


def _gnd_entry(g: dict[str, Any], remap: np.ndarray | None = None) -> dict[str, np.ndarray]:
    out = {}
    for key in ("easy", "hard", "junk"):
        idx = np.asarray(g.get(key, []), dtype=np.int64).reshape(-1)
        if remap is not None:
            idx = remap[idx]
            idx = idx[idx >= 0]
        out[key] = idx
    return out


def _bbx(g: dict[str, Any]) -> BBox:
    x1, y1, x2, y2 = (float(v) for v in g["bbx"])
    return (x1, y1, x2, y2)


# --------------------------------------------------------------------------- #
# Loaders
# --------------------------------------------------------------------------- #


def _roxford5k_lopq() -> RetrievalTask:
    """ROxford5k on precomputed LOPQ 128-d descriptors, full-image queries.

    The gallery is the official ``imlist`` in its official order (so the
    ground-truth indices apply unchanged); ``order.txt`` gives the fvecs row of
    each image name (it is ``sorted(imlist + qimlist)``, checked on load).
    """
    folder = dataset_dir("oxford5k_lopq128")
    gt = load_revisitop_gnd(dataset_dir("revisitop") / "gnd_roxford5k.pkl")
    order_file = folder / "order.txt"
    if not order_file.is_file():
        raise DatasetMissingError(f"{order_file} is missing")
    fvecs_file = folder / "oxford_features.fvecs"
    if not fvecs_file.is_file():
        raise DatasetMissingError(f"{fvecs_file} is missing")
    order = order_file.read_text(encoding="utf-8").split()
    imlist, qimlist = list(gt["imlist"]), list(gt["qimlist"])
    if order != sorted(imlist + qimlist):
        raise FormatError(f"{order_file} is not sorted(imlist + qimlist) of gnd_roxford5k.pkl")
    row = {n: i for i, n in enumerate(order)}
    g_rows = np.array([row[n] for n in imlist], dtype=np.int64)
    q_rows = np.array([row[n] for n in qimlist], dtype=np.int64)

    def load_vectors() -> tuple[np.ndarray, np.ndarray]:
        x = read_fvecs(fvecs_file)
        if x.shape[0] != len(order):
            raise FormatError(f"{fvecs_file} has {x.shape[0]} rows, order.txt {len(order)}")
        return l2_normalize(x[g_rows]), l2_normalize(x[q_rows])

    return RetrievalTask(
        name="roxford5k-lopq",
        root=folder,
        gallery_paths=imlist,
        query_paths=qimlist,
        query_gallery_index=np.full(len(qimlist), -1, dtype=np.int64),
        protocol="revisitop",
        query_bbx=None,
        gnd=tuple(_gnd_entry(g) for g in gt["gnd"]),
        description=TASKS["roxford5k-lopq"],
        vectors_loader=load_vectors,
    )


def _rparis250() -> RetrievalTask:
    """RParis6k restricted to the 250 photos present in ``rparis250/``.

    Follows the official protocol: queries (``qimlist``) are not database
    images, so the gallery is the present ``imlist`` images only (238) and the
    queries are the present ``qimlist`` images (12 of 70), each with its
    official bounding box (original-image pixels; the stored photos are the
    originals, max side 1024, so no rescaling is needed). The ground-truth
    indices are remapped to the reduced gallery and absent images dropped.
    A query left without positives for a setting (e.g. no ``hard`` image
    present) is excluded from that setting's mean, as the official code does.
    """
    folder = dataset_dir("rparis250")
    gt = load_revisitop_gnd(dataset_dir("revisitop") / "gnd_rparis6k.pkl")
    rows = _read_csv(folder / "manifest.csv", ("path",), error=DatasetMissingError)
    by_name = {Path(r["path"]).stem: r["path"] for r in rows}
    imlist, qimlist = list(gt["imlist"]), list(gt["qimlist"])
    g_old = [i for i, n in enumerate(imlist) if n in by_name]
    q_old = [i for i, n in enumerate(qimlist) if n in by_name]
    stray = set(by_name) - {imlist[i] for i in g_old} - {qimlist[i] for i in q_old}
    if stray:
        logger.warning("rparis250: %d images are in neither imlist nor qimlist", len(stray))
    remap = np.full(len(imlist), -1, dtype=np.int64)
    remap[g_old] = np.arange(len(g_old))
    gallery = [by_name[imlist[i]] for i in g_old]
    queries = [by_name[qimlist[i]] for i in q_old]
    _check_files(folder, gallery + queries, what="rparis250 image", error=DatasetMissingError)
    return RetrievalTask(
        name="rparis250",
        root=folder,
        gallery_paths=gallery,
        query_paths=queries,
        query_gallery_index=np.full(len(queries), -1, dtype=np.int64),
        protocol="revisitop",
        query_bbx=[_bbx(gt["gnd"][i]) for i in q_old],
        gnd=tuple(_gnd_entry(gt["gnd"][i], remap) for i in q_old),
        description=TASKS["rparis250"],
    )


def _smvs(*, references_only: bool) -> RetrievalTask:
    folder = dataset_dir("smvs_dvd_covers")
    rows = _read_csv(
        folder / "manifest.csv", ("path", "group", "device"), error=DatasetMissingError
    )
    _check_files(folder, [r["path"] for r in rows], what="SMVS image", error=DatasetMissingError)
    query_rows = [i for i, r in enumerate(rows) if r["device"] != "Reference"]
    gallery_rows = (
        [i for i, r in enumerate(rows) if r["device"] == "Reference"]
        if references_only
        else list(range(len(rows)))
    )
    pos = {i: j for j, i in enumerate(gallery_rows)}
    name = "smvs-ref" if references_only else "smvs"
    return RetrievalTask(
        name=name,
        root=folder,
        gallery_paths=[rows[i]["path"] for i in gallery_rows],
        query_paths=[rows[i]["path"] for i in query_rows],
        query_gallery_index=np.array([pos.get(i, -1) for i in query_rows], dtype=np.int64),
        protocol="instance",
        query_labels=np.array([int(rows[i]["group"]) for i in query_rows], dtype=np.int64),
        gallery_labels=np.array([int(rows[i]["group"]) for i in gallery_rows], dtype=np.int64),
        metrics=("R@1", "mAP") if references_only else ("mAP", "R@1"),
        description=TASKS[name],
    )


def _ukbench56() -> RetrievalTask:
    folder = dataset_dir("ukbench56")
    rows = _read_csv(folder / "manifest.csv", ("path", "group"), error=DatasetMissingError)
    paths = [r["path"] for r in rows]
    _check_files(folder, paths, what="UKBench image", error=DatasetMissingError)
    labels = np.array([int(r["group"]) for r in rows], dtype=np.int64)
    return RetrievalTask(
        name="ukbench56",
        root=folder,
        gallery_paths=paths,
        query_paths=list(paths),
        query_gallery_index=np.arange(len(paths), dtype=np.int64),
        protocol="ukbench",
        query_labels=labels,
        gallery_labels=labels.copy(),
        metrics=("N-S", "mAP"),
        exclude_self=False,
        description=TASKS["ukbench56"],
    )


def _caltech101() -> RetrievalTask:
    folder = dataset_dir("caltech101")
    rows = _read_csv(folder / "manifest.csv", ("path", "label", "split"), error=DatasetMissingError)
    rows = [r for r in rows if r["label"] != "BACKGROUND_Google"]
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]
    _check_files(
        folder,
        [r["path"] for r in test + train],
        what="Caltech-101 image",
        error=DatasetMissingError,
    )
    return RetrievalTask(
        name="caltech101",
        root=folder,
        gallery_paths=[r["path"] for r in train],
        query_paths=[r["path"] for r in test],
        query_gallery_index=np.full(len(test), -1, dtype=np.int64),
        protocol="class",
        query_labels=np.array([r["label"] for r in test]),
        gallery_labels=np.array([r["label"] for r in train]),
        metrics=CLASS_METRICS,
        description=TASKS["caltech101"],
    )


def _leave_one_out(name: str, folder_name: str, label_column: str) -> RetrievalTask:
    folder = dataset_dir(folder_name)
    rows = _read_csv(folder / "manifest.csv", ("path", label_column), error=DatasetMissingError)
    paths = [r["path"] for r in rows]
    _check_files(folder, paths, what=f"{name} image", error=DatasetMissingError)
    labels = np.array([r[label_column] for r in rows])
    return RetrievalTask(
        name=name,
        root=folder,
        gallery_paths=paths,
        query_paths=list(paths),
        query_gallery_index=np.arange(len(paths), dtype=np.int64),
        protocol="class",
        query_labels=labels,
        gallery_labels=labels.copy(),
        metrics=CLASS_METRICS,
        description=TASKS[name],
    )


def manifest_task(
    csv_path: str | Path,
    *,
    name: str | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> RetrievalTask:
    """A class-level retrieval task from a CSV ``path,label[,split]``.

    Paths are relative to the CSV's folder, or absolute. With a ``split``
    column, ``test`` rows are the queries and ``train`` rows the gallery;
    without one, every image queries all the others (leave-one-out).

    Raises:
        InputError: missing file or columns, no rows, empty path/label, a split
            value other than ``train``/``test`` (or no row of one of them),
            missing image files (the first few are listed).
    """
    p = Path(csv_path)
    rows = _read_csv(p, ("path", "label"), error=InputError)
    for i, r in enumerate(rows, start=2):
        if not r["path"] or not r["label"]:
            raise InputError(f"{p} line {i}: empty path or label")
    root = p.resolve().parent
    _check_files(root, [r["path"] for r in rows], what="image", error=InputError)
    task_name = name or p.stem
    if "split" in rows[0]:
        bad = sorted({r["split"] for r in rows} - {"train", "test"})
        if bad:
            raise InputError(f"{p}: unknown split value(s) {bad}; use 'train' or 'test'")
        test = [r for r in rows if r["split"] == "test"]
        train = [r for r in rows if r["split"] == "train"]
        if not test or not train:
            raise InputError(f"{p}: needs both 'train' (gallery) and 'test' (query) rows")
        return RetrievalTask(
            name=task_name,
            root=root,
            gallery_paths=[r["path"] for r in train],
            query_paths=[r["path"] for r in test],
            query_gallery_index=np.full(len(test), -1, dtype=np.int64),
            protocol="class",
            query_labels=np.array([r["label"] for r in test]),
            gallery_labels=np.array([r["label"] for r in train]),
            metrics=tuple(metrics),
            description=f"{p}: test rows vs train rows",
        )
    paths = [r["path"] for r in rows]
    labels = np.array([r["label"] for r in rows])
    return RetrievalTask(
        name=task_name,
        root=root,
        gallery_paths=paths,
        query_paths=list(paths),
        query_gallery_index=np.arange(len(paths), dtype=np.int64),
        protocol="class",
        query_labels=labels,
        gallery_labels=labels.copy(),
        metrics=tuple(metrics),
        description=f"{p}: leave-one-out",
    )


TASKS: dict[str, str] = {
    "roxford5k-lopq": "ROxford5k, 128-d LOPQ CNN descriptors, 70 full-image queries, E/M/H mAP",
    "rparis250": "RParis6k restricted to 250 photos: 12 bbx queries vs 238 images, E/M/H mAP",
    "smvs": "SMVS DVD covers: 400 phone photos vs all 500 images (self excluded), mAP, R@1",
    "smvs-ref": "SMVS DVD covers: 400 phone photos vs the 100 clean references, R@1, mAP",
    "ukbench56": "UKBench first 56 images, all vs all with self, N-S score, mAP",
    "caltech101": "Caltech-101 test vs train (no BACKGROUND_Google), mAP@R, mAP@100, R@k",
    "coil20": "COIL-20 1000 views, leave-one-out by object, mAP@R, mAP@100, R@k",
    "orl_faces": "ORL faces 400, leave-one-out by person, mAP@R, mAP@100, R@k",
    "oxford_affine": "Oxford affine 48 images, leave-one-out by scene, mAP@R, mAP@100, R@k",
}

_LOADERS: dict[str, Callable[[], RetrievalTask]] = {
    "roxford5k-lopq": _roxford5k_lopq,
    "rparis250": _rparis250,
    "smvs": lambda: _smvs(references_only=False),
    "smvs-ref": lambda: _smvs(references_only=True),
    "ukbench56": _ukbench56,
    "caltech101": _caltech101,
    "coil20": lambda: _leave_one_out("coil20", "coil20", "object"),
    "orl_faces": lambda: _leave_one_out("orl_faces", "orl_faces", "person"),
    "oxford_affine": lambda: _leave_one_out("oxford_affine", "oxford_affine", "scene"),
}


def load_task(name: str) -> RetrievalTask:
    """Load a task by name (see :data:`TASKS`) from the shared data sets.

    Raises:
        InputError: unknown name.
        DatasetMissingError: the data set (or one of its files) is not present.
    """
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise InputError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None
    return loader()
