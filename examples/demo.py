"""galleria demo: index a real image folder, answer queries, write an HTML page.

Runs anywhere (`make demo`): without ../shared it uses the photos that
scikit-image ships; with ../shared/datasets it also indexes the 100 clean
SMVS DVD-cover scans and searches them with the 400 phone photos of the same
covers (the mobile-query case), reporting Recall@1.

Every step is a `galleria` CLI command (run in-process), printed before it runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance


def run(argv: list[str]) -> int:
    from galleria.cli.main import main

    print("$ galleria " + " ".join(argv), flush=True)
    code = main(argv)
    if code != 0:
        sys.exit(f"command failed with exit code {code}")
    return code


def skimage_photos(out: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """Write scikit-image's sample photos and distorted copies (the queries)."""
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
             "immunohistochemistry", "retina", "colorwheel", "camera", "moon", "coins",
             "page", "horse", "brick", "grass", "gravel", "text", "clock", "checkerboard"]
    gallery, queries = out / "photos", out / "queries"
    for d in (gallery, queries):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pairs = []
    for name in names:
        try:
            arr = getattr(data, name)()
        except Exception:  # a sample that needs a download on this install
            continue
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        img = Image.fromarray(arr).convert("RGB")
        img.save(gallery / f"{name}.jpg", quality=92)
        # query: a random crop, slight rotation, brightness change
        w, h = img.size
        x0, y0 = int(rng.integers(0, w // 6)), int(rng.integers(0, h // 6))
        q = img.crop((x0, y0, x0 + int(w * 0.8), y0 + int(h * 0.8)))
        q = q.rotate(float(rng.uniform(-8, 8)), expand=False, fillcolor=(128, 128, 128))
        q = ImageEnhance.Brightness(q).enhance(float(rng.uniform(0.75, 1.25)))
        qp = queries / f"{name}-query.jpg"
        q.save(qp, quality=85)
        pairs.append((qp, f"{name}.jpg"))
    return gallery, pairs


def smvs(root: Path, out: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """Manifest of the 100 clean references; phone photos as queries."""
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    refs = [r for r in rows if r["device"] == "Reference"]
    manifest = out / "smvs-references.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "id", "group"])
        for r in refs:
            w.writerow([str(root / r["path"]), f"cover-{int(r['group']):03d}", r["group"]])
    queries = [(root / r["path"], f"cover-{int(r['group']):03d}")
               for r in rows if r["device"] != "Reference"]
    return manifest, queries


def recall_at_1(gallery: Path, queries: list[tuple[Path, str]], k: int, html: Path) -> float:
    """Search all queries through the CLI (JSON output) and compute Recall@1; write an
    HTML page of the first 4 queries."""
    import contextlib
    import io

    run(["search", str(gallery), *[str(q) for q, _ in queries[:4]], "-k", str(k),
         "--html", str(html), "--quiet"])
    buf = io.StringIO()
    argv = ["search", str(gallery), *[str(q) for q, _ in queries], "-k", str(k), "--json",
            "--quiet"]
    print("$ galleria " + " ".join(argv[:3]) + f" ... ({len(queries)} queries) -k {k} --json",
          flush=True)
    from galleria.cli.main import main

    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code != 0:
        sys.exit("search failed")
    results = json.loads(buf.getvalue())
    truth = {str(q): t for q, t in queries}
    hits = [r["results"][0]["id"] == truth[r["query"]] for r in results if r["results"]]
    return float(np.mean(hits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo-out", help="working folder (recreated)")
    ap.add_argument("--model", default="effnet-lite0")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    run(["models"])
    print("\n== 1. scikit-image sample photos (always available)")
    folder, pairs = skimage_photos(out)
    run(["index", str(folder), "--model", args.model, "--out", str(out / "photos.gallery"),
         "--quiet"])
    r1 = recall_at_1(out / "photos.gallery", pairs, 5, out / "photos-results.html")
    print(f"photos: {len(pairs)} distorted queries, Recall@1 = {100 * r1:.1f}%  "
          f"(page: {out / 'photos-results.html'})\n")

    from galleria.eval.paths import datasets_root

    root = datasets_root(required=False)
    if root is None or not (root / "smvs_dvd_covers").is_dir():
        print("../shared/datasets not found: skipping the SMVS DVD-cover part "
              "(set GALLERIA_DATASETS to run it)")
        return
    print("== 2. SMVS DVD covers: 100 clean scans, queried by 400 phone photos")
    manifest, queries = smvs(root / "smvs_dvd_covers", out)
    run(["index", str(manifest), "--model", args.model, "--out", str(out / "smvs.gallery"),
         "--quiet"])
    r1 = recall_at_1(out / "smvs.gallery", queries[:400], 5, out / "smvs-results.html")
    print(f"SMVS phone photo -> reference, Recall@1 = {100 * r1:.1f}%  "
          f"(page: {out / 'smvs-results.html'})")
    run(["eval", "--dataset", "ukbench56", "--model", args.model, "--quiet"])


if __name__ == "__main__":
    main()
