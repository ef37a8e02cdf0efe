"""End-to-end online backfill through the CLI on a real folder, with kill -9.

SMVS DVD covers (500 images, ``manifest.csv``): index with effnet-lite0, then
``galleria upgrade start --new-model effnet-lite2``, ``upgrade run`` killed
with SIGKILL at about 40 %, checks and searches between the two runs, ``upgrade
run`` again, ``upgrade finish``, and a comparison with a fresh ``galleria
index`` of effnet-lite2. Also the measured query cost of every rule on the
half-backfilled gallery (real images, real indexes, batch of 1 image).

Run:  .venv/bin/python benchmarks/bench_backfill_e2e.py [--workdir DIR]
Writes benchmarks/results/backfill-e2e.json (and prints a summary).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from galleria.eval.datasets import load_task
from galleria.eval.paths import dataset_dir
from galleria.store.gallery import Gallery
from galleria.upgrade.merge import merged_scores
from galleria.upgrade.search import BackfillSearcher, fuse_queries

OUT = Path(__file__).resolve().parent / "results"
OLD, NEW = "effnet-lite0", "effnet-lite2"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    print(f"$ {' '.join(args[1:])}  [{time.perf_counter() - t:.1f} s, rc {p.returncode}]",
          flush=True)
    if check and p.returncode != 0:
        raise SystemExit(f"failed: {args}\n{p.stdout}\n{p.stderr}")
    return p


def up(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("galleria.cli.upgrade", "upgrade", *args, check=check)


def counts(g: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{g / 'gallery.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return dict(con.execute("SELECT space, COUNT(*) FROM vectors GROUP BY space").fetchall())
    finally:
        con.close()


def exactly_once(g: Path, old: str, new: str) -> dict[str, Any]:
    with Gallery.open(g) as gal:
        o, n, all_ids = set(gal.ids(old)), set(gal.ids(new)), gal.ids()
    return {"items": len(all_ids), "old": len(o), "new": len(n), "in_both": len(o & n),
            "in_neither": len(set(all_ids) - o - n),
            "ok": not (o & n) and (o | n) == set(all_ids)}


def between_runs_search(g: Path, folder: Path, query_paths: list[str]) -> dict[str, Any]:
    """Search while half-backfilled: results vs the brute-force merge of the stored vectors."""
    out: dict[str, Any] = {}
    with Gallery.open(g) as gal:
        state = gal.get_setting("upgrade")
        old, new = state["old_space"], state["new_space"]
        ko, vo = gal.load_vectors(old)
        kn, vn = gal.load_vectors(new)
        ids = list(gal.ids_of(ko)) + list(gal.ids_of(kn))
        go = np.concatenate([vo, np.zeros((len(kn), vo.shape[1]), np.float32)])
        gn = np.concatenate([np.zeros((len(ko), vn.shape[1]), np.float32), vn])
        mask = np.arange(len(ids)) >= len(ko)
        for rule in ("naive", "rank-merge", "psi", "fused"):
            s = BackfillSearcher.open(gal, rule=rule)
            paths = [folder / p for p in query_paths]
            emb, _, fails = s.embed_paths(paths, batch_size=1, workers=1)
            res = s.search_vectors(new_queries=emb.get("new"), old_queries=emb.get("old"), k=10)
            q_old = s.psi.transform(emb["new"]) if s.psi is not None else emb["old"]
            if rule == "fused":
                q_old = fuse_queries(emb["old"], q_old)
            ref = merged_scores(q_old @ go.T, emb["new"] @ gn.T, mask, s.calibration,
                                old_queries=q_old, new_queries=emb["new"])
            want = [[ids[j] for j in row[:10]] for row in np.argsort(-ref, 1, kind="stable")]
            # cost: one query image at a time (embed + search + merge), fresh counters
            s.cost = type(s.cost)()
            t0 = time.perf_counter()
            for p in paths:
                e1, _, _ = s.embed_paths([p], batch_size=1, workers=1)
                s.search_vectors(new_queries=e1.get("new"), old_queries=e1.get("old"), k=10)
            wall = 1000 * (time.perf_counter() - t0) / len(paths)
            out[rule] = {
                "calibration": s.calibration.info,
                "matches_brute_force_merge": res.ids.tolist() == want,
                "wall_ms_per_query": round(wall, 1),
                "cost": s.cost.per_query(),
                "query_failures": len(fails),
            }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--kill-at", type=float, default=0.4)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="backfill-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = dataset_dir("smvs_dvd_covers")
    manifest = folder / "manifest.csv"
    g, fresh = work / "gallery", work / "fresh"
    report: dict[str, Any] = {"data": str(manifest), "workdir": str(work)}

    t = time.perf_counter()
    sh("galleria.cli.main", "index", str(manifest), "--out", str(g), "--model", OLD, "-q")
    report["index_old_s"] = round(time.perf_counter() - t, 1)
    with Gallery.open(g) as gal:
        old_fp = gal.primary_space
        n_items = len(gal)
    same = up("start", str(g), "--new-model", OLD, check=False)
    report["start_same_model"] = {"rc": same.returncode, "stderr": same.stderr.strip()}
    up("start", str(g), "--new-model", NEW, "--seed", "0")
    with Gallery.open(g) as gal:
        new_fp = gal.get_setting("upgrade")["new_space"]

    # run, SIGKILL at ~kill_at
    proc = subprocess.Popen(
        [sys.executable, "-m", "galleria.cli.upgrade", "upgrade", "run", str(g), "-q",
         "--commit-every", "32"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = time.perf_counter()
    target = int(args.kill_at * n_items)
    while proc.poll() is None and counts(g).get(new_fp, 0) < target:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = time.perf_counter() - t
    c = counts(g)
    report["kill9"] = {"after_s": round(killed_after, 1), "rc": proc.returncode,
                       "old": c.get(old_fp, 0), "new": c.get(new_fp, 0),
                       "exactly_once": exactly_once(g, old_fp, new_fp)}
    st = json.loads(up("status", str(g), "--json").stdout)
    report["status_after_kill"] = {k: st[k] for k in ("done", "total", "fraction", "remaining",
                                                     "items_per_s", "eta_s", "consistent")}
    early = up("finish", str(g), check=False)
    report["finish_early"] = {"rc": early.returncode, "stderr": early.stderr.strip()}
    tr = up("train-transform", str(g), "--from-job", "--json", "-q")
    report["psi_from_job"] = json.loads(tr.stdout)["info"]
    task = load_task("smvs")
    report["search_between_runs"] = between_runs_search(g, folder, task.query_paths[:20])
    # a psi trained for other models is refused with a clear error
    with tempfile.TemporaryDirectory() as td:
        from galleria.upgrade.psi import ReverseTransform

        rng = np.random.default_rng(0)
        other = ReverseTransform(hidden=0, epochs=1, batch_size=8).fit(
            rng.standard_normal((16, 1280)), rng.standard_normal((16, 1024)),
            new_fingerprint=new_fp, old_fingerprint="opennsfw-r50-gem3-224@1b144627821b20ed")
        other.save(Path(td) / "psi")
        bad = up("search", str(g), str(folder / task.query_paths[0]), "--rule", "psi",
                 "--psi", str(Path(td) / "psi"), check=False)
        report["psi_other_models"] = {"rc": bad.returncode, "stderr": bad.stderr.strip()}

    t = time.perf_counter()
    rr = json.loads(up("run", str(g), "--json", "-q").stdout)
    report["resume"] = {**{k: rr[k] for k in ("moved", "remaining", "items_per_s", "failed")},
                        "seconds": round(time.perf_counter() - t, 1),
                        "exactly_once": exactly_once(g, old_fp, new_fp)}
    up("finish", str(g))

    t = time.perf_counter()
    sh("galleria.cli.main", "index", str(manifest), "--out", str(fresh), "--model", NEW, "-q")
    report["index_new_fresh_s"] = round(time.perf_counter() - t, 1)
    with Gallery.open(g) as a, Gallery.open(fresh) as b:
        ka, va = a.load_vectors(new_fp)
        kb, vb = b.load_vectors(new_fp)
        da = dict(zip(a.ids_of(ka), va, strict=True))
        db = dict(zip(b.ids_of(kb), vb, strict=True))
        same_ids = sorted(da) == sorted(db)
        diff = max(float(np.abs(da[i] - db[i]).max()) for i in da) if same_ids else None
        q = np.stack([db[p] for p in task.query_paths])
        ra = a.search(q, 10, space=a.primary_space)
        rb = b.search(q, 10, space=b.primary_space)
        report["finished_vs_fresh"] = {
            "spaces": [[s.space for s in a.spaces()], [s.space for s in b.spaces()]],
            "primary": [a.primary_space, b.primary_space],
            "same_ids": same_ids, "items": [len(a), len(b)],
            "max_abs_vector_diff": diff,
            "top10_identical_queries": int(sum(x == y for x, y in zip(
                ra.ids.tolist(), rb.ids.tolist(), strict=True))),
            "queries": len(q),
            "max_abs_score_diff": float(np.abs(ra.scores - rb.scores).max()),
            "job_folder_left": (g / "upgrade").exists(),
        }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "backfill-e2e.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
