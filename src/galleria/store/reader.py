"""Reading a consistent state of a space: its data, and views built from it.

Everything here runs inside one SQLite read transaction, so the space row
(generation, count), the change log and the vector rows all describe the same
committed state. Segment files are verified (size and SHA-256) before their
rows are trusted when a whole space is read; a damaged file is a
:class:`~galleria.errors.FormatError` naming it, the items it holds and
``galleria repair`` -- never silently wrong scores.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galleria.errors import CompatibilityError, FormatError
from galleria.index.factory import create_index
from galleria.local.factory import create_local_index, local_index_kind
from galleria.store.db import chunks
from galleria.store.segments import check_file, open_array, unpack_local
from galleria.store.source import ChainSource, space_source
from galleria.store.views import IdMap, KeyFilter, SpaceView, copy_index, load_any_index
from galleria.types import LocalFeatures

log = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SpaceRow:
    space: str
    dim: int
    kind: str
    generation: int
    count: int
    log_floor: int
    spec: str
    params: dict[str, Any]
    info: dict[str, Any]


def space_row(c: sqlite3.Connection, space: str, where: Path) -> SpaceRow:
    r = c.execute(
        "SELECT dim, kind, generation, count, log_floor, index_spec, index_params, info "
        "FROM spaces WHERE space=?", (space,)).fetchone()
    if r is None:
        known = [x[0] for x in c.execute("SELECT space FROM spaces ORDER BY created")]
        raise CompatibilityError(f"gallery {where} has no space {space!r}; it has {known}")
    return SpaceRow(space, int(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4]), str(r[5]),
                    json.loads(r[6]), json.loads(r[7]))


def _damaged(root: Path, file: str, problem: str, n_items: int) -> FormatError:
    return FormatError(
        f"{root / file} is damaged ({problem}); it holds the data of {n_items} items. "
        f"Run `galleria check {root}` for the list and `galleria repair {root}` to restore them"
    )


def load_space(c: sqlite3.Connection, root: Path, row: SpaceRow, *, verify: bool = True,
               keys_filter: KeyFilter | None = None) -> tuple[np.ndarray, Any]:
    """Every item of the space (of one shard with ``keys_filter``): ``(keys (N,) sorted,
    data)``; data is ``(N, D)`` float32 for a global space, ``list[LocalFeatures]`` for a
    local one."""
    cond, args = keys_filter.sql() if keys_filter is not None else ("1", ())
    segs = c.execute("SELECT segment, file, nbytes, sha256 FROM segments WHERE space=? "
                     "ORDER BY segment", (row.space,)).fetchall()
    keys_parts: list[np.ndarray] = []
    data_parts: list[Any] = []
    sizes = _image_sizes(c, row) if row.kind == "local" else {}
    for seg, file, nbytes, sha in segs:
        rows = np.array(c.execute(f"SELECT key, row, n FROM vectors WHERE segment=? AND {cond} "
                                  "ORDER BY row", (seg, *args)).fetchall(),
                        dtype=np.int64).reshape(-1, 3)
        if not len(rows):
            continue
        if verify:
            problem = check_file(root / file, int(nbytes), sha, deep=True)
            if problem:
                raise _damaged(root, file, problem, len(rows))
        arr = open_array(root / file, int(nbytes))
        keys_parts.append(rows[:, 0])
        if row.kind == "global":
            vecs = np.asarray(arr[rows[:, 1]], dtype=np.float32)
            if verify:
                _check_values(vecs, root / file, row.space)
            data_parts.append(vecs)
        else:
            data_parts.append([unpack_local(arr, int(r), int(n), sizes.get(int(k), (0, 0)))
                               for k, r, n in rows])
    if not keys_parts:
        empty: Any = np.zeros((0, row.dim), np.float32) if row.kind == "global" else []
        return np.zeros(0, np.int64), empty
    keys = np.concatenate(keys_parts)
    order = np.argsort(keys, kind="stable")
    if row.kind == "global":
        return keys[order], np.concatenate(data_parts)[order]
    flat = [f for part in data_parts for f in part]
    return keys[order], [flat[i] for i in order]


def _check_values(vecs: np.ndarray, file: Path, space: str) -> None:
    if not len(vecs):
        return
    norms = np.linalg.norm(vecs, axis=1)
    bad = ~np.isfinite(norms) | (np.abs(norms - 1.0) > NORM_TOLERANCE)
    if bad.any():
        raise FormatError(
            f"{file} holds {int(bad.sum())} vectors of {space!r} that are not finite unit "
            f"vectors (norms like {norms[bad][:3].tolist()}); the file was altered. Run "
            f"`galleria repair {file.parent.parent.parent}`"
        )


def _image_sizes(c: sqlite3.Connection, row: SpaceRow, keys: Sequence[int] | None = None
                 ) -> dict[int, tuple[int, int]]:
    if keys is None:
        q = c.execute("SELECT i.key, i.meta FROM items i JOIN vectors v ON v.key=i.key "
                      "WHERE v.space=?", (row.space,))
        found = q.fetchall()
    else:
        found = []
        for ch in chunks(list(keys)):
            q = ",".join("?" * len(ch))
            found += c.execute(f"SELECT key, meta FROM items WHERE key IN ({q})", ch).fetchall()
    out = {}
    for k, m in found:
        size = json.loads(m).get("image_size")
        if isinstance(size, list) and len(size) == 2:
            out[int(k)] = (int(size[0]), int(size[1]))
    return out


def fetch(c: sqlite3.Connection, root: Path, row: SpaceRow, keys: np.ndarray) -> Any:
    """Data of ``keys`` (in their order): ``(n, D)`` array or ``list[LocalFeatures]``.

    Raises FormatError when a key has no data in the space or its file is damaged.
    """
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    loc: dict[int, tuple[str, int, int, int]] = {}
    for ch in chunks([int(k) for k in keys]):
        q = ",".join("?" * len(ch))
        for k, f, r, n, nb in c.execute(
            f"SELECT v.key, s.file, v.row, v.n, s.nbytes FROM vectors v JOIN segments s "
            f"ON s.segment = v.segment WHERE v.space=? AND v.key IN ({q})", (row.space, *ch)):
            loc[int(k)] = (f, int(r), int(n), int(nb))
    missing = [int(k) for k in keys if int(k) not in loc]
    if missing:
        raise FormatError(f"{len(missing)} keys have no data in {row.space!r}: {missing[:5]}")
    arrays: dict[str, np.ndarray] = {}
    for f, _, _, nb in loc.values():
        if f not in arrays:
            arrays[f] = open_array(root / f, nb)
    if row.kind == "global":
        out = np.empty((len(keys), row.dim), np.float32)
        for i, k in enumerate(keys):
            f, r, _, _ = loc[int(k)]
            out[i] = arrays[f][r]
        return out
    sizes = _image_sizes(c, row, [int(k) for k in keys])
    return [unpack_local(arrays[loc[int(k)][0]], loc[int(k)][1], loc[int(k)][2],
                         sizes.get(int(k), (0, 0))) for k in keys]


def id_map(c: sqlite3.Connection, space: str, keys_filter: KeyFilter | None = None) -> IdMap:
    cond, args = keys_filter.sql("v.key") if keys_filter is not None else ("1", ())
    rows = c.execute("SELECT v.key, i.id FROM vectors v JOIN items i ON i.key = v.key "
                     f"WHERE v.space=? AND {cond}", (space, *args)).fetchall()
    if not rows:
        return IdMap(np.zeros(0, np.int64), [])
    return IdMap(np.array([r[0] for r in rows], np.int64), [r[1] for r in rows])


# --------------------------------------------------------------------- views
def build_view(c: sqlite3.Connection, root: Path, space: str,
               previous: SpaceView | None = None, *,
               keys_filter: KeyFilter | None = None) -> SpaceView:
    """The view of ``space`` at the state ``c``'s read transaction sees.

    Reuses ``previous`` when nothing changed, derives from it by replaying the
    change log when it can, else loads the saved index (verified) or builds one
    from the store. ``keys_filter``: a view of one shard's items only (built from
    the data, never from the whole space's snapshot).
    """
    row = space_row(c, space, root)
    cond, args = keys_filter.sql() if keys_filter is not None else ("1", ())
    same = previous is not None and previous.spec == row.spec and previous.params == row.params
    if same and previous is not None and previous.generation == row.generation:
        return previous
    if same and previous is not None and previous.generation >= row.log_floor:
        logrows = c.execute(f"SELECT op, key FROM log WHERE space=? AND gen>? AND gen<=? "
                            f"AND {cond} ORDER BY gen",
                            (space, previous.generation, row.generation, *args)).fetchall()
        if len(logrows) <= max(10_000, row.count // 2):
            return merge_view(catch_up(c, root, row, previous, logrows),
                              source=source_factory(c, root, space, row.dim))
    return merge_view(fresh_view(c, root, row, keys_filter=keys_filter),
                      source=source_factory(c, root, space, row.dim))


def fresh_view(c: sqlite3.Connection, root: Path, row: SpaceRow, *,
               use_snapshot: bool = True, keys_filter: KeyFilter | None = None) -> SpaceView:
    """A view built without a previous one: saved snapshot + log, or from the data."""
    snap = _load_snapshot(c, root, row) if use_snapshot and keys_filter is None else None
    ids = id_map(c, row.space, keys_filter)
    if snap is not None:
        base, gen = snap
        logrows = c.execute("SELECT op, key FROM log WHERE space=? AND gen>? AND gen<=? "
                            "ORDER BY gen", (row.space, gen, row.generation)).fetchall()
        if getattr(base, "needs_source", False) and not _attach_to_snapshot(c, root, row, base,
                                                                            logrows):
            return fresh_view(c, root, row, use_snapshot=False)
        view = _view(row, base, gen, ids)
        return catch_up(c, root, row, view, logrows)
    keys, data = load_space(c, root, row, keys_filter=keys_filter)
    base = new_index(row)
    if row.kind == "global" and hasattr(base, "attach_source"):
        # a compressed index re-scores against the segment files (no second copy)
        base.attach_source(space_source(c, root, row.space, row.dim))
    if len(keys):
        base.add(keys, data)
    base.generation = row.generation
    return _view(row, base, row.generation, ids, keys_filter)


def _attach_to_snapshot(c: sqlite3.Connection, root: Path, row: SpaceRow, base: Any,
                        logrows: Sequence[tuple[str, int]]) -> bool:
    """Attach the store's vectors to a snapshot saved without them; False: rebuild instead.

    The source describes the current state, so keys changed since the snapshot
    (removed, or removed and added again with new vectors) are dropped from the
    base first: the catch-up then adds their current vectors to the delta, which
    is what a tombstone plus a delta entry would give.
    """
    touched = np.unique(np.array([int(k) for _, k in logrows], dtype=np.int64))
    if touched.size:
        base.remove(touched)
    src = space_source(c, root, row.space, row.dim)
    if len(base) and not np.isin(base.keys(), src.keys).all():
        log.warning("saved %s index of %s has keys the store does not hold; rebuilding it",
                    row.spec, row.space)
        return False
    base.attach_source(src)
    return True


def source_factory(c: sqlite3.Connection, root: Path, space: str, dim: int
                   ) -> Callable[[], Any]:
    """A callable building the store's vector source at ``c``'s state (when needed)."""
    return lambda: space_source(c, root, space, dim)


def new_index(row: SpaceRow) -> Any:
    if row.kind == "local":
        return create_local_index(local_index_kind(row.spec), row.dim, fingerprint=row.space,
                                  **row.params)

    return create_index(row.spec, row.dim, fingerprint=row.space, **row.params)


def _delta_index(row: SpaceRow, base: Any) -> Any:
    if hasattr(base, "empty_like"):
        return base.empty_like()

    spec = "prefix" if row.spec.lower() == "prefix" else "exact"
    return create_index(spec, row.dim, fingerprint=row.space)


def _view(row: SpaceRow, base: Any, gen: int, ids: IdMap,
          keys_filter: KeyFilter | None = None) -> SpaceView:
    empty: Any = np.zeros((0, row.dim), np.float32) if row.kind == "global" else []
    return SpaceView(row.space, row.kind, row.dim, gen, len(base), row.spec, base,
                     np.zeros(0, np.int64), None, np.zeros(0, np.int64), empty, ids, row.params,
                     keys_filter)


def catch_up(c: sqlite3.Connection, root: Path, row: SpaceRow, prev: SpaceView,
             logrows: Sequence[tuple[str, int]]) -> SpaceView:
    """A new view: ``prev`` plus the net effect of ``logrows`` (base untouched)."""
    last: dict[int, str] = {}
    for op, key in logrows:
        last[int(key)] = op
    if not last:
        return _replace(prev, row, prev.removed, prev.delta, prev.delta_keys, prev.delta_data,
                        prev.ids)
    touched = np.fromiter(last, dtype=np.int64, count=len(last))
    base_keys = prev.base.keys() if len(prev.base) else np.zeros(0, np.int64)
    in_base = touched[np.isin(touched, base_keys)]
    removed = np.union1d(prev.removed, in_base).astype(np.int64)
    keep = ~np.isin(prev.delta_keys, touched)
    d_keys = prev.delta_keys[keep]
    if row.kind == "global":
        d_data: Any = prev.delta_data[keep]
    else:
        d_data = [f for f, k in zip(prev.delta_data, keep, strict=True) if k]
    adds = np.array(sorted(k for k, op in last.items() if op == "add"), dtype=np.int64)
    ids = prev.ids
    if len(adds):
        new_data = fetch(c, root, row, adds)
        d_keys = np.concatenate([d_keys, adds])
        d_data = np.concatenate([d_data, new_data]) if row.kind == "global" else \
            [*d_data, *new_data]
        unknown = adds[[x is None for x in ids.lookup(adds)]]
        if len(unknown):
            found = []
            for ch in chunks([int(k) for k in unknown]):
                found += c.execute(f"SELECT key, id FROM items WHERE key IN "
                                   f"({','.join('?' * len(ch))})", ch).fetchall()
            ids = ids.with_added([r[0] for r in found], [r[1] for r in found])
    delta = None
    if len(d_keys):
        delta = _delta_index(row, prev.base)
        delta.add(d_keys, d_data)
    return _replace(prev, row, removed, delta, d_keys, d_data, ids)


def _replace(prev: SpaceView, row: SpaceRow, removed: np.ndarray, delta: Any,
             d_keys: np.ndarray, d_data: Any, ids: IdMap) -> SpaceView:
    count = len(prev.base) - len(removed) + len(d_keys)
    if count != row.count:
        log.debug("view of %s counts %d items, the space row %d", row.space, count, row.count)
    return SpaceView(row.space, row.kind, row.dim, row.generation, count, row.spec, prev.base,
                     removed, delta, d_keys, d_data, ids, row.params, prev.keys_filter)


def merge_view(view: SpaceView, *, force: bool = False,
               source: Callable[[], Any] | None = None) -> SpaceView:
    """Fold a large delta / many tombstones into a new base (built on a copy).

    ``source()``: the store's vectors at the view's state, for a base that
    re-scores against them (compressed indexes); without it, the old source
    chained with the delta's vectors.
    """
    if not (view.needs_merge or (force and (len(view.delta_keys) or len(view.removed)))):
        return view
    base = copy_index(view.base)
    if len(view.removed):
        base.remove(view.removed)
    old_src = getattr(base, "source", None)
    if old_src is not None and view.kind == "global":
        base.attach_source(source() if source is not None else
                           ChainSource(old_src, view.delta_keys, view.delta_data))
    if len(view.delta_keys):
        if view.delta is not None and hasattr(base, "add_index") and \
                len(view.delta) == len(view.delta_keys):
            base.add_index(view.delta)  # ASMK: the delta's codes, not a second quantization
        else:
            base.add(view.delta_keys, view.delta_data)
    base.generation = view.generation
    empty: Any = np.zeros((0, view.dim), np.float32) if view.kind == "global" else []
    return SpaceView(view.space, view.kind, view.dim, view.generation, len(base), view.spec,
                     base, np.zeros(0, np.int64), None, np.zeros(0, np.int64), empty, view.ids,
                     view.params, view.keys_filter)


def saved_snapshot(c: sqlite3.Connection, root: Path, space: str
                   ) -> tuple[str, Any, int] | None:
    """``(folder, index, generation)`` of the last saved snapshot of ``space`` (verified
    as a view loads it), or ``None``: what a reader serving published indexes loads."""
    row = space_row(c, space, root)
    snap = c.execute("SELECT folder FROM index_snapshots WHERE space=?", (space,)).fetchone()
    got = _load_snapshot(c, root, row) if snap is not None else None
    return None if got is None else (str(snap[0]), got[0], got[1])


def _load_snapshot(c: sqlite3.Connection, root: Path, row: SpaceRow) -> tuple[Any, int] | None:
    snap = c.execute("SELECT folder, generation, files, spec FROM index_snapshots WHERE space=?",
                     (row.space,)).fetchone()
    if snap is None:
        return None
    folder, gen, files, spec = snap[0], int(snap[1]), json.loads(snap[2]), snap[3]
    if spec != row.spec or gen < row.log_floor or gen > row.generation:
        return None
    path = root / folder
    for name, meta in files.items():
        problem = check_file(path / name, int(meta["nbytes"]), meta.get("sha256"), deep=True)
        if problem:
            log.warning("saved index %s is damaged (%s: %s); rebuilding it from the store",
                        path, name, problem)
            return None
    try:
        idx = load_any_index(path, fingerprint=row.space, dim=row.dim)
    except (FormatError, CompatibilityError, OSError, ValueError) as exc:
        log.warning("saved index %s unreadable (%s); rebuilding it from the store", path, exc)
        return None
    if hasattr(idx, "set_search_params") and row.params:
        sp = {k: v for k, v in row.params.items() if k in ("nprobe", "ef_search")}
        if sp:
            idx.set_search_params(**sp)
    return idx, gen


def local_dim_dtype(info: dict[str, Any]) -> tuple[int, str]:
    return int(info.get("descriptor_dim", 0)), str(info.get("descriptor_dtype", "float32"))


def as_local_list(features: Sequence[LocalFeatures]) -> list[LocalFeatures]:
    out = list(features)
    for f in out:
        if not isinstance(f, LocalFeatures):
            raise FormatError(f"expected LocalFeatures, got {type(f).__name__}")
    return out
