"""The tuner's pure core and the calibration: selection rule, record staleness,
monotone calibrated probabilities in [0, 1] (synthetic, seeded; references are closed
forms or brute force)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from galleria import calibration as calibrate
from galleria.decision import SearchSpec
from galleria.errors import FormatError, InputError
from galleria.store.state import GalleryState, SpaceState
from galleria.tune.record import (
    FORMAT_VERSION,
    RECORD_TYPE,
    at_least_probability,
    calibration_for,
    candidate_key,
    searcher_calibration,
    stale_reasons,
    state_summary,
)
from galleria.tune.tuner import (
    HYBRID_VARIANTS,
    Candidate,
    CandidateScore,
    candidates_for,
    default_candidates,
    default_choice,
    select,
    summarise,
)
from galleria.types import SearchResult

# ------------------------------------------------------------------ selection


def _s(mrr: float) -> dict[str, float]:
    return {"r1": mrr, "r5": mrr, "r10": mrr, "mrr": mrr, "n": 100}


def test_summarise_against_hand_computed_ranks():
    s = summarise(np.array([0, 1, -1, 4, 12]), k=10)
    assert s["r1"] == 20.0 and s["r5"] == 60.0 and s["r10"] == 60.0 and s["n"] == 5
    assert s["mrr"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 5) / 5, abs=0.01)


def test_select_prefers_broad_candidates_within_their_margin():
    g, sv, loc, mds = (Candidate("global"), Candidate("global+sv"), Candidate("local"),
                       Candidate("local+mds"))
    # global within its wide margin: global
    c, why = select([(mds, _s(99)), (loc, _s(98)), (g, _s(90)), (sv, _s(97))],
                    margin=3, global_margin=10)
    assert c == g and "within 10" in why
    # global far behind: the first other one within 3 points of the best, in order
    c, _ = select([(mds, _s(99)), (loc, _s(97)), (g, _s(60)), (sv, _s(95))],
                  margin=3, global_margin=10)
    assert c == loc
    c, why = select([(mds, _s(99)), (loc, _s(90)), (g, _s(60)), (sv, _s(95))],
                    margin=3, global_margin=10)
    assert c == mds and "best" in why
    # exact ties go to the earlier (broader) candidate, whatever the input order
    for order in ([g, loc], [loc, g]):
        c, _ = select([(x, _s(80)) for x in order], margin=0, global_margin=0)
        assert c == g
    with pytest.raises(InputError):
        select([])


def test_select_is_a_function_of_the_scores_only(rng):
    cands = [Candidate(p) for p in ("global", "global+sv", "local", "local+mds")]
    for _ in range(50):
        scores = [(c, _s(float(v))) for c, v in zip(cands, rng.uniform(0, 100, 4),
                                                   strict=True)]
        first = select(scores)
        perm = [scores[i] for i in rng.permutation(4)]
        assert select(perm) == first
        best = max(s["mrr"] for _, s in scores)
        chosen = dict(scores)[first[0]]["mrr"]
        assert chosen >= best - (10 if first[0].pipeline == "global" else 3)


def test_candidates_in_preference_order_and_mds_bounded():
    pipes = ("local+mds", "local", "global", "global+sv")
    mid = candidates_for(pipes, items=300, has_global=True)
    assert [c.pipeline for c in mid] == ["global", "local", "local+mds", "local+mds",
                                         "global+sv"]
    assert mid[2].params == () and dict(mid[3].params) == {"blend": 0.19}
    big = candidates_for(pipes, items=11_000, has_global=False)
    assert [c.key for c in big] == ["global", "local", "local+mds(candidates=200,k=100)",
                                    "global+sv"]
    # a gallery global+sv verifies exhaustively: geometric verification comes second
    small = candidates_for(pipes, items=30, has_global=True)
    assert [c.pipeline for c in small][:3] == ["global", "global+sv", "local"]
    assert candidate_key("x", {"b": 1, "a": 0.5}) == "x(a=0.5,b=1)"


def test_the_default_mode_scores_the_spaces_default_and_walks_down_a_budget():
    from galleria.decision.choose import default_pipeline

    assert [default_pipeline(*h) for h in ((True, True), (True, False), (False, True))] == \
        ["hybrid", "global", "local"]
    assert [c.key for c in default_candidates(True, True)] == ["hybrid"]
    assert [c.key for c in default_candidates(True, False, budget=True)] == ["global"]
    walk = default_candidates(True, True, budget=True)
    assert [dict(c.params) for c in walk] == list(HYBRID_VARIANTS)

    def ran(ms):
        return [CandidateScore(c, search_ms=m) for c, m in zip(walk, ms, strict=False)]

    # no budget: the default parameters, whatever they cost
    c, why = default_choice(ran([900.0]), None, True, True)
    assert c == walk[0] and "global and local" in why
    # a budget: the first (most thorough) variant within it; none within: the cheapest
    c, why = default_choice(ran([900.0, 400.0, 100.0]), 500.0, True, True)
    assert c == walk[1] and "within the 500 ms budget" in why
    c, why = default_choice(ran([900.0, 800.0, 700.0, 600.0]), 50.0, True, True)
    assert c == walk[3] and "over the 50 ms budget" in why
    with pytest.raises(InputError):
        default_choice([CandidateScore(walk[0], error="x")], None, True, True)


# ------------------------------------------------------------------ staleness


def _state(counts: dict[str, tuple[str, int]]) -> GalleryState:
    spaces = tuple(SpaceState(sp, kind, 8, n, 1, "exact") for sp, (kind, n) in counts.items())
    return GalleryState(Path("/g"), spaces, next(iter(counts)), {})


def _record(state: GalleryState) -> dict:
    return {"type": RECORD_TYPE, "format_version": FORMAT_VERSION, "pipeline": "local",
            "params": {}, "state": state_summary(state), "candidates": []}


def test_stale_record_is_detected():
    st = _state({"g": ("global", 100), "l": ("local", 100)})
    rec = _record(st)
    assert stale_reasons(rec, st) == []
    assert stale_reasons(rec, _state({"g": ("global", 120), "l": ("local", 110)})) == []
    grown = stale_reasons(rec, _state({"g": ("global", 200), "l": ("local", 200)}))
    assert len(grown) == 2 and "tuned at 100" in grown[0]
    assert "gone" in stale_reasons(rec, _state({"g": ("global", 100)}))[0]
    added = stale_reasons(rec, _state({"g": ("global", 100), "l": ("local", 100),
                                      "n": ("global", 100)}))
    assert added == ["space n (global) was added since"]
    assert stale_reasons(None, st) == ["never tuned"]
    assert stale_reasons({**rec, "format_version": 99}, st)[0].startswith("record format 99")
    assert stale_reasons("junk", st) == ["not a tuned record"]


# ------------------------------------------------------------------ calibration


def _synthetic(rng, q=400, k=10):
    """Scores whose true match probability is known: P(match | s) = s (s uniform)."""
    s = rng.uniform(0, 1, (q, k))
    t = rng.uniform(0, 1, (q, k)) < s
    return s, t


@pytest.mark.parametrize("method", calibrate.METHODS)
def test_calibration_is_monotone_and_in_unit_interval(rng, method):
    s, t = _synthetic(rng)
    p = calibrate.fit(s * 7 - 3, t, method=method)  # any score scale
    grid = np.linspace(-20, 20, 2001)[None, :]
    out = calibrate.apply(p, grid)
    assert out.dtype == np.float32 and out.shape == grid.shape
    assert (out >= 0).all() and (out <= 1).all()
    assert (np.diff(out[0]) >= 0).all()
    miss = calibrate.apply(p, np.array([[np.inf * -1, np.nan, 0.0]]))
    assert miss[0, 0] == 0 and miss[0, 1] == 0
    # close to the closed form P = s on held-out data
    s2, t2 = _synthetic(np.random.default_rng(1))
    pr = calibrate.apply(p, s2 * 7 - 3)
    assert np.abs(pr - s2).mean() < 0.06
    rel = calibrate.reliability(pr, t2)
    assert rel["ece"] < 0.05 and rel["n"] == s2.size


def test_isotonic_matches_brute_force_pav():
    y = np.array([0, 1, 0, 0, 1, 1, 0, 1], float)
    vals, wts, ends = calibrate.pav(y, np.ones_like(y))
    # brute force: the non-decreasing step fit with the least squared error
    fitted = np.repeat(vals, wts.astype(int))
    assert (np.diff(fitted) >= 0).all() and ends[-1] == len(y) - 1
    best = None
    for mask in range(1 << (len(y) - 1)):  # every partition into consecutive blocks
        cuts = [i + 1 for i in range(len(y) - 1) if mask >> i & 1]
        blocks = np.split(y, cuts)
        f = np.concatenate([np.full(len(b), b.mean()) for b in blocks])
        if (np.diff(f) >= -1e-12).all():
            err = ((f - y) ** 2).sum()
            best = err if best is None else min(best, err)
    assert ((fitted - y) ** 2).sum() == pytest.approx(best)


def test_calibration_record_is_small_and_checked(rng):
    s, t = _synthetic(rng, q=2000)
    p = calibrate.fit(s, t, max_knots=24)
    assert len(p["x"]) <= 24 and p["n_pos"] + p["n_neg"] == s.size
    with pytest.raises(FormatError):
        calibrate.apply({**p, "format_version": 0}, s)
    with pytest.raises(InputError):
        calibrate.fit(s, np.zeros_like(t))
    with pytest.raises(InputError):
        calibrate.fit(s[:, :3], t)


def test_threshold_report_counts():
    probs = np.array([[0.9, 0.6, 0.2], [0.4, 0.7, 0.1]])
    truth = np.array([[True, False, False], [False, True, True]])
    r = calibrate.threshold_report(probs, truth, 0.5)
    assert r["kept"] == 3 and r["true_kept"] == 2
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert calibrate.threshold_report(probs, truth, 0.5, total_pos=8)["recall"] == 0.25


def test_calibration_lookup_by_pipeline_params_and_spaces(rng):
    s, t = _synthetic(rng)
    cal = calibrate.fit(s, t)
    rec = {"type": RECORD_TYPE, "format_version": FORMAT_VERSION, "candidates": [
        {"key": "local+mds(blend=0.19)", "supported": True, "spaces": ["g", "l"],
         "calibration": cal},
        {"key": "global", "supported": False}]}
    assert calibration_for(rec, "local+mds", {"blend": 0.19}) == cal
    assert calibration_for(rec, "local+mds", {"blend": 0.19}, spaces=["g", "l"]) == cal
    assert calibration_for(rec, "local+mds", {"blend": 0.19}, spaces=["g2", "l"]) is None
    assert calibration_for(rec, "local+mds") is None
    assert calibration_for(rec, "global") is None
    assert calibration_for(None, "global") is None


# ------------------------------------------------------------------ probabilities


def test_min_probability_keeps_exactly_the_entries_at_or_above_it(rng):
    for _ in range(30):
        q, k = 4, 7
        scores = np.sort(rng.normal(size=(q, k)).astype(np.float32), axis=1)[:, ::-1]
        ids = np.array([[f"i{r}{c}" for c in range(k)] for r in range(q)], object)
        scores[0, 5:] = -np.inf  # missing results at the end of a row
        ids[0, 5:] = None
        prob = rng.uniform(0, 1, (q, k)).astype(np.float32)
        thr = float(rng.uniform(0, 1))
        res, p = at_least_probability(SearchResult(scores.copy(), ids.copy(), 3), prob, thr)
        assert res.generation == 3 and res.scores.shape == (q, k) and p.shape == (q, k)
        for r in range(q):
            want = [(ids[r, c], scores[r, c], prob[r, c]) for c in range(k)
                    if ids[r, c] is not None and prob[r, c] >= thr]
            n = len(want)
            assert [(i, s, x) for i, s, x in zip(res.ids[r, :n], res.scores[r, :n], p[r, :n],
                                                  strict=True)] == want
            assert all(i is None for i in res.ids[r, n:]) and np.isneginf(res.scores[r, n:]).all()
            assert (p[r, n:] == 0).all()


class _Searcher:
    def __init__(self, spec, spaces, record):
        self.spec, self.spaces, self.kind = spec, spaces, spec.kind
        self.gallery = type("G", (), {"get_setting": lambda _s, _k: record})()


def test_probabilities_follow_the_searcher_s_pipeline_params_and_spaces():
    cal = {"method": "logistic", "a": 1.0, "b": 0.0}
    rec = {"type": RECORD_TYPE, "format_version": FORMAT_VERSION, "candidates": [
        {"key": "local+mds", "pipeline": "local+mds", "params": {}, "supported": True,
         "spaces": ["L"], "calibration": {**cal, "b": 1.0}},
        {"key": "local+mds(k=100)", "pipeline": "local+mds", "params": {"k": 100},
         "supported": True, "spaces": ["L"], "calibration": cal}]}
    spec = SearchSpec("pipeline", "local+mds", params=(("k", 100),))
    assert searcher_calibration(_Searcher(spec, ["L"], rec)) == cal  # its params' fit
    plain = SearchSpec("pipeline", "local+mds")
    assert searcher_calibration(_Searcher(plain, ["L"], rec))["b"] == 1.0
    assert searcher_calibration(_Searcher(spec, ["X"], rec)) is None  # other spaces
    upgrade = SearchSpec("backfill", "global")
    assert searcher_calibration(_Searcher(upgrade, ["L"], rec)) is None
    assert searcher_calibration(_Searcher(spec, ["L"], None)) is None  # never tuned
