"""`galleria index`: bad files are reported and skipped; kill -9 then re-run gives
every image exactly once; the CLI contract of index/search/info."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from galleria.cli.main import main as cli
from galleria.extract.job import index_images
from galleria.store.gallery import Gallery


def _bad_files(folder: Path) -> dict[str, str]:
    good = next(folder.glob("*.jpg")).read_bytes()
    (folder / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "readme.txt").write_text("this is not an image")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "pixel.png")
    return {"corrupt.jpg": "truncated", "zero.jpg": "empty", "readme.txt": "not an image",
            "pixel.png": "too small"}


def test_bad_files_reported_and_skipped(tmp_path, photos):
    src = tmp_path / "src"
    shutil.copytree(photos, src)
    expected = _bad_files(src)
    rep = index_images(src, tmp_path / "g", model="effnet-lite0")
    assert rep.embedded == 6 and rep.total == 10
    got = {f.id: f.reason for f in rep.failures}
    assert set(got) == set(expected)
    for name, word in expected.items():
        assert word in got[name]
    with Gallery.open(tmp_path / "g") as g:
        assert len(g) == 6 and sorted(f.id for f in g.failures()) == sorted(expected)
    again = index_images(src, tmp_path / "g", model="effnet-lite0")
    assert again.embedded == 0 and again.already_done == 6 and len(again.failures) == 4


def _many_photos(photos: Path, dest: Path, n: int) -> None:
    dest.mkdir()
    srcs = sorted(photos.glob("*.jpg"))
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.open(srcs[i % len(srcs)]).convert("RGB")
        w, h = img.size
        x, y = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        img.crop((x, y, x + w // 2, y + h // 2)).resize((96, 96)).save(dest / f"{i:04d}.jpg")


def _count(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_kill9_then_rerun_indexes_every_image_exactly_once(tmp_path, photos):
    src, out = tmp_path / "src", tmp_path / "g"
    n = 240
    _many_photos(photos, src, n)
    cmd = [sys.executable, "-m", "galleria.cli.main", "index", str(src), "--out", str(out),
           "--model", "effnet-lite0", "--runtime", "torch", "--threads", "1",
           "--batch-size", "4", "--commit-every", "8", "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = out / "gallery.sqlite"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and _count(db) < 40:
        time.sleep(0.02)
    assert proc.poll() is None, "the indexer finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = _count(db)
    assert 0 < done_at_kill < n
    # the gallery is usable between the two runs
    with Gallery.open(out) as g:
        assert g.count() == done_at_kill
        first = g.ids()[0]
        key = g.keys_of([first])
        assert g.search(g.get_vectors(key), 1, space=g.primary_space).ids[0, 0] == first
    rerun = subprocess.run([*cmd[:-1], "--json"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["already_done"] == done_at_kill
    assert report["already_done"] + report["embedded"] == n and report["failed"] == 0
    with Gallery.open(out) as g:
        ids = g.ids()
        assert len(ids) == n == len(set(ids)) == g.count()
        assert sorted(ids) == sorted(p.name for p in src.iterdir())
        keys, vecs = g.load_vectors()
        assert len(keys) == n == len(np.unique(keys))
        # vectors match a fresh, uninterrupted extraction
        from galleria.extractors.registry import create_extractor
        from galleria.images.decode import load_image

        ext = create_extractor("effnet-lite0", runtime="torch")
        names = [str(i) for i in g.ids_of(keys[:5])]
        ref = ext.embed_images([load_image(src / name) for name in names])
        np.testing.assert_allclose(vecs[:5], ref, atol=1e-4)
        assert len(g.index()) == n


def test_cli_index_search_json_html_info(tmp_path, photos, capsys):
    out = tmp_path / "g"
    assert cli(["index", str(photos), "--out", str(out), "--model", "effnet-lite0", "-q"]) == 0
    capsys.readouterr()
    q = str(photos / "chelsea.jpg")
    assert cli(["search", str(out), q, str(photos / "rocket.jpg"), "-k", "3", "--json",
                "--html", str(tmp_path / "r.html")]) == 0
    res = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in res] == [q, str(photos / "rocket.jpg")]
    assert res[0]["results"][0]["id"] == "chelsea.jpg"
    assert len(res[0]["results"]) == 3 and res[0]["results"][0]["score"] > 0.99
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 8 and "chelsea.jpg" in page
    assert cli(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["items"] == 6 and info["spaces"][0]["count"] == 6
    assert cli(["remove", str(out), "chelsea.jpg"]) == 0
    capsys.readouterr()
    assert cli(["search", str(out), q, "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["results"][0]["id"] != \
        "chelsea.jpg"


def test_cli_errors_are_clear(tmp_path, photos, capsys):
    assert cli(["index", str(tmp_path / "missing"), "--out", str(tmp_path / "g")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["search", str(tmp_path), str(photos / "chelsea.jpg")]) == 2
    assert "not a galleria gallery" in capsys.readouterr().err


def test_query_from_other_model_or_dimension_is_refused(tmp_path, photos):
    from galleria.errors import CompatibilityError
    from galleria.extractors.registry import create_extractor
    from galleria.search.searcher import PlainSearcher

    index_images(photos, tmp_path / "g", model="effnet-lite0")
    g = Gallery.open(tmp_path / "g")
    other = create_extractor("opennsfw-r50")
    with pytest.raises(CompatibilityError) as ei:
        PlainSearcher(g, other)
    assert other.fingerprint in str(ei.value) and g.primary_space in str(ei.value)
    q = other.embed_images([Image.open(photos / "chelsea.jpg").convert("RGB")])
    with pytest.raises(CompatibilityError) as ei:
        g.search(q, 3, space=g.primary_space)
    assert "1024" in str(ei.value) and "1280" in str(ei.value)
    lite2 = create_extractor("effnet-lite2")
    q2 = lite2.embed_images([Image.open(photos / "chelsea.jpg").convert("RGB")])
    with pytest.raises(CompatibilityError) as ei:
        g.search(q2, 3, fingerprint=lite2.fingerprint)
    assert lite2.fingerprint in str(ei.value) and g.primary_space in str(ei.value)
    g.close()
