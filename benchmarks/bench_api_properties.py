"""schemathesis over the service's OpenAPI schema at a given budget: routes, requests,
status counts, 5xx and time (the property test of tests/test_api_properties.py, run
as a measurement).

    .venv/bin/python benchmarks/bench_api_properties.py [--examples 12 100]

Writes ``benchmarks/results/api-properties.{json,md}``.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import machine_info, machine_md, md_table, write_results  # noqa: E402

LINE = re.compile(r"schemathesis: (\d+) routes, (\d+) requests \((\d+) examples per route and "
                  r"mode\), statuses (\{.*?\}), 5xx: (\d+), ([\d.]+) s")


def run(examples: int) -> dict[str, object]:
    env = {**os.environ, "GALLERIA_API_EXAMPLES": str(examples), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    test = str(ROOT / "tests" / "test_api_properties.py")
    out = subprocess.run([sys.executable, "-m", "pytest", test, "-q", "-s", "-p",
                          "no:cacheprovider", "-k", "openapi"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    m = LINE.search(out.stdout)
    if m is None:
        raise SystemExit(f"no schemathesis line in the output:\n{out.stdout[-3000:]}")
    return {"examples_per_route_and_mode": examples, "routes": int(m.group(1)),
            "requests": int(m.group(2)), "statuses": ast.literal_eval(m.group(4)),
            "5xx": int(m.group(5)), "seconds_requests": float(m.group(6)),
            "seconds_test": round(time.perf_counter() - t, 1), "passed": out.returncode == 0,
            "load_average": os.getloadavg()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, nargs="+", default=[12, 100])
    args = ap.parse_args()
    info = machine_info(threads=1)
    rows = [run(n) for n in args.examples]
    for r in rows:
        print(r, flush=True)
    info["load_average_at_end"] = os.getloadavg()
    table = md_table([{**r, "statuses": ", ".join(f"{k}: {v}" for k, v in r["statuses"].items()),
                       "load": round(r["load_average"][0], 1)} for r in rows],
                     [("examples_per_route_and_mode", "examples / route / mode"),
                      ("routes", "routes"), ("requests", "requests"), ("statuses", "statuses"),
                      ("5xx", "5xx"), ("seconds_requests", "s (requests)"),
                      ("seconds_test", "s (pytest)"), ("passed", "passed"), ("load", "load")])
    md = ("# schemathesis over the OpenAPI schema of `galleria serve`\n\n"
          "Every route of `/openapi.json`, schema-conforming (positive) and schema-violating "
          "(negative) requests, derandomized; a tiny-model gallery of 6 synthetic images; "
          "hypothesis stops a route early when its input space is small (a route without "
          "parameters has one positive and no negative request).\n\n" + table
          + "\nCommand: `.venv/bin/python benchmarks/bench_api_properties.py`\n\n## Machine\n\n"
          + machine_md(info))
    j, m = write_results("api-properties", {"rows": rows, "machine": info}, md)
    print(f"wrote {j} and {m}")
    return 0 if all(r["passed"] and r["5xx"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
