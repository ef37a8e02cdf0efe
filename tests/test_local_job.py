"""`galleria index --local sift`: kill -9 then re-run stores every image's features
exactly once; a corrupt image is skipped and reported, a blank one stored and
reported (no keypoints); neither crashes the run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from galleria.store.gallery import Gallery


def _photos(photos: Path, dest: Path, n: int) -> None:
    dest.mkdir()
    srcs = sorted(photos.glob("*.jpg"))
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.open(srcs[i % len(srcs)]).convert("RGB")
        w, h = img.size
        x, y = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        img.crop((x, y, x + w // 2, y + h // 2)).resize((256, 256)).save(dest / f"{i:04d}.jpg")


def _count(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_kill9_local_index_then_rerun_exactly_once(tmp_path, photos):
    src, out = tmp_path / "src", tmp_path / "g"
    n = 160
    _photos(photos, src, n)
    good = (src / "0000.jpg").read_bytes()
    (src / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    Image.new("RGB", (320, 240), (90, 90, 90)).save(src / "blank.png")
    cmd = [sys.executable, "-m", "galleria.cli.main", "index", str(src), "--out", str(out),
           "--local", "sift", "--threads", "1", "--workers", "1", "--batch-size", "4",
           "--commit-every", "8", "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = out / "gallery.sqlite"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _count(db) < 24:
        time.sleep(0.02)
    assert proc.poll() is None, "the indexer finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = _count(db)
    assert 0 < done_at_kill < n
    rerun = subprocess.run([*cmd[:-1], "--json"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["already_done"] == done_at_kill
    total = n + 1  # + the blank image (stored without keypoints)
    assert report["already_done"] + report["embedded"] == total
    assert [f["id"] for f in report["failures"]] == ["corrupt.jpg"]
    assert report["no_keypoints_ids"] == ["blank.png"]
    with Gallery.open(out) as g:
        sp = next(s for s in g.spaces() if s.kind == "local")
        ids = g.ids(sp.space)
        assert len(ids) == total == len(set(ids)) == sp.count
        assert sorted(ids) == sorted(p.name for p in src.iterdir() if p.name != "corrupt.jpg")
        keys, rows = [], 0
        for k, feats in g.iter_local(sp.space):
            keys += k.tolist()
            rows += sum(len(f) for f in feats)
        assert len(keys) == total == len(set(keys))
        seg_rows = g.db.one("SELECT SUM(n) FROM vectors WHERE space=?", (sp.space,))[0]
        assert rows == seg_rows  # no feature row stored twice or lost
        # features match a fresh, uninterrupted extraction
        from galleria.extractors.registry import create_extractor
        from galleria.images.decode import load_image

        ext = create_extractor("sift")
        names = ["0000.jpg", f"{n - 1:04d}.jpg", "blank.png"]
        stored = g.get_local(g.keys_of(names), space=sp.space)
        fresh = ext.embed_images([load_image(src / nm) for nm in names])
        for a, b in zip(stored, fresh, strict=True):
            np.testing.assert_array_equal(a.descriptors, b.descriptors)
            np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-4)
        assert len(stored[2]) == 0
        assert g.view(sp.space).count == total  # the local index holds every image once
