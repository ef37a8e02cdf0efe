"""Build the generic visual-word codebook galleria ships (src/galleria/local/codebooks/).

Images: every image (train and test split) of the 50 *seen* Caltech-101 classes of
the fixed seed-0 class split (:func:`variants.caltech_class_split`, the split the
fusion benchmark trains on). Why these: they are real, varied photos (objects,
scenes, drawings) unrelated to the instance-retrieval sets the local search is
measured on (SMVS, rparis250, UKBench, Oxford affine), and the other 51 classes stay
unseen, so the Caltech-101 row of the local benchmark is measured on classes the
codebook never saw (caltech101-unseen).

Descriptors: galleria's ``sift`` extractor (RootSIFT, at most 1,000 keypoints, the
task feature cache of ``galleria.eval.local_features``), a seeded uniform sample of
``words x points_per_word`` of them; FAISS k-means (``iters`` iterations, seed 0) at
one thread, centroids stored as float16.

    python benchmarks/build_codebook.py          # writes src/galleria/local/codebooks/sift-v1
    python benchmarks/build_codebook.py --check  # rebuilds in a temp folder, compares

Bit-for-bit: the sample and the k-means are seeded and run at 1 thread, so the same
numpy / FAISS / OpenCV versions give the same bytes (``--check`` verifies it); another
BLAS or CPU may round a distance differently and move a near-tie assignment, giving
a different (equally good) codebook: a new fingerprint, refused by old indexes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from galleria.eval.datasets import load_task
from galleria.eval.local_features import task_local_features
from galleria.extractors.registry import create_extractor
from galleria.local.asmk import sample_descriptors
from galleria.local.codebook import (
    SHIPPED_DIR,
    Codebook,
    load_codebook,
    save_codebook,
    train_codebook,
)
from galleria.threads import set_threads
from variants import caltech_class_split


def seen_class_features(local: str) -> tuple[list, dict]:
    """LocalFeatures of every image of the seen Caltech-101 classes, and a description."""
    task = load_task("caltech101")
    ext = create_extractor(local)
    packed, g_rows, q_rows = task_local_features(task, ext, workers=2)
    seen, _ = caltech_class_split()
    keep = set(seen)
    rows = [int(r) for r, lab in zip(g_rows, task.gallery_labels, strict=True) if lab in keep]
    rows += [int(r) for r, lab in zip(q_rows, task.query_labels, strict=True) if lab in keep]
    rows = sorted(set(rows))
    feats = [packed[r] for r in rows]
    return feats, {"images": len(feats), "descriptors": int(sum(len(f) for f in feats)),
                   "source": "Caltech-101, the 50 seen classes of the seed-0 class split "
                             "(train + test images)", "classes": seen,
                   "extractor_fingerprint": ext.fingerprint}


def build(local: str, name: str, words: int, points_per_word: int, iters: int,
          seed: int, threads: int) -> Codebook:
    feats, info = seen_class_features(local)
    t0 = time.perf_counter()
    x = sample_descriptors(feats, words * points_per_word, seed=seed)
    c = train_codebook(x, words, seed=seed, iters=iters)
    info.update({"words": words, "points_per_word": points_per_word, "sample": int(x.shape[0]),
                 "kmeans_iters": iters, "seed": seed, "threads": threads,
                 "command": f"python benchmarks/build_codebook.py --local {local} --name {name} "
                            f"--words {words} --points-per-word {points_per_word} "
                            f"--iters {iters} --threads {threads}"})
    info["train_seconds"] = round(time.perf_counter() - t0, 1)
    return Codebook.from_float(name, local, c, info)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local", default="sift")
    ap.add_argument("--name", default="sift-v1")
    ap.add_argument("--words", type=int, default=16384)
    ap.add_argument("--points-per-word", type=int, default=24)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder (default: the shipped location)")
    ap.add_argument("--check", action="store_true",
                    help="rebuild into a temporary folder and compare with the shipped one")
    args = ap.parse_args()
    set_threads(args.threads)  # bit-for-bit at a given thread count (see --check)
    t0 = time.perf_counter()
    cb = build(args.local, args.name, args.words, args.points_per_word, args.iters, args.seed,
               args.threads)
    if args.check:
        shipped = load_codebook(SHIPPED_DIR / args.name)
        with tempfile.TemporaryDirectory() as tmp:
            save_codebook(tmp, cb)
            same = load_codebook(tmp).fingerprint == shipped.fingerprint
        print(json.dumps({"rebuilt": cb.fingerprint, "shipped": shipped.fingerprint,
                          "identical": same}))
        raise SystemExit(0 if same else 1)
    out = Path(args.out) if args.out else SHIPPED_DIR / args.name
    save_codebook(out, cb)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(json.dumps({"fingerprint": cb.fingerprint, "folder": str(out), "bytes": size,
                      "seconds": round(time.perf_counter() - t0, 1),
                      "load_average": os.getloadavg(),
                      **{k: v for k, v in cb.info.items() if k != "classes"}}, indent=1))


if __name__ == "__main__":
    main()
