"""Reverse transformation ``psi: new space -> old space`` (docs/methods.md, online backfilling).

With ``psi`` a query needs only the new model: ``psi(new(q))`` searches the
not-yet-backfilled (old) part of the gallery and ``new(q)`` the backfilled part.

Two training objectives, both on paired embeddings ``(new(x), old(x))`` of the
same images, CPU-friendly (a small MLP, a few seconds to a minute on 6k pairs)
and seeded:

``regression`` (no labels)
    ``1 - cos(psi(new(x)), old(x))``: psi imitates the old model.
``metric-compatible`` (labels)
    a supervised contrastive loss over *both* spaces: for an anchor image ``i``
    the candidates are ``old(x_j)`` scored by ``psi(new(x_i))`` (the old part)
    and ``new(x_j)`` scored by ``new(x_i)`` (the new part, fixed), ``j != i``;
    positives are the images of the same label in either space. One softmax
    over both blocks forces a cross-space positive above a new-space negative
    and vice versa, so the two score scales become comparable and the merge
    fair. A ``reg_weight`` times the regression term keeps psi tied to the
    old geometry.

Every map records both model fingerprints; using it with other models is a
:class:`~galleria.errors.CompatibilityError`. The shared base
:class:`~galleria.upgrade.crossmap.CrossModelMap` (also the base of the BCT
head in :mod:`galleria.upgrade.bct`) holds parameters, calibrations and
persistence; :func:`load_cross_map` loads either kind. (This module imports
``bct`` for that; ``bct`` imports only ``crossmap``: no import cycle.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.train.config import TrainConfig
from galleria.upgrade.bct import BCTHead
from galleria.upgrade.crossmap import (
    ARTIFACT_TYPE,
    FORMAT_VERSION,
    HEADER_FILE,
    STATE_FILE,
    CrossModelMap,
    build_mlp,
    encode_labels,
    mlp_forward,
    mlp_weights,
)
from galleria.upgrade.ridge import RidgePsi

log = logging.getLogger(__name__)

LOSSES = ("regression", "metric-compatible")

__all__ = [  # the map machinery lives in crossmap; re-exported where callers import it
    "ARTIFACT_TYPE",
    "FORMAT_VERSION",
    "HEADER_FILE",
    "LOSSES",
    "STATE_FILE",
    "CrossModelMap",
    "ReverseTransform",
    "encode_labels",
    "load_cross_map",
    "metric_compatible_loss",
    "mlp_forward",
]


class ReverseTransform(CrossModelMap):
    """``psi``: an MLP from new-model to old-model embeddings (see the module docstring).

    Args:
        loss: ``"regression"`` (no labels) or ``"metric-compatible"`` (labels).
        hidden: hidden width; ``0`` makes psi linear.
        layers: number of linear layers (>= 1; ``hidden=0`` forces 1).
        temperature: softmax temperature of the contrastive loss.
        reg_weight: weight of the regression term in the metric-compatible loss.
        train: training (:class:`~galleria.train.config.TrainConfig`, default
            :attr:`default_train`; flat keywords such as ``epochs=5`` are accepted and
            saved headers store them flat): early stopping on a seeded held-out
            split, whose pairs also fit the stored calibrations; its ``seed`` seeds
            initialisation, split and batch order.
    """

    kind: ClassVar[str] = "psi"

    def __init__(
        self,
        *,
        loss: str = "regression",
        hidden: int = 1024,
        layers: int = 2,
        temperature: float = 0.05,
        reg_weight: float = 1.0,
        train: TrainConfig | None = None,
        **flat: Any,
    ) -> None:
        self.loss = loss
        self.hidden = hidden
        self.layers = layers
        self.temperature = temperature
        self.reg_weight = reg_weight
        self.train = self._train_of(train, flat)

    def fit(
        self,
        new: object,
        old: object,
        *,
        labels: Any = None,
        new_fingerprint: str | None = None,
        old_fingerprint: str | None = None,
        progress: Any = None,
    ) -> ReverseTransform:
        """Learn psi from ``(N, D_new)`` and ``(N, D_old)`` embeddings of the same N images.

        Args:
            labels: ``(N,)`` class labels; required for ``metric-compatible``.
            new_fingerprint, old_fingerprint: the models that made the inputs
                (recorded, checked whenever the map is used).
            progress: optional tqdm-like factory for the training loop.
        """
        import torch  # lazy: torch

        from galleria.train.loop import seeded_init, split_indices, train  # lazy: torch

        if self.loss not in LOSSES:
            raise InputError(f"unknown psi loss {self.loss!r}; known: {LOSSES}")
        if self.loss == "metric-compatible" and labels is None:
            raise InputError("metric-compatible training needs class labels (--label-column)")
        n, o = self._prepare_fit(new, old, new_fingerprint, old_fingerprint)
        codes = encode_labels(labels, n.shape[0]) if labels is not None else None
        dims = self._dims()
        net = seeded_init(self.train.seed, lambda: build_mlp(dims))
        config = self.train
        tau, reg = float(self.temperature), float(self.reg_weight)

        def regression(nb: torch.Tensor, ob: torch.Tensor) -> torch.Tensor:
            p = torch.nn.functional.normalize(net(nb), dim=1)
            return (1.0 - (p * ob).sum(1)).mean()

        def compatible(
            nb: torch.Tensor, ob: torch.Tensor, yb: torch.Tensor
        ) -> tuple[torch.Tensor, dict[str, float]]:
            p = torch.nn.functional.normalize(net(nb), dim=1)
            con = metric_compatible_loss(p, ob, nb, yb, temperature=tau)
            rg = (1.0 - (p * ob).sum(1)).mean()
            parts = {"contrastive": float(con.detach()), "regression": float(rg.detach())}
            return con + reg * rg, parts

        if self.loss == "regression":
            result = train(net, regression, [n, o], config=config, progress=progress,
                           desc="psi regression")
        else:
            assert codes is not None
            result = train(net, compatible, [n, o, codes], config=config, progress=progress,
                           desc="psi metric-compatible")
        self.weights_ = mlp_weights(net)
        self.info_ = {"train": result.summary(), "n_pairs": int(n.shape[0]), "dims": dims}
        _, val = split_indices(
            n.shape[0], val_fraction=config.val_fraction, max_val=config.max_val, seed=config.seed
        )
        rows = val if val.size >= 3 else np.arange(n.shape[0])
        self._fit_calibrations(n, o, codes, rows)
        held = self.transform(n[rows])
        self.info_["val_cosine_to_old"] = float(np.mean(np.sum(held * o[rows], axis=1)))
        log.info("psi (%s) fitted: held-out cos(psi(new), old) = %.4f", self.loss,
                 self.info_["val_cosine_to_old"])
        return self

    def _dims(self) -> list[int]:
        if self.layers < 1:
            raise InputError(f"layers must be >= 1, got {self.layers}")
        if self.hidden <= 0 or self.layers == 1:
            return [self.new_dim_, self.old_dim_]
        return [self.new_dim_, *([int(self.hidden)] * (self.layers - 1)), self.old_dim_]


def metric_compatible_loss(
    p: Any, o: Any, n: Any, y: Any, *, temperature: float
) -> Any:
    """Supervised contrastive loss across the old and new spaces (torch).

    Args:
        p: ``(B, D_old)`` L2-normalised ``psi(new(x))`` (query side, old channel).
        o: ``(B, D_old)`` ``old(x)`` (gallery side, old part).
        n: ``(B, D_new)`` ``new(x)`` (both sides of the new part; fixed).
        y: ``(B,)`` int labels.
        temperature: softmax temperature.

    Returns:
        Scalar: mean over anchors with at least one positive of
        ``-mean_{pos} log softmax`` over the ``2(B-1)`` candidates
        ``{p_i . o_j} U {n_i . n_j}``, ``j != i``.
    """
    import torch  # lazy: torch

    b = p.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=p.device)
    cross = p @ o.T
    within = n @ n.T
    logits = torch.cat([cross, within], dim=1) / temperature
    self_mask = torch.cat([eye, eye], dim=1)
    logits = logits.masked_fill(self_mask, float("-inf"))
    same = (y[:, None] == y[None, :]) & ~eye
    pos = torch.cat([same, same], dim=1)
    logprob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    npos = pos.sum(1)
    valid = npos > 0
    if not bool(valid.any()):
        return (p * 0.0).sum()
    per = -(logprob.masked_fill(~pos, 0.0).sum(1)[valid] / npos[valid])
    return per.mean()


def load_cross_map(
    path: str | os.PathLike[str],
    *,
    old_fingerprint: str | None = None,
    new_fingerprint: str | None = None,
) -> CrossModelMap:
    """Load a psi or BCT head saved by :meth:`CrossModelMap.save` (dispatch on its kind)."""
    p = Path(path)
    header, state = CrossModelMap.read_saved(p)
    kinds: dict[str, type[CrossModelMap]] = {"psi": ReverseTransform, "bct": BCTHead,
                                             "psi-ridge": RidgePsi}
    cls = kinds.get(str(header.get("kind")))
    if header.get("kind") == "phi-ridge":  # galleria.upgrade.phi: the other direction
        raise CompatibilityError(f"{p} holds a forward map phi (old -> new) of rule "
                                 "ensemble, not a psi (new -> old)")
    if cls is None:
        raise FormatError(f"{p} holds an unknown map kind {header.get('kind')!r}")
    obj = cls._from_saved(p, header, state)
    obj.check_models(old=old_fingerprint, new=new_fingerprint)
    return obj
