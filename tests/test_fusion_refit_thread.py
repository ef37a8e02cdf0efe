"""The service's background fusion refit (``galleria.fusion.grow.schedule_refit``): scheduled
by an upload past the refit point with the service's runtime, stopped and joined by
``Engine.stop`` within a bound, and not retried on every upload after a failure. The refit job
itself is replaced by one that embeds forever (or fails): what is tested is the thread's
life, not the fit (tests/test_fusion_grow.py runs real refits)."""

from __future__ import annotations

import threading
import time

import numpy as np

from galleria.fusion import grow
from galleria.service.engine import Engine, ServiceConfig
from galleria.service.items import _after_add
from galleria.store.gallery import Gallery
from galleria.validate import l2_normalize


def _fused_gallery(path, n: int = 6):
    rng = np.random.default_rng(0)
    with Gallery.open_or_create(path) as g:
        g.register_space("fused", 4, {"config": {"type": "fusion-gallery", "model": "m"}})
        x = l2_normalize(rng.standard_normal((n, 4)).astype(np.float32))
        g.add([f"i{k}" for k in range(n)], x, space="fused")
        g.set_setting("fusion", {"n_items": 4, "refit_at": 5})  # 6 >= 5: due
    return path


def test_engine_stop_stops_and_joins_the_background_refit(tmp_path, monkeypatch):
    seen: dict = {}
    started = threading.Event()

    def embedding_forever(g, **kw):  # a refit's embedding stage: one progress step per item
        seen.update(kw)
        bar = kw["progress"](total=10**9, desc="light vectors", unit="img")
        started.set()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:  # bounded if the stop signal never came
            bar.update(1)
            time.sleep(0.005)
        return None

    monkeypatch.setattr(grow, "refit_if_due", embedding_forever)
    eng = Engine(ServiceConfig(gallery=_fused_gallery(tmp_path / "G"), warm_up=False,
                               threads=1, runtime="cpu"))
    _after_add(eng)
    assert len(eng.background) == 1 and started.wait(10)
    assert seen["runtime"] == "cpu" and seen["threads"] == 1
    _after_add(eng)  # one at a time
    assert len(eng.background) == 1
    t0 = time.monotonic()
    eng.stop()
    assert time.monotonic() - t0 < 5 and not eng.background[0].is_alive()


def test_a_failed_refit_is_not_retried_on_every_upload(tmp_path, monkeypatch):
    calls: list[int] = []

    def failing(g, **kw):
        calls.append(1)
        raise RuntimeError("refit failed")

    monkeypatch.setattr(grow, "refit_if_due", failing)
    monkeypatch.setattr(grow, "_failed", {})
    path = _fused_gallery(tmp_path / "G")
    t = grow.schedule_refit(path, threads=1)
    assert t is not None
    t.join(10)
    assert grow.schedule_refit(path, threads=1) is None  # backing off: 6 items, as at failure
    with Gallery.open(path) as g:  # grown by x1.1 since: retried
        g.add(["j0"], np.full((1, 4), 0.5, np.float32), space="fused")
    t = grow.schedule_refit(path, threads=1)
    assert t is not None
    t.join(10)
    assert grow.schedule_refit(path, threads=1) is None
    t = grow.schedule_refit(path, threads=1, retry_after_s=0.0)  # the back-off has passed
    assert t is not None
    t.join(10)
    assert len(calls) == 3
