"""Servers for the service tests: uvicorn in a thread (fast, shares the test process's
registry) or ``galleria serve`` in a subprocess (for kill -9 and other processes).

Both bind 127.0.0.1 on a free port, wait until ``/readyz`` answers 200 and are
stopped by the context manager (a subprocess is killed if it does not exit).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

BOOT = (
    "import sys; sys.path.insert(0, {tests!r}); import _tiny; "
    "from galleria.cli.main import main; sys.exit(main(sys.argv[1:]))"
)
"""A `galleria` command that also knows the tiny test extractors (tests/_tiny.py)."""


def galleria_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", BOOT.format(tests=str(TESTS)), *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("GALLERIA_THREADS", "1")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {out[-3000:]}")
        try:
            r = httpx.get(url + "/readyz", timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"server at {url} not ready after {timeout} s: {last}")


@contextlib.contextmanager
def thread_server(config: Any, *, timeout: float = 60) -> Iterator[str]:
    """``create_app(config)`` served by uvicorn in a thread; yields the base URL."""
    import uvicorn

    from galleria.service.app import create_app

    port = free_port()
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    t = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout)
        yield url
    finally:
        server.should_exit = True
        t.join(timeout=30)
        assert not t.is_alive(), "uvicorn thread did not stop"


class ProcessServer:
    """``galleria serve`` in a subprocess (its own process group)."""

    def __init__(self, gallery: Path, *args: str, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = galleria_cmd("serve", str(gallery), "--port", str(self.port),
                                "--log-level", "warning", *args)
        self.log = log
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 120) -> ProcessServer:
        out: Any = open(self.log, "a") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, env=env(), stdout=out, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        try:
            wait_ready(self.url, timeout, self.proc)
        except BaseException:
            self.kill9()
            raise
        return self

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill9()

    def __enter__(self) -> ProcessServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
