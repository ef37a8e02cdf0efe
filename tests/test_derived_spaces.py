"""Derived spaces (``galleria.extract.derived``): filled from their base space's vectors, never
embedded by a model; retired ones no longer filled; the recipe skips both."""

from __future__ import annotations

import threading
import time

import numpy as np

from galleria.extract.derived import (
    Derivers,
    derive_into,
    derive_missing,
    fill_missing,
    live_derived,
)
from galleria.extract.recipe import recipe_spaces
from galleria.store.gallery import Gallery
from galleria.store.state import GalleryState, SpaceState
from galleria.validate import l2_normalize


class _Affine:
    """``normalize(x P + c)``: what a gallery-whitened fused space derives."""

    def __init__(self, p: np.ndarray, c: np.ndarray) -> None:
        self.p, self.c = p, c

    def derive(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(x @ self.p + self.c)


def test_derived_spaces_are_filled_from_the_base_vectors_and_skipped_by_the_recipe(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.standard_normal((8, 6)).astype(np.float32)
    c = rng.standard_normal(6).astype(np.float32)
    base = l2_normalize(rng.standard_normal((30, 8)).astype(np.float32))
    ids = [f"i{n:02d}" for n in range(30)]
    with Gallery.open_or_create(tmp_path / "G") as g:
        g.register_space("base", 8, {"config": {"type": "x"}})
        g.register_space("w1", 6, {"config": {"type": "y"}, "derived_from": "base"})
        g.register_space("w0", 6, {"config": {"type": "y"}, "derived_from": "base",
                                   "retired": True})
        g.add(ids[:20], base[:20], space="base")
        built: list[str] = []

        def build(info: dict) -> _Affine:
            built.append(info["config"]["type"])
            return _Affine(p, c)

        d = Derivers(g.path, build=build)
        assert derive_missing(g, d) == 20  # a base filled before: the items w1 lacks
        g.add(ids[20:], base[20:], space="base")
        assert derive_into(g, "base", ids[20:], base[20:], d) == 10  # at the commit
        assert built == ["y"]  # built once; the retired space never
        assert g.count("w1") == 30 and g.count("w0") == 0
        got = g.get_vectors(g.keys_of(ids), space="w1")
        want = base @ p + c
        np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True),
                                   atol=1e-6)
        assert derive_missing(g, d) == 0
    sp = [SpaceState(s, "global", 8, 30, 1, "exact", info)
          for s, info in (("base", {}), ("w1", {"derived_from": "base"}),
                          ("w0", {"retired": True}))]
    rec = recipe_spaces(GalleryState(path=tmp_path, spaces=tuple(sp), primary="w1",
                                     settings={}))
    assert rec is not None and rec.names == ("base",)  # no model embeds a derived space


def test_a_fill_racing_a_replacement_never_leaves_the_previous_image_s_derived_vector(tmp_path):
    """An add replacing an item while :func:`fill_missing` runs (between its read of the base
    vectors and its write): with the add's derived fill (skip-if-present) and without it (the
    add killed after its base commit: the base vector changed, derived again)."""
    rng = np.random.default_rng(1)
    p = rng.standard_normal((8, 6)).astype(np.float32)
    c = rng.standard_normal(6).astype(np.float32)
    aff = _Affine(p, c)
    base = l2_normalize(rng.standard_normal((12, 8)).astype(np.float32))
    ids = [f"i{n:02d}" for n in range(12)]
    for fill_too in (True, False):
        with Gallery.open_or_create(tmp_path / f"G{fill_too}") as g:
            g.register_space("base", 8, {"config": {"type": "x"}})
            g.register_space("w", 6, {"config": {"type": "y"}, "derived_from": "base"})
            g.add(ids, base, space="base")
            d = Derivers(g.path, build=lambda info: aff)
            new = l2_normalize(rng.standard_normal((2, 8)).astype(np.float32))
            calls = []

            def derive(x, g=g, d=d, new=new, fill_too=fill_too, calls=calls):
                if not calls:  # the upload of i03 and i07, between the read and the write
                    g.add(["i03", "i07"], new, space="base", replace=True,
                          drop_spaces=live_derived(g, "base"))
                    if fill_too:
                        derive_into(g, "base", ["i03", "i07"], new, d)
                calls.append(len(x))
                return aff.derive(x)

            fill_missing(g, "base", "w", ids, derive)
            assert g.count("w") == 12
            want = base.copy()
            want[[3, 7]] = new
            np.testing.assert_allclose(g.get_vectors(g.keys_of(ids), space="w"),
                                       aff.derive(want), atol=1e-6)


def test_concurrent_adds_build_a_derived_space_s_deriver_once(tmp_path):
    with Gallery.open_or_create(tmp_path / "G") as g:
        g.register_space("base", 8, {"config": {"type": "x"}})
        g.register_space("w", 6, {"config": {"type": "y"}, "derived_from": "base"})
        built: list[int] = []
        gate = threading.Barrier(4)

        def build(info: dict) -> _Affine:
            built.append(1)
            time.sleep(0.05)  # a slow model load: the others arrive meanwhile
            return _Affine(np.eye(8, 6, dtype=np.float32), np.zeros(6, np.float32))

        d = Derivers(g.path, build=build)

        def use() -> None:
            gate.wait(5)
            assert [s for s, _ in d.of(g, "base")] == ["w"]

        ts = [threading.Thread(target=use) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        assert built == [1]
