"""Listing sources never aborts on one odd entry: bad names, links, unreadable folders
and galleries inside the folder are reported (as problem items the job records as
failures); manifests with a BOM are read, other encodings refused clearly."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from galleria.errors import InputError
from galleria.images.sources import list_source, read_manifest, split_problems


def _img(path: Path, colour=(10, 20, 30)) -> Path:
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def _non_utf8(folder: Path, name: bytes, data: bytes = b"x") -> None:
    fd = os.open(os.fsencode(folder) + b"/" + name, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, data)
    os.close(fd)


def test_non_utf8_names_are_reported_not_fatal(tmp_path):
    _img(tmp_path / "a.jpg")
    _non_utf8(tmp_path, b"caf\xe9.jpg")
    os.mkdir(os.fsencode(tmp_path) + b"/d\xe9j\xe0")
    _non_utf8(tmp_path, b"d\xe9j\xe0/one.jpg")
    _non_utf8(tmp_path, b"d\xe9j\xe0/two.jpg")
    items = list_source(tmp_path)
    ok, bad = split_problems(items)
    assert [it.id for it in ok] == ["a.jpg"]
    by_id = {it.id: it.problem for it in bad}
    assert set(by_id) == {"caf\\xe9.jpg", "d\\xe9j\\xe0/"}  # the folder once, not per file
    assert by_id["caf\\xe9.jpg"].startswith("file name is not valid UTF-8: 'caf\\udce9.jpg'")
    assert "folder name is not valid UTF-8" in by_id["d\\xe9j\\xe0/"]
    for it in bad:  # printable: what SQLite, JSON and a terminal accept
        it.id.encode("utf-8")
        str(it.path).encode("utf-8")
        it.problem.encode("utf-8")


def test_links_and_special_files_are_reported(tmp_path):
    _img(tmp_path / "a.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "alias.jpg").symlink_to(tmp_path / "a.jpg")  # a link to a file is indexed
    (tmp_path / "elsewhere").mkdir()
    _img(tmp_path / "elsewhere" / "b.jpg")
    (tmp_path / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")  # hidden: skipped silently, as before
    ok, bad = split_problems(list_source(tmp_path))
    assert [it.id for it in ok] == ["a.jpg", "alias.jpg", "elsewhere/b.jpg"]
    reasons = {it.id: it.problem for it in bad}
    assert set(reasons) == {"dangling.jpg", "linked/", "pipe"}
    assert reasons["dangling.jpg"].startswith("broken symbolic link")
    assert "gone.jpg" in reasons["dangling.jpg"]
    assert "not followed" in reasons["linked/"]
    assert reasons["pipe"].startswith("not a regular file")


def test_unreadable_subfolder_is_reported(tmp_path, monkeypatch):
    """os.walk's errors are reports, not silence (simulated: the suite may run as root)."""
    _img(tmp_path / "a.jpg")
    (tmp_path / "locked").mkdir()
    _img(tmp_path / "locked" / "b.jpg")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == tmp_path / "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    ok, bad = split_problems(list_source(tmp_path))
    assert [it.id for it in ok] == ["a.jpg"]
    assert [(it.id, it.problem) for it in bad] == [
        ("locked/", "folder cannot be read (Permission denied); its files are skipped")]
    real_root = tmp_path / "x"
    real_root.mkdir()

    def root_denied(path="."):
        if Path(path) == real_root:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", root_denied)
    with pytest.raises(InputError, match="cannot be read: Permission denied"):
        list_source(real_root)


def test_unreadable_subfolder_for_real_as_an_unprivileged_user():
    from _privdrop import run_as_nobody

    d = Path(tempfile.mkdtemp(prefix="galleria-perm-"))
    try:
        d.chmod(0o755)
        _img(d / "a.jpg").chmod(0o644)
        (d / "locked").mkdir()
        _img(d / "locked" / "b.jpg")
        (d / "locked").chmod(0o000)
        got = run_as_nobody(lambda: [(it.id, it.problem) for it in list_source(d)])
        assert got == [["a.jpg", None],
                       ["locked/", "folder cannot be read (Permission denied); its files "
                                   "are skipped"]]
    finally:
        (d / "locked").chmod(0o755)
        shutil.rmtree(d, ignore_errors=True)


def test_a_gallery_inside_the_source_is_skipped_once(tmp_path):
    _img(tmp_path / "a.jpg")
    g = tmp_path / "nested" / "my.gallery"
    g.mkdir(parents=True)
    for name in ("gallery.json", "gallery.sqlite"):
        (g / name).write_bytes(b"{}")
    (g / "segments").mkdir()
    (g / "segments" / "x.npy").write_bytes(b"x")
    _img(tmp_path / "nested" / "b.jpg")
    (tmp_path / "half").mkdir()  # only one marker: an ordinary folder
    (tmp_path / "half" / "gallery.json").write_text("{}")
    ok, bad = split_problems(list_source(tmp_path))
    assert [it.id for it in ok] == ["a.jpg", "half/gallery.json", "nested/b.jpg"]
    assert [it.id for it in bad] == ["nested/my.gallery/"]
    assert "galleria gallery" in bad[0].problem
    with pytest.raises(InputError, match="is a galleria gallery"):
        list_source(g)


# -------------------------------------------------------------------- manifests
def test_manifest_with_a_bom_is_read(tmp_path):
    _img(tmp_path / "a.jpg")
    (tmp_path / "m.csv").write_text("path,label\na.jpg,chat\nb.jpg,café\n", encoding="utf-8-sig")
    assert (tmp_path / "m.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    items = read_manifest(tmp_path / "m.csv")
    assert [it.id for it in items] == ["a.jpg", "b.jpg"]
    assert items[1].meta == {"label": "café"}


def test_manifest_in_another_encoding_is_a_clear_error(tmp_path):
    (tmp_path / "latin.csv").write_bytes("path,label\na.jpg,chat\nb.jpg,café\n".encode("latin-1"))
    with pytest.raises(InputError) as ei:
        read_manifest(tmp_path / "latin.csv")
    msg = str(ei.value)
    assert "latin.csv" in msg and "line 3" in msg and "0xe9" in msg and "UTF-8" in msg
    assert "column 10" in msg and "Save the file as UTF-8" in msg
    # the same byte after a BOM: the offset counts the BOM
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfpath\nb\xe9.jpg\n")
    with pytest.raises(InputError, match=r"line 2, column 2 \(byte offset 9\) holds byte 0xe9"):
        read_manifest(tmp_path / "bom.csv")


def test_manifest_csv_errors_are_input_errors(tmp_path):
    (tmp_path / "huge.csv").write_text("path,label\na.jpg," + "x" * 200_000 + "\n")
    with pytest.raises(InputError, match=r"huge\.csv line .*not valid CSV"):
        read_manifest(tmp_path / "huge.csv")


def test_cli_index_reports_a_latin1_manifest_without_a_traceback(tmp_path, capsys):
    from galleria.cli.main import main as cli

    (tmp_path / "latin.csv").write_bytes("path\ncafé.jpg\n".encode("latin-1"))
    assert cli(["index", str(tmp_path / "latin.csv"), "--out", str(tmp_path / "g"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "latin.csv is not UTF-8" in err and "Traceback" not in err


# ----------------------------------------------------- through the indexing job
def test_index_skips_bad_names_and_its_own_gallery(tmp_path, photos):
    """`galleria index SRC --out SRC/g`: a non-UTF-8 name and a broken link are failures
    with reasons, the run goes on; the re-run does not ingest the gallery's own files."""
    from galleria.extract.job import index_images
    from galleria.store.gallery import Gallery

    src = tmp_path / "src"
    src.mkdir()
    for name in ("coffee.jpg", "rocket.jpg"):
        shutil.copy(photos / name, src / name)
    _non_utf8(src, b"caf\xe9.jpg", (photos / "chelsea.jpg").read_bytes())
    (src / "dangling.jpg").symlink_to(src / "gone.jpg")
    rep = index_images(src, src / "g", model="effnet-lite0")
    assert rep.embedded == 2 and rep.total == 4
    reasons = {f.id: f.reason for f in rep.failures}
    assert set(reasons) == {"caf\\xe9.jpg", "dangling.jpg"}
    assert reasons["caf\\xe9.jpg"].startswith("file name is not valid UTF-8")
    again = index_images(src, src / "g", model="effnet-lite0")
    assert again.embedded == 0 and again.already_done == 2
    reasons = {f.id: f.reason for f in again.failures}
    assert set(reasons) == {"caf\\xe9.jpg", "dangling.jpg", "g/"}
    assert "galleria gallery" in reasons["g/"]
    with Gallery.open(src / "g") as g:
        assert sorted(g.ids()) == ["coffee.jpg", "rocket.jpg"]
        assert {f.id for f in g.failures()} == {"caf\\xe9.jpg", "dangling.jpg", "g/"}


def test_embed_stream_carries_each_files_content_hash(tmp_path, photos):
    """The hash the store records per item comes from the read that decoded it."""
    from galleria.extract.embed import embed_stream
    from galleria.extractors.registry import create_extractor
    from galleria.images.decode import content_hash

    src = tmp_path / "src"
    src.mkdir()
    for name in ("coffee.jpg", "rocket.jpg", "chelsea.jpg"):
        shutil.copy(photos / name, src / name)
    (src / "dangling.jpg").symlink_to(src / "gone.jpg")
    ext = create_extractor("effnet-lite0")
    batches = list(embed_stream(list_source(src), ext, batch_size=2, workers=2))
    got = {it.id: h for b in batches for it, h in zip(b.items, b.hashes, strict=True)}
    assert got == {n: content_hash(src / n) for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")}
    assert [it.id for b in batches for it, _ in b.failures] == ["dangling.jpg"]
