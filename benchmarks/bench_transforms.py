"""Learned embedding transforms on real data: accuracy vs dimension for every method.

Methods (``galleria.transforms``): raw (full size), centring, PCA, PCA-whitening
(full and regularised), AE-SVC (library defaults, and a fixed step budget), SS2D,
SSD and Matryoshka (teacher: the AE-SVC at ``d_max``), and SS2D with the
regularised whitening as teacher. Nested methods (PCA, the whitenings, SS2D,
Matryoshka) are fitted once at ``d_max`` and evaluated at every prefix; AE-SVC
is trained once per size; SSD has one student per size.

Set-ups (what the transforms are fitted on is part of every row's label):

- ``roxford5k-lopq``: the 128-d LOPQ descriptors; fitted on the 4993 database
  descriptors (the 70 query images are not among them, but come from the same
  database); E/M/H mAP of the official protocol, d in 128/64/32/16.
- ``smvs`` (EfficientNet-Lite2 GeM at 512 px): *transductive* (fitted on all
  500 images, queries included; the standard task: 400 phone photos vs the 500
  images, self excluded) and *disjoint* (the 100 covers split into two seeded
  halves; fitted on the 250 images of one half, evaluated on the other half's
  200 phone photos vs its 250 images; both directions, averaged).
- ``caltech101`` (Lite2 GeM at 260 px): fitted on the train split only (the
  gallery), evaluated with the test queries (disjoint from the fit) vs train.
- ``rparis250`` (Lite2 GeM at 260 px): *transductive*, fitted on the 238 gallery
  images (there is no disjoint Paris data here).

Also measured: cosine-similarity statistics of every space, and the wall time
of fitting each kind on a 100k x 1280 real-derived matrix (``--fit-times``).

Run:  .venv/bin/python benchmarks/bench_transforms.py [--quick] [--setups ...]
Writes benchmarks/results/transforms.{json,md}, transforms-<dataset>.png and
transforms-cosine-<dataset>.png (``--quick``: transforms_quick.*). Fitted
transforms and per-unit results are kept in ``--work`` so that an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RESULTS_DIR,
    RealDerived,
    machine_info,
    machine_md,
    markdown_table,
    peak_rss_mb,
    set_threads,
    write_results,
)

# ----------------------------------------------------------------------------- settings
#: AE-SVC trained with a fixed number of updates on every data set (the library
#: default ``epochs=100`` gives only 100 updates on a 500-image set), with batches
#: of 512 rows (clipped to the training rows) so that the batch covariance of a
#: d <= 256 latent has full rank.
AESVC_BUDGET: dict[str, Any] = {"epochs": 100_000, "max_steps": 1000, "batch_size": 512}
#: SS2D, SSD and Matryoshka: the same budget for all three (library defaults otherwise:
#: linear student, temperature 0.05, batch 256).
DISTILL_BUDGET: dict[str, Any] = {"epochs": 100_000, "max_steps": 2000}
QUICK_STEPS = 60

LITE2_DIMS = [512, 256, 128, 64, 32, 16]
LOPQ_DIMS = [128, 64, 32, 16]

#: (method, label, nested?) in table order; "raw" and "center" are full size only.
METHODS: list[tuple[str, str]] = [
    ("raw", "raw (full size)"),
    ("center", "centring (full size)"),
    ("pca", "PCA"),
    ("pca-whiten", "PCA-whitening (full)"),
    ("pca-whiten-reg", "PCA-whitening (regularised)"),
    ("aesvc-default", "AE-SVC (library defaults)"),
    ("aesvc", "AE-SVC"),
    ("aesvc-linear", "AE-SVC, linear encoder/decoder (n_layers=1)"),
    ("ss2d", "SS2D (teacher AE-SVC)"),
    ("ssd", "SSD (teacher AE-SVC)"),
    ("matryoshka", "Matryoshka (teacher AE-SVC)"),
    ("ss2d-wreg", "SS2D (teacher reg. whitening)"),
    ("ss2d-lin", "SS2D (teacher linear AE-SVC)"),
]
LABELS = dict(METHODS)
FULL_ONLY = {"raw", "center"}


# ----------------------------------------------------------------------------- data
@dataclass
class Split:
    """One fit / evaluate unit: fit rows, query and gallery rows, an evaluation function."""

    name: str
    fit: np.ndarray  # (N, D)
    queries: np.ndarray  # (Q, D)
    gallery: np.ndarray  # (G, D)
    evaluate: Callable[[np.ndarray, np.ndarray], dict[str, float]]


@dataclass
class Setup:
    """A data set under one fitting protocol; results are averaged over its splits."""

    key: str
    dataset: str
    title: str
    protocol: str  # "transductive" | "disjoint" | "database"
    fit_note: str
    embedding: str
    dims: list[int]
    metrics: list[str]
    main: str
    splits: list[Split] = field(default_factory=list)

    @property
    def d_max(self) -> int:
        return max(self.dims)


def _cosine_eval(task: Any) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    from galleria.eval.protocols import evaluate_embeddings

    return lambda q, g: evaluate_embeddings(task, q, g)


def _lite2(task_name: str, size: int) -> tuple[Any, np.ndarray, np.ndarray, str]:
    from galleria.eval.datasets import load_task
    from galleria.eval.embed import task_embeddings
    from galleria.extractors.registry import create_extractor

    task = load_task(task_name)
    ex = create_extractor("effnet-lite2", size=size)
    t0 = time.perf_counter()
    q, g = task_embeddings(task, ex)
    print(f"[data] {task_name}: {ex.fingerprint} q {q.shape} g {g.shape} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return task, q, g, ex.fingerprint


def setup_roxford(dims: list[int]) -> Setup:
    from galleria.eval.datasets import load_task

    task = load_task("roxford5k-lopq")
    g, q = task.vectors()
    s = Setup("roxford5k-lopq", "roxford5k-lopq", "ROxford5k, LOPQ 128-d descriptors",
              "database", "fitted on the 4993 database descriptors (queries excluded, same "
              "database)", "LOPQ CNN 128-d", dims, ["E_mAP", "M_mAP", "H_mAP"], "M_mAP")
    s.splits.append(Split("all", g, q, g, _cosine_eval(task)))
    return s


def setup_smvs(dims: list[int], size: int, *, disjoint: bool, seed: int = 0) -> Setup:
    from galleria.eval.metrics import retrieval_metrics

    task, q, g, fp = _lite2("smvs", size)
    emb = f"EfficientNet-Lite2 GeM p=3, {size} px ({fp})"
    if not disjoint:
        s = Setup("smvs-transductive", "smvs", "SMVS DVD covers", "transductive",
                  "fitted on all 500 images (queries included)", emb, dims,
                  ["mAP", "R@1"], "mAP")
        s.splits.append(Split("all", g, q, g, _cosine_eval(task)))
        return s
    s = Setup("smvs-disjoint", "smvs", "SMVS DVD covers", "disjoint",
              "fitted on the 250 images of 50 covers, evaluated on the other 50 covers "
              "(200 phone photos vs their 250 images); both halves, averaged", emb, dims,
              ["mAP", "R@1"], "mAP")
    covers = np.unique(task.gallery_labels)
    perm = np.random.default_rng(seed).permutation(covers)
    halves = [np.sort(perm[: covers.size // 2]), np.sort(perm[covers.size // 2 :])]
    for h, (fit_covers, eval_covers) in enumerate([(halves[0], halves[1]),
                                                   (halves[1], halves[0])]):
        fit_rows = np.flatnonzero(np.isin(task.gallery_labels, fit_covers))
        g_rows = np.flatnonzero(np.isin(task.gallery_labels, eval_covers))
        q_rows = np.flatnonzero(np.isin(task.query_labels, eval_covers))
        pos = np.full(task.num_gallery, -1, np.int64)
        pos[g_rows] = np.arange(g_rows.size)
        qgi = pos[task.query_gallery_index[q_rows]]
        ql, gl = task.query_labels[q_rows], task.gallery_labels[g_rows]

        def evaluate(qv: np.ndarray, gv: np.ndarray, ql: Any = ql, gl: Any = gl,
                     qgi: Any = qgi) -> dict[str, float]:
            from galleria.validate import l2_normalize

            scores = l2_normalize(qv) @ l2_normalize(gv).T
            raw = retrieval_metrics(scores, ql, gl, metrics=("mAP", "R@1"),
                                    query_gallery_index=qgi)
            return {k: 100.0 * v for k, v in raw.items()}

        s.splits.append(Split(f"fit-half{h}", g[fit_rows], q[q_rows], g[g_rows], evaluate))
    return s


def setup_caltech(dims: list[int], size: int) -> Setup:
    task, q, g, fp = _lite2("caltech101", size)
    s = Setup("caltech101", "caltech101", "Caltech-101", "disjoint",
              "fitted on the 5784 train images (= the gallery); the 2893 test queries are "
              "not in the fit", f"EfficientNet-Lite2 GeM p=3, {size} px ({fp})", dims,
              ["mAP@R", "R@1"], "mAP@R")
    s.splits.append(Split("train", g, q, g, _cosine_eval(task)))
    return s


def setup_rparis(dims: list[int], size: int) -> Setup:
    task, q, g, fp = _lite2("rparis250", size)
    s = Setup("rparis250", "rparis250", "RParis6k, 250 photos", "transductive",
              "fitted on the 238 gallery images (the 12 bbx-cropped queries are not in the "
              "fit, but the gallery is the evaluation database)",
              f"EfficientNet-Lite2 GeM p=3, {size} px ({fp})", dims,
              ["M_mAP", "H_mAP"], "M_mAP")
    s.splits.append(Split("gallery", g, q, g, _cosine_eval(task)))
    return s


# ----------------------------------------------------------------------------- methods
def _params(method: str, budget: dict[str, Any], distill: dict[str, Any]) -> dict[str, Any]:
    if method == "aesvc-default":
        return {}
    if method == "aesvc":
        return dict(budget)
    if method == "aesvc-linear":
        return {**budget, "n_layers": 1}
    if method in ("ss2d", "ssd", "matryoshka", "ss2d-wreg", "ss2d-lin"):
        return dict(distill)
    return {}


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Runner:
    """Fits and evaluates every (set-up, split, method); caches transforms and results."""

    def __init__(self, work: Path, budget: dict[str, Any], distill: dict[str, Any],
                 sample: int = 2000) -> None:
        self.work = work
        self.budget = budget
        self.distill = distill
        self.sample = sample
        work.mkdir(parents=True, exist_ok=True)

    # -- cached fit
    def _fit(self, tag: str, kind: str, X: np.ndarray, params: dict[str, Any],
             teacher: Any = None) -> tuple[Any, float]:
        from galleria.transforms.registry import create_transform, load_transform

        folder = self.work / tag
        meta = folder / "bench.json"
        if meta.is_file() and (folder / "header.json").is_file():
            return load_transform(folder), json.loads(meta.read_text())["fit_seconds"]
        extra = {} if teacher is None else {"teacher": teacher}
        tr = create_transform(kind, **params, **extra)
        t0 = time.perf_counter()
        tr.fit(X)
        dt = time.perf_counter() - t0
        tr.save(folder)
        meta.write_text(json.dumps({"fit_seconds": dt, "kind": kind}))
        return tr, dt

    def _teacher(self, setup: Setup, split: Split, X: np.ndarray, kind: str) -> Any:
        d = setup.d_max
        if kind in ("aesvc", "aesvc-linear"):
            tag = self._tag(setup, split, kind, d)
            params = _params(kind, self.budget, self.distill)
            return self._fit(tag, "aesvc", X, {"dim": d, **params})[0]
        tag = self._tag(setup, split, "pca-whiten-reg", d)
        return self._fit(tag, "pca-whiten-reg", X, {"dim": d})[0]

    def _tag(self, setup: Setup, split: Split, method: str, d: int | None) -> str:
        key = _digest([method, _params(method, self.budget, self.distill), setup.dims,
                       split.fit.shape, float(split.fit[:7].sum())])
        return f"{setup.key}/{split.name}/{method}-{d}-{key}"

    # -- evaluate one method on one split: {d: {"metrics", "cosine", "fit_seconds"}}
    def run_method(self, setup: Setup, split: Split, method: str) -> dict[str, Any]:
        from galleria.transforms.analysis import cosine_similarity_stats

        cache = self.work / f"{self._tag(setup, split, method, None)}.result.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        X, q, g = split.fit, split.queries, split.gallery
        dims = setup.dims
        out: dict[str, Any] = {}

        def record(d: int | str, tr: Any, fit_s: float, dim: int | None = None) -> None:
            if tr is None:
                qq, gg = q, g
            else:
                qq, gg = tr.transform(q, dim=dim), tr.transform(g, dim=dim)
            m = split.evaluate(qq, gg)
            cs = cosine_similarity_stats(gg, sample=self.sample)
            out[str(d)] = {"metrics": {k: round(v, 3) for k, v in m.items()},
                           "cosine_mean": round(cs["mean"], 5),
                           "cosine_var": round(cs["variance"], 6),
                           "fit_seconds": round(fit_s, 2)}

        params = _params(method, self.budget, self.distill)
        t0 = time.perf_counter()
        if method == "raw":
            record("full", None, 0.0)
        elif method == "center":
            tr, dt = self._fit(self._tag(setup, split, method, None), "center", X, {})
            record("full", tr, dt)
        elif method in ("pca", "pca-whiten", "pca-whiten-reg"):
            dm = setup.d_max
            tr, dt = self._fit(self._tag(setup, split, method, dm), method, X, {"dim": dm})
            for d in dims:
                record(d, tr, dt, dim=d)
            if method != "pca":  # whitening at the full input size as well
                D = X.shape[1]
                trf, dtf = self._fit(self._tag(setup, split, method, D), method, X, {"dim": D})
                record("full", trf, dtf)
        elif method in ("aesvc", "aesvc-default", "aesvc-linear"):
            for d in dims:
                tr, dt = self._fit(self._tag(setup, split, method, d), "aesvc", X,
                                   {"dim": d, **params})
                record(d, tr, dt)
                out[str(d)]["training"] = _training(tr)
                print(f"    {method} d={d}: {out[str(d)]['metrics']} ({dt:.0f} s)", flush=True)
        elif method in ("ss2d", "ssd", "matryoshka", "ss2d-wreg", "ss2d-lin"):
            kind = "ss2d" if method in ("ss2d-wreg", "ss2d-lin") else method
            teacher = self._teacher(setup, split, X, {"ss2d-wreg": "pca-whiten-reg",
                                                      "ss2d-lin": "aesvc-linear"}.get(method,
                                                                                      "aesvc"))
            tr, dt = self._fit(self._tag(setup, split, method, setup.d_max), kind, X,
                               {"dim": setup.d_max, "sizes": sorted(dims), **params},
                               teacher=teacher)
            for d in dims:
                record(d, tr, dt, dim=d)
            out["training"] = _training(tr)
        else:
            raise ValueError(method)
        out["_seconds"] = round(time.perf_counter() - t0, 1)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out))
        return out


def _training(tr: Any) -> Any:
    """The training summary stored in a transform's header info (None for closed forms)."""
    info = tr._get_info() if hasattr(tr, "_get_info") else {}
    return info.get("training")


def average(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Average the per-split results of one method (metrics, cosine stats, fit time)."""
    keys = [k for k in results[0] if not k.startswith("_") and k != "training"]
    out: dict[str, Any] = {}
    for k in keys:
        ms = [r[k]["metrics"] for r in results]
        out[k] = {
            "metrics": {m: round(float(np.mean([x[m] for x in ms])), 3) for m in ms[0]},
            "per_split": ms if len(ms) > 1 else None,
            "cosine_mean": round(float(np.mean([r[k]["cosine_mean"] for r in results])), 5),
            "cosine_var": round(float(np.mean([r[k]["cosine_var"] for r in results])), 6),
            "fit_seconds": round(float(np.mean([r[k]["fit_seconds"] for r in results])), 2),
        }
        if "training" in results[0][k]:
            out[k]["training"] = [r[k].get("training") for r in results]
    if "training" in results[0]:
        out["training"] = [r.get("training") for r in results]
    return out


# ----------------------------------------------------------------------------- fit times
def fit_times(base: np.ndarray, n: int, threads: int, quick: bool) -> dict[str, Any]:
    """Wall time of ``fit`` of every kind on ``n`` real-derived 1280-d rows (library defaults)."""
    import torch

    from galleria.transforms.registry import create_transform

    set_threads(threads)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    X = RealDerived(base, seed=0, jitter=0.25).gallery(n)
    grow_s = time.perf_counter() - t0
    small = {"max_steps": QUICK_STEPS} if quick else {}
    jobs: list[tuple[str, dict[str, Any]]] = [
        ("center", {}), ("pca", {"dim": 128}), ("pca-whiten", {"dim": 128}),
        ("pca-whiten-reg", {"dim": 128}), ("aesvc", {"dim": 128, **small}),
        ("aesvc", {"dim": 512, **small}),
        ("ss2d", {"dim": 512, **small, "teacher_params": small}),
        ("matryoshka", {"dim": 512, **small, "teacher_params": small}),
        ("ssd", {"dim": 512, **small, "teacher_params": small}),
    ]
    rows = []
    for kind, params in jobs:
        load0 = os.getloadavg()[0]
        tr = create_transform(kind, **params)
        t0 = time.perf_counter()
        c0 = time.process_time()
        tr.fit(X)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        info = tr._get_info() if hasattr(tr, "_get_info") else {}
        training = info.get("training")
        student_s = None
        if isinstance(training, dict) and "seconds" not in training:
            student_s = round(sum(v["seconds"] for v in training.values()), 1)
        row = {"kind": kind, "params": params, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
               "students_s": student_s, "training": training,
               "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}
        rows.append(row)
        print(f"[fit-time] {kind} {params}: {wall:.1f} s (load {load0:.1f})", flush=True)
    return {"n": n, "dim": int(X.shape[1]), "threads": threads, "grow_seconds": round(grow_s, 1),
            "data": "RealDerived: Dirichlet(1,1,1) mixtures of a real Caltech-101 Lite2 "
                    "embedding and two of its 10 nearest real neighbours + jitter 0.25 x the "
                    "median real NN distance, re-normalised (no lift; real 1280-d base)",
            "rows": rows}


# ----------------------------------------------------------------------------- report
def _cell(res: dict[str, Any], d: Any, metric: str) -> str:
    r = res.get(str(d))
    if r is None:
        return ""
    v = r["metrics"].get(metric)
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def setup_tables(setup: dict[str, Any]) -> str:
    dims = setup["dims"]
    res = setup["results"]
    out = []
    for metric in setup["metrics"]:
        header = ["method", "full", *[str(d) for d in dims]]
        rows = []
        for method, label in METHODS:
            if method not in res:
                continue
            rows.append([label, _cell(res[method], "full", metric),
                         *[_cell(res[method], d, metric) for d in dims]])
        out.append(f"**{metric}**\n\n" + markdown_table(header, rows))
    return "\n".join(out)


def cosine_table(setup: dict[str, Any], dims: list[Any]) -> str:
    res = setup["results"]
    header = ["method", *[f"var @{d}" for d in dims], *[f"mean @{d}" for d in dims]]
    rows = []
    for method, label in METHODS:
        if method not in res:
            continue
        r = res[method]
        rows.append([label,
                     *[f"{r[str(d)]['cosine_var']:.4f}" if str(d) in r else "" for d in dims],
                     *[f"{r[str(d)]['cosine_mean']:.3f}" if str(d) in r else "" for d in dims]])
    return markdown_table(header, rows)


AESVC_VARIANTS = ("aesvc", "aesvc-linear")


def gains(setup: dict[str, Any]) -> dict[str, Any]:
    """Each AE-SVC variant's gain per d over raw, centring, PCA and the whitenings."""
    res, main = setup["results"], setup["main"]

    def val(method: str, d: Any) -> float | None:
        r = res.get(method, {}).get(str(d))
        return None if r is None else r["metrics"][main]

    out: dict[str, Any] = {}
    for variant in AESVC_VARIANTS:
        if variant not in res:
            continue
        per_d: dict[str, Any] = {}
        for d in setup["dims"]:
            a = val(variant, d)
            if a is None:
                continue
            row: dict[str, Any] = {"aesvc": a}
            for base, bd in [("raw", "full"), ("center", "full"), ("pca", d),
                             ("pca-whiten", d), ("pca-whiten-reg", d)]:
                b = val(base, bd)
                if b:
                    row[f"vs_{base}"] = {"base": b, "delta": round(a - b, 2),
                                         "relative_pct": round(100 * (a - b) / b, 1)}
            per_d[str(d)] = row
        out[variant] = per_d
    return out


def gains_table(setup: dict[str, Any]) -> str:
    g = gains(setup)
    header = ["variant", "d", "AE-SVC", "vs raw", "vs centring", "vs PCA", "vs PCA-whit.",
              "vs reg. whit."]
    rows = []
    for variant, per_d in g.items():
        for d, r in per_d.items():
            cells = [LABELS[variant], d, f"{r['aesvc']:.1f}"]
            for base in ("raw", "center", "pca", "pca-whiten", "pca-whiten-reg"):
                x = r.get(f"vs_{base}")
                cells.append("" if x is None
                             else f"{x['delta']:+.1f} ({x['relative_pct']:+.0f}%)")
            rows.append(cells)
    return markdown_table(header, rows)


def plot_dataset(dataset: str, setups: list[dict[str, Any]], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from galleria.io.atomic import write_bytes

    panels = [(s, m) for s in setups for m in s["metrics"] if m != "R@1" or len(s["metrics"]) == 1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    styles = {"pca": ("C0", "o"), "pca-whiten": ("C1", "v"), "pca-whiten-reg": ("C2", "^"),
              "aesvc-default": ("C7", "x"), "aesvc": ("C3", "s"), "ss2d": ("C4", "D"),
              "aesvc-linear": ("C9", "s"), "ss2d-lin": ("C9", "D"),
              "ssd": ("C5", "P"), "matryoshka": ("C6", "*"), "ss2d-wreg": ("C8", "d")}
    for ax, (s, metric) in zip(axes[0], panels, strict=True):
        res = s["results"]
        dims = s["dims"]
        for method, (color, marker) in styles.items():
            if method not in res:
                continue
            ys = [res[method].get(str(d), {}).get("metrics", {}).get(metric) for d in dims]
            ax.plot(dims, [np.nan if y is None else y for y in ys], marker=marker, color=color,
                    label=LABELS[method], linewidth=1.3, markersize=5,
                    linestyle="--" if method in ("aesvc-default", "ss2d-wreg", "ss2d-lin")
                    else "-")
        for method, ls in (("raw", "-"), ("center", ":")):
            if method in res:
                y = res[method]["full"]["metrics"][metric]
                ax.axhline(y, color="k", linestyle=ls, linewidth=1.0,
                           label=f"{LABELS[method]} ({y:.1f})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims)
        ax.set_xticklabels([str(d) for d in dims])
        ax.set_xlabel("embedding size d")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{s['title']}: {s['protocol']}", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{dataset}: accuracy vs embedding size", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def plot_cosines(setup: Setup, runner: Runner, d: int, path: Path) -> None:
    """Cosine-similarity histograms of the first split's gallery in several spaces at size d."""
    from galleria.transforms.analysis import plot_similarity_histograms
    from galleria.transforms.registry import load_transform

    split = setup.splits[0]
    spaces: dict[str, np.ndarray] = {"raw": split.gallery}
    for method, dim_fit in [("center", None), ("pca", setup.d_max),
                            ("pca-whiten-reg", setup.d_max), ("aesvc", d), ("aesvc-linear", d),
                            ("ss2d", setup.d_max)]:
        folder = runner.work / runner._tag(setup, split, method, dim_fit)
        if not (folder / "header.json").is_file():
            continue
        tr = load_transform(folder)
        nested = method not in ("center", "aesvc", "aesvc-linear")
        spaces[f"{method}" + (f" @{d}" if method != "center" else "")] = tr.transform(
            split.gallery, dim=d if nested else None)
    plot_similarity_histograms(spaces, path, title=f"{setup.title} ({setup.protocol}): "
                               f"gallery cosine similarities")


# ----------------------------------------------------------------------------- main
def build_setups(names: list[str], quick: bool, smvs_size: int, caltech_size: int,
                 rparis_size: int) -> list[Setup]:
    lite = [128, 32] if quick else LITE2_DIMS
    lopq = [64, 16] if quick else LOPQ_DIMS
    out = []
    for name in names:
        if name == "roxford5k-lopq":
            out.append(setup_roxford(lopq))
        elif name == "smvs-transductive":
            out.append(setup_smvs(lite, smvs_size, disjoint=False))
        elif name == "smvs-disjoint":
            out.append(setup_smvs(lite, smvs_size, disjoint=True))
        elif name == "caltech101":
            out.append(setup_caltech(lite, caltech_size))
        elif name == "rparis250":
            out.append(setup_rparis(lite, rparis_size))
        else:
            raise SystemExit(f"unknown set-up {name!r}")
    return out


ALL_SETUPS = ["roxford5k-lopq", "smvs-transductive", "smvs-disjoint", "caltech101", "rparis250"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"ROxford + SMVS transductive, 2 sizes, {QUICK_STEPS} training steps")
    ap.add_argument("--setups", nargs="*", default=None, help=f"subset of {ALL_SETUPS}")
    ap.add_argument("--methods", nargs="*", default=None, help="subset of the methods")
    ap.add_argument("--threads", type=int, default=2, help="BLAS / FAISS threads")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads for training (1: see the README on busy machines)")
    ap.add_argument("--smvs-size", type=int, default=512)
    ap.add_argument("--caltech-size", type=int, default=260)
    ap.add_argument("--rparis-size", type=int, default=260)
    ap.add_argument("--fit-times", type=int, default=100_000,
                    help="rows of the fit-time matrix (0 = skip)")
    ap.add_argument("--fit-threads", type=int, default=2)
    ap.add_argument("--work", type=Path,
                    default=Path(os.environ.get("GALLERIA_CACHE", Path.home() / ".cache/galleria"))
                    / "bench_transforms")
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args()

    import torch

    set_threads(args.threads)
    torch.set_num_threads(args.torch_threads)
    info = machine_info(args.threads)
    info["torch_threads_training"] = args.torch_threads
    names = args.setups or (["roxford5k-lopq", "smvs-transductive"] if args.quick else ALL_SETUPS)
    methods = args.methods or [m for m, _ in METHODS]
    budget = dict(AESVC_BUDGET)
    distill = dict(DISTILL_BUDGET)
    if args.quick:
        budget["max_steps"] = distill["max_steps"] = QUICK_STEPS
    work = args.work / ("quick" if args.quick else "full")
    runner = Runner(work, budget, distill)
    results_dir = args.results_dir or RESULTS_DIR
    stem = "transforms_quick" if args.quick else "transforms"
    t_start = time.perf_counter()

    setups = build_setups(names, args.quick, args.smvs_size, args.caltech_size, args.rparis_size)
    out_setups = []
    for setup in setups:
        print(f"== {setup.key} ({setup.protocol}; {len(setup.splits)} split(s)), dims "
              f"{setup.dims}", flush=True)
        res: dict[str, Any] = {}
        for method in methods:
            t0 = time.perf_counter()
            per_split = [runner.run_method(setup, sp, method) for sp in setup.splits]
            res[method] = average(per_split)
            main_vals = {d: v["metrics"][setup.main] for d, v in res[method].items()
                         if isinstance(v, dict) and "metrics" in v}
            print(f"  {method:15s} {setup.main}: {main_vals} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        entry = {"key": setup.key, "dataset": setup.dataset, "title": setup.title,
                 "protocol": setup.protocol, "fit_note": setup.fit_note,
                 "embedding": setup.embedding, "dims": setup.dims, "metrics": setup.metrics,
                 "main": setup.main, "n_fit": [int(s.fit.shape[0]) for s in setup.splits],
                 "n_queries": [int(s.queries.shape[0]) for s in setup.splits],
                 "n_gallery": [int(s.gallery.shape[0]) for s in setup.splits],
                 "results": res}
        entry["aesvc_gains"] = gains(entry)
        out_setups.append(entry)
        cos_d = 128 if 128 in setup.dims else setup.dims[0]
        try:
            plot_cosines(setup, runner, cos_d,
                         results_dir / f"{stem}-cosine-{setup.key}.png")
        except Exception as exc:  # a plot must not lose the measurements
            print(f"  cosine plot failed: {exc!r}", flush=True)

    for dataset in dict.fromkeys(s["dataset"] for s in out_setups):
        plot_dataset(dataset, [s for s in out_setups if s["dataset"] == dataset],
                     results_dir / f"{stem}-{dataset}.png")

    ft = None
    if args.fit_times:
        from galleria.eval.datasets import load_task
        from galleria.eval.embed import task_embeddings
        from galleria.extractors.registry import create_extractor

        task = load_task("caltech101")
        q, g = task_embeddings(task, create_extractor("effnet-lite2", size=args.caltech_size))
        n = min(args.fit_times, 10_000) if args.quick else args.fit_times
        cached = work / f"fit-times-{n}-{args.fit_threads}.json"
        if cached.is_file():
            ft = json.loads(cached.read_text())
        else:
            ft = fit_times(np.concatenate([g, q]), n, args.fit_threads, args.quick)
            cached.write_text(json.dumps(ft))
            set_threads(args.threads)
            torch.set_num_threads(args.torch_threads)

    info["load_average_at_end"] = os.getloadavg()
    payload = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "settings": {"aesvc_budget": budget, "distill_budget": distill,
                            "distill_teacher": "the budget AE-SVC at d_max (same object as "
                                               "the AE-SVC row at d_max)",
                            "library_defaults": "see galleria.transforms.aesvc / ss2d"},
               "setups": out_setups, "fit_times": ft,
               "total_seconds": round(time.perf_counter() - t_start, 1),
               "peak_rss_mb": round(peak_rss_mb(), 1)}
    write_results(stem, payload, report_md(payload, stem), results_dir=results_dir)
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)


def report_md(payload: dict[str, Any], stem: str) -> str:
    st = payload["settings"]
    md = ["# Learned embedding transforms on real data", "",
          "Percent metrics of cosine search after each transform, by embedding size d "
          "(`full` = the input size). What each transform was fitted on is stated per "
          "set-up: **transductive** = fitted on data that contains the evaluation images, "
          "**disjoint** = the queries were not in the fit data (what a user gets on new "
          "queries).", "",
          f"AE-SVC: paper architecture and loss weights (25/1/15/1), library defaults except "
          f"`{st['aesvc_budget']}` (the row 'library defaults' uses none of these). "
          f"SS2D / SSD / Matryoshka: teacher = {st['distill_teacher']}; linear student, "
          f"temperature 0.05, batch 256, `{st['distill_budget']}` for all three.", ""]
    for s in payload["setups"]:
        md += [f"## {s['title']} -- {s['protocol']}", "",
               f"- fit: {s['fit_note']} (n_fit {s['n_fit']}, queries {s['n_queries']}, "
               f"gallery {s['n_gallery']})",
               f"- embedding: {s['embedding']}", "", setup_tables(s), "",
               f"AE-SVC's gain in {s['main']} (points, and percent of the baseline):", "",
               gains_table(s), "",
               "Cosine similarities of the gallery (pairs of a 2000-row sample):", "",
               cosine_table(s, ["full", 128 if 128 in s["dims"] else s["dims"][0],
                                min(s["dims"])]),
               "", f"Plots: `{stem}-{s['dataset']}.png`, `{stem}-cosine-{s['key']}.png`.", ""]
    ft = payload.get("fit_times")
    if ft:
        md += [f"## Fit time on {ft['n']:,} x {ft['dim']} ({ft['threads']} threads)", "",
               f"Data: {ft['data']}.", "",
               markdown_table(["kind", "params", "wall s", "CPU s", "students s",
                               "load before"],
                              [[r["kind"], json.dumps(r["params"]), r["wall_s"], r["cpu_s"],
                                r["students_s"] or "", r["load_before"]]
                               for r in ft["rows"]]), ""]
    md += ["## Machine", "", machine_md(payload["machine"]),
           f"Total {payload['total_seconds']:.0f} s, peak RSS {payload['peak_rss_mb']:.0f} MB.",
           ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()
