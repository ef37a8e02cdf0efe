"""kill -9 at seeded points of every command that writes, then the same command again
(issue 19): `check` sound, every item present exactly once with the data of a clean
run, and nothing reported sound after the kill that is not (tests/_killmatrix.py).

The default suite kills each command at one seeded point (`repair` has its own file,
tests/test_faults_repair.py); `-m slow` runs every point of every command (the table
of benchmarks/results/faults.md comes from benchmarks/bench_faults.py).
"""

from __future__ import annotations

import zlib

import pytest

import _killmatrix as km

DEFAULT = ["index global", "index local", "remove", "fit-transform --apply", "upgrade run",
           "upgrade finish", "HTTP add/delete"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-matrix")
    return km.synthetic_images(root / "imgs", 24), root / "cache"


def _check(name: str, points: list[int] | None, setup, tmp_path) -> list[km.PointResult]:
    images, cache = setup
    sc = km.SCENARIOS[name]
    why = sc.available()
    if why is not None:
        pytest.skip(why)
    ref = km.reference(sc, tmp_path / "ref", images, cache, in_process=True)
    assert ref.points >= 2, (name, ref.points)
    if points is None:
        points = km.seeded_points(ref.points, 1, seed=zlib.crc32(name.encode()))
    out = []
    for p in points:
        r = km.run_point(sc, p, tmp_path / f"k{p}", images, cache, ref, in_process=True)
        assert r.killed, (name, p, r.failures)
        assert r.ok, (name, p, r)
        out.append(r)
    return out


@pytest.mark.parametrize("name", DEFAULT)
def test_killed_at_a_seeded_point_then_run_again(name, setup, tmp_path):
    _check(name, None, setup, tmp_path)


def test_tune_has_its_place_in_the_matrix(setup, tmp_path):
    """`galleria tune` is being built on another branch: the matrix runs it once it exists."""
    _check("tune", None, setup, tmp_path)


@pytest.mark.slow  # every point of every command: ~10 min on 2 busy cores
@pytest.mark.parametrize("name", [n for n in km.SCENARIOS if n != "tune"])
def test_killed_at_every_point_then_run_again(name, setup, tmp_path):
    images, cache = setup
    sc = km.SCENARIOS[name]
    total = km.reference(sc, tmp_path / "count", images, cache, in_process=True).points
    _check(name, km.seeded_points(total, 40, seed=1), setup, tmp_path)
