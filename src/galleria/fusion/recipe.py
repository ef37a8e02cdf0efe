"""The training recipe of a fusion run (:func:`galleria.fusion.train.fit_fusion`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from galleria.errors import InputError
from galleria.fusion.anchor import ANCHOR_KINDS

SCHEDULES = ("joint", "two-stage")
QUERY_INITS = ("pca", "regress", "predict")
DEFAULT_MEMBERS = ("effnet-lite2", "opennsfw-r50", "effnet-lite0")
"""The gallery models of the default recipe (``galleria fusion train``)."""
N_BLOCKS = 16  # MBConv blocks of EfficientNet-Lite0


def check_train_blocks(train_blocks: int) -> int:
    """``train_blocks`` checked: -1 (the whole trunk) to :data:`N_BLOCKS`."""
    if not -1 <= int(train_blocks) <= N_BLOCKS:
        raise InputError(f"train_blocks must be in [-1, {N_BLOCKS}], got {train_blocks}")
    return int(train_blocks)


@dataclass(frozen=True)
class FusionRecipe:
    """Hyper-parameters of :func:`fit_fusion` (all recorded in the artifact).

    Attributes:
        d: dimension of the fused (and query) vectors.
        mixer: ``transformer`` (AFF) or ``mlp`` (baseline).
        layers, heads: transformer layers (C) and attention heads.
        momentum: ``a`` of the classifier momentum update (0: W_q copies W_mix).
        margin, scale: ArcFace margin and scale.
        schedule: ``joint`` or ``two-stage``.
        query_model: the light query network.
        train_blocks: trained MBConv blocks at the end of the query trunk (-1: only
            the whitening layer, 0: head convolution + whitening). Default 0: measured on
            this 2-core machine, a batch of 64 through the trainable tail takes 0.05-0.1 s
            forward + backward with 0 blocks and 1.5-2.5 s with 1 block (the eager
            depthwise convolutions); the ablation table measures what the extra block buys.
        n_views: trunk views per training image (view 0 clean, others augmented).
        epochs: most epochs (per stage); the learning rates decay linearly to 0 over them.
        warmup: share of the steps over which the learning rates ramp up linearly first
            (post-LN transformers diverge without it: measured on Caltech-101, AdamW at
            1e-3 without warm-up collapsed the held-out mAP from 0.81 to 0.15 in one epoch).
        min_steps: small data sets get more epochs, up to this many steps per stage (the
            momentum classifier and the warm-up need a few hundred steps).
        batch_size: images per step.
        lr: AdamW learning rate of the mixer, the classifier and the whitening layer.
        query_lr: learning rate of the trained trunk blocks and the head.
        weight_decay: AdamW weight decay.
        patience: epochs without improvement before stopping (counted after the warm-up;
            an epoch shorter than 32 steps counts as a fraction of one).
        val_fraction: held-out share of the classes (or images) for early stopping.
        seed: fixes the split, the initialisation and every draw.
        anchor: wrap the mixer in :class:`galleria.fusion.mixer.AnchoredMixer` (a fixed
            linear projection of the concatenated training features plus the gated
            mixer): training starts from that linear fusion.
        anchor_kind: the anchor (:mod:`galleria.fusion.anchor`): ``lw`` (learned
            whitening, its shrinkage chosen on the held-out classes) or ``pca`` (the
            concatenation + PCA baseline).
        select_inputs: drop whole inputs whose removal raises the held-out score
            (backward elimination; a pure-noise input goes this way).
        distill: weight of ``1 - cos(q, g_mix)`` (the query's embedding against the
            mixer's, stopped gradient, same image) added to the loss; 0: the paper's
            loss alone.
        query_init: ``pca`` (PCA-whitening of the clean views' pooled features),
            ``regress`` (ridge regression of the untrained mixer's output on the pooled
            features of every training view) or ``predict`` (needs ``anchor``: the anchor
            applied to the concatenation predicted from the query's features, its own
            member's block exact; ridge and shrinkage chosen on the held-out classes).
        query_norm: L2-normalise the query's pooled features before its whitening layer.
    """

    d: int = 512
    mixer: str = "transformer"
    layers: int = 4
    heads: int = 8
    momentum: float = 0.99
    margin: float = 0.3
    scale: float = 32.0
    schedule: str = "joint"
    query_model: str = "effnet-lite0"
    train_blocks: int = 0
    n_views: int = 4
    epochs: int = 30
    min_steps: int = 600
    batch_size: int = 64
    lr: float = 1e-4
    query_lr: float = 1e-4
    warmup: float = 0.05
    weight_decay: float = 0.01
    patience: int = 5
    val_fraction: float = 0.2
    seed: int = 0
    anchor: bool = True
    anchor_kind: str = "lw"
    select_inputs: bool = True
    distill: float = 4.0
    query_init: str = "predict"
    query_norm: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise InputError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.epochs < 1 or self.batch_size < 2 or self.n_views < 1 or self.patience < 1:
            raise InputError("epochs, n_views and patience must be >= 1, batch_size >= 2")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        check_train_blocks(self.train_blocks)
        if self.query_init not in QUERY_INITS:
            raise InputError(f"query_init must be one of {QUERY_INITS}, not {self.query_init!r}")
        if not self.distill >= 0.0:
            raise InputError(f"distill must be >= 0, got {self.distill}")
        if self.anchor_kind not in ANCHOR_KINDS:
            raise InputError(f"anchor_kind must be one of {ANCHOR_KINDS}, not "
                             f"{self.anchor_kind!r}")
        if self.query_init == "predict" and not (self.anchor and self.query_norm):
            raise InputError("query_init 'predict' needs an anchored mixer (anchor) and "
                             "normalised query pooling (query_norm); use query_init "
                             "'regress' or 'pca' without them")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusionRecipe:
        """Inverse of :meth:`to_dict`; a recipe recorded before a field existed gets the
        value that field's behaviour had then (``_EARLIER``)."""
        return cls(**{**_EARLIER, **d})

    def mixer_params(self) -> dict[str, Any]:
        """What :func:`galleria.fusion.mixer.build_mixer` needs to rebuild the mixer."""
        p: dict[str, Any] = {"kind": self.mixer, "d": self.d, "layers": self.layers,
                             "heads": self.heads}
        if self.anchor:
            p["anchor"] = True
        return p

    def query_params(self, weights_id: str) -> dict[str, Any]:
        """What :class:`galleria.fusion.model.FusionModel` records to rebuild the query tail."""
        p: dict[str, Any] = {"model": self.query_model, "train_blocks": self.train_blocks,
                             "d": self.d, "size": 224, "weights_id": weights_id,
                             "pooling": {"kind": "gem", "p": 3.0, "eps": 1e-6}}
        if self.query_norm:
            p["normalize"] = True
        return p


#: fields added after the first release, at the values that reproduce the behaviour before
_EARLIER: dict[str, Any] = {"anchor": False, "anchor_kind": "pca", "select_inputs": False,
                            "distill": 0.0, "query_init": "pca", "query_norm": False}
