"""Smoke test of the service load test (``--quick``: 100 SMVS images + 30 Caltech-101, 8
clients, an upgrade effnet-lite0 -> effnet-lite2 with additions and removals meanwhile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.shared
def test_bench_service_quick(require_shared, tmp_path):
    root = require_shared("smvs_dvd_covers").parent
    require_shared("caltech101")
    env = {**os.environ, "GALLERIA_DATASETS": str(root),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_service.py"), "--quick",
           "--workdir", str(tmp_path / "work"), "--results-dir", str(tmp_path)]
    p = subprocess.run(cmd, env=env, timeout=1200, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "service_quick.json").read_text())
    a = res["audit"]
    assert a["errors"] == 0 and a["results_missing_or_duplicated"] == 0
    assert a["sampled_mismatches"] == 0 and a["sampled_equal_brute_force"] > 20
    assert res["final_space_counts"] == {next(iter(res["final_space_counts"])): 120}
    assert "## Correctness" in (tmp_path / "service_quick.md").read_text()
