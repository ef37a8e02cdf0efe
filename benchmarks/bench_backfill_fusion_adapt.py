"""Could a fusion live change serve the adapted fused space before ``finish``?

``upgrade finish`` of a fusion change runs the gallery's label-free adaptation
(``galleria.fusion.adapt_job.adapt_gallery``, what ``index --fusion`` runs): light
vectors, a query map, and the space that answers (fused, light or the fused space
whitened on the gallery) made primary. The job itself serves the unadapted fused
space, and on SMVS its check keeps the old answers (benchmarks/results/backfill-live.md).
This script measures, on the same data (the 500 SMVS covers indexed with effnet-lite0,
phone photos as queries, mAP / R@1 in %):

1. **The adaptation run in the middle of a real job** (``--at``, default 50 %):
   what search serves before and after it (``auto`` and ``rank-merge``, searched
   in this process), what it changes in the gallery (the primary space), and
   whether the job still runs to 100 % and finishes equal to a fresh
   ``galleria index --fusion`` (top-10 of every query).
2. **A bound**: a rank-merge (per-query Z-norm against the moved items' top-100
   cohort, as the job's) of the old part (lite0) with the moved part *in the space
   the finished gallery serves* (its adapted query, its whitening fitted on the whole
   gallery: optimistic), at 10 / 25 / 50 / 75 %, seeded random moved sets. What
   the job could serve if its new part were the finished space.

Run:  nice -n 10 .venv/bin/python benchmarks/bench_backfill_fusion_adapt.py [--fusion F]
(F: a ``galleria fusion train`` folder; default: trained as bench_backfill_live.py
does, 30 Caltech-101 classes). Writes benchmarks/results/backfill-fusion-adapt.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info
from bench_backfill_live import (
    OUT,
    fresh_gallery,
    galleria,
    metrics,
    prepare,
    train_fusion,
    uptime,
)


def evaluate(searcher: Any, paths: list[str], queries: list[int], rows: list[dict[str, str]]
             ) -> tuple[dict[str, Any], list[list[str]]]:
    """mAP / R@1 (k = 100, the query itself excluded) of ``searcher`` on the phone photos."""
    good, res, fails = searcher.search_paths(paths, 100)
    if len(good) != len(paths):
        raise SystemExit(f"queries failed: {fails[:3]}")
    return metrics([list(r) for r in res.ids], queries, rows), \
        [[str(i) for i in r[:10]] for r in res.ids]


def load(text: str) -> str:
    """The load averages of an ``uptime`` line."""
    return text.split("load average:")[-1].strip()


def served(g: Path, paths: list[str], queries: list[int], rows: list[dict[str, str]],
           rule: str | None = None) -> tuple[dict[str, Any], list[list[str]]]:
    from galleria.decision.open import open_searcher
    from galleria.store.gallery import Gallery
    from galleria.upgrade.search import BackfillSearcher

    with Gallery.open(g) as gal:
        s = BackfillSearcher.open(gal, rule=rule, threads=1) if rule else \
            open_searcher(gal, threads=1)
        out, top = evaluate(s, paths, queries, rows)
        out["searcher"] = s.describe().get("merge", {}).get("rule") or s.kind
    return out, top


def midjob(work: Path, g0: Path, man: Path, fusion: Path, at: float, paths: list[str],
           queries: list[int], rows: list[dict[str, str]]) -> dict[str, Any]:
    """Part 1: the adaptation at ``at`` of a real job, then on to finish."""
    from galleria.fusion.adapt_job import adapt_gallery, fusion_state
    from galleria.store.gallery import Gallery

    g = work / "g-midjob"
    shutil.rmtree(g, ignore_errors=True)
    shutil.copytree(g0, g)
    galleria("upgrade", "start", str(g), "--fusion", str(fusion))
    galleria("upgrade", "run", str(g), "--limit", str(round(at * len(rows))), "--batch-size",
             "16", "--commit-every", "32", "-q")
    out: dict[str, Any] = {"at": at}
    st = json.loads(galleria("upgrade", "status", str(g), "--json").stdout)
    out["done"], out["decision_before"] = st["done"], {
        k: (st.get("online_psi") or {}).get(k) for k in ("rule", "moved", "verdict")}
    out["auto_before"], _ = served(g, paths, queries, rows)
    out["rank_merge_before"], _ = served(g, paths, queries, rows, "rank-merge")
    with Gallery.open(g) as gal:
        out["primary_before"] = gal.primary_space
        t = time.perf_counter()
        rep = adapt_gallery(gal, threads=1)
        out["adapt_s"] = round(time.perf_counter() - t, 1)
        out["adapt"] = {k: rep.get(k) for k in ("answer", "space", "fit")}
        out["primary_after"] = gal.primary_space
        out["query_config_adapted"] = "adaptation" in (
            gal.space_info(fusion_state(gal)["fused_space"]).info.get("query_config") or {})
    out["auto_after"], _ = served(g, paths, queries, rows)
    out["rank_merge_after"], _ = served(g, paths, queries, rows, "rank-merge")
    galleria("upgrade", "run", str(g), "--batch-size", "16", "--commit-every", "32", "-q")
    st = json.loads(galleria("upgrade", "status", str(g), "--json").stdout)
    out["decision_at_100"] = {k: (st.get("online_psi") or {}).get(k)
                              for k in ("rule", "moved", "verdict")}
    out["auto_at_100"], _ = served(g, paths, queries, rows)
    t = time.perf_counter()
    galleria("upgrade", "finish", str(g))
    out["finish_s"] = round(time.perf_counter() - t, 1)
    out["after_finish"], top_a = served(g, paths, queries, rows)
    fresh = fresh_gallery("fusion", work, man, fusion)
    out["fresh"], top_f = served(fresh, paths, queries, rows)
    out["top10_identical"] = sum(a == b for a, b in zip(top_a, top_f, strict=True))
    out["finished"] = str(g)
    return out


def bound(g0: Path, finished: Path, paths: list[str], queries: list[int],
          rows: list[dict[str, str]], seeds: int) -> dict[str, Any]:
    """Part 2: rank-merge of lite0 (old part) with the finished gallery's served space."""
    from galleria.decision.open import open_searcher
    from galleria.store.gallery import Gallery
    from galleria.types import SearchResult
    from galleria.upgrade.merge import CohortNorm, merge_results

    ids = [r["path"] for r in rows]

    def space(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
        with Gallery.open(path) as gal:
            sp = str(gal.primary_space)
            k, v = gal.load_vectors(sp)
            d = dict(zip(gal.ids_of(k), v, strict=True))
            s = open_searcher(gal, threads=1)
            q, good, _ = s.embed_paths(paths)
            if len(good) != len(paths):
                raise SystemExit("queries failed")
            return np.stack([d[i] for i in ids]).astype(np.float32), \
                np.asarray(q.data[s.spaces[0]], np.float32), sp

    go, qo, so = space(g0)
    gw, qw, sw = space(finished)

    def top(q: np.ndarray, g: np.ndarray, rows_: np.ndarray) -> SearchResult:
        s = q @ g[rows_].T
        o = np.argsort(-s, axis=1, kind="stable")[:, :100]
        names = np.array([ids[r] for r in rows_], dtype=object)
        return SearchResult(np.take_along_axis(s, o, 1).astype(np.float32), names[o])

    every = np.arange(len(ids))
    out: dict[str, Any] = {"old_space": so, "served_space": sw,
                           "old": metrics([list(r) for r in top(qo, go, every).ids],
                                          queries, rows),
                           "served_space_alone": metrics(
                               [list(r) for r in top(qw, gw, every).ids], queries, rows),
                           "fractions": {}}
    for f in (0.1, 0.25, 0.5, 0.75):
        per = []
        for seed in range(seeds):
            order = np.random.default_rng(seed).permutation(len(ids))
            nb = round(f * len(ids))
            moved, rest = np.sort(order[:nb]), np.sort(order[nb:])
            cohort = order[: min(nb, 1000)]
            cn = CohortNorm(go[cohort], gw[cohort], top=100)
            a, b = cn.apply(top(qo, go, rest), top(qw, gw, moved), qo, qw)
            per.append(metrics([list(r) for r in merge_results([a, b], 100).ids], queries,
                               rows))
        out["fractions"][str(f)] = {
            "mAP": round(float(np.mean([p["mAP"] for p in per])), 2),
            "R@1": round(float(np.mean([p["R@1"] for p in per])), 2), "seeds": per}
    return out


def markdown(res: dict[str, Any]) -> str:
    m, b = res["midjob"], res["bound"]

    def c(x: dict[str, Any]) -> str:
        return f"{x['mAP']:.1f} / {x['R@1']:.1f}"

    pct = int(100 * m["at"])
    lines = [
        "# A fusion live change: the gallery's adaptation before `finish`?", "",
        f"Machine: {res['machine'].get('cpu', '?')}, load {load(res['load_before'])} -> "
        f"{load(res['load_after'])}. Produced by benchmarks/bench_backfill_fusion_adapt.py. "
        "The 500 SMVS covers indexed with effnet-lite0, switched to a fused lite0 + lite2 model; "
        f"{res['queries']} phone photos searched in-process (k = 100; mAP / R@1 in %, the "
        "query itself excluded).", "",
        f"## 1. The adaptation run in the middle of a real job (at {pct} %)", "",
        "| state | `auto` (rule) | `rank-merge` |", "|---|---|---|",
        f"| {pct} %, before the adaptation | {c(m['auto_before'])} "
        f"({m['auto_before']['searcher']}) | {c(m['rank_merge_before'])} |",
        f"| {pct} %, after it | {c(m['auto_after'])} ({m['auto_after']['searcher']}) | "
        f"{c(m['rank_merge_after'])} |",
        f"| 100 %, before finish | {c(m['auto_at_100'])} ({m['auto_at_100']['searcher']}) | |",
        f"| after finish | {c(m['after_finish'])} | |",
        f"| fresh `index --fusion` | {c(m['fresh'])} | |", "",
        f"- The adaptation at {pct} % took {m['adapt_s']} s and chose `{m['adapt']['answer']}`; "
        f"it set the gallery's primary space from `{m['primary_before']}` to "
        f"`{m['primary_after']}` while the job was running, and wrote its query map into "
        f"the fused space's query model (adapted: {m['query_config_adapted']}), so the "
        "job's search queries the fused space with the adapted query from then on, while "
        "the check's pseudo-queries stay embedded with the trained one (their cache is "
        "keyed by the space's fingerprint, which the adaptation keeps). The job's searcher "
        "never searches the whitened space.",
        f"- The check: before the adaptation `{m['decision_before']['rule']}` "
        f"({(m['decision_before']['verdict'] or {}).get('merged_vs_old')}), at 100 % "
        f"`{m['decision_at_100']['rule']}` "
        f"({(m['decision_at_100']['verdict'] or {}).get('merged_vs_old')}, checked at "
        f"{m['decision_at_100']['moved']} moved).",
        f"- Finish after the mid-job adaptation: {c(m['after_finish'])}, top-10 identical to "
        f"the fresh index for {m['top10_identical']} / {res['queries']} queries "
        f"(finish {m['finish_s']} s).", "",
        "## 2. A bound: the moved part in the space the finished gallery serves", "",
        f"Rank-merge (per-query Z-norm, top-100 cohort of the moved items) of the old part "
        f"(`{b['old_space']}`) with the moved part in `{b['served_space']}` (its adapted "
        "query; its whitening fitted on the whole gallery, so optimistic), "
        f"{res['seeds']} seeded random moved sets (mean).", "",
        "| | 10 % | 25 % | 50 % | 75 % | old model alone | served space alone |",
        "|---|---|---|---|---|---|---|",
        "| mAP / R@1 | " + " | ".join(c(b["fractions"][k]) for k in ("0.1", "0.25", "0.5",
                                                                     "0.75"))
        + f" | {c(b['old'])} | {c(b['served_space_alone'])} |", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--fusion", default=None, help="a trained fusion model (default: train one)")
    ap.add_argument("--queries", type=int, default=100, help="phone photos measured")
    ap.add_argument("--at", type=float, default=0.5, help="fraction of the mid-job adaptation")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="backfill-fusion-adapt-"))
    work.mkdir(parents=True, exist_ok=True)
    man, g0, rows = prepare(work)
    phones = [n for n, r in enumerate(rows) if r["device"] != "Reference"]
    queries = sorted(random.Random(0).sample(phones, min(args.queries, len(phones))))
    paths = [rows[q]["file"] for q in queries]
    fusion = Path(args.fusion) if args.fusion else train_fusion(work)
    res: dict[str, Any] = {"machine": machine_info(1), "queries": len(queries),
                           "seeds": args.seeds, "load_before": uptime(), "workdir": str(work)}
    res["midjob"] = midjob(work, g0, man, fusion, args.at, paths, queries, rows)
    res["bound"] = bound(g0, Path(res["midjob"]["finished"]), paths, queries, rows,
                         args.seeds)
    res["load_after"] = uptime()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "backfill-fusion-adapt.json").write_text(json.dumps(res, indent=1, default=str))
    (OUT / "backfill-fusion-adapt.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
