"""Smoke tests of the transform and adaptive-search benchmarks (``--quick``): they run on
the real data and write their tables and plots; a few numbers are checked against
references (the official cosine mAP of the ROxford5k LOPQ descriptors, closed-form
identities)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@pytest.mark.slow
@pytest.mark.shared
def test_bench_transforms_quick(require_shared, tmp_path):
    require_shared("oxford5k_lopq128")
    require_shared("revisitop")
    require_shared("smvs_dvd_covers")
    require_shared("caltech101")
    cmd = [sys.executable, str(BENCH / "bench_transforms.py"), "--quick", "--fit-times", "2000",
           "--work", str(tmp_path / "work"), "--results-dir", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=1500, capture_output=True)
    result = json.loads((tmp_path / "transforms_quick.json").read_text())
    md = (tmp_path / "transforms_quick.md").read_text()
    setups = {s["key"]: s for s in result["setups"]}
    assert set(setups) == {"roxford5k-lopq", "smvs-transductive"}
    lopq = setups["roxford5k-lopq"]["results"]
    # the official cosine mAP of these descriptors (benchmarks/results/quality.md)
    assert lopq["raw"]["full"]["metrics"]["E_mAP"] == pytest.approx(28.89, abs=0.05)
    assert lopq["raw"]["full"]["metrics"]["M_mAP"] == pytest.approx(21.13, abs=0.05)
    for key, s in setups.items():
        res = s["results"]
        for method in ("pca", "pca-whiten", "pca-whiten-reg", "aesvc", "ss2d", "ssd",
                       "matryoshka"):
            for d in s["dims"]:
                m = res[method][str(d)]["metrics"][s["main"]]
                assert 0.0 <= m <= 100.0, (key, method, d)
                assert res[method][str(d)]["cosine_var"] > 0
        assert (tmp_path / f"transforms_quick-cosine-{key}.png").stat().st_size > 1000
    for dataset in ("roxford5k-lopq", "smvs"):
        assert (tmp_path / f"transforms_quick-{dataset}.png").stat().st_size > 1000
    # full whitening of 1280-d vectors fitted on 500 images collapses (rank 499 < 1280)
    smvs = setups["smvs-transductive"]["results"]
    assert smvs["pca-whiten"]["full"]["metrics"]["mAP"] < smvs["raw"]["full"]["metrics"]["mAP"]
    assert [r["kind"] for r in result["fit_times"]["rows"]][:4] == [
        "center", "pca", "pca-whiten", "pca-whiten-reg"]
    assert "transductive" in md and "## Machine" in md


@pytest.mark.slow
@pytest.mark.shared
def test_bench_adaptive_quick(require_shared, tmp_path):
    require_shared("smvs_dvd_covers")
    require_shared("caltech101")
    cmd = [sys.executable, str(BENCH / "bench_adaptive.py"), "--quick", "--n", "20000",
           "--queries", "200", "--results-dir", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=1500, capture_output=True)
    result = json.loads((tmp_path / "adaptive_quick.json").read_text())
    rows = {r["search"]: r for r in result["speed"]["rows"]}
    assert rows["full-size exact (512-d)"]["recall@10_vs_full"] == 1.0
    funnel = rows["funnel 32-d shortlist 200 -> 512-d"]
    assert funnel["qps"] > 0 and funnel["recall@10_vs_full"] > 0.5
    for r in result["retention"].values():
        runs = r["runs"]
        assert runs["full (complete ranking)"]["retention"][r["metric"]] == 1.0
        # a funnel re-scored with the full vectors stays close to full-size search
        same = runs["funnel 32->512, shortlist 200"]["retention_same_length"]
        assert 0.5 < same["R@1"] <= 1.05
    assert "## Retention on real tasks" in (tmp_path / "adaptive_quick.md").read_text()
