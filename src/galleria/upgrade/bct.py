"""Backward-compatible training (BCT-style baseline): no backfill at all.

Shen et al., "Towards Backward-Compatible Representation Learning" (CVPR 2020):
the new model is trained so that its embeddings are classified well by the
*old* model's (frozen) classifier as well as by its own, which places them in
the old space: new-model queries can search the old gallery directly and the
gallery is never re-embedded.

Here the "new model" is a head ``h`` on frozen new-model embeddings, trained in
two steps on labelled paired embeddings (e.g. Caltech-101 train):

1. an old classifier ``W_old``, frozen: a cosine classifier (logits
   ``scale * norm(old(x)) . norm(W_old)^T``) on the old embeddings. Our old
   models were not trained with a classifier on these classes, so one is built:
   ``old_classifier="prototypes"`` (default) uses the normalised class means of
   the old embeddings (the nearest-class-mean classifier), ``"trained"`` starts
   from them and trains with cross-entropy. Measured on synthetic clusters and
   Caltech-101: a trained softmax classifier's weights drift away from where the
   old embeddings lie (they only need to *separate* the classes), so a head fitted
   to it classifies well under ``W_old`` but retrieves old items poorly;
   prototypes keep the influence loss pointing at the old embeddings themselves;
2. the head ``h: D_new -> D_old`` (MLP) and a new classifier ``W_new``, trained
   with ``CE(W_old; h(new(x))) + new_weight * CE(W_new; h(new(x)))`` (the BCT
   "influence loss" plus the new model's own loss).

Queries ``h(new(q))`` then search old vectors. The head is saved like psi
(:class:`galleria.upgrade.crossmap.CrossModelMap`) with both fingerprints.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from galleria.errors import InputError
from galleria.train.config import TrainConfig
from galleria.upgrade.crossmap import CrossModelMap, build_mlp, encode_labels, mlp_weights

log = logging.getLogger(__name__)


class BCTHead(CrossModelMap):
    """BCT-style head on new-model embeddings, compatible with the old model's classifier.

    Args:
        hidden: hidden width of the head (``0`` = linear).
        layers: linear layers of the head.
        scale: logit scale of the cosine classifiers.
        old_classifier: ``"prototypes"`` or ``"trained"`` (see the module docstring).
        new_weight: weight of the new classifier's loss.
        train: training of both steps (:class:`~galleria.train.config.TrainConfig`,
            default :attr:`default_train`; flat keywords such as ``epochs=5`` are
            accepted and saved headers store them flat).
    """

    kind: ClassVar[str] = "bct"

    def __init__(
        self,
        *,
        hidden: int = 1024,
        layers: int = 2,
        scale: float = 16.0,
        old_classifier: str = "prototypes",
        new_weight: float = 1.0,
        train: TrainConfig | None = None,
        **flat: Any,
    ) -> None:
        self.hidden = hidden
        self.layers = layers
        self.scale = scale
        self.old_classifier = old_classifier
        self.new_weight = new_weight
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
    ) -> BCTHead:
        """Train the old classifier, then the head (see the module docstring)."""
        import torch  # lazy: torch
        from torch import nn  # lazy: torch

        from galleria.train.loop import seeded_init, train  # lazy: torch

        if labels is None:
            raise InputError("BCT needs class labels (the old classifier is trained on them)")
        n, o = self._prepare_fit(new, old, new_fingerprint, old_fingerprint)
        y = encode_labels(labels, n.shape[0])
        n_classes = int(y.max()) + 1
        config = self.train
        s = float(self.scale)
        ce = nn.functional.cross_entropy

        def cosine_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return s * nn.functional.normalize(x, dim=1) @ nn.functional.normalize(w, dim=1).T

        if self.old_classifier not in ("prototypes", "trained"):
            raise InputError(
                f"old_classifier must be 'prototypes' or 'trained', got {self.old_classifier!r}"
            )
        # step 1: the old model's classifier on old embeddings, then frozen
        protos = np.zeros((n_classes, self.old_dim_), np.float32)
        np.add.at(protos, y, o)
        w_old = nn.Linear(self.old_dim_, n_classes, bias=False)
        with torch.no_grad():
            w_old.weight.copy_(torch.from_numpy(protos))
        r1 = None
        if self.old_classifier == "trained":
            r1 = train(w_old, lambda ob, yb: ce(cosine_logits(ob, w_old.weight), yb),
                       [o, y], config=config, progress=progress, desc="bct old classifier")
        w_old.requires_grad_(False)
        frozen = w_old.weight.detach().clone()

        # step 2: head + new classifier, with the influence loss through the old classifier
        dims = (
            [self.new_dim_, self.old_dim_]
            if self.hidden <= 0 or self.layers <= 1
            else [self.new_dim_, *([int(self.hidden)] * (self.layers - 1)), self.old_dim_]
        )

        class Model(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.head = build_mlp(dims)
                self.new_cls = nn.Linear(dims[-1], n_classes, bias=False)

        model = seeded_init(self.train.seed + 1, Model)
        lam = float(self.new_weight)

        def loss(nb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            h = model.head(nb)
            l_old = ce(cosine_logits(h, frozen), yb)
            l_new = ce(cosine_logits(h, model.new_cls.weight), yb)
            parts = {"old_cls": float(l_old.detach()), "new_cls": float(l_new.detach())}
            return l_old + lam * l_new, parts

        r2 = train(model, loss, [n, y], config=config, progress=progress, desc="bct head")
        self.weights_ = mlp_weights(model.head)
        with torch.no_grad():
            acc_old = float(
                (cosine_logits(torch.from_numpy(o), frozen).argmax(1).numpy() == y).mean()
            )
            h = model.head(torch.from_numpy(n))
            acc_head = float((cosine_logits(h, frozen).argmax(1).numpy() == y).mean())
        self.info_ = {
            "old_classifier": r1.summary() if r1 is not None else "prototypes",
            "head": r2.summary(),
            "n_pairs": int(n.shape[0]),
            "classes": n_classes,
            "dims": dims,
            "train_acc_old_classifier_on_old": acc_old,
            "train_acc_old_classifier_on_head": acc_head,
        }
        self.calibrations_: dict[str, Any] = {}
        log.info("bct head fitted: old classifier acc %.3f on old, %.3f on head(new)",
                 acc_old, acc_head)
        return self


def bct_scores(head: BCTHead, new_queries: np.ndarray, old_gallery: np.ndarray) -> np.ndarray:
    """``(Q, G)`` similarities of ``h(new(q))`` to old gallery vectors (the no-backfill rule)."""
    return head.transform(new_queries) @ np.asarray(old_gallery, np.float32).T
