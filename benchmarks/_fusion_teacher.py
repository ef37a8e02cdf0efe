"""Teacher agreement (``bench_fusion_transfer.py --phases teacher``): a label-free check of
which query path a gallery should answer with, tried and *not* adopted.

For a seeded held-out sample of gallery images (the pseudo-query items of the adaptation,
in its folds), a *teacher* (the members' own gallery vectors: their concatenation; the
fused space; the gallery-PCA-whitened concatenation; the members other than the light
model) gives each image's top-k neighbours (the image itself left out) as pseudo-relevant.
Each query path is scored by the mean AP with which the light-model vector of that clean
image, mapped as the path maps it, retrieves them in the path's own gallery space: light
alone (-> light vectors), the trained map (-> fused), the adapted map (best of the ridges,
fitted without the fold; -> fused), the label-free map (best ridge; -> the whitened
concatenation). The path with the highest score is what the check would pick.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import fusion_data as fd
from galleria.fusion.adapt import (
    AdaptConfig,
    Moments,
    RidgeSolver,
    folds_of,
    neighbour_ap,
    normalize,
    sample_rows,
)
from galleria.fusion.adapt_job import view_features
from galleria.fusion.model import FusionModel

TEACHERS = ("concat", "others", "fused", "whitened-concat")
PATHS = ("light", "trained", "adapted", "label-free")


def _knn(t: np.ndarray, rows: np.ndarray, k: int) -> list[np.ndarray]:
    out = []
    for r in rows:
        sc = t @ t[r]
        sc[r] = -np.inf
        out.append(np.argpartition(-sc, k - 1)[:k])
    return out


def teacher_scores(w: Any, bt: Any, tname: str, set_name: str, sub: tuple[int, int] | None,
                   cfg: AdaptConfig, k: int = 10) -> dict[str, dict[str, float]]:
    """``{teacher: {path: mean AP x 100}}`` for one transfer row (see the module docstring)."""
    ev = w.sets[set_name]
    if sub:
        ev = bt.subsample(ev, *sub)
    mdir = w.model_dir(tname)
    model = FusionModel.load(mdir)
    light = w.light(mdir)
    w.light_vectors(light, ev)
    uid = list(dict.fromkeys(ev.gallery_ids))
    gf = dict(zip(bt.MEMBERS, w.feats(uid), strict=True))
    g = normalize(model.mix([gf[s.name] for s in model.specs]).astype(np.float64))
    x = normalize(fd.features(w.work, uid, [light.fingerprint])[0].astype(np.float64))
    blocks = {m: normalize(gf[m].astype(np.float64)) for m in bt.MEMBERS}
    cat = np.hstack(list(blocks.values()))
    mu, p = bt.whiten_fit(cat, model.dim)
    g_lf = normalize((cat - mu) @ p)
    items = {it.id: it for it in fd.eval_items(ev)}
    sample = sample_rows(uid, cfg.view_items, cfg.seed)
    views, _ = view_features(light, [items[uid[r]] for r in sample], cfg, w.work / "adapt-views")
    vi, xv = bt._views_rows(uid, views)
    xv = xv.astype(np.float64)
    viewed = np.unique(vi)
    pseudo = viewed[sample_rows([uid[r] for r in viewed], cfg.pseudo_items, cfg.seed + 1)]
    w0 = model.tail.whiten.weight.detach().double().numpy().T
    b0 = model.tail.whiten.bias.detach().double().numpy()
    w0s = w0 / np.mean(np.linalg.norm(x @ w0 + b0, axis=1))
    teachers = {"concat": normalize(cat), "fused": g, "whitened-concat": g_lf,
                "others": normalize(np.hstack([blocks[m] for m in bt.MEMBERS
                                               if m != bt.LITE0]))}
    tot_g = Moments.of(x, g) + Moments.of(xv, g[vi])
    tot_l = Moments.of(x, g_lf) + Moments.of(xv, g_lf[vi])
    acc: dict[tuple[str, str], list[np.ndarray]] = {}
    for grp in folds_of(pseudo, cfg.folds, cfg.seed):
        in_grp = np.isin(vi, grp)
        held_g = Moments.of(x[grp], g[grp]) + Moments.of(xv[in_grp], g[vi[in_grp]])
        held_l = Moments.of(x[grp], g_lf[grp]) + Moments.of(xv[in_grp], g_lf[vi[in_grp]])
        sg, sl = RidgeSolver(tot_g - held_g), RidgeSolver(tot_l - held_l)
        qx = x[grp]
        paths: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
            "light": [(qx, x)], "trained": [(qx @ w0 + b0, g)], "adapted": [], "label-free": []}
        for r in cfg.ridges:
            for prior in (w0s, None):
                wa, ba = sg.solve(r, prior)
                paths["adapted"].append((qx @ wa + ba, g))
            wl, bl = sl.solve(r, None)
            paths["label-free"].append((qx @ wl + bl, g_lf))
        for t, tv in teachers.items():
            nb = _knn(tv, grp, k)
            for pname, variants in paths.items():
                for j, (q, gal) in enumerate(variants):
                    acc.setdefault((t, f"{pname}#{j}"), []).append(
                        neighbour_ap(normalize(q), gal, grp, nb))
    out: dict[str, dict[str, float]] = {t: {} for t in teachers}
    for (t, pj), v in acc.items():
        pname = pj.split("#")[0]
        val = round(100 * float(np.nanmean(np.concatenate(v))), 2)
        out[t][pname] = max(out[t].get(pname, -1.0), val)
    return out
