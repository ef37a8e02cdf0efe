"""`make demo` (examples/demo.py) runs end to end and its answers are right: the demo is
the README's first command, so it must never break silently (it once parsed
`search --json` as one array after that output became JSON Lines)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_and_finds_the_covers(tmp_path):
    out = tmp_path / "demo-out"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--out",
                           str(out)], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if "Recall@1:" in ln]
    assert lines, proc.stdout[-2000:]
    for ln in lines:  # e.g. "photos: 19 queries, Recall@1: global 100.0%, local 94.7%, ..."
        recalls = [float(m) for m in re.findall(r"([0-9.]+)%", ln.split("Recall@1:")[1])]
        assert max(recalls) >= 90.0, ln  # the best pipeline finds the right image
    assert len(list(out.glob("*-results.html"))) == len(lines)
