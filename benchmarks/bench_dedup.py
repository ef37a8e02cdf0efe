"""Near-duplicate detection (`galleria dedup`) on real images with planted copies.

Three galleries are built by this script from ``../shared/datasets`` alone:

- **tune**: 1,500 Caltech-101 *train* images (seeded sample) + copies of 200 of them;
  the rule's thresholds are chosen here (best F1 over a grid);
- **eval**: other images -- 1,500 Caltech-101 *test* images, the 500 SMVS DVD-cover
  photos (5 photos of each cover: same object, other photo, NOT near-duplicates),
  RParis250 and UKBench56 -- + copies of 300 of them; precision and recall are
  reported here, with the thresholds chosen on tune;
- **scale**: every Caltech-101 image (8,677, train and test), SMVS, RParis250,
  UKBench56 + copies of 500: time per 10k images (and precision / recall,
  labelled as overlapping the tuning images).

A copy is made by one to three of: ``crop`` (keep 60-85 % of each side),
``jpeg`` (re-encode at quality 15-35), ``resize`` (35-60 %), ``combo`` (crop +
resize + JPEG 30-50) and ``tone`` (brightness / contrast +-20-30 %, JPEG 85).
Ground truth: each source with its copies, plus base images that are
pixel-identical (the data sets hold a few). Metrics are over pairs: every pair in
one predicted group vs every pair in one true group.

Global embeddings (effnet-lite0) and SIFT features of the base images come from
the evaluation caches (``galleria.eval.embed`` / ``eval.local_features``), the
copies are indexed with ``galleria index`` into the same gallery (the gallery's
recipe), so the gallery is what ``galleria index --model effnet-lite0 --local
sift`` makes.

    nice -n 10 .venv/bin/python benchmarks/bench_dedup.py                # ~40 min
    .venv/bin/python benchmarks/bench_dedup.py --sections tune,eval      # no timing set

Writes ``benchmarks/results/dedup.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

log = logging.getLogger("bench_dedup")
OUT = Path(os.environ.get("GALLERIA_BENCH_OUT") or Path(__file__).resolve().parent / "out")
KINDS = ("crop", "jpeg", "resize", "combo", "tone")
TASKS = ("caltech101", "smvs", "rparis250", "ukbench56")


# ------------------------------------------------------------------ copies
def make_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """``(copy, JPEG quality to save it with)``."""
    w, h = img.size
    if kind in ("crop", "combo"):
        f = rng.uniform(0.6, 0.85) if kind == "crop" else rng.uniform(0.7, 0.9)
        cw, ch = max(8, int(w * f)), max(8, int(h * f))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x, y, x + cw, y + ch))
    if kind in ("resize", "combo"):
        s = rng.uniform(0.35, 0.6) if kind == "resize" else rng.uniform(0.5, 0.8)
        img = img.resize((max(8, int(img.width * s)), max(8, int(img.height * s))),
                         Image.Resampling.BILINEAR)
    if kind == "tone":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.3))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
        return img, 85
    if kind == "jpeg":
        return img, int(rng.integers(15, 36))
    if kind == "combo":
        return img, int(rng.integers(30, 51))
    return img, 90


def pixel_hash(path: str) -> str:
    with Image.open(path) as im:
        return hashlib.sha1(np.asarray(im.convert("RGB")).tobytes()).hexdigest()


# ------------------------------------------------------------------ sources
def task_images(name: str, ext: Any, local: Any) -> list[dict[str, Any]]:
    """Every full image of a task (no query crops) with its cached embedding and SIFT."""
    from galleria.eval.datasets import load_task
    from galleria.eval.embed import _items, task_embeddings
    from galleria.eval.local_features import task_local_features

    task = load_task(name)
    items, g_rows, q_rows = _items(task)
    vq, vg = task_embeddings(task, ext)
    vecs = np.zeros((len(items), vg.shape[1]), np.float32)
    vecs[g_rows], vecs[q_rows] = vg, vq
    packed, pg, pq = task_local_features(task, local)
    frow = np.zeros(len(items), np.int64)
    frow[g_rows], frow[q_rows] = pg, pq
    labels = task.gallery_labels
    out = []
    for i, it in enumerate(items):
        if it.bbox is not None:
            continue
        kind, rel = str(it.id).split(":", 1)
        out.append({"id": f"{name}/{rel}", "path": str(it.path), "task": name,
                    "vec": vecs[i], "feat": packed[int(frow[i])],
                    "split": "train" if kind == "g" else "test",
                    "group": str(labels[i]) if name == "smvs" and labels is not None
                    and i < len(labels) else None})
    return out


def choose_sources(pool: dict[str, list[dict[str, Any]]],
                   spec: dict[str, tuple[Any, int | None]], seed: int) -> list[dict[str, Any]]:
    """Base images: per task ``(predicate or None, how many or None = all)``, seeded."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for name, (pred, n) in spec.items():
        rows = [r for r in pool[name] if pred is None or pred(r)]
        if n is not None and n < len(rows):
            rows = [rows[i] for i in np.sort(rng.choice(len(rows), n, replace=False))]
        out += rows
    return out


def build_set(name: str, base: list[dict[str, Any]], n_planted: int, seed: int,
              ext: Any, local: Any, work: Path) -> dict[str, Any]:
    """A gallery of ``base`` + copies of ``n_planted`` of them; ground truth."""
    from galleria.extract.spaces import space_info
    from galleria.store.gallery import Gallery

    rng = np.random.default_rng(seed)
    folder = work / name
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "copies").mkdir(parents=True)
    g = Gallery.create(folder / "g")
    g.register_space(ext.fingerprint, ext.dim, space_info(ext))
    g.register_space(local.fingerprint, local.dim, space_info(local), kind="local")
    t0 = time.perf_counter()
    for s in range(0, len(base), 1000):
        chunk = base[s : s + 1000]
        ids = [r["id"] for r in chunk]
        meta = [{"path": r["path"], "set": r["task"]} for r in chunk]
        g.add(ids, np.stack([r["vec"] for r in chunk]), space=ext.fingerprint, meta=meta)
        g.add_local(ids, [r["feat"] for r in chunk], space=local.fingerprint)
    g.save_index(ext.fingerprint)  # (no local index: dedup reads features, not ASMK)
    planted = np.sort(rng.choice(len(base), n_planted, replace=False))
    rows = ["path,id,planted_from,copy"]
    kinds_of: dict[str, str] = {}
    gt: list[list[str]] = []
    for j in planted.tolist():
        src = base[j]
        img = Image.open(src["path"]).convert("RGB")
        kinds = rng.choice(KINDS, int(rng.integers(1, 4)), replace=False).tolist()
        group = [src["id"]]
        for kind in kinds:
            cp, q = make_copy(img, kind, rng)
            cid = f"copies/{j}-{kind}.jpg"
            cp.save(folder / cid, quality=q)
            rows.append(f"{cid},{cid},{src['id']},{kind}")
            kinds_of[cid] = kind
            group.append(cid)
        gt.append(group)
    (folder / "copies.csv").write_text("\n".join(rows) + "\n")
    # the copies embedded with the gallery's own extractors (what `galleria index` into
    # this gallery does, without training the ASMK index dedup does not use)
    from galleria.images.decode import load_image

    cids = list(kinds_of)
    for s in range(0, len(cids), 32):
        part = cids[s : s + 32]
        imgs = [load_image(folder / c) for c in part]
        meta = [{"path": str(folder / c), "set": "copy"} for c in part]
        g.add(part, ext.embed_images(imgs), space=ext.fingerprint, meta=meta)
        g.add_local(part, local.embed_images(imgs), space=local.fingerprint)
    g.close()
    # natural duplicates: pixel-identical base images
    by_hash: dict[str, list[str]] = {}
    for r in base:
        by_hash.setdefault(pixel_hash(r["path"]), []).append(r["id"])
    natural = [sorted(v) for v in by_hash.values() if len(v) > 1]
    smvs_group = {r["id"]: r["group"] for r in base if r["task"] == "smvs"}
    return {"name": name, "gallery": str(folder / "g"), "base": len(base),
            "planted_sources": int(n_planted), "copies": len(kinds_of), "groups": gt,
            "natural": natural, "kinds": kinds_of, "smvs_group": smvs_group,
            "build_s": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------ metrics
def _pairs(groups: list[list[str]]) -> set[tuple[str, str]]:
    out = set()
    for g in groups:
        g = sorted(g)
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                out.add((g[i], g[j]))
    return out


def score(pred_groups: list[list[str]], ds: dict[str, Any]) -> dict[str, Any]:
    truth = _pairs(ds["groups"] + ds["natural"])
    pred = _pairs(pred_groups)
    tp = len(truth & pred)
    wrong = sorted(pred - truth)
    same_cover = [p for p in wrong if ds["smvs_group"].get(p[0]) is not None
                  and ds["smvs_group"].get(p[0]) == ds["smvs_group"].get(p[1])]
    per_kind: dict[str, list[int]] = {k: [0, 0] for k in KINDS}
    for g in ds["groups"]:
        for cid in g[1:]:
            k = ds["kinds"][cid]
            per_kind[k][1] += 1
            per_kind[k][0] += int(tuple(sorted((g[0], cid))) in pred)
    exact = sum(1 for g in ds["groups"] if any(set(g) == set(p) for p in pred_groups))
    p = tp / len(pred) if pred else 1.0
    r = tp / len(truth) if truth else 1.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "true_pairs": len(truth), "predicted_pairs": len(pred), "wrong_pairs": len(wrong),
            "wrong_same_cover_other_photo": len(same_cover),
            "wrong_examples": wrong[:10],
            "recall_by_copy": {k: (v[0] / v[1] if v[1] else None) for k, v in per_kind.items()},
            "groups_exact": exact, "groups_planted": len(ds["groups"])}


def decisions(c: Any, cfg: Any, local: bool) -> np.ndarray:
    from galleria.dedup.core import decide

    if not local:
        return c.scores >= cfg.threshold
    inl = np.where(c.inliers < 0, 0, c.inliers)
    return (c.scores >= cfg.candidate) & decide(c.scores, inl, cfg)


def groups_of(c: Any, dup: np.ndarray) -> list[list[str]]:
    from galleria.dedup.core import groups

    return [[c.ids[k] for k in g] for g in groups(c.pairs[dup])]


def sweep(c: Any, ds: dict[str, Any]) -> dict[str, Any]:
    """The best rule on ``c`` (candidates of a loose run) by F1, with and without local
    features."""
    from galleria.dedup.core import DedupConfig

    best_l, best_g = None, None
    grid_l = []
    for cand in (0.6, 0.65, 0.7, 0.75, 0.8, 0.85):
        for mi in (8, 12, 15, 20, 25, 30, 40):
            for sure in (0.9, 0.93, 0.95, 0.97, 0.99):
                cfg = DedupConfig(candidate=cand, min_inliers=mi, sure=sure)
                m = score(groups_of(c, decisions(c, cfg, True)), ds)
                grid_l.append({"candidate": cand, "min_inliers": mi, "sure": sure, **{
                    k: m[k] for k in ("precision", "recall", "f1")}})
                if best_l is None or m["f1"] > best_l[1]["f1"]:
                    best_l = (cfg, m)
    grid_g = []
    for t in (0.8, 0.82, 0.85, 0.87, 0.9, 0.92, 0.94, 0.96):
        cfg = DedupConfig(threshold=t)
        m = score(groups_of(c, decisions(c, cfg, False)), ds)
        grid_g.append({"threshold": t, **{k: m[k] for k in ("precision", "recall", "f1")}})
        if best_g is None or m["f1"] > best_g[1]["f1"]:
            best_g = (cfg, m)
    assert best_l is not None and best_g is not None
    return {"local": {"candidate": best_l[0].candidate, "min_inliers": best_l[0].min_inliers,
                      "sure": best_l[0].sure, **best_l[1]},
            "global": {"threshold": best_g[0].threshold, **best_g[1]},
            "grid_local": grid_l, "grid_global": grid_g}


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="tune,eval,scale")
    p.add_argument("--model", default="effnet-lite0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune-base", type=int, default=1500, help="Caltech train images in tune")
    p.add_argument("--tune-planted", type=int, default=200, help="sources copied in tune")
    p.add_argument("--eval-caltech", type=int, default=1500, help="Caltech test images in eval")
    p.add_argument("--eval-planted", type=int, default=300, help="sources copied in eval")
    p.add_argument("--scale-planted", type=int, default=500, help="sources copied in scale")
    p.add_argument("--work", type=Path, default=OUT / "dedup")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    info = C.machine_info(args.threads)
    C.set_threads(args.threads)
    from galleria.dedup import DedupConfig, find_duplicates, score_candidates
    from galleria.extractors.registry import create_extractor
    from galleria.store.gallery import Gallery

    sections = args.sections.split(",")
    ext = create_extractor(args.model, threads=args.threads)
    local = create_extractor("sift", threads=args.threads)
    pool = {t: task_images(t, ext, local) for t in TASKS}
    log.info("base images: %s", {t: len(v) for t, v in pool.items()})
    def train(r: dict[str, Any]) -> bool:
        return r["split"] == "train"

    def test(r: dict[str, Any]) -> bool:
        return r["split"] == "test"

    specs = {
        "tune": ({"caltech101": (train, args.tune_base)}, args.tune_planted),
        "eval": ({"caltech101": (test, args.eval_caltech), "smvs": (None, None),
                  "rparis250": (None, None), "ukbench56": (None, None)}, args.eval_planted),
        "scale": ({t: (None, None) for t in TASKS}, args.scale_planted),
    }
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                           "defaults": DedupConfig().to_dict(), "sets": {}}
    chosen: dict[str, Any] = {}
    for n, name in enumerate(("tune", "eval", "scale")):
        if name not in sections:
            continue
        spec, planted = specs[name]
        base = choose_sources(pool, spec, args.seed + n)
        ds = build_set(name, base, planted, args.seed + 10 + n, ext, local, args.work)
        log.info("%s: %d base + %d copies built in %s s", name, ds["base"], ds["copies"],
                 ds["build_s"])
        res: dict[str, Any] = {k: ds[k] for k in ("base", "planted_sources", "copies",
                                                  "natural", "build_s")}
        with Gallery.open(ds["gallery"], readonly=True) as g:
            if name == "tune":
                loose = score_candidates(g, DedupConfig(candidate=0.6, sure=1.0,
                                                        verify="always"))
                res["sweep"] = sweep(loose, ds)
                chosen = res["sweep"]
                res["loose_candidates"] = len(loose.pairs)
            runs = {"defaults, local verification": DedupConfig(),
                    "defaults, global only": DedupConfig(verify="never")}
            if chosen:
                runs["chosen on tune, local"] = DedupConfig(
                    candidate=chosen["local"]["candidate"],
                    min_inliers=chosen["local"]["min_inliers"], sure=chosen["local"]["sure"])
                runs["chosen on tune, global only"] = DedupConfig(
                    threshold=chosen["global"]["threshold"], verify="never")
            res["runs"] = {}
            for label, cfg in runs.items():
                t0 = time.perf_counter()
                rep = find_duplicates(g, cfg)
                secs = time.perf_counter() - t0
                m = score(rep.groups, ds)
                total = ds["base"] + ds["copies"]
                res["runs"][label] = {**m, "rule": cfg.to_dict(), "seconds": secs,
                                      "seconds_per_10k": secs * 10_000 / total,
                                      "parts": rep.seconds, "candidate_pairs": rep.candidates,
                                      "verified_pairs": rep.verified, "items": total}
                log.info("%s / %s: P %.3f R %.3f (%.1f s)", name, label, m["precision"],
                         m["recall"], secs)
        res["load_average"] = list(os.getloadavg())
        out["sets"][name] = res
    info["load_average_at_end"] = list(os.getloadavg())
    out["machine"] = info
    name = "dedup" if "tune" in sections else "dedup-" + "-".join(sections)
    C.write_results(name, out, render(out), results_dir=args.results_dir)
    print(render(out))
    return 0


def render(out: dict[str, Any]) -> str:
    lines = ["# Near-duplicate detection on real images with planted copies\n",
             "Copies (crop / jpeg / resize / combo / tone) of real shared images, planted by "
             "`benchmarks/bench_dedup.py`; pairs within predicted groups vs pairs within true "
             "groups (sources with their copies, plus pixel-identical base images). "
             "effnet-lite0 global embeddings, SIFT local features (MAGSAC++ verification). "
             "Thresholds chosen on **tune** (Caltech-101 train images) and reported on "
             "**eval** (other images: Caltech-101 test, SMVS, RParis250, UKBench56).\n"]
    tune = out["sets"].get("tune", {}).get("sweep")
    if tune:
        lo, gl = tune["local"], tune["global"]
        lines.append(f"Chosen on tune: local verification candidate >= {lo['candidate']}, "
                     f">= {lo['min_inliers']} inliers or cosine >= {lo['sure']} (F1 "
                     f"{lo['f1']:.3f}); global only: cosine >= {gl['threshold']} (F1 "
                     f"{gl['f1']:.3f}).\n")
    rows = []
    for name, res in out["sets"].items():
        for label, r in res.get("runs", {}).items():
            rk = r["recall_by_copy"]
            rows.append([name, label, f"{res['base'] + res['copies']:,}",
                         f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                         " / ".join("-" if rk[k] is None else f"{rk[k]:.2f}" for k in KINDS),
                         f"{r['groups_exact']} / {r['groups_planted']}",
                         f"{r['wrong_pairs']} ({r['wrong_same_cover_other_photo']})",
                         f"{r['seconds']:.1f}", f"{r['seconds_per_10k']:.1f}"])
    lines.append(C.markdown_table(
        ["set", "rule", "images", "precision", "recall", "F1",
         "recall by copy (" + " / ".join(KINDS) + ")", "groups exact", "wrong pairs (same "
         "SMVS cover, other photo)", "s", "s per 10k images"], rows))
    lines.append("\nThe scale set includes the tuning images (its precision / recall are not "
                 "held out); its rows give the time per 10k images.\n\n## Machine\n\n"
                 + C.machine_md(out["machine"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
