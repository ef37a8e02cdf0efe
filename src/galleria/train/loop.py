"""A generic, seeded minibatch training loop with early stopping on a held-out split.

The loop knows nothing about the model: it takes a ``torch.nn.Module``, a loss
function over a minibatch, and one or more ``(N, ...)`` arrays whose rows are
drawn together (for example embeddings and their teacher targets). A seeded
fraction of the rows is held out; training stops when the held-out loss has not
improved for ``patience`` epochs and the best weights are restored.

Nothing here sets the thread count or the device: that is the caller's
(entry point's) decision. Progress is reported through a passed-in factory
with the :class:`tqdm.tqdm` signature, so ``progress=tqdm.tqdm`` works.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from galleria.errors import GalleriaError, InputError
from galleria.train.config import TrainConfig

logger = logging.getLogger(__name__)

LossOutput = torch.Tensor | tuple[torch.Tensor, dict[str, float]]
LossFn = Callable[..., LossOutput]


class ProgressBar(Protocol):
    """What the loop calls on the object a progress factory returns (tqdm-compatible)."""

    def update(self, n: int = 1) -> Any: ...

    def close(self) -> Any: ...


#: ``progress(total=steps, desc=..., unit="batch", leave=False) -> ProgressBar``;
#: ``tqdm.tqdm`` fits. ``set_postfix(**kw)`` is called when the bar has it.
ProgressFactory = Callable[..., ProgressBar]


@dataclass(frozen=True)
class EpochStats:
    """One evaluation round: training-loss means since the previous round, held-out loss."""

    epoch: int
    train_loss: float
    val_loss: float | None
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)
    step: int = 0


@dataclass
class TrainResult:
    """What :func:`train` did: per-epoch history and where the kept weights come from."""

    history: list[EpochStats]
    best_epoch: int
    best_val_loss: float | None
    stopped_early: bool
    seconds: float
    n_train: int
    n_val: int
    epochs_run: int = 0
    steps_run: int = 0

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest (stored in transform headers)."""
        last = self.history[-1]
        return {
            "epochs_run": self.epochs_run,
            "steps_run": self.steps_run,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "final_train_loss": last.train_loss,
            "stopped_early": self.stopped_early,
            "seconds": round(self.seconds, 3),
            "n_train": self.n_train,
            "n_val": self.n_val,
        }


def split_indices(
    n: int, *, val_fraction: float, max_val: int, seed: int, min_val: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(train_idx, val_idx)`` split of ``n`` rows; val is empty if too small."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(round(n * val_fraction), max_val) if val_fraction > 0 else 0
    if n_val < min_val or n - n_val < 2:
        n_val = 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def seeded_init(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with its parameters initialised from ``seed``.

    Uses a forked RNG so the caller's global torch RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _as_tensors(arrays: np.ndarray | torch.Tensor | Sequence[Any]) -> list[torch.Tensor]:
    if isinstance(arrays, (np.ndarray, torch.Tensor)):
        arrays = [arrays]
    out = [a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a)) for a in arrays]
    if not out:
        raise InputError("train() needs at least one data array")
    n = out[0].shape[0]
    for t in out:
        if t.shape[0] != n:
            raise InputError(
                "all data arrays must have the same number of rows; got "
                f"{[t.shape[0] for t in out]}"
            )
    return out


def _split_loss(out: LossOutput) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, {}


def _evaluate(
    model: torch.nn.Module, loss_fn: LossFn, data: list[torch.Tensor], batch_size: int
) -> float:
    model.eval()
    n = data[0].shape[0]
    total, weight = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if stop - start < 2:
                continue
            loss, _ = _split_loss(loss_fn(*(t[start:stop] for t in data)))
            total += float(loss) * (stop - start)
            weight += stop - start
    model.train()
    return total / max(weight, 1)


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    data: np.ndarray | torch.Tensor | Sequence[Any],
    *,
    config: TrainConfig,
    progress: ProgressFactory | None = None,
    desc: str = "train",
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place with Adam(W) on minibatches of ``data``; keep the best weights.

    Training runs for at most ``config.epochs`` passes and ``config.max_steps``
    updates. The held-out loss is evaluated at the end of an epoch once at
    least ``config.min_eval_steps`` updates have passed since the previous
    evaluation (so tiny data sets are not judged every few steps), and at the
    end; ``patience`` counts evaluations.

    Args:
        model: the module whose parameters are optimised.
        loss_fn: ``loss_fn(*batch) -> loss`` or ``-> (loss, {name: value})`` where
            ``batch`` holds one ``(B, ...)`` float tensor per data array.
        data: one ``(N, ...)`` array or a sequence of arrays with the same ``N``;
            rows of all arrays are drawn together.
        config: hyper-parameters; ``config.seed`` fixes the split and the order.
        progress: optional tqdm-like factory (``tqdm.tqdm`` works).
        desc: label for the progress bar and the log.
        on_epoch: optional callback receiving the :class:`EpochStats` of each
            evaluation round.

    Returns:
        A :class:`TrainResult`. On return the model holds the weights with the
        lowest held-out loss (the last weights without a held-out split).
    """
    tensors = _as_tensors(data)
    n = tensors[0].shape[0]
    if n < 2:
        raise InputError(f"need at least 2 rows to train, got {n}")
    train_idx, val_idx = split_indices(
        n, val_fraction=config.val_fraction, max_val=config.max_val, seed=config.seed
    )
    train_t = [t[torch.from_numpy(train_idx)] for t in tensors]
    val_t = [t[torch.from_numpy(val_idx)] for t in tensors] if val_idx.size else []
    n_train = int(train_idx.size)
    batch = min(config.batch_size, n_train)
    steps_per_epoch = max(n_train // batch, 1)  # drop the ragged last batch (in-batch stats)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = None
    if config.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps))
        )
    gen = torch.Generator().manual_seed(int(config.seed))
    bar = progress(total=total_steps, desc=desc, unit="batch", leave=False) if progress else None

    history: list[EpochStats] = []
    best_loss = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = 0
    bad_rounds = 0
    stopped_early = False
    step = 0
    epoch = 0
    t_start = t_round = time.perf_counter()
    run_loss, run_steps = 0.0, 0
    run_parts: dict[str, float] = {}
    model.train()
    try:
        while step < total_steps:
            order = torch.randperm(n_train, generator=gen)
            for i in range(steps_per_epoch):
                if step >= total_steps:
                    break
                idx = order[i * batch : (i + 1) * batch]
                loss, parts = _split_loss(loss_fn(*(t[idx] for t in train_t)))
                if not torch.isfinite(loss):
                    raise GalleriaError(
                        f"{desc}: loss became {float(loss.detach())} at epoch {epoch + 1}, "
                        f"step {step + 1} (lr={config.lr}); lower the learning rate or check "
                        "the inputs"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                run_steps += 1
                run_loss += float(loss.detach())
                for k, v in parts.items():
                    run_parts[k] = run_parts.get(k, 0.0) + float(v)
                if bar is not None:
                    bar.update(1)
            epoch += 1
            if run_steps < config.min_eval_steps and step < total_steps:
                continue
            # ---- evaluation round
            train_loss = run_loss / run_steps
            parts_mean = {k: v / run_steps for k, v in run_parts.items()}
            val_loss = _evaluate(model, loss_fn, val_t, batch) if val_t else None
            now = time.perf_counter()
            stats = EpochStats(epoch, train_loss, val_loss, now - t_round, parts_mean, step)
            t_round = now
            run_loss, run_steps, run_parts = 0.0, 0, {}
            history.append(stats)
            logger.debug(
                "%s epoch %d (step %d): train %.5g val %s (%.1fs)",
                desc, epoch, step, train_loss, val_loss, stats.seconds,
            )
            if bar is not None and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{train_loss:.4g}", val=f"{val_loss:.4g}" if val_t else "-")
            if on_epoch is not None:
                on_epoch(stats)
            monitored = val_loss if val_loss is not None else train_loss
            if best_state is None or monitored < best_loss * (1.0 - config.min_delta):
                best_loss = monitored
                best_epoch = epoch
                bad_rounds = 0
                best_state = (
                    {k: v.detach().clone() for k, v in model.state_dict().items()} if val_t else {}
                )
            else:
                bad_rounds += 1
                if val_t and bad_rounds >= config.patience:
                    stopped_early = True
                    break
    finally:
        if bar is not None:
            bar.close()
    if val_t and best_state:
        model.load_state_dict(best_state)
    elif not val_t:
        best_epoch = epoch
    model.eval()
    seconds = time.perf_counter() - t_start
    logger.info(
        "%s: %d epochs / %d steps (best epoch %d, val %s) on %d rows in %.1fs%s",
        desc, epoch, step, best_epoch, f"{best_loss:.5g}" if val_t else "-", n_train, seconds,
        " (early stop)" if stopped_early else "",
    )
    return TrainResult(
        history=history,
        best_epoch=best_epoch,
        best_val_loss=best_loss if val_t else None,
        stopped_early=stopped_early,
        seconds=seconds,
        n_train=n_train,
        n_val=int(val_idx.size),
        epochs_run=epoch,
        steps_run=step,
    )
