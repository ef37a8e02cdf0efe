"""Live feature changes on SMVS while `galleria serve` answers a bounded load.

The gallery: the 500 SMVS DVD-cover images indexed with effnet-lite0. Three
changes, each through the upgrade job (``galleria upgrade start / run / finish``
in other processes) while one ``galleria serve`` process answers:

- ``local``: add SIFT local features (``--add-local sift``);
- ``transform``: apply a PCA-whitening to 256-d fitted on the gallery's own
  vectors (``galleria fit-transform`` without ``--apply``, then ``--transform``);
- ``fusion``: switch to a fused model (``--fusion F``; F is trained by this
  script on 30 Caltech-101 classes, disjoint from SMVS, unless ``--fusion`` names one).

Meanwhile ``--clients`` threads send SMVS phone photos (``POST /v1/search``) with a
pause between requests (a bounded load) for the whole change. At 0 / 10 / 25 /
50 / 75 / 100 % (``upgrade run --limit``) and after ``finish`` the server answers
every phone photo (k = 100) and mAP / R@1 are computed (relevant: the other
images of the cover; the query itself excluded). After ``finish`` a fresh
gallery with the new features (``galleria index`` with them) is served the same
way and its top-10 answers are compared with the finished gallery's.

Run:  nice -n 10 .venv/bin/python benchmarks/bench_backfill_live.py [--quick] [--changes local ...]
Writes benchmarks/results/backfill-live.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from galleria.store.gallery import Gallery

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
OLD = "effnet-lite0"
FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
SCENE = False
"""``--local-scene``: the local change's guard with pseudo-queries half in clutter."""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("GALLERIA_THREADS", "1")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("OPENBLAS_NUM_THREADS", "1")
    return e


def galleria(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "galleria.cli.main", *args], env=env(),
                       capture_output=True, text=True)
    print(f"  $ galleria {' '.join(args[:3])} ... [{time.perf_counter() - t:.1f} s, rc "
          f"{p.returncode}]", flush=True)
    if check and p.returncode != 0:
        raise SystemExit(f"galleria {args} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------ data
def prepare(work: Path) -> tuple[Path, Path, list[dict[str, str]]]:
    """The SMVS manifest (id = relative path) and the lite0 gallery."""
    from galleria.eval.paths import dataset_dir

    smvs = dataset_dir("smvs_dvd_covers")
    with open(smvs / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    man = work / "smvs.csv"
    with open(man, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "path", "group", "device"])
        for r in rows:
            w.writerow([r["path"], str(smvs / r["path"]), r["group"], r["device"]])
    g = work / "g0"
    if not (g / "gallery.sqlite").is_file():
        galleria("index", str(man), "--out", str(g), "--model", OLD, "-q")
    for r in rows:
        r["file"] = str(smvs / r["path"])
    return man, g, rows


def train_fusion(work: Path) -> Path:
    """A small fused model (lite0 + lite2 members, light lite0 query model) trained on 30
    Caltech-101 classes (600 images, their labels): SMVS is never seen."""
    from galleria.eval.paths import dataset_dir

    out = work / "fusion"
    if (out / "header.json").is_file():
        return out
    cal = dataset_dir("caltech101")
    with open(cal / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] != "BACKGROUND_Google"
                and r["split"] == "train"]
    classes = sorted({r["label"] for r in rows})
    keep = set(random.Random(0).sample(classes, 30))
    rows = [r for r in rows if r["label"] in keep]
    pick = []
    for c in sorted(keep):
        pick += [r for r in rows if r["label"] == c][:20]
    man = work / "fusion-train.csv"
    with open(man, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "path", "label"])
        for r in pick:
            w.writerow([r["path"], str(cal / r["path"]), r["label"]])
    galleria("fusion", "train", "--images", str(man), "--label-column", "label", "--out",
             str(out), "--gallery-models", "effnet-lite0,effnet-lite2", "--epochs", "2",
             "--views", "2", "--dim", "256", "--threads", "1", "-q")
    return out


# ------------------------------------------------------------------ server and clients
class Server:
    def __init__(self, gallery: Path, log: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "galleria.cli.main", "serve", str(gallery), "--port",
             str(self.port), "--request-threads", "2", "--threads", "1", "--log-level",
             "warning"],
            env=env(), stdout=self.log, stderr=self.log)

    def wait(self, timeout: float = 300) -> Server:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}); see its log")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit("the server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def search(url: str, image: bytes, k: int, pipeline: str | None) -> tuple[int, Any]:
    import httpx

    data = {"k": str(k)}
    if pipeline:
        data["pipeline"] = pipeline
    try:
        r = httpx.post(url + "/v1/search", files={"image": ("q.jpg", image, "image/jpeg")},
                       data=data, timeout=300)
        return r.status_code, r.json()
    except (httpx.HTTPError, ValueError) as exc:
        return 0, {"message": str(exc)}


class Load:
    """``clients`` threads, each: a random phone photo, then ``pause_s`` (a bounded load)."""

    def __init__(self, url: str, photos: list[bytes], clients: int, pause_s: float) -> None:
        self.url, self.photos, self.pause_s = url, photos, pause_s
        self.stop_ev = threading.Event()
        self.records: list[dict[str, Any]] = []
        self.threads = [threading.Thread(target=self._loop, args=(n,), daemon=True)
                        for n in range(clients)]
        self.t0 = time.monotonic()

    def _loop(self, n: int) -> None:
        rng = random.Random(100 + n)
        while not self.stop_ev.is_set():
            t = time.monotonic()
            status, body = search(self.url, self.photos[rng.randrange(len(self.photos))], 10,
                                  None)
            self.records.append({"t": t - self.t0, "lat": time.monotonic() - t,
                                 "status": status, "searcher": body.get("searcher"),
                                 "error": None if status == 200 else str(body)[:200]})
            self.stop_ev.wait(self.pause_s)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=600)

    def summary(self) -> dict[str, Any]:
        lat = [r["lat"] for r in self.records if r["status"] == 200]
        errs = [r for r in self.records if r["status"] != 200]
        return {"requests": len(self.records), "errors": len(errs),
                "error_examples": [e["error"] for e in errs[:3]],
                "p50_ms": round(1000 * float(np.median(lat)), 1) if lat else None,
                "p95_ms": round(1000 * float(np.percentile(lat, 95)), 1) if lat else None,
                "searchers": sorted({str(r["searcher"]) for r in self.records})}


def accuracy(url: str, rows: list[dict[str, str]], queries: list[int], pipeline: str | None
             ) -> dict[str, Any]:
    """mAP and R@1 of the server's answers (k = 100) to the phone photos ``queries``."""
    ranked: list[list[str]] = []
    top10: list[list[str]] = []
    errors = 0
    details: list[dict[str, Any]] = []
    for qi in queries:
        t = time.monotonic()
        status, body = search(url, Path(rows[qi]["file"]).read_bytes(), 100, pipeline)
        if status != 200:
            errors += 1
            details.append({"query": rows[qi]["path"], "status": status,
                            "seconds": round(time.monotonic() - t, 1),
                            "body": str(body)[:400]})
            ranked.append([])
            top10.append([])
            continue
        ranked.append([h["id"] for h in body["results"]])
        top10.append(ranked[-1][:10])
    return {**metrics(ranked, queries, rows), "errors": errors, "error_details": details,
            "top10": top10}


def metrics(ranked: list[list[Any]], queries: list[int], rows: list[dict[str, str]]
            ) -> dict[str, float]:
    """mAP and R@1 (%) of ranked gallery ids (first 100 of each; ``None`` and ids not in
    ``rows`` skipped), one list per phone photo ``queries`` (the query itself excluded)."""
    from galleria.eval.metrics import per_query_metrics

    pos = {r["path"]: n for n, r in enumerate(rows)}
    ranking = np.full((len(queries), 100), -1, np.int64)
    for n, row in enumerate(ranked):
        got = [pos[i] for i in row if i is not None and i in pos][:100]
        ranking[n, : len(got)] = got
    labels = np.array([int(r["group"]) for r in rows])
    m = per_query_metrics(ranking, labels[queries], labels, metrics=("mAP", "R@1"),
                          query_gallery_index=np.asarray(queries))
    return {"mAP": round(100 * float(np.nanmean(m["mAP"])), 2),
            "R@1": round(100 * float(np.nanmean(m["R@1"])), 2)}


def merged_accuracy(g: Path, rows: list[dict[str, str]], queries: list[int],
                    cache: dict[str, Any], rule: str = "rank-merge") -> dict[str, Any]:
    """Local change: mAP / R@1 of the *unguarded* merged answers (rule ``rank-merge``,
    in this process, not through the server) on the phone photos ``queries``."""
    from galleria.store.gallery import Gallery
    from galleria.upgrade.search import BackfillSearcher

    with Gallery.open(g) as gal:
        s = BackfillSearcher.open(gal, rule=rule, threads=1)
        try:
            if "q" not in cache:  # the same query features at every fraction
                cache["q"] = s.embed_paths([rows[q]["file"] for q in queries], workers=1)[0]
            res = s.search(cache["q"], k=100)
        finally:
            s.close()
    return metrics([list(r) for r in res.ids], queries, rows)


GUARD_FIELDS = ("rule", "checked", "source", "moved", "queries", "verdict", "scores",
                "search_s", "check_s", "checks", "total_s")


# ------------------------------------------------------------------ one change
def start_args(change: str, work: Path, g: Path, fusion: Path | None) -> list[str]:
    if change == "local":
        return ["--add-local", "sift", *(["--pseudo-scene"] if SCENE else [])]
    if change == "fusion":
        assert fusion is not None
        return ["--fusion", str(fusion)]
    t = work / "T-pca-whiten-256"
    if not (t / "header.json").is_file():
        galleria("fit-transform", str(g), "--kind", "pca-whiten", "--dim", "256", "--out",
                 str(t), "-q")
    return ["--transform", str(t)]


def fresh_gallery(change: str, work: Path, man: Path, fusion: Path | None) -> Path:
    f = work / f"fresh-{change}"
    if (f / "gallery.sqlite").is_file():
        return f
    if change == "local":
        galleria("index", str(man), "--out", str(f), "--model", OLD, "--local", "sift", "-q")
    elif change == "fusion":
        galleria("index", str(man), "--out", str(f), "--fusion", str(fusion), "-q")
    else:
        galleria("index", str(man), "--out", str(f), "--model", OLD, "-q")
        from galleria.store.gallery import Gallery
        from galleria.transforms.attach import add_transformed_space
        from galleria.transforms.registry import load_transform

        t = work / "T-pca-whiten-256"
        with Gallery.open(f) as gal:
            tr = load_transform(t, fingerprint=gal.primary_space)
            add_transformed_space(gal, tr, t)
    return f


def run_change(change: str, work: Path, man: Path, g0: Path, rows: list[dict[str, str]],
               queries: list[int], fusion: Path | None, clients: int, pause_s: float
               ) -> dict[str, Any]:
    print(f"== {change}", flush=True)
    g = work / f"g-{change}"
    shutil.rmtree(g, ignore_errors=True)
    shutil.copytree(g0, g)
    extra = start_args(change, work, g0, fusion)
    after_pipeline = "local" if change == "local" else None
    photos = [Path(rows[q]["file"]).read_bytes() for q in queries[:64]]
    out: dict[str, Any] = {"change": change, "start": extra, "points": [],
                           "load_before": uptime()}
    qcache: dict[str, Any] = {}
    server = Server(g, work / f"server-{change}.log").wait()
    try:
        with Load(server.url, photos, clients, pause_s) as load:
            galleria("upgrade", "start", str(g), *extra)
            n = len(rows)
            done = 0
            for f in FRACTIONS:
                target = round(f * n)
                if target > done:
                    t = time.perf_counter()
                    galleria("upgrade", "run", str(g), "--limit", str(target - done),
                             "--batch-size", "16", "--commit-every", "32", "-q")
                    out.setdefault("run_s", []).append(round(time.perf_counter() - t, 1))
                    st = json.loads(galleria("upgrade", "status", str(g), "--json").stdout)
                    done = st["done"]
                st = json.loads(galleria("upgrade", "status", str(g), "--json").stdout)
                dec = st.get("online_psi") or {}
                rule = dec.get("rule")
                acc = accuracy(server.url, rows, queries, None)
                acc["rule"] = rule
                if dec:  # the last check: items moved when it ran, its verdict
                    acc["checked_at"] = dec.get("moved")
                    acc["merged_vs_old"] = (dec.get("verdict") or {}).get("merged_vs_old")
                if change == "local":  # the guard's last decision and the unguarded merge
                    with Gallery.open(g, readonly=True) as gal:
                        full = (gal.get_setting("upgrade") or {}).get("online", {}) \
                            .get("decision") or {}
                    acc["guard"] = {k: full.get(k) for k in GUARD_FIELDS}
                    acc["merged"] = merged_accuracy(g, rows, queries, qcache)
                    acc["hybrid"] = merged_accuracy(g, rows, queries, qcache, "hybrid")
                    print(f"        unguarded merge: mAP {acc['merged']['mAP']:.2f}; guard "
                          f"{acc['guard']}", flush=True)
                print(f"   {int(100 * f):3d} %: mAP {acc['mAP']:.2f}  R@1 {acc['R@1']:.2f}  "
                      f"errors {acc['errors']} {acc['error_details']}  rule {rule}", flush=True)
                out["points"].append({"fraction": f, "done": done, **{
                    k: v for k, v in acc.items() if k != "top10"}})
            t = time.perf_counter()
            galleria("upgrade", "finish", str(g))
            out["finish_s"] = round(time.perf_counter() - t, 1)
            after = accuracy(server.url, rows, queries, after_pipeline)
            out["after_finish"] = {k: v for k, v in after.items() if k != "top10"}
            print(f"   finished: mAP {after['mAP']:.2f}  R@1 {after['R@1']:.2f}", flush=True)
        out["load"] = load.summary()
    finally:
        server.stop()
    f = fresh_gallery(change, work, man, fusion)
    fserver = Server(f, work / f"server-fresh-{change}.log").wait()
    try:
        fresh = accuracy(fserver.url, rows, queries, after_pipeline)
    finally:
        fserver.stop()
    same = sum(a == b for a, b in zip(after["top10"], fresh["top10"], strict=True))
    out["fresh"] = {k: v for k, v in fresh.items() if k != "top10"}
    out["finished_vs_fresh"] = {"top10_identical": same, "queries": len(queries),
                                **compare_stores(g, f)}
    out["load_after"] = uptime()
    print(f"   fresh: mAP {fresh['mAP']:.2f}; top-10 identical {same}/{len(queries)}; "
          f"load errors {out['load']['errors']} / {out['load']['requests']}", flush=True)
    return out


def _undigest(space: str | None) -> str:
    """``fp|whitened@<digest>`` -> ``fp|whitened`` (other names as they are)."""
    return (space or "").split("|whitened@")[0] + ("|whitened" if "|whitened@" in
                                                    (space or "") else "")


def compare_stores(a_path: Path, b_path: Path) -> dict[str, Any]:
    """Spaces, primary and the largest vector difference of the finished and fresh galleries."""
    from galleria.store.gallery import Gallery

    with Gallery.open(a_path) as a, Gallery.open(b_path) as b:
        sa, sb = sorted(s.space for s in a.spaces()), sorted(s.space for s in b.spaces())
        out: dict[str, Any] = {"same_spaces": sa == sb, "primary_equal":
                               a.primary_space == b.primary_space,
                               "job_left": a.get_setting("upgrade") is not None}
        # a fused gallery's whitened space is named by the digest of its whitening, which
        # hashes float bytes: the same space up to float noise gets another name
        out["same_spaces_modulo_digest"] = [_undigest(x) for x in sa] == \
            [_undigest(x) for x in sb]
        out["primary_equal_modulo_digest"] = _undigest(a.primary_space) == \
            _undigest(b.primary_space)
        diffs = []
        for s in a.spaces():
            if s.kind != "global" or s.space not in sb:
                continue
            ka, va = a.load_vectors(s.space)
            kb, vb = b.load_vectors(s.space)
            da = dict(zip(a.ids_of(ka), va, strict=True))
            db = dict(zip(b.ids_of(kb), vb, strict=True))
            if sorted(da) != sorted(db):
                diffs.append(float("inf"))
                continue
            diffs.append(max(float(np.abs(da[i] - db[i]).max()) for i in da))
        out["max_abs_vector_diff"] = max(diffs) if diffs else None
        return out


def _modulo(v: dict[str, Any]) -> str:
    if "same_spaces_modulo_digest" not in v or (v["same_spaces"] and v["primary_equal"]):
        return ""
    return (f" (up to the whitening digest in the space names: same spaces "
            f"{v['same_spaces_modulo_digest']}, primary {v['primary_equal_modulo_digest']})")


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Live feature changes on SMVS while `galleria serve` answers", "",
             f"Machine: {res['machine'].get('cpu', '?')}. Produced by "
             "benchmarks/bench_backfill_live.py. Gallery: the 500 SMVS images with "
             f"effnet-lite0; {res['queries']} phone photos measured through the server at each "
             "fraction (k = 100; mAP, R@1, the query itself excluded); a bounded load of "
             f"{res['clients']} clients (pause {res['pause_s']} s) the whole time.", "",
             "| change | " + " | ".join(f"{int(100 * f)} %" for f in FRACTIONS)
             + " | after finish | fresh index | top-10 = fresh | load errors | p50 / p95 ms |",
             "|" + "---|" * (len(FRACTIONS) + 6)]
    for c in res["changes"]:
        pts = " | ".join(f"{p['mAP']:.1f} / {p['R@1']:.1f}" for p in c["points"])
        a, f, v = c["after_finish"], c["fresh"], c["finished_vs_fresh"]
        ld = c["load"]
        lines.append(f"| {c['change']} | {pts} | {a['mAP']:.1f} / {a['R@1']:.1f} | "
                     f"{f['mAP']:.1f} / {f['R@1']:.1f} | {v['top10_identical']} / "
                     f"{v['queries']} | {ld['errors']} / {ld['requests']} | "
                     f"{ld['p50_ms']} / {ld['p95_ms']} |")
    lines += ["", "Cells: mAP / R@1 (%). Measured-query errors per point are in the JSON "
              "(`points[].errors`); stores compared after finish: "
              + "; ".join(f"{c['change']}: same spaces {c['finished_vs_fresh']['same_spaces']}, "
                          f"primary {c['finished_vs_fresh']['primary_equal']}"
                          + _modulo(c['finished_vs_fresh']) + ", max vector "
                          f"diff {c['finished_vs_fresh']['max_abs_vector_diff']}"
                          for c in res["changes"]) + ".", ""]
    for c in res["changes"]:
        if not any("guard" in p for p in c["points"]):
            continue
        lines += [f"Change {c['change']}: the old-answers guard (mAP / R@1; *served*: the "
                  "default through the server, as above; *unguarded merge*: rule rank-merge "
                  "in the script's process; *hybrid*: rule hybrid, likewise; the guard's "
                  "decision, the MRR (%) of hybrid, the merge and the global answers on its "
                  "pseudo-queries, and what "
                  f"its check cost, one thread; machine load `{c.get('load_before')}` before "
                  f"the change, `{c.get('load_after')}` after it):", "",
                  "| moved | served | unguarded merge | hybrid (unguarded) | rule | verdict | "
                  "pseudo MRR hybrid / merged / global | pseudo-queries | check s (search s) |",
                  "|---" * 9 + "|"]
        for p in c["points"]:
            gd, m = p.get("guard") or {}, p.get("merged") or {}
            sc = gd.get("scores") or {}
            mrr = " / ".join(f"{sc[r]['mrr']:.1f}" if r in sc else "-"
                             for r in ("hybrid", "rank-merge", "old-only"))
            hy = p.get("hybrid") or {}
            lines.append(f"| {int(100 * p['fraction'])} % | {p['mAP']:.1f} / {p['R@1']:.1f} | "
                         f"{m.get('mAP', float('nan')):.1f} / {m.get('R@1', float('nan')):.1f} | "
                         f"{hy.get('mAP', float('nan')):.1f} / {hy.get('R@1', float('nan')):.1f}"
                         f" | {gd.get('rule') or 'old-only (no check yet)'} | "
                         f"{(gd.get('verdict') or {}).get('merged_vs_old') or '-'}"
                         f" | {mrr} | {gd.get('queries') or '-'} | {gd.get('check_s') or '-'} "
                         f"({gd.get('search_s') or '-'}) |")
        lines.append("")
    for c in res["changes"]:
        errs = ", ".join(f"{int(100 * p['fraction'])} %: {p['errors']}" for p in c["points"])
        rules = ", ".join(f"{int(100 * p['fraction'])} %: {p.get('rule')}" + (
            f" (checked at {p['checked_at']} moved, merged vs old {p.get('merged_vs_old')})"
            if p.get("checked_at") is not None else "") for p in c["points"] if p.get("rule"))
        secs = (f"; `upgrade run` {sum(c['run_s']):.0f} s in all ({len(c['run_s'])} runs), "
                f"`upgrade finish` {c['finish_s']:.0f} s" if c.get("run_s") else "")
        lines.append(f"- {c['change']}: failed measured requests {errs}"
                     + (f"; `auto` rule in force {rules}" if rules else "") + secs + ".")
        for p in c["points"]:
            for d in p.get("error_details") or []:
                lines.append(f"  - at {int(100 * p['fraction'])} %: {d['query']} -> status "
                             f"{d['status']} after {d['seconds']} s: `{d['body'][:200]}`")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--changes", nargs="+", default=["local", "transform", "fusion"])
    ap.add_argument("--fusion", default=None, help="a trained fusion model (default: train one)")
    ap.add_argument("--queries", type=int, default=400, help="phone photos measured")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between a client's requests")
    ap.add_argument("--quick", action="store_true", help="100 measured photos")
    ap.add_argument("--update", action="store_true",
                    help="replace only the changes run now in an existing backfill-live.json")
    ap.add_argument("--local-scene", action="store_true",
                    help="the local change's guard with pseudo-queries half in clutter "
                         "(upgrade start --pseudo-scene)")
    ap.add_argument("--name", default="backfill-live",
                    help="results file name (benchmarks/results/NAME.{json,md})")
    args = ap.parse_args()
    global SCENE
    SCENE = bool(args.local_scene)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="backfill-live-"))
    work.mkdir(parents=True, exist_ok=True)
    man, g0, rows = prepare(work)
    phones = [n for n, r in enumerate(rows) if r["device"] != "Reference"]
    nq = 100 if args.quick else args.queries
    queries = sorted(random.Random(0).sample(phones, min(nq, len(phones))))
    fusion = None
    if "fusion" in args.changes:
        fusion = Path(args.fusion) if args.fusion else train_fusion(work)
    res: dict[str, Any] = {"machine": machine_info(1), "queries": len(queries),
                           "clients": args.clients, "pause_s": args.pause, "changes": [],
                           "workdir": str(work)}
    kept: list[dict[str, Any]] = []
    if args.update and (OUT / f"{args.name}.json").is_file():
        kept = [c for c in json.loads((OUT / f"{args.name}.json").read_text())["changes"]
                if c["change"] not in args.changes]
    for change in args.changes:
        res["changes"].append(run_change(change, work, man, g0, rows, queries, fusion,
                                         args.clients, args.pause))
        res["changes"] = [c for c in kept if c["change"] not in
                          {x["change"] for x in res["changes"]}] + res["changes"]
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{args.name}.json").write_text(json.dumps(res, indent=1, default=str))
        (OUT / f"{args.name}.md").write_text(markdown(res))
    print(f"wrote {OUT / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
