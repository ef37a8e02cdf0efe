"""The kill matrix: every command that writes a gallery, SIGKILLed at seeded points, then
run again; counts of lost, duplicated and wrong items (target 0 everywhere).

For each command (tests/_killmatrix.py) a clean run gives the reference gallery and
the number of kill points (commits and file replacements/deletions of the process,
counted by tests/_faults.py). Then, for up to ``--points`` seeded points, a fresh
copy of the start state is killed at that point (a real SIGKILL of the real
process), audited (does ``galleria check`` call it sound while an item has no data,
wrong data or sits in two spaces?), the same command runs again, and the gallery is
compared with the reference: every item present exactly once with the reference's
data (the clean run's extraction).

Images: real SMVS DVD-cover photos (re-encoded losslessly as PNG under neutral
names) by default, or ``--synthetic`` seeded random images. Models: the tiny test
projections for most rows (they make every row fast; the store's code paths do not
depend on the model), real effnet-lite0 / lite2 / a fusion of two effnet-lite0
members for the rows that say so.

    nice -n 10 .venv/bin/python benchmarks/bench_faults.py            # every row
    .venv/bin/python benchmarks/bench_faults.py --quick               # 3 points, fast rows

Writes ``benchmarks/results/faults.{json,md}`` (``faults_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(HERE)]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GALLERIA_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import _common  # noqa: E402
import _killmatrix as km  # noqa: E402
from galleria.eval.paths import datasets_root  # noqa: E402


def real_images(dst: Path, n: int) -> Path:
    """``n`` SMVS photos (every 5th row: covers and phone photos alike) as PNGs named
    ``s000.png``... (the matrix's ids)."""
    root = datasets_root(required=True) / "smvs_dvd_covers"
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    dst.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows[::5][:n]):
        with Image.open(root / row["path"]) as im:
            im.convert("RGB").save(dst / f"s{i:03d}.png")
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=24, help="images in each start state")
    ap.add_argument("--points", type=int, default=12,
                    help="kill points per command (all of them when it has fewer)")
    ap.add_argument("--slow-points", type=int, default=4,
                    help="kill points of the real-model rows (each point embeds twice)")
    ap.add_argument("--scenarios", nargs="*", default=None, help="rows to run (names)")
    ap.add_argument("--synthetic", action="store_true", help="seeded random images")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 points, no real-model rows")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--resume", default=None, metavar="JSONL",
                    help="rows already measured (the run appends each command's row and "
                         "points to this file; the commands it holds are not run again)")
    args = ap.parse_args(argv)
    if args.quick:
        args.points = args.slow_points = min(args.points, 3)
    names = args.scenarios or [n for n, s in km.SCENARIOS.items()
                               if not (args.quick and s.slow)]
    info = _common.machine_info(threads=1)
    work = Path(args.work or tempfile.mkdtemp(prefix="galleria-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    images = (km.synthetic_images(work / "imgs", args.n) if args.synthetic
              else real_images(work / "imgs", args.n))
    cache = work / "cache"
    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    done_before: set[str] = set()
    if args.resume and Path(args.resume).exists():
        for line in Path(args.resume).read_text().splitlines():
            rec = json.loads(line)
            (rows if "tried" in rec or "skipped" in rec else details).append(rec)
            if "tried" in rec:
                done_before.add(rec["command"])
    try:
        for name in names:
            if name in done_before:
                continue
            sc = km.SCENARIOS[name]
            why = sc.available()
            if why is not None:
                rows.append({"command": name, "model": km.MODELS[name], "skipped": why})
                print(f"{name}: skipped ({why})", flush=True)
                continue
            t = time.perf_counter()
            ref = km.reference(sc, work / "ref", images, cache, in_process=not sc.http)
            shutil.rmtree(work / "ref", ignore_errors=True)
            points = km.seeded_points(ref.points, args.slow_points if sc.slow else args.points,
                                      args.seed)
            res = []
            for p in points:
                r = km.run_point(sc, p, work / "k", images, cache, ref, in_process=not sc.http)
                shutil.rmtree(work / "k", ignore_errors=True)
                res.append(r)
                details.append({
                    "command": name, "point": p, "killed": r.killed, "ok": r.ok,
                    "after_kill": vars(r.after_kill), "final": vars(r.final),
                    "failures": r.failures, "seconds": round(r.seconds, 2)})
                print(f"  {name} @{p}: killed={r.killed} ok={r.ok} after={r.after_kill} "
                      f"final={r.final} {r.failures}", flush=True)
            n_items = len({i for sp in ref.ref.values() for i in sp})
            rows.append({
                "command": name, "model": km.MODELS[name], "items": n_items,
                "points": ref.points, "tried": len(res),
                "killed": sum(r.killed for r in res),
                "lost": sum(r.final.lost for r in res),
                "duplicated": sum(r.final.duplicated for r in res),
                "wrong": sum(r.final.wrong for r in res),
                "dishonest_check": sum(not r.honest for r in res),
                "mid_state_wrong": sum(r.after_kill.wrong + r.after_kill.duplicated
                                       for r in res),
                "rerun_failed": sum(bool(r.failures) for r in res),
                "all_ok": all(r.ok for r in res),
                "seconds": round(time.perf_counter() - t, 1)})
            print(rows[-1], flush=True)
            if args.resume:
                with open(args.resume, "a") as fh:
                    for d in details:
                        if d["command"] == name:
                            fh.write(json.dumps(d) + "\n")
                    fh.write(json.dumps(rows[-1]) + "\n")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    info["load_average_at_end"] = os.getloadavg()
    cols = [("command", "command"), ("model", "model(s)"), ("items", "items"),
            ("points", "kill points"), ("tried", "tried"), ("killed", "killed"),
            ("lost", "lost"), ("duplicated", "duplicated"), ("wrong", "wrong"),
            ("dishonest_check", "`check` sound but not"),
            ("mid_state_wrong", "bad state after kill"), ("rerun_failed", "re-run failed"),
            ("seconds", "s")]
    order = {n: i for i, n in enumerate(km.SCENARIOS)}
    rows.sort(key=lambda r: order.get(r["command"], 99))
    done = [r for r in rows if "skipped" not in r]
    md = [f"# Kill matrix ({'synthetic' if args.synthetic else 'real SMVS'} images, "
          f"{args.n} per start state)\n",
          "Every command killed with SIGKILL at seeded points (commits and file "
          "operations of its process), then run again. *lost / duplicated / wrong*: items "
          "of the clean run's gallery missing, held in two spaces, or with other data "
          "after the re-run (summed over the points); *`check` sound but not*: points "
          "where `galleria check` called the killed gallery sound while an item had no "
          "data, wrong data or two spaces; *bad state after kill*: entries matching "
          "neither the start nor the clean run right after the kill.\n",
          _common.md_table(done, cols)]
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        md.append("\nNot run: " + "; ".join(f"`{r['command']}` ({r['skipped']})"
                                            for r in skipped) + "\n")
    total = sum(r["tried"] for r in done)
    bad = sum(not r["all_ok"] for r in done)
    md.append(f"\n{total} kill points in {len(done)} commands; commands with any failure: "
              f"{bad}.\n\nCommand: `nice -n 10 .venv/bin/python benchmarks/bench_faults.py"
              f"{' --quick' if args.quick else ''}`\n\n## Machine\n\n" + _common.machine_md(info))
    name = "faults_quick" if args.quick else "faults"
    payload = {"args": vars(args), "machine": info, "rows": rows, "points": details}
    j, m = _common.write_results(name, payload, "\n".join(md))
    print(f"wrote {j} and {m}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
