"""Prometheus text exposition (format 0.0.4) of the service's counters, no dependency.

Names are prefixed ``galleria_``: request counts by endpoint / method / status,
latency histograms by endpoint, and gauges the engine sets (gallery size per
space, upgrade fraction, queue depth...).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0)
"""Latency histogram bucket bounds in seconds."""

Labels = tuple[tuple[str, str], ...]


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = (*labels, *extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in items) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


class Metrics:
    """Thread-safe counters, histograms and gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[Labels, int] = {}
        self._hist: dict[Labels, list[float]] = {}  # bucket counts..., sum, count
        self._gauges: dict[str, tuple[str, dict[Labels, float]]] = {}
        self._counters: dict[str, tuple[str, dict[Labels, float]]] = {}
        self._collectors: list[Callable[[Metrics], None]] = []

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        key: Labels = (("endpoint", endpoint), ("method", method), ("status", str(status)))
        hk: Labels = (("endpoint", endpoint),)
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1
            h = self._hist.get(hk)
            if h is None:
                h = self._hist[hk] = [0.0] * (len(BUCKETS) + 2)
            i = bisect.bisect_left(BUCKETS, seconds)
            if i < len(BUCKETS):
                h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def set_gauge(self, name: str, value: float, help_text: str = "",
                  labels: Labels = ()) -> None:
        with self._lock:
            _, vals = self._gauges.setdefault(name, (help_text, {}))
            vals[labels] = float(value)

    def clear_gauge(self, name: str) -> None:
        with self._lock:
            if name in self._gauges:
                self._gauges[name][1].clear()

    def inc(self, name: str, value: float = 1.0, help_text: str = "",
            labels: Labels = ()) -> None:
        with self._lock:
            _, vals = self._counters.setdefault(name, (help_text, {}))
            vals[labels] = vals.get(labels, 0.0) + float(value)

    def add_collector(self, fn: Callable[[Metrics], None]) -> None:
        """``fn(metrics)`` runs before each exposition (to set gauges)."""
        self._collectors.append(fn)

    def requests_total(self) -> int:
        with self._lock:
            return sum(self._requests.values())

    def render(self) -> str:
        for fn in self._collectors:
            fn(self)
        out: list[str] = []
        with self._lock:
            out += ["# HELP galleria_requests_total HTTP requests answered, by endpoint, "
                    "method and status.", "# TYPE galleria_requests_total counter"]
            for lab, n in sorted(self._requests.items()):
                out.append(f"galleria_requests_total{_labels(lab)} {n}")
            out += ["# HELP galleria_request_duration_seconds Time to answer a request, by "
                    "endpoint.", "# TYPE galleria_request_duration_seconds histogram"]
            for lab, h in sorted(self._hist.items()):
                acc = 0.0
                for b, c in zip(BUCKETS, h, strict=False):
                    acc += c
                    out.append(f"galleria_request_duration_seconds_bucket"
                               f"{_labels(lab, (('le', _num(b)),))} {_num(acc)}")
                out.append(f"galleria_request_duration_seconds_bucket"
                           f"{_labels(lab, (('le', '+Inf'),))} {_num(h[-1])}")
                out.append(f"galleria_request_duration_seconds_sum{_labels(lab)} {h[-2]!r}")
                out.append(f"galleria_request_duration_seconds_count{_labels(lab)} "
                           f"{_num(h[-1])}")
            for kind, table in (("counter", self._counters), ("gauge", self._gauges)):
                for name, (doc, vals) in sorted(table.items()):
                    out.append(f"# HELP {name} {doc or name}")
                    out.append(f"# TYPE {name} {kind}")
                    for lab, v in sorted(vals.items()):
                        out.append(f"{name}{_labels(lab)} {_num(v)}")
        return "\n".join(out) + "\n"
