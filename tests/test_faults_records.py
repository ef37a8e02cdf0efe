"""Bad records and odd inputs are refused where they enter or reported where they are
found, never a crash (issue 19, cases 3 and 6, the store and CLI side):

- a stored crop box that is not four ordered finite numbers fails that item of
  `upgrade run` / `repair` (reported), never the whole run;
- one rule for item ids (galleria.ids): a control character is refused by the
  library, reported as a skipped file by `index`, refused in a manifest;
- `upgrade start --new-model` naming the model under a fitted transform is refused;
- the CLI prints no raw PIL DecompressionBombWarning (the image is a skipped entry
  with galleria's own reason).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _faults
import _tiny
from galleria.cli.main import main
from galleria.errors import InputError
from galleria.extract.job import index_images
from galleria.extract.repair import repair
from galleria.images.sources import list_source, read_manifest, split_problems
from galleria.store.gallery import Gallery
from galleria.upgrade.job import run_upgrade, start_upgrade
from galleria.upgrade.state import UpgradeError


def _images(root: Path, n: int = 10) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(
            root / f"{i:02d}.png")
    return root


BAD_BOXES = [["a", "b", "c", "d"], [float("nan"), 0, 5, 5], [1, 2, 3], [5, 0, 1, 9],
             [0, 0, float("inf"), 4], "0,0,4,4", [True, 0, 4, 4]]


@pytest.mark.parametrize("box", BAD_BOXES, ids=repr)
def test_parse_bbox_refuses_what_is_not_a_crop_box(box):
    from galleria.images.decode import parse_bbox  # new in this change

    with pytest.raises(InputError, match="crop box is four finite numbers"):
        parse_bbox(box)


def test_parse_bbox_accepts_ordered_finite_numbers():
    from galleria.images.decode import parse_bbox

    assert parse_bbox(None) is None
    assert parse_bbox([0, 1.5, np.float32(4), 9]) == (0.0, 1.5, 4.0, 9.0)


def _gallery_with_bad_boxes(tmp_path: Path) -> tuple[Path, list[str]]:
    imgs = _images(tmp_path / "imgs")
    g = tmp_path / "g"
    index_images(imgs, g, extractor=_tiny.tiny(1))
    bad = ["02.png", "05.png"]
    with Gallery.open(g) as gal:  # records as a client could store them before the fix
        sp = gal.primary_space
        keys = gal.keys_of(bad)
        vecs = gal.get_vectors(keys, space=sp)
        gal.add(bad, vecs, space=sp, replace=True,
                meta=[{"bbox": ["a", "b", "c", "d"]}, {"bbox": [float("nan"), 0, 5, 5]}])
    return g, bad


def test_upgrade_run_reports_items_with_bad_stored_boxes(tmp_path):
    """main: ValueError traceback from upgrade/job.py (every run), or 'unexpected error'."""
    g, bad = _gallery_with_bad_boxes(tmp_path)
    start_upgrade(g, "tiny-test", extractor=_tiny.tiny(2))
    rep = run_upgrade(g, extractor=_tiny.tiny(2))
    assert rep.moved == 8 and sorted(f.id for f in rep.failed) == bad
    for f in rep.failed:
        assert "stored crop box is invalid" in f.reason and "crop box is four" in f.reason
    again = run_upgrade(g, extractor=_tiny.tiny(2))  # every later run goes on too
    assert again.moved == 0 and again.remaining == 2


def test_repair_reports_items_with_bad_stored_boxes(tmp_path):
    g, bad = _gallery_with_bad_boxes(tmp_path)
    for seg in (g / "segments").rglob("*.npy"):
        seg.unlink()  # every item's data must be re-made from its image
    with Gallery.open(g) as gal:
        rep = repair(gal)
        sp = gal.primary_space
        assert sorted(rep.lost[sp]) == bad and rep.reembedded[sp] == 8
        chk = gal.check()
        assert [p.what for p in chk.problems] == ["lost"]
        assert "crop box" in chk.problems[0].problem


def test_one_id_rule_in_the_library(tmp_path):
    g = Gallery.create(tmp_path / "g")
    x = np.eye(1, 8, dtype=np.float32)
    for bad in ("a\nb", "tab\there", "esc\x1b[31m", "nul\x00", "c1\x9b", "x" * 4097):
        with pytest.raises(InputError, match="item ids"):
            g.add([bad], x, space="m@1")
    g.add(["ok id/with spaces é.jpg"], x, space="m@1")
    assert g.ids() == ["ok id/with spaces é.jpg"]
    g.close()


def test_index_reports_a_file_name_with_a_newline_as_skipped(tmp_path, capsys):
    src = _images(tmp_path / "src", 3)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(src / "new\nline.png")
    ok, bad = split_problems(list_source(src))
    assert len(ok) == 3
    (p,) = bad
    assert p.id == "new\\x0aline.png" and "control characters" in p.problem
    assert main(["index", str(src), "--out", str(tmp_path / "g"), "--model", "tiny-test",
                 "-q", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["embedded"] == 3 and [f["id"] for f in rep["failures"]] == ["new\\x0aline.png"]


def test_manifest_refuses_control_characters_and_bad_boxes(tmp_path):
    _images(tmp_path, 1)
    m = tmp_path / "m.csv"
    m.write_text('path,id\n00.png,"a\nb"\n')
    with pytest.raises(InputError, match="line 2: item ids must not contain control"):
        read_manifest(m)
    m.write_text("path,x1,y1,x2,y2\n00.png,0,0,nan,5\n")
    with pytest.raises(InputError, match="line 2: bad crop box"):
        read_manifest(m)


def test_upgrade_to_the_model_under_a_fitted_transform_is_refused(tmp_path, capsys):
    """main: accepted, status 'consistent: False', finish drops the transformed space."""
    g = tmp_path / "g"
    index_images(_images(tmp_path / "imgs", 12), g, extractor=_tiny.tiny(1))
    assert main(["fit-transform", str(g), "--kind", "pca", "--dim", "6", "--out",
                 str(tmp_path / "T"), "--apply", "-q"]) == 0
    with Gallery.open(g) as gal:
        primary = gal.primary_space
    capsys.readouterr()
    assert main(["upgrade", "start", str(g), "--new-model", "tiny-test"]) == 2
    err = capsys.readouterr().err
    assert "already uses 'tiny-test'" in err and "fitted transform" in err
    with pytest.raises(UpgradeError, match="already uses"):
        start_upgrade(g, "tiny-test", extractor=_tiny.tiny(1))
    with Gallery.open(g) as gal:
        assert gal.get_setting("upgrade") is None and gal.primary_space == primary
    start_upgrade(g, "tiny-test", extractor=_tiny.tiny(3))  # another model is fine


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header says ``w x h`` (PIL reads only the header before refusing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))


def test_cli_prints_no_raw_decompression_bomb_warning(tmp_path):
    src = _images(tmp_path / "src", 2)
    side = math.isqrt(Image.MAX_IMAGE_PIXELS) + 100  # over PIL's warning threshold only
    _png_header_only(src / "huge.png", side, side)
    out = _faults.run(0, tmp_path / "n.txt", ["index", str(src), "--out", str(tmp_path / "g"),
                                              "--model", "tiny-test", "-q", "--json"])
    assert out.returncode == 0, out.stderr
    assert "DecompressionBombWarning" not in out.stderr and "warnings.warn" not in out.stderr
    rep = json.loads(out.stdout)
    (f,) = rep["failures"]
    assert f["id"] == "huge.png" and f["reason"].startswith("too many pixels")


def test_image_paths_recorded_relative_to_the_gallery_and_resolved(tmp_path, monkeypatch):
    from galleria.store.images import record_path, resolve_image_path

    g = tmp_path / "g3.gallery"
    (g / "uploads" / "ab").mkdir(parents=True)
    f = g / "uploads" / "ab" / "x.png"
    f.write_bytes(b"x")
    assert record_path(g, f) == "uploads/ab/x.png"
    assert record_path(g, tmp_path / "other.png") == str(tmp_path / "other.png")
    assert resolve_image_path(g, None) is None
    assert resolve_image_path(g, "/abs/photo.jpg") == "/abs/photo.jpg"
    monkeypatch.chdir(tmp_path)
    assert resolve_image_path("g3.gallery", "uploads/ab/x.png") == str(f)
    assert resolve_image_path("g3.gallery", "g3.gallery/uploads/ab/x.png") == str(f)  # <= 0.2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve_image_path(g, "g3.gallery/uploads/ab/x.png") == str(f)  # by its tail
    assert resolve_image_path(g, "gone/y.png") == str(g / "gone" / "y.png")
