"""The generic training loop: seeding, early stopping, progress, no global side effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from galleria.errors import GalleriaError, InputError
from galleria.train.loop import TrainConfig, seeded_init, split_indices, train


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one thread is fastest and immune to a busy machine (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _linear_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(600, 8)).astype(np.float32)
    w = rng.normal(size=(8, 1)).astype(np.float32)
    y = (X @ w + 0.01 * rng.normal(size=(600, 1))).astype(np.float32)
    return X, y


def _fit_linear(config: TrainConfig) -> tuple[torch.nn.Module, object]:
    X, y = _linear_problem()
    model = seeded_init(config.seed, lambda: torch.nn.Linear(8, 1))

    def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return torch.mean((model(xb) - yb) ** 2)

    return model, train(model, loss_fn, (X, y), config=config)


def test_learns_a_linear_regression_to_the_noise_floor():
    _, result = _fit_linear(TrainConfig(epochs=60, batch_size=64, lr=0.05, patience=5))
    assert result.best_val_loss is not None and result.best_val_loss < 1e-3
    assert result.n_train + result.n_val == 600 and result.n_val == 60


def test_same_seed_same_weights_and_history():
    cfg = TrainConfig(epochs=5, batch_size=64, lr=0.01, seed=3)
    m1, r1 = _fit_linear(cfg)
    m2, r2 = _fit_linear(cfg)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [h.train_loss for h in r1.history] == [h.train_loss for h in r2.history]
    m3, _ = _fit_linear(TrainConfig(epochs=5, batch_size=64, lr=0.01, seed=4))
    assert not torch.equal(m1.weight, m3.weight)


def test_early_stopping_restores_the_best_epoch():
    # Training pulls w towards 5, the held-out loss wants w = 1: the held-out
    # loss improves, then worsens; the loop must stop and restore the best w.
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    seen: list[float] = []

    def loss_fn(xb: torch.Tensor) -> torch.Tensor:
        target = 5.0 if model.training else 1.0
        return (model.weight.sum() - target) ** 2 + 0 * xb.sum()

    X = np.zeros((100, 1), np.float32)
    cfg = TrainConfig(
        epochs=100, batch_size=90, lr=0.1, patience=3, val_fraction=0.1, min_eval_steps=1
    )
    result = train(model, loss_fn, X, config=cfg,
                   on_epoch=lambda s: seen.append(float(model.weight.detach().sum())))
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + cfg.patience
    best = seen[result.best_epoch - 1]
    assert float(model.weight.detach().sum()) == pytest.approx(best)
    assert abs(best - 1.0) < 0.1
    assert not model.training


def test_without_holdout_it_runs_every_epoch():
    cfg = TrainConfig(epochs=4, batch_size=64, val_fraction=0.0, min_eval_steps=1)
    _, result = _fit_linear(cfg)
    assert len(result.history) == 4 and result.best_epoch == 4 and result.n_val == 0
    assert result.best_val_loss is None and result.steps_run == 4 * (600 // 64)


def test_step_budget_and_evaluation_rounds():
    # 540 training rows / 100 = 5 steps per epoch; evaluate every >= 12 steps
    cfg = TrainConfig(epochs=100, batch_size=100, max_steps=37, min_eval_steps=12, patience=99)
    _, result = _fit_linear(cfg)
    assert result.steps_run == 37 and result.epochs_run == 8
    assert [h.step for h in result.history] == [15, 30, 37]  # the last round is short
    assert [h.epoch for h in result.history] == [3, 6, 8]


def test_progress_factory_gets_tqdm_calls():
    calls: dict[str, object] = {"updates": 0, "postfix": 0}

    class Bar:
        def __init__(self, *, total: int, desc: str, unit: str, leave: bool) -> None:
            calls["total"], calls["desc"] = total, desc

        def update(self, n: int = 1) -> None:
            calls["updates"] = int(calls["updates"]) + n

        def set_postfix(self, **kw: object) -> None:
            calls["postfix"] = int(calls["postfix"]) + 1

        def close(self) -> None:
            calls["closed"] = True

    X, y = _linear_problem()
    model = torch.nn.Linear(8, 1)
    cfg = TrainConfig(epochs=3, batch_size=100, val_fraction=0.1, min_eval_steps=1)
    train(model, lambda a, b: torch.mean((model(a) - b) ** 2), (X, y), config=cfg,
          progress=Bar, desc="unit")
    assert calls["desc"] == "unit" and calls["total"] == 3 * (540 // 100)
    assert calls["updates"] == calls["total"] and calls["postfix"] == 3 and calls["closed"]


def test_tqdm_is_accepted_as_progress():
    tqdm = pytest.importorskip("tqdm")
    model, _ = _fit_linear(TrainConfig(epochs=1, batch_size=64))
    X, y = _linear_problem()
    train(model, lambda a, b: torch.mean((model(a) - b) ** 2), (X, y),
          config=TrainConfig(epochs=1, batch_size=64), progress=lambda **kw: tqdm.tqdm(
              disable=True, **kw))


def test_no_global_side_effects():
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    seeded_init(7, lambda: torch.nn.Linear(4, 4))
    _fit_linear(TrainConfig(epochs=1, batch_size=64))
    assert torch.equal(torch.rand(3), expected)  # global RNG stream untouched
    assert torch.get_num_threads() == threads


def test_seeded_init_is_reproducible():
    a = seeded_init(1, lambda: torch.nn.Linear(4, 4))
    b = seeded_init(1, lambda: torch.nn.Linear(4, 4))
    assert torch.equal(a.weight, b.weight)


def test_split_is_seeded_disjoint_and_complete():
    tr, va = split_indices(1000, val_fraction=0.2, max_val=150, seed=0)
    assert va.size == 150 and tr.size == 850
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(1000))
    _, va2 = split_indices(1000, val_fraction=0.2, max_val=150, seed=0)
    assert np.array_equal(va, va2)
    _, tiny = split_indices(5, val_fraction=0.1, max_val=10, seed=0)
    assert tiny.size == 0  # too small to hold out


def test_nan_loss_is_a_clear_error():
    model = torch.nn.Linear(2, 1)
    X = np.ones((20, 2), np.float32)
    with pytest.raises(GalleriaError, match="loss became nan"):
        train(model, lambda x: model(x).sum() * float("nan"), X,
              config=TrainConfig(epochs=1, batch_size=4))


def test_bad_inputs():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(InputError, match="same number of rows"):
        train(model, lambda a, b: a.sum(), (np.ones((4, 2), np.float32), np.ones((3, 1))),
              config=TrainConfig())
    with pytest.raises(InputError):
        TrainConfig(val_fraction=1.5)
    with pytest.raises(InputError):
        TrainConfig(lr_schedule="step")
