"""Smoke test of the search benchmark (``--quick``): it runs and writes its tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.shared
def test_bench_search_quick(require_shared, tmp_path):
    root = require_shared("oxford5k_lopq128").parent
    require_shared("revisitop")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_search.py"), "--quick",
           "--datasets", str(root), "--results-dir", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=900, capture_output=True)
    result = json.loads((tmp_path / "search_quick.json").read_text())
    md = (tmp_path / "search_quick.md").read_text()
    assert not result["partial"]
    exact = [r for r in result["rows"] if r["kind"] == "exact"]
    ann = [r for r in result["rows"] if r["kind"] == "ann"]
    assert len(exact) == 3 and len(ann) == 6  # real ROxford + 2 synthetic configs
    for r in exact:
        assert r["recall_faiss"] > 0.99 and r["qpsB_galleria"] > 0 and r["qpsB_faiss"] > 0
    for r in ann:
        assert r.get("recall_galleria", 0) >= 0.95, r
    assert "galleria vs FAISS direct" in md and "## Machine" in md


@pytest.mark.slow
@pytest.mark.shared
def test_bench_compressed_quick(require_shared, tmp_path):
    import os

    root = require_shared("oxford5k_lopq128").parent
    require_shared("revisitop")
    env = {**os.environ, "GALLERIA_BENCH_OUT": str(tmp_path / "out")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_compressed.py"), "--quick",
           "--dims", "128", "--results-dir", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=900, capture_output=True,
                   env={**env, "GALLERIA_DATASETS": str(root)})
    result = json.loads((tmp_path / "compressed_quick.json").read_text())
    assert not result["partial"]
    rows = {(r["data"], r["method"]): r for r in result["rows"]}
    for data in ("ROxford5k LOPQ (real, 70 queries)", "grown 128-d"):
        for m in ("exact", "exact-bf16", "exact-int8"):
            assert rows[(data, m)]["recall"] == 1.0, rows[(data, m)]
            assert rows[(data, m)]["qps_batch"] > 0
    assert rows[("grown 128-d", "exact-int8")]["scored_vs_flat"] == 0.25
    assert "grown from 5063 real vectors" in (tmp_path / "compressed_quick.md").read_text()


@pytest.mark.slow
@pytest.mark.shared
def test_bench_filters_quick(require_shared, tmp_path):
    """bench_filters.py --quick (20k x 128 grown from the real LOPQ descriptors): every
    strategy's answers equal brute force (the script asserts it) and the tables exist."""
    import os

    require_shared("oxford5k_lopq128")
    env = {**os.environ, "GALLERIA_BENCH_OUT": str(tmp_path / "out"),
           "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_filters.py"), "--quick",
           "--selectivities", "0.5", "0.001", "--results-dir", str(tmp_path)]
    subprocess.run(cmd, check=True, timeout=900, capture_output=True, env=env)
    result = json.loads((tmp_path / "filters_quick.json").read_text())
    strategies = {r["selectivity"]: r["strategy"] for r in result["rows"]}
    assert strategies[0.001] == "pre" and len(result["rows"]) == 4
    assert "Filtered vs unfiltered" in (tmp_path / "filters_quick.md").read_text()
