"""The old-answers guard of the live local-feature change on a category gallery.

A gallery where local features are *not* expected to help: a script-built
Caltech-101 variant (``--classes`` classes drawn with a seeded sample, their first
``--per-class`` train images as the gallery, 500 by default; queries: a seeded
sample of those classes' test images; category retrieval, relevant = same class,
mAP@R over k = 100). Indexed with effnet-lite0, then SIFT local features are
added through the product (``galleria upgrade start G --add-local sift``,
``galleria upgrade run G --limit N`` in another process, as a user would) and at
0 / 10 / 25 / 50 / 75 / 100 % the queries are answered by

- *global*: the gallery's global answers (rule ``old-only``: effnet-lite0 over
  every item, what the gallery answered before the change);
- *unguarded merge*: rule ``rank-merge`` (the merged answers, no check);
- *guarded default*: ``auto`` (what ``galleria search`` / the service answer: the
  global answers until the job's pseudo-query check finds the merge better),

with the job's decision at that point (rule, verdict, pseudo-query MRR of both
rules, the cost of the check). The 0 % point runs ``upgrade run --limit 0``
(the job's first check, which also makes the pseudo-queries).

Run:  OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_backfill_local_guard.py \
          --workdir W
      (then, on the gallery at 100 %, what a check costs per number of pseudo-queries:)
      OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_backfill_local_guard.py \
          --workdir W --cost-only
Writes benchmarks/results/backfill-local-guard.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
RULES = (("global", "old-only"), ("unguarded merge", "rank-merge"), ("hybrid", "hybrid"),
         ("guarded default", "auto"))
GUARD_FIELDS = ("rule", "checked", "source", "moved", "queries", "verdict", "scores",
                "search_s", "check_s", "checks", "total_s")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    for k in ("GALLERIA_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        e.setdefault(k, "1")
    return e


def galleria(*args: str) -> subprocess.CompletedProcess[str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "galleria.cli.main", *args], env=env(),
                       capture_output=True, text=True)
    print(f"  $ galleria {' '.join(args[:4])} ... [{time.perf_counter() - t:.1f} s, rc "
          f"{p.returncode}]", flush=True)
    if p.returncode != 0:
        raise SystemExit(f"galleria {args} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def variant(work: Path, classes: int, per_class: int, queries: int, seed: int
            ) -> tuple[Path, list[dict[str, str]], list[dict[str, str]]]:
    """The gallery manifest (train images of a seeded class sample) and the queries
    (a seeded sample of those classes' test images)."""
    from galleria.eval.paths import dataset_dir

    cal = dataset_dir("caltech101")
    with open(cal / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] != "BACKGROUND_Google"]
    names = sorted({r["label"] for r in rows})
    keep = sorted(random.Random(seed).sample(names, classes))
    gal: list[dict[str, str]] = []
    for c in keep:
        gal += sorted((r for r in rows if r["label"] == c and r["split"] == "train"),
                      key=lambda r: r["path"])[:per_class]
    test = [r for r in rows if r["label"] in set(keep) and r["split"] == "test"]
    qs = sorted(random.Random(seed + 1).sample(test, min(queries, len(test))),
                key=lambda r: r["path"])
    for r in gal + qs:
        r["file"] = str(cal / r["path"])
    man = work / "gallery.csv"
    with open(man, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "path", "label"])
        for r in gal:
            w.writerow([r["path"], r["file"], r["label"]])
    return man, gal, qs


def measure(g: Path, gal: list[dict[str, str]], qs: list[dict[str, str]],
            cache: dict[str, Any]) -> dict[str, Any]:
    """mAP@R / R@1 (%) of each rule on the queries, and the rule ``auto`` resolved to."""
    from galleria.eval.metrics import per_query_metrics
    from galleria.store.gallery import Gallery
    from galleria.upgrade.search import BackfillSearcher

    pos = {r["path"]: n for n, r in enumerate(gal)}
    labels = np.array([r["label"] for r in gal], dtype=object)
    qlab = np.array([r["label"] for r in qs], dtype=object)
    out: dict[str, Any] = {}
    with Gallery.open(g) as gallery:
        for name, rule in RULES:
            s = BackfillSearcher.open(gallery, rule=rule, threads=1)
            try:
                if "q" not in cache:  # both spaces' query data, reused at every fraction
                    full = BackfillSearcher.open(gallery, rule="rank-merge", threads=1)
                    cache["q"] = full.embed_paths([r["file"] for r in qs], workers=1)[0]
                    full.close()
                t = time.perf_counter()
                res = s.search(cache["q"], k=100)
                ms = 1000 * (time.perf_counter() - t) / len(qs)
            finally:
                s.close()
            ranking = np.full((len(qs), 100), -1, np.int64)
            for n, row in enumerate(res.ids):
                got = [pos[i] for i in row if i is not None and i in pos]
                ranking[n, : len(got)] = got
            m = per_query_metrics(ranking, qlab, labels, metrics=("mAP@R", "R@1"))
            out[name] = {"mAP@R": round(100 * float(np.nanmean(m["mAP@R"])), 2),
                         "R@1": round(100 * float(np.nanmean(m["R@1"])), 2),
                         "rule": s.rule, "search_ms_per_query": round(ms, 2)}
    return out


def check_cost(g: Path, sizes: tuple[int, ...] = (50, 100, 200)) -> dict[str, Any]:
    """What one check costs for ``sizes`` pseudo-queries (the first ones of the job's set)
    on the gallery as it is, and the gain it resolves: the one-sided 95 % half-width
    ``1.645 sd / sqrt(P)`` of the mean paired difference of reciprocal ranks (MRR
    points), from the spread measured on the whole set. Nothing is published."""
    from galleria.io.atomic import load_array, read_json
    from galleria.store.gallery import Gallery
    from galleria.upgrade.local_guard import _load_local
    from galleria.upgrade.local_search import GLOBAL, HYBRID, MERGED, LocalChangeSearcher
    from galleria.upgrade.online import reciprocal_ranks

    folder = g / "upgrade" / "online" / "local-pseudo"
    ids = read_json(folder / "pseudo.json")["ids"]
    glob, loc = load_array(folder / "global.npy"), _load_local(folder)
    out: dict[str, Any] = {"load": uptime(), "rows": []}
    with Gallery.open(g, readonly=True) as gallery:
        moved = gallery.count((gallery.get_setting("upgrade") or {})["new_space"])
        out["moved"], out["items"] = moved, len(gallery)
        full_rr = {}
        for p in sorted(set(sizes) | {len(ids)}):
            row: dict[str, Any] = {"pseudo_queries": min(p, len(ids))}
            for rule in (HYBRID, MERGED, GLOBAL):
                t = time.perf_counter()
                s = LocalChangeSearcher(gallery, rule=rule)
                res = s.search_queries(glob[:p], loc[:p], k=100)
                s.close()
                row[f"{rule}_s"] = round(time.perf_counter() - t, 2)
                if p >= len(ids):
                    full_rr[rule] = reciprocal_ranks(res, ids)
            row["check_s"] = round(row[f"{HYBRID}_s"] + row[f"{MERGED}_s"] + row[f"{GLOBAL}_s"],
                                   2)
            out["rows"].append(row)
    d = full_rr[HYBRID] - full_rr[GLOBAL]
    sd = float(d.std(ddof=1))
    out["sd_rr_difference"] = round(sd, 4)
    for row in out["rows"]:
        row["resolves_mrr_points"] = round(100 * 1.645 * sd / np.sqrt(row["pseudo_queries"]), 2)
    out["extrapolated"] = [{"pseudo_queries": p, "resolves_mrr_points": round(
        100 * 1.645 * sd / np.sqrt(p), 2)} for p in (500, 1000)]
    return out


def after_finish(g: Path, gal: list[dict[str, str]], qs: list[dict[str, str]]
                 ) -> dict[str, Any]:
    """``galleria upgrade finish`` then the gallery's default search (what a fresh index
    with both spaces answers with) on the queries: mAP@R / R@1 (%)."""
    from galleria.decision import open_searcher
    from galleria.eval.metrics import per_query_metrics
    from galleria.store.gallery import Gallery

    galleria("upgrade", "finish", str(g))
    pos = {r["path"]: n for n, r in enumerate(gal)}
    with Gallery.open(g) as gallery:
        s = open_searcher(gallery, threads=1)
        t = time.perf_counter()
        _, res, fails = s.search_paths([r["file"] for r in qs], k=100)
        ms = 1000 * (time.perf_counter() - t) / len(qs)
        pipeline = s.describe().get("pipeline")
        s.close()
    assert res is not None and not fails, fails
    ranking = np.full((len(qs), 100), -1, np.int64)
    for n, row in enumerate(res.ids):
        got = [pos[i] for i in row if i is not None and i in pos]
        ranking[n, : len(got)] = got
    m = per_query_metrics(ranking, np.array([r["label"] for r in qs], dtype=object),
                          np.array([r["label"] for r in gal], dtype=object),
                          metrics=("mAP@R", "R@1"))
    return {"pipeline": pipeline, "mAP@R": round(100 * float(np.nanmean(m["mAP@R"])), 2),
            "R@1": round(100 * float(np.nanmean(m["R@1"])), 2),
            "ms_per_query_with_embedding": round(ms, 1), "load": uptime()}


def cost_markdown(c: dict[str, Any]) -> list[str]:
    lines = ["", f"## What a check costs ({c['moved']} of {c['items']} items with local features, "
             f"one thread, load `{c['load']}`)", "",
             "| pseudo-queries | check s (all three searches) | hybrid s | merged s | global s | "
             "gain resolved (MRR points, one-sided 95 %) |", "|---|---|---|---|---|---|"]
    for r in c["rows"]:
        lines.append(f"| {r['pseudo_queries']} | {r['check_s']} | {r.get('hybrid_s', '-')} | "
                     f"{r['rank-merge_s']} | {r['old-only_s']} | {r['resolves_mrr_points']} |")
    for r in c["extrapolated"]:
        lines.append(f"| {r['pseudo_queries']} (extrapolated) | - | - | - | - | "
                     f"{r['resolves_mrr_points']} |")
    lines += ["", f"Spread of the paired reciprocal-rank difference (hybrid - global) over the "
              f"job's pseudo-queries: sd {c['sd_rr_difference']}; the gain a check resolves is "
              "1.645 sd / sqrt(P). Each pseudo-query is one hybrid, one merged and one global "
              "search; each row also opens the local searchers, which load the published "
              "local index (the first row read it from disk).", ""]
    return lines


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    lines = ["# The local change's old-answers guard on a category gallery (Caltech-101 variant)",
             "", f"Machine: {res['machine'].get('cpu', '?')}; load before / after: "
             f"`{res['load_before']}` / `{res['load_after']}`. Produced by "
             "benchmarks/bench_backfill_local_guard.py. Gallery (a script-built variant, not a "
             f"shared set as is): the first {a['per_class']} train images of {a['classes']} "
             f"Caltech-101 classes drawn with seed {a['seed']} ({res['items']} images), "
             "effnet-lite0; SIFT local features added live through `galleria upgrade start "
             f"--add-local sift` / `run --limit`; {res['queries']} test images of those classes "
             "as queries (category retrieval: mAP@R / R@1 in %, k = 100). The guard's check: "
             f"{res['points'][-1]['guard'].get('queries')} pseudo-queries, one thread.", "",
             "| moved | global | unguarded merge | hybrid (unguarded) | guarded default (rule) | "
             "guarded - global | verdict | pseudo MRR hybrid / merged / global | check s "
             "(search s) |", "|---" * 9 + "|"]
    for p in res["points"]:
        m, gd = p["measured"], p["guard"]
        sc = gd.get("scores") or {}
        mrr = " / ".join(f"{sc[r]['mrr']:.1f}" if r in sc else "-"
                         for r in ("hybrid", "rank-merge", "old-only"))
        hy = m.get("hybrid") or {"mAP@R": float("nan"), "R@1": float("nan")}
        diff = m["guarded default"]["mAP@R"] - m["global"]["mAP@R"]
        lines.append(
            f"| {int(100 * p['fraction'])} % ({p['done']}) | {m['global']['mAP@R']:.2f} / "
            f"{m['global']['R@1']:.1f} | {m['unguarded merge']['mAP@R']:.2f} / "
            f"{m['unguarded merge']['R@1']:.1f} | {hy['mAP@R']:.2f} / {hy['R@1']:.1f} | "
            f"{m['guarded default']['mAP@R']:.2f} / "
            f"{m['guarded default']['R@1']:.1f} ({m['guarded default']['rule']}) | "
            f"{diff:+.2f} | {(gd.get('verdict') or {}).get('merged_vs_old')} | {mrr} | "
            f"{gd.get('check_s')} ({gd.get('search_s')}) |")
    last = res["points"][-1]["guard"]
    lines += ["", "*global*: rule `old-only` (effnet-lite0 over every item: the gallery's "
              "answers before the change); *unguarded merge*: rule `rank-merge`; *guarded "
              "default*: `auto`, the rule the job's last check chose (among the global answers, "
              "the merge and rule `hybrid`: the pipeline of a fresh index with both spaces over "
              "the global space and the published local index). Run times of each `upgrade "
              "run` (s, including its checks): "
              + ", ".join(str(x) for x in res["run_s"]) + "; the guard's total time "
              f"(pseudo-queries made once + every check): {last.get('total_s')} s over "
              f"{last.get('checks')} checks.", ""]
    if res.get("after_finish"):
        f = res["after_finish"]
        lines += [f"After `galleria upgrade finish`: the default search ({f['pipeline']}, what "
                  f"a fresh index with both spaces answers with) {f['mAP@R']:.2f} / "
                  f"{f['R@1']:.1f} (load `{f['load']}`).", ""]
    if res.get("cost"):
        lines += cost_markdown(res["cost"])
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=25)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scene", action="store_true",
                    help="the guard's pseudo-queries half in clutter (upgrade start "
                         "--pseudo-scene)")
    ap.add_argument("--name", default="backfill-local-guard",
                    help="results file name (benchmarks/results/NAME.{json,md})")
    ap.add_argument("--cost-only", action="store_true",
                    help="only time a check for 50 / 100 / 200 pseudo-queries on the workdir's "
                         "gallery as it is (after a full run) and add it to the results")
    ap.add_argument("--finish-only", action="store_true",
                    help="finish the workdir's job (after a full run) and measure the "
                         "default search after it")
    args = ap.parse_args()
    if args.finish_only:
        if not args.workdir:
            raise SystemExit("--finish-only needs the --workdir of a previous run")
        res = json.loads((OUT / f"{args.name}.json").read_text())
        a = res["args"]
        _, gal, qs = variant(Path(args.workdir), a["classes"], a["per_class"], a["queries"],
                             a["seed"])
        res["after_finish"] = after_finish(Path(args.workdir) / "g", gal, qs)
        (OUT / f"{args.name}.json").write_text(json.dumps(res, indent=1, default=str))
        (OUT / f"{args.name}.md").write_text(markdown(res))
        print(json.dumps(res["after_finish"], indent=1))
        return 0
    if args.cost_only:
        if not args.workdir:
            raise SystemExit("--cost-only needs the --workdir of a previous run")
        res = json.loads((OUT / f"{args.name}.json").read_text())
        res["cost"] = check_cost(Path(args.workdir) / "g")
        (OUT / f"{args.name}.json").write_text(json.dumps(res, indent=1, default=str))
        (OUT / f"{args.name}.md").write_text(markdown(res))
        print(json.dumps(res["cost"], indent=1))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="local-guard-"))
    work.mkdir(parents=True, exist_ok=True)
    man, gal, qs = variant(work, args.classes, args.per_class, args.queries, args.seed)
    res: dict[str, Any] = {"machine": machine_info(1), "args": vars(args), "items": len(gal),
                           "queries": len(qs), "load_before": uptime(), "points": [],
                           "run_s": [], "workdir": str(work)}
    g = work / "g"
    if not (g / "gallery.sqlite").is_file():
        galleria("index", str(man), "--out", str(g), "--model", "effnet-lite0", "-q")
        galleria("upgrade", "start", str(g), "--add-local", "sift", "--seed", str(args.seed),
                 *(["--pseudo-scene"] if args.scene else []))
    cache: dict[str, Any] = {}
    done = -1
    for f in FRACTIONS:
        target = round(f * len(gal))
        if target > done:
            t = time.perf_counter()
            galleria("upgrade", "run", str(g), "--limit", str(max(0, target - max(done, 0))),
                     "--threads", "1", "-q")
            res["run_s"].append(round(time.perf_counter() - t, 1))
        st = json.loads(galleria("upgrade", "status", str(g), "--json").stdout)
        done = int(st["done"])
        dec = st.get("online_psi") or {}
        from galleria.store.gallery import Gallery

        with Gallery.open(g, readonly=True) as gallery:
            full = (gallery.get_setting("upgrade") or {}).get("online", {}).get("decision") or {}
        m = measure(g, gal, qs, cache)
        res["points"].append({"fraction": f, "done": done, "measured": m,
                              "guard": {k: full.get(k, dec.get(k)) for k in GUARD_FIELDS}})
        print(f"  {int(100 * f):3d} % ({done}): " + "; ".join(
            f"{k} {v['mAP@R']:.2f} ({v['rule']})" for k, v in m.items())
            + f"; check {full.get('check_s')} s, verdict {full.get('verdict')}", flush=True)
        res["load_after"] = uptime()
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{args.name}.json").write_text(json.dumps(res, indent=1, default=str))
        (OUT / f"{args.name}.md").write_text(markdown(res))
    print(f"wrote {OUT / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
