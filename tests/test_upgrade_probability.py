"""Match probabilities during an upgrade (galleria.upgrade.probability).

References: the calibration published with a check is ``calibrate.fit`` of that
check's own answers (recomputed here from the stored pseudo-queries); a stale
or foreign calibration (another rule, psi map, normalisation, job or model
fingerprint, or a gallery that moved on) is refused; the CLI and the service
answer with probabilities in [0, 1] while a job runs.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

import _tiny
from galleria import calibration as calibrate
from galleria.cli.main import main
from galleria.decision import open_searcher
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery
from galleria.tune.record import searcher_calibration, searcher_probabilities
from galleria.upgrade.job import run_upgrade, start_upgrade, upgrade_status
from galleria.upgrade.online import OnlineConfig, check_rules, job_pseudo_queries
from galleria.upgrade.probability import (
    PROBABILITY_TYPE,
    STALE_MOVED,
    fit_rules,
    lookup,
    make_record,
)
from galleria.upgrade.search import BackfillSearcher
from galleria.upgrade.state import require_upgrade, save_state
from galleria.validate import l2_normalize

N = 64
CFG = OnlineConfig(first_at=16, growth=2.0, max_pairs=64, pseudo_queries=24, seed=0,
                   recheck_every=0.1)


def _record(**over):
    cal = {"type": calibrate.CALIBRATION_TYPE, "format_version": 1, "method": "logistic",
           "a": 1.0, "b": 0.0}
    rules = {"rank-merge": {"calibration": cal, "normalization": "znorm-top100", "map": None},
             "psi": {"calibration": cal, "normalization": "znorm-top100", "map": "M1"}}
    base = dict(served="rank-merge", old_space="O", new_space="N", job_started=1.0, moved=50,
                items=100, generations={"O": 3, "N": 2}, pseudo="P", queries=20)
    base.update(over)
    job = {k: base.pop(k) for k in ("old_space", "new_space", "job_started")}
    return make_record(rules, job=job, **base)


def _ask(record, **over):
    base = dict(rule="rank-merge", old_space="O", new_space="N", job_started=1.0,
                map_fingerprint=None, normalization="znorm-top100", moved=52, items=100)
    return lookup(record, **{**base, **over})


def test_a_stale_or_foreign_calibration_is_refused():
    rec = _record()
    assert rec["type"] == PROBABILITY_TYPE and rec["fraction"] == 0.5
    cal, why = _ask(rec)
    assert cal is not None and cal["a"] == 1.0 and why == ""
    assert _ask(rec, rule="psi", map_fingerprint="M1")[0] is not None
    refused = [
        _ask(None), _ask({**rec, "format_version": 2}),
        _ask(rec, rule="fused"),                        # rule not calibrated
        _ask(rec, rule="psi", map_fingerprint="M2"),    # another psi map
        _ask(rec, rule="psi"),                          # psi rule without its map
        _ask(rec, normalization="identity"),            # scores on another scale
        _ask(rec, new_space="N2"), _ask(rec, old_space="O2"),   # other models
        _ask(rec, job_started=2.0),                     # another job
        _ask(rec, moved=50 + int(STALE_MOVED * 100) + 1),  # the gallery moved on
    ]
    for cal, why in refused:
        assert cal is None and why


def test_fit_rules_is_the_tuner_fit_of_the_top_results():
    from galleria.types import SearchResult

    rng = np.random.default_rng(0)
    ids = np.array([[f"i{j}" for j in rng.permutation(30)[:12]] for _ in range(40)], object)
    scores = -np.sort(-rng.random((40, 12)), axis=1).astype(np.float32)
    truth_ids = [row[rng.integers(0, 12)] for row in ids]
    got = fit_rules({"rank-merge": SearchResult(scores, ids)}, truth_ids,
                    normalizations={"rank-merge": "identity"}, maps={})
    want = calibrate.fit(scores[:, :10], ids[:, :10] == np.array(truth_ids, object)[:, None])
    assert got["rank-merge"]["calibration"] == want
    # a rule whose top results hold no positive is left out, not a crash
    assert fit_rules({"x": SearchResult(scores, ids)}, ["none"] * 40,
                     normalizations={}, maps={}) == {}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return _tiny.noise_pngs(tmp_path_factory.mktemp("prob-imgs"), N, 7)


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory, images):
    """A gallery half-way through an online upgrade (checks done at its fits)."""
    g = tmp_path_factory.mktemp("prob") / "g"
    index_images(images, g, extractor=_tiny.tiny(1))
    start_upgrade(g, "tiny-test", extractor=_tiny.tiny(2, dim=10), online=CFG,
                  order="random", calib_size=32)
    run_upgrade(g, limit=32, commit_every=8)
    return g


def test_probabilities_during_an_upgrade_are_the_check_s_fit(upgraded):
    with Gallery.open(upgraded) as g:
        st = require_upgrade(g)
        d = st.online["decision"]
        rec = d["probability"]
        assert rec["moved"] == d["moved"] == 32 and rec["served"] == d["rule"]
        assert rec["new_space"] == st.new_space and rec["old_space"] == st.old_space
        assert set(rec["rules"]) <= set(d["scores"]) and d["rule"] in rec["rules"]
        assert upgrade_status(upgraded).to_dict()["online_psi"]["calibrated"] == \
            sorted(rec["rules"])
        # the published fit is calibrate.fit of the check's answers, recomputed
        pseudo = job_pseudo_queries(g, st, CFG, _tiny.tiny(1), _tiny.tiny(2, dim=10))
        answers: dict = {}
        check_rules(g, pseudo, None, depth=CFG.depth, answers=answers)
        res = answers["rank-merge"][0].head(10)
        want = calibrate.fit(res.scores, res.ids == np.array(pseudo.ids, object)[:, None])
        assert rec["rules"]["rank-merge"]["calibration"] == want
        # the searcher the decision opens answers with probabilities in [0, 1]
        s = open_searcher(g)
        assert s.kind == "backfill" and s.rule == d["rule"]
        q = l2_normalize(np.random.default_rng(3).standard_normal((5, 12)).astype(np.float32))
        qn = l2_normalize(np.random.default_rng(4).standard_normal((5, 10)).astype(np.float32))
        out = s.search_vectors(old_queries=q, new_queries=qn, k=8)
        p = searcher_probabilities(s, out)
        assert p is not None and p.shape == (5, 8)
        assert ((p >= 0) & (p <= 1)).all() and (np.diff(p, axis=1) <= 1e-6).all()
        # the same rule on another score scale: refused
        raw = BackfillSearcher.open(g, rule="rank-merge", calibration="identity")
        raw.spec = s.spec
        assert searcher_calibration(raw) is None
        # the record of another job (other new model fingerprint): refused
        other = {**rec, "new_space": "other-model@0"}
        save_state(g, type(st).from_dict({**st.to_dict(), "online": {
            **st.online, "decision": {**d, "probability": other}}}))
        try:
            assert searcher_calibration(s) is None
        finally:
            save_state(g, st)
        assert searcher_calibration(s) is not None


def test_cli_and_service_show_them_during_an_upgrade(upgraded, images, capsys):
    from galleria.service.engine import Engine, QuerySpec, ServiceConfig

    img = images / "05.png"
    assert main(["search", str(upgraded), str(img), "-k", "4", "--json", "--threads", "1"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    ps = [r["probability"] for r in row["results"]]
    assert len(ps) == 4 and all(p is not None and 0.0 <= p <= 1.0 for p in ps)
    engine = Engine(ServiceConfig(gallery=upgraded, warm_up=False, threads=1))
    try:
        buf = io.BytesIO()
        Image.open(img).save(buf, format="PNG")
        out = engine.search([QuerySpec(image=buf.getvalue())], k=4)
        hits = out[0]["results"]
        assert [h["id"] for h in hits] == [r["id"] for r in row["results"]]
        assert [h["probability"] for h in hits] == ps
    finally:
        engine.stop()


def test_probabilities_from_the_first_batch(tmp_path, images):
    """The run's first check (before any psi fit) calibrates the old answers it serves."""
    g = tmp_path / "g"
    index_images(images, g, extractor=_tiny.tiny(1))
    start_upgrade(g, "tiny-test", extractor=_tiny.tiny(2, dim=10), online=CFG, calib_size=32)
    run_upgrade(g, limit=4, commit_every=4)  # fewer pairs than the first fit (16)
    with Gallery.open(g) as gal:
        d = require_upgrade(gal).online["decision"]
        assert d["fits"] == 0 and d["checked"] and d["rule"] == "old-only"
        s = open_searcher(gal, with_models=False)
        q = l2_normalize(np.random.default_rng(3).standard_normal((3, 12)).astype(np.float32))
        p = searcher_probabilities(s, s.search_vectors(old_queries=q, k=5))
        assert p is not None and ((p >= 0) & (p <= 1)).all()


def test_a_failed_probability_fit_keeps_the_rule_the_check_chose(upgraded, monkeypatch):
    """The fit of match probabilities is an add-on: when it raises, the decision still
    publishes the rule the check chose (``checked``), without probabilities."""
    from galleria.upgrade import online

    chosen: list[str] = []
    decide = online.decide_with_old

    def spy(*a, **kw):
        out = decide(*a, **kw)
        chosen.append(out[0])
        return out

    def boom(*a, **kw):
        raise RuntimeError("fit exploded")

    monkeypatch.setattr(online, "decide_with_old", spy)
    monkeypatch.setattr(online, "probability_record", boom)
    with Gallery.open(upgraded) as g:
        st = require_upgrade(g)
        try:
            d = online.recheck(g, CFG, old_model=_tiny.tiny(1), new_model=_tiny.tiny(2, dim=10))
            assert len(chosen) == 1 and d["checked"] and d["rule"] == chosen[0]
            assert d["probability"] is None and d["scores"]
            assert require_upgrade(g).online["decision"]["rule"] == chosen[0]
        finally:
            save_state(g, st)
