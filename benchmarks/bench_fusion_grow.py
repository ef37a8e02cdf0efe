"""A fused gallery growing after its adaptation: what an added item costs, what a refit costs.

For each size N (default 1,000 and 4,000; real images: Caltech-101, then COIL-20 and ORL, as
the ``cost`` phase of bench_fusion_transfer.py builds them, fused vectors mixed from cached
member features), the Caltech-trained default model:

1. **first fit**: ``adapt_gallery`` on N images, the gallery-whitened answer forced (the path
   whose gallery side must follow new items);
2. **add** N/4 more images as an index run commits them (chunks of 512): their fused vectors,
   then, per commit, their **gallery-whitened vectors from the fused ones**
   (``galleria.extract.derived.derive_into``: one matrix product + one commit; what this
   change does) and their light vectors (the light model's pass, ``sync_light``: needed by
   the next refit, same as before). Beside it, the **baseline** this replaces: the whitened
   space embedded by its own extractor (every member + the mixer again), timed on 32 of the
   added images and given per 1k;
3. **refit**: the growth is now 25 %, ``refit_if_due`` runs the adaptation (light vectors
   up to date, views of the new sample items, the fit, the commit): wall and CPU seconds,
   per 1k gallery images.

Run:  GALLERIA_DATASETS=../shared/datasets nice -n 10 .venv/bin/python \\
        benchmarks/bench_fusion_grow.py [--sizes 1000,4000] [--threads 1]
Caches: ``$GALLERIA_CACHE/fusion-bench`` (member features, views). Writes
benchmarks/results/fusion-grow.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, machine_md, markdown_table, set_threads, write_results
from bench_fusion_transfer import Work, cost_gallery
from galleria.cache import cache_dir

log = logging.getLogger("bench_fusion_grow")


def _timed(fn: Any) -> tuple[Any, float, float]:
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def one_size(w: Work, n0: int, root: Path) -> dict[str, Any]:
    from PIL import Image

    from galleria.extract.derived import Derivers, derive_into
    from galleria.extractors.registry import extractor_from_config
    from galleria.fusion.adapt import AdaptConfig
    from galleria.fusion.adapt_job import adapt_gallery, fused_spaces, fusion_state, sync_light
    from galleria.fusion.grow import growth, refit_if_due
    from galleria.fusion.model import FusionModel
    from galleria.store.gallery import Gallery

    n1 = n0 + n0 // 4
    gdir = cost_gallery(w, n1, root)  # every image, then the last quarter taken out
    model = FusionModel.load(w.model_dir("caltech"))
    with Gallery.open(gdir) as g:
        ids = g.ids(model.fingerprint)
        added = ids[n0:]
        metas = g.meta(added)
        fused_added = g.get_vectors(g.keys_of(added), space=model.fingerprint)
        g.remove(added)
    cfg = AdaptConfig(in_domain=0.0, homogeneous=0.0)  # the whitened answer, forced
    out: dict[str, Any] = {"items": n0, "added": len(added), "load_before": os.getloadavg()}
    rep, wall, cpu = _timed(lambda: adapt_gallery(gdir, config=cfg, threads=w.threads,
                                                  workers=1))
    out["first_fit"] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                        "per_1k_s": round(wall / n0 * 1000, 1), "answer": rep["answer"]}
    with Gallery.open(gdir) as g:
        st = fusion_state(g)
        spaces = fused_spaces(g)
        assert spaces is not None and st is not None
        derivers = Derivers(gdir, threads=w.threads)
        derivers.of(g, spaces.fused)  # built once per run, as an index run does
        t_fused = t_derive = 0.0
        for s in range(0, len(added), 512):
            chunk = added[s:s + 512]
            t = time.perf_counter()
            g.add(chunk, fused_added[s:s + 512], space=spaces.fused, meta=metas[s:s + 512])
            t_fused += time.perf_counter() - t
            t = time.perf_counter()
            derive_into(g, spaces.fused, chunk, fused_added[s:s + 512], derivers)
            t_derive += time.perf_counter() - t
        wh = st["whitening"]["space"]
        assert g.count(wh) == n1, (g.count(wh), n1)  # every added item, at once
        light = extractor_from_config({"type": "fusion-query", "model": spaces.model_path,
                                       "output": "light"}, root=str(gdir), threads=w.threads)
        _, t_light, c_light = _timed(lambda: sync_light(g, spaces, light, workers=1))
        base = extractor_from_config(g.space_info(wh).info["config"], root=str(gdir),
                                     threads=w.threads)
        imgs = [Image.open(m["path"]).convert("RGB") for m in metas[:32]]
        base.embed_images(imgs[:2])  # warm
        _, t_base, _ = _timed(lambda: base.embed_images(imgs))
        k = 1000 / len(added)
        out["add"] = {
            "fused_commit_s_per_1k": round(t_fused * k, 2),
            "whitened_derived_s_per_1k": round(t_derive * k, 3),
            "light_pass_s_per_1k": round(t_light * k, 1),
            "light_pass_cpu_s_per_1k": round(c_light * k, 1),
            "baseline_whitened_by_members_s_per_1k": round(t_base / len(imgs) * 1000, 1)}
        gr = growth(g)
    out["growth_before_refit"] = gr
    rep, wall, cpu = _timed(lambda: refit_if_due(gdir, threads=w.threads, workers=1))
    assert rep is not None, "the refit must be due at +25 %"
    out["refit"] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                    "per_1k_s": round(wall / n1 * 1000, 1),
                    "cpu_per_1k_s": round(cpu / n1 * 1000, 1),
                    "light_s": rep["light_seconds"], "views_s": rep.get("views_seconds"),
                    "fit_s": rep.get("fit_seconds"), "fit": rep["fit"],
                    "answer": rep["answer"], "n_views": rep.get("fit_info", {}).get("n_views")}
    out["load_after"] = os.getloadavg()
    with Gallery.open(gdir, readonly=True) as g:
        out["growth_after_refit"] = growth(g)
    return out


def report(res: dict[str, Any]) -> str:
    rows = list(res["sizes"].values())
    md = ["# A fused gallery growing after its adaptation (bench_fusion_grow.py)\n",
          "Real images (Caltech-101, then COIL-20 and ORL), the Caltech-trained default "
          "fusion model, the gallery-whitened answer forced. `add`: N/4 more images committed "
          "as an index run does (chunks of 512); `whitened (derived)`: their gallery-whitened "
          "vectors from their fused ones at each commit (one matrix product + a commit, what "
          "`index` / uploads do now); `baseline`: the whitened space embedded by its own "
          "extractor (every member + the mixer again: what an index run did before), timed on "
          "32 images; `light pass`: the added images' light vectors (needed by the next refit, "
          "unchanged). `refit`: the adaptation at +25 % (light vectors up to date, views of "
          "the new sample items, the fit, the commit). Seconds per 1k images; wall unless "
          "marked CPU.\n",
          markdown_table(
              ["gallery", "first fit s (per 1k)", "add: whitened (derived) s/1k",
               "baseline: members again s/1k", "light pass s/1k (CPU)", "fused commit s/1k",
               "refit s (per 1k gallery images; CPU)", "refit: light / views / fit s",
               "load before -> after"],
              [[f"{r['items']} + {r['added']}",
                f"{r['first_fit']['wall_s']} ({r['first_fit']['per_1k_s']})",
                r["add"]["whitened_derived_s_per_1k"],
                r["add"]["baseline_whitened_by_members_s_per_1k"],
                f"{r['add']['light_pass_s_per_1k']} ({r['add']['light_pass_cpu_s_per_1k']})",
                r["add"]["fused_commit_s_per_1k"],
                f"{r['refit']['wall_s']} ({r['refit']['per_1k_s']}; "
                f"{r['refit']['cpu_per_1k_s']})",
                f"{r['refit']['light_s']} / {r['refit']['views_s']} / {r['refit']['fit_s']}",
                f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}"] for r in rows]),
          "", f"Threads: {res['threads']}. Refit trigger: " + "; ".join(
              f"{r['items']} + {r['added']}: {r['refit']['fit']}" for r in rows) + ".\n",
          "## Machine\n", machine_md(res["machine"])]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="1000,4000")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_threads(args.threads)
    work = Path(args.work) if args.work else cache_dir("fusion-bench")
    w = Work(work, args.threads)
    res: dict[str, Any] = {"machine": machine_info(args.threads), "threads": args.threads,
                           "sizes": {}}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for n in [int(s) for s in args.sizes.split(",")]:
            res["sizes"][str(n)] = one_size(w, n, Path(tmp))
            log.info("size %d: %s", n, res["sizes"][str(n)])
    res["machine"]["load_average_at_end"] = os.getloadavg()
    _, mpath = write_results("fusion-grow", res, report(res))
    print(mpath.read_text())


if __name__ == "__main__":
    main()
