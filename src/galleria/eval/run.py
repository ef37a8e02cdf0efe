"""``galleria eval``: embed a task's images with a model and score them.

Every row of a benchmark table is one call of :func:`evaluate_model` (or one
``galleria eval`` command): data set, model, pooling/scales, post-processing
(alpha-QE, DBA) and an optional transform fitted on the gallery side only.
This module returns numbers; the command line (arguments, printing) is
:mod:`galleria.cli.eval`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.eval.datasets import RetrievalTask, load_task
from galleria.eval.embed import task_embeddings
from galleria.eval.protocols import evaluate_embeddings
from galleria.extract.embed import Progress
from galleria.extractors.spec import ModelSpec
from galleria.transforms.registry import create_transform

log = logging.getLogger(__name__)

DESCRIPTOR_FINGERPRINT = {"roxford5k-lopq": "lopq-oxford5k-fc7-pca128@descriptors"}


MODEL_OPTIONS = ("pooling", "scales", "checkpoint", "size", "resize")
DEFAULT_MODEL = ModelSpec("effnet-lite0")


@dataclass(frozen=True)
class EvalConfig:
    """One row of a benchmark table: the model, post-processing and transform.

    Attributes:
        model: the extractor (a :class:`~galleria.extractors.spec.ModelSpec`).
        qe, qe_alpha: alpha query expansion over the top ``qe`` results (0: off).
        dba, dba_alpha: database-side augmentation over ``dba`` neighbours (0: off).
        transform, dim, transform_params: a transform fitted on the gallery side only.
        use_cache: reuse cached embeddings of the task's images.
        batch_size, workers, runtime, threads: how the model runs.
    """

    model: ModelSpec = DEFAULT_MODEL
    qe: int = 0
    qe_alpha: float = 3.0
    dba: int = 0
    dba_alpha: float = 3.0
    transform: str | None = None
    dim: int | None = None
    transform_params: dict[str, Any] | None = None
    use_cache: bool = True
    batch_size: int = 32
    workers: int = 2
    runtime: str = "auto"
    threads: int | None = None

    @classmethod
    def of(cls, config: EvalConfig | None = None, **fields: Any) -> EvalConfig:
        """``config`` with ``fields`` replaced; ``model`` may be a name, and the model
        options (``pooling``, ``scales``, ...) may be given beside it."""
        base = config or cls()
        opts = {k: fields.pop(k) for k in MODEL_OPTIONS if k in fields}
        model = fields.pop("model", None)
        if model is not None or opts:
            name = model if model is not None else base.model
            fields["model"] = ModelSpec.of(name.name if isinstance(name, ModelSpec) and opts
                                           else name, **opts)
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(fields) - known)
        if bad:
            raise InputError(f"unknown evaluation options {bad}; known: {sorted(known)} and "
                             f"the model options {list(MODEL_OPTIONS)}")
        return dataclasses.replace(base, **fields)


def evaluate_model(task: str | RetrievalTask, config: EvalConfig | None = None, *,
                   progress: Progress | None = None, fit_progress: Any = None,
                   **fields: Any) -> dict[str, Any]:
    """Evaluate one configuration; returns ``{dataset, model, fingerprint, metrics, ...}``.

    ``progress``: updated per image embedded; ``fit_progress``: a tqdm-like factory for
    training a transform (AE-SVC, SS2D...).

    ``fields`` override ``config`` (``evaluate_model("smvs", model="effnet-lite2",
    scales=(1, 0.707))``: see :meth:`EvalConfig.of`).
    """
    cfg = EvalConfig.of(config, **fields)
    spec = cfg.model
    t0 = time.perf_counter()
    if isinstance(task, str):
        task = load_task(task)
    if task.vectors_loader is not None:
        queries, gallery = task_embeddings(task, None)  # type: ignore[arg-type]
        fingerprint = DESCRIPTOR_FINGERPRINT.get(task.name, f"{task.name}@descriptors")
        model_name = "descriptors"
    else:
        ext = spec.build(runtime=cfg.runtime, threads=cfg.threads)
        queries, gallery = task_embeddings(task, ext, use_cache=cfg.use_cache,
                                           batch_size=cfg.batch_size, workers=cfg.workers,
                                           progress=progress)
        fingerprint = ext.fingerprint
        model_name = spec.name
    t_embed = time.perf_counter() - t0
    transform_info = None
    transform, dim = cfg.transform, cfg.dim
    if transform is not None:
        tr = create_transform(transform, dim=dim, **(cfg.transform_params or {}))
        t1 = time.perf_counter()
        tr.fit(gallery, fingerprint=fingerprint, progress=fit_progress)
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
        qe_alpha=cfg.qe_alpha if cfg.qe > 0 else None,
        qe_k=max(cfg.qe, 1),
        dba_k=cfg.dba if cfg.dba > 0 else None,
        dba_alpha=cfg.dba_alpha,
    )
    return {
        "dataset": task.name,
        "protocol": task.protocol,
        "model": model_name,
        "pooling": spec.pooling or "gem3",
        "scales": list(spec.scales),
        "fingerprint": fingerprint,
        "dim": int(queries.shape[1]),
        "queries": task.num_queries,
        "gallery": task.num_gallery,
        "qe": cfg.qe,
        "dba": cfg.dba,
        "transform": transform_info,
        "metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        "seconds": round(time.perf_counter() - t0, 2),
        "embed_seconds": round(t_embed, 2),
    }


def summarize(results: list[dict[str, Any]], keys: Sequence[str]) -> np.ndarray:
    """Rows of metric values (NaN where missing) for tables."""
    return np.array([[r["metrics"].get(k, np.nan) for k in keys] for r in results], dtype=float)
