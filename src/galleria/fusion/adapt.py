"""Label-free adaptation of a fusion model's query side to one gallery (pure numpy).

A fusion model trained on one data set puts its light query where the fused
vector of the same image is *on that data set*; on another gallery it may not
(measured: a Caltech-trained model's light vector and fused vector of the same
SMVS image have a median cosine of 0.6). The gallery itself tells where it
should land, with no labels: for its items we have the fused vectors ``g (N, d)``
(what the gallery stores), the light model's own vectors ``x (N, D)`` of the same
images, and ``x_v`` of phone-like views of a sample of them. This module fits

    q = normalize(x W + b)        W (D, d), b (d,)

the query's linear map, by ridge regression of ``g`` (the item's fused vector) on
``x`` and ``x_v`` (clean image and views), shrunk towards the trained map
(``prior="trained"``) or towards 0 (``prior="zero"``), and chooses among these
and the trained map itself with *pseudo-queries*: views of held-out items
(:mod:`galleria.images.pseudo`), searched against the whole gallery, scored by the
mean reciprocal rank of the item each was made from. The same pseudo-queries
score the light model on its own (``x_v`` against ``x``): when the best map loses
to it, the gallery answers from the light model's own vectors
(:func:`decide`). Everything is a function of the arrays and a seed.

Held-out protocol: the pseudo-query items are split into ``folds`` seeded groups;
the maps scored on a group are fitted on every other item (their clean rows and
views). The chosen candidate is then refitted on every row.

Sufficient statistics (:class:`Moments`) are additive, so a fold is the total
minus its rows, and one eigendecomposition per fold serves every ridge value.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from galleria.errors import InputError

log = logging.getLogger(__name__)

#: ridge values tried, relative to the mean eigenvalue of the light features' covariance
RIDGES = (0.003, 0.03, 0.3, 3.0)
PRIORS = ("trained", "zero")
DECIDE_ON = ("domain", "self", "neighbours")
OUT_OF_DOMAIN = ("light", "pseudo-queries")
ANSWERS = ("fused", "light", "whitened")


@dataclass(frozen=True)
class AdaptConfig:
    """How a gallery adapts (recorded with the fit).

    Attributes:
        views: phone-like views per sampled item (pseudo-queries and extra fit rows).
        view_items: items whose views are made (a seeded sample; all when fewer).
        pseudo_items: held-out items whose views are the pseudo-queries (a seeded sample of
            the viewed items).
        folds: groups the pseudo-query items are split into (each scored by maps fitted
            without it).
        ridges: ridge values tried (relative to the mean eigenvalue of ``x``'s covariance).
        priors: what the ridge shrinks towards: ``trained`` (the trained map) and/or
            ``zero``.
        margin: MRR points (of 100) the fused answer must win by over the light model
            on its own (out of domain; ``decide_on="self"``: always); ``0``: a tie keeps the
            fused space.
        min_items: fewer items than this: no fit (the trained model answers).
        refit_growth: the fit is redone automatically once the fused space holds this
            many times the items it was fitted on (1.25: 25 % more).
        seed: the sample, the folds and every view.
        decide_on: which space answers. ``domain`` (default, :func:`select`): the fused
            space when the gallery is centred in it (``in_domain``), the gallery-whitened
            fused space when the gallery is homogeneous (``homogeneous``), else the self-MRR
            rule below with ``margin``. ``self``: the MRR of the
            item each pseudo-query was made from; ``neighbours``: the mAP of the
            item's *consensus neighbours*, the ``neighbours`` nearest items of the source
            image in both the fused and the light space, the source itself left out).
            ``self`` favours the light model: its view and its stored vector come from
            the same network, a near-copy match no other space can win.
        neighbours: the neighbourhood size of ``decide_on="neighbours"``.
        in_domain: the fused model's training anchor centres data of its training domain:
            ``|mean g| / |mean x|`` (norms of the means of the gallery's L2-normalised fused
            and light vectors) below this says the gallery is of that domain.
        homogeneous: ``|mean x|`` at or above this says the gallery is visually
            homogeneous (one dominant direction shared by all its light vectors: faces,
            product covers): the fused vectors whitened on the gallery answer.
        whiten_ridge: the ridge (relative, as ``ridges``) of the label-free map from the
            light vectors into the gallery-whitened fused space.
        whiten_shrink: eigenvalue shrinkage of the gallery whitening (times their mean).
        out_of_domain: ``decide_on="domain"``, a gallery neither of the model's domain nor
            homogeneous: ``light`` (default) answers from the light model's own vectors;
            ``pseudo-queries`` from the fused space when its pseudo-query MRR beats the light
            model's by ``margin`` (the first design; it lost 3.0 points on a held-out row).
    """

    views: int = 2
    view_items: int = 2000
    pseudo_items: int = 300
    folds: int = 3
    ridges: tuple[float, ...] = RIDGES
    priors: tuple[str, ...] = PRIORS
    margin: float = 1.0
    min_items: int = 50
    refit_growth: float = 1.25
    seed: int = 0
    decide_on: str = "domain"
    neighbours: int = 10
    in_domain: float = 0.7
    homogeneous: float = 0.72
    whiten_ridge: float = 0.3
    whiten_shrink: float = 1.0
    out_of_domain: str = "light"

    def __post_init__(self) -> None:
        if self.decide_on not in DECIDE_ON or self.neighbours < 1:
            raise InputError(f"decide_on must be one of {DECIDE_ON} and neighbours >= 1; got "
                             f"{self.decide_on!r}, {self.neighbours}")
        if self.views < 1 or self.view_items < 1 or self.pseudo_items < 2:
            raise InputError("views and view_items must be >= 1, pseudo_items >= 2")
        if self.folds < 2:
            raise InputError(f"folds must be >= 2, got {self.folds}")
        if not self.ridges or any(not r > 0 for r in self.ridges):
            raise InputError(f"ridges must be positive, got {self.ridges}")
        if any(p not in PRIORS for p in self.priors):
            raise InputError(f"priors must be among {PRIORS}, got {self.priors}")
        if self.min_items < 4 or not self.refit_growth > 1.0:
            raise InputError("min_items must be >= 4 and refit_growth > 1")
        if self.out_of_domain not in OUT_OF_DOMAIN:
            raise InputError(f"out_of_domain must be one of {OUT_OF_DOMAIN}, got "
                             f"{self.out_of_domain!r}")
        if not (self.whiten_ridge > 0 and self.whiten_shrink >= 0):
            raise InputError("whiten_ridge must be > 0 and whiten_shrink >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ridges"], d["priors"] = list(self.ridges), list(self.priors)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdaptConfig:
        d = dict(d)
        d["ridges"], d["priors"] = tuple(d.get("ridges", RIDGES)), tuple(d.get("priors", PRIORS))
        return cls(**d)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- moments
@dataclass
class Moments:
    """Sums over rows ``(x_r, t_r)``: count, ``sum x``, ``sum t``, ``X^T X``, ``X^T T``
    (float64). Additive: ``a - b`` removes ``b``'s rows."""

    n: float
    sx: np.ndarray  # (D,)
    st: np.ndarray  # (d,)
    xx: np.ndarray  # (D, D)
    xt: np.ndarray  # (D, d)

    @classmethod
    def of(cls, x: np.ndarray, t: np.ndarray) -> Moments:
        x = np.asarray(x, np.float64)
        t = np.asarray(t, np.float64)
        return cls(float(len(x)), x.sum(0), t.sum(0), x.T @ x, x.T @ t)

    def __add__(self, o: Moments) -> Moments:
        return Moments(self.n + o.n, self.sx + o.sx, self.st + o.st, self.xx + o.xx,
                       self.xt + o.xt)

    def __sub__(self, o: Moments) -> Moments:
        return Moments(self.n - o.n, self.sx - o.sx, self.st - o.st, self.xx - o.xx,
                       self.xt - o.xt)

    def centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(mean x, mean t, C_xx, C_xt)`` (scatter, not divided by n)."""
        mx, mt = self.sx / self.n, self.st / self.n
        return mx, mt, self.xx - self.n * np.outer(mx, mx), self.xt - self.n * np.outer(mx, mt)


class RidgeSolver:
    """Centred ridge regressions of ``t`` on ``x`` from :class:`Moments`, shrunk towards a
    prior map: ``W = (C_xx + lam I)^-1 (C_xt + lam W0)``, ``b = mean t - mean x W``;
    ``lam = ridge * tr(C_xx) / D``. One eigendecomposition serves every ``ridge``."""

    def __init__(self, m: Moments) -> None:
        if m.n < 2:
            raise InputError(f"a ridge fit needs at least 2 rows, got {m.n:g}")
        self.mx, self.mt, cxx, self.cxt = m.centred()
        self.scale = max(float(np.trace(cxx)) / cxx.shape[0], 1e-12)
        self.evals, self.evecs = np.linalg.eigh(cxx)

    def solve(self, ridge: float, prior: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        lam = ridge * self.scale
        rhs = self.cxt if prior is None else self.cxt + lam * prior
        w = self.evecs @ ((self.evecs.T @ rhs) / (np.maximum(self.evals, 0.0) + lam)[:, None])
        return w, self.mt - self.mx @ w


# --------------------------------------------------------------------------- scoring
def reciprocal_ranks(q: np.ndarray, g: np.ndarray, truth: np.ndarray, *, batch: int = 512
                     ) -> np.ndarray:
    """``(Q,)`` 1 / rank of row ``truth[i]`` of ``g (N, d)`` for query ``q[i]`` (cosine;
    rank 1 = best; ties count against the truth)."""
    out = np.empty(len(q))
    for s in range(0, len(q), batch):
        sc = q[s:s + batch] @ g.T
        own = sc[np.arange(len(sc)), truth[s:s + batch]]
        out[s:s + batch] = 1.0 / ((sc >= own[:, None]).sum(1))
    return out


def consensus_neighbours(g: np.ndarray, x: np.ndarray, rows: np.ndarray, m: int
                         ) -> list[np.ndarray]:
    """For each row ``r`` of ``rows``: the items among the ``m`` nearest of ``r`` in the
    fused space ``g (N, d)`` *and* the ``m`` nearest in the light space ``x (N, D)``
    (``r`` itself left out; cosine)."""
    out = []
    for r in rows:
        sets = []
        for sp in (g, x):
            sc = sp @ sp[r]
            sc[r] = -np.inf
            k = min(m, len(sc) - 1)
            sets.append(np.argpartition(-sc, k - 1)[:k] if k > 0 else np.zeros(0, np.int64))
        out.append(np.intersect1d(sets[0], sets[1]))
    return out


def neighbour_ap(q: np.ndarray, gal: np.ndarray, source: np.ndarray,
                 positives: Sequence[np.ndarray]) -> np.ndarray:
    """``(Q,)`` average precision of query ``q[i]`` retrieving ``positives[i]`` (item rows)
    in ``gal (N, d)``, the source item ``source[i]`` left out; NaN when it has none."""
    out = np.full(len(q), np.nan)
    sc_all = q @ gal.T
    for i, pos in enumerate(positives):
        if not len(pos):
            continue
        sc = sc_all[i].copy()
        sc[source[i]] = -np.inf
        ps = np.sort(sc[pos])[::-1]
        ranks = (sc[None, :] >= ps[:, None]).sum(1)  # ties count against the positive
        out[i] = float(np.mean(np.arange(1, len(pos) + 1) / ranks))
    return out


def _ap_summary(ap: np.ndarray) -> dict[str, float]:
    ok = ap[~np.isnan(ap)]
    return {"map": round(100.0 * float(ok.mean()), 3) if len(ok) else 0.0, "n": len(ok)}


def _summary(rr: np.ndarray) -> dict[str, float]:
    return {"mrr": round(100.0 * float(rr.mean()), 3),
            "r1": round(100.0 * float((rr >= 1.0).mean()), 3), "n": len(rr)}


# --------------------------------------------------------------------------- the fit
@dataclass
class FitData:
    """What a gallery's adaptation is fitted on (rows: items of the gallery).

    Attributes:
        g: ``(N, d)`` L2-normalised fused vectors (what the gallery stores).
        x: ``(N, D)`` L2-normalised light vectors of the same images.
        xv: ``(M, D)`` light vectors of phone-like views.
        view_item: ``(M,)`` the row (item) each view was made from.
        pseudo: rows whose views are the pseudo-queries (distinct, each with views).
    """

    g: np.ndarray
    x: np.ndarray
    xv: np.ndarray
    view_item: np.ndarray
    pseudo: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.g)
        if self.g.ndim != 2 or self.x.ndim != 2 or len(self.x) != n:
            raise InputError(f"g {self.g.shape} and x {self.x.shape} must be (N, d), (N, D)")
        if self.xv.ndim != 2 or self.xv.shape[1] != self.x.shape[1] or \
                len(self.view_item) != len(self.xv):
            raise InputError(f"views {self.xv.shape} / {self.view_item.shape} do not match "
                             f"x {self.x.shape}")
        if len(self.view_item) and (self.view_item.min() < 0 or self.view_item.max() >= n):
            raise InputError("view_item rows out of range")
        has_view = np.zeros(n, bool)
        has_view[self.view_item] = True
        if len(np.unique(self.pseudo)) != len(self.pseudo) or not has_view[self.pseudo].all():
            raise InputError("pseudo rows must be distinct items that have views")


@dataclass
class Candidate:
    name: str
    prior: str | None
    ridge: float | None
    score: dict[str, float] = field(default_factory=dict)


@dataclass
class Fit:
    """The chosen query map and the evidence (JSON-able via :meth:`info`).

    ``answer``: ``fused`` (queries: ``normalize(x W + b)`` against the fused vectors) or
    ``light`` (the light model's own vectors answer); ``w``/``b`` are the chosen map
    (fitted on every row), kept either way.
    """

    w: np.ndarray  # (D, d)
    b: np.ndarray  # (d,)
    chosen: Candidate
    answer: str
    reason: str
    light: dict[str, float]
    trained: dict[str, float]
    candidates: list[Candidate]
    n_items: int
    n_views: int
    n_pseudo: int
    cosine: dict[str, float] = field(default_factory=dict)
    #: neighbour-consensus mAP of the chosen map and of the light model alone
    consensus: dict[str, dict[str, float]] = field(default_factory=dict)
    #: ``{"fused_mean", "light_mean", "ratio"}`` (:func:`domain_stats`)
    domain: dict[str, float] = field(default_factory=dict)
    #: ``answer == "whitened"``: the gallery transform ``(P (d, d'), c (d',))`` with
    #: whitened ``= normalize(g P + c)`` and the light map into it ``(W (D, d'), b (d',))``
    whitening: tuple[np.ndarray, np.ndarray] | None = None
    whitened_map: tuple[np.ndarray, np.ndarray] | None = None

    def info(self) -> dict[str, Any]:
        return {"answer": self.answer, "reason": self.reason, "domain": self.domain,
                "chosen": {"name": self.chosen.name, "prior": self.chosen.prior,
                           "ridge": self.chosen.ridge, **self.chosen.score},
                "light": self.light, "trained": self.trained,
                "candidates": [{"name": c.name, "prior": c.prior, "ridge": c.ridge, **c.score}
                               for c in self.candidates],
                "n_items": self.n_items, "n_views": self.n_views, "n_pseudo": self.n_pseudo,
                "cosine": self.cosine, "consensus": self.consensus}


def folds_of(pseudo: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """The pseudo-query rows in ``folds`` seeded groups (sorted rows in each)."""
    perm = np.random.default_rng([int(seed), 11]).permutation(np.sort(pseudo))
    return [np.sort(part) for part in np.array_split(perm, min(folds, len(perm)))
            if len(part)]


def median_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Median cosine between row ``i`` of ``a`` and row ``i`` of ``b``."""
    return float(np.median((normalize(a) * normalize(b)).sum(1)))


def fit_adaptation(data: FitData, prior: tuple[np.ndarray, np.ndarray], cfg: AdaptConfig,
                   *, trained_candidate: bool = True) -> Fit:
    """Choose and fit the query map of one gallery (see the module docstring).

    Args:
        data: the gallery's rows (:class:`FitData`).
        prior: the trained map ``(W0 (D, d), b0 (d,))`` on L2-normalised light vectors
            (a candidate as it is, and the centre of the ``trained`` ridge).
        cfg: ridges, priors, folds, margin.
        trained_candidate: score the trained map itself as a candidate (False: ``prior``
            is only a centre of shrinkage, e.g. zeros).
    """
    g = np.asarray(data.g, np.float64)
    x = np.asarray(data.x, np.float64)
    xv = np.asarray(data.xv, np.float64)
    vi = np.asarray(data.view_item, np.int64)
    w0, b0 = (np.asarray(a, np.float64) for a in prior)
    if w0.shape != (x.shape[1], g.shape[1]) or b0.shape != (g.shape[1],):
        raise InputError(f"the trained map must be ({x.shape[1]}, {g.shape[1]}) + "
                         f"({g.shape[1]},); got {w0.shape}, {b0.shape}")
    # the trained map's outputs are not unit vectors: put the prior at the targets' scale
    w0s = w0 / max(float(np.mean(np.linalg.norm(x @ w0 + b0, axis=1))), 1e-12)
    clean = Moments.of(x, g)
    views = Moments.of(xv, g[vi]) if len(xv) else None
    total = clean + views if views is not None else clean
    groups = folds_of(np.asarray(data.pseudo), cfg.folds, cfg.seed)

    cands = [Candidate("trained", None, None)] if trained_candidate else []
    cands += [Candidate("ridge", p, r) for p in cfg.priors for r in cfg.ridges]
    rr: dict[int, list[np.ndarray]] = {i: [] for i in range(len(cands))}
    ap: dict[int, list[np.ndarray]] = {i: [] for i in range(len(cands))}
    rr_light: list[np.ndarray] = []
    ap_light: list[np.ndarray] = []
    for grp in groups:
        in_grp = np.isin(vi, grp)
        qx = xv[in_grp]
        truth = vi[in_grp]
        held = Moments.of(x[grp], g[grp]) + Moments.of(qx, g[truth])
        solver = RidgeSolver(total - held)
        nb = dict(zip(grp.tolist(), consensus_neighbours(g, x, grp, cfg.neighbours),
                      strict=True))
        pos = [nb[int(t)] for t in truth]
        rr_light.append(reciprocal_ranks(normalize(qx), x, truth))
        ap_light.append(neighbour_ap(normalize(qx), x, truth, pos))
        for i, c in enumerate(cands):
            if c.name == "trained":
                w, b = w0, b0
            else:
                w, b = solver.solve(float(c.ridge), w0s if c.prior == "trained" else None)
            q = normalize(qx @ w + b)
            rr[i].append(reciprocal_ranks(q, g, truth))
            ap[i].append(neighbour_ap(q, g, truth, pos))
    for i, c in enumerate(cands):
        c.score = {**_summary(np.concatenate(rr[i])),
                   "consensus_map": _ap_summary(np.concatenate(ap[i]))["map"]}
    light = {**_summary(np.concatenate(rr_light)),
             "consensus_map": _ap_summary(np.concatenate(ap_light))["map"]}
    best = max(range(len(cands)), key=lambda i: (cands[i].score["mrr"], -i))
    chosen = cands[best]
    if chosen.name == "trained":
        w, b = w0, b0
    else:
        w, b = RidgeSolver(total).solve(float(chosen.ridge),
                                        w0s if chosen.prior == "trained" else None)
    dom = domain_stats(g, x)
    if cfg.decide_on == "domain":
        answer, reason = select(dom, chosen.score, light, cfg)
    elif cfg.decide_on == "neighbours":
        answer, reason = decide({"mrr": chosen.score["consensus_map"], "n": chosen.score["n"]},
                                {"mrr": light["consensus_map"], "n": light["n"]}, cfg.margin,
                                what="neighbour-consensus mAP")
    else:
        answer, reason = decide(chosen.score, light, cfg.margin)
    trained = cands[0].score if trained_candidate else {}
    fit = Fit(w, b, chosen, answer, reason, light, trained, cands, len(g), len(xv),
              len(data.pseudo), domain=dom)
    if answer == "whitened":
        fit.whitening = gallery_whitening(g, cfg.whiten_shrink)
        fit.whitened_map = whitened_map(g, x, xv, vi, fit.whitening, cfg.whiten_ridge)
    fit.cosine = {"trained": round(median_cosine(x @ w0 + b0, g), 4),
                  "adapted": round(median_cosine(x @ w + b, g), 4)}
    log.info("adaptation: %s (pseudo-query MRR %.1f; trained %.1f; light model alone %.1f): "
             "%s", chosen.name if chosen.name == "trained" else
             f"ridge {chosen.ridge} towards {chosen.prior}", chosen.score["mrr"],
             trained.get("mrr", float("nan")), light["mrr"], reason)
    return fit


def decide(fused: dict[str, float], light: dict[str, float], margin: float = 0.0, *,
           what: str = "MRR") -> tuple[str, str]:
    """``(answer, reason)``: ``fused`` when the fused space's pseudo-query score (``mrr``
    key; ``what`` names it) is at least the light model's own plus ``margin``, else
    ``light``."""
    if fused["mrr"] >= light["mrr"] + margin:
        return "fused", (f"light query -> fused gallery scored {fused['mrr']:.1f} {what} on "
                         f"{fused['n']} pseudo-queries vs {light['mrr']:.1f} for the light "
                         "model on its own")
    return "light", (f"the light model on its own scored {light['mrr']:.1f} {what} on "
                     f"{light['n']} pseudo-queries vs {fused['mrr']:.1f} for light query -> "
                     "fused gallery: its own vectors answer")


def domain_stats(g: np.ndarray, x: np.ndarray) -> dict[str, float]:
    """``{"fused_mean", "light_mean", "ratio"}``: the norms of the means of the
    L2-normalised fused ``g (N, d)`` and light ``x (N, D)`` vectors, and their ratio.

    The fused space's trained anchor subtracts the mean of its training data, so a gallery
    of that domain is centred in it (measured: ratio 0.25-0.56 in domain, >= 0.79 on seven
    other galleries); the light model's own vectors are not centred by anything, and
    ``light_mean`` measures how much one direction dominates the gallery (0.6-0.7 on
    varied photos, 0.74-0.89 on product covers and faces)."""
    fm = float(np.linalg.norm(normalize(np.asarray(g, np.float64)).mean(0)))
    lm = float(np.linalg.norm(normalize(np.asarray(x, np.float64)).mean(0)))
    return {"fused_mean": round(fm, 4), "light_mean": round(lm, 4),
            "ratio": round(fm / max(lm, 1e-12), 4)}


def select(dom: dict[str, float], fused: dict[str, float], light: dict[str, float],
           cfg: AdaptConfig) -> tuple[str, str]:
    """``(answer, reason)`` of ``decide_on="domain"``: ``fused`` when the gallery is of the
    fused model's training domain (``ratio < in_domain``: the trained space answers; views
    of gallery images cannot see what its labels taught); ``whitened`` when the gallery is
    homogeneous (``light_mean >= homogeneous``: one direction dominates every raw feature,
    the gallery's own whitening removes it); otherwise the light model's own vectors
    (``out_of_domain="light"``) or :func:`decide` on the pseudo-query MRRs with ``margin``
    (``"pseudo-queries"``)."""
    if dom["ratio"] < cfg.in_domain:
        return "fused", (f"the gallery is centred in the fused space (|mean| ratio "
                         f"{dom['ratio']:.2f} < {cfg.in_domain}): of the fused model's training "
                         "domain; light query -> fused gallery")
    if dom["light_mean"] >= cfg.homogeneous:
        return "whitened", (f"out of the fused model's domain (ratio {dom['ratio']:.2f}) and "
                            f"homogeneous (|mean light| {dom['light_mean']:.2f} >= "
                            f"{cfg.homogeneous}): light query -> the fused gallery whitened on "
                            "itself")
    where = (f"out of the fused model's domain (ratio {dom['ratio']:.2f}) and not homogeneous "
             f"(|mean light| {dom['light_mean']:.2f} < {cfg.homogeneous})")
    if cfg.out_of_domain == "light":
        return "light", f"{where}: the light model's own vectors answer"
    answer, why = decide(fused, light, cfg.margin)
    return answer, f"{where}: {why}"


def gallery_whitening(g: np.ndarray, shrink: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(P (d, d'), c (d',))``: PCA-whitening of the gallery's fused vectors ``g (N, d)``
    fitted on them (no labels), eigenvalues shrunk by ``shrink`` times their mean;
    whitened vectors are ``normalize(g P + c)`` (``c = -mean P``)."""
    g = np.asarray(g, np.float64)
    mu = g.mean(0)
    _, s, vt = np.linalg.svd(g - mu, full_matrices=False)
    lam = s ** 2 / max(len(g), 1)
    k = max(1, int((s > s[0] * 1e-6).sum()))
    p = vt[:k].T / np.sqrt(lam[:k] + shrink * lam[:k].mean())
    return p, -mu @ p


def whitened_map(g: np.ndarray, x: np.ndarray, xv: np.ndarray, view_item: np.ndarray,
                 whitening: tuple[np.ndarray, np.ndarray], ridge: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(W (D, d'), b (d',))``: ridge map (towards 0) from the light vectors of the gallery
    images ``x (N, D)`` and of their views ``xv`` (``view_item``: their rows) onto the
    whitened fused vectors of the same items."""
    p, c = whitening
    gw = normalize(np.asarray(g, np.float64) @ p + c)
    m = Moments.of(x, gw)
    if len(xv):
        m = m + Moments.of(np.asarray(xv, np.float64), gw[np.asarray(view_item, np.int64)])
    return RidgeSolver(m).solve(ridge)


def apply_map(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(Q, D)`` light vectors -> ``(Q, d)`` L2-normalised queries in the fused space."""
    return normalize(np.asarray(x, np.float32) @ np.asarray(w, np.float32)
                     + np.asarray(b, np.float32)).astype(np.float32)


def sample_rows(ids: Sequence[str], n: int, seed: int) -> np.ndarray:
    """Sorted rows of a seeded sample of ``n`` of ``ids`` (independent of their order;
    :func:`galleria.images.pseudo.sample_ids`)."""
    from galleria.images.pseudo import sample_ids  # lazy: PIL

    pos = {i: r for r, i in enumerate(ids)}
    return np.sort(np.array([pos[i] for i in sample_ids(ids, n, seed=seed)], np.int64))
