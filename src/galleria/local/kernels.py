"""Pure kernels of local-feature search: aggregation, binarisation, match kernels.

ASMK (Tolias, Avrithis, Jegou, "To aggregate or not to aggregate", ICCV 2013;
ASMK* = binarised residuals): the descriptors of an image assigned to one
visual word are aggregated (sum of residuals to the centroid), the sum is
binarised (sign bits), and two images are compared word by word through the
selective kernel ``sigma(u) = u^alpha if u > tau else 0`` of the normalised
Hamming similarity ``u = 1 - 2 h / d``.

CANN (Aiger et al., "Yes, we CANN", CVPR 2023): a kernel of the distance ``r``
between a query descriptor and a gallery descriptor,
``phi(r) = (1 - (r / p0) ** (p1 / (1 - p1))) ** ((1 - p1) / p1)`` for
``r < p0`` and 0 beyond (``p1 = 0.5`` is linear, ``p1 -> 1`` a box).
"""

from __future__ import annotations

import numpy as np

from galleria.errors import InputError


def code_words(dim: int) -> int:
    """uint64 words per binary code of ``dim`` bits."""
    return -(-int(dim) // 64)


def binarize(x: np.ndarray) -> np.ndarray:
    """``(m, d)`` float -> ``(m, ceil(d / 64))`` uint64 sign codes (bit = component > 0)."""
    m, d = x.shape
    bits = np.packbits(np.ascontiguousarray(x > 0), axis=1)  # (m, ceil(d/8)) uint8
    nbytes = code_words(d) * 8
    if bits.shape[1] != nbytes:
        bits = np.concatenate([bits, np.zeros((m, nbytes - bits.shape[1]), np.uint8)], axis=1)
    return np.ascontiguousarray(bits).view(np.uint64)


_POP8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has it built in; a byte table otherwise)."""
    fn = getattr(np, "bitwise_count", None)
    if fn is not None:
        return fn(x)
    b = _POP8[np.ascontiguousarray(x).view(np.uint8)]
    return b.reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def hamming_similarity(a: np.ndarray, b: np.ndarray, nbits: int) -> np.ndarray:
    """Row-wise ``1 - 2 * hamming(a_i, b_i) / nbits`` of ``(m, w)`` uint64 codes -> ``(m,)``."""
    x = np.bitwise_xor(a, b)
    h = popcount(x[:, 0]).astype(np.int32)
    for j in range(1, x.shape[1]):
        h += popcount(x[:, j])
    return (1.0 - (2.0 / nbits) * h).astype(np.float32)


def selective_kernel(u: np.ndarray, *, alpha: float, tau: float) -> np.ndarray:
    """``sign(u) |u|^alpha`` where ``u > tau``, else 0 (ASMK's selective function)."""
    u = np.asarray(u, np.float32)
    out = np.zeros_like(u)
    m = u > tau
    v = u[m]
    out[m] = np.sign(v) * np.abs(v) ** np.float32(alpha)
    return out


def aggregate_residuals(
    desc: np.ndarray, words: np.ndarray, centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of residuals per visual word.

    Args:
        desc: ``(n, d)`` float32 descriptors.
        words: ``(n,)`` or ``(n, m)`` int word ids (``m`` assignments per
            descriptor: multiple assignment; ``-1`` entries are ignored).
        centroids: ``(W, d)`` float32 codebook.

    Returns:
        ``(unique words (u,) int64 ascending, residual sums (u, d) float32)``.
    """
    w = np.asarray(words)
    if w.ndim == 1:
        w = w[:, None]
    n, m = w.shape
    if n != desc.shape[0]:
        raise InputError(f"{n} word rows for {desc.shape[0]} descriptors")
    flat = w.reshape(-1).astype(np.int64)
    src = np.repeat(np.arange(n), m)
    ok = flat >= 0
    flat, src = flat[ok], src[ok]
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, desc.shape[1]), np.float32)
    order = np.argsort(flat, kind="stable")
    flat, src = flat[order], src[order]
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    uw = flat[starts]
    res = desc[src] - centroids[flat]
    sums = np.add.reduceat(res, starts, axis=0).astype(np.float32, copy=False)
    return uw, sums


def cann_kernel(r: np.ndarray, *, p0: float, p1: float) -> np.ndarray:
    """CANN's ``phi(r)`` (module docstring), 0 for ``r >= p0``; ``r`` >= 0."""
    if not (p0 > 0 and 0 < p1 < 1):
        raise InputError(f"CANN kernel needs p0 > 0 and 0 < p1 < 1; got p0={p0}, p1={p1}")
    r = np.asarray(r, np.float32)
    a = p1 / (1.0 - p1)
    x = np.clip(r / np.float32(p0), 0.0, 1.0)
    base = np.clip(1.0 - x ** np.float32(a), 0.0, 1.0)
    return (base ** np.float32(1.0 / a)).astype(np.float32)


def segment_gather(offsets: np.ndarray, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries of CSR lists ``words`` -> ``(entry positions (T,), owner index (T,))``.

    ``offsets``: ``(W + 1,)`` list boundaries; entry ``j`` of the output belongs to
    ``words[owner[j]]``.
    """
    starts = offsets[words]
    lens = offsets[words + 1] - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    owner = np.repeat(np.arange(words.size), lens)
    csum = np.cumsum(lens) - lens
    pos = np.arange(total, dtype=np.int64) - np.repeat(csum, lens) + np.repeat(starts, lens)
    return pos, owner
