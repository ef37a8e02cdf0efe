"""Asymmetric feature fusion (docs/methods.md, AFF) on real data: fused gallery vs single
features, light query model vs light symmetric, ablations, cost.

Training sets (fixed seeded splits, see ``fusion_data.py``): Caltech-101, the train images
of 50 classes (class labels); SMVS, the 250 images of 50 covers (cover = instance label).
Every trained row is evaluated on classes / covers it never saw: Caltech-101 test -> train
of the other 51 classes; SMVS phone photos of the other 50 covers (all-vs-all, and
phone -> reference); rparis250 and UKBench56 as transfer sets. Untrained rows (single
features, concatenation, + PCA fitted on the training set) are evaluated on the same
queries and galleries.

Rows: symmetric fused gallery (mixer -> mixer); each member feature; their concatenation
(+ PCA to d); an MLP mixer; asymmetric light query (effnet-lite0 trunk + GeM + whitening,
ONNX) -> fused gallery; light symmetric (raw effnet-lite0 -> effnet-lite0, and the trained
light model -> itself); light query trained against the best single member (a mixer with
that one input). Ablations: momentum 0 vs 0.99, joint vs two-stage, transformer vs MLP,
C, d, labels (class / instance vs instance discrimination), a pure-noise extra input, the
multi-scale member, which query blocks are trained. Cost: ms per query of the light
model (ONNX, 1 and 2 threads) vs each gallery model, fused gallery ms per image, and the
wall time of ``galleria fusion train`` with the default recipe on 2 cores.

Run:  GALLERIA_DATASETS=... .venv/bin/python benchmarks/bench_fusion.py [--phases ...]
Caches (features, views, per-run results) live in ``--work`` (default
``$GALLERIA_CACHE/fusion-bench``), so an interrupted run resumes. Writes
benchmarks/results/fusion.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fusion_data as fd
from _common import machine_info, set_threads, write_results
from _fusion_report import report, verdicts
from galleria.cache import cache_dir
from galleria.fusion.train import FusionRecipe
from galleria.io.atomic import read_json, write_json

log = logging.getLogger("bench_fusion")
BASE_MEMBERS = ("effnet-lite2", "opennsfw-r50", "effnet-lite0")
NOISE_DIM = 1024

#: the previous default (stop 15): anchored on the PCA of the concatenation, the query
#: regressed on it; the ablations measured against it keep it as their base
PREV = {"anchor_kind": "pca", "select_inputs": False, "query_init": "regress",
        "query_norm": False}
#: name -> overrides of the default recipe / data (members, labels, noise). ``pca-*``: the
#: same ablations against the previous default (PREV), kept as measured then.
RUNS: dict[str, dict[str, Any]] = {
    "default": {},
    "no-select": {"select_inputs": False},
    "noise": {"noise": True},
    "mlp": {"mixer": "mlp"},
    "single-best": {"members": "best"},
    "momentum-0": {"momentum": 0.0},
    "two-stage": {"schedule": "two-stage"},
    "C1": {"layers": 1},
    "d256": {"d": 256},
    "no-distill": {"distill": 0.0},
    "paper": {**PREV, "anchor": False, "distill": 0.0, "query_init": "pca"},
    "pca-anchor": PREV,
    "pca-noise": {**PREV, "noise": True},
    "pca-no-distill": {**PREV, "distill": 0.0},
    "pca-no-anchor": {**PREV, "anchor": False},
    "pca-mlp": {**PREV, "mixer": "mlp"},
    "pca-single-best": {**PREV, "members": "best"},
    "pca-momentum-0": {**PREV, "momentum": 0.0},
    "pca-two-stage": {**PREV, "schedule": "two-stage"},
    "pca-C1": {**PREV, "layers": 1},
    "pca-d256": {**PREV, "d": 256},
    "C2": {"layers": 2},
    "d1024": {"d": 1024},
    "inst-disc": {"labels": "instance"},
    "with-ms": {"members": fd.MEMBERS},
    "whiten-only": {"train_blocks": -1},
    "last-block": {"train_blocks": 1},
}
RECIPE_KEYS = {"d", "mixer", "layers", "heads", "momentum", "schedule", "train_blocks", "min_steps",
               "n_views", "epochs", "lr", "query_lr", "batch_size", "patience", "anchor",
               "anchor_kind", "select_inputs", "distill", "query_init", "query_norm"}


# ----------------------------------------------------------------------------- helpers
_ANCHOR_TEXT = {
    ("lw", True): ", anchored on the learned whitening of the concatenation (inputs selected "
                  "and shrinkage chosen on held-out training classes)",
    ("lw", False): ", anchored on the learned whitening of the concatenation",
    ("pca", False): ", anchored on the PCA of the concatenation",
    ("pca", True): ", anchored on the PCA of the concatenation (inputs selected)",
}


def _recipe_text(r: FusionRecipe) -> str:
    blocks = {-1: "whitening only", 0: "head convolution + whitening"}.get(
        r.train_blocks, f"last {r.train_blocks} MBConv block(s), head and whitening")
    return (f"d = {r.d}, {r.mixer} mixer C = {r.layers}"
            f"{_ANCHOR_TEXT[(r.anchor_kind, r.select_inputs)] if r.anchor else ''}, ArcFace m "
            f"{r.margin}, s {r.scale:g}, momentum {r.momentum}, {r.schedule} training"
            f"{f', distillation weight {r.distill:g}' if r.distill else ''}; light query: "
            f"{r.query_model} trunk ({blocks} trained, start: {r.query_init}) + GeM + "
            "whitening, ONNX")


def noise_features(ids: list[str], dim: int = NOISE_DIM) -> np.ndarray:
    """A fixed pure-noise 'feature' per image (i.i.d. Gaussian, seeded by the id)."""
    out = np.empty((len(ids), dim), np.float32)
    for n, i in enumerate(ids):
        x = np.random.default_rng([17, zlib.crc32(i.encode())]).standard_normal(dim)
        out[n] = x / np.linalg.norm(x)
    return out


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def evaluate(ev: fd.EvalSet, q: np.ndarray, g: np.ndarray) -> dict[str, float]:
    m = ev.task.evaluate(_norm(q) @ _norm(g).T)
    return {k: round(float(m[k]), 2) for k in ev.main}


class Data:
    """Cached member features and views of every image, looked up by id."""

    def __init__(self, work: Path, threads: int) -> None:
        self.work = work
        self.threads = threads
        self.c_tr, self.s_tr, self.evs, self.items = fd.all_items()
        self.exts = {n: e for n, e in zip(fd.MEMBERS, fd.member_extractors(fd.MEMBERS, threads),
                                          strict=True)}
        from galleria.fusion.members import input_spec

        self.specs = {n: input_spec(e) for n, e in self.exts.items()}
        self._views: dict[tuple[str, int, int], tuple[dict[str, int], np.ndarray]] = {}

    def prepare(self, train_blocks: tuple[int, ...] = (0,)) -> dict[str, float]:
        """Fill the member features and the query views of ``train_blocks`` splits."""
        t = time.perf_counter()
        out = {}
        for n in fd.MEMBERS:
            t1 = time.perf_counter()
            fd.fill(self.work, self.items, [self.exts[n]])
            out[f"features_{n}_s"] = round(time.perf_counter() - t1, 1)
        for tb in train_blocks:
            for tr in (self.c_tr, self.s_tr):
                self.views(tr.name, tr.items, 4, tb)
            for ev in self.evs:
                self.views(ev.name, fd.eval_items(ev), 1, tb)
        out["prepare_s"] = round(time.perf_counter() - t, 1)
        return out

    def feats(self, ids: list[str], members: tuple[str, ...], noise: bool = False
              ) -> list[np.ndarray]:
        f = fd.features(self.work, ids, [self.specs[m].fingerprint for m in members])
        return [*f, noise_features(ids)] if noise else f

    def views(self, key: str, items: list[Any], n_views: int, tb: int
              ) -> tuple[dict[str, int], np.ndarray]:
        k = (key, n_views, tb)
        if k not in self._views:
            v = fd.views(self.work, items, n_views=n_views, train_blocks=tb, threads=self.threads)
            self._views[k] = ({it.id: i for i, it in enumerate(items)}, v)
        return self._views[k]

    def train_set(self, name: str) -> fd.TrainSet:
        return self.c_tr if name == "caltech" else self.s_tr

    def eval_sets(self, name: str) -> list[fd.EvalSet]:
        own = ["caltech101-disjoint"] if name == "caltech" else ["smvs-disjoint",
                                                                 "smvs-ref-disjoint"]
        return [e for e in self.evs if e.name in own or e.name in ("rparis250", "ukbench56")]


def specs_for(data: Data, members: tuple[str, ...], noise: bool) -> list[Any]:
    from galleria.fusion.mixer import InputSpec

    s = [data.specs[m] for m in members]
    return [*s, InputSpec("noise", "gaussian-noise@17", "global", NOISE_DIM)] if noise else s


# ----------------------------------------------------------------------------- baselines
def baselines(data: Data, d: int = 512) -> dict[str, Any]:
    """Untrained rows: each member, concatenation, concatenation + PCA to d, + noise."""
    from galleria.transforms.registry import create_transform

    out: dict[str, Any] = {}
    for tname in ("caltech", "smvs"):
        tr = data.train_set(tname)
        ids = [it.id for it in tr.items]
        pca = create_transform("pca", dim=d).fit(np.hstack(data.feats(ids, BASE_MEMBERS)))
        pca_noise = create_transform("pca", dim=d).fit(
            np.hstack(data.feats(ids, BASE_MEMBERS, noise=True)))
        for ev in data.eval_sets(tname):
            rows: dict[str, Any] = {}
            qf = {m: f for m, f in zip(fd.MEMBERS, data.feats(ev.query_ids, fd.MEMBERS),
                                       strict=True)}
            gf = {m: f for m, f in zip(fd.MEMBERS, data.feats(ev.gallery_ids, fd.MEMBERS),
                                       strict=True)}
            for m in fd.MEMBERS:
                rows[m] = evaluate(ev, qf[m], gf[m])
            qc = np.hstack([qf[m] for m in BASE_MEMBERS])
            gc = np.hstack([gf[m] for m in BASE_MEMBERS])
            rows["concat"] = evaluate(ev, qc, gc)
            rows["concat+pca"] = evaluate(ev, pca.transform(qc), pca.transform(gc))
            qn = np.hstack([qc, noise_features(ev.query_ids)])
            gn = np.hstack([gc, noise_features(ev.gallery_ids)])
            rows["concat+noise"] = evaluate(ev, qn, gn)
            rows["concat+noise+pca"] = evaluate(ev, pca_noise.transform(qn),
                                                pca_noise.transform(gn))
            out.setdefault(tname, {})[ev.name] = rows
    return out


def lw_baselines(data: Data, base: dict[str, Any], d: int = 512) -> bool:
    """Closed-form supervised rows (learned whitening fitted on the trained runs' training
    rows, shrinkage chosen on the same held-out training classes by the symmetric score
    alone): of the concatenation (the default recipe's start has the same form; its
    shrinkage is chosen on the mean of the symmetric and asymmetric scores, so it can
    differ) and of effnet-lite0 alone (a trained light symmetric baseline). Adds the
    missing rows to ``base``; True when it added any."""
    from galleria.fusion.anchor import choose_start
    from galleria.fusion.train import split_train_val

    added = False
    for tname in ("caltech", "smvs"):
        evs = data.eval_sets(tname)
        if all("concat+lw" in base[tname][e.name] for e in evs):
            continue
        tr = data.train_set(tname)
        ids = [it.id for it in tr.items]
        y = np.unique(np.asarray(tr.labels).astype(str), return_inverse=True)[1]
        t_rows, v_rows = split_train_val(y, FusionRecipe().val_fraction, FusionRecipe().seed)
        rows = np.concatenate([t_rows, v_rows])
        fits = {}
        for key, members in (("concat+lw", BASE_MEMBERS), ("effnet-lite0+lw", ("effnet-lite0",))):
            f = [x[rows] for x in data.feats(ids, members)]
            st = choose_start(f, y[rows], np.arange(len(t_rows)),
                              np.arange(len(t_rows), len(rows)), d=d, select=False)
            fits[key] = (members, st)
        for ev in evs:
            for key, (members, st) in fits.items():
                q = np.hstack(data.feats(ev.query_ids, members))
                g = np.hstack(data.feats(ev.gallery_ids, members))
                base[tname][ev.name][key] = {
                    **evaluate(ev, (q - st.mu) @ st.proj.T, (g - st.mu) @ st.proj.T),
                    "alpha": st.alpha}
        added = True
    return added


# ----------------------------------------------------------------------------- trained runs
def best_single(base: dict[str, Any], tname: str) -> str:
    ev = "caltech101-disjoint" if tname == "caltech" else "smvs-disjoint"
    rows = base[tname][ev]
    key = "mAP@R" if tname == "caltech" else "mAP"
    return max(BASE_MEMBERS, key=lambda m: rows[m][key])


def run_one(data: Data, tname: str, rname: str, spec: dict[str, Any], base: dict[str, Any],
            save_to: Path | None = None) -> dict[str, Any]:
    import torch

    from galleria.fusion.train import FusionRecipe, TrainingData, embed_views, fit_fusion

    members = spec.get("members", BASE_MEMBERS)
    if members == "best":
        members = (best_single(base, tname),)
    noise = bool(spec.get("noise"))
    recipe = FusionRecipe(**{k: v for k, v in spec.items() if k in RECIPE_KEYS})
    tr = data.train_set(tname)
    ids = [it.id for it in tr.items]
    labels = (np.arange(len(ids)) if spec.get("labels") == "instance"
              else np.unique(np.asarray(tr.labels).astype(str), return_inverse=True)[1])
    _, views = data.views(tr.name, tr.items, recipe.n_views, recipe.train_blocks)
    td = TrainingData(specs_for(data, members, noise), data.feats(ids, members, noise), views,
                      labels.astype(np.int64))
    ckpt = data.work / "runs" / f"{rname}.ckpt.safetensors"  # rname: the run tag
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    res = fit_fusion(td, recipe, checkpoint=ckpt, checkpoint_seconds=120)
    out: dict[str, Any] = {"members": list(members), "noise": noise, "recipe": recipe.to_dict(),
                           "labels": spec.get("labels", "class/instance"),
                           "train": res.summary(), "eval": {}}
    from galleria.fusion.mixer import mix

    for ev in data.eval_sets(tname):
        idx, ev_views = data.views(ev.name, fd.eval_items(ev), 1, recipe.train_blocks)
        q_mix = mix(res.mixer, data.feats(ev.query_ids, members, noise))
        g_mix = mix(res.mixer, data.feats(ev.gallery_ids, members, noise))
        with torch.no_grad():
            q_l = embed_views(res.tail, ev_views[[idx[i] for i in ev.query_ids]])
            g_l = embed_views(res.tail, ev_views[[idx[i] for i in ev.gallery_ids]])
        out["eval"][ev.name] = {"sym": evaluate(ev, q_mix, g_mix),
                                "asym": evaluate(ev, q_l, g_mix),
                                "light-sym": evaluate(ev, q_l, g_l)}
    if save_to is not None and not noise:
        from galleria.fusion.model import FusionModel
        from galleria.fusion.query_model import query_weights_id

        FusionModel(
            members=[{"config": data.exts[m].config(), "fingerprint": data.specs[m].fingerprint}
                     for m in members],
            specs=td.specs, mixer=res.mixer,
            mixer_params=recipe.mixer_params(),
            tail=res.tail,
            query_params=recipe.query_params(query_weights_id(recipe.query_model)),
            recipe=recipe.to_dict(), training=res.summary()).save(save_to)
    return out


def runs(data: Data, base: dict[str, Any], names: list[str], sets: list[str],
         min_steps: dict[str, int] | None = None, train: bool = True) -> dict[str, Any]:
    """Train (or load the cached result of) every run on every set; ``min_steps`` overrides
    the recipe's per set (a time budget; recorded in the run and its file name)."""
    out: dict[str, Any] = {}
    for tname in sets:
        ms = (min_steps or {}).get(tname)
        for rname in names:
            tag = f"{tname}-{rname}" + (f"-min{ms}" if ms is not None else "")
            f = data.work / "runs" / f"{tag}.json"
            spec = RUNS[rname] if ms is None else {**RUNS[rname], "min_steps": ms}
            want = FusionRecipe(**{k: v for k, v in spec.items() if k in RECIPE_KEYS}).to_dict()
            if f.is_file():
                cached = read_json(f)
                if FusionRecipe.from_dict(cached.get("recipe", {})).to_dict() == want:
                    out.setdefault(tname, {})[rname] = cached
                    continue
                # made with another recipe (an earlier default): train again from scratch
                log.info("cached %s was trained with another recipe: retraining", tag)
                for stale in (f, data.work / "runs" / f"{tag}.ckpt.safetensors",
                              data.work / "onnx_end_to_end.json"):
                    stale.unlink(missing_ok=True)
            if not train:
                log.info("no result for %s (--report-only): left out", tag)
                continue
            t = time.perf_counter()
            log.info("run %s / %s", tname, rname)
            save = data.work / "models" / f"{tname}-{rname}" if rname == "default" else None
            r = run_one(data, tname, tag, spec, base, save_to=save)
            r["seconds"] = round(time.perf_counter() - t, 1)
            r["load_end"] = os.getloadavg()
            write_json(f, r)
            out.setdefault(tname, {})[rname] = r
    return out


# ----------------------------------------------------------------------------- cost
def speed(data: Data, model_dir: Path, n_images: int = 24) -> dict[str, Any]:
    """ms per query (batch 1, decoded image in, vector out) and fused gallery ms per image."""
    from PIL import Image

    from _common import interleaved_best
    from galleria.extract.embed import embed_stream
    from galleria.extractors.registry import extractor_from_config
    from galleria.fusion.extractor import configs
    from galleria.images.sources import SourceItem

    t = data.evs[1].task  # SMVS: 640-px phone photos
    files = [t.root / p for p in t.query_paths[:n_images]]
    imgs = [Image.open(f).convert("RGB") for f in files]
    cfgs = configs(str(model_dir))
    out: dict[str, Any] = {"images": "SMVS phone photos (640 px JPEG)", "query_ms": {}}
    for threads in (1, 2):
        set_threads(threads)
        exts = {"light query (fusion-query, ONNX)":
                extractor_from_config(cfgs["query_config"], threads=threads)}
        for n in fd.MEMBERS:
            exts[n] = fd.member_extractors((n,), threads)[0]
        exts["fused gallery model (all members + mixer)"] = extractor_from_config(
            cfgs["config"], threads=threads)
        for e in exts.values():
            e.embed_images(imgs[:2])  # warm up (ONNX export, sessions)
        state = {"i": 0}

        def one(e: Any, state: dict[str, int] = state) -> None:
            state["i"] = (state["i"] + 1) % len(imgs)
            e.embed_images([imgs[state["i"]]])

        units = {k: (lambda e=e: one(e)) for k, e in exts.items()}
        best = interleaved_best(units, rounds=5)
        out["query_ms"][str(threads)] = {k: round(v["wall"] * 1e3, 2) for k, v in best.items()}
        out.setdefault("query_cpu_ms", {})[str(threads)] = {
            k: round(v["cpu"] * 1e3, 2) for k, v in best.items()}
        out.setdefault("load_during", {})[str(threads)] = os.getloadavg()
        # network alone (preprocessed input) for the light model
        q = exts["light query (fusion-query, ONNX)"]
        x = np.stack([q.prepare(imgs[0])[0]])
        net = interleaved_best({"net": lambda q=q, x=x: q.embed_prepared([x])}, rounds=5)["net"]
        out["query_ms"][str(threads)]["light query network only"] = round(net["wall"] * 1e3, 2)
    set_threads(data.threads)
    g = extractor_from_config(cfgs["config"], threads=data.threads)
    lite2 = fd.member_extractors(("effnet-lite2",), data.threads)[0]
    items = [SourceItem(id=str(i), path=f) for i, f in enumerate(
        [t.root / p for p in t.gallery_paths[:96]])]
    out["gallery_ms_per_image"] = {}
    for name, e in (("fused gallery (3 members + mixer)", g), ("effnet-lite2 alone", lite2)):
        list(embed_stream(items[:8], e))
        t0 = time.perf_counter()
        n = sum(len(b.items) for b in embed_stream(items, e, batch_size=32, workers=2))
        out["gallery_ms_per_image"][name] = round((time.perf_counter() - t0) / n * 1e3, 2)
    out["load_end"] = os.getloadavg()
    return out


def cli_train(data: Data) -> dict[str, Any]:
    """Wall time of ``galleria fusion train`` (default recipe) on the Caltech training set."""
    import csv

    root = data.work / "cli"
    root.mkdir(parents=True, exist_ok=True)
    f = root / "result.json"
    if f.is_file():
        return read_json(f)
    man = root / "caltech-train50.csv"
    with open(man, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "path", "label"])
        for it, lab in zip(data.c_tr.items, data.c_tr.labels, strict=True):
            w.writerow([it.id, str(it.path), lab])
    cmd = [sys.executable, "-m", "galleria.cli.main", "fusion", "train", "--images", str(man),
           "--label-column", "label", "--out", str(root / "F"), "--work", str(root / "work"),
           "--threads", str(data.threads), "-q", "--json"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"fusion train failed: {p.stderr[-2000:]}")
    rep = json.loads(p.stdout)
    out = {"command": " ".join(["galleria", *cmd[3:]]), "wall_s": round(wall, 1),
           "report": rep, "load_end": os.getloadavg()}
    write_json(f, out)
    return out


def onnx_end_to_end(data: Data, model_dir: Path) -> dict[str, Any]:
    """Caltech-disjoint queries embedded from their files by the exported ONNX query model."""
    from galleria.extract.embed import embed_items
    from galleria.extractors.registry import extractor_from_config
    from galleria.fusion.extractor import configs
    from galleria.fusion.model import FusionModel

    ev = data.evs[0]
    model = FusionModel.load(model_dir)
    q_ext = extractor_from_config(configs(str(model_dir))["query_config"], threads=data.threads)
    items = fd.eval_items(ev)[:len(ev.query_ids)]
    q, ok, _ = embed_items(items, q_ext)
    g = model.mix(data.feats(ev.gallery_ids, tuple(s.name for s in model.specs)))
    return {"eval": evaluate(ev, q, g), "queries": int(ok.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phases", default="prepare,baselines,runs,speed,cli")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--sets", default="caltech,smvs")
    ap.add_argument("--report-only", action="store_true",
                    help="write the tables from the cached runs, train nothing")
    ap.add_argument("--min-steps", default="", help="per-set min_steps override, e.g. "
                    "smvs=200 (time budget; recorded)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_threads(args.threads)
    work = Path(args.work) if args.work else cache_dir("fusion-bench")
    phases = args.phases.split(",")
    res: dict[str, Any] = {"machine": machine_info(args.threads)}
    data = Data(work, args.threads)
    res["splits"] = {"caltech": data.c_tr.info, "smvs": data.s_tr.info}
    res["setup"] = (
        f"Training sets: Caltech-101 train images of 50 seeded classes ({len(data.c_tr.items)} "
        f"images, class labels); SMVS 50 seeded covers ({len(data.s_tr.items)} images, cover "
        "labels). Evaluation on the other classes / covers only: Caltech-101 1525 test -> 3040 "
        "train images of 51 classes; SMVS 200 phone photos -> the 250 images of 50 covers "
        "(self excluded) and -> their 50 references. Same split for every row. Members: "
        f"{', '.join(BASE_MEMBERS)} (GeM). Default recipe: {_recipe_text(FusionRecipe())}. "
        "Trained rows are early-stopped on held-out *training* classes (20 %); epoch 0 (the "
        "untrained start) is a candidate.")
    prep_f = work / "prepare.json"
    if "prepare" in phases:
        tbs = tuple(sorted({int(RUNS[r].get("train_blocks", FusionRecipe().train_blocks))
                            for r in args.runs.split(",")}))
        res["prepare"] = data.prepare(tbs) if not prep_f.is_file() else read_json(prep_f)
        write_json(prep_f, res["prepare"])
    base_f = work / "baselines.json"
    if "baselines" in phases or "runs" in phases:
        if not base_f.is_file():
            write_json(base_f, baselines(data))
        res["baselines"] = read_json(base_f)
        if not args.report_only and lw_baselines(data, res["baselines"]):
            write_json(base_f, res["baselines"])
    if "runs" in phases:
        ms = {k: int(v) for k, v in (x.split("=") for x in args.min_steps.split(",") if x)}
        res["min_steps_override"] = ms
        if ms:
            res["setup"] += (" **Time budget:** min_steps (default 600) overridden to "
                             + ", ".join(f"{k}: {v}" for k, v in ms.items())
                             + " (those rows train fewer steps than the default recipe).")
        res["runs"] = runs(data, res["baselines"], args.runs.split(","), args.sets.split(","),
                           ms, train=not args.report_only)
        model_dir = work / "models" / "caltech-default"
        e2e_f = work / "onnx_end_to_end.json"
        if model_dir.is_dir() and not e2e_f.is_file() and not args.report_only:
            write_json(e2e_f, onnx_end_to_end(data, model_dir))
        if e2e_f.is_file():
            res["onnx_end_to_end"] = read_json(e2e_f)
    speed_f = work / "speed.json"
    if "speed" in phases:
        write_json(speed_f, speed(data, work / "models" / "caltech-default"))
    if speed_f.is_file():
        res["speed"] = read_json(speed_f)
    if "cli" in phases or (work / "cli" / "result.json").is_file():
        res["cli"] = cli_train(data)
    res["verdicts"] = verdicts(res) if "runs" in res else []
    res["machine"]["load_average_at_end"] = os.getloadavg()
    if "runs" in res:
        _, mpath = write_results("fusion", res, report(res, RUNS, PREV))
        print(mpath.read_text())


if __name__ == "__main__":
    main()
