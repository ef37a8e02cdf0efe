"""Fusion that transfers: a fusion model trained on one set, searched on galleries of others,
with and without the label-free gallery adaptation (``galleria.fusion.adapt``).

Models (trained by ``bench_fusion.py``'s default recipe on its fixed seeded splits, cached
in the same work folder): **Caltech-trained** (the train images of 50 seeded Caltech-101
classes) and **SMVS-trained** (the 250 images of 50 seeded covers; at least 200 steps).

Rows (each a gallery nobody trained on, evaluated with its own protocol):

* Caltech-trained: Caltech-101 disjoint (51 other classes, test -> train; *in domain*),
  SMVS phone -> reference (all 100 covers), SMVS all-vs-all, UKBench56, COIL-20, ORL
  faces, rparis250 (E/M/H).
* SMVS-trained: SMVS disjoint (50 other covers, all-vs-all and phone -> reference; *in
  domain*), Caltech-101 test -> train (all 101 classes).

Columns: effnet-lite0 symmetric (the light model on its own), best member symmetric,
concatenation symmetric, fused symmetric, light query -> fused before adaptation (the
trained query) and after (the map fitted on the gallery, forced), the **default** (what
``galleria index --fusion`` + ``galleria search`` answer: the adapted fused space, or the
light model's own vectors when the pseudo-queries say so), and the label-free fit with no
training at all (light query -> the gallery's own PCA-whitened concatenation, the same
ridge and pseudo-query choice). Beside them: the median cosine between the light query and
the fused vector of the same gallery image before / after adaptation, the pseudo-query
MRRs and the decision.

Adaptation inputs are exactly what the library uses: the light model's vectors
(``FusionLightExtractor``) of the gallery images, phone-like views of a seeded sample
(``view_features``, ``PSEUDO_AUGMENT``), ``fit_rows``. Queries never take part in a fit.

``--phases cost``: ``adapt_gallery`` end to end (light pass, views, fit, commit) on real
galleries of 1,000 and ~10,000 images (Caltech-101 + COIL-20 + ORL; fused vectors mixed
from cached member features, the space recorded as ``index --fusion`` records it), and ms
per query of the trained vs the adapted query extractor.

Run:  GALLERIA_DATASETS=../shared/datasets nice -n 10 .venv/bin/python \\
        benchmarks/bench_fusion_transfer.py [--phases prepare,models,table,cost]
Caches: ``$GALLERIA_CACHE/fusion-bench`` (shared with bench_fusion.py). Writes
benchmarks/results/fusion-transfer.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fusion_data as fd
from _common import machine_info, set_threads, write_results
from _fusion_transfer_report import report
from galleria.cache import cache_dir
from galleria.fusion.adapt import (
    AdaptConfig,
    apply_map,
    fit_adaptation,
    gallery_whitening,
    median_cosine,
    normalize,
    whitened_map,
)
from galleria.io.atomic import read_json, write_json

log = logging.getLogger("bench_fusion_transfer")
MEMBERS = ("effnet-lite2", "opennsfw-r50", "effnet-lite0")
LITE0 = "effnet-lite0"
#: model -> [(eval set name, in domain)]
ROWS = {
    "caltech": [("caltech101-disjoint", True), ("smvs-ref", False), ("smvs", False),
                ("ukbench56", False), ("coil20", False), ("orl_faces", False),
                ("rparis250", False)],
    "smvs": [("smvs-disjoint", True), ("smvs-ref-disjoint", True), ("caltech101", False),
             ("coil20", False), ("orl_faces", False), ("rparis250", False), ("ukbench56", False)],
}
#: rows added after the selector (``AdaptConfig.decide_on="domain"``) was designed on the
#: others: nobody looked at them while choosing its rule and thresholds
HELD_OUT = {"smvs:coil20", "smvs:orl_faces", "smvs:rparis250", "smvs:ukbench56"}
#: the metric each row is judged on (N-S is out of 4)
MAIN = {"caltech101-disjoint": "mAP@R", "caltech101": "mAP@R", "smvs-ref": "R@1",
        "smvs-ref-disjoint": "R@1", "smvs": "mAP", "smvs-disjoint": "mAP", "ukbench56": "N-S",
        "coil20": "mAP@R", "orl_faces": "mAP@R", "rparis250": "M_mAP"}


def _eval_sets() -> dict[str, fd.EvalSet]:
    _, c_ev = fd.caltech()
    _, s_evs = fd.smvs()
    out = {e.name: e for e in fd.transfer_sets()}
    out.update({c_ev.name: c_ev, **{e.name: e for e in s_evs}})
    return out


def subsample(ev: fd.EvalSet, n_gallery: int, n_queries: int, seed: int = 0) -> fd.EvalSet:
    """A seeded subsample of a class-protocol set (``n_gallery`` gallery items, ``n_queries``
    queries, drawn uniformly without replacement; used when a row cannot finish in time;
    the row records it)."""
    from dataclasses import replace

    t = ev.task
    if t.protocol != "class" or t.query_labels is None or t.gallery_labels is None:
        raise ValueError(f"{ev.name}: only class-protocol sets are subsampled")
    rng = np.random.default_rng(seed)
    gi = np.sort(rng.permutation(len(t.gallery_paths))[:n_gallery])
    qi = np.sort(rng.permutation(len(t.query_paths))[:n_queries])
    new_pos = {int(g): j for j, g in enumerate(gi)}  # a query that is a gallery item
    qgi = np.array([new_pos.get(int(t.query_gallery_index[i]), -1) for i in qi], np.int64)
    task = replace(t, gallery_paths=[t.gallery_paths[i] for i in gi],
                   query_paths=[t.query_paths[i] for i in qi], query_gallery_index=qgi,
                   query_labels=t.query_labels[qi], gallery_labels=t.gallery_labels[gi])
    return fd.EvalSet(ev.name, task, [ev.query_ids[i] for i in qi],
                      [ev.gallery_ids[i] for i in gi], ev.main)


def evaluate(ev: fd.EvalSet, q: np.ndarray, g: np.ndarray) -> dict[str, float]:
    m = ev.task.evaluate(normalize(np.asarray(q, np.float32)) @ normalize(
        np.asarray(g, np.float32)).T)
    keys = ("E_mAP", "M_mAP", "H_mAP") if ev.task.protocol == "revisitop" else ev.main
    return {k: round(float(m[k]), 3 if k == "N-S" else 2) for k in keys}


def whiten_fit(x: np.ndarray, d: int, shrink: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, P (W, d'))``: PCA-whitening of ``(N, W)`` rows, eigenvalues shrunk by
    ``shrink`` times their mean (the label-free gallery space)."""
    x = np.asarray(x, np.float64)
    mu = x.mean(0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    lam = s ** 2 / len(x)
    k = min(d, int((s > s[0] * 1e-6).sum()))
    p = vt[:k].T / np.sqrt(lam[:k] + shrink * lam[:k].mean())
    return mu, p


# ----------------------------------------------------------------------------- data
class Work:
    """Cached member features, light vectors and views (``$GALLERIA_CACHE/fusion-bench``)."""

    def __init__(self, work: Path, threads: int) -> None:
        self.work = work
        self.threads = threads
        self.exts = dict(zip(MEMBERS, fd.member_extractors(MEMBERS, threads), strict=True))
        self.sets = _eval_sets()

    def prepare(self) -> dict[str, float]:
        _, _, _, items = fd.all_items(with_transfer=True)
        out = {}
        for n in MEMBERS:
            t = time.perf_counter()
            fd.fill(self.work, items, [self.exts[n]])
            out[f"features_{n}_s"] = round(time.perf_counter() - t, 1)
        return out

    def feats(self, ids: list[str], members: tuple[str, ...] = MEMBERS) -> list[np.ndarray]:
        return fd.features(self.work, ids, [self.exts[m].fingerprint for m in members])

    def model_dir(self, tname: str) -> Path:
        return self.work / "models" / f"{tname}-default"

    def light(self, model_dir: Path) -> Any:
        from galleria.extractors.registry import extractor_from_config

        return extractor_from_config({"type": "fusion-query", "model": str(model_dir),
                                      "output": "light"}, threads=self.threads)

    def light_vectors(self, light: Any, ev: fd.EvalSet) -> None:
        fd.fill(self.work, fd.eval_items(ev), [light])


def models(threads: int, work: Path) -> dict[str, Any]:
    """Train (or reuse) the default-recipe models of bench_fusion.py; their in-domain rows."""
    import bench_fusion as bf

    data = bf.Data(work, threads)
    out = bf.runs(data, {}, ["default"], ["caltech", "smvs"], {"smvs": 200})
    return {t: {"eval": r["default"]["eval"], "train": {
        k: r["default"]["train"].get(k) for k in ("best_epoch", "seconds", "init")},
        "recipe": r["default"]["recipe"]} for t, r in out.items()}


# ----------------------------------------------------------------------------- one row
def row(w: Work, tname: str, set_name: str, cfg: AdaptConfig,
        sub: tuple[int, int] | None = None) -> dict[str, Any]:
    from galleria.fusion.adapt_job import fit_rows, view_features
    from galleria.fusion.model import FusionModel

    ev = w.sets[set_name]
    if sub is not None:
        ev = subsample(ev, *sub)
    mdir = w.model_dir(tname)
    model = FusionModel.load(mdir)
    light = w.light(mdir)
    w.light_vectors(light, ev)
    qid, gid = ev.query_ids, ev.gallery_ids
    qf = dict(zip(MEMBERS, w.feats(qid), strict=True))
    gf = dict(zip(MEMBERS, w.feats(gid), strict=True))
    members = [s.name for s in model.specs]
    q_mix = model.mix([qf[m] for m in members])
    g_mix = model.mix([gf[m] for m in members])
    xq = fd.features(w.work, qid, [light.fingerprint])[0]
    xg = fd.features(w.work, gid, [light.fingerprint])[0]
    out: dict[str, Any] = {"model": tname, "set": set_name, "queries": len(qid),
                           "gallery": len(gid), "cols": {},
                           "subsample": None if sub is None else {
                               "gallery": sub[0], "queries": sub[1], "seed": 0,
                               "of": [len(w.sets[set_name].gallery_ids),
                                      len(w.sets[set_name].query_ids)]}}
    c = out["cols"]
    for m in MEMBERS:
        c[f"sym:{m}"] = evaluate(ev, qf[m], gf[m])
    c["sym:concat"] = evaluate(ev, np.hstack([qf[m] for m in MEMBERS]),
                               np.hstack([gf[m] for m in MEMBERS]))
    c["sym:fused"] = evaluate(ev, q_mix, g_mix)
    c["light:sym"] = evaluate(ev, xq, xg)
    w0 = model.tail.whiten.weight.detach().double().numpy().T
    b0 = model.tail.whiten.bias.detach().double().numpy()
    c["asym:before"] = evaluate(ev, xq @ w0 + b0, g_mix)
    out["light_equals_lite0"] = round(median_cosine(xg, gf[LITE0]), 5)

    # the adaptation, as the library fits it on this gallery
    items = {it.id: it for it in fd.eval_items(ev)}
    gal = [items[i] for i in dict.fromkeys(gid)]
    from galleria.fusion.adapt import sample_rows

    uid = list(dict.fromkeys(gid))
    urow = {i: r for r, i in enumerate(gid)}
    u = np.array([urow[i] for i in uid])
    t0 = time.perf_counter()
    sample = sample_rows(uid, cfg.view_items, cfg.seed)
    views, _ = view_features(light, [gal[r] for r in sample], cfg, w.work / "adapt-views")
    t1 = time.perf_counter()
    fit = fit_rows(model, uid, g_mix[u], xg[u], views, cfg)
    t2 = time.perf_counter()
    out["seconds"] = {"views": round(t1 - t0, 2), "fit": round(t2 - t1, 2)}
    c["asym:after"] = evaluate(ev, apply_map(xq, fit.w, fit.b), g_mix)
    # the gallery-whitened fused space (forced): the label-free path the selector may choose
    pw, cw = gallery_whitening(g_mix[u], cfg.whiten_shrink)
    viewed_rows, xv_all = _views_rows(uid, views)
    ww, bw = whitened_map(g_mix[u], xg[u], xv_all, viewed_rows, (pw, cw), cfg.whiten_ridge)
    g_w = normalize(g_mix @ pw + cw)
    c["asym:whitened"] = evaluate(ev, apply_map(xq, ww, bw), g_w)
    c["default"] = {"fused": c["asym:after"], "light": c["light:sym"],
                    "whitened": c["asym:whitened"]}[fit.answer]
    out["fit"] = fit.info()
    out["cosine"] = {"before": round(median_cosine(xg @ w0 + b0, g_mix), 4),
                     "after": round(median_cosine(apply_map(xg, fit.w, fit.b), g_mix), 4)}

    # label-free, no training: light -> the gallery's own PCA-whitened concatenation
    cat_g = np.hstack([gf[m] for m in MEMBERS])
    mu, p = whiten_fit(cat_g[u], model.dim)
    g_lf = normalize((cat_g - mu) @ p)
    zeros = (np.zeros((xg.shape[1], g_lf.shape[1])), np.zeros(g_lf.shape[1]))
    from galleria.fusion.adapt import FitData

    pos = {i: r for r, i in enumerate(uid)}
    viewed = sorted(pos[i] for i in views)
    xv = np.concatenate([views[uid[r]] for r in viewed])
    vi = np.repeat(np.asarray(viewed), [len(views[uid[r]]) for r in viewed])
    pseudo = np.asarray(viewed)[sample_rows([uid[r] for r in viewed], cfg.pseudo_items,
                                            cfg.seed + 1)]
    lf_cfg = AdaptConfig.from_dict({**cfg.to_dict(), "priors": ["zero"]})
    lf = fit_adaptation(FitData(g_lf[u], xg[u], xv, vi, pseudo), zeros, lf_cfg,
                        trained_candidate=False)
    c["labelfree:asym"] = evaluate(ev, apply_map(xq, lf.w, lf.b), g_lf)
    c["labelfree:default"] = c["labelfree:asym"] if lf.answer == "fused" else c["light:sym"]
    cat_q = np.hstack([qf[m] for m in MEMBERS])
    c["labelfree:sym"] = evaluate(ev, (cat_q - mu) @ p, g_lf)
    out["labelfree"] = {"answer": lf.answer, "mrr": lf.chosen.score, "light": lf.light}
    out["load"] = os.getloadavg()
    return out


def redecide(r: dict[str, Any], cfg: AdaptConfig) -> dict[str, Any]:
    """A cached row answered by ``cfg``'s rule (a pure function of the statistics the row
    recorded: :func:`galleria.fusion.adapt.select`); the recorded answer is kept as
    ``answer_recorded``."""
    from galleria.fusion.adapt import select

    f = r["fit"]
    if cfg.decide_on != "domain" or not f.get("domain"):
        return r
    answer, reason = select(f["domain"], f["chosen"], f["light"], cfg)
    r["answer_recorded"] = r.get("answer_recorded", f["answer"])
    f["answer"], f["reason"] = answer, reason
    c = r["cols"]
    c["default"] = {"fused": c["asym:after"], "light": c["light:sym"],
                    "whitened": c["asym:whitened"]}[answer]
    return r


def _views_rows(uid: list[str], views: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(view_item (M,), xv (M, D))`` of ``views`` ``{id: (V, D)}`` (rows of ``uid``)."""
    pos = {i: r for r, i in enumerate(uid)}
    viewed = sorted(pos[i] for i in views)
    xv = np.concatenate([views[uid[r]] for r in viewed])
    return np.repeat(np.asarray(viewed), [len(views[uid[r]]) for r in viewed]), xv


def table(w: Work, cfg: AdaptConfig, force: bool = False, only: set[str] | None = None,
          subs: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Every row (cached per row, model, adaptation config and subsample); ``only``: the
    rows ``model:set`` computed now (the others are read from the cache when there);
    ``subs``: ``{model:set: (gallery, queries)}`` seeded subsamples (labelled in the table)."""
    from galleria.fingerprint import digest

    out: dict[str, Any] = {}
    # options added later leave the key of rows measured before them alone at their defaults
    later: dict[str, Any] = {"out_of_domain": "light"}
    key = digest({k: v for k, v in cfg.to_dict().items() if later.get(k, object()) != v})
    for tname, rows in ROWS.items():
        if not w.model_dir(tname).is_dir():
            log.warning("no %s model: run --phases models first", tname)
            continue
        for set_name, in_domain in rows:
            name = f"{tname}:{set_name}"
            sub = (subs or {}).get(name)
            tag = "" if sub is None else f"-sub{sub[0]}x{sub[1]}"
            f = w.work / "transfer" / f"{tname}-{set_name}{tag}-{key}.json"
            if f.is_file() and not force:
                r = redecide(read_json(f), cfg)
            elif only is not None and name not in only:
                continue
            else:
                log.info("row %s -> %s%s", tname, set_name, tag)
                r = redecide(row(w, tname, set_name, cfg, sub), cfg)
                r["in_domain"] = in_domain
                r["held_out"] = name in HELD_OUT
                write_json(f, r)
            out[name] = r
    return out


def teacher(w: Work, cfg: AdaptConfig, subs: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Teacher-agreement scores of every query path on every row (``_fusion_teacher``;
    cached per row)."""
    from _fusion_teacher import teacher_scores

    out = {}
    for tname, rows in ROWS.items():
        for set_name, _ in rows:
            name = f"{tname}:{set_name}"
            sub = subs.get(name)
            f = w.work / "transfer" / f"teacher-{tname}-{set_name}" \
                f"{'' if sub is None else f'-sub{sub[0]}x{sub[1]}'}.json"
            if not f.is_file():
                log.info("teacher agreement %s", name)
                write_json(f, teacher_scores(w, sys.modules[__name__], tname, set_name, sub,
                                             cfg))
            out[name] = read_json(f)
    return out


# ----------------------------------------------------------------------------- cost
def cost_gallery(w: Work, n: int, root: Path) -> Path:
    """A real fused gallery of ``n`` images (Caltech-101, then COIL-20 and ORL), its fused
    vectors mixed from cached member features, recorded as ``index --fusion`` does."""
    from galleria.extract.spaces import space_info
    from galleria.extractors.registry import extractor_from_config
    from galleria.fusion.extractor import attach_to_gallery
    from galleria.fusion.model import FusionModel
    from galleria.store.gallery import Gallery

    out = root / f"cost-{n}.gallery"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    mdir = w.model_dir("caltech")
    model = FusionModel.load(mdir)
    cal = fd.eval_items(w.sets["caltech101"])
    pool = [cal[i] for i in np.random.default_rng(0).permutation(len(cal))]
    pool += fd.eval_items(w.sets["coil20"]) + fd.eval_items(w.sets["orl_faces"])
    uniq = list({it.id: it for it in pool}.values())[:n]
    rel = attach_to_gallery(mdir, out)
    ext = extractor_from_config({"type": "fusion-gallery", "model": rel}, root=str(out))
    with Gallery.open_or_create(out) as g:
        g.register_space(model.fingerprint, model.dim, space_info(ext))
        for s in range(0, len(uniq), 1000):
            chunk = uniq[s:s + 1000]
            ids = [it.id for it in chunk]
            vec = model.mix(w.feats(ids, tuple(sp.name for sp in model.specs)))
            g.add(ids, vec, space=model.fingerprint,
                  meta=[{"path": str(it.path), **({"bbox": list(it.bbox)} if it.bbox else {})}
                        for it in chunk])
    return out


def query_cost(gdir: Path, space: str) -> dict[str, Any]:
    """ms per query (decoded image in, vector out, 1 thread): the trained query extractor vs
    the adapted one (the light model's pass + one matrix product), interleaved."""
    from PIL import Image

    from _common import interleaved_best
    from galleria.extractors.registry import extractor_from_config
    from galleria.store.gallery import Gallery

    with Gallery.open(gdir, readonly=True) as g:
        info = g.space_info(space).info
        paths = [m["path"] for m in g.meta(g.ids()[:16])]
    adapted = extractor_from_config(info["query_config"], root=str(gdir), threads=1)
    trained = extractor_from_config({"type": "fusion-query", "model": info["config"]["model"]},
                                    root=str(gdir), threads=1)
    imgs = [Image.open(p).convert("RGB") for p in paths]
    # one thread everywhere: the map product runs in numpy's BLAS, which the cost phase set
    # to --threads; a 2-thread BLAS woken after each ONNX pass on a loaded host is what made
    # the adapted query measure 81 ms vs 43 (session 2; ONNX passes alone are equal)
    set_threads(1)
    for e in (adapted, trained):
        e.embed_images(imgs[:2])
    state = {"i": 0}

    def one(e: Any) -> None:
        state["i"] = (state["i"] + 1) % len(imgs)
        e.embed_images([imgs[state["i"]]])

    best = interleaved_best({"trained query (ONNX)": lambda: one(trained),
                             "adapted query (light ONNX + map)": lambda: one(adapted)}, rounds=7)
    x = np.random.default_rng(0).standard_normal((1, 1280)).astype(np.float32)
    mm = interleaved_best({"map": lambda: adapted.adaptation.apply(x)}, rounds=7)["map"]
    return {"query_ms": {k: round(v["wall"] * 1e3, 2) for k, v in best.items()},
            "query_cpu_ms": {k: round(v["cpu"] * 1e3, 2) for k, v in best.items()},
            "map_product_us": round(mm["wall"] * 1e6, 1), "query_load": os.getloadavg()}


def cost(w: Work, sizes: list[int]) -> dict[str, Any]:
    import tempfile

    from galleria.fusion.adapt_job import adapt_gallery

    out: dict[str, Any] = {"threads": w.threads, "sizes": {}}
    with tempfile.TemporaryDirectory(dir=w.work) as tmp:
        for n in sizes:
            gdir = cost_gallery(w, n, Path(tmp))
            load0 = os.getloadavg()
            t, c0 = time.perf_counter(), time.process_time()
            rep = adapt_gallery(gdir, threads=w.threads, workers=2)
            wall = time.perf_counter() - t
            cpu = time.process_time() - c0  # every thread of this process: robust under load
            out["sizes"][str(n)] = {
                "items": n, "wall_s": round(wall, 1), "per_1k_s": round(wall / n * 1000, 1),
                "cpu_s": round(cpu, 1), "cpu_per_1k_s": round(cpu / n * 1000, 1),
                "light_s": rep["light_seconds"], "views_s": rep.get("views_seconds"),
                "fit_s": rep.get("fit_seconds"), "answer": rep["answer"],
                "n_views": rep.get("fit_info", {}).get("n_views"),
                "load_before": load0, "load_after": os.getloadavg()}
            if n == sizes[0]:
                out.update(query_cost(gdir, rep["fused_space"]))
                set_threads(w.threads)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phases", default="prepare,models,table",
                    help="prepare,models,table,teacher,cost,loso")
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--force", action="store_true", help="recompute the cached table rows")
    ap.add_argument("--rows", default=None,
                    help="comma-separated model:set rows to compute now (default: all)")
    ap.add_argument("--subsample", action="append", default=[],
                    help="model:set=G:Q, a seeded subsample of G gallery items and Q queries "
                         "of a class-protocol row (labelled so); repeatable")
    ap.add_argument("--loso-candidates", default=None,
                    help="loso phase: ALPHA:LAM,... candidate starts (default "
                         "0.6:0.5,0.6:1,0.9:0.5,0.9:1)")
    ap.add_argument("--loso-models", default="caltech",
                    help="loso phase: the trained models whose recipe is chosen "
                         "(caltech,smvs)")
    ap.add_argument("--loso-sets", default=None,
                    help="loso phase: compute only these sets now (others from the cache; "
                         "missing ones make a partial table)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_threads(args.threads)
    work = Path(args.work) if args.work else cache_dir("fusion-bench")
    phases = args.phases.split(",")
    w = Work(work, args.threads)
    res_f = work / "transfer" / "result.json"
    res: dict[str, Any] = read_json(res_f) if res_f.is_file() else {}
    res["machine"] = machine_info(args.threads)
    cfg = AdaptConfig()
    res["adapt_config"] = cfg.to_dict()
    if "prepare" in phases:
        res["prepare"] = w.prepare()
    if "models" in phases:
        res["models"] = models(args.threads, work)
    subs = {}
    for spec in args.subsample:
        name, gq = spec.split("=")
        g_n, q_n = gq.split(":")
        subs[name] = (int(g_n), int(q_n))
    if "table" in phases:
        only = set(args.rows.split(",")) if args.rows else None
        res["rows"] = {**(res.get("rows") or {}),
                       **table(w, cfg, args.force, only, subs)}
    if "teacher" in phases:
        res["teacher"] = teacher(w, cfg, subs)
    cost_f = work / "transfer" / "cost.json"  # its own file: phases run in parallel share res_f
    if "cost" in phases:
        res["cost"] = cost(w, [int(s) for s in args.sizes.split(",")])
        write_json(cost_f, res["cost"])
    elif cost_f.is_file():
        res["cost"] = read_json(cost_f)
    if "loso" in phases:
        from _fusion_loso import loso, parse_candidates

        for tname in args.loso_models.split(","):
            key = "loso" if tname == "caltech" else f"loso_{tname}"
            check = {"caltech": ("caltech101-disjoint",),
                     "smvs": ("smvs-disjoint", "smvs-ref-disjoint")}[tname]
            res[key] = loso(w, cfg, MAIN, [s for s, dom in ROWS[tname] if not dom],
                            parse_candidates(args.loso_candidates, tname),
                            set(args.loso_sets.split(",")) if args.loso_sets else None,
                            check, tname)
    res["machine"]["load_average_at_end"] = os.getloadavg()
    write_json(res_f, res)
    if "rows" in res:
        _, mpath = write_results("fusion-transfer", res, report(res, ROWS, MAIN))
        print(mpath.read_text())


if __name__ == "__main__":
    main()
