"""Hyper-parameters of the training loop, as one value (no torch import)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from galleria.errors import InputError


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    Attributes:
        epochs: maximum number of passes over the training rows.
        batch_size: rows per minibatch (clipped to the number of training rows).
            In-batch losses (covariance, similarity matrices) want it large.
        lr: Adam learning rate.
        weight_decay: Adam (decoupled, AdamW) weight decay.
        val_fraction: fraction of rows held out for early stopping (0 disables
            early stopping: the last epoch is kept).
        max_val: cap on the number of held-out rows.
        patience: epochs without a relative improvement of ``min_delta`` in the
            held-out loss before stopping.
        min_delta: relative improvement that counts (``best * (1 - min_delta)``).
        seed: seeds the split and the shuffling (model initialisation is seeded
            by the caller, see :func:`seeded_init`).
        grad_clip: clip the global gradient norm to this value (None = off).
        lr_schedule: ``"constant"`` or ``"cosine"`` (cosine decay to 0 over the
            step budget; early stopping still applies).
        max_steps: cap on the number of updates (the budget that matters for
            large data: ``epochs`` bounds small data, ``max_steps`` large data).
        min_eval_steps: evaluate the held-out loss only after at least this many
            updates since the last evaluation (and at the end of training).
    """

    epochs: int = 20
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    max_val: int = 10_000
    patience: int = 3
    min_delta: float = 1e-3
    seed: int = 0
    grad_clip: float | None = None
    lr_schedule: str = "constant"
    max_steps: int | None = None
    min_eval_steps: int = 50

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise InputError(f"batch_size must be >= 2, got {self.batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if self.patience < 1:
            raise InputError(f"patience must be >= 1, got {self.patience}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise InputError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"max_steps must be >= 1 or None, got {self.max_steps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
