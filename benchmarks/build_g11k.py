"""Build the 11.4k all-images gallery with the default ``galleria index`` recipe (issue 18).

Every real image under ``$GALLERIA_DATASETS`` (all shared data sets, the same list
as ``_local_cost.all_images``) is written to a CSV manifest (id = the path relative
to the data root), then indexed by the CLI as a user would::

    galleria index MANIFEST --out OUT --model effnet-lite0 --local sift \\
        --threads 1 --workers 1 --no-tune --json

(``--no-tune``: the tuner is timed on this gallery separately.) The CLI job is
resumable: re-running this script after a kill continues where the last commit left
off (``already there``). Wall time, the CLI's JSON report and the load are appended
to ``OUT.build.json`` beside the gallery, one record per run (a resumed build has
several). Run from the repository root, nice'd, one thread::

    nice -n 10 env OMP_NUM_THREADS=1 GALLERIA_DATASETS=../shared/datasets \\
        .venv/bin/python benchmarks/build_g11k.py --out /work/scratch/g11k

The gallery is kept outside the repository (several GB of local features).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _local_cost import all_images
from galleria.eval.paths import datasets_root


def write_manifest(path: Path) -> int:
    """The manifest of every real image (sorted, as ``all_images``); returns its rows."""
    root = datasets_root()
    assert root is not None, "set GALLERIA_DATASETS"
    paths = all_images()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path"])
        for p in paths:
            w.writerow([p.relative_to(root).as_posix(), str(p.resolve())])
    os.replace(tmp, path)
    return len(paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/work/scratch/g11k")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="index at most N new images")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = out.parent / f"{out.name}-manifest.csv"
    n = write_manifest(manifest)
    cli = Path(sys.executable).parent / "galleria"
    cmd = [str(cli), "index", str(manifest), "--out", str(out), "--model", "effnet-lite0",
           "--local", "sift", "--threads", str(args.threads), "--workers", str(args.workers),
           "--no-tune", "--json", "--quiet"]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    print(" ".join(cmd), flush=True)
    load0 = os.getloadavg()
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    rec = {"images": n, "command": cmd, "returncode": proc.returncode,
           "wall_s": round(time.time() - t0, 1), "load_start": load0,
           "load_end": os.getloadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%S",
                                                                 time.gmtime(t0))}
    try:
        rec["report"] = json.loads(proc.stdout)
    except ValueError:
        rec["stdout"] = proc.stdout[-4000:]
    log = out.parent / f"{out.name}.build.json"
    runs = json.loads(log.read_text()) if log.is_file() else []
    log.write_text(json.dumps([*runs, rec], indent=1))
    print(json.dumps({k: v for k, v in rec.items() if k != "report"}), flush=True)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
