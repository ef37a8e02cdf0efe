"""`galleria eval --local ... --pipeline ...` on a small real set (Oxford affine)."""

from __future__ import annotations

import json

import pytest

from galleria.cli.main import main as cli


@pytest.mark.shared
@pytest.mark.slow  # ~2 min on a loaded 2-core machine (three pipelines, CANN flat)
def test_eval_local_pipelines_on_oxford_affine(require_shared, capsys):
    require_shared("oxford_affine")
    args = ["eval", "-d", "oxford_affine", "--local", "sift", "--json", "-q", "--threads", "2"]
    assert cli([*args, "--pipeline", "local"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pipeline"] == "local" and out["index"]["type"] == "asmk"
    assert out["fingerprint"].startswith("sift-1000-1024@") and out["dim"] == 128
    assert out["queries"] == out["gallery"] == 48
    # 8 scenes x 6 views: local features find the other views (global effnet: ~76 mAP@R)
    assert out["metrics"]["R@1"] == 100.0 and out["metrics"]["mAP@R"] > 90
    assert set(out) >= {"dataset", "protocol", "model", "metrics", "seconds"}

    assert cli([*args, "--pipeline", "local+mds", "--pipeline-param", "k=10"]) == 0
    mds = json.loads(capsys.readouterr().out)
    assert mds["pipeline_params"]["k"] == 10 and mds["metrics"]["R@1"] >= 95

    assert cli([*args, "--pipeline", "local", "--local-index", "cann"]) == 0
    cann = json.loads(capsys.readouterr().out)
    assert cann["index"]["type"] == "cann" and cann["metrics"]["R@1"] == 100.0

    assert cli([*args, "--pipeline", "local+mds", "--pipeline-param", "shortlist=3"]) == 2
    assert "unknown" in capsys.readouterr().err
