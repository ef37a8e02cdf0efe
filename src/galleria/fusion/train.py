"""Joint training of the mixer and the light query model (AFF, docs/methods.md, AFF).

``L = ArcFace(g_mix; W_mix) + ArcFace(q; W_q)``: ``g_mix`` is the mixer's output on
the cached member features of an image, ``q`` the query tail's output on one of
its cached trunk views; ``W_mix`` is trained by gradient and ``W_q`` follows it,
``W_q <- a W_q + (1 - a) W_mix`` after every step. ``schedule="two-stage"`` (a
baseline) trains the mixer alone first and then the query tail against the
frozen mixer classifier.

Labels are class or instance labels, or one class per image (instance
discrimination: the query views are phone-like augmentations of the image the
mixer sees clean). Early stopping watches retrieval on a held-out part of the
training data: a seeded ``val_fraction`` of the classes (of the images, for
instance discrimination); the score is the mean of the symmetric (mixer ->
mixer) and asymmetric (query -> mixer) mAP there (asymmetric only for instance
discrimination, where an image has no other positive). The best epoch's
weights are kept.

Resumable: after every epoch the whole state (weights, optimiser moments,
best weights, history) is written atomically to one safetensors file; a rerun
with the same data and recipe continues from it and ends with the same weights
as an uninterrupted run (every random draw is a function of the seed, the stage
and the epoch; there is no dropout).

Nothing here sets thread counts (the entry point does).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from galleria.errors import CompatibilityError, InputError
from galleria.fingerprint import digest
from galleria.fusion.anchor import held_out_map
from galleria.fusion.arcface import arcface_loss, momentum_update_
from galleria.fusion.checkpoint import load_checkpoint, load_opt_state, save_checkpoint
from galleria.fusion.mixer import InputSpec, as_mixer_inputs, build_mixer, check_inputs, mix
from galleria.fusion.query_model import QueryTail, build
from galleria.fusion.recipe import QUERY_INITS, SCHEDULES, FusionRecipe
from galleria.fusion.start import initialise, views_tensor

__all__ = ["QUERY_INITS", "SCHEDULES", "FusionRecipe", "TrainingData", "fit_fusion"]

log = logging.getLogger(__name__)

#: learning rate of an anchored mixer's gate, relative to ``lr``
GATE_LR_FACTOR = 10.0
PATIENCE_STEPS = 32


@dataclass
class TrainingData:
    """What a fusion model is trained on (one row per image).

    Attributes:
        specs: the mixer inputs (member features), in order.
        features: one ``(N, spec.stored_dim)`` float32 array per spec.
        views: ``(N, V, *trunk_out)`` float16 cached query-trunk outputs (view 0 clean).
        labels: ``(N,)`` int64 labels; all distinct = instance discrimination.
    """

    specs: list[InputSpec]
    features: list[np.ndarray]
    views: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        n = int(self.labels.shape[0])
        if len(self.features) != len(self.specs):
            raise InputError(f"{len(self.specs)} specs but {len(self.features)} feature arrays")
        for s, f in zip(self.specs, self.features, strict=True):
            if f.shape != (n, s.stored_dim):
                raise InputError(f"{s.name}: features must be ({n}, {s.stored_dim}), got {f.shape}")
        if self.views.shape[0] != n:
            raise InputError(f"{self.views.shape[0]} view rows for {n} labels")
        if n < 4:
            raise InputError(f"need at least 4 training images, got {n}")

    @property
    def instance_discrimination(self) -> bool:
        return len(np.unique(self.labels)) == len(self.labels)

    def digest(self) -> str:
        return digest([s.to_dict() for s in self.specs], self.labels.tobytes(),
                      list(self.views.shape), [float(np.asarray(f[:64], np.float64).sum())
                                               for f in self.features])


@dataclass
class EpochRecord:
    """One epoch (epoch 0: the untrained start, no losses) of one stage; mean losses."""

    stage: str
    epoch: int
    loss: float | None
    loss_mix: float | None
    loss_query: float | None
    val_sym: float | None
    val_asym: float | None
    score: float
    seconds: float
    cpu_seconds: float = 0.0
    loss_distill: float | None = 0.0
    gate: float | None = None


@dataclass
class FitResult:
    """A trained mixer and query tail (best epoch) and how training went."""

    mixer: torch.nn.Module
    tail: QueryTail
    w_mix: torch.Tensor
    recipe: FusionRecipe
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: dict[str, int] = field(default_factory=dict)
    stopped_early: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0
    n_classes: int = 0
    resumed_from: int | None = None
    init: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"init": self.init, "best_epoch": self.best_epoch,
                "stopped_early": self.stopped_early,
                "seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
                "n_train": self.n_train, "n_val": self.n_val,
                "n_classes": self.n_classes, "resumed_from": self.resumed_from,
                "history": [asdict(h) for h in self.history]}


# ----------------------------------------------------------------------------- helpers
def split_train_val(labels: np.ndarray, val_fraction: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(train rows, val rows)``: whole classes are held out (images, if all distinct)."""
    n = len(labels)
    rng = np.random.default_rng([seed, 7])
    classes = np.unique(labels)
    if val_fraction <= 0:
        return np.arange(n), np.zeros(0, np.int64)
    if len(classes) == n:
        perm = rng.permutation(n)
        k = max(2, round(n * val_fraction))
        return np.sort(perm[k:]), np.sort(perm[:k])
    multi = [c for c in classes if (labels == c).sum() >= 2]
    k = max(2, round(len(classes) * val_fraction))
    if len(multi) < k + 1:
        return np.arange(n), np.zeros(0, np.int64)
    held = set(rng.permutation(np.asarray(multi))[:k].tolist())
    val = np.array([i for i in range(n) if labels[i] in held], np.int64)
    train = np.array([i for i in range(n) if labels[i] not in held], np.int64)
    return train, val


@torch.no_grad()
def embed_views(tail: QueryTail, views: np.ndarray, *, view: int = 0, batch: int = 128
                ) -> np.ndarray:
    """``(N, d)`` L2-normalised query embeddings of cached trunk outputs ``views[:, view]``."""
    was = tail.training
    tail.eval()
    out = []
    try:
        for s in range(0, views.shape[0], batch):
            rows = np.arange(s, min(s + batch, views.shape[0]))
            q = tail(views_tensor(views, rows, np.full(len(rows), view)))
            out.append(torch.nn.functional.normalize(q, dim=1).numpy())
    finally:
        tail.train(was)
    return np.concatenate(out)


def _state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


class _Run:
    """The modules and optimiser of one training run (what a checkpoint holds)."""

    def __init__(self, data: TrainingData, recipe: FusionRecipe, n_classes: int,
                 build_tail: Callable[[], QueryTail]) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            self.mixer = build_mixer(recipe.mixer, data.specs, d=recipe.d, layers=recipe.layers,
                                     heads=recipe.heads, anchor=recipe.anchor)
            w = torch.randn(n_classes, recipe.d)
            self.w_mix = torch.nn.Parameter(torch.nn.functional.normalize(w, dim=1))
            self.w_q = self.w_mix.detach().clone()
        self.tail = build_tail()

    def modules_state(self) -> dict[str, torch.Tensor]:
        out = {f"mixer.{k}": v for k, v in self.mixer.state_dict().items()}
        out.update({f"tail.{k}": v for k, v in self.tail.state_dict().items()})
        out["w_mix"] = self.w_mix.data
        out["w_q"] = self.w_q
        return out

    def load_modules(self, state: dict[str, torch.Tensor]) -> None:
        self.mixer.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("mixer.")})
        self.tail.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("tail.")})
        with torch.no_grad():
            self.w_mix.copy_(state["w_mix"])
            self.w_q.copy_(state["w_q"])

    def optimizer(self, recipe: FusionRecipe, stage: str) -> torch.optim.Optimizer:
        groups = []
        if stage in ("joint", "mixer"):
            gate = [p for n, p in self.mixer.named_parameters() if n == "gate"]
            rest = [p for n, p in self.mixer.named_parameters() if n != "gate"]
            groups.append({"params": [*rest, self.w_mix], "lr": recipe.lr, "base_lr": recipe.lr})
            if gate:  # one scalar: AdamW moves it ~lr per step; no decay pulling it shut
                groups.append({"params": gate, "lr": GATE_LR_FACTOR * recipe.lr,
                               "base_lr": GATE_LR_FACTOR * recipe.lr, "weight_decay": 0.0})
        if stage in ("joint", "query"):
            trunk_params = [p for n, p in self.tail.named_parameters()
                            if not n.startswith("whiten")]
            if trunk_params:
                groups.append({"params": trunk_params, "lr": recipe.query_lr,
                               "base_lr": recipe.query_lr})
            groups.append({"params": list(self.tail.whiten.parameters()), "lr": recipe.lr,
                           "base_lr": recipe.lr})
        return torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)


def _describe(specs: Sequence[InputSpec], recipe: dict[str, Any], other: dict[str, Any]
              ) -> str:
    members = ", ".join(f"{s.name} {s.fingerprint} ({s.stored_dim}-d)" for s in specs)
    diff = {k: recipe.get(k) for k in sorted(set(recipe) | set(other))
            if recipe.get(k) != other.get(k)}
    return f"members [{members}], recipe {diff or '(same)'}"


def _gate(mixer: torch.nn.Module) -> float | None:
    g = getattr(mixer, "gate", None)
    return None if g is None else round(float(g.detach()), 5)


# ----------------------------------------------------------------------------- training
def fit_fusion(
    data: TrainingData,
    recipe: FusionRecipe,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: Callable[..., Any] | None = None,
    build_tail: Callable[[], QueryTail] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    checkpoint_seconds: float = 0.0,
) -> FitResult:
    """Train a mixer and a query tail on ``data`` (see the module docstring).

    Args:
        checkpoint: file to write after each epoch and to resume from when it exists
            (refused, naming both, when it was made for other members, dims or recipe).
        progress: tqdm-like factory (``progress(total=, desc=, unit=)``).
        build_tail: builds the (pretrained) query tail; default
            :func:`galleria.fusion.query_model.build` of ``recipe.query_model``.
        on_epoch: called with each epoch's record after its checkpoint is written.
        checkpoint_seconds: write the per-epoch checkpoint only when at least this many
            seconds passed since the last one (0: every epoch). A stage's end is always
            written. The file holds the optimiser moments and the best weights (~180 MB
            for the default recipe): on a small data set (SMVS, 3 steps per epoch) writing
            it every epoch costs more than the epoch; a kill then loses at most this long.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    labels = np.asarray(data.labels, np.int64)
    _, labels = np.unique(labels, return_inverse=True)
    labels = labels.astype(np.int64)
    train_rows, val_rows = split_train_val(labels, recipe.val_fraction, recipe.seed)
    _, y_train = np.unique(labels[train_rows], return_inverse=True)
    y_train = y_train.astype(np.int64)
    n_classes = int(y_train.max()) + 1
    inst = data.instance_discrimination
    if build_tail is None:
        def build_tail() -> QueryTail:
            return build(recipe.query_model, recipe.train_blocks, recipe.d,
                         normalize=recipe.query_norm)[1]

    run = _Run(data, recipe, n_classes, build_tail)
    if run.tail.normalize != recipe.query_norm:
        raise InputError(f"the query tail normalises its pooled features: {run.tail.normalize},"
                         f" the recipe's query_norm: {recipe.query_norm}")
    init_info = initialise(run.mixer, run.tail, data, recipe, train_rows, val_rows)

    stages = ["joint"] if recipe.schedule == "joint" else ["mixer", "query"]
    feats_train = [f[train_rows] for f in data.features]
    feats_val = [f[val_rows] for f in data.features] if len(val_rows) else []
    views_train = data.views[train_rows]
    views_val = data.views[val_rows] if len(val_rows) else None
    y_val = labels[val_rows]
    batch = min(recipe.batch_size, len(train_rows))
    steps_per_epoch = max(1, len(train_rows) // batch)
    key = {"data": data.digest(), "recipe": recipe.to_dict()}

    result = FitResult(mixer=run.mixer, tail=run.tail, w_mix=run.w_mix, recipe=recipe,
                       n_train=len(train_rows), n_val=len(val_rows), n_classes=n_classes,
                       init=init_info)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    resume: dict[str, Any] | None = None
    tensors: dict[str, torch.Tensor] = {}
    groups = ""
    if ckpt is not None and ckpt.is_file():
        tensors, md = load_checkpoint(ckpt)
        resume, groups = json.loads(md["meta"]), md["opt_groups"]
        old = [InputSpec.from_dict(s) for s in resume["specs"]]
        if {**resume["key"], "recipe": FusionRecipe.from_dict(resume["key"]["recipe"]).to_dict()
            } != key:
            raise CompatibilityError(
                f"{ckpt} was written for "
                f"{_describe(old, resume['key']['recipe'], recipe.to_dict())} but this run trains "
                f"{_describe(data.specs, recipe.to_dict(), resume['key']['recipe'])} (or the data "
                "differ); delete "
                "the checkpoint or train into another --out"
            )
        check_inputs(old, data.specs)
        result.history = [EpochRecord(**h) for h in resume["history"]]
        result.best_epoch = dict(resume["best_epoch"])
        result.stopped_early = dict(resume["stopped_early"])
        result.resumed_from = sum(1 for h in result.history if h.epoch > 0)  # epochs trained
        log.info("resuming %s after %d epochs", ckpt, result.resumed_from)

    last_save = [time.monotonic()]

    def save(si: int, epoch: int, done: bool, opt: torch.optim.Optimizer,
             best: dict[str, torch.Tensor], best_score: float, bad: int, stopped: bool) -> None:
        if ckpt is None:
            return
        if not done and not stopped and time.monotonic() - last_save[0] < checkpoint_seconds:
            return
        last_save[0] = time.monotonic()
        meta = {"key": key, "specs": [s.to_dict() for s in data.specs], "stage_index": si,
                "stage_epoch": epoch, "stage_done": done, "best_score": best_score, "bad": bad,
                "stopped": stopped, "history": [asdict(h) for h in result.history],
                "best_epoch": result.best_epoch, "stopped_early": result.stopped_early}
        save_checkpoint(ckpt, run, opt, best, meta)

    n_epochs = max(recipe.epochs, math.ceil(recipe.min_steps / steps_per_epoch))
    per_stage = n_epochs * steps_per_epoch
    # patience is counted in units of ~PATIENCE_STEPS steps, and not during the warm-up:
    # on SMVS (3 steps per epoch) 5 epochs of patience stopped training at epoch 6, in
    # the warm-up, keeping epoch 1's weights
    patience = recipe.patience * max(1, math.ceil(PATIENCE_STEPS / steps_per_epoch))
    warm_epochs = math.ceil(recipe.warmup * per_stage / steps_per_epoch)
    bar = progress(total=len(stages) * per_stage, desc="fusion train", unit="step") \
        if progress else None
    try:
        for si, stage in enumerate(stages):
            opt = run.optimizer(recipe, stage)
            best, best_score, bad, stopped, epoch = _state(run.modules_state()), -math.inf, 0, \
                False, 0
            if resume is not None and si <= resume["stage_index"]:
                if si < resume["stage_index"]:
                    if bar is not None:
                        bar.update(per_stage)
                    continue
                run.load_modules({k[4:]: v for k, v in tensors.items() if k.startswith("cur.")})
                if resume["stage_done"]:
                    if bar is not None:
                        bar.update(per_stage)
                    continue
                load_opt_state(opt, tensors, groups)
                best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
                best_score, bad = float(resume["best_score"]), int(resume["bad"])
                stopped, epoch = bool(resume["stopped"]), int(resume["stage_epoch"])
                if bar is not None:
                    bar.update(epoch * steps_per_epoch)
            if epoch == 0 and views_val is not None:  # the start is a candidate too (epoch 0)
                sym, asym = _validate(run, stage, inst, feats_val, views_val, y_val,
                                      data.views.shape[1])
                start = _score(sym, asym)
                if start is not None:
                    best_score = start
                    result.best_epoch[stage] = 0
                    result.history.append(EpochRecord(stage, 0, None, None, None, sym, asym,
                                                      best_score, 0.0, loss_distill=None,
                                                      gate=_gate(run.mixer)))
            while epoch < n_epochs and not stopped:
                te, ce = time.perf_counter(), time.process_time()
                rng = np.random.default_rng([recipe.seed, si, epoch])
                order = rng.permutation(len(train_rows))
                which = rng.integers(0, data.views.shape[1], size=len(train_rows))
                sums = np.zeros(4)
                run.mixer.train(stage != "query")
                run.tail.train(stage != "mixer")
                for i in range(steps_per_epoch):
                    t = (epoch * steps_per_epoch + i) / per_stage
                    ramp = min(1.0, (t + 1.0 / per_stage) / recipe.warmup) if recipe.warmup else 1.0
                    for g in opt.param_groups:
                        g["lr"] = g["base_lr"] * (1.0 - t) * ramp
                    idx = order[i * batch:(i + 1) * batch]
                    yb = torch.from_numpy(y_train[idx])
                    loss_m = loss_q = loss_d = torch.zeros(())
                    g_mix = None
                    if stage != "query":
                        g_mix = run.mixer(as_mixer_inputs(data.specs,
                                                          [f[idx] for f in feats_train]))
                        loss_m = arcface_loss(g_mix, run.w_mix, yb, margin=recipe.margin,
                                              scale=recipe.scale)
                    if stage != "mixer":
                        q = run.tail(views_tensor(views_train, idx, which[idx]))
                        w = run.w_q if stage == "joint" else run.w_mix.detach()
                        loss_q = arcface_loss(q, w, yb, margin=recipe.margin, scale=recipe.scale)
                        if recipe.distill > 0:
                            if g_mix is None:
                                with torch.no_grad():
                                    g_mix = run.mixer(as_mixer_inputs(
                                        data.specs, [f[idx] for f in feats_train]))
                            loss_d = recipe.distill * (1.0 - torch.nn.functional.cosine_similarity(
                                q, g_mix.detach(), dim=1)).mean()
                    loss = loss_m + loss_q + loss_d
                    if not torch.isfinite(loss):
                        raise InputError(f"fusion training diverged (loss {float(loss)}) at "
                                         f"{stage} epoch {epoch + 1}; lower the learning rate")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if stage == "joint":
                        momentum_update_(run.w_q, run.w_mix, recipe.momentum)
                    sums += [float(loss.detach()), float(loss_m.detach()), float(loss_q.detach()),
                             float(loss_d.detach())]
                    if bar is not None:
                        bar.update(1)
                epoch += 1
                sym, asym = _validate(run, stage, inst, feats_val, views_val, y_val,
                                      data.views.shape[1])
                score = _score(sym, asym)
                if score is None:  # no held-out split: the training loss decides
                    score = -float(sums[0] / steps_per_epoch)
                mean = (sums / steps_per_epoch).tolist()
                rec = EpochRecord(stage, epoch, *mean[:3], sym, asym, score,
                                  time.perf_counter() - te, time.process_time() - ce,
                                  loss_distill=mean[3], gate=_gate(run.mixer))
                result.history.append(rec)
                log.info("fusion %s epoch %d: loss %.4f (mix %.4f, query %.4f) val sym %s "
                         "asym %s (%.1fs)", stage, epoch, rec.loss, rec.loss_mix, rec.loss_query,
                         sym, asym, rec.seconds)
                if bar is not None and hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{rec.loss:.3f}", val=f"{score:.3f}")
                if score > best_score + 1e-4:
                    best_score, bad = score, 0
                    best = _state(run.modules_state())
                    result.best_epoch[stage] = epoch
                elif epoch > warm_epochs:
                    bad += 1
                    stopped = bad >= patience and views_val is not None
                result.stopped_early[stage] = stopped
                if stopped and bar is not None:
                    bar.update((n_epochs - epoch) * steps_per_epoch)
                save(si, epoch, False, opt, best, best_score, bad, stopped)
                if on_epoch is not None:
                    on_epoch(rec)
            run.load_modules(best)
            save(si, epoch, True, opt, best, best_score, bad, True)
    finally:
        if bar is not None:
            bar.close()
    run.mixer.eval()
    run.tail.eval()
    result.seconds = time.perf_counter() - t0
    result.cpu_seconds = time.process_time() - c0
    return result


def _score(sym: float | None, asym: float | None) -> float | None:
    """Early-stopping score: the mean of the held-out mAPs measured (None: neither)."""
    parts = [v for v in (sym, asym) if v is not None]
    return float(np.mean(parts)) if parts else None


def _validate(run: _Run, stage: str, inst: bool, feats_val: list[np.ndarray],
              views_val: np.ndarray | None, y_val: np.ndarray, n_views: int
              ) -> tuple[float | None, float | None]:
    """Held-out (symmetric, asymmetric) mAP; None where not measured."""
    if views_val is None:
        return None, None
    g_val = mix(run.mixer, feats_val)
    sym = held_out_map(g_val, g_val, y_val, True) if not inst and stage != "query" else None
    asym = None
    if stage != "mixer":
        q_val = embed_views(run.tail, views_val, view=1 if inst and n_views > 1 else 0)
        asym = held_out_map(q_val, g_val, y_val, not inst)
    return sym, asym
