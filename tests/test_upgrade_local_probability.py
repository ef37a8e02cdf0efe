"""Match probabilities of a local change's merged answers follow their score scale.

``rank-merge`` of a local change answers on three scales as the job goes: the
global cosines alone (no local index published), the raw global and local scores
merged (fewer than ``MIN_COHORT`` published items: no Z-norm cohort), and the
Z-normed scores. A guard check fits each rule's match-probability calibration on
the scores it saw; a searcher must not apply it to scores on another scale (the
probabilities would be those of raw cosines given to z-scores). Reference: the
check at 40 moved items (raw merge) and a search at 55 (Z-normed, within the 5 %
staleness window of a 400-item gallery): no calibration for the merge then, and
the calibration again once a check has seen the Z-normed scores; likewise hybrid,
whose check at 0 % saw the global answers alone. Tiny seeded
models; about a second.
"""

from __future__ import annotations

import _tiny
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery
from galleria.upgrade.change import start_local
from galleria.upgrade.job import run_upgrade
from galleria.upgrade.local_guard import LocalGuardConfig
from galleria.upgrade.local_search import HYBRID, MERGED, MIN_COHORT, LocalChangeSearcher
from galleria.upgrade.state import require_upgrade


def _merged(g):
    with Gallery.open(g) as gal:
        d = require_upgrade(gal).online["decision"]
        s = LocalChangeSearcher(gal, rule=MERGED)
        try:
            return d, s._published.count, s.match_calibration()
        finally:
            s.close()


def test_merged_probabilities_are_served_only_on_the_scale_they_were_fitted(tmp_path):
    (tmp_path / "imgs").mkdir()
    imgs = _tiny.noise_pngs(tmp_path / "imgs", 400, 3, side=32)
    g = tmp_path / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    start_local(g, "tiny-local", extractor=_tiny.tiny_local(), seed=0, calib_size=200,
                guard=LocalGuardConfig(pseudo_queries=60))  # a check every 20 items
    run = {"extractor": _tiny.tiny_local(), "batch_size": 5, "commit_every": 5}
    run_upgrade(g, limit=0, **run)  # the check at 0 %: hybrid and merge answer globally
    with Gallery.open(g) as gal:
        rec = require_upgrade(gal).online["decision"]["probability"]["rules"]
        assert rec[HYBRID]["normalization"] == rec[MERGED]["normalization"] == "identity"
    run_upgrade(g, limit=10, **run)  # the hybrid pipeline's own scores now
    with Gallery.open(g) as gal:
        assert require_upgrade(gal).online["decision"]["moved"] == 0
        s = LocalChangeSearcher(gal, rule=HYBRID)
        assert s._published.count == 10 and s.match_calibration() is None
        s.close()
    run_upgrade(g, limit=30, **run)
    d, published, cal = _merged(g)
    assert d["moved"] == 40 and published == 40 < MIN_COHORT
    rec = d["probability"]["rules"][MERGED]
    assert rec["calibration"] and rec["normalization"] == "raw"  # fitted on raw scores
    assert cal is not None  # and served on them
    run_upgrade(g, limit=15, **run)  # 55 moved: no check due (20 items), Z-normed now
    d, published, cal = _merged(g)
    assert d["moved"] == 40 and published == 55 >= MIN_COHORT
    assert cal is None  # raw-score probabilities never given to z-scores
    run_upgrade(g, limit=5, **run)  # 60: a check sees the Z-normed scores
    d, published, cal = _merged(g)
    assert d["moved"] == 60 and d["probability"]["rules"][MERGED]["normalization"] == \
        "znorm-top100"
    assert cal is not None


def test_a_guard_that_cannot_build_its_query_model_never_stops_the_backfill(tmp_path,
                                                                           monkeypatch):
    """The global query model missing in the run's process (an optional runtime not
    installed: ImportError): the check is logged as failed, the backfill moves every
    item and search keeps the global answers (no decision)."""
    import galleria.upgrade.local_guard as lg

    def missing(*a, **kw):
        raise ImportError("onnxruntime is not installed")

    monkeypatch.setattr(lg, "extractor_from_space", missing)
    (tmp_path / "imgs").mkdir()
    imgs = _tiny.noise_pngs(tmp_path / "imgs", 12, 3, side=32)
    g = tmp_path / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    start_local(g, "tiny-local", extractor=_tiny.tiny_local(), seed=0)
    rep = run_upgrade(g, extractor=_tiny.tiny_local(), batch_size=4, commit_every=4)
    assert rep.moved == 12 and rep.remaining == 0
    with Gallery.open(g) as gal:
        assert not require_upgrade(gal).online.get("decision")
        s = LocalChangeSearcher.open(gal, with_models=False)
        assert s.rule == "old-only"
        s.close()
