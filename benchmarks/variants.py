"""Variant evaluation sets built by script from ../shared (seeded): galleries nobody tuned on.

The issue's failure case was a product gallery of ~30 small clean images
(~200 px) queried by phone photos. The same shape is rebuilt from SMVS DVD
covers: a seeded sample of covers, their clean ``Reference`` scans downscaled so
the longer side is ``ref_side`` px (the gallery), and the phone photos of those
covers as queries (all four devices, or one). Optionally the gallery gets
distractor images from Caltech-101 classes that no trained part of galleria saw
(the 51 evaluation classes of :func:`caltech_class_split`), and the queries can
be downscaled too.

API (other benchmarks may import it)::

    from variants import VARIANTS, load_variant, smvs_variant
    task = load_variant("smvs200-30")          # a galleria.eval.datasets.RetrievalTask
    task = smvs_variant(30, ref_side=200, devices=("Canon",), seed=0)
    VARIANTS                                   # name -> keyword arguments of smvs_variant

Downscaled images are written once (PNG, lossless, so every run reads the same
pixels) under ``$GALLERIA_CACHE/variants/``; the task's gallery and query paths
are absolute. Queries are labelled by cover id (protocol ``instance``), so
``task.evaluate`` gives R@1 / mAP; :func:`query_devices` names each query's
device for a per-device breakdown.

Run ``python benchmarks/variants.py`` to build (and list) every named variant.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from galleria.cache import cache_dir
from galleria.eval.datasets import RetrievalTask, load_task
from galleria.eval.paths import dataset_dir
from galleria.io.atomic import atomic_open

DEVICES = ("Canon", "Droid", "E63", "Palm")
#: Caltech-101 class split shared with the codebook build: seed 0, the first 50 permuted
#: classes are "seen" (codebook training); the other 51 are never trained on.
CLASS_SPLIT_SEED = 0

VARIANTS: dict[str, dict] = {
    # the shape: ~30 clean covers at ~200 px, phone photos as queries
    "smvs200-30": {"covers": 30, "ref_side": 200},
    "smvs200-100": {"covers": 100, "ref_side": 200},
    # 500 images: 100 covers at 200 px + 400 unrelated distractors
    "smvs200-100+d400": {"covers": 100, "ref_side": 200, "distractors": 400},
    # small references AND small phone photos (the queries were 348 px)
    "smvs200-30-q350": {"covers": 30, "ref_side": 200, "query_side": 350},
}


def caltech_class_split(seed: int = CLASS_SPLIT_SEED) -> tuple[list[str], list[str]]:
    """``(seen classes (50), unseen classes (51))`` of Caltech-101 (BACKGROUND_Google out).

    The same permutation as the fusion benchmark's training split (seed 0).
    """
    t = load_task("caltech101")
    classes = np.unique(np.concatenate([t.gallery_labels, t.query_labels]))
    perm = np.random.default_rng(seed).permutation(classes)
    return sorted(perm[:50].tolist()), sorted(perm[50:].tolist())


def _manifest(name: str) -> tuple[Path, list[dict[str, str]]]:
    folder = dataset_dir(name)
    with open(folder / "manifest.csv", newline="") as f:
        return folder, list(csv.DictReader(f))


def downscaled(src: Path, side: int, tag: str) -> Path:
    """``src`` resized (Lanczos) so its longer side is ``side`` px, as a cached PNG."""
    out = cache_dir("variants", f"{tag}-{side}") / (src.stem + ".png")
    if out.is_file():
        return out
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = side / max(w, h)
        if s < 1:
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
        with atomic_open(out, "wb") as f:
            im.save(f, format="PNG", optimize=False)
    return out


def smvs_variant(covers: int, *, ref_side: int = 200, query_side: int | None = None,
                 distractors: int = 0, devices: Sequence[str] = DEVICES, seed: int = 0,
                 name: str | None = None) -> RetrievalTask:
    """SMVS phone photos against ``covers`` clean references downscaled to ``ref_side`` px.

    Args:
        covers: covers in the gallery (a seeded sample of the 100).
        ref_side: longer side of the gallery references (px).
        query_side: downscale the phone photos too (``None``: as shipped, 640 px).
        distractors: Caltech-101 images of the unseen classes added to the gallery
            (label ``-1``: never a true match); a seeded sample.
        devices: phone models whose photos are the queries.
        seed: the cover and distractor sample.
    """
    folder, rows = _manifest("smvs_dvd_covers")
    groups = sorted({int(r["group"]) for r in rows})
    if not 1 <= covers <= len(groups):
        raise ValueError(f"covers must be in 1..{len(groups)}")
    bad = set(devices) - set(DEVICES)
    if bad or not devices:
        raise ValueError(f"devices must be among {DEVICES}; got {list(devices)}")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(groups, size=covers, replace=False).tolist())
    chosen = set(pick)
    refs = {int(r["group"]): folder / r["path"] for r in rows if r["device"] == "Reference"}
    gallery = [str(downscaled(refs[g], ref_side, "smvs-ref")) for g in pick]
    glabels = list(pick)
    if distractors:
        cal_folder, cal_rows = _manifest("caltech101")
        _, unseen = caltech_class_split()
        pool = sorted(r["path"] for r in cal_rows if r["label"] in set(unseen))
        drng = np.random.default_rng(seed + 1)
        for p in sorted(drng.choice(pool, size=distractors, replace=False).tolist()):
            gallery.append(str(cal_folder / p))
            glabels.append(-1)
    queries, qlabels = [], []
    for r in rows:
        g = int(r["group"])
        if r["device"] in devices and g in chosen:
            p = folder / r["path"]
            if query_side is not None:
                p = downscaled(p, query_side, f"smvs-{r['device']}")
            queries.append(str(p))
            qlabels.append(g)
    tag = name or (f"smvs{ref_side}-{covers}" + (f"+d{distractors}" if distractors else "")
                   + (f"-q{query_side}" if query_side else "")
                   + ("" if tuple(devices) == DEVICES else "@" + "+".join(devices))
                   + (f"-s{seed}" if seed else ""))
    return RetrievalTask(
        name=tag, root=Path("/"), gallery_paths=gallery, query_paths=queries,
        query_gallery_index=np.full(len(queries), -1, np.int64), protocol="instance",
        query_labels=np.array(qlabels, np.int64), gallery_labels=np.array(glabels, np.int64),
        metrics=("R@1", "mAP"),
        description=f"SMVS phone photos vs {covers} references at {ref_side} px"
                    + (f" + {distractors} Caltech-101 distractors" if distractors else ""),
    )


def load_variant(name: str) -> RetrievalTask:
    """A named variant of :data:`VARIANTS`."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return smvs_variant(**VARIANTS[name], name=name)


def query_devices(task: RetrievalTask) -> list[str]:
    """The phone model of each query of an SMVS variant (from its path)."""
    out = []
    for p in task.query_paths:
        hit = [d for d in DEVICES if f"/{d}/" in p or f"smvs-{d}-" in p]
        out.append(hit[0] if hit else "?")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.parse_args()
    for name in VARIANTS:
        t = load_variant(name)
        print(f"{name:<20} gallery {t.num_gallery:>4}  queries {t.num_queries:>4}  "
              f"{t.description}")


if __name__ == "__main__":
    main()
