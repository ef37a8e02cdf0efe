"""How a fusion training run starts (deterministic, from the training rows alone).

* The anchored mixer's anchor (:mod:`galleria.fusion.anchor`): the PCA of the
  concatenated member features, or learned whitening with input selection, chosen on
  the held-out training classes (the rows early stopping watches; never fitted on).
* The query's whitening layer: a PCA-whitening of its pooled features (the paper's
  start), the ridge regression of the untrained mixer's output on the pooled features
  of every training view (``regress``), or the anchor applied to the concatenation
  predicted from the query's features (``predict``, chosen with the anchor).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from galleria.fusion.anchor import choose_start
from galleria.fusion.mixer import as_mixer_inputs, concat_inputs, mix
from galleria.fusion.query_model import QueryTail, init_regression, init_whitening

log = logging.getLogger("galleria.fusion.train")


def views_tensor(views: np.ndarray, rows: np.ndarray, which: np.ndarray) -> torch.Tensor:
    """float32 ``(len(rows), *trunk_out)`` tensor of the cached views ``views[rows, which]``."""
    return torch.from_numpy(np.ascontiguousarray(views[rows, which], dtype=np.float32))


def _pooled(tail: QueryTail, views: np.ndarray, rows: np.ndarray, which: np.ndarray
            ) -> np.ndarray:
    """``(len(rows), 1280)`` pooled head features of ``views[rows, which]`` (the whitening
    layer's input)."""
    with torch.no_grad():
        return np.concatenate([
            tail.pooled(views_tensor(views, rows[s:s + 128], which[s:s + 128])).numpy()
            for s in range(0, len(rows), 128)])


def _all_views(tail: QueryTail, views: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(len(rows), V, 1280)`` float64 L2-normalised pooled features of every cached view
    of ``views[rows]`` (read in batches, never copied whole)."""
    n, n_v = len(rows), views.shape[1]
    p = _pooled(tail, views, np.repeat(rows, n_v), np.tile(np.arange(n_v), n)).astype(np.float64)
    p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    return p.reshape(n, n_v, -1)


def _mixer_columns(mixer: nn.Module, features: list[np.ndarray]) -> list[np.ndarray]:
    """Each input as the anchor sees it (local sets mean-pooled), ``(N, W_i)`` float64."""
    specs = mixer.specs  # type: ignore[attr-defined]
    out = []
    for spec, f in zip(specs, features, strict=True):
        t = as_mixer_inputs([spec], [f])
        out.append(concat_inputs([spec], t).double().numpy())
    return out


#: median cosine between the query's clean view and a member's feature of the same image
#: above which that member counts as the query model's own feature
OWN_COSINE = 0.9


def _own_input(mixer: nn.Module, recipe: Any, cols: list[np.ndarray], pooled: np.ndarray,
               train: np.ndarray) -> int | None:
    """Index of the mixer input that is the query model's own feature: same model name,
    global, same width, and measured to agree with the query's clean view (median cosine
    >= OWN_COSINE on the training rows; a member at another size or pooling may not)."""
    dim = pooled.shape[2]
    for i, s in enumerate(mixer.specs):  # type: ignore[attr-defined]
        if s.name == recipe.query_model and s.kind == "global" and s.dim == dim:
            f = cols[i][train]
            f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
            cos = float(np.median((f * pooled[train, 0]).sum(1)))
            if cos >= OWN_COSINE:
                return i
            log.info("input %s is not the query's own feature here (median cosine %.3f to "
                     "its clean view): predicted like the others", s.name, cos)
    log.info("no mixer input is the query model's own feature: every block is predicted")
    return None


def initialise(mixer: nn.Module, tail: QueryTail, data: Any, recipe: Any,
               train_rows: np.ndarray, val_rows: np.ndarray | None = None) -> dict[str, Any]:
    """Deterministic start of a run: the mixer's anchor, then the query's whitening.

    Args:
        mixer, tail: the new modules (changed in place).
        data: the :class:`~galleria.fusion.train.TrainingData`.
        recipe: the :class:`~galleria.fusion.recipe.FusionRecipe`.
        train_rows: the rows trained on; ``val_rows``: the held-out rows, used only to
            choose between closed-form candidates (as early stopping chooses epochs).

    Returns:
        what the start chose and measured (JSON-able).
    """
    info: dict[str, Any] = {}
    val = np.zeros(0, np.int64) if val_rows is None else np.asarray(val_rows)
    closed_form = recipe.anchor and (recipe.anchor_kind != "pca" or recipe.select_inputs
                                     or recipe.query_init == "predict")
    if closed_form:
        rows = np.concatenate([train_rows, val])
        predict = recipe.query_init == "predict"
        pooled = _all_views(tail, data.views, rows) if predict else None
        cols = _mixer_columns(mixer, [f[rows] for f in data.features])
        n_tr = len(train_rows)
        own = (_own_input(mixer, recipe, cols, pooled, np.arange(n_tr))
               if pooled is not None else None)
        st = choose_start(
            cols, np.asarray(data.labels)[rows], np.arange(n_tr), np.arange(n_tr, len(rows)),
            d=recipe.d, kind=recipe.anchor_kind, select=recipe.select_inputs, pooled=pooled,
            own=own,
            inst=data.instance_discrimination,
            names=[s.name for s in mixer.specs])  # type: ignore[attr-defined]
        mixer.set_projection(st.mu, st.proj)  # type: ignore[operator]
        info["start"] = st.info([s.name for s in mixer.specs])  # type: ignore[attr-defined]
        log.info("anchor %s (alpha %s), inputs kept %s, held-out %s", st.kind, st.alpha,
                 info["start"]["kept_inputs"], st.val.get("score"))
        if predict:
            with torch.no_grad():
                tail.whiten.weight.copy_(torch.from_numpy(st.query_w.astype(np.float32)))
                tail.whiten.bias.copy_(torch.from_numpy(st.query_b.astype(np.float32)))
            return info
    elif recipe.anchor:
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
