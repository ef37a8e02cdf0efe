"""``galleria eval``: embed a task's images with a model and score them.

Every row of a benchmark table is one call of :func:`evaluate_model` (or one
``galleria eval`` command): data set, model, pooling/scales, post-processing
(alpha-QE, DBA) and an optional transform fitted on the gallery side only.
This module returns numbers; the command line (arguments, printing) is
:mod:`galleria.cli.eval`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from galleria.eval.datasets import RetrievalTask, load_task
from galleria.eval.embed import task_embeddings
from galleria.eval.protocols import evaluate_embeddings
from galleria.extract.embed import Progress
from galleria.extractors.registry import create_extractor

log = logging.getLogger(__name__)

DESCRIPTOR_FINGERPRINT = {"roxford5k-lopq": "lopq-oxford5k-fc7-pca128@descriptors"}


def evaluate_model(
    task: str | RetrievalTask,
    *,
    model: str = "effnet-lite0",
    pooling: str | None = None,
    scales: Sequence[float] = (1.0,),
    checkpoint: str | None = None,
    size: int | None = None,
    resize: str | None = None,
    runtime: str = "auto",
    threads: int | None = None,
    qe: int = 0,
    qe_alpha: float = 3.0,
    dba: int = 0,
    dba_alpha: float = 3.0,
    transform: str | None = None,
    dim: int | None = None,
    transform_params: dict[str, Any] | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    workers: int = 2,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate one configuration; returns ``{dataset, model, fingerprint, metrics, ...}``."""
    t0 = time.perf_counter()
    if isinstance(task, str):
        task = load_task(task)
    if task.vectors_loader is not None:
        queries, gallery = task_embeddings(task, None)  # type: ignore[arg-type]
        fingerprint = DESCRIPTOR_FINGERPRINT.get(task.name, f"{task.name}@descriptors")
        model_name = "descriptors"
    else:
        extra = {k: v for k, v in (("size", size), ("resize", resize)) if v is not None}
        ext = create_extractor(model, pooling=pooling, scales=scales, checkpoint=checkpoint,
                               runtime=runtime, threads=threads, **extra)
        queries, gallery = task_embeddings(task, ext, use_cache=use_cache,
                                           batch_size=batch_size, workers=workers,
                                           progress=progress)
        fingerprint = ext.fingerprint
        model_name = model
    t_embed = time.perf_counter() - t0
    transform_info = None
    if transform is not None:
        from galleria.transforms.registry import create_transform

        tr = create_transform(transform, dim=dim, **(transform_params or {}))
        t1 = time.perf_counter()
        tr.fit(gallery, fingerprint=fingerprint)
        fit_s = time.perf_counter() - t1
        gallery = tr.transform(gallery, fingerprint=fingerprint, dim=dim)
        queries = tr.transform(queries, fingerprint=fingerprint, dim=dim)
        transform_info = {
            "kind": transform,
            "dim": int(gallery.shape[1]),
            "params": tr.json_params(),
            "fitted_on": "gallery side of the task (queries not seen unless they are "
                         "gallery items)",
            "fit_seconds": round(fit_s, 2),
            "output_fingerprint": tr.output_fingerprint_at(dim),
        }
        fingerprint = tr.output_fingerprint_at(dim)
    metrics = evaluate_embeddings(
        task,
        queries,
        gallery,
        qe_alpha=qe_alpha if qe > 0 else None,
        qe_k=max(qe, 1),
        dba_k=dba if dba > 0 else None,
        dba_alpha=dba_alpha,
    )
    return {
        "dataset": task.name,
        "protocol": task.protocol,
        "model": model_name,
        "pooling": pooling or "gem3",
        "scales": list(scales),
        "fingerprint": fingerprint,
        "dim": int(queries.shape[1]),
        "queries": task.num_queries,
        "gallery": task.num_gallery,
        "qe": qe,
        "dba": dba,
        "transform": transform_info,
        "metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        "seconds": round(time.perf_counter() - t0, 2),
        "embed_seconds": round(t_embed, 2),
    }


def summarize(results: list[dict[str, Any]], keys: Sequence[str]) -> np.ndarray:
    """Rows of metric values (NaN where missing) for tables."""
    return np.array([[r["metrics"].get(k, np.nan) for k in keys] for r in results], dtype=float)
