"""Connecting to a Ray cluster, with clear errors; what a failed remote call means.

Ray is optional (``pip install galleria[ray]``): nothing here imports it at
module import time. :func:`connect` checks that the address answers before
handing it to ``ray.init`` (which otherwise retries for minutes), bounds the
connection in time and names the address in every error. A driver that was
already connected (``ray.is_initialized()``) is reused and left connected.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from galleria.errors import ClusterError, InputError, MissingDependencyError

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 30.0
NAMESPACE = "galleria"


def require_ray() -> Any:
    """The ``ray`` module, or a MissingDependencyError saying how to install it."""
    try:
        import ray  # lazy: ray
    except ImportError as exc:  # pragma: no cover - exercised with a blocked import
        raise MissingDependencyError(
            "distributed indexing and search need Ray: pip install 'galleria[ray]' "
            f"(import failed: {exc})") from exc
    return ray


def parse_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` / ``ray://host:port``; ``None`` for auto/local.

    Raises:
        InputError: not an address Ray understands.
    """
    if not isinstance(address, str) or not address.strip():
        raise InputError(f"a Ray address is host:port, ray://host:port, auto or local; "
                         f"got {address!r}")
    a = address.strip()
    if a in ("auto", "local"):
        return None
    if a.startswith("ray://"):
        a = a[len("ray://"):]
    host, sep, port = a.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"a Ray address is host:port (e.g. 10.0.0.5:6379), ray://host:port, "
                         f"auto or local; got {address!r}")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float) -> None:
    """Raise ClusterError unless something accepts TCP connections at ``address``."""
    hp = parse_address(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}; waited up to "
            f"{timeout_s:g} s). Start it with `ray start --head` on that machine, or check the "
            "address (the head node's GCS port, 6379 by default)") from exc


@dataclass
class Session:
    """A driver connection to a Ray cluster; ``owned``: this call connected (and will
    disconnect)."""

    address: str
    owned: bool

    def close(self) -> None:
        if self.owned:
            ray = require_ray()
            with contextlib.suppress(Exception):
                ray.shutdown()
            self.owned = False


def connect(address: str, *, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
            init_options: dict[str, Any] | None = None) -> Session:
    """Connect this process to the Ray cluster at ``address`` (``auto``/``local`` as Ray).

    Raises:
        MissingDependencyError: Ray is not installed.
        ClusterError: nothing answers at the address, or Ray did not connect within
            ``timeout_s`` (the message names the address).
    """
    ray = require_ray()
    if ray.is_initialized():
        _check_same_cluster(ray, address)
        return Session(address, owned=False)
    check_reachable(address, min(timeout_s, 10.0))
    opts: dict[str, Any] = {"address": address, "namespace": NAMESPACE,
                            "logging_level": logging.WARNING, "configure_logging": False,
                            "log_to_driver": False}
    if address == "local":
        opts.update(include_dashboard=False)
    opts.update(init_options or {})
    box: dict[str, Any] = {}

    def _init() -> None:
        try:
            ray.init(**opts)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=_init, name="ray-connect", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise ClusterError(f"the Ray cluster at {address} did not accept this driver within "
                           f"{timeout_s:g} s (is it a Ray head node's GCS port, and the same "
                           "Ray version?)")
    if "error" in box:
        exc = box["error"]
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: "
                           f"{type(exc).__name__}: {exc}") from exc
    log.info("connected to the Ray cluster at %s", address)
    return Session(address, owned=True)


def _check_same_cluster(ray: Any, address: str) -> None:
    """A process talks to one Ray cluster: refuse another address than the connected one."""
    want = parse_address(address)
    try:
        have = parse_address(ray.get_runtime_context().gcs_address)
    except Exception:  # not knowable (client mode): trust the caller
        return
    if want is None or have is None or (want[1] == have[1] and (
            want[0] == have[0] or _is_local(want[0]) or _is_local(have[0]))):
        return
    raise ClusterError(f"this process is already connected to the Ray cluster at "
                       f"{have[0]}:{have[1]}; it cannot also use {address}")


def _is_local(host: str) -> bool:
    if host in ("localhost", "127.0.0.1", "::1"):
        return True
    try:
        return host in socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        return False


@contextlib.contextmanager
def session(address: str, **kw: Any) -> Iterator[Session]:
    """``with session(address):`` connect for the block (disconnect if it connected)."""
    s = connect(address, **kw)
    try:
        yield s
    finally:
        s.close()


def alive_nodes() -> list[dict[str, Any]]:
    """``ray.nodes()`` entries of the nodes that are alive."""
    ray = require_ray()
    return [n for n in ray.nodes() if n.get("Alive")]


def cluster_cpus() -> float:
    """CPUs of the alive nodes of the connected cluster."""
    return float(sum(n.get("Resources", {}).get("CPU", 0.0) for n in alive_nodes()))


def worker_lost_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of a remote call whose worker, node or result was lost (retryable)."""
    ray = require_ray()
    ex = ray.exceptions
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
             "NodeDiedError", "ObjectLostError", "OwnerDiedError",
             "ObjectReconstructionFailedError", "LocalRayletDiedError")
    return tuple(getattr(ex, n) for n in names if isinstance(getattr(ex, n, None), type))


def unwrap_task_error(exc: BaseException) -> BaseException:
    """The exception a remote method raised (a GalleriaError stays one), from RayTaskError."""
    ray = require_ray()
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return exc


def import_modules(names: Sequence[str]) -> None:
    """Import ``names`` in a worker (modules that register a user's own extractors)."""

    for name in names:
        importlib.import_module(name)
