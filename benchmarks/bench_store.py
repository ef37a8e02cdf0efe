"""Store v2 figures: search bookkeeping on a 300k-item gallery, the integrity table,
and readers during `galleria index`.

    .venv/bin/python benchmarks/bench_store.py                    # all three parts
    .venv/bin/python benchmarks/bench_store.py --parts bookkeeping --n 300000

Bookkeeping: one query at a time through ``Gallery.search`` (generation check,
view, id mapping, validation) against the index searched directly, on the same
view; the v1 store ran ``COUNT(*)`` over the space's vectors on every search,
timed here on the same gallery as the baseline. Vectors are synthetic
(seeded Gaussian, L2-normalised) and labelled so.

Integrity: each fault is made on a small gallery of real photos (scikit-image's
samples + seeded synthetic ones, embedded with a tiny deterministic extractor
registered from tests/_tiny.py), then `check`, a search and `repair` are run; the
table quotes their messages and whether search after repair equals search on the
undamaged gallery.

Readers: `galleria index --batch-size 1 --commit-every 1` of 500 SMVS images while a
fresh-reader process and a long-lived Searcher search in loops (needs ../shared).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import _common as C

ROOT = Path(__file__).parent.parent


def bookkeeping(n: int, dims: list[int], queries: int) -> list[dict[str, Any]]:
    rows = []
    for d in dims:
        rows.append(_bookkeeping_one(n, d, queries))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _bookkeeping_one(n: int, d: int, queries: int) -> dict[str, Any]:
    from galleria.store.gallery import Gallery

    tmp = Path(tempfile.mkdtemp(prefix="galleria-bench-store-"))
    try:
        g = Gallery.create(tmp / "g")
        rng = np.random.default_rng(0)
        sp = f"synthetic-{d}@bench"
        t0 = time.perf_counter()
        for s in range(0, n, 20_000):
            m = min(20_000, n - s)
            x = rng.standard_normal((m, d)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            g.add([f"item-{s + i:07d}" for i in range(m)], x, space=sp)
        add_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        g.save_index(sp)
        save_s = time.perf_counter() - t0
        g.close()
        g = Gallery.open(tmp / "g")
        t0 = time.perf_counter()
        view = g.view(sp)
        open_s = time.perf_counter() - t0
        qs = rng.standard_normal((queries, d)).astype(np.float32)
        qs /= np.linalg.norm(qs, axis=1, keepdims=True)
        for q in qs[:20]:  # warm
            g.search(q[None], 10, fingerprint=sp)
            view.base.search(q[None], 10)
        times: dict[str, list[float]] = {"gallery": [], "index": [], "count": []}
        for q in qs:  # interleaved, one query at a time
            t = time.perf_counter()
            g.search(q[None], 10, fingerprint=sp)
            times["gallery"].append(time.perf_counter() - t)
            t = time.perf_counter()
            view.base.search(q[None], 10)
            times["index"].append(time.perf_counter() - t)
            t = time.perf_counter()
            g.db.one("SELECT COUNT(*) FROM vectors WHERE space=?", (sp,))
            times["count"].append(time.perf_counter() - t)
        med = {k: float(np.median(v)) * 1e6 for k, v in times.items()}
        row = {
            "n": n, "dim": d, "data": "synthetic", "add_s": round(add_s, 2),
            "save_index_s": round(save_s, 2), "open_view_s": round(open_s, 2),
            "us_gallery_search": round(med["gallery"], 1),
            "us_index_search": round(med["index"], 1),
            "us_bookkeeping": round(med["gallery"] - med["index"], 1),
            "bookkeeping_pct": round(100 * (med["gallery"] - med["index"]) / med["gallery"],
                                     2),
            "us_v1_count_per_search": round(med["count"], 1),
            "v1_count_pct_of_search": round(100 * med["count"] / (med["gallery"]
                                                                   + med["count"]), 1),
        }
        g.close()
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ integrity
def _photos(root: Path) -> Path:
    from PIL import Image
    from skimage import data

    d = root / "imgs"
    d.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina"):
        Image.fromarray(getattr(data, name)()).save(d / f"{name}.jpg", quality=92)
    rng = np.random.default_rng(5)
    for i in range(18):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(d / f"s{i}.png")
    return d


def _search_ids(path: Path) -> tuple[list[list[str]], np.ndarray]:
    from galleria.store.gallery import Gallery

    q = np.random.default_rng(1).standard_normal((4, 12)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    with Gallery.open(path) as g:
        r = g.search(q, 10, space=g.primary_space)
    return r.ids.tolist(), r.scores


def _try(fn: Any) -> str:
    try:
        out = fn()
        return "ok" if out is None else str(out)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


FAULTS = ["segment deleted", "segment truncated", "segment values altered",
          "index snapshot altered", "database garbage", "database empty", "database deleted",
          "disk full (400 KB tmpfs)"]


def integrity() -> list[dict[str, Any]]:
    rows = []
    for fault in FAULTS:
        tmp = Path(tempfile.mkdtemp(prefix="galleria-integrity-"))
        try:
            row = _disk_full(tmp) if fault.startswith("disk full") else _fault(tmp, fault)
            rows.append({"fault": fault, **{k: (v.replace(str(tmp), "T") if isinstance(v, str)
                                                else v) for k, v in row.items()}})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _damage(out: Path, fault: str) -> int | None:
    from galleria.store.gallery import Gallery

    with Gallery.open(out) as g:
        seg, n = g.db.one("SELECT file, n FROM segments ORDER BY segment LIMIT 1")
        folder, files = g.db.one("SELECT folder, files FROM index_snapshots")
    seg_p = out / seg
    if fault == "segment deleted":
        seg_p.unlink()
    elif fault == "segment truncated":
        with open(seg_p, "r+b") as fh:
            fh.truncate(seg_p.stat().st_size - 40)
    elif fault == "segment values altered":
        b = bytearray(seg_p.read_bytes())
        b[-20:] = b"\x7f" * 20
        seg_p.write_bytes(bytes(b))
    elif fault == "index snapshot altered":
        f = out / folder / sorted(json.loads(files))[-1]
        b = bytearray(f.read_bytes())
        b[-8:] = b"\x00\x00\x80\x7f" * 2
        f.write_bytes(bytes(b))
    else:
        db = out / "gallery.sqlite"
        for sfx in ("-wal", "-shm"):
            Path(f"{db}{sfx}").unlink(missing_ok=True)
        if fault == "database garbage":
            db.write_bytes(b"not a database" * 100)
        elif fault == "database empty":
            db.write_bytes(b"")
        else:
            db.unlink()
    return int(n) if fault.startswith("segment") else None


def _check(out: Path) -> str:
    from galleria.store.gallery import Gallery

    with Gallery.open(out) as g:
        rep = g.check()
    if rep.ok:
        return "sound"
    return "; ".join(f"{p.what} {Path(p.path).name}: {p.problem}"
                     + (f" ({p.n_items} items)" if p.n_items else "") for p in rep.problems)


def _repair(out: Path) -> str:
    from galleria.extract.repair import repair
    from galleria.store.gallery import Gallery
    from galleria.store.integrity import restore_database

    msg = restore_database(out) or ""
    with Gallery.open(out) as g:
        rep = repair(g)
        ok = g.check().ok
    parts = [msg.split(";")[0]] if msg else []
    if rep.reembedded:
        parts.append(f"re-embedded {sum(rep.reembedded.values())} items")
    if rep.dropped_snapshots:
        parts.append("dropped the damaged snapshot")
    parts.append(f"rebuilt {len(rep.rebuilt_indexes)} index(es); {'sound' if ok else 'NOT sound'}")
    return "; ".join(parts)


def _fault(tmp: Path, fault: str) -> dict[str, Any]:
    import _tiny
    from galleria.extract.job import index_images
    from galleria.store.gallery import Gallery

    imgs = _photos(tmp)
    out = tmp / "g"
    index_images(imgs, out, extractor=_tiny.tiny(1), flush_every=5)
    want = _search_ids(out)[0]
    n = _damage(out, fault)
    chk = _try(lambda: _check(out))
    if fault.startswith("segment"):  # make the reader build from the store, not the snapshot
        with Gallery.open(out) as g, g.db.write() as c:
            c.execute("DELETE FROM index_snapshots")
    srch = _try(lambda: "correct results" if _search_ids(out)[0] == want else "WRONG results")
    rep = _try(lambda: _repair(out))
    after = _try(lambda: "equal to undamaged" if _search_ids(out)[0] == want else "DIFFERENT")
    return {"check": chk, "search": srch, "repair": rep, "search_after_repair": after,
            "items_in_damaged_file": n}


def _disk_full(tmp: Path) -> dict[str, Any]:
    """`index_images` into a gallery on a 400 KB tmpfs (needs root to mount)."""
    import gc

    import _tiny
    from galleria.extract.job import index_images
    from galleria.store.gallery import Gallery

    if os.geteuid() != 0:
        return {"check": "skipped: mounting a tmpfs needs root"}
    mnt = tmp / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        return {"check": f"skipped: {r.stderr.strip()}"}
    try:
        from PIL import Image

        many = tmp / "many"
        many.mkdir()
        rng = np.random.default_rng(9)
        for i in range(300):
            Image.fromarray((rng.random((9, 9, 3)) * 255).astype(np.uint8)).save(
                many / f"{i:03d}.png")
        out = mnt / "g"
        err = _try(lambda: index_images(many, out, extractor=_tiny.tiny(1, dim=64),
                                        flush_every=10))
        gc.collect()
        with Gallery.open(out) as g:
            kept = g.count() if g.primary_space else 0
        chk = _try(lambda: _check(out))
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        rep = index_images(many, out, extractor=_tiny.tiny(1, dim=64), flush_every=10)
        with Gallery.open(out) as g:
            final = g.count()
        return {"check": chk, "search": f"index: {err.split(':', 1)[0]}; {kept} items committed",
                "repair": f"after freeing space the same command: {rep.already_done} there, "
                          f"{rep.embedded} embedded",
                "search_after_repair": f"{final} of 300 items, check {_check(out)}",
                "error": err}
    finally:
        gc.collect()
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def readers(seconds: float) -> dict[str, Any]:
    """The SMVS readers-during-index scenario of tests/test_store_concurrency.py, counted."""
    from galleria.eval.paths import datasets_root

    root = datasets_root(required=False)
    if root is None or not (root / "smvs_dvd_covers").is_dir():
        return {"skipped": "../shared/datasets/smvs_dvd_covers is missing"}
    sys.path.insert(0, str(ROOT / "tests"))
    import test_store_concurrency as T

    tmp = Path(tempfile.mkdtemp(prefix="galleria-readers-"))
    try:
        imgs = sorted((root / "smvs_dvd_covers").rglob("*.jpg"))[:500]
        src = tmp / "src"
        src.mkdir()
        for n, p in enumerate(imgs):
            (src / f"{n:03d}-{p.name}").symlink_to(p)
        out = tmp / "g"
        env = T._env()
        t0 = time.perf_counter()
        idx = subprocess.Popen([sys.executable, "-m", "galleria.cli.main", "index", str(src),
                                "--out", str(out), "--batch-size", "1", "--commit-every", "1",
                                "-q", "--threads", "1"], env=env, stderr=subprocess.PIPE,
                               text=True)
        procs = []
        for mode in ("fresh", "long"):
            res = tmp / f"{mode}.json"
            procs.append((mode, res, subprocess.Popen(
                [sys.executable, "-c", T.READER, str(out), mode, str(seconds), str(res)],
                env=env)))
        idx.communicate(timeout=seconds)
        index_s = time.perf_counter() - t0
        time.sleep(1.0)
        for _, res, _ in procs:
            Path(str(res) + ".stop").write_text("stop")
        out_rows: dict[str, Any] = {"index_exit": idx.returncode, "index_s": round(index_s, 1),
                                    "images": len(imgs)}
        for mode, res, p in procs:
            p.wait(timeout=60)
            rows = json.loads(res.read_text())
            errors = [r for r in rows if r[0] == "error"]
            ok = [r for r in rows if r[0] != "error"]
            cov = [c for _, c in ok]
            out_rows[mode] = {
                "searches": len(rows), "errors": len(errors),
                "below_committed_before": sum(1 for b, c in ok if c < b),
                "coverage_decreases": sum(1 for a, b in itertools.pairwise(cov) if b < a),
                "last_search_covered": cov[-1] if cov else None,
            }
        return out_rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", default="bookkeeping,integrity,readers")
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--dims", default="128,1280")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reader-seconds", type=float, default=600)
    args = ap.parse_args()
    C.set_threads(args.threads)
    info = C.machine_info(args.threads)
    parts = args.parts.split(",")
    payload: dict[str, Any] = {"machine": info, "args": vars(args)}
    md = ["# Store v2 (`bench_store.py`)\n", C.machine_md(info)]
    if "bookkeeping" in parts:
        rows = bookkeeping(args.n, [int(d) for d in args.dims.split(",")], args.queries)
        payload["bookkeeping"] = rows
        md.append(f"\n## Search bookkeeping, one query at a time, k = 10 (synthetic vectors)\n\n"
                  f"median over {args.queries} queries, interleaved\n\n")
        md.append(C.md_table(rows, [("n", "items"), ("dim", "D"), ("data", "data"),
                                    ("us_gallery_search", "Gallery.search us"),
                                    ("us_index_search", "index alone us"),
                                    ("us_bookkeeping", "bookkeeping us"),
                                    ("bookkeeping_pct", "bookkeeping %"),
                                    ("us_v1_count_per_search", "v1 per-search COUNT us"),
                                    ("v1_count_pct_of_search", "v1 COUNT % of search")]))
    if "integrity" in parts:
        rows = integrity()
        payload["integrity"] = rows
        md.append("\n## Integrity: what check, search and repair say\n\n")
        md.append(C.md_table(rows, [("fault", "fault"), ("check", "`galleria check`"),
                                    ("search", "search (fresh reader)"),
                                    ("repair", "`galleria repair`"),
                                    ("search_after_repair", "search after repair")]))
    if "readers" in parts:
        r = readers(args.reader_seconds)
        payload["readers"] = r
        md.append("\n## Readers during `galleria index --batch-size 1 --commit-every 1` "
                  "(500 real SMVS images)\n\n")
        if "skipped" in r:
            md.append(f"skipped: {r['skipped']}\n")
        else:
            md.append(f"index: exit {r['index_exit']}, {r['index_s']} s\n\n")
            md.append(C.md_table([{"reader": m, **r[m]} for m in ("fresh", "long")],
                                 [("reader", "reader"), ("searches", "searches"),
                                  ("errors", "errors"),
                                  ("below_committed_before", "below what was committed"),
                                  ("coverage_decreases", "coverage decreases"),
                                  ("last_search_covered", "last search covered")]))
    info["load_average_at_end"] = os.getloadavg()
    C.write_results("store", payload, "".join(md))


if __name__ == "__main__":
    main()
