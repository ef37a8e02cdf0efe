"""Cross-model maps: learned maps of new-model embeddings into the old model's space.

:class:`CrossModelMap` is the base of the reverse transformation ``psi``
(:mod:`galleria.upgrade.psi`) and the BCT head (:mod:`galleria.upgrade.bct`):
parameters, the MLP they share, score calibrations, both model fingerprints
and persistence. Every map records both fingerprints; using it with other
models is a :class:`~galleria.errors.CompatibilityError`. Saved with
:mod:`galleria.io.estimator` (``header.json`` + safetensors state, no pickle);
the header also stores score calibrations of the psi channel fitted on
held-out pairs (see :mod:`galleria.upgrade.merge`).

This module knows no concrete kind; :func:`galleria.upgrade.psi.load_cross_map`
loads either kind.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.fingerprint import chain, digest
from galleria.io.estimator import (
    HEADER_FILE,
    STATE_FILE,
    build,
    get_params,
    read_saved,
    save_estimator,
)
from galleria.train.config import TrainConfig
from galleria.upgrade.merge import Calibration, fit_calibration
from galleria.validate import as_embeddings, l2_normalize

log = logging.getLogger(__name__)

ARTIFACT_TYPE = "cross-model-map"
FORMAT_VERSION = 1

__all__ = [
    "ARTIFACT_TYPE",
    "FORMAT_VERSION",
    "HEADER_FILE",
    "STATE_FILE",
    "CrossModelMap",
    "build_mlp",
    "encode_labels",
    "mlp_forward",
    "mlp_weights",
]

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


def build_mlp(dims: list[int]) -> Any:
    """A torch MLP ``dims[0] -> ... -> dims[-1]`` with ReLU between the linear layers."""
    from torch import nn  # lazy: torch

    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mlp_weights(net: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(weight (out, in), bias (out,)), ...]`` float32 copies of a torch MLP's linear layers."""
    from torch import nn  # lazy: torch

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


TRAIN_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "patience", "val_fraction", "seed")
"""The training options a trained map records (flat, in its header)."""


class CrossModelMap:
    """Base: a learned map of new-model embeddings into the old model's space.

    Subclasses set :attr:`kind` and implement ``fit`` (sets ``weights_`` after
    :meth:`_prepare_fit`) and may add header info. Learned attributes end in
    ``_``; ``fit`` returns ``self``.
    """

    kind: ClassVar[str] = ""
    #: training defaults of the trained maps (their ``train`` parameter overrides them)
    default_train: ClassVar[TrainConfig] = TrainConfig(
        epochs=60, batch_size=512, lr=1e-3, weight_decay=1e-4, patience=5, val_fraction=0.1,
        seed=0)

    def _train_of(self, train: TrainConfig | None, flat: dict[str, Any]) -> TrainConfig:
        """``train`` (default :attr:`default_train`) with the flat training keywords of
        :data:`TRAIN_KEYS` (``epochs=5``, a saved header) folded in."""
        unknown = sorted(set(flat) - set(TRAIN_KEYS))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected parameters {unknown}")
        return replace(train or self.default_train, **flat)

    # ------------------------------------------------------------ params
    def get_params(self) -> dict[str, Any]:
        """The constructor parameters; a ``train`` config is written flat (the keys of
        :data:`TRAIN_KEYS`), the layout every saved map has (same fingerprints)."""
        params = get_params(self)
        train = params.pop("train", None)
        if isinstance(train, TrainConfig):
            params.update({k: getattr(train, k) for k in TRAIN_KEYS})
        return params

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
    INPUT: ClassVar[str] = "new"
    """The model whose embeddings the map takes (``new``: psi, new -> old; a forward map
    ``phi``, :mod:`galleria.upgrade.phi`, takes the ``old`` one's)."""
    FIX_HINT: ClassVar[str] = "; train one for these models (galleria upgrade train-transform)"

    def check_models(self, *, old: str | None, new: str | None) -> None:
        """Raise CompatibilityError unless this map was trained for these models
        (``old``: the old model's fingerprint, ``new``: the new one's, whichever side
        is the input).

        ``None`` asks nothing of that side; a fingerprint asked of a map that
        recorded none is refused (:func:`galleria.io.artifact.check_fingerprint`).
        """
        self._check_fitted()
        asked = {"old": old, "new": new}
        got = {"old": self.old_fingerprint_, "new": self.new_fingerprint_}
        output = "old" if self.INPUT == "new" else "new"
        for side, role in ((self.INPUT, "input"), (output, "output")):
            want, have = asked[side], got[side]
            if want is None or want == have:  # the rule of check_fingerprint
                continue
            trained = (f"model {have!r}" if have is not None
                       else "an unknown model (no fingerprint)")
            raise CompatibilityError(
                f"this {self.kind!r} map ({self.INPUT} -> {output}) was trained for "
                f"{side} ({role}) {trained}, but the upgrade uses {want!r}{self.FIX_HINT}"
            )

    def transform(self, x: object, *, fingerprint: str | None = None) -> np.ndarray:
        """``(N, D_in)`` embeddings of the input model -> ``(N, D_out)`` L2-normalised
        (psi: new-model embeddings -> the old space). ``fingerprint``: the model that
        made ``x`` (refused unless it is this map's input model)."""
        self._check_fitted()
        v = as_embeddings(x, name=f"{self.INPUT} embeddings")
        dim = self.new_dim_ if self.INPUT == "new" else self.old_dim_
        if v.shape[1] != dim:
            raise CompatibilityError(
                f"{self.kind!r} map takes {dim}-d embeddings of "
                f"{self.input_fingerprint!r}; got {v.shape[1]}-d"
            )
        self.check_models(**{self.INPUT: fingerprint,
                             "old" if self.INPUT == "new" else "new": None})
        return l2_normalize(mlp_forward(l2_normalize(v).astype(np.float32), self.weights_))

    @property
    def input_fingerprint(self) -> str | None:
        """The fingerprint of the model whose embeddings the map takes."""
        return self.new_fingerprint_ if self.INPUT == "new" else self.old_fingerprint_

    @property
    def output_fingerprint(self) -> str | None:
        """The model whose space the map's outputs live in."""
        return self.old_fingerprint_ if self.INPUT == "new" else self.new_fingerprint_

    @property
    def fingerprint(self) -> str:
        """``<input fp>|<kind>@<digest(params, output fp, weights)>`` (the map's own identity)."""
        self._check_fitted()
        parts: list[Any] = [self.get_params(), self.output_fingerprint]
        for w, b in self.weights_:
            parts += [w.tobytes(), b.tobytes()]
        return chain(self.input_fingerprint or "unknown", self.kind, digest(*parts))

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``header.json`` + the safetensors state into directory ``path`` (atomically)."""
        self._check_fitted()
        state: dict[str, np.ndarray] = {}
        for n, (w, b) in enumerate(self.weights_):
            state[f"w{n}"] = np.ascontiguousarray(w, np.float32)
            state[f"b{n}"] = np.ascontiguousarray(b, np.float32)
        return save_estimator(
            path,
            type=ARTIFACT_TYPE,
            format_version=FORMAT_VERSION,
            kind=self.kind,
            params=self.get_params(),
            fingerprint=self.input_fingerprint,
            state=state,
            old_fingerprint=self.old_fingerprint_,
            new_fingerprint=self.new_fingerprint_,
            new_dim=self.new_dim_,
            old_dim=self.old_dim_,
            map_fingerprint=self.fingerprint,
            calibrations=getattr(self, "calibrations_", {}),
            info=self.info_,
        )

    @classmethod
    def _from_saved(cls: type[T], p: Path, header: dict[str, Any],
                    state: dict[str, np.ndarray]) -> T:
        obj = build(cls, header["params"], where=p)
        layers = sum(1 for k in state if k.startswith("w"))
        try:
            obj.weights_ = [(state[f"w{n}"], state[f"b{n}"]) for n in range(layers)]
            obj.new_dim_ = int(header["new_dim"])
            obj.old_dim_ = int(header["old_dim"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{p}: incomplete map header or state: {exc!r}") from exc
        obj.new_fingerprint_ = header.get("new_fingerprint")
        obj.old_fingerprint_ = header.get("old_fingerprint")
        obj.calibrations_ = dict(header.get("calibrations") or {})
        obj.info_ = dict(header.get("info") or {})
        if obj.fingerprint != header.get("map_fingerprint"):
            raise FormatError(f"{p}: weights do not match the header (corrupt or edited)")
        return obj

    @classmethod
    def read_saved(
        cls, path: str | os.PathLike[str]
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(checked header, state)`` of a saved map (any kind when called on the base)."""
        return read_saved(
            path, type=ARTIFACT_TYPE, format_version=FORMAT_VERSION, kind=cls.kind or None
        )

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
        obj = cls._from_saved(p, *cls.read_saved(p))
        obj.check_models(old=old_fingerprint, new=new_fingerprint)
        return obj
