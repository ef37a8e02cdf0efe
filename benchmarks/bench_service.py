"""Load test of `galleria serve` while other processes upgrade and grow the gallery.

Real data: the 500 SMVS DVD-cover images indexed with effnet-lite0 (`galleria
index`), queried by N concurrent clients (loopback, multipart uploads of SMVS
phone photos) for M seconds. Meanwhile, from other processes: `galleria upgrade
start --new-model effnet-lite2`, `galleria upgrade run` (moves every item), a
`galleria index` of 200 Caltech-101 images started during that run (old model),
`galleria remove` of 10 items, a second `upgrade run` (the 200), and `galleria
upgrade finish` -- with idle holds before and after the run so each searcher
(plain lite0, backfill merge, plain lite2) is measured with and without
background work.

Checked: every response 200; every result names an item committed at the
response's generation, never twice; every sampled response (1 in ``--sample``,
with its query vectors) equals the brute-force merged ranking of its generation
(galleria.service.audit: a recorder in this process polls the store's change
log and vectors). Measured: q/s and p50/p95/p99 latency per window (searcher x
background processes alive), server RSS every 2 s.

Run:  nice -n 10 .venv/bin/python benchmarks/bench_service.py [--clients 16 --seconds 300]
      .venv/bin/python benchmarks/bench_service.py --quick   (100 + 30 images, 30 s)
Writes benchmarks/results/service.json + .md (``--quick``: service_quick.*).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, machine_md, md_table, write_results

ROOT = Path(__file__).resolve().parents[1]
OLD, NEW = "effnet-lite0", "effnet-lite2"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("GALLERIA_THREADS", "1")
    return e


def galleria(*args: str) -> list[str]:
    return [sys.executable, "-m", "galleria.cli.main", *args]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def space_counts(g: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{g / 'gallery.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return dict(con.execute("SELECT space, count FROM spaces").fetchall())
    finally:
        con.close()


# ------------------------------------------------------------------ data
def prepare(work: Path, n_gallery: int, n_added: int
            ) -> tuple[Path, Path, list[bytes], list[str]]:
    """Index SMVS (first ``n_gallery`` rows) with the old model; a manifest of
    ``n_added`` Caltech-101 images (seeded); the query photos (bytes)."""
    from galleria.eval.paths import dataset_dir

    smvs, cal = dataset_dir("smvs_dvd_covers"), dataset_dir("caltech101")
    with open(smvs / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:n_gallery]
    gm = work / "smvs.csv"
    with open(gm, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "path", "group", "device"])
        for r in rows:
            w.writerow([r["path"], str(smvs / r["path"]), r["group"], r["device"]])
    with open(cal / "manifest.csv", newline="") as fh:
        crow = [r for r in csv.DictReader(fh) if r["label"] != "BACKGROUND_Google"]
    pick = random.Random(0).sample(crow, n_added)
    am = work / "added.csv"
    with open(am, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "path", "label"])
        for r in pick:
            w.writerow(["caltech/" + r["path"].split("/", 1)[1], str(cal / r["path"]),
                        r["label"]])
    g = work / "g"
    t = time.perf_counter()
    subprocess.run(galleria("index", str(gm), "--out", str(g), "--model", OLD, "-q"),
                   env=env(), check=True, capture_output=True, text=True)
    print(f"indexed {len(rows)} SMVS images with {OLD} in {time.perf_counter() - t:.0f} s",
          flush=True)
    phones = [r for r in rows if r["device"] != "Reference"]
    qs = random.Random(1).sample(phones, min(64, len(phones)))
    return g, am, [(smvs / r["path"]).read_bytes() for r in qs], [r["path"] for r in rows]


# ------------------------------------------------------------------ writers
class Writers:
    """The background work, in other processes, with its timeline."""

    def __init__(self, g: Path, added: Path, ids: list[str], rec: Any, hold_s: float,
                 log: Path, *, http_url: str | None = None, deletes: int = 50) -> None:
        self.g, self.added, self.ids, self.rec, self.hold_s = g, added, ids, rec, hold_s
        self.http_url, self.deletes = http_url, deletes
        self.http: dict[str, Any] = {"adds": 0, "deletes": 0, "errors": [], "latencies": []}
        self.log = open(log, "a")  # noqa: SIM115 - closed in run()
        self.timeline: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.error: str | None = None
        self.done = threading.Event()

    def _start(self, name: str, *args: str, label: str | None = None
               ) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        ev = {"name": name, "label": label or name, "start": time.monotonic() - self.t0,
              "end": None}
        self.timeline.append(ev)
        p = subprocess.Popen(galleria(*args), env=env(), stdout=self.log, stderr=self.log,
                             text=True)
        return p, ev

    def _wait(self, p: subprocess.Popen[str], ev: dict[str, Any]) -> None:
        rc = p.wait()
        ev["end"] = time.monotonic() - self.t0
        ev["rc"] = rc
        print(f"  [{ev['start']:6.1f} -> {ev['end']:6.1f} s] {ev['name']}: rc {rc}", flush=True)
        if rc != 0:
            raise RuntimeError(f"{ev['name']} exited with {rc} (see the log)")

    def run_all(self, t0: float) -> None:
        self.t0 = t0
        g = str(self.g)
        try:
            self._wait(*self._start("upgrade start", "upgrade", "start", g, "--new-model", NEW))
            time.sleep(self.hold_s)  # backfill searcher, nothing moved yet: idle
            run, ev = self._start("upgrade run", "upgrade", "run", g, "--commit-every", "32",
                                  "--batch-size", "16", "-q")
            new = next(s for s in space_counts(self.g) if s.startswith(NEW))
            while space_counts(self.g).get(new, 0) == 0 and run.poll() is None:
                time.sleep(0.1)  # the run has chosen its items: additions wait for run 2
            if self.http_url:
                self._http_writes()
            else:
                idx, iev = self._start("index +200", "index", str(self.added), "--out", g,
                                       "--model", OLD, "--commit-every", "20",
                                       "--batch-size", "16", "-q")
                self._wait(idx, iev)
                with open(self.added, newline="") as fh:
                    victims = [r["id"] for r in csv.DictReader(fh)][:5]
                victims += self.ids[-5:]
                self._wait(*self._start("remove 10", "remove", g, *victims))
            self._wait(run, ev)
            self._wait(*self._start("upgrade run 2", "upgrade", "run", g, "--commit-every", "32",
                                    "--batch-size", "16", "-q", label="upgrade run"))
            time.sleep(self.hold_s)  # backfill searcher, everything moved: idle
            self.rec.poll()
            self.rec.keep_pairs()  # finish deletes them; the audit recomputes calibration
            self._wait(*self._start("upgrade finish", "upgrade", "finish", g))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            print("writers failed:", self.error, flush=True)
        finally:
            self.log.close()
            self.done.set()

    def _http_writes(self) -> None:
        """Every image of the added manifest uploaded through ``POST /v1/items`` (one
        client, one at a time) and ``deletes`` items removed through ``DELETE``
        (half of them original SMVS items, half just uploaded), interleaved."""
        import httpx

        with open(self.added, newline="") as fh:
            rows = list(csv.DictReader(fh))
        ev = {"name": f"HTTP +{len(rows)} / -{self.deletes}", "label": "HTTP writes",
              "start": time.monotonic() - self.t0, "end": None}
        self.timeline.append(ev)
        old_victims = self.ids[-(self.deletes // 2):] if self.deletes else []
        every = max(1, len(rows) // max(1, self.deletes))
        uploaded: list[str] = []
        with httpx.Client(base_url=self.http_url, timeout=300) as c:
            def call(method: str, path: str, **kw: Any) -> bool:
                t = time.monotonic()
                try:
                    r = c.request(method, path, **kw)
                    ok = r.status_code in (200, 201)
                    msg = "" if ok else f"{method} {path}: {r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, msg = False, f"{method} {path}: {exc}"
                self.http["latencies"].append(time.monotonic() - t)
                if not ok:
                    self.http["errors"].append(msg)
                return ok

            for n, r in enumerate(rows):
                data = Path(r["path"]).read_bytes()
                if call("POST", "/v1/items", files={"image": ("img.jpg", data, "image/jpeg")},
                        data={"id": r["id"], "metadata": json.dumps({"label": r["label"]})}):
                    self.http["adds"] += 1
                    uploaded.append(r["id"])
                if (n + 1) % every == 0 and self.http["deletes"] < self.deletes:
                    k = self.http["deletes"]
                    victim = old_victims[k // 2] if k % 2 == 0 and k // 2 < len(old_victims) \
                        else uploaded.pop(0)
                    if call("DELETE", "/v1/items/" + quote(victim, safe="")):
                        self.http["deletes"] += 1
        ev["end"] = time.monotonic() - self.t0
        print(f"  [{ev['start']:6.1f} -> {ev['end']:6.1f} s] {ev['name']}: "
              f"{self.http['adds']} added, {self.http['deletes']} deleted, "
              f"{len(self.http['errors'])} errors", flush=True)
        if self.http["errors"]:
            raise RuntimeError(f"HTTP writes failed: {self.http['errors'][:3]}")

    def active(self, t: float) -> list[str]:
        return [e["label"] for e in self.timeline
                if e["start"] <= t < (e["end"] if e["end"] is not None else 1e18)]


# ------------------------------------------------------------------ clients
async def client_loop(n: int, url: str, queries: list[bytes], until: Any, sample: int,
                      out: list[dict[str, Any]], t0: float, max_requests: int) -> None:
    import httpx

    rng = random.Random(100 + n)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        while not until() and len(out) < max_requests:
            q = queries[rng.randrange(len(queries))]
            want_q = rng.randrange(sample) == 0
            t = time.monotonic()
            try:
                r = await c.post("/v1/search", files={"image": ("q.jpg", q, "image/jpeg")},
                                 data={"k": "10", "return_query": "true" if want_q else ""})
                status, body = r.status_code, (r.json() if r.headers.get(
                    "content-type", "").startswith("application/json") else {})
            except httpx.HTTPError as exc:
                status, body = 0, {"message": str(exc)}
            rec: dict[str, Any] = {"t": t - t0, "lat": time.monotonic() - t, "status": status}
            if status == 200:
                rec.update(results=body["results"], generation=body["generation"],
                           model=body["model"], merge=body.get("merge"), k=body["k"],
                           offset=body["offset"])
                if want_q:
                    rec["query"] = {s: np.asarray(v, np.float32) for s, v in
                                    body["query"].items()}
                for h in rec["results"]:
                    h["metadata"] = None  # not needed by the audit
            else:
                rec["error"] = body.get("message", "")[:300]
            out.append(rec)


async def load(url: str, queries: list[bytes], clients: int, until: Any, sample: int,
               t0: float, max_requests: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    await asyncio.gather(*(client_loop(n, url, queries, until, sample, out, t0, max_requests)
                           for n in range(clients)))
    return out


# ------------------------------------------------------------------ report
def percentiles(lat: list[float]) -> dict[str, float | None]:
    if not lat:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    a = np.asarray(lat) * 1000
    return {f"p{p}_ms": round(float(np.percentile(a, p)), 1) for p in (50, 95, 99)}


def searcher_of(r: dict[str, Any]) -> str:
    if r.get("merge"):
        return f"backfill {OLD}+{NEW}"
    m = str(r.get("model", "?"))
    return NEW if m.startswith(NEW) else OLD if m.startswith(OLD) else m


def windows(reqs: list[dict[str, Any]], writers: Writers, step: float = 0.5) -> list[dict]:
    """q/s and latency per window = (searcher that answered, background processes alive
    when the request was sent); a window's length is the sum of the ``step``-second slots
    where most requests sent belong to it."""
    from collections import Counter, defaultdict

    def key(r: dict[str, Any]) -> tuple[str, str]:
        bg = " + ".join(writers.active(r["t"])) or "idle"
        return (searcher_of(r) if r["status"] == 200 else "(error)", bg)

    by_key: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    by_slot: dict[int, Counter[tuple[str, str]]] = defaultdict(Counter)
    for r in reqs:
        k = key(r)
        by_key[k].append(r)
        by_slot[int(r["t"] / step)][k] += 1
    secs: Counter[tuple[str, str]] = Counter()
    for c in by_slot.values():
        secs[c.most_common(1)[0][0]] += step
    rows = []
    for k, sel in sorted(by_key.items(), key=lambda kv: kv[1][0]["t"]):
        ok = [r for r in sel if r["status"] == 200]
        s = secs.get(k, 0.0)
        rows.append({"searcher": k[0], "background": k[1], "seconds": round(s, 1),
                     "requests": len(sel), "qps": round(len(ok) / s, 2) if s else None,
                     "errors": len(sel) - len(ok), **percentiles([r["lat"] for r in ok])})
    return rows


def audit(rec: Any, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    from galleria.service.audit import check_members, check_response

    ok = [r for r in reqs if r["status"] == 200]
    member_bad, verified, unverifiable, mismatches = [], 0, 0, []
    for r in ok:
        v = check_members(rec, r)
        if not v.ok:
            member_bad.append({"problem": v.problem, **v.details})
        if "query" in r:
            resp = {**r, "query": {s: q.tolist() for s, q in r["query"].items()}}
            v = check_response(rec, resp)
            if not v.ok:
                mismatches.append({"problem": v.problem, "generation": r["generation"],
                                   **v.details})
            elif v.problem.startswith("unverifiable"):
                unverifiable += 1
            else:
                verified += 1
    return {"responses": len(reqs), "errors": len(reqs) - len(ok),
            "error_examples": sorted({r.get("error", "") for r in reqs
                                      if r["status"] != 200})[:5],
            "results_missing_or_duplicated": len(member_bad),
            "member_examples": member_bad[:5], "sampled": sum("query" in r for r in ok),
            "sampled_equal_brute_force": verified, "sampled_unverifiable": unverifiable,
            "sampled_mismatches": len(mismatches), "mismatch_examples": mismatches[:5],
            "recorder_polls": rec.polls, "recorder_missed_vectors": rec.missed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=300.0,
                    help="load duration (longer if the background work is not done by then)")
    ap.add_argument("--tail-seconds", type=float, default=30.0,
                    help="load kept after the background work ended (the new model alone)")
    ap.add_argument("--max-seconds", type=float, default=1200.0, help="hard limit")
    ap.add_argument("--baseline-seconds", type=float, default=45.0,
                    help="load before the background work starts")
    ap.add_argument("--hold-seconds", type=float, default=20.0,
                    help="idle holds before and after the upgrade run")
    ap.add_argument("--gallery-size", type=int, default=500)
    ap.add_argument("--added", type=int, default=200)
    ap.add_argument("--sample", type=int, default=5, help="1 in SAMPLE responses is audited")
    ap.add_argument("--workers", type=int, default=2, help="server worker threads")
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--writes", choices=["cli", "http"], default="cli",
                    help="the added images and removals: `galleria index` + `galleria "
                         "remove` in other processes (cli), or POST / DELETE /v1/items "
                         "through the served API (http)")
    ap.add_argument("--deletes", type=int, default=50, help="with --writes http")
    ap.add_argument("--name", default=None, help="results file name (default: service, "
                    "service-http with --writes http, *_quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="100 + 30 images, 8 clients, 40 s")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    if args.quick:
        args.clients, args.seconds, args.baseline_seconds, args.hold_seconds = 8, 40.0, 8.0, 4.0
        args.tail_seconds, args.max_seconds = 10.0, 300.0
        args.gallery_size, args.added, args.deletes = 100, 30, min(args.deletes, 10)
    info = machine_info(threads=1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-service-"))
    work.mkdir(parents=True, exist_ok=True)
    g, added, queries, ids = prepare(work, args.gallery_size, args.added)
    from galleria.service.audit import StoreRecorder

    rec = StoreRecorder(g).start(interval_s=0.2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    slog = open(work / "server.log", "a")  # noqa: SIM115
    server = subprocess.Popen(galleria("serve", str(g), "--port", str(port), "--request-threads",
                                       str(args.workers), "--queue", "64", "--log-level",
                                       "warning"), env=env(), stdout=slog, stderr=slog)
    import httpx

    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not start; see " + str(work / "server.log"))
        time.sleep(0.2)
    t0 = time.monotonic()
    rss: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(2.0):
            rss.append((round(time.monotonic() - t0, 1), round(rss_mb(server.pid), 1)))

    loads: list[tuple[float, tuple[float, float, float]]] = []
    threading.Thread(target=sample_rss, daemon=True).start()
    writers = Writers(g, added, ids, rec, args.hold_seconds, work / "writers.log",
                      http_url=url if args.writes == "http" else None,
                      deletes=args.deletes if args.writes == "http" else 10)

    def start_writers() -> None:
        time.sleep(args.baseline_seconds)
        writers.run_all(t0)

    wt = threading.Thread(target=start_writers, daemon=True)
    wt.start()
    print(f"{args.clients} clients for {args.seconds:.0f} s against {url} (load "
          f"{os.getloadavg()[0]:.2f})", flush=True)
    finished_at: list[float] = []

    def until() -> bool:
        """``--seconds`` have passed and the background work ended ``--tail-seconds`` ago
        (at most ``--max-seconds``)."""
        now = time.monotonic() - t0
        if now >= args.max_seconds:
            return True
        if not writers.done.is_set():
            return False
        if not finished_at:
            finished_at.append(now)
        return now >= max(args.seconds, finished_at[0] + args.tail_seconds)

    reqs = asyncio.run(load(url, queries, args.clients, until, args.sample, t0,
                            args.max_requests))
    total_s = time.monotonic() - t0
    loads.append((round(total_s, 1), os.getloadavg()))
    if not writers.done.wait(timeout=1800):
        writers.error = writers.error or "background work did not finish in time"
    stop.set()
    rec.poll()
    final_counts = space_counts(g)
    server.terminate()
    server.wait(timeout=60)
    slog.close()
    check = subprocess.run(galleria("check", str(g)), env=env(), capture_output=True,
                           text=True)
    aud = audit(rec, reqs)
    rec.stop()
    win = windows(reqs, writers)
    ok = [r for r in reqs if r["status"] == 200]
    ms = [m for _, m in rss]
    early = [m for t, m in rss if t <= 30] or ms[:1]
    late = [m for t, m in rss if t >= total_s - 30] or ms[-1:]
    slope = float(np.polyfit([t for t, _ in rss], ms, 1)[0] * 60) if len(rss) > 2 else None
    # after the new model is loaded (run 2 onwards): is memory flat while serving?
    t_steady = next((e["start"] for e in writers.timeline if e["name"] == "upgrade run 2"),
                    total_s)
    steady = [(t, m) for t, m in rss if t >= t_steady]
    steady_slope = float(np.polyfit([t for t, _ in steady], [m for _, m in steady], 1)[0] * 60) \
        if len(steady) > 2 else None
    info["load_average_at_end"] = os.getloadavg()
    payload = {
        "config": {k: getattr(args, k) for k in ("clients", "seconds", "baseline_seconds",
                                                 "hold_seconds", "tail_seconds", "gallery_size",
                                                 "added", "sample", "workers", "quick",
                                                 "writes", "deletes")},
        "old_model": OLD, "new_model": NEW, "machine": info,
        "total_s": round(total_s, 1), "requests": len(reqs),
        "qps_overall": round(len(ok) / total_s, 2), **percentiles([r["lat"] for r in ok]),
        "windows": win, "timeline": writers.timeline, "writers_error": writers.error,
        "audit": aud, "final_space_counts": final_counts,
        "expected_items": args.gallery_size + args.added - writers.deletes,
        "http_writes": None if args.writes != "http" else {
            "adds": writers.http["adds"], "deletes": writers.http["deletes"],
            "errors": len(writers.http["errors"]), "error_examples": writers.http["errors"][:5],
            **percentiles(writers.http["latencies"])},
        "check_after": {"rc": check.returncode, "out": check.stdout.strip()[-300:]},
        "server_rss_mb": {"samples": rss, "first_30s_mean": round(float(np.mean(early)), 1)
                          if early else None, "last_30s_mean": round(float(np.mean(late)), 1)
                          if late else None, "max": max(ms) if ms else None,
                          "slope_mb_per_min": None if slope is None else round(slope, 2),
                          "steady_from_s": t_steady, "steady_slope_mb_per_min":
                          None if steady_slope is None else round(steady_slope, 2),
                          "steady_min": min((m for _, m in steady), default=None),
                          "steady_max": max((m for _, m in steady), default=None)},
        "workdir": str(work),
    }
    name = args.name or ("service" + ("-http" if args.writes == "http" else "")
                         + ("_quick" if args.quick else ""))
    md = render_md(payload)
    jp, mp = write_results(name, payload, md, results_dir=Path(args.results_dir)
                           if args.results_dir else None)
    print(md)
    print(f"wrote {jp} and {mp}")
    bad = aud["errors"] or aud["results_missing_or_duplicated"] or aud["sampled_mismatches"] \
        or writers.error or check.returncode or sum(final_counts.values()) != \
        payload["expected_items"]
    return 1 if bad else 0


def render_md(p: dict[str, Any]) -> str:
    a, c, m = p["audit"], p["config"], p["server_rss_mb"]
    lines = [
        f"# Service under load: {c['clients']} clients for {p['total_s']:.0f} s "
        f"(SMVS {c['gallery_size']} real images, {p['old_model']} -> {p['new_model']} "
        f"upgrade, +{c['added']} Caltech-101 images, {c.get('deletes', 10)} removed"
        f"{' through the API' if c.get('writes') == 'http' else ''})", "",
        "Each window: which searcher answered (plain old model, backfill merge of both, "
        "plain new model) and which other processes were writing the gallery meanwhile. "
        "The backfill searcher runs both models per query (rank-merge).", "",
        md_table(p["windows"], [("searcher", "searcher"), ("background", "background work"),
                                ("seconds", "s"), ("requests", "requests"), ("qps", "q/s"),
                                ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"),
                                ("p99_ms", "p99 ms"), ("errors", "errors")]),
        f"Overall: {p['requests']} requests, {p['qps_overall']} q/s, p50 {p['p50_ms']} ms, "
        f"p99 {p['p99_ms']} ms.", "",
        "## Correctness", "",
        f"- responses with an error: **{a['errors']}**",
        f"- responses naming an item not committed at their generation, or one item twice: "
        f"**{a['results_missing_or_duplicated']}**",
        f"- sampled responses (1 in {c['sample']}, {a['sampled']}): "
        f"**{a['sampled_equal_brute_force']} equal** to the brute-force (merged) ranking of "
        f"their generation, {a['sampled_mismatches']} differ, {a['sampled_unverifiable']} "
        "unverifiable",
        f"- after the run: spaces {p['final_space_counts']} (expected "
        f"{p['expected_items']} items in the new space); `galleria check`: "
        f"{p['check_after']['out'].splitlines()[-1] if p['check_after']['out'] else '?'}",
        f"- background work: {'ok' if not p['writers_error'] else p['writers_error']}",
        *([f"- HTTP writes: {h['adds']} uploads and {h['deletes']} deletes acknowledged, "
           f"{h['errors']} errors; write latency p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms"]
          if (h := p.get("http_writes")) else []), "",
        "## Server memory (RSS)", "",
        f"first 30 s mean {m['first_30s_mean']} MB, last 30 s mean {m['last_30s_mean']} MB, "
        f"max {m['max']} MB; linear trend over the whole run {m['slope_mb_per_min']} MB/min "
        "(the new model is loaded when the upgrade starts, the old one released at finish); "
        f"from the second upgrade run on (t >= {m['steady_from_s']:.0f} s, both models "
        f"loaded, then one): {m['steady_min']}-{m['steady_max']} MB, trend "
        f"{m['steady_slope_mb_per_min']} MB/min.", "",
        "## Timeline (s since the load started)", "",
        md_table([{"name": e["name"], "start": e["start"], "end": e["end"]}
                  for e in p["timeline"]], [("name", "process"), ("start", "start"),
                                            ("end", "end")]),
        "## Machine", "", machine_md(p["machine"]),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
