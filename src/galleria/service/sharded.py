"""``galleria serve --ray ADDRESS``: the service's global searches on Ray shards.

One Ray session for the service's life; the plain global pipeline is answered by a
:class:`~galleria.distributed.ray_search.ShardedSearcher` (S shard actors, queries
embedded in the service process, top-k merged). Everything else keeps the
single-process searchers: an upgrade in progress (backfill search reads two spaces,
sharded search serves one), and the local-feature pipelines.

A searcher replaced when the gallery's state changes (an upgrade starts or
finishes) is closed before its successor opens: its shards hold the cluster's CPUs
the new ones need. A request still searching it gets a ClusterError, and the engine
answers it again with the new searcher (the state token changed).
"""

from __future__ import annotations

import logging
from typing import Any

from galleria.errors import InputError

log = logging.getLogger(__name__)


class ShardPool:
    """The Ray connection and the sharded searchers of one service process.

    Args:
        address: Ray cluster address (``host:port``, ``auto`` or ``local``).
        shards: number of shard actors per searcher (>= 1).
        connect_timeout_s: how long to wait for the cluster.

    Raises:
        MissingDependencyError: Ray is not installed.
        ClusterError: the address does not answer.
    """

    def __init__(self, address: str, shards: int, *, connect_timeout_s: float = 30.0,
                 cpus_per_shard: float = 1.0) -> None:
        from galleria.distributed.cluster import connect

        if isinstance(shards, bool) or int(shards) < 1:
            raise InputError(f"--shards must be a positive integer, got {shards!r}")
        self.address, self.shards = address, int(shards)
        self.cpus_per_shard = float(cpus_per_shard)
        self._session = connect(address, timeout_s=connect_timeout_s)

    @staticmethod
    def serves(pipeline: str, token: tuple[Any, ...]) -> bool:
        """Whether the sharded searcher answers ``pipeline`` in state ``token``
        (``(primary_space, upgrade state, finishing marker, ...)``)."""
        return pipeline == "global" and token[1] is None and token[2] is None

    def open(self, gallery: Any, *, runtime: str, threads: int | None) -> Any:
        """A sharded searcher of the gallery's primary space."""
        from galleria.distributed.ray_search import ShardedSearcher

        s = ShardedSearcher(gallery, self.shards, runtime=runtime, threads=threads,
                            cpus_per_shard=self.cpus_per_shard)
        log.info("sharded search: %d shards (%s) on %s", self.shards, s.strategy,
                 self.address)
        return s

    def release(self, searcher: Any) -> None:
        """Close ``searcher`` if it is a sharded one (its actors and placement group)."""
        if is_sharded(searcher):
            try:
                searcher.close()
            except Exception as exc:  # a dead cluster: nothing left to release
                log.warning("closing a sharded searcher failed: %s", exc)

    def close(self) -> None:
        """Close the Ray session (the engine releases its searchers first)."""
        self._session.close()


def is_sharded(searcher: Any) -> bool:
    return type(searcher).__name__ == "ShardedSearcher"
