"""Evaluate embeddings on a :class:`~galleria.eval.datasets.RetrievalTask`.

Scores are inner products of (by default L2-normalised) vectors, i.e. cosine
similarity. Optional post-processing runs in the standard order: alpha-DBA on
the gallery first, then alpha-QE of the queries against the augmented gallery.
"""

from __future__ import annotations

import logging

import numpy as np

from galleria.errors import InputError
from galleria.eval.datasets import RetrievalTask
from galleria.search.postprocess import alpha_query_expansion, database_augmentation
from galleria.validate import as_embeddings, l2_normalize

logger = logging.getLogger(__name__)


def score_matrix(
    task: RetrievalTask,
    query_vecs: np.ndarray,
    gallery_vecs: np.ndarray,
    *,
    qe_alpha: float | None = None,
    qe_k: int = 10,
    dba_k: int | None = None,
    dba_alpha: float = 3.0,
    normalize: bool = True,
) -> np.ndarray:
    """The ``(Q, G)`` float32 similarity matrix a task is evaluated on.

    Args:
        task: the task; ``query_vecs`` and ``gallery_vecs`` follow its order.
        query_vecs: ``(Q, D)`` query embeddings, ``Q = task.num_queries``.
        gallery_vecs: ``(G, D)`` gallery embeddings, ``G = task.num_gallery``.
        qe_alpha: alpha-QE exponent; ``None`` = no query expansion.
        qe_k: gallery neighbours used by alpha-QE.
        dba_k: neighbours used by alpha-DBA; ``None`` = no database augmentation.
        dba_alpha: alpha-DBA exponent.
        normalize: L2-normalise both sets first (cosine similarity).
    """
    q = as_embeddings(query_vecs, name="query embeddings")
    g = as_embeddings(gallery_vecs, name="gallery embeddings", dim=q.shape[1])
    if q.shape[0] != task.num_queries:
        raise InputError(
            f"task {task.name!r} has {task.num_queries} queries; got {q.shape[0]} query vectors"
        )
    if g.shape[0] != task.num_gallery:
        raise InputError(
            f"task {task.name!r} has {task.num_gallery} gallery items; "
            f"got {g.shape[0]} gallery vectors"
        )
    if normalize:
        q, g = l2_normalize(q), l2_normalize(g)
    if dba_k is not None:
        g = database_augmentation(g, k=dba_k, alpha=dba_alpha)
    if qe_alpha is not None:
        own = task.query_gallery_index if task.exclude_self else None
        q = alpha_query_expansion(q, g, k=qe_k, alpha=qe_alpha, query_gallery_index=own)
    return q @ g.T


def evaluate_embeddings(
    task: RetrievalTask,
    query_vecs: np.ndarray,
    gallery_vecs: np.ndarray,
    *,
    qe_alpha: float | None = None,
    qe_k: int = 10,
    dba_k: int | None = None,
    dba_alpha: float = 3.0,
    normalize: bool = True,
) -> dict[str, float]:
    """Score embeddings with the task's protocol; see :func:`score_matrix` for arguments.

    Returns:
        :meth:`RetrievalTask.evaluate` of the score matrix (percent values).
    """
    scores = score_matrix(
        task,
        query_vecs,
        gallery_vecs,
        qe_alpha=qe_alpha,
        qe_k=qe_k,
        dba_k=dba_k,
        dba_alpha=dba_alpha,
        normalize=normalize,
    )
    result = task.evaluate(scores)
    logger.debug("%s: %s", task.name, result)
    return result
