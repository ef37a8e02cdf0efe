"""`galleria eval` on a shared data set and on a user's own CSV manifest."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from galleria.cli.main import main as cli


@pytest.mark.shared
def test_eval_roxford_lopq_json_reproduces_official_values(require_shared, capsys):
    require_shared("oxford5k_lopq128")
    assert cli(["eval", "--dataset", "roxford5k-lopq", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = out["metrics"]
    assert (round(m["E_mAP"], 2), round(m["M_mAP"], 2), round(m["H_mAP"], 2)) == (
        28.89, 21.13, 4.60)
    assert out["queries"] == 70 and out["gallery"] == 4993


@pytest.mark.shared
def test_eval_with_a_transform_is_one_command(require_shared, capsys):
    require_shared("oxford5k_lopq128")
    assert cli(["eval", "-d", "roxford5k-lopq", "--transform", "pca-whiten-reg", "--dim", "128",
                "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # regularised whitening fitted on the 4993 database descriptors (quality.md)
    assert round(out["metrics"]["E_mAP"], 1) == 30.1 and out["dim"] == 128
    assert cli(["eval", "-d", "roxford5k-lopq", "--transform", "aesvc", "--dim", "32",
                "--param", "n_layers=1", "--param", "max_steps=30", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["transform"]["params"]["n_layers"] == 1 and out["dim"] == 32
    assert 0 < out["metrics"]["M_mAP"] < 100


@pytest.mark.shared
def test_eval_ukbench_with_a_real_model(require_shared, capsys):
    require_shared("ukbench56")
    assert cli(["eval", "-d", "ukbench56", "--model", "effnet-lite0", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"]["N-S"] > 3.5 and out["fingerprint"].startswith("effnet-lite0")


def _manifest(tmp_path, photos, split: bool) -> str:
    rows = ["path,label" + (",split" if split else "")]
    for n, p in enumerate(sorted(photos.glob("*.jpg"))):
        img = Image.open(p).convert("RGB")
        for v in range(3):  # three views per photo: crops
            w, h = img.size
            crop = img.crop((v * w // 10, v * h // 10, w - v * w // 12, h - v * h // 12))
            name = f"{p.stem}_{v}.jpg"
            crop.save(tmp_path / name)
            s = ("," + ("test" if v == 0 else "train")) if split else ""
            rows.append(f"{name},{p.stem}{s}")
        assert n < 10
    path = tmp_path / ("split.csv" if split else "loo.csv")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("split", [False, True])
def test_eval_manifest(tmp_path, photos, capsys, split):
    m = _manifest(tmp_path, photos, split)
    assert cli(["eval", "--manifest", m, "--model", "effnet-lite0", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["metrics"]) >= {"mAP@R", "mAP@100", "R@1", "R@5", "R@10"}
    assert out["queries"] == (6 if split else 18) and out["gallery"] == (12 if split else 18)
    assert out["metrics"]["R@1"] >= 80.0  # crops of the same photo find each other


def test_eval_manifest_errors(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.jpg,x\n")
    assert cli(["eval", "--manifest", str(bad)]) == 2
    assert "path" in capsys.readouterr().err
