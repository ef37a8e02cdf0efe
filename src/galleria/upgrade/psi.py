"""Reverse transformation ``psi: new space -> old space`` (METHODS.md section 4).

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
:class:`~galleria.errors.CompatibilityError`. Saved as ``header.json`` +
``state.safetensors`` (no pickle); the header also stores score calibrations
of the psi channel fitted on held-out pairs (see :mod:`galleria.upgrade.merge`).

:class:`CrossModelMap` is the shared base (also used by the BCT head in
:mod:`galleria.upgrade.bct`); :func:`load_cross_map` loads either kind.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.fingerprint import chain, digest
from galleria.io.artifact import load_header, make_header, save_header
from galleria.io.atomic import write_bytes
from galleria.upgrade.merge import Calibration, fit_calibration
from galleria.validate import as_embeddings, l2_normalize

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "cross-model-map"
FORMAT_VERSION = 1
HEADER_FILE = "header.json"
STATE_FILE = "state.safetensors"
LOSSES = ("regression", "metric-compatible")

T = TypeVar("T", bound="CrossModelMap")


def mlp_forward(x: np.ndarray, weights: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``(N, D)`` -> MLP with ReLU between layers (torch ``Linear`` layout ``(out, in)``)."""
    h = x
    for n, (w, b) in enumerate(weights):
        h = h @ w.T + b
        if n < len(weights) - 1:
            np.maximum(h, 0.0, out=h)
    return h


def encode_labels(labels: Any, n: int) -> np.ndarray:
    """``(n,)`` labels of any comparable type -> int64 codes."""
    lab = np.asarray(labels).reshape(-1)
    if lab.shape[0] != n:
        raise InputError(f"{lab.shape[0]} labels for {n} paired embeddings")
    return np.unique(lab, return_inverse=True)[1].reshape(-1).astype(np.int64)


class CrossModelMap:
    """Base: a learned map of new-model embeddings into the old model's space.

    Subclasses set :attr:`kind`, implement ``_fit`` (sets ``weights_``) and may
    add header info. Learned attributes end in ``_``; ``fit`` returns ``self``.
    """

    kind: ClassVar[str] = ""

    # ------------------------------------------------------------ params
    def get_params(self) -> dict[str, Any]:
        import inspect

        sig = inspect.signature(type(self).__init__)
        return {
            p.name: getattr(self, p.name)
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "weights_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise InputError(f"this {self.kind!r} map is not fitted: call fit() or load() first")

    # ------------------------------------------------------------ fitting
    def fit(
        self: T,
        new: object,
        old: object,
        *,
        labels: Any = None,
        new_fingerprint: str | None = None,
        old_fingerprint: str | None = None,
        progress: Any = None,
    ) -> T:
        """Learn the map from ``(N, D_new)`` / ``(N, D_old)`` embeddings of the same images."""
        raise NotImplementedError

    def _prepare_fit(
        self, new: object, old: object, new_fingerprint: str | None, old_fingerprint: str | None
    ) -> tuple[np.ndarray, np.ndarray]:
        n = as_embeddings(new, name="new embeddings")
        o = as_embeddings(old, name="old embeddings")
        if n.shape[0] != o.shape[0]:
            raise InputError(
                f"paired embeddings: {n.shape[0]} new rows but {o.shape[0]} old rows"
            )
        if n.shape[0] < 8:
            raise InputError(f"need at least 8 paired images to fit, got {n.shape[0]}")
        if new_fingerprint is not None and new_fingerprint == old_fingerprint:
            raise InputError(f"old and new model are the same ({new_fingerprint!r})")
        for attr in [a for a in vars(self) if a.endswith("_") and not a.startswith("_")]:
            delattr(self, attr)
        self.new_dim_ = int(n.shape[1])
        self.old_dim_ = int(o.shape[1])
        self.new_fingerprint_ = new_fingerprint
        self.old_fingerprint_ = old_fingerprint
        self.info_: dict[str, Any] = {}
        return l2_normalize(n), l2_normalize(o)

    def _fit_calibrations(
        self, n: np.ndarray, o: np.ndarray, labels: np.ndarray | None, rows: np.ndarray
    ) -> None:
        """Calibrations of the psi channel on held-out query ``rows`` (stored in the header)."""
        p = self.transform(n)
        cals: dict[str, Any] = {}
        kinds = ["affine", "quantile"] + (["platt"] if labels is not None else [])
        for kind in kinds:
            try:
                cal = fit_calibration(
                    kind, old_queries=p, old_gallery=o, new_embeddings=n, labels=labels,
                    query_rows=rows,
                )
            except InputError as exc:
                log.warning("calibration %s not fitted: %s", kind, exc)
                continue
            cals[kind] = cal.to_dict()
        self.calibrations_ = cals

    def calibration(self, kind: str) -> Calibration | None:
        """The stored calibration of the psi channel, or ``None``."""
        self._check_fitted()
        d = getattr(self, "calibrations_", {}).get(kind)
        return Calibration.from_dict(d) if d else None

    # ------------------------------------------------------------ applying
    def check_models(self, *, old: str | None, new: str | None) -> None:
        """Raise CompatibilityError unless this map was trained for ``old`` <- ``new``."""
        self._check_fitted()
        for role, want, got in (
            ("new (input)", new, self.new_fingerprint_),
            ("old (output)", old, self.old_fingerprint_),
        ):
            if want is not None and got is not None and want != got:
                raise CompatibilityError(
                    f"this {self.kind!r} map was trained for {role} model {got!r}, "
                    f"but the upgrade uses {want!r}; train one for these models "
                    "(galleria upgrade train-transform)"
                )

    def transform(self, new: object, *, fingerprint: str | None = None) -> np.ndarray:
        """``(N, D_new)`` new-model embeddings -> ``(N, D_old)`` L2-normalised, old space."""
        self._check_fitted()
        x = as_embeddings(new, name="new embeddings")
        if x.shape[1] != self.new_dim_:
            raise CompatibilityError(
                f"{self.kind!r} map takes {self.new_dim_}-d embeddings of "
                f"{self.new_fingerprint_!r}; got {x.shape[1]}-d"
            )
        self.check_models(old=None, new=fingerprint)
        return l2_normalize(mlp_forward(l2_normalize(x).astype(np.float32), self.weights_))

    @property
    def fingerprint(self) -> str:
        """``<new fp>|<kind>@<digest(params, weights)>`` (the map's own identity)."""
        self._check_fitted()
        parts: list[Any] = [self.get_params(), self.old_fingerprint_]
        for w, b in self.weights_:
            parts += [w.tobytes(), b.tobytes()]
        return chain(self.new_fingerprint_ or "unknown", self.kind, digest(*parts))

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``header.json`` + ``state.safetensors`` into directory ``path``."""
        from safetensors.numpy import save as st_save

        self._check_fitted()
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state: dict[str, np.ndarray] = {}
        for n, (w, b) in enumerate(self.weights_):
            state[f"w{n}"] = np.ascontiguousarray(w, np.float32)
            state[f"b{n}"] = np.ascontiguousarray(b, np.float32)
        write_bytes(out / STATE_FILE, st_save(state))
        header = make_header(
            type=ARTIFACT_TYPE,
            format_version=FORMAT_VERSION,
            params=self.get_params(),
            fingerprint=self.new_fingerprint_,
            kind=self.kind,
            old_fingerprint=self.old_fingerprint_,
            new_fingerprint=self.new_fingerprint_,
            new_dim=self.new_dim_,
            old_dim=self.old_dim_,
            map_fingerprint=self.fingerprint,
            calibrations=getattr(self, "calibrations_", {}),
            info=self.info_,
            state_file=STATE_FILE,
        )
        save_header(out / HEADER_FILE, header)  # last: its presence marks a complete save
        return out

    @classmethod
    def _from_header(cls: type[T], p: Path, header: dict[str, Any]) -> T:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            obj = cls(**header["params"])
        except TypeError as exc:
            raise FormatError(f"{p}: parameters do not fit {cls.__name__}: {exc}") from exc
        try:
            state = load_file(str(p / header.get("state_file", STATE_FILE)))
        except (OSError, SafetensorError) as exc:
            raise FormatError(f"{p}: cannot read the map's weights: {exc}") from exc
        layers = sum(1 for k in state if k.startswith("w"))
        obj.weights_ = [(state[f"w{n}"], state[f"b{n}"]) for n in range(layers)]
        obj.new_dim_ = int(header["new_dim"])
        obj.old_dim_ = int(header["old_dim"])
        obj.new_fingerprint_ = header.get("new_fingerprint")
        obj.old_fingerprint_ = header.get("old_fingerprint")
        obj.calibrations_ = dict(header.get("calibrations") or {})
        obj.info_ = dict(header.get("info") or {})
        if obj.fingerprint != header.get("map_fingerprint"):
            raise FormatError(f"{p}: weights do not match the header (corrupt or edited)")
        return obj

    @classmethod
    def load(
        cls: type[T],
        path: str | os.PathLike[str],
        *,
        old_fingerprint: str | None = None,
        new_fingerprint: str | None = None,
    ) -> T:
        """Read a map written by :meth:`save`; check both model fingerprints when given."""
        p = Path(path)
        header = load_header(p / HEADER_FILE, type=ARTIFACT_TYPE, format_version=FORMAT_VERSION)
        if cls.kind and header.get("kind") != cls.kind:
            raise FormatError(f"{p} holds a {header.get('kind')!r} map, not {cls.kind!r}")
        obj = cls._from_header(p, header)
        obj.check_models(old=old_fingerprint, new=new_fingerprint)
        return obj


class ReverseTransform(CrossModelMap):
    """``psi``: an MLP from new-model to old-model embeddings (see the module docstring).

    Args:
        loss: ``"regression"`` (no labels) or ``"metric-compatible"`` (labels).
        hidden: hidden width; ``0`` makes psi linear.
        layers: number of linear layers (>= 1; ``hidden=0`` forces 1).
        temperature: softmax temperature of the contrastive loss.
        reg_weight: weight of the regression term in the metric-compatible loss.
        epochs, batch_size, lr, weight_decay, patience, val_fraction: training
            (:class:`galleria.train.loop.TrainConfig`; early stopping on a
            seeded held-out split, whose pairs also fit the stored calibrations).
        seed: seeds initialisation, split and batch order.
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
        epochs: int = 60,
        batch_size: int = 512,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        patience: int = 5,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.loss = loss
        self.hidden = hidden
        self.layers = layers
        self.temperature = temperature
        self.reg_weight = reg_weight
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.patience = patience
        self.val_fraction = val_fraction
        self.seed = seed

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
        import torch

        from galleria.train.loop import TrainConfig, seeded_init, split_indices, train

        if self.loss not in LOSSES:
            raise InputError(f"unknown psi loss {self.loss!r}; known: {LOSSES}")
        if self.loss == "metric-compatible" and labels is None:
            raise InputError("metric-compatible training needs class labels (--label-column)")
        n, o = self._prepare_fit(new, old, new_fingerprint, old_fingerprint)
        codes = encode_labels(labels, n.shape[0]) if labels is not None else None
        dims = self._dims()
        net = seeded_init(self.seed, lambda: _mlp(dims))
        config = TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
            weight_decay=self.weight_decay, val_fraction=self.val_fraction,
            patience=self.patience, seed=self.seed,
        )
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
        self.weights_ = _weights_of(net)
        self.info_ = {"train": result.summary(), "n_pairs": int(n.shape[0]), "dims": dims}
        _, val = split_indices(
            n.shape[0], val_fraction=self.val_fraction, max_val=config.max_val, seed=self.seed
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
    import torch

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


def _mlp(dims: list[int]) -> Any:
    from torch import nn

    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _weights_of(net: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    from torch import nn

    out = []
    for m in net.modules():
        if isinstance(m, nn.Linear):
            out.append(
                (
                    m.weight.detach().cpu().numpy().astype(np.float32).copy(),
                    m.bias.detach().cpu().numpy().astype(np.float32).copy(),
                )
            )
    return out


def load_cross_map(
    path: str | os.PathLike[str],
    *,
    old_fingerprint: str | None = None,
    new_fingerprint: str | None = None,
) -> CrossModelMap:
    """Load a psi or BCT head saved by :meth:`CrossModelMap.save` (dispatch on its kind)."""
    from galleria.upgrade.bct import BCTHead

    p = Path(path)
    header = load_header(p / HEADER_FILE, type=ARTIFACT_TYPE, format_version=FORMAT_VERSION)
    kinds: dict[str, type[CrossModelMap]] = {"psi": ReverseTransform, "bct": BCTHead}
    cls = kinds.get(str(header.get("kind")))
    if cls is None:
        raise FormatError(f"{p} holds an unknown map kind {header.get('kind')!r}")
    obj = cls._from_header(p, header)
    obj.check_models(old=old_fingerprint, new=new_fingerprint)
    return obj
