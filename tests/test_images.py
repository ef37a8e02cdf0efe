"""Image decoding and sources: every odd input is reported with a reason, never raised raw."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from galleria.errors import InputError
from galleria.images.decode import ImageDecodeError, content_hash, load_image, load_image_and_hash
from galleria.images.sources import list_source, read_manifest


def _save(path, mode, size=(32, 24), **kw):
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    Image.fromarray(arr, "RGBA").convert(mode).save(path, **kw)
    return path


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"),
                                      ("LA", "PNG"), ("1", "PNG"), ("I;16", "PNG")])
def test_every_mode_becomes_rgb(tmp_path, mode, fmt):
    p = _save(tmp_path / f"x.{fmt.lower()}", mode, format=fmt)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (32, 24)


def test_alpha_is_composited_on_white(tmp_path):
    p = tmp_path / "t.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(p)
    assert np.asarray(load_image(p)).min() == 255


def test_exif_orientation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(p, exif=exif)
    assert load_image(p).size == (20, 40)


def test_bad_inputs_have_reasons(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1, 1)).save(tmp_path / "pixel.png")
    reasons = {}
    for name in ("empty.jpg", "notes.txt", "trunc.jpg", "pixel.png"):
        with pytest.raises(ImageDecodeError) as ei:
            load_image(tmp_path / name)
        reasons[name] = ei.value.reason
    assert "empty" in reasons["empty.jpg"]
    assert "not an image" in reasons["notes.txt"]
    assert "corrupt" in reasons["trunc.jpg"] or "truncated" in reasons["trunc.jpg"]
    assert "too small" in reasons["pixel.png"]


def test_crop_box(tmp_path):
    p = tmp_path / "a.png"
    arr = np.zeros((50, 100, 3), np.uint8)
    arr[10:20, 30:60] = 255
    Image.fromarray(arr).save(p)
    img = load_image(p, bbox=(30, 10, 60, 20))
    assert img.size == (30, 10) and np.asarray(img).min() == 255
    with pytest.raises(ImageDecodeError):
        load_image(p, bbox=(200, 200, 300, 300))


def test_folder_ids_are_relative_posix_paths(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.jpg").write_bytes(b"1")
    (tmp_path / "y.png").write_bytes(b"1")
    (tmp_path / ".hidden").write_bytes(b"1")
    ids = [it.id for it in list_source(tmp_path)]
    assert ids == ["a/b/x.jpg", "y.png"]


def test_manifest(tmp_path):
    (tmp_path / "m.csv").write_text(
        "path,label,x1,y1,x2,y2\nimg/a.jpg,cat,1,2,3,4\nb.jpg,dog,,,,\n"
    )
    items = read_manifest(tmp_path / "m.csv")
    assert items[0].id == "img/a.jpg" and items[0].bbox == (1, 2, 3, 4)
    assert items[0].meta == {"label": "cat"} and items[1].bbox is None
    assert items[1].path == tmp_path / "b.jpg"
    (tmp_path / "bad.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(InputError, match="'path' column"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "dup.csv").write_text("path\na.jpg\na.jpg\n")
    with pytest.raises(InputError, match="duplicate"):
        read_manifest(tmp_path / "dup.csv")
    with pytest.raises(InputError, match="does not exist"):
        list_source(tmp_path / "nope")


# ---------------------------------------------------------------- real reasons
def _jpeg(path, size=(64, 48), seed=0):
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)
    return path


def _reason(path, **kw):
    with pytest.raises(ImageDecodeError) as ei:
        load_image(path, **kw)
    return ei.value.reason


def test_each_failure_has_its_own_reason(tmp_path):
    good = _jpeg(tmp_path / "good.jpg")
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    broken = bytearray(data)
    broken[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # markers in the scan data
    (tmp_path / "garbled.jpg").write_bytes(bytes(broken))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("hello")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    reasons = {
        name: _reason(tmp_path / name)
        for name in ("trunc.jpg", "garbled.jpg", "empty.jpg", "notes.jpg", "folder.jpg",
                     "missing.jpg", "dangling.jpg", "pipe.jpg")
    }
    assert reasons["trunc.jpg"].startswith("truncated image")
    assert reasons["garbled.jpg"].startswith("corrupt image data")
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["notes.jpg"].startswith("not an image")
    assert reasons["folder.jpg"].startswith("is a directory")
    assert reasons["missing.jpg"].startswith("not found")
    assert reasons["dangling.jpg"].startswith("not found: broken symbolic link")
    assert reasons["pipe.jpg"].startswith("not a regular file")  # and the open did not block
    assert len(set(reasons.values())) == len(reasons)
    assert not any("corrupt" in r for n, r in reasons.items() if n != "garbled.jpg")


def test_permission_denied_is_not_called_corrupt(tmp_path, monkeypatch):
    p = _jpeg(tmp_path / "secret.jpg")
    real_open = os.open

    def denied(path, *a, **kw):
        if os.fspath(path) == os.fspath(p):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", denied)
    assert _reason(p).startswith("permission denied")
    with pytest.raises(ImageDecodeError, match="permission denied"):
        load_image_and_hash(p)


def test_permission_denied_for_real_as_an_unprivileged_user(tmp_path):
    """chmod 000 as root denies nothing, so the check runs in a child dropped to nobody."""
    import tempfile

    from _privdrop import run_as_nobody

    d = Path(tempfile.mkdtemp(prefix="galleria-perm-"))  # under /tmp: nobody can reach it
    try:
        d.chmod(0o755)
        p = _jpeg(d / "secret.jpg")
        p.chmod(0o000)
        ok = _jpeg(d / "open.jpg")
        ok.chmod(0o644)
        Image.init()  # PIL's format plugins are imported now, not in the child

        def child():
            out = {"open": list(load_image(ok).size)}
            try:
                load_image(p)
            except ImageDecodeError as exc:
                out["secret"] = exc.reason
            return out

        got = run_as_nobody(child)
        assert got["open"] == [64, 48]
        assert got["secret"].startswith("permission denied")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_decompression_bombs_refused_without_touching_warning_filters(tmp_path, monkeypatch):
    import warnings

    p = _jpeg(tmp_path / "big.jpg", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 = 4096 > 1000
    before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL still warns; we only check we refuse
        assert _reason(p).startswith("too many pixels")
        with pytest.raises(ImageDecodeError, match="too many pixels"):
            load_image_and_hash(p)
    assert list(warnings.filters) == before


def test_load_image_and_hash_reads_once_and_hashes_the_bytes(tmp_path, monkeypatch):
    p = _jpeg(tmp_path / "a.jpg", size=(80, 60))
    opens = []
    real_open = os.open

    def counting(path, *a, **kw):
        opens.append(os.fspath(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", counting)
    img, h = load_image_and_hash(p, bbox=(10, 5, 50, 45))
    assert opens.count(os.fspath(p)) == 1
    monkeypatch.undo()
    assert h == "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
    assert h == content_hash(p)
    ref = load_image(p, bbox=(10, 5, 50, 45))
    assert img.size == ref.size == (40, 40)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(ref))
    # same pixels re-encoded differently, or one byte changed: a different hash
    _jpeg(tmp_path / "b.jpg", size=(80, 60), seed=1)
    assert load_image_and_hash(tmp_path / "b.jpg")[1] != h
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    (tmp_path / "c.jpg").write_bytes(bytes(data))
    assert content_hash(tmp_path / "c.jpg") != h
    for bad, word in (("nope.jpg", "not found"), ("empty.jpg", "empty")):
        if bad == "empty.jpg":
            (tmp_path / bad).write_bytes(b"")
        with pytest.raises(ImageDecodeError, match=word):
            load_image_and_hash(tmp_path / bad)
    (tmp_path / "big.bin").write_bytes(b"\0" * (4 << 20))
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image_and_hash(tmp_path / "big.bin")
