"""Adaptive-size embeddings by similarity-space distillation: SS2D, SSD and a Matryoshka baseline.

All three train a *student* ``f: R^D -> R^{d}`` on the raw embeddings to
reproduce a *teacher*'s in-batch cosine-similarity structure (docs/methods.md
section 2). The teacher defaults to an AE-SVC latent of size ``d_max`` fitted
on the same rows; any fitted transform, a transform spec or a callable can be
passed as ``teacher=``. The teacher is only needed while fitting.

- :class:`SS2D` (single-shot similarity-space distillation): one student of
  size ``d_max``; for every nested size ``d`` the prefix ``z[:, :d]`` is
  re-normalised and the loss is
  ``sum_d w_d * KL(softmax(S_T / t) || softmax(S_d / t))`` over the rows of the
  in-batch similarity matrices (see :func:`similarity_kl`). ``transform(X,
  dim=d)`` returns the first ``d`` coordinates, re-normalised.
- :class:`SSD`: the same loss trained separately for each size (one student
  per size) -- the upper bound SS2D is compared with; ``transform(dim=d)``
  uses the size-``d`` student and ``d`` must be one of ``sizes``.
- :class:`Matryoshka`: the Matryoshka-style baseline. Without labels, the
  usual unsupervised Matryoshka objective is to make every nested prefix keep
  the teacher's pairwise similarities (as in Matryoshka-Adaptor's pairwise
  loss): ``sum_d w_d * mean_{i != j} (S_T[i, j] - S_d[i, j])^2``. It uses the
  same student architecture, teacher, sizes, weights and training budget as
  SS2D, so the comparison isolates the loss: matching *values* of the
  similarities (MSE) versus matching each row's *neighbour distribution* (KL).

Design choices (measured on ROxford5k LOPQ, 128-d, 3 seeds; see the report
that came with this module):

- The diagonal (self-similarity, always 1) is removed from each row before
  the softmax / MSE: it carries no information and would dominate the softmax.
- ``temperature=0.05``: chosen without labels, by how well the student's
  10 nearest neighbours match the teacher's at the small sizes (0.02-0.05 best
  at d=16/32, 0.1-0.2 slightly better at d=64/128). Per-size weights default
  to 1.
- Student: ``student_layers=1`` (a linear map ``D -> d_max``, the cheapest at
  search time and 5x cheaper to train on 1280-d inputs) by default;
  ``student_layers=3`` is an MLP like the AE-SVC encoder (ReLU, hidden width
  ``(D + d_max) // 2``). On LOPQ the MLP was better at d=16 (+1.3 E-mAP) and
  worse at d=128 (-1.6); re-check on foundation-model embeddings.
- Inputs are scaled by ``sqrt(D)`` as in AE-SVC (the student's output is
  re-normalised, so this only conditions the optimisation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from galleria.errors import InputError
from galleria.train.config import TrainConfig
from galleria.train.loop import ProgressFactory, TrainResult, seeded_init, train
from galleria.transforms.aesvc import (
    INPUT_SCALES,
    default_dim,
    mlp,
    mlp_dims,
    numpy_to_state,
    run_batched,
    state_to_numpy,
)
from galleria.transforms.base import Transform
from galleria.validate import l2_normalize

logger = logging.getLogger(__name__)

TeacherSpec = None | str | dict[str, Any] | Transform | Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------- losses
def offdiag_rows(S: torch.Tensor) -> torch.Tensor:
    """``(B, B) -> (B, B - 1)``: each row without its diagonal entry."""
    B = S.shape[0]
    return S.flatten()[1:].view(B - 1, B + 1)[:, :-1].reshape(B, B - 1)


def cosine_matrix(z: torch.Tensor) -> torch.Tensor:
    """In-batch cosine similarities of ``(B, d)`` rows, ``(B, B)``."""
    zn = F.normalize(z, dim=1)
    return zn @ zn.T


def similarity_kl(
    S_teacher: torch.Tensor, S_student: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over rows of ``KL(softmax(S_T/t) || softmax(S_s/t))``, diagonals excluded."""
    log_p = F.log_softmax(offdiag_rows(S_teacher) / temperature, dim=1)
    log_q = F.log_softmax(offdiag_rows(S_student) / temperature, dim=1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def similarity_mse(S_teacher: torch.Tensor, S_student: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the off-diagonal similarities."""
    return torch.mean((offdiag_rows(S_teacher) - offdiag_rows(S_student)) ** 2)


def nested_loss(
    S_teacher: torch.Tensor,
    z: torch.Tensor,
    sizes: Sequence[int],
    weights: Sequence[float],
    pair_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, dict[str, float]]:
    """``sum_d w_d * pair_loss(S_T, cos(z[:, :d]))`` and the per-size values ``{"d16": ...}``."""
    total = z.new_zeros(())
    parts: dict[str, float] = {}
    for d, w in zip(sizes, weights, strict=True):
        value = pair_loss(S_teacher, cosine_matrix(z[:, :d]))
        total = total + w * value
        parts[f"d{d}"] = float(value.detach())
    return total, parts


def default_sizes(d_max: int) -> list[int]:
    """``16, 32, 64, ...`` below ``d_max``, then ``d_max``."""
    sizes = []
    s = 16
    while s < d_max:
        sizes.append(s)
        s *= 2
    return [*sizes, d_max]


# ---------------------------------------------------------------------- base
class _Distill(Transform):
    """Shared machinery: teacher, student MLP(s), input scaling, (de)serialisation."""

    nested = True
    per_size: ClassVar[bool] = False  # SSD: one student per size
    default_train = TrainConfig(epochs=100, max_steps=2000, batch_size=256, patience=5)

    def __init__(
        self,
        *,
        dim: int | None = None,
        sizes: Sequence[int] | None = None,
        size_weights: Sequence[float] | None = None,
        teacher: TeacherSpec = None,
        teacher_params: dict[str, Any] | None = None,
        temperature: float = 0.05,
        student_layers: int = 1,
        hidden: int | None = None,
        input_scale: str = "sqrt_dim",
        train: TrainConfig | None = None,
    ) -> None:
        self.dim = dim
        self.sizes = sizes
        self.size_weights = size_weights
        self.teacher = teacher
        self.teacher_params = teacher_params
        self.temperature = temperature
        self.student_layers = student_layers
        self.hidden = hidden
        self.input_scale = input_scale
        self.train = self.params_from({"train": train})["train"]

    # -- params
    def json_params(self) -> dict[str, Any]:
        params = super().json_params()
        params["teacher"] = _teacher_json(self.teacher)
        for key in ("sizes", "size_weights"):
            if params.get(key) is not None:
                params[key] = [v.item() if isinstance(v, np.generic) else v for v in params[key]]
        if params.get("teacher_params") is not None:
            params["teacher_params"] = dict(params["teacher_params"])
        return params

    def train_config(self) -> TrainConfig:
        return self.train

    # -- sizes
    def _resolve_sizes(self, D: int) -> tuple[int, list[int], list[float]]:
        if self.sizes is not None:
            sizes = sorted({int(s) for s in self.sizes})
            if not sizes or sizes[0] < 1:
                raise InputError(f"sizes must be positive integers, got {self.sizes}")
            d_max = sizes[-1] if self.dim is None else int(self.dim)
            if sizes[-1] != d_max:
                raise InputError(f"the largest size must equal dim: sizes={sizes}, dim={d_max}")
        else:
            d_max = default_dim(D, self.dim)
            sizes = default_sizes(d_max)
        if self.size_weights is None:
            weights = [1.0] * len(sizes)
        else:
            weights = [float(w) for w in self.size_weights]
            if len(weights) != len(sizes) or min(weights) < 0:
                raise InputError(
                    f"size_weights needs {len(sizes)} non-negative values (one per size "
                    f"{sizes}), got {self.size_weights}"
                )
        return d_max, sizes, weights

    # -- teacher
    def _teacher_embeddings(
        self, X: np.ndarray, d_max: int, progress: ProgressFactory | None
    ) -> np.ndarray:
        spec = self.teacher
        teacher: Transform | None = None
        if spec is None or isinstance(spec, (str, dict)):
            from galleria.transforms.registry import create_transform, transform_class

            if isinstance(spec, dict):
                if "kind" not in spec:
                    raise InputError(
                        f"cannot rebuild teacher {spec!r}: pass teacher= (a transform or callable)"
                    )
                kind, params = str(spec["kind"]), dict(spec.get("params") or {})
            else:
                kind, params = (spec or "aesvc"), {}
            params.update(self.teacher_params or {})
            params.setdefault("dim", d_max if kind not in ("center",) else None)
            if transform_class(kind).default_train is not None:
                params.setdefault("seed", self.train.seed)
            teacher = create_transform(kind, **params)
        elif isinstance(spec, Transform):
            teacher = spec
        elif callable(spec):
            T = np.asarray(spec(X), dtype=np.float32)
            if T.ndim != 2 or T.shape[0] != X.shape[0]:
                raise InputError(f"teacher callable must return ({X.shape[0]}, d), got {T.shape}")
            self.teacher_fingerprint_ = None
            return l2_normalize(T)
        else:
            raise InputError(f"teacher must be a transform, kind, spec or callable; got {spec!r}")
        if not teacher.is_fitted:
            teacher.fit(X, fingerprint=self.input_fingerprint_, progress=progress)
        self.teacher_fingerprint_ = teacher.output_fingerprint
        return teacher.transform(X, fingerprint=self.input_fingerprint_)

    # -- model
    def _scale(self) -> float:
        if self.input_scale not in INPUT_SCALES or self.input_scale == "standardize":
            raise InputError(
                f"input_scale must be 'sqrt_dim' or 'none' here, got {self.input_scale!r}"
            )
        return math.sqrt(self.input_dim_) if self.input_scale == "sqrt_dim" else 1.0

    def _build(self, d: int) -> nn.Module:
        return mlp(mlp_dims(self.input_dim_, d, self.student_layers, self.hidden))

    def _student_dims(self) -> list[int]:
        return list(self.sizes_) if self.per_size else [self.output_dim_]

    def _fit(self, X: np.ndarray, *, progress: ProgressFactory | None) -> None:
        d_max, sizes, weights = self._resolve_sizes(X.shape[1])
        if d_max > X.shape[1]:
            logger.info("%s: student output %d > input dim %d", self.kind, d_max, X.shape[1])
        self.output_dim_ = d_max
        self.sizes_ = sizes
        scale = self._scale()
        T = self._teacher_embeddings(X, d_max, progress)
        Xs = (X * np.float32(scale)).astype(np.float32)
        self.students_: dict[int, nn.Module] = {}
        self.train_results_: dict[int, TrainResult] = {}
        jobs = [(d, [d], [1.0]) for d in sizes] if self.per_size else [(d_max, sizes, weights)]
        for out_dim, job_sizes, job_weights in jobs:
            # every student starts from the same seed: SSD's size-d student and
            # SS2D's student differ only in their output width and loss
            student = seeded_init(self.train.seed, lambda d=out_dim: self._build(d))
            loss_fn = self._make_loss(student, job_sizes, job_weights)
            self.train_results_[out_dim] = train(
                student, loss_fn, (Xs, T), config=self.train_config(), progress=progress,
                desc=f"{self.kind} {X.shape[1]}->{out_dim}",
            )
            self.students_[out_dim] = student

    def _make_loss(
        self, student: nn.Module, sizes: list[int], weights: list[float]
    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]:
        pair = self._pair_loss()

        def loss_fn(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            S_T = t @ t.T  # teacher rows are L2-normalised
            return nested_loss(S_T, student(x), sizes, weights, pair)

        return loss_fn

    def _pair_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        t = float(self.temperature)
        if t <= 0:
            raise InputError(f"temperature must be > 0, got {t}")
        return lambda S_T, S_d: similarity_kl(S_T, S_d, t)

    def _project(self, X: np.ndarray, dim: int) -> np.ndarray:
        Xs = (X * np.float32(self._scale())).astype(np.float32)
        if self.per_size:
            return run_batched(self.students_[dim], Xs)
        return run_batched(self.students_[self.output_dim_], Xs)[:, :dim]

    # -- persistence
    def _get_state(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        for d, student in sorted(self.students_.items()):
            state.update(state_to_numpy(student, f"student{d}."))
        return state

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        self.students_ = {}
        for d in self._student_dims():
            student = self._build(d)
            numpy_to_state(student, state, f"student{d}.")
            student.eval()
            self.students_[d] = student

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "sizes": list(self.sizes_),
            "teacher_fingerprint": getattr(self, "teacher_fingerprint_", None),
        }
        results = getattr(self, "train_results_", None)
        if results:
            info["training"] = {str(d): r.summary() for d, r in results.items()}
        elif hasattr(self, "info_"):
            info["training"] = self.info_.get("training")
        return info

    def _set_info(self, info: dict[str, Any]) -> None:
        self.info_ = dict(info)
        self.sizes_ = [int(s) for s in info["sizes"]]
        self.teacher_fingerprint_ = info.get("teacher_fingerprint")


def _teacher_json(teacher: TeacherSpec) -> Any:
    if teacher is None or isinstance(teacher, (str, dict)):
        return teacher
    if isinstance(teacher, Transform):
        spec: dict[str, Any] = {"kind": teacher.kind, "params": teacher.json_params()}
        if teacher.is_fitted:
            spec["output_fingerprint"] = teacher.output_fingerprint
        return spec
    name = getattr(teacher, "__qualname__", type(teacher).__qualname__)
    return {"callable": f"{getattr(teacher, '__module__', '?')}.{name}"}


# ---------------------------------------------------------------------- kinds
class SS2D(_Distill):
    """Single-shot similarity-space distillation into nested prefixes.

    Args:
        dim: ``d_max``, the student's output size (default ``max(sizes)`` or
            ``min(D, 256)``).
        sizes: nested prefix sizes in the loss (default 16, 32, ... , ``d_max``).
        size_weights: per-size loss weights (default all 1).
        teacher: None / ``"aesvc"`` (default: an AE-SVC of size ``d_max`` fitted
            on the same rows), another kind, a spec ``{"kind", "params"}``, a
            (fitted or unfitted) :class:`Transform`, or a callable
            ``(N, D) -> (N, d_T)``.
        teacher_params: parameters for a teacher built from a kind/spec.
        temperature: softmax temperature ``t`` of the similarity rows.
        student_layers, hidden: student depth (1 = linear, the default) and
            hidden width (default ``(D + d_max) // 2``).
        input_scale: ``"sqrt_dim"`` (default) or ``"none"``.
        train: training (:class:`~galleria.train.config.TrainConfig`),
            the same budget for every student.
    """

    kind = "ss2d"


class SSD(_Distill):
    """Similarity-space distillation with one student per size (SS2D's upper bound).

    Same parameters as :class:`SS2D`; every size gets the full training budget.
    ``transform(X, dim=d)`` needs ``d`` in ``sizes``.
    """

    kind = "ssd"
    per_size = True

    @property
    def output_dims(self) -> list[int] | None:
        self._check_fitted()
        return list(self.sizes_)


class Matryoshka(_Distill):
    """Matryoshka-style baseline: every nested prefix regresses the teacher's similarities.

    Loss ``sum_d w_d * mean_{i != j} (S_T[i, j] - S_d[i, j])^2`` with the same
    student, teacher, sizes and training budget as :class:`SS2D` (there is no
    temperature).
    """

    kind = "matryoshka"

    def __init__(
        self,
        *,
        dim: int | None = None,
        sizes: Sequence[int] | None = None,
        size_weights: Sequence[float] | None = None,
        teacher: TeacherSpec = None,
        teacher_params: dict[str, Any] | None = None,
        student_layers: int = 1,
        hidden: int | None = None,
        input_scale: str = "sqrt_dim",
        train: TrainConfig | None = None,
    ) -> None:
        super().__init__(
            dim=dim, sizes=sizes, size_weights=size_weights, teacher=teacher,
            teacher_params=teacher_params, student_layers=student_layers, hidden=hidden,
            input_scale=input_scale, train=train,
        )
        del self.temperature

    def _pair_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return similarity_mse
