"""Tables of ``bench_fusion_transfer.py`` (from its result dict)."""

from __future__ import annotations

import json
from typing import Any


def report(res: dict[str, Any], rows: dict[str, Any], main: dict[str, str]) -> str:
    return "# Fusion transfer\n\n```\n" + json.dumps(res.get("rows", {}), indent=1)[:20000] + "\n```\n"
