"""Run a function as an unprivileged user (for permission tests when the suite runs as root).

Root reads files whatever their mode, so ``chmod 000`` proves nothing there.
:func:`run_as_nobody` forks, drops to uid/gid 65534 in the child (modules are
already imported: the child needs no file under /root) and returns what the
function returned (JSON), bounded in time. Skips when not root or when the
system refuses ``setuid``.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

NOBODY = 65534


def run_as_nobody(fn: Callable[[], Any], *, timeout_s: float = 20.0) -> Any:
    if not hasattr(os, "fork") or os.geteuid() != 0:
        pytest.skip("needs root (to drop to an unprivileged user)")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        except OSError as exc:
            payload, code = {"setuid": str(exc)}, 3
        else:
            try:
                payload = {"ok": fn()}
            except BaseException:
                payload, code = {"error": traceback.format_exc()}, 1
        try:
            os.write(w, json.dumps(payload).encode())
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + timeout_s
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            raise AssertionError(f"unprivileged child did not finish in {timeout_s} s")
        time.sleep(0.02)
    chunks = []
    while block := os.read(r, 65536):
        chunks.append(block)
    os.close(r)
    out = json.loads(b"".join(chunks) or b"{}")
    if "setuid" in out:
        pytest.skip(f"cannot drop privileges here: {out['setuid']}")
    if "error" in out or "ok" not in out:
        raise AssertionError(f"unprivileged child failed:\n{out.get('error', out)}")
    return out["ok"]
