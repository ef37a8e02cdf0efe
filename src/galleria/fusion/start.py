"""How a fusion training run starts (deterministic, from the training rows alone).

* The anchored mixer's anchor: the PCA of the concatenated member features
  (:meth:`galleria.fusion.mixer.AnchoredMixer.set_anchor`).
* The query's whitening layer: a PCA-whitening of its pooled features (the
  paper's start), or the ridge regression of the untrained mixer's output on the
  pooled features of every training view (``query_init="regress"``), so the light
  query starts in the gallery's space.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from galleria.fusion.mixer import mix
from galleria.fusion.query_model import QueryTail, init_regression, init_whitening

log = logging.getLogger("galleria.fusion.train")


def views_tensor(views: np.ndarray, rows: np.ndarray, which: np.ndarray) -> torch.Tensor:
    """float32 ``(len(rows), *trunk_out)`` tensor of the cached views ``views[rows, which]``."""
    return torch.from_numpy(np.ascontiguousarray(views[rows, which], dtype=np.float32))


def _pooled(tail: QueryTail, views: np.ndarray, rows: np.ndarray, which: np.ndarray
            ) -> np.ndarray:
    """``(len(rows), 1280)`` pooled head features of ``views[rows, which]``."""
    with torch.no_grad():
        return np.concatenate([
            tail.pooled(views_tensor(views, rows[s:s + 128], which[s:s + 128])).numpy()
            for s in range(0, len(rows), 128)])


def initialise(mixer: nn.Module, tail: QueryTail, data: Any, recipe: Any,
               train_rows: np.ndarray) -> dict[str, Any]:
    """Deterministic start of a run: the mixer's anchor (PCA), then the query's whitening.

    Args:
        mixer, tail: the new modules (changed in place).
        data: the :class:`~galleria.fusion.train.TrainingData`.
        recipe: the :class:`~galleria.fusion.train.FusionRecipe` (``anchor``, ``query_init``).
        train_rows: the rows trained on (the held-out rows are never looked at).

    Returns:
        what the start measured (``query_init_cosine``: mean cosine of the regressed
        query to its target over the training views).
    """
    info: dict[str, Any] = {}
    if recipe.anchor:
        mixer.set_anchor([f[train_rows] for f in data.features])  # type: ignore[operator]
    if recipe.query_init == "pca":
        init_whitening(tail, _pooled(tail, data.views, train_rows,
                                     np.zeros(len(train_rows), np.int64)))
        return info
    n_v = data.views.shape[1]
    rows = np.repeat(train_rows, n_v)
    which = np.tile(np.arange(n_v), len(train_rows))
    target = mix(mixer, [f[train_rows] for f in data.features])
    info["query_init_cosine"] = round(init_regression(
        tail, _pooled(tail, data.views, rows, which), np.repeat(target, n_v, axis=0)), 4)
    log.info("query whitening regressed on the mixer: mean cosine %.3f",
             info["query_init_cosine"])
    return info
