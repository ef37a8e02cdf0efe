"""Blocked top-k selection over a score matrix computed one block at a time.

:func:`scan_topk` is the selection half of the exact kernel
(:func:`galleria.index.exact.inner_product_topk`) and of the compressed
indexes (:mod:`galleria.index.compressed`): a caller-supplied function writes
each ``(rows, queries)`` score block (a float32 GEMM, a bf16 or int8 GEMM ...)
into a buffer, and the selection below keeps the running top-k per query.

Pruning: each query's ``B`` scores of a block form ``B/g`` groups of ``g``
members (stride ``B/g``); the group maxima are ``g - 1`` element-wise maxima of
long contiguous slabs (the reason for the transposed ``(rows, queries)``
layout). The ``k`` largest group maxima are ``k`` distinct scores, so the k-th
of them is a lower bound on the k-th best score; only groups whose maximum
reaches the running threshold are opened, and only their members above it are
merged into the running top-k. Few groups survive after the first block, so
selection costs about one read of the block.

:func:`scan_window` keeps, instead of a fixed top-k, every row whose score is
within ``slack`` of the k-th best: the candidate set of a search whose scores
carry a known error bound (the compressed indexes).

Every call allocates its own buffers: concurrent calls never share state.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: Preferred score-block size (bytes). Profiled on a quiet machine (1000 queries, k=10, 2
#: threads, real-derived vectors): 8 MB gave 6.7k / 820 / 920 q/s at 100k x 128 / 1M x 128 /
#: 100k x 1280 against 5.9k / 780 / 880 for 32 MB; 4 MB was slower again.
CACHE_BLOCK_BYTES = 8 << 20
MIN_BLOCK_ROWS = 1024
#: Group count g: a block of B rows is pruned through g-member groups of stride B/g.
GROUPS = 64

#: Members per group in :func:`scan_window` (its windows open more groups than a top-k;
#: 16 and 32 were within noise of each other and ahead of 64 and 8 on 100k x 1280 int8 /
#: bf16; thresholding the whole block instead of opening groups was 20-70 % slower).
WINDOW_MEMBERS = 16

#: fill(r0, w, out): write the ``(w, m)`` scores of gallery rows ``[r0, r0 + w)`` into ``out``.
BlockFill = Callable[[int, int, np.ndarray], None]


def lowest(dtype: np.dtype) -> float | int:
    """The "missing" score of ``dtype``: -inf for floats, the minimum for integers."""
    dt = np.dtype(dtype)
    return -np.inf if dt.kind == "f" else int(np.iinfo(dt).min)


def block_shape(q: int, n: int, k: int, max_batch_bytes: int, itemsize: int = 4) -> tuple[int, int]:
    """``(query block, gallery block)`` sizes for a ``(q, n)`` score matrix.

    The gallery block is a multiple of :data:`GROUPS` with at least ``4 * k``
    groups (so pruning works) unless the gallery is smaller;
    ``qb * rows * itemsize`` stays within ``max_batch_bytes``.
    """
    budget = max(int(max_batch_bytes), itemsize * MIN_BLOCK_ROWS)
    min_rows = min(-(-n // GROUPS) * GROUPS, max(MIN_BLOCK_ROWS, 4 * k * GROUPS))
    # queries per block: as many as keep a minimum-width block in cache (a large k needs
    # wide blocks: top-200 over 1M x 32-d ran 2.5 s with 1000-query blocks of 204 MB,
    # 1.2 s with 40-query blocks of 8 MB)
    qb = max(1, min(q, CACHE_BLOCK_BYTES // (itemsize * min_rows), budget // (itemsize * min_rows)))
    rows = max(min(budget, CACHE_BLOCK_BYTES) // (itemsize * qb), min_rows)
    rows = min(rows, budget // (itemsize * qb), -(-n // GROUPS) * GROUPS)
    rows = max(GROUPS, rows // GROUPS * GROUPS)
    return qb, rows


def merge_topk(
    best_s: np.ndarray,
    best_r: np.ndarray,
    thr: np.ndarray,
    rows: np.ndarray,
    vals: np.ndarray,
    cols: np.ndarray,
) -> np.ndarray:
    """Merge candidates ``(rows[i], vals[i], cols[i])`` (sorted by row) into the running top-k.

    ``best_s``/``best_r`` are ``(m, k)``; ``thr`` (the k-th best score per query)
    is updated in place. Returns the queries whose top-k changed.
    """
    m, k = best_s.shape
    if rows.size == 0:
        return np.empty((0,), np.int64)
    counts = np.bincount(rows, minlength=m)
    act = np.flatnonzero(counts)
    slot = np.cumsum(counts > 0) - 1  # query -> row of the merge table
    start = np.cumsum(counts) - counts
    width = k + int(counts.max())
    table_s = np.full((act.size, width), lowest(best_s.dtype), best_s.dtype)
    table_r = np.full((act.size, width), -1, np.int64)
    table_s[:, :k] = best_s[act]
    table_r[:, :k] = best_r[act]
    pos = np.arange(rows.size) - start[rows] + k
    table_s[slot[rows], pos] = vals
    table_r[slot[rows], pos] = cols
    top = np.argpartition(table_s, width - k, axis=1)[:, width - k :]
    best_s[act] = np.take_along_axis(table_s, top, 1)
    best_r[act] = np.take_along_axis(table_r, top, 1)
    thr[act] = best_s[act].min(axis=1)
    return act


def scan_topk(
    prepare: Callable[[int, int], BlockFill],
    n: int,
    nq: int,
    kk: int,
    *,
    max_batch_bytes: int,
    dtype: type = np.float32,
    block: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``kk`` rows per query of an ``(nq, n)`` score matrix produced block by block.

    Args:
        prepare: ``prepare(q0, q1)`` returns ``fill(r0, w, out)`` for queries ``[q0, q1)``,
            which writes the ``(w, q1 - q0)`` scores (dtype ``dtype``) of rows ``[r0, r0 + w)``
            into the C-contiguous ``out``.
        n, nq: gallery rows and queries; ``1 <= kk <= n``.
        max_batch_bytes: upper bound on one score block.
        dtype: score dtype (float32, or int32 for integer GEMMs).
        block: ``(query block, gallery block)`` override (default :func:`block_shape`).

    Returns:
        ``(scores (nq, kk), rows (nq, kk))`` best first; unfilled slots hold
        :func:`lowest` / ``-1``. Equal scores come in unspecified order.
    """
    dt = np.dtype(dtype)
    low = lowest(dt)
    out_s = np.empty((nq, kk), dt)
    out_r = np.empty((nq, kk), np.int64)
    qb, width = block or block_shape(nq, n, kk, max_batch_bytes, dt.itemsize)
    length = width // GROUPS
    member = np.arange(GROUPS, dtype=np.int64) * length  # offsets of a group's members
    full = np.empty((width, min(qb, nq)), dt)
    for q0 in range(0, nq, qb):
        q1 = min(nq, q0 + qb)
        m = q1 - q0
        fill = prepare(q0, q1)
        best_s = np.full((m, kk), low, dt)
        best_r = np.full((m, kk), -1, np.int64)
        thr = np.full((m,), low, dt)
        scores = full if m == full.shape[1] else np.empty((width, m), dt)
        for r0 in range(0, n, width):
            w = min(n, r0 + width) - r0
            fill(r0, w, scores[:w])
            if w < width:
                scores[w:] = low
            if length < 2 * kk:  # too few groups to prune: merge the whole block
                cc, rr = np.nonzero(scores[:w] >= thr[None, :])
                o = np.argsort(rr, kind="stable")
                merge_topk(best_s, best_r, thr, rr[o], scores[cc[o], rr[o]], cc[o] + r0)
            else:
                # (m, length): max over the g members {j, j + length, ...} of each group j
                gmax = np.ascontiguousarray(scores.reshape(GROUPS, length, m).max(axis=0).T)
                # the kk largest group maxima are kk distinct scores: a bound on the kk-th
                kth = np.partition(gmax, length - kk, axis=1)[:, length - kk]
                np.maximum(thr, kth, out=thr)
                gr, gj = np.nonzero(gmax >= thr[:, None])
                cols = gj[:, None] + member  # (c, g) block rows of each surviving group
                vals = scores[cols, gr[:, None]]
                keep = (vals >= thr[gr][:, None]) & (cols < w)
                rr = np.broadcast_to(gr[:, None], cols.shape)[keep]
                merge_topk(best_s, best_r, thr, rr, vals[keep], cols[keep] + r0)
        order = np.argsort(-best_s.astype(np.float64) if dt.kind != "f" else -best_s, axis=1,
                           kind="stable")
        out_s[q0:q1] = np.take_along_axis(best_s, order, 1)
        out_r[q0:q1] = np.take_along_axis(best_r, order, 1)
    return out_s, out_r


def _floor_of(values: np.ndarray, dt: np.dtype) -> np.ndarray:
    """float64 thresholds -> ``dt``, rounded down (a threshold may only keep more)."""
    if dt.kind == "f":
        f = values.astype(dt)
        return np.where(f > values, np.nextafter(f, dt.type(-np.inf)), f).astype(dt)
    info = np.iinfo(dt)
    return np.clip(np.floor(values), info.min, info.max).astype(dt)


def window_block_shape(q: int, n: int, max_batch_bytes: int, itemsize: int = 4) -> tuple[int, int]:
    """Block shape of :func:`scan_window`: up to 1024 queries, >= 4096 rows, ~16 MB.

    Profiled on 100k x 1280 (grown), 1000 queries, one thread, int8 and bf16 codes:
    (1000, 4096) took 1.05 / 1.53 s CPU against 1.17-1.37 / 1.54-1.69 s for
    (1000, 2048), (512, 8192), (256, 16384), (128, 32768) and (1000, 8192).
    """
    budget = max(int(max_batch_bytes), itemsize * GROUPS)
    qb = max(1, min(q, 1024, budget // (itemsize * GROUPS)))
    rows = max(4096, (16 << 20) // (itemsize * qb))
    rows = min(rows, budget // (itemsize * qb), -(-n // GROUPS) * GROUPS)
    return qb, max(GROUPS, rows // GROUPS * GROUPS)


def scan_window(
    prepare: Callable[[int, int], BlockFill],
    n: int,
    nq: int,
    k: int,
    slack: np.ndarray,
    *,
    max_batch_bytes: int,
    dtype: type = np.float32,
    max_candidates: int | None = None,
    block: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every row whose score is >= (final k-th best score) - ``slack[q]``, per query.

    Unlike :func:`scan_topk`, blocks are ``(queries, rows)``: ``fill(r0, w, out)``
    writes the ``(m, w)`` scores of rows ``[r0, r0 + w)`` into the C-contiguous
    ``out`` (the int8 GEMM runs 25 % faster this way round: 25 vs 33 ms CPU for
    1000 x 4096 x 1280). Groups of :data:`WINDOW_MEMBERS` members (stride
    ``w / g``) are pruned as in :func:`scan_topk`, on contiguous rows.

    Args:
        prepare: ``prepare(q0, q1) -> fill`` as above.
        k: the k of the search (``1 <= k <= n``).
        slack: ``(nq,)`` float64 window width per query, in score units.
        max_candidates: cap on the candidates kept per query (memory guard); when a
            query exceeds it, its lowest candidates are dropped and its floor raised.
        block: ``(query block, gallery block)`` override.

    Returns:
        ``(qi, scores, rows, floor)``: flat candidates sorted by query, then score
        (best first); ``floor`` ``(nq,)`` float64: every row left out has a score
        ``<= floor[q]``.
    """
    dt = np.dtype(dtype)
    low = lowest(dt)
    qb, width = block or window_block_shape(nq, n, max_batch_bytes, dt.itemsize)
    g = WINDOW_MEMBERS
    cap = max_candidates or max(64 * k, int(max_batch_bytes) // (20 * max(1, min(qb, nq))))
    out_q, out_s, out_r = [], [], []
    floor_all = np.full(nq, -np.inf)
    for q0 in range(0, nq, qb):
        q1 = min(nq, q0 + qb)
        m = q1 - q0
        fill = prepare(q0, q1)
        sl = np.asarray(slack[q0:q1], np.float64)
        best_s = np.full((m, k), low, dt)
        best_r = np.full((m, k), -1, np.int64)
        thr = np.full((m,), low, dt)  # running k-th best
        fl = np.full((m,), -np.inf)  # running window floor (float64)
        fl_d = np.full((m,), low, dt)
        pq: list[np.ndarray] = []
        ps: list[np.ndarray] = []
        pr: list[np.ndarray] = []
        pooled, compact_at = 0, 8 * k * m
        buf = np.empty((m, width), dt)
        for r0 in range(0, n, width):
            w = min(n, r0 + width) - r0
            scores = buf if w == width else np.empty((m, w), dt)
            fill(r0, w, scores)
            length = w // g
            if length < 2 * k:  # too few groups to prune: threshold the whole block
                rr, cols = np.nonzero(scores >= fl_d[:, None])
                vals = scores[rr, cols]
            else:
                # (m, length): max over the g members {j, j + length, ...} of group j
                body = scores[:, : g * length].reshape(m, g, length)
                gmax = body.max(axis=1)
                kth = np.partition(gmax, length - k, axis=1)[:, length - k]
                np.maximum(thr, kth, out=thr)  # k distinct scores reach kth
                fl = np.maximum(fl, thr.astype(np.float64) - sl)
                fl_d = _floor_of(fl, dt)
                gr, gj = np.nonzero(gmax >= fl_d[:, None])
                cm = gj[:, None] + np.arange(g, dtype=np.int64) * length  # (c, g) block rows
                v = scores[gr[:, None], cm]
                keep = v >= fl_d[gr][:, None]
                rr = np.broadcast_to(gr[:, None], cm.shape)[keep]
                cols, vals = cm[keep], v[keep]
                if g * length < w:  # the tail rows outside the groups
                    tr, tc = np.nonzero(scores[:, g * length :] >= fl_d[:, None])
                    if tr.size:
                        rr = np.concatenate([rr, tr])
                        cols = np.concatenate([cols, tc + g * length])
                        vals = np.concatenate([vals, scores[tr, tc + g * length]])
                        o = np.argsort(rr, kind="stable")
                        rr, cols, vals = rr[o], cols[o], vals[o]
            top = vals >= thr[rr]
            merge_topk(best_s, best_r, thr, rr[top], vals[top], cols[top] + r0)
            fl = np.maximum(fl, thr.astype(np.float64) - sl)
            fl[thr == low] = -np.inf
            fl_d = _floor_of(fl, dt)
            if rr.size:
                pq.append(rr)
                ps.append(vals)
                pr.append(cols + r0)
                pooled += rr.size
            if pooled > compact_at:
                pq, ps, pr, pooled, forced = _compact(pq, ps, pr, fl_d, cap, m)
                fl = np.maximum(fl, forced)
                fl_d = _floor_of(fl, dt)
                compact_at = max(8 * k * m, 2 * pooled)
        pq, ps, pr, pooled, forced = _compact(pq, ps, pr, fl_d, cap, m, final=True)
        fl = np.maximum(fl, forced)
        q_all = pq[0] if pq else np.empty(0, np.int64)
        s_all = ps[0] if ps else np.empty(0, dt)
        r_all = pr[0] if pr else np.empty(0, np.int64)
        out_q.append(q_all + q0)
        out_s.append(s_all)
        out_r.append(r_all)
        floor_all[q0:q1] = fl
    return np.concatenate(out_q), np.concatenate(out_s), np.concatenate(out_r), floor_all


def _compact(pq, ps, pr, fl_d, cap, m, *, final: bool = False):
    """Merge pooled candidates and drop those below the floor; enforce the per-query cap.

    Sorted by query, then score (best first) when ``final`` or when the cap is hit.
    """
    forced = np.full(m, -np.inf)
    if not pq:
        return [], [], [], 0, forced
    qv, sv, rv = np.concatenate(pq), np.concatenate(ps), np.concatenate(pr)
    keep = sv >= fl_d[qv]
    qv, sv, rv = qv[keep], sv[keep], rv[keep]
    counts = np.bincount(qv, minlength=m)
    over_cap = counts.max(initial=0) > cap
    if final or over_cap:
        order = np.lexsort((rv, -sv.astype(np.float64), qv))
        qv, sv, rv = qv[order], sv[order], rv[order]
    if over_cap:
        start = np.cumsum(counts) - counts
        rank = np.arange(qv.size) - start[qv]
        over = np.flatnonzero(counts > cap)
        forced[over] = sv[start[over] + cap].astype(np.float64)  # the first one dropped
        keep = rank < cap
        qv, sv, rv = qv[keep], sv[keep], rv[keep]
    return [qv], [sv], [rv], int(qv.size), forced
