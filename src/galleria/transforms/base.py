"""The contract every learned embedding transform follows (scikit-learn style).

A transform maps ``(N, D)`` embeddings of one model to ``(N, d)`` L2-normalised
float32 embeddings for cosine search:

- ``__init__`` only stores keyword-only parameters (``get_params()``);
- ``fit(X, fingerprint=..., progress=...)`` learns state from unlabeled
  (gallery) embeddings and returns ``self``; learned attributes end in ``_``
  (``input_dim_``, ``output_dim_``, ``input_fingerprint_`` ...);
- ``transform(X, fingerprint=..., dim=...)`` checks the input dimension and the
  model fingerprint against what it was fitted on, then returns
  ``normalize(f(normalize(X)))``; nested transforms accept ``dim`` (a prefix size);
- ``output_fingerprint`` chains the input model's fingerprint:
  ``<model fp>|<kind>@<digest(model fp, params, learned state)>``;
- ``save(dir)`` writes ``header.json`` and a safetensors state (no pickle;
  :mod:`galleria.io.estimator`), ``load(dir)`` (or
  :func:`galleria.transforms.registry.load_transform`) rebuilds the object from
  its parameters and state and checks the digest.

Input rows are L2-normalised before fitting and before transforming: the
transforms live in cosine geometry, and the step is a no-op for the
L2-normalised embeddings galleria stores.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from galleria.errors import CompatibilityError, FormatError, InputError
from galleria.fingerprint import chain, digest, make_fingerprint
from galleria.io.artifact import check_fingerprint
from galleria.io.estimator import (
    HEADER_FILE,
    STATE_FILE,
    build,
    keyword_params,
    read_saved,
    save_estimator,
)
from galleria.train.config import TrainConfig
from galleria.validate import as_embeddings, l2_normalize

if TYPE_CHECKING:  # torch is imported only by the trained transforms
    from galleria.train.loop import ProgressFactory

logger = logging.getLogger(__name__)

ARTIFACT_TYPE = "transform"

__all__ = ["ARTIFACT_TYPE", "HEADER_FILE", "STATE_FILE", "NotFittedError", "Transform"]

T = TypeVar("T", bound="Transform")


SAVED_TRAIN_KEYS = ("epochs", "max_steps", "batch_size", "lr", "weight_decay", "val_fraction",
                    "patience", "lr_schedule", "seed")
"""Training options every trained transform's header records (the others only when set)."""


def flat_train(config: TrainConfig) -> dict[str, Any]:
    """``config`` as flat header params: :data:`SAVED_TRAIN_KEYS`, plus any other field
    that differs from its default."""
    default = TrainConfig()
    out = {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(config, f.name)
        if f.name in SAVED_TRAIN_KEYS or v != getattr(default, f.name):
            out[f.name] = v
    return out


class NotFittedError(InputError):
    """A transform was used (transform, save, fingerprint) before ``fit``."""


class Transform(abc.ABC):
    """Base class of the embedding transforms. Subclasses implement ``_fit`` and ``_project``.

    Class attributes:
        kind: registry name written into saved headers.
        format_version: version of the saved state layout.
        nested: whether prefixes of the output are meaningful embeddings, so that
            ``transform(X, dim=d)`` with ``d < output_dim_`` is allowed.
    """

    kind: ClassVar[str] = ""
    format_version: ClassVar[int] = 1
    nested: ClassVar[bool] = False
    default_train: ClassVar[TrainConfig | None] = None
    """Trained transforms: their training defaults (the ``train`` parameter overrides)."""

    # ---------------------------------------------------------------- params
    @classmethod
    def _param_names(cls) -> list[str]:
        return keyword_params(cls)

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters, as passed (scikit-learn convention)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def json_params(self) -> dict[str, Any]:
        """The parameters as JSON-able values (written to the header, hashed). A trained
        transform's ``train`` config is written flat (``epochs``, ``lr``...), the layout
        every saved transform has, so fingerprints of saved transforms do not change."""
        params = self.get_params()
        train = params.pop("train", None)
        if isinstance(train, TrainConfig):
            params.update(flat_train(train))
        return params

    @classmethod
    def params_from(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Constructor keywords from flat ones (a saved header, ``--param epochs=5``):
        training options are folded into ``train`` on the class's defaults."""
        if cls.default_train is None:
            return dict(params)
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        out = {k: v for k, v in params.items() if k not in names}
        flat = {k: v for k, v in params.items() if k in names}
        base = out.pop("train", None) or cls.default_train
        if isinstance(base, dict):
            base = dataclasses.replace(cls.default_train, **base)
        out["train"] = dataclasses.replace(base, **flat) if flat else base
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.json_params().items())
        return f"{type(self).__name__}({args})"

    # ---------------------------------------------------------------- fitting
    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "output_dim_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"this {self.kind!r} transform is not fitted yet: call fit(X) or load it first"
            )

    def fit(
        self: T,
        X: object,
        *,
        fingerprint: str | None = None,
        progress: ProgressFactory | None = None,
    ) -> T:
        """Learn the transform from unlabeled ``(N, D)`` embeddings; return ``self``.

        Args:
            X: ``(N, D)`` embeddings (gallery or any unlabeled set of the model).
            fingerprint: the fingerprint of the model that made ``X``; recorded
                and checked by :meth:`transform` and chained into
                :attr:`output_fingerprint`.
            progress: optional tqdm-like factory for training progress.
        """
        arr = as_embeddings(X, name="training embeddings")
        if arr.shape[0] < 2:
            raise InputError(f"need at least 2 training embeddings, got {arr.shape[0]}")
        for attr in [a for a in vars(self) if a.endswith("_") and not a.startswith("_")]:
            delattr(self, attr)  # refitting starts from scratch
        self.input_dim_ = int(arr.shape[1])
        self.input_fingerprint_ = fingerprint
        self._fit(l2_normalize(arr), progress=progress)
        if not hasattr(self, "output_dim_"):
            raise AssertionError(f"{type(self).__name__}._fit did not set output_dim_")
        logger.info(
            "fitted %s: %d -> %d on %d rows", self.kind, self.input_dim_, self.output_dim_,
            arr.shape[0],
        )
        return self

    @abc.abstractmethod
    def _fit(self, X: np.ndarray, *, progress: ProgressFactory | None) -> None:
        """Learn from L2-normalised ``(N, D)`` float32 rows; must set ``output_dim_``."""

    # ---------------------------------------------------------------- applying
    @property
    def output_dims(self) -> list[int] | None:
        """The output sizes ``transform(dim=...)`` accepts; None = any ``1..output_dim_``."""
        self._check_fitted()
        return None if self.nested else [self.output_dim_]

    def _resolve_dim(self, dim: int | None) -> int:
        if dim is None:
            return self.output_dim_
        d = int(dim)
        allowed = self.output_dims
        if allowed is None:
            if not 1 <= d <= self.output_dim_:
                raise InputError(
                    f"{self.kind!r} transform gives at most {self.output_dim_} dimensions; "
                    f"dim={d} asked"
                )
        elif d not in allowed:
            what = "is not nested and gives only" if not self.nested else "was trained for"
            raise InputError(f"{self.kind!r} transform {what} dim in {allowed}; dim={d} asked")
        return d

    def check_input(self, X: object, *, fingerprint: str | None = None) -> np.ndarray:
        """Validate ``(N, D)`` input against the fitted dimension and model fingerprint."""
        self._check_fitted()
        arr = as_embeddings(X, name="embeddings")
        if arr.shape[1] != self.input_dim_:
            raise CompatibilityError(
                f"{self.kind!r} transform was fitted on {self.input_dim_}-d embeddings "
                f"(model {self.input_fingerprint_!r}) but got {arr.shape[1]}-d embeddings"
                + (f" (model {fingerprint!r})" if fingerprint else "")
            )
        if (
            fingerprint is not None
            and self.input_fingerprint_ is not None
            and fingerprint != self.input_fingerprint_
        ):
            raise CompatibilityError(
                f"{self.kind!r} transform was fitted on embeddings of model "
                f"{self.input_fingerprint_!r}, got embeddings of model {fingerprint!r}"
            )
        return arr

    def transform(
        self,
        X: object,
        *,
        fingerprint: str | None = None,
        dim: int | None = None,
        normalize: bool = True,
    ) -> np.ndarray:
        """Map ``(N, D)`` embeddings to ``(N, d)`` float32, L2-normalised rows.

        Args:
            X: ``(N, input_dim_)`` embeddings (rows are L2-normalised first).
            fingerprint: the model fingerprint of ``X``; checked against the
                fitted one when both are known.
            dim: output size ``d`` (default ``output_dim_``); for nested
                transforms the first ``d`` coordinates, re-normalised.
            normalize: set False to get the raw projection (e.g. to inspect the
                latent covariance); retrieval wants the default.
        """
        arr = self.check_input(X, fingerprint=fingerprint)
        d = self._resolve_dim(dim)
        out = np.ascontiguousarray(self._project(l2_normalize(arr), d), dtype=np.float32)
        return l2_normalize(out) if normalize else out

    @abc.abstractmethod
    def _project(self, X: np.ndarray, dim: int) -> np.ndarray:
        """``(N, input_dim_)`` L2-normalised rows -> ``(N, dim)`` un-normalised outputs."""

    def fit_transform(
        self,
        X: object,
        *,
        fingerprint: str | None = None,
        progress: ProgressFactory | None = None,
        dim: int | None = None,
    ) -> np.ndarray:
        return self.fit(X, fingerprint=fingerprint, progress=progress).transform(
            X, fingerprint=fingerprint, dim=dim
        )

    # ---------------------------------------------------------------- state
    @abc.abstractmethod
    def _get_state(self) -> dict[str, np.ndarray]:
        """Learned arrays (names -> arrays) that fully determine ``_project``."""

    @abc.abstractmethod
    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`_get_state` (``input_dim_``/``output_dim_`` are already set)."""

    def _get_info(self) -> dict[str, Any]:
        """JSON-able learned extras for the header (training summary, sizes...)."""
        return {}

    def _set_info(self, info: dict[str, Any]) -> None:
        return None

    def state_digest(self) -> str:
        """Digest of the learned arrays (name, dtype, shape, bytes), order-independent."""
        self._check_fitted()
        state = self._get_state()
        parts: list[Any] = []
        for name in sorted(state):
            a = np.ascontiguousarray(state[name])
            parts += [name, str(a.dtype), list(a.shape), a.tobytes()]
        return digest(*parts)

    @property
    def output_fingerprint(self) -> str:
        """Fingerprint of the embeddings this transform produces.

        ``chain(input_fingerprint_, kind, params, state digest)``; when the input
        model is unknown (fitted without a fingerprint) it is ``<kind>@<digest>``.
        """
        self._check_fitted()
        parts = (self.json_params(), self.state_digest())
        if self.input_fingerprint_ is None:
            return make_fingerprint(self.kind, *parts)
        return chain(self.input_fingerprint_, self.kind, *parts)

    def output_fingerprint_at(self, dim: int | None) -> str:
        """Fingerprint of the size-``dim`` output (``<fp>#d<dim>`` below the full size)."""
        d = self._resolve_dim(dim)
        fp = self.output_fingerprint
        return fp if d == self.output_dim_ else f"{fp}#d{d}"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``header.json`` + the safetensors state into directory ``path`` (atomically)."""
        self._check_fitted()
        return save_estimator(
            path,
            type=ARTIFACT_TYPE,
            format_version=self.format_version,
            kind=self.kind,
            params=self.json_params(),
            fingerprint=self.input_fingerprint_,
            state=self._get_state(),
            output_fingerprint=self.output_fingerprint,
            input_dim=self.input_dim_,
            output_dim=self.output_dim_,
            info=self._get_info(),
        )

    @classmethod
    def load(cls: type[T], path: str | os.PathLike[str], *, fingerprint: str | None = None) -> T:
        """Read a transform written by :meth:`save`.

        Args:
            path: the directory given to ``save``.
            fingerprint: if given, the model fingerprint the caller's embeddings
                come from; a transform fitted on another model, or fitted without
                a fingerprint, raises CompatibilityError
                (:func:`galleria.io.artifact.check_fingerprint`).
        """
        p = Path(path)
        header, state = read_saved(
            p, type=ARTIFACT_TYPE, format_version=cls.format_version, kind=cls.kind or None
        )
        obj = build(cls, cls.params_from(header["params"]), where=p)
        try:
            obj.input_dim_ = int(header["input_dim"])
            obj.output_dim_ = int(header["output_dim"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{p}: incomplete transform header: {exc!r}") from exc
        obj.input_fingerprint_ = header.get("fingerprint")
        obj._set_info(header.get("info") or {})
        obj._set_state(state)
        if obj.output_fingerprint != header.get("output_fingerprint"):
            raise FormatError(
                f"{p}: state does not match its header (output fingerprint "
                f"{obj.output_fingerprint!r} != {header.get('output_fingerprint')!r})"
            )
        check_fingerprint(fingerprint, obj.input_fingerprint_, what=f"transform at {p}")
        return obj
