"""Image decoding and sources: every odd input is reported with a reason, never raised raw."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from galleria.errors import InputError
from galleria.images.decode import ImageDecodeError, load_image
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
