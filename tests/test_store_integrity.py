"""Damage is detected and repaired; bad input is a galleria error, never garbage.

Reference for every repair: search after `repair` equals search on the undamaged
gallery (same ids, scores within 1e-5).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _tiny
from galleria.errors import CompatibilityError, FormatError, GalleriaError, InputError
from galleria.extract.job import index_images
from galleria.extract.repair import repair
from galleria.store.gallery import Gallery
from galleria.store.integrity import restore_database
from galleria.types import LocalFeatures
from galleria.validate import l2_normalize

HERE = Path(__file__).parent


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), str(HERE)])
    return env


@pytest.fixture()
def images(tmp_path, photos):
    """The six real scikit-image photos plus 18 seeded synthetic ones."""
    rng = np.random.default_rng(5)
    root = tmp_path / "imgs"
    shutil.copytree(photos, root)
    for n in range(18):
        arr = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"syn{n:02d}.png")
    return root


def _built(tmp_path, images, name="g", flush=5):
    out = tmp_path / name
    index_images(images, out, extractor=_tiny.tiny(1), flush_every=flush)
    return out


def _results(path):
    with Gallery.open(path) as g:
        q = l2_normalize(np.random.default_rng(1).standard_normal((4, 12)).astype(np.float32))
        r = g.search(q, 10, space=g.primary_space)
    return r.ids.tolist(), r.scores


def _segment(path):
    with Gallery.open(path) as g:
        f, n = g.db.one("SELECT file, n FROM segments ORDER BY segment LIMIT 1")
    return path / f, n


def _drop_snapshots(path):
    with Gallery.open(path) as g, g.db.write() as c:
        c.execute("DELETE FROM index_snapshots")


@pytest.mark.parametrize("fault", ["deleted", "truncated", "altered"])
def test_damaged_segment_is_found_refused_and_repaired(tmp_path, images, fault):
    out = _built(tmp_path, images)
    ids_ok, scores_ok = _results(out)
    seg, n = _segment(out)
    if fault == "deleted":
        seg.unlink()
    elif fault == "truncated":
        with open(seg, "r+b") as fh:
            fh.truncate(seg.stat().st_size - 40)
    else:
        data = bytearray(seg.read_bytes())
        data[-20:] = b"\x7f" * 20  # changed values inside the last vectors
        seg.write_bytes(bytes(data))
    with Gallery.open(out) as g:
        rep = g.check()
        assert not rep.ok
        (p,) = [p for p in rep.problems if p.what == "segment"]
        assert p.path == str(seg) and p.n_items == n and len(p.items) == n
    _drop_snapshots(out)  # force a reader to build from the store
    with Gallery.open(out) as g, pytest.raises(FormatError) as ei:
        g.search(np.eye(1, 12, dtype=np.float32), 3, space=g.primary_space)
    assert str(seg) in str(ei.value) and "galleria repair" in str(ei.value)
    with Gallery.open(out) as g:
        rep = repair(g)
        assert rep.reembedded == {g.primary_space: n} and not rep.lost
        assert g.check().ok
    ids, scores = _results(out)
    assert ids == ids_ok
    np.testing.assert_allclose(scores, scores_ok, atol=1e-5)


def test_lost_items_are_reported_kept_out_of_search_and_removable(tmp_path, images):
    out = _built(tmp_path, images)
    seg, n = _segment(out)
    with Gallery.open(out) as g:
        held = [r[0] for r in g.db.all(
            "SELECT i.id FROM vectors v JOIN items i ON i.key=v.key JOIN segments s "
            "ON s.segment=v.segment WHERE s.file=?", (seg.relative_to(out).as_posix(),))]
    seg.unlink()
    for i in held[:2]:
        (images / i).unlink()  # their images are gone too
    with Gallery.open(out) as g:
        rep = repair(g)
        sp = g.primary_space
        assert sorted(rep.lost[sp]) == sorted(held[:2]) and rep.reembedded[sp] == n - 2
        chk = g.check()
        assert [p.what for p in chk.problems] == ["lost"] and sorted(chk.problems[0].items) == \
            sorted(held[:2])
        res = g.search(np.eye(1, 12, dtype=np.float32), 100, space=sp)
        assert not set(held[:2]) & set(res.ids[0])
        assert g.count(sp) == len(g) - 2
        g.remove(held[:2])
        assert g.check().ok and g.count(sp) == len(g)


def test_altered_index_snapshot_is_detected_and_search_stays_right(tmp_path, images):
    out = _built(tmp_path, images)
    ids_ok, scores_ok = _results(out)
    with Gallery.open(out) as g:
        folder, files = g.db.one("SELECT folder, files FROM index_snapshots")
    name = sorted(json.loads(files))[-1]
    f = out / folder / name
    data = bytearray(f.read_bytes())
    data[-8:] = b"\x00\x00\x80\x7f" * 2  # +inf scores for the last item
    f.write_bytes(bytes(data))
    with Gallery.open(out) as g:
        rep = g.check()
        assert [p.what for p in rep.problems] == ["index"] and rep.problems[0].path == str(f)
    ids, scores = _results(out)  # the reader rebuilds from the store instead
    assert ids == ids_ok
    np.testing.assert_allclose(scores, scores_ok, atol=1e-5)
    with Gallery.open(out) as g:
        repair(g)
        assert g.check().ok


@pytest.mark.parametrize("damage", ["garbage", "empty", "deleted"])
def test_damaged_database_is_restored_from_its_backup(tmp_path, images, damage):
    out = _built(tmp_path, images)
    ids_ok, scores_ok = _results(out)
    db = out / "gallery.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    if damage == "garbage":
        db.write_bytes(b"this is not a database" * 100)
    elif damage == "empty":
        db.write_bytes(b"")
    else:
        db.unlink()
    with pytest.raises(FormatError, match="galleria repair"), Gallery.open(out) as g:
        g.check()
    cli = subprocess.run([sys.executable, "-m", "galleria.cli.main", "search", str(out),
                          str(images / "chelsea.jpg")], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert "galleria repair" in cli.stderr
    msg = restore_database(out)
    assert msg and "backup" in msg
    with Gallery.open(out) as g:
        assert g.check().ok
    ids, scores = _results(out)
    assert ids == ids_ok
    np.testing.assert_allclose(scores, scores_ok, atol=1e-5)


def test_galleria_check_and_repair_cli(tmp_path, photos):
    """End to end with a real model: `check` exits 1 naming the file, `repair` fixes it."""
    out = tmp_path / "g"
    run = subprocess.run([sys.executable, "-m", "galleria.cli.main", "index", str(photos),
                          "--out", str(out), "-q", "--commit-every", "2"], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    ok = subprocess.run([sys.executable, "-m", "galleria.cli.main", "check", str(out)],
                        env=_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "sound" in ok.stdout
    seg, n = _segment(out)
    seg.unlink()
    bad = subprocess.run([sys.executable, "-m", "galleria.cli.main", "check", str(out)],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and str(seg) in bad.stdout and "missing" in bad.stdout
    fix = subprocess.run([sys.executable, "-m", "galleria.cli.main", "repair", str(out),
                          "--json", "-q"], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert fix.returncode == 0, fix.stderr
    rep = json.loads(fix.stdout)
    assert rep["sound_after"] and sum(rep["reembedded"].values()) == n


# ------------------------------------------------------------------ bad input
def test_add_refuses_bad_vectors_and_ids(tmp_path):
    g = Gallery.create(tmp_path / "g")
    sp = "m@1"
    x = l2_normalize(np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32))
    g.add(["a", "b", "c"], x, space=sp)
    with pytest.raises(InputError, match="not L2-normalised"):
        g.add(["d"], x[:1] * 1000, space=sp)
    with pytest.raises(InputError, match="all zeros"):
        g.add(["e"], np.zeros((1, 8), np.float32), space=sp)
    with pytest.raises(InputError, match="strings"):
        g.add([None], x[:1], space=sp)
    with pytest.raises(InputError, match="UTF-8"):
        g.add(["caf\udce9.jpg"], x[:1], space=sp)
    with pytest.raises(InputError, match="NaN"):
        g.add(["f"], np.full((1, 8), np.nan, np.float32), space=sp)
    with pytest.raises(CompatibilityError, match="dimension"):
        g.add(["g"], x[:1, :4], space=sp)
    assert g.ids() == ["a", "b", "c"]
    res = g.search(x[:1], 10**9, space=sp)  # k is clamped to the gallery, no huge allocation
    assert res.ids.shape == (1, 3)
    g.close()


def test_k_is_clamped_and_validated(tmp_path):
    g = Gallery.create(tmp_path / "g")
    x = l2_normalize(np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32))
    g.add([str(i) for i in range(5)], x, space="m@1")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match=f"got {bad!r}" if bad != 2.5 else "integer"):
            g.search(x[:1], bad, space="m@1")
    g.close()


def test_malformed_gallery_files_are_galleria_errors(tmp_path):
    g = Gallery.create(tmp_path / "g")
    g.close()
    (tmp_path / "g" / "gallery.json").write_text("[1, 2]")
    with pytest.raises(FormatError):
        Gallery.open(tmp_path / "g")


def test_same_file_names_from_another_folder_are_refused_not_dropped(tmp_path):
    rng = np.random.default_rng(2)
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        for n in range(4):
            Image.fromarray((rng.random((10, 10, 3)) * 255).astype(np.uint8)).save(d / f"{n}.png")
    out = tmp_path / "g"
    index_images(a, out, extractor=_tiny.tiny(1))
    with pytest.raises(InputError, match="--id-prefix") as ei:
        index_images(b, out, extractor=_tiny.tiny(1))
    assert "0.png" in str(ei.value)
    rep = index_images(b, out, extractor=_tiny.tiny(1), id_prefix="b/")
    assert rep.embedded == 4
    with Gallery.open(out) as g:
        assert len(g) == 8
    # a changed file under the same path is re-embedded and reported as updated
    Image.fromarray((rng.random((10, 10, 3)) * 255).astype(np.uint8)).save(a / "1.png")
    rep = index_images(a, out, extractor=_tiny.tiny(1))
    assert rep.updated == ["1.png"] and rep.embedded == 1 and rep.already_done == 3
    with Gallery.open(out) as g:
        assert len(g) == 8 and g.count() == 8


def test_manifest_id_reused_for_another_file_is_an_update(tmp_path):
    rng = np.random.default_rng(4)
    for n in range(3):
        Image.fromarray((rng.random((10, 10, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"{n}.png")
    (tmp_path / "m.csv").write_text("id,path\nx,0.png\ny,1.png\n")
    out = tmp_path / "g"
    index_images(tmp_path / "m.csv", out, extractor=_tiny.tiny(1))
    (tmp_path / "m.csv").write_text("id,path\nx,2.png\ny,1.png\n")
    rep = index_images(tmp_path / "m.csv", out, extractor=_tiny.tiny(1))
    assert rep.updated == ["x"] and rep.embedded == 1
    with Gallery.open(out) as g:
        assert g.meta(["x"])[0]["path"].endswith("2.png")


def test_batch_size_zero_is_an_input_error(tmp_path, images):
    with pytest.raises(InputError, match="batch size"):
        index_images(images, tmp_path / "g", extractor=_tiny.tiny(1), batch_size=0)


# ------------------------------------------------------------------ local features
def _sift_features(path: Path, n: int = 300) -> LocalFeatures:
    import cv2

    img = np.asarray(Image.open(path).convert("L"))
    kps, desc = cv2.SIFT_create(nfeatures=n).detectAndCompute(img, None)
    if desc is None:
        return LocalFeatures(np.zeros((0, 4), np.float32), np.zeros((0, 128), np.float32),
                             img.shape[::-1])
    kp = np.array([(k.pt[0], k.pt[1], k.size, k.response) for k in kps], np.float32)
    d = desc / np.maximum(desc.sum(1, keepdims=True), 1e-12)
    return LocalFeatures(kp, l2_normalize(np.sqrt(d).astype(np.float32)), img.shape[::-1])


def test_local_features_of_real_images_round_trip_and_are_checked(tmp_path, photos):
    """Per-item variable-length features (real OpenCV RootSIFT on real photos)."""
    files = sorted(photos.glob("*.jpg"))
    feats = [_sift_features(f) for f in files]
    feats.append(LocalFeatures(np.zeros((0, 4), np.float32), np.zeros((0, 128), np.float32),
                               (10, 10)))  # a blank image: no keypoints
    ids = [f.name for f in files] + ["blank.png"]
    assert len({len(f) for f in feats}) > 2  # variable lengths
    g = Gallery.create(tmp_path / "g")
    sp = "rootsift@test"
    g.register_space(sp, 128, {"descriptor_dtype": "float32"}, kind="local")
    g.add_local(ids[:3], feats[:3], space=sp)
    g.add_local(ids[3:], feats[3:], space=sp)
    keys = g.keys_of(ids)
    back = g.get_local(keys[::-1], space=sp)
    for f, b in zip(feats[::-1], back, strict=True):
        np.testing.assert_array_equal(f.keypoints, b.keypoints)
        np.testing.assert_array_equal(f.descriptors, b.descriptors)
        assert f.image_size == b.image_size
    streamed = {int(k): f for ks, fs in g.iter_local(sp, batch=2) for k, f in zip(ks, fs,
                                                                                   strict=True)}
    assert sorted(streamed) == sorted(int(k) for k in keys)
    assert len(streamed[int(keys[-1])]) == 0
    assert g.count(sp) == len(ids) and g.check().ok
    with pytest.raises(InputError, match="local"):
        g.add(["z"], np.eye(1, 128, dtype=np.float32), space=sp)
    with pytest.raises(InputError, match="feature sets"):
        g.add_local(["p", "q"], feats[:1], space=sp)
    seg = g.path / g.db.one("SELECT file FROM segments ORDER BY segment LIMIT 1")[0]
    g.close()
    data = bytearray(seg.read_bytes())
    data[200] ^= 0xFF
    seg.write_bytes(bytes(data))
    with Gallery.open(tmp_path / "g") as g2:
        (p,) = g2.check().problems
        assert p.path == str(seg) and p.n_items == 3 and "altered" in p.problem


def test_local_features_are_repaired_by_re_extraction(tmp_path, images):
    out = tmp_path / "g"
    index_images(images, out, model=None, local_extractor=_tiny.tiny_local(), flush_every=6)
    with Gallery.open(out) as g:
        (sp,) = [s.space for s in g.spaces()]
        keys = g.keys_of(g.ids())
        before = g.get_local(keys, space=sp)
        f, n = g.db.one("SELECT file, n FROM segments ORDER BY segment LIMIT 1")
    (out / f).unlink()
    with Gallery.open(out) as g:
        assert not g.check().ok
        rep = repair(g)
        assert rep.reembedded[sp] == n and g.check().ok
        after = g.get_local(keys, space=sp)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a.descriptors, b.descriptors)


def test_disk_full_is_a_clear_error_and_loses_nothing(tmp_path, images):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        out = mnt / "g"
        many = tmp_path / "many"
        many.mkdir()
        rng = np.random.default_rng(9)
        for n in range(300):
            Image.fromarray((rng.random((9, 9, 3)) * 255).astype(np.uint8)).save(
                many / f"{n:03d}.png")
        with pytest.raises(GalleriaError) as ei:
            index_images(many, out, extractor=_tiny.tiny(1, dim=64), flush_every=10)
        msg = str(ei.value).lower()
        del ei  # its traceback holds memory maps of files on the tmpfs
        assert "space" in msg or "full" in msg
        with Gallery.open(out) as g:
            n = g.count() if g.primary_space else 0
            assert g.check(deep=True).ok
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        rep = index_images(many, out, extractor=_tiny.tiny(1, dim=64), flush_every=10)
        assert rep.already_done == n and rep.embedded == 300 - n
        with Gallery.open(out) as g:
            assert g.count() == 300 and g.check().ok
    finally:
        import gc

        gc.collect()
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
