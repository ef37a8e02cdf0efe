"""A simulated multi-node Ray cluster on this machine, on 127.0.0.1 (tests, benchmarks).

``ray.cluster_utils.Cluster`` starts a head node (GCS + raylet) and worker nodes
(one raylet each) as subprocesses of this process; every node binds 127.0.0.1:
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray use the loopback address as
the node address (this is an entry point: the variable is set for the duration
and restored). Workers import galleria (``src``) and the tests' registered tiny
extractors (``tests``) through ``PYTHONPATH``. No dashboard; a small object store.
:func:`sim_cluster` stops everything and checks that no Ray process of it is left.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OBJECT_STORE = 80 << 20


def _env() -> dict[str, str]:
    paths = [str(ROOT / "src"), str(ROOT / "tests")]
    old = os.environ.get("PYTHONPATH")
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])),
            "RAY_USAGE_STATS_ENABLED": "0"}


def descendants(root: int | None = None) -> set[int]:
    """Pids of every process below ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = (int(v) for v in line.split())
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    left = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] != "Z":
                    left.add(p)
        except OSError:
            pass
    return left


class SimCluster:
    def __init__(self, nodes: int, cpus: float, head_cpus: float | None = None) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": cpus if head_cpus is None else head_cpus,
            "include_dashboard": False, "object_store_memory": OBJECT_STORE,
            "node_ip_address": "127.0.0.1"})
        self.workers: list[Any] = []
        self.left: set[int] = set()
        for _ in range(nodes - 1):
            self.add_node(cpus, wait=False)
        self.cluster.wait_for_nodes()
        self.address = self.cluster.address
        self.pids = descendants()

    def add_node(self, cpus: float, *, wait: bool = True) -> Any:
        n = self.cluster.add_node(num_cpus=cpus, object_store_memory=OBJECT_STORE,
                                  node_ip_address="127.0.0.1")
        self.workers.append(n)
        if wait:
            self.cluster.wait_for_nodes()
            self.pids |= descendants()
        return n

    def kill_node(self, node: Any) -> None:
        """Kill a worker node's raylet and its workers at once (no graceful drain)."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def node_id(self, node: Any) -> str:
        return str(node.node_id)

    def shutdown(self) -> None:
        import ray

        self.pids |= descendants()
        with contextlib.suppress(Exception):
            ray.shutdown()
        self.cluster.shutdown()


@contextlib.contextmanager
def sim_cluster(nodes: int = 3, cpus: float = 1, *, head_cpus: float | None = None,
                connect: bool = True) -> Iterator[SimCluster]:
    """Start ``nodes`` nodes of ``cpus`` CPUs (the head included), connect this process,
    and on exit stop all of it and wait (bounded) until none of its processes is left
    (``sim.left`` lists any that are)."""
    env = _env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import ray._private.ray_constants as rc  # read at import time: set it for this run too

    was = rc.ENABLE_RAY_CLUSTER
    rc.ENABLE_RAY_CLUSTER = False
    sim = None
    try:
        from galleria.distributed.cluster import connect as _connect

        sim = SimCluster(nodes, cpus, head_cpus)
        if connect:
            _connect(sim.address, timeout_s=120,
                     init_options={"logging_level": "ERROR"})
        yield sim
    finally:
        rc.ENABLE_RAY_CLUSTER = was
        if sim is not None:
            sim.shutdown()
            deadline = time.monotonic() + 30
            while alive(sim.pids) and time.monotonic() < deadline:
                time.sleep(0.5)
            sim.left = alive(sim.pids)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
