"""Recipe options chosen on held-out *data sets* (leave one set out), for bench_fusion_transfer.

The default recipe chooses the closed-form start (learned-whitening shrinkage ``alpha``,
the inputs kept, the query map) on held-out *classes* of its training set. Here every
candidate start of the Caltech-trained model (alpha in ALPHAS x inputs kept: all, or all
but one) is scored on the held-out training classes (the recipe's own score) and, after
the label-free adaptation, on every transfer gallery (its default answer, in points).
For each gallery T the candidate with the best mean over the held-out classes and the
*other* galleries is chosen and its score on T reported, beside the recipe's own choice
(held-out classes alone). The candidates are closed-form starts (what early stopping
keeps on Caltech: epoch 0), so no network is trained here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

import fusion_data as fd

log = logging.getLogger("bench_fusion_transfer")
ALPHAS = (0.1, 0.3, 0.6, 0.9)


def _pts(metric: str, v: float) -> float:
    return 25.0 * v if metric == "N-S" else v


def candidates(w: Any) -> tuple[list[dict[str, Any]], Any]:
    """Every (alpha, kept inputs) start fitted on the Caltech training classes, with its
    held-out-classes score; the Caltech-trained default model."""
    import bench_fusion as bf
    from galleria.fusion.anchor import LAMS, RIDGES, _Chooser
    from galleria.fusion.model import FusionModel
    from galleria.fusion.query_model import build
    from galleria.fusion.recipe import FusionRecipe
    from galleria.fusion.start import _all_views
    from galleria.fusion.train import split_train_val

    rec = FusionRecipe()
    model = FusionModel.load(w.model_dir("caltech"))
    tr = fd.caltech()[0]
    ids = [it.id for it in tr.items]
    names = [s.name for s in model.specs]
    feats = w.feats(ids, tuple(names))
    y = np.unique(np.asarray(tr.labels).astype(str), return_inverse=True)[1]
    t_rows, v_rows = split_train_val(y, rec.val_fraction, rec.seed)
    rows = np.concatenate([t_rows, v_rows])
    data = bf.Data(w.work, w.threads)
    _, views = data.views(tr.name, tr.items, rec.n_views, rec.train_blocks)
    tail = build(rec.query_model, rec.train_blocks, rec.d, normalize=True)[1]
    pooled = _all_views(tail, views, rows)
    cols = [np.asarray(f[rows], np.float64) for f in feats]
    own = names.index("effnet-lite0") if "effnet-lite0" in names else None
    ch = _Chooser(cols, y[rows], np.arange(len(t_rows)), np.arange(len(t_rows), len(rows)),
                  pooled, own, "lw", rec.d, False)
    out = []
    subsets = [list(range(len(names)))] + [[j for j in range(len(names)) if j != i]
                                             for i in range(len(names))]
    for keep in subsets:
        for a in ALPHAS:
            score, parts, (mu, proj, r, lam, qa, qb) = ch.score(keep, a, RIDGES, LAMS)
            out.append({"alpha": a, "keep": [names[k] for k in keep], "score": score,
                        "parts": parts, "mu": mu, "proj": proj, "qa": qa, "qb": qb,
                        "ridge": r, "lam": lam})
            log.info("candidate alpha %s keep %s: held-out %.4f", a, keep, score)
    return out, model


def loso(w: Any, cfg: Any, main: dict[str, str], sets: list[str]) -> dict[str, Any]:
    """Score every candidate on every gallery of ``sets`` (after adaptation) and choose by
    leave one set out."""
    from galleria.fusion.adapt import apply_map, normalize, sample_rows
    from galleria.fusion.adapt_job import view_features
    from galleria.fusion.extractor import light_fingerprint

    cands, model = candidates(w)
    names = [s.name for s in model.specs]
    light = w.light(w.model_dir("caltech"))
    assert light.fingerprint == light_fingerprint(model.fingerprint)
    table: dict[str, list[dict[str, float]]] = {}
    for set_name in sets:
        ev = w.sets[set_name]
        m = "M_mAP" if set_name == "rparis250" else main[set_name]
        qid, gid = ev.query_ids, ev.gallery_ids
        cq = np.hstack(w.feats(qid, tuple(names)))
        cg = np.hstack(w.feats(gid, tuple(names)))
        xq = fd.features(w.work, qid, [light.fingerprint])[0]
        xg = fd.features(w.work, gid, [light.fingerprint])[0]
        items = {it.id: it for it in fd.eval_items(ev)}
        uid = list(dict.fromkeys(gid))
        u = np.array([gid.index(i) for i in uid]) if len(uid) != len(gid) else np.arange(len(gid))
        sample = sample_rows(uid, cfg.view_items, cfg.seed)
        views, _ = view_features(light, [items[uid[r]] for r in sample], cfg,
                                 w.work / "adapt-views")
        from bench_fusion_transfer import evaluate
        from galleria.fusion.adapt import FitData, fit_adaptation

        pos = {i: r for r, i in enumerate(uid)}
        viewed = sorted(pos[i] for i in views)
        xv = np.concatenate([views[uid[r]] for r in viewed])
        vi = np.repeat(np.asarray(viewed), [len(views[uid[r]]) for r in viewed])
        pseudo = np.asarray(viewed)[sample_rows([uid[r] for r in viewed], cfg.pseudo_items,
                                                cfg.seed + 1)]
        light_m = evaluate(ev, xq, xg)[m]
        rows = []
        for c in cands:
            gg = normalize((cg - c["mu"]) @ c["proj"].T)
            qsym = normalize((cq - c["mu"]) @ c["proj"].T)
            prior = (np.asarray(c["qa"]).T, np.asarray(c["qb"]))
            fit = fit_adaptation(FitData(gg[u], xg[u], xv, vi, pseudo), prior, cfg)
            after = evaluate(ev, apply_map(xq, fit.w, fit.b), gg)[m]
            rows.append({"sym": evaluate(ev, qsym, gg)[m], "after": after,
                         "default": after if fit.answer == "fused" else light_m,
                         "answer": fit.answer})
        table[set_name] = rows
        log.info("loso %s: %s", set_name, [r["default"] for r in rows])
    held = [100.0 * c["score"] for c in cands]
    out: dict[str, Any] = {"candidates": [{"alpha": c["alpha"], "keep": c["keep"],
                                           "held_out": round(c["score"], 4),
                                           "parts": c["parts"]} for c in cands],
                           "scores": table, "choice": {}}
    recipe_pick = int(np.argmax(held))
    for t in sets:
        others = [s for s in sets if s != t]
        metric = {s: "M_mAP" if s == "rparis250" else main[s] for s in sets}
        obj = [np.mean([held[i]] + [_pts(metric[s], table[s][i]["default"]) for s in others])
               for i in range(len(cands))]
        pick = int(np.argmax(obj))
        out["choice"][t] = {
            "loso": {"alpha": cands[pick]["alpha"], "keep": cands[pick]["keep"],
                     "score": table[t][pick]["default"], "sym": table[t][pick]["sym"]},
            "recipe": {"alpha": cands[recipe_pick]["alpha"], "keep": cands[recipe_pick]["keep"],
                       "score": table[t][recipe_pick]["default"],
                       "sym": table[t][recipe_pick]["sym"]},
            "metric": metric[t]}
    return out
