"""Issue 18's failure case as a seeded regression test, end to end through the CLI.

A user indexed ~30 small clean product images (~200 px) with ``--model effnet-lite0
--local sift`` and searched them with phone photos: the default then (``local``, an
ASMK codebook trained on the gallery's own few thousand descriptors) found 29 % of
them at rank 1, the global model 35 %, a 60-line RootSIFT voting script 76.5 %. The
same shape is rebuilt here from SMVS: 30 seeded covers, their clean references
downscaled to 200 px, one phone photo per cover (seeded device) as the query.
The default (no ``--pipeline``, untuned) must find nearly all of them and never fall
below the plain global model; measured: 30 / 30.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from galleria.cli.main import main
from galleria.decision import SearchRequest, choose
from galleria.store.gallery import Gallery

COVERS, SIDE, SEED = 30, 200, 0
DEVICES = ("Canon", "Droid", "E63", "Palm")


def _case(root: Path, tmp: Path) -> tuple[Path, list[Path], list[str]]:
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    groups = sorted({int(r["group"]) for r in rows})
    rng = np.random.default_rng(SEED)
    pick = sorted(rng.choice(groups, size=COVERS, replace=False).tolist())
    by = {(int(r["group"]), r["device"]): root / r["path"] for r in rows}
    gallery = tmp / "refs"
    gallery.mkdir()
    for g in pick:
        with Image.open(by[(g, "Reference")]) as im:
            im = im.convert("RGB")
            s = SIDE / max(im.size)
            im.resize((round(im.width * s), round(im.height * s)), Image.LANCZOS) \
                .save(gallery / f"cover{g:03d}.png")
    devices = rng.choice(DEVICES, size=COVERS)
    queries = [by[(g, str(d))] for g, d in zip(pick, devices, strict=True)]
    return gallery, queries, [f"cover{g:03d}.png" for g in pick]


def _top1(capsys, gallery: Path, queries: list[Path], *extra: str) -> list[str]:
    capsys.readouterr()
    assert main(["search", str(gallery), *map(str, queries), "-k", "1", "--json",
                 "--quiet", *extra]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    return [r["results"][0]["id"] if r["results"] else "" for r in out]


@pytest.mark.slow  # indexes 30 images with two models and runs 60 searches: ~1-2 min
def test_small_clean_gallery_phone_queries_default_finds_them(require_shared, tmp_path,
                                                               capsys):
    src, queries, truth = _case(require_shared("smvs_dvd_covers"), tmp_path)
    g = tmp_path / "g"
    assert main(["index", str(src), "--out", str(g), "--model", "effnet-lite0", "--local",
                 "sift", "--quiet", "--threads", "2", "--no-tune"]) == 0
    with Gallery.open(g, readonly=True) as gal:
        assert choose(gal.state(), SearchRequest()).pipeline == "hybrid"
    default = np.mean([a == b for a, b in zip(_top1(capsys, g, queries), truth, strict=True)])
    plain = np.mean([a == b for a, b in
                     zip(_top1(capsys, g, queries, "--pipeline", "global"), truth, strict=True)])
    print(f"R@1 default {default:.3f}, global {plain:.3f}")
    assert default >= 0.9, default  # the default: 0.29
    assert default >= plain
