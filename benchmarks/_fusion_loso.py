"""Recipe options chosen on held-out *data sets* (leave one set out), for bench_fusion_transfer.

The default recipe chooses the closed-form start (learned-whitening shrinkage ``alpha``, the
inputs kept, the query start: ridge and ``lam``) on held-out *classes* of its training set.
Here a *reduced* set of candidate starts of the Caltech-trained recipe (default: ``alpha`` in
{0.6, 0.9} x query ``lam`` in {0.5, 1}, every input kept, the ridge chosen on the held-out
classes as the recipe does; ``--loso-candidates``) is scored on the held-out training
classes (the recipe's own score) and, after the label-free adaptation, on every transfer
gallery (its default answer, in points). For each gallery T the candidate with the best mean
over the held-out classes and the *other* galleries is chosen and its score on T reported,
beside the recipe's own choice (held-out classes alone) and the label-free fit with no
training at all (the table's ``labelfree:default``). The candidates are closed-form starts
(what early stopping keeps on Caltech: epoch 0 or 1), so no network is trained here.

Each set's scores are written to ``<work>/transfer/loso.json`` as soon as they exist; a run
stopped early leaves a partial table (labelled so by the report).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

import fusion_data as fd
from galleria.io.atomic import read_json, write_json

log = logging.getLogger("bench_fusion_transfer")
#: (alpha, lam): the first is the default recipe's own choice on Caltech (ties keep it)
CANDIDATES = ((0.6, 0.5), (0.6, 1.0), (0.9, 0.5), (0.9, 1.0))
#: the SMVS-trained recipe chooses alpha 0.1, lam 0.5: every shrinkage with its query start
CANDIDATES_BY_MODEL = {"caltech": CANDIDATES,
                       "smvs": ((0.1, 0.5), (0.3, 0.5), (0.6, 0.5), (0.9, 0.5))}


def _pts(metric: str, v: float) -> float:
    return 25.0 * v if metric == "N-S" else v


def parse_candidates(spec: str | None, tname: str = "caltech"
                     ) -> tuple[tuple[float, float], ...]:
    """``"0.6:0.5,0.9:1"`` -> ``((0.6, 0.5), (0.9, 1.0))`` (``None``: the model's default
    candidates, :data:`CANDIDATES_BY_MODEL`)."""
    if not spec:
        return CANDIDATES_BY_MODEL[tname]
    return tuple((float(a), float(b)) for a, b in (p.split(":") for p in spec.split(",")))


def candidates(w: Any, specs: tuple[tuple[float, float], ...], tname: str = "caltech"
               ) -> tuple[list[dict[str, Any]], Any, float]:
    """Each ``(alpha, lam)`` start fitted on the training classes of ``tname`` (``caltech``
    or ``smvs``; every input kept), with its held-out-classes score; that default model;
    seconds of the shared set-up (features, views, spans)."""
    import bench_fusion as bf
    from galleria.fusion.anchor import RIDGES, _Chooser
    from galleria.fusion.model import FusionModel
    from galleria.fusion.query_model import build
    from galleria.fusion.recipe import FusionRecipe
    from galleria.fusion.start import _all_views
    from galleria.fusion.train import split_train_val

    t0 = time.perf_counter()
    rec = FusionRecipe()
    model = FusionModel.load(w.model_dir(tname))
    tr = (fd.caltech() if tname == "caltech" else fd.smvs())[0]
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
    setup = time.perf_counter() - t0
    keep = list(range(len(names)))
    out = []
    for a, lam in specs:
        t = time.perf_counter()
        score, parts, (mu, proj, r, lam_, qa, qb) = ch.score(keep, a, RIDGES, [lam])
        out.append({"alpha": a, "lam": lam_, "keep": [names[k] for k in keep], "score": score,
                    "parts": parts, "mu": mu, "proj": proj, "qa": qa, "qb": qb, "ridge": r,
                    "fit_seconds": round(time.perf_counter() - t, 2)})
        log.info("candidate alpha %s lam %s: held-out %.4f (%.1f s)", a, lam, score,
                 out[-1]["fit_seconds"])
    return out, model, setup


def _set_scores(w: Any, cfg: Any, ev: Any, m: str, cands: list[dict[str, Any]],
                names: list[str], light: Any) -> list[dict[str, Any]]:
    """The candidates ``cands`` on one gallery: symmetric, light -> fused after adaptation,
    the gallery-whitened path, and the default answer (the library's selector)."""
    from bench_fusion_transfer import _views_rows, evaluate
    from galleria.fusion.adapt import FitData, apply_map, fit_adaptation, normalize, sample_rows
    from galleria.fusion.adapt_job import view_features

    qid, gid = ev.query_ids, ev.gallery_ids
    cq = np.hstack(w.feats(qid, tuple(names)))
    cg = np.hstack(w.feats(gid, tuple(names)))
    xq = fd.features(w.work, qid, [light.fingerprint])[0]
    xg = fd.features(w.work, gid, [light.fingerprint])[0]
    items = {it.id: it for it in fd.eval_items(ev)}
    uid = list(dict.fromkeys(gid))
    urow = {i: r for r, i in enumerate(gid)}
    u = np.array([urow[i] for i in uid])
    sample = sample_rows(uid, cfg.view_items, cfg.seed)
    views, _ = view_features(light, [items[uid[r]] for r in sample], cfg,
                             w.work / "adapt-views")
    vi, xv = _views_rows(uid, views)
    pos = {i: r for r, i in enumerate(uid)}
    viewed = sorted(pos[i] for i in views)
    pseudo = np.asarray(viewed)[sample_rows([uid[r] for r in viewed], cfg.pseudo_items,
                                            cfg.seed + 1)]
    light_m = evaluate(ev, xq, xg)[m]
    rows = []
    for c in cands:
        t = time.perf_counter()
        gg = normalize((cg - c["mu"]) @ c["proj"].T)
        qsym = normalize((cq - c["mu"]) @ c["proj"].T)
        prior = (np.asarray(c["qa"]).T, np.asarray(c["qb"]))
        fit = fit_adaptation(FitData(gg[u], xg[u], xv, vi, pseudo), prior, cfg)
        after = evaluate(ev, apply_map(xq, fit.w, fit.b), gg)[m]
        whit = None
        if fit.whitening is not None and fit.whitened_map is not None:
            p, cw = fit.whitening
            whit = evaluate(ev, apply_map(xq, *fit.whitened_map), normalize(gg @ p + cw))[m]
        rows.append({"sym": evaluate(ev, qsym, gg)[m], "before": evaluate(
            ev, xq @ prior[0] + prior[1], gg)[m], "after": after, "whitened": whit,
            "light": light_m, "answer": fit.answer,
            "default": {"fused": after, "light": light_m, "whitened": whit}[fit.answer],
            "seconds": round(time.perf_counter() - t, 2), "load": os.getloadavg()[0]})
    return rows


def loso(w: Any, cfg: Any, main: dict[str, str], sets: list[str],
         specs: tuple[tuple[float, float], ...] = CANDIDATES,
         compute: set[str] | None = None, check: tuple[str, ...] = ("caltech101-disjoint",),
         tname: str = "caltech") -> dict[str, Any]:
    """Score every candidate on every gallery of ``sets`` (after adaptation) and choose by
    leave one set out; partial results survive a stop (``<work>/transfer/loso.json``).
    ``compute``: compute only these sets now (the others only from that cache; a set
    missing there makes the result ``partial``). ``check``: in-domain galleries scored for
    every candidate and reported, not used by the choice (the held-out classes stand for
    the training domain)."""
    from galleria.fusion.extractor import light_fingerprint

    t0 = time.perf_counter()
    cands, model, setup = candidates(w, specs, tname)
    names = [s.name for s in model.specs]
    light = w.light(w.model_dir(tname))
    assert light.fingerprint == light_fingerprint(model.fingerprint)
    part_f = w.work / "transfer" / "loso.json"  # {"[model:]set|alpha:lam": scores}
    pre = "" if tname == "caltech" else f"{tname}:"
    cache: dict[str, Any] = read_json(part_f) if part_f.is_file() else {}
    metric = {s: "M_mAP" if s == "rparis250" else main[s] for s in [*sets, *check]}
    table: dict[str, list[dict[str, Any]]] = {}
    for set_name in [*sets, *check]:
        keys = [f"{pre}{set_name}|{c['alpha']}:{c['lam']}" for c in cands]
        todo = [c for c, k in zip(cands, keys, strict=True) if k not in cache]
        if todo and compute is not None and set_name not in compute:
            continue
        if todo:
            t = time.perf_counter()
            got = _set_scores(w, cfg, w.sets[set_name], metric[set_name], todo, names, light)
            cache.update({f"{pre}{set_name}|{c['alpha']}:{c['lam']}": r
                          for c, r in zip(todo, got, strict=True)})
            write_json(part_f, cache)
            log.info("loso %s (%.0f s): %s", set_name, time.perf_counter() - t,
                     [r["default"] for r in got])
        table[set_name] = [cache[k] for k in keys]
    held = [100.0 * c["score"] for c in cands]
    done = [s for s in sets if s in table]
    out: dict[str, Any] = {
        "candidates": [{k: c[k] for k in ("alpha", "lam", "keep", "ridge", "parts",
                                          "fit_seconds")} | {"held_out": round(c["score"], 4)}
                       for c in cands],
        "model": tname, "scores": table, "choice": {}, "partial": len(done) < len(sets),
        "sets": sets, "check": {c: {"metric": metric[c], "default": [r["default"] for r in
                                                                      table[c]]}
                                for c in check if c in table},
        "setup_seconds": round(setup, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "per_candidate_seconds": {s: round(float(np.mean([r["seconds"] for r in table[s]])), 2)
                                  for s in table}}
    recipe_pick = int(np.argmax(held))
    for t in done:
        others = [s for s in done if s != t]
        obj = [np.mean([held[i]] + [_pts(metric[s], table[s][i]["default"]) for s in others])
               for i in range(len(cands))]
        pick = int(np.argmax(obj))
        out["choice"][t] = {
            "loso": {"alpha": cands[pick]["alpha"], "lam": cands[pick]["lam"],
                     "score": table[t][pick]["default"], "sym": table[t][pick]["sym"]},
            "recipe": {"alpha": cands[recipe_pick]["alpha"], "lam": cands[recipe_pick]["lam"],
                       "score": table[t][recipe_pick]["default"],
                       "sym": table[t][recipe_pick]["sym"]},
            "metric": metric[t]}
    return out
