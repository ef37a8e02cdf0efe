"""Closed-form start of a fusion run: the mixer's linear anchor and the query's linear map.

Pure numpy; :mod:`galleria.fusion.start` feeds it the cached training features.

* **Anchor** ``g = P (concat - mu)``, ``P (d, W)``:

  - ``pca``: the top-``d`` principal components of the concatenated training features
    (the concatenation + PCA baseline);
  - ``lw``: *learned whitening* (Radenovic et al., "Fine-tuning CNN image retrieval with
    no human annotation", 2018): whiten the within-class scatter ``S_w`` (shrunk towards
    a multiple of the identity, ``(1 - alpha) S_w + alpha tr(S_w)/r I``), then keep the
    top-``d`` principal directions of the whitened total scatter. Computed inside the
    span of the centred training rows (rank ``r``); components beyond ``r`` are 0.
    Measured on disjoint classes (see docs/fusion.md): it carries to unseen classes,
    where the trained mixer did not.

* **Input selection**: backward elimination of whole inputs on the held-out training
  classes. Drop the input whose removal raises the held-out score most, while it does.
  A pure-noise input is dropped this way.

* **Query map** ``q = A x + b`` on the light model's L2-normalised pooled features ``x``
  (``D``-d): the anchor applied to a *predicted* concatenation. The block of the
  gallery input that is the query model's own feature is ``x`` itself; every other kept
  block is ``lam * ridge(x) + (1 - lam) * mean``, the ridge regression of that block on
  ``x`` over every training view (phone-like augmentations included). ``ridge`` and
  ``lam`` are chosen on the held-out classes.

Held-out scores are mAPs on the held-out rows: symmetric (anchor -> anchor, self
excluded) and asymmetric (query view 0 -> anchor); the score is their mean, the same
score early stopping uses.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from galleria.errors import InputError
from galleria.eval.metrics import retrieval_metrics
from galleria.fusion.options import options_of
from galleria.transforms.linear import learn_pca

log = logging.getLogger(__name__)

ANCHOR_KINDS = ("pca", "lw")
ALPHAS = (0.1, 0.3, 0.6, 0.9)
RIDGES = (0.01, 0.1, 1.0, 10.0)
LAMS = (0.5, 1.0)
#: used when there is no held-out split to choose on
DEFAULT_ALPHA, DEFAULT_RIDGE, DEFAULT_LAM = 0.6, 1.0, 1.0


def _nrm(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def held_out_map(q: np.ndarray, g: np.ndarray, labels: np.ndarray, exclude_self: bool
                 ) -> float:
    """mAP of ``(Q, d)`` queries against ``(G, d)`` gallery rows sharing ``labels``
    (``exclude_self``: query i is gallery row i and does not count)."""
    qgi = np.arange(len(q)) if exclude_self else None
    return float(retrieval_metrics(q @ g.T, labels, labels, metrics=("mAP",),
                                   query_gallery_index=qgi)["mAP"])


def pca_projection(x: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (W,), P (d, W))``: top-``d`` principal components of ``(N, W)`` rows.

    As the concatenation + PCA baseline (:mod:`galleria.transforms` ``pca``): the first
    ``d`` eigenvectors of the covariance, those beyond the data's rank included.
    """

    mean, _, comps = learn_pca(np.asarray(x, np.float64))
    k = min(d, comps.shape[0])
    proj = np.zeros((d, x.shape[1]))
    proj[:k] = comps[:k]
    return mean, proj


def _span(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu (W,), basis (r, W), z (N, r))``: the span of the centred rows and their
    coordinates in it (``r``: the numerical rank)."""
    mu = x.mean(0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    r = int((s > s[0] * 1e-6).sum()) if s.size and s[0] > 0 else 0
    basis = vt[:r]
    return mu, basis, (x - mu) @ basis.T


def _lw_in_span(z: np.ndarray, basis: np.ndarray, labels: np.ndarray, d: int, alpha: float
                ) -> np.ndarray:
    """``P (d, W)`` of :func:`learned_whitening` from :func:`_span`'s ``basis``, ``z``."""
    r = basis.shape[0]
    proj = np.zeros((d, basis.shape[1]))
    if r == 0:
        return proj
    _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    means = np.zeros((counts.size, r))
    np.add.at(means, inv, z)
    means /= counts[:, None]
    w = z - means[inv]
    s_w = w.T @ w / len(z)
    s_t = z.T @ z / len(z)
    s_w = (1.0 - alpha) * s_w + alpha * max(np.trace(s_w) / r, 1e-12) * np.eye(r)
    lam, vec = np.linalg.eigh(s_w)
    white = vec / np.sqrt(np.maximum(lam, 1e-12))  # (r, r): s_w^(-1/2) up to rotation
    lt, vt2 = np.linalg.eigh(white.T @ s_t @ white)
    order = np.argsort(lt)[::-1]
    k = min(d, r)
    pz = (white @ vt2[:, order[:k]]).T  # (k, r)
    # scale: the mean output norm on the training rows equals the mean norm of the centred
    # rows (what an orthonormal PCA gives, up to the discarded variance), so a gated mixer
    # added to the anchor and the query's whitening layer train at the scale they would
    # with the PCA anchor (unscaled, the rows have norms ~45 on Caltech-101)
    out = np.linalg.norm(z @ pz.T, axis=1).mean()
    scale = np.linalg.norm(z, axis=1).mean() / max(out, 1e-12)
    proj[:k] = scale * pz @ basis
    return proj


def learned_whitening(x: np.ndarray, labels: np.ndarray, d: int, alpha: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (W,), P (d, W))``: learned whitening of ``(N, W)`` rows with class ``labels``.

    ``P S_w' P^T = c^2 I`` (``S_w'``: the shrunk within-class scatter); its rows are the
    top generalised eigenvectors of ``(S_t, S_w')`` inside the span of the centred rows
    (rows beyond the rank are 0). ``c``: the mean output norm on these rows equals the
    mean norm of the centred rows. Falls back to :func:`pca_projection` when no class has
    two rows (no within-class scatter to whiten, e.g. instance discrimination).
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    x = np.asarray(x, np.float64)
    if np.unique(labels, return_counts=True)[1].max() < 2:
        log.info("learned whitening: every class has one image; using PCA")
        return pca_projection(x, d)
    mu, basis, z = _span(x)
    return mu, _lw_in_span(z, basis, np.asarray(labels), d, alpha)


def blocks(dims: Sequence[int]) -> list[slice]:
    """Column slices of each input in the concatenation."""
    edges = np.concatenate([[0], np.cumsum(dims)]).astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _ridge(x: np.ndarray, t: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """``(W (D, T), b (T,))`` minimising ``|x W + b - t|^2 + lam |W|^2``, ``lam`` relative to
    the mean eigenvalue of ``x``'s scatter."""
    mx, mt = x.mean(0), t.mean(0)
    xc = x - mx
    gram = xc.T @ xc
    lam = ridge * max(float(np.trace(gram)) / gram.shape[0], 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ (t - mt))
    return w, mt - mx @ w


@dataclass
class Start:
    """The chosen closed-form start (full-width: dropped inputs have zero columns in P)."""

    kind: str
    mu: np.ndarray  # (W,)
    proj: np.ndarray  # (d, W)
    keep: list[int]
    alpha: float | None = None
    ridge: float | None = None
    lam: float | None = None
    query_w: np.ndarray | None = None  # (d, D)
    query_b: np.ndarray | None = None  # (d,)
    val: dict[str, Any] = field(default_factory=dict)

    def info(self, names: Sequence[str]) -> dict[str, Any]:
        """JSON-able record of the choice (``names``: the inputs' names, in order)."""
        return {"anchor": self.kind, "alpha": self.alpha,
                "kept_inputs": [names[i] for i in self.keep],
                "query_ridge": self.ridge, "query_lam": self.lam, "val": self.val}


class _Chooser:
    """Fits and scores anchors and query maps on fixed train / held-out rows (memoised:
    the span of each input subset and each ridge regression are computed once)."""

    def __init__(self, feats: Sequence[np.ndarray], labels: np.ndarray, train: np.ndarray,
                 val: np.ndarray, pooled: np.ndarray | None, own: int | None, kind: str, d: int,
                 inst: bool, view: int = 0) -> None:
        self.x = np.hstack([np.asarray(f, np.float64) for f in feats])
        self.sl = blocks([f.shape[1] for f in feats])
        self.y, self.tr, self.va = np.asarray(labels), train, val
        self.pooled, self.own, self.kind, self.d, self.inst = pooled, own, kind, d, inst
        self.view = view
        self.lw_ok = kind == "lw" and np.unique(self.y[train], return_counts=True)[1].max() >= 2
        self._spans: dict[tuple[int, ...], tuple[np.ndarray, ...]] = {}
        self._ridges: dict[tuple[tuple[int, ...], float], tuple[np.ndarray, np.ndarray]] = {}

    def cols(self, keep: Sequence[int]) -> np.ndarray:
        """Column indices of the inputs ``keep`` in the concatenation."""
        idx = np.arange(self.x.shape[1])
        return (np.concatenate([idx[self.sl[i]] for i in keep]) if keep
                else np.zeros(0, int))

    def anchor(self, keep: list[int], alpha: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Full-width ``(mu (W,), P (d, W))`` fitted on the train rows of inputs ``keep``."""
        cols = self.cols(keep)
        xs = self.x[np.ix_(self.tr, cols)]
        if self.lw_ok:
            key = tuple(keep)
            if key not in self._spans:
                self._spans[key] = _span(xs)
            mu_k, basis, z = self._spans[key]
            p_k = _lw_in_span(z, basis, self.y[self.tr], self.d, float(alpha or 0.0))
        else:
            mu_k, p_k = pca_projection(xs, self.d)
        mu = np.zeros(self.x.shape[1])
        proj = np.zeros((self.d, self.x.shape[1]))
        mu[cols], proj[:, cols] = mu_k, p_k
        return mu, proj

    def _regression(self, others: tuple[int, ...], r: float) -> tuple[np.ndarray, np.ndarray]:
        if (others, r) not in self._ridges:
            assert self.pooled is not None
            n_v, dim = self.pooled.shape[1], self.pooled.shape[2]
            ocols = self.cols(others)
            target = np.repeat(self.x[np.ix_(self.tr, ocols)], n_v, axis=0)
            self._ridges[(others, r)] = (_ridge(self.pooled[self.tr].reshape(-1, dim), target, r)
                                         if len(ocols) else (np.zeros((dim, 0)), np.zeros(0)))
        return self._ridges[(others, r)]

    def query_maps(self, mu: np.ndarray, proj: np.ndarray, keep: list[int], ridges: Sequence[float],
                   lams: Sequence[float]) -> list[tuple[float, float, np.ndarray, np.ndarray]]:
        """``(ridge, lam, A (d, D), b (d,))`` for each pair (ridge regressions on train rows)."""
        assert self.pooled is not None
        dim = self.pooled.shape[2]
        own = self.own if self.own in keep else None
        others = tuple(i for i in keep if i != own)
        ocols = self.cols(others)
        m_o = self.x[np.ix_(self.tr, ocols)].mean(0)
        out = []
        for r in ridges:
            w, b = self._regression(others, r)
            for lam in lams:
                e = np.zeros((self.x.shape[1], dim))  # c(x) = E x + f
                f = mu.copy()  # dropped blocks: at the mean (their columns of P are 0 anyway)
                if own is not None:
                    e[self.sl[own]] = np.eye(dim)
                    f[self.sl[own]] = 0.0
                e[ocols] = lam * w.T
                f[ocols] = lam * b + (1.0 - lam) * m_o
                out.append((r, lam, proj @ e, proj @ (f - mu)))
        return out

    def score(self, keep: list[int], alpha: float | None, ridges: Sequence[float],
              lams: Sequence[float]) -> tuple[float, dict[str, Any], tuple[Any, ...]]:
        """``(score, {sym, asym}, (mu, P, ridge, lam, A, b))`` on the held-out rows: the
        mean of the symmetric and the best query map's asymmetric mAP (query view
        ``self.view``, as early stopping scores)."""
        mu, proj = self.anchor(keep, alpha)
        g = _nrm((self.x[self.va] - mu) @ proj.T)
        yv = self.y[self.va]
        sym = None if self.inst else held_out_map(g, g, yv, True)
        best: tuple[Any, ...] = (None, None, None, None)
        asym = None
        if self.pooled is not None:
            q_in = self.pooled[self.va, self.view]
            for r, lam, a, b in self.query_maps(mu, proj, keep, ridges, lams):
                s = held_out_map(_nrm(q_in @ a.T + b), g, yv, not self.inst)
                if asym is None or s > asym:
                    asym, best = s, (r, lam, a, b)
        parts = [v for v in (sym, asym) if v is not None]
        score = float(np.mean(parts)) if parts else 0.0  # nothing to score: nothing chosen
        return score, {"sym": sym, "asym": asym}, (mu, proj, *best)


def _check(feats: Sequence[np.ndarray], labels: np.ndarray, pooled: np.ndarray | None,
           own: int | None, d: int) -> None:
    n = len(labels)
    if d < 1 or not feats or any(np.ndim(f) != 2 or len(f) != n for f in feats):
        raise InputError(f"need d >= 1 and one (N={n}, W_i) array per input; got d={d}, "
                         f"{[np.shape(f) for f in feats]}")
    if pooled is not None and (pooled.ndim != 3 or len(pooled) != n):
        raise InputError(f"pooled query features must be (N={n}, V, D), got {pooled.shape}")
    if own is not None and (pooled is None or feats[own].shape[1] != pooled.shape[2]):
        raise InputError("the query's own input must have the width of its pooled features")


@dataclass(frozen=True)
class StartOptions:
    """What :func:`choose_start` fits.

    Attributes:
        d: output dimension.
        kind: the anchor (``ANCHOR_KINDS``: learned whitening or PCA).
        select: drop inputs whose removal raises the held-out score.
        own: index of the input that is the query model's own feature, if any.
        inst: instance discrimination (no symmetric score: an image has no positive;
            the query map is scored on view 1, an augmentation, as early stopping does).
        names: the inputs' names (for the log and the report).
    """

    d: int
    kind: str = "lw"
    select: bool = True
    own: int | None = None
    inst: bool = False
    names: Sequence[str] | None = None


def choose_start(feats: Sequence[np.ndarray], labels: np.ndarray, train: np.ndarray,
                 val: np.ndarray, options: StartOptions | None = None, *,
                 pooled: np.ndarray | None = None, **option_fields: Any) -> Start:
    """Choose and fit the anchor (and the query map when ``pooled`` is given).

    Args:
        feats: one ``(N, W_i)`` array per mixer input (global inputs, or local sets
            already mean-pooled), every training row.
        labels: ``(N,)`` class labels.
        train, val: row indices fitted on / scored on (``val`` may be empty: defaults
            are used and nothing is selected).
        options: a :class:`StartOptions`; or give its fields as keywords (``d=64,
            select=False``).
        pooled: ``(N, V, D)`` L2-normalised pooled query features of every view (view
            0 clean), or None (no query map).

    Returns:
        the :class:`Start`; the anchor and the query map are fitted on ``train`` rows only.
    """
    o = options_of(StartOptions, options, option_fields)
    d, kind, select, own, inst, names = o.d, o.kind, o.select, o.own, o.inst, o.names
    if kind not in ANCHOR_KINDS:
        raise InputError(f"anchor kind must be one of {ANCHOR_KINDS}, not {kind!r}")
    _check(feats, labels, pooled, own, d)
    names = list(names) if names is not None else [str(i) for i in range(len(feats))]
    view = 1 if inst and pooled is not None and pooled.shape[1] > 1 else 0
    ch = _Chooser(feats, labels, train, val, pooled, own, kind, d, inst, view)
    kind_used = "lw" if ch.lw_ok else "pca"
    keep = list(range(len(feats)))
    if len(val) < 2:
        alpha = DEFAULT_ALPHA if ch.lw_ok else None
        mu, proj = ch.anchor(keep, alpha)
        st = Start(kind_used, mu, proj, keep, alpha=alpha)
        if pooled is not None:
            r, lam, a, b = ch.query_maps(mu, proj, keep, (DEFAULT_RIDGE,), (DEFAULT_LAM,))[0]
            st.ridge, st.lam, st.query_w, st.query_b = r, lam, a, b
        return st
    ridges, lams = (RIDGES, LAMS) if pooled is not None else ((), ())
    trials: dict[str, Any] = {}
    alpha: float | None = None
    if ch.lw_ok:
        scored = {a: ch.score(keep, a, ridges, lams) for a in ALPHAS}
        trials["alpha"] = {str(a): round(s[0], 4) for a, s in scored.items()}
        alpha = max(scored, key=lambda a: scored[a][0])
        best = scored[alpha]
    else:
        best = ch.score(keep, None, ridges, lams)
    steps = []
    while select and len(keep) > 1:
        drops = {i: ch.score([k for k in keep if k != i], alpha, ridges, lams) for i in keep}
        i = max(drops, key=lambda j: drops[j][0])
        steps.append({"score": round(best[0], 4),
                      "without": {names[j]: round(s[0], 4) for j, s in drops.items()}})
        if drops[i][0] <= best[0]:
            break
        log.info("input selection: dropping %s (held-out %.4f -> %.4f)", names[i], best[0],
                 drops[i][0])
        keep.remove(i)
        best = drops[i]
    trials["selection"] = steps
    mu, proj, r, lam, a, b = best[2]
    return Start(kind_used, mu, proj, keep, alpha=alpha, ridge=r, lam=lam, query_w=a, query_b=b,
                 val={"score": round(best[0], 4), "query_view": view,
                      **{k: (round(v, 4) if v is not None else None) for k, v in best[1].items()},
                      "trials": trials})
