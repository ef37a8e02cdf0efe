"""galleria demo: index a real image folder, answer queries, write an HTML page.

Runs anywhere (`make demo`): without ../shared it uses the photos that
scikit-image ships; with ../shared/datasets it also indexes the 100 clean
SMVS DVD-cover scans and searches them with the 400 phone photos of the same
covers (the mobile-query case), reporting Recall@1.

Both galleries hold local features (`--local sift`) next to the global model:
each part compares the global result with local-feature search (`local+mds`)
query by query on one HTML page, the right cover framed green (a wrong first
result red). The SMVS part uses 100 phone photos (one per cover) to stay quick.

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


def search_json(gallery: Path, queries: list[Path], k: int, pipeline: str) -> list[dict]:
    """``galleria search --json`` through the CLI (in-process) -> its JSON rows."""
    import contextlib
    import io

    from galleria.cli.main import main

    chosen = [] if pipeline == "default" else ["--pipeline", pipeline]  # default: the gallery's
    argv = ["search", str(gallery), *map(str, queries), "-k", str(k), *chosen, "--json",
            "--quiet"]
    print("$ galleria " + " ".join(argv[:2]) + f" ... ({len(queries)} queries) -k {k} "
          + " ".join(chosen) + " --json", flush=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code != 0:
        sys.exit("search failed")
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def compare(gallery: Path, queries: list[tuple[Path, str]], k: int, html: Path,
            pipelines: tuple[str, ...] = ("default", "global", "local", "local+mds"),
            shown: int = 6
            ) -> dict[str, float]:
    """Recall@1 of each pipeline (``default``: no ``--pipeline``, the gallery's tuned
    choice); an HTML page of the first ``shown`` queries with the
    pipelines side by side and the right result marked."""
    from galleria.search.html import write_pipelines_html
    from galleria.store.gallery import Gallery
    from galleria.types import SearchResult

    truth = {str(q): t for q, t in queries}
    recall, runs = {}, []
    with Gallery.open(gallery, readonly=True) as g:
        for pipeline in pipelines:
            rows = search_json(gallery, [q for q, _ in queries], k, pipeline)
            hits = [bool(r["results"]) and r["results"][0]["id"] == truth[r["query"]]
                    for r in rows]
            recall[pipeline] = float(np.mean(hits)) if hits else 0.0
            page = [r for r in rows if r["query"] in {str(q) for q, _ in queries[:shown]}]
            ids = np.array([[h["id"] for h in r["results"]] + [None] * (k - len(r["results"]))
                            for r in page], dtype=object)
            sc = np.array([[h["score"] for h in r["results"]] + [-np.inf] * (k - len(
                r["results"])) for r in page], dtype=np.float32)
            paths = [[(m or {}).get("path") for m in g.meta([i for i in row if i])]
                     + [None] * sum(i is None for i in row) for row in ids.tolist()]
            runs.append((f"{pipeline}  R@1 {100 * recall[pipeline]:.0f}%",
                         SearchResult(sc, ids), paths))
        qs = [r["query"] for r in page]
    write_pipelines_html(html, qs, runs, truth=[truth[q] for q in qs],
                         title=f"galleria: {gallery.name}, global vs local features")
    return recall


def _report(name: str, n: int, recall: dict[str, float], html: Path) -> None:
    parts = ", ".join(f"{p} {100 * r:.1f}%" for p, r in recall.items())
    print(f"{name}: {n} queries, Recall@1: {parts}  (page: {html})\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo-out", help="working folder (recreated)")
    ap.add_argument("--model", default="effnet-lite0")
    ap.add_argument("--smvs-queries", type=int, default=100,
                    help="phone photos searched in the SMVS part (one per cover; up to 400)")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    run(["models"])
    print("\n== 1. scikit-image sample photos (always available)")
    folder, pairs = skimage_photos(out)
    run(["index", str(folder), "--model", args.model, "--local", "sift",
         "--out", str(out / "photos.gallery"), "--quiet"])
    html = out / "photos-results.html"
    _report("photos", len(pairs), compare(out / "photos.gallery", pairs, 5, html), html)

    from galleria.eval.paths import datasets_root

    root = datasets_root(required=False)
    if root is None or not (root / "smvs_dvd_covers").is_dir():
        print("../shared/datasets not found: skipping the SMVS DVD-cover part "
              "(set GALLERIA_DATASETS to run it)")
        return
    print("== 2. SMVS DVD covers: 100 clean scans, queried by phone photos of the same covers")
    manifest, queries = smvs(root / "smvs_dvd_covers", out)
    run(["index", str(manifest), "--model", args.model, "--local", "sift",
         "--out", str(out / "smvs.gallery"), "--quiet"])
    by_cover: dict[str, list[tuple[Path, str]]] = {}
    for q, t in queries:
        by_cover.setdefault(t, []).append((q, t))
    subset = [qs[i % len(qs)] for i, qs in enumerate(by_cover.values())][: args.smvs_queries]
    html = out / "smvs-results.html"
    recall = compare(out / "smvs.gallery", subset, 5, html)
    _report("SMVS phone photo -> reference", len(subset), recall, html)


if __name__ == "__main__":
    main()
