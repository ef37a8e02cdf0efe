"""Every long CLI step draws a progress bar (forced with GALLERIA_PROGRESS=1, as on a
terminal): fit-transform's training, eval's embedding / transform fit / local search,
dedup's search and verification; ``-q`` draws none. Tiny registered test models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import _tiny
from galleria.cli.main import main as cli
from galleria.extract.job import index_images


@pytest.fixture()
def small(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    src.mkdir()
    rows = ["path,label"]
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).resize(
            (96, 96), Image.Resampling.NEAREST).save(src / f"{i}.png")
        rows.append(f"{i}.png,c{i % 3}")
    Image.open(src / "4.png").save(src / "4-copy.jpg", quality=90)
    rows.append("4-copy.jpg,c1")
    (src / "m.csv").write_text("\n".join(rows) + "\n")
    g = tmp_path / "g"
    index_images(src, g, extractor=_tiny.tiny(3, dim=16), local_extractor=_tiny.tiny_local())
    return src, g


def _bars(capsys) -> str:
    return capsys.readouterr().err.replace("\r", "\n")


def test_long_cli_steps_draw_progress_bars(small, capsys, monkeypatch, one_torch_thread):
    src, g = small
    monkeypatch.setenv("GALLERIA_PROGRESS", "1")
    monkeypatch.chdir(src)  # fit-transform --out is a path
    assert cli(["fit-transform", str(g), "--kind", "aesvc", "--dim", "4", "--out", "a4",
                "--param", "max_steps=6", "--param", "batch_size=4", "--threads", "1"]) == 0
    err = _bars(capsys)
    assert "aesvc" in err and "6/6" in err, err
    assert cli(["eval", "--manifest", str(src / "m.csv"), "--model", "tiny-test",
                "--transform", "aesvc", "--dim", "4", "--param", "max_steps=5",
                "--threads", "1"]) == 0
    err = _bars(capsys)
    assert "embed m: 100%" in err and "13/13" in err and "5/5" in err, err
    assert cli(["eval", "--manifest", str(src / "m.csv"), "--local", "tiny-local",
                "--pipeline", "local", "--index-param", "codebook_size=4",
                "--threads", "1"]) == 0
    err = _bars(capsys)
    assert "search (local)" in err and "13/13" in err and "query/s" in err, err
    assert cli(["dedup", str(g), "--threads", "1"]) == 0
    err = _bars(capsys)
    assert "dedup: search" in err and "13/13" in err, err
    assert cli(["dedup", str(g), "--threads", "1", "-q"]) == 0
    assert "dedup" not in _bars(capsys)
