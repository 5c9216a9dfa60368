"""Hybrid attention on the CPU: LATTE's streaming estimate tile, kept keys exact, the rest pooled.

A task is one block of query rows of one batch row (as :mod:`mcattn.latte.cpu`, at most
``2^18 / Nk`` rows so that the block's tiles stay in L2):

1. the MS4B estimate of the block, ``hi(q8) . hi(k8)`` for every key: AVX-512 VNNI int8
   tiles (:mod:`mcattn.latte.vnni`) where the CPU has them, else one BLAS float32 product
   of the nibble matrices; the same integers either way;
2. per query row, the keep rule in exact float64 arithmetic on the row's estimates
   (:func:`mcattn.latte.cpu._row_units`, then the cut: the operations of
   :func:`mcattn.latte.naive.keep_rows`, so the kept sets are identical); top-k finds its
   cut among the keys above a sampled threshold (:func:`_topk_cut`) instead of
   partitioning the whole row;
3. the kept keys' exact float scores ``scale q.k`` for all rows of the block, a key chunk
   at a time (:func:`_kept_dots`), their softmax weights;
4. ``pooled``: from the row's estimates, still in cache, each key block's dropped mass
   ``M_B = sum exp(est - m)`` (one vectorised exp pass) and its share ``f_B = M_B / |D_B|``.
   The dropped keys' value sum is the block's value sum (once per batch row) minus its kept
   keys' values, so a kept key of a whole, unmasked block enters ``sum p v`` with weight
   ``w_j - f_B`` and the block adds ``f_B vsum_B``: no pass over the dropped keys' values.
   Blocks cut by the causal mask or holding masked keys sum their dropped values directly;
5. ``sum w v`` over the kept keys (:func:`mcattn.latte.cpu.weighted_values`), plus the blocks' terms.

Scratch is ``O(BLOCK_Q * Nk)`` per thread, as LATTE's kernel.
"""

import numpy as np

from .. import config
from .._cpu import run_tasks
from .._cpu_math import aligned_rows, bits_dtype, exp_block
from .._jit import njit
from ..latte import vnni
from ..latte.cpu import _row_units, use_vnni, weighted_values
from ..latte.naive import MODES

__all__ = ["forward"]

_FAST = {"nsz", "contract", "reassoc"}  # order of sums only (scores, masses, sum w v)
_NINF = -np.inf


@njit(nogil=True, cache=True)
def _select_rank(a, n, r):
    """The ``r``-th smallest (0-based) of ``a[:n]`` (no NaN), reordering ``a`` in place.

    Wirth's selection with a median-of-three pivot: no allocation (Numba's ``np.partition``
    copies the row and measured about 12 ns per element here).
    """
    lo, hi = 0, n - 1
    while lo < hi:
        x, y, z = a[lo], a[(lo + hi) >> 1], a[hi]
        p = max(min(x, y), min(max(x, y), z))  # a value of the range: the scans stop
        i, j = lo, hi
        while i <= j:
            while a[i] < p:
                i += 1
            while p < a[j]:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if j < r:
            lo = i
        if r < i:
            hi = j
    return a[r]


_BUCKETS = 1024


@njit(nogil=True, cache=True)
def _topk_cut(low, rend, kk, compact, sel, cand, hist):
    """The ``kk``-th largest visible value of ``low[:rend]`` (``-inf``: invisible), or ``-inf``
    when at most ``kk`` are visible: the cut of :func:`mcattn.latte.naive.keep_rows`.

    A bucket select: the values are counted into :data:`_BUCKETS` buckets of equal width
    between the row's smallest and largest visible value (the bucket index is a monotone
    function of the value, so the buckets are ordered), the bucket holding the ``kk``-th
    largest is found from the top, and only its few values are ordered
    (:func:`_select_rank`): the same value as a partition of the whole row, with two
    branch-free passes instead of a data-dependent one. ``compact``: the row may hold
    invisible keys (a float mask): the visible values are copied into ``sel`` first.
    """
    src = low
    m = rend
    if compact:
        m = 0
        for j in range(rend):
            x = low[j]
            sel[m] = x
            m += x != _NINF
        src = sel
    if m <= kk:
        return _NINF
    lo = np.inf
    hi = _NINF
    for j in range(m):
        lo = min(lo, src[j])
        hi = max(hi, src[j])
    if not hi > lo:
        return hi
    inv = (_BUCKETS - 1) / (hi - lo)
    if not inv < np.inf:  # a range too narrow for buckets (values near the underflow): select
        for j in range(m):
            cand[j] = src[j]
        return _select_rank(cand, m, m - kk)
    hist[:] = 0
    for j in range(m):
        hist[np.int64((src[j] - lo) * inv)] += 1
    above = 0
    b = _BUCKETS - 1
    while above + hist[b] < kk:
        above += hist[b]
        b -= 1
    nb = 0
    for j in range(m):  # the values of bucket b, branch-free
        x = src[j]
        cand[nb] = x
        nb += np.int64((x - lo) * inv) == b
    return _select_rank(cand, nb, nb - (kk - above))


@njit(nogil=True, cache=True, fastmath=_FAST)
def _kept_dots(qblk, kf, bh, nrows, idxb, cnt, sc, pos, chunk):
    """``sc[i, t] = qblk[i] . kf[bh, idxb[i, t]]`` for the block's rows, a key chunk at a time
    (the chunk's keys stay in cache while every row takes its kept keys), four keys per pass."""
    nk, d = kf.shape[1], kf.shape[2]
    pos[:nrows] = 0
    for c0 in range(0, nk, chunk):
        c1 = min(nk, c0 + chunk)
        for i in range(nrows):
            t = pos[i]
            n = cnt[i]
            while t + 4 <= n and idxb[i, t + 3] < c1:
                j0, j1, j2, j3 = idxb[i, t], idxb[i, t + 1], idxb[i, t + 2], idxb[i, t + 3]
                z = qblk[i, 0] * 0
                d0, d1, d2, d3 = z, z, z, z
                for cc in range(d):
                    x = qblk[i, cc]
                    d0 += x * kf[bh, j0, cc]
                    d1 += x * kf[bh, j1, cc]
                    d2 += x * kf[bh, j2, cc]
                    d3 += x * kf[bh, j3, cc]
                sc[i, t] = d0
                sc[i, t + 1] = d1
                sc[i, t + 2] = d2
                sc[i, t + 3] = d3
                t += 4
            while t < n and idxb[i, t] < c1:
                j = idxb[i, t]
                dot = qblk[i, 0] * 0
                for cc in range(d):
                    dot += qblk[i, cc] * kf[bh, j, cc]
                sc[i, t] = dot
                t += 1
            pos[i] = t


@njit(nogil=True, cache=True, fastmath=_FAST)
def _block_masses(low, est_row, sk_row, rend, nk, cut, c, m, block, idx, n, masked, ex, bits, count,
                  fb, clean):
    """Per key block of ``[0, rend)``: ``fb[B] = M_B / |D_B|``, the dropped keys' share of the
    block's estimated mass ``M_B = sum_{D_B} exp(c low_j - m)``, and whether the block is
    whole and unmasked (``clean``: its dropped values are its value sum minus its kept ones).
    Returns ``sum_B M_B``.

    A key is dropped when visible and below ``cut`` (the keep rule); an invisible key has
    ``low = -inf``, so its term is ``exp(-inf) = 0`` without a test. The kept keys
    ``idx[:n]`` give the blocks' dropped counts; ``masked``: the row may hold invisible keys,
    counted per block, and its estimates are ``low`` (in units of ``c``, mask included);
    otherwise they are recomputed from the tile row, ``est_row[j] * sk_row[j]`` (the same
    float64 product as the keep rule's). Plain loops that LLVM vectorises (the exp is
    :func:`mcattn._cpu_math.exp_block`'s polynomial in float32).
    """
    nb = (rend + block - 1) // block
    if masked:
        for j in range(rend):
            x = low[j]
            ex[0, j] = c * x - m if x < cut else _NINF
    else:
        for j in range(rend):
            x = np.float64(est_row[j]) * sk_row[j]
            ex[0, j] = c * x - m if x < cut else _NINF
    exp_block(ex, bits, 1, rend)
    rem = 0.0
    for b in range(nb):
        b0 = b * block
        b1 = min(b0 + block, rend)
        mass = 0.0
        for j in range(b0, b1):
            mass += ex[0, j]
        fb[b] = mass
        count[b] = b1 - b0
        rem += mass
    for t in range(n):
        count[idx[t] // block] -= 1
    for b in range(nb):
        b0 = b * block
        b1 = min(b0 + block, rend)
        hidden = 0
        if masked:
            for j in range(b0, b1):
                hidden += low[j] == _NINF
            count[b] -= hidden
        fb[b] = fb[b] / count[b] if count[b] > 0 else 0.0
        clean[b] = hidden == 0 and (b1 - b0 == block or b1 == nk)
    return rem


@njit(nogil=True, cache=True)
def _plain_keep(est_row, sk_row, rend, mode, th, c, idx):
    """Relative / absolute rule of a row without a float mask: ``(cut, kept count)``, the kept
    indices packed into ``idx`` (``rend + 16`` slots). The steps of
    :func:`mcattn.latte.cpu._row_keep_plain` (vectorised maximum, 16-key compress), which
    does not return the cut the pooled remainder needs."""
    g8 = rend // 8
    top = vnni.max_groups(est_row, sk_row, g8)
    for j in range(8 * g8, rend):
        top = max(top, np.float64(est_row[j]) * sk_row[j])
    if top == _NINF:
        return _NINF, 0
    cut = top - th / c if mode == 0 else min(th / c, top)
    g16 = rend // 16
    n = vnni.compress_groups(est_row, sk_row, g16, cut, idx)
    for j in range(16 * g16, rend):
        idx[n] = j
        n += np.float64(est_row[j]) * sk_row[j] >= cut
    return cut, n


@njit(nogil=True, cache=True)
def _hybrid_tasks(q8, k8, qf, kf, v, s_q, sk256, scale, theta, mode, bias, mask_index, has_bias,
                  is_causal, block_q, block, pooled, vsum, out, kept_out, share_out, bits_type,
                  use_vnni, block_k, stages, t0, t1):
    bh_count, nq, d = q8.shape
    nk = k8.shape[1]
    dv = v.shape[2]
    row_bias = bias.shape[1] > 1
    n_qblocks = (nq + block_q - 1) // block_q
    nblocks = (nk + block - 1) // block
    # the estimate tile (VNNI words, or the nibble matrices for BLAS): as mcattn.latte.cpu
    est_buf = np.empty(1 if use_vnni else block_q * nk, np.float32)
    hk = np.empty((1 if use_vnni else nk, d), np.float32)
    hq = np.empty((block_q, d), np.float32)
    d4 = (d + 3) // 4
    nk_pad = (nk + vnni.NR - 1) // vnni.NR * vnni.NR if use_vnni else 1
    rows_pad = (block_q + vnni.MR - 1) // vnni.MR * vnni.MR if use_vnni else 1
    kbytes = np.zeros(d4 * nk_pad * 4, np.int8)
    kw = kbytes.view(np.int32).reshape((d4, nk_pad))
    corr = np.zeros(nk_pad, np.int32)
    qbytes = np.zeros(rows_pad * d4 * 4, np.uint8)
    qw = qbytes.view(np.int32).reshape((rows_pad, d4))
    est_tiles = np.empty((rows_pad, nk_pad), np.float32)
    current = -1
    # per row: estimates (float64), selection scratch; per block of rows: kept lists, scores
    low = np.empty((block_q, nk), np.float64)
    sel = np.empty(nk, np.float64)
    cand = np.empty(nk, np.float64)
    hist = np.zeros(_BUCKETS, np.int64)
    lanes = np.empty(8, np.float64)
    cuts = np.empty(block_q, np.float64)
    idxb = np.empty((block_q, nk + 16), np.int32)  # 16 slots of slack: vnni.compress_groups
    cnt = np.zeros(block_q, np.int64)
    scb = np.empty((block_q, nk + 1), v.dtype)
    bits = np.empty((1, nk + 1), bits_type)
    ex = np.empty((1, nk + 1), v.dtype)
    accb = np.empty((block_q, dv), v.dtype)
    posb = np.zeros(block_q, np.int64)
    tot = np.zeros(block_q, np.float64)
    rem = np.zeros(block_q, np.float64)
    fb = np.zeros((block_q, nblocks), np.float64)
    clean = np.zeros((block_q, nblocks), np.bool_)
    count = np.zeros(nblocks, np.int64)
    fclean = np.zeros((block_q, nblocks), v.dtype)  # f_B on clean blocks, 0 elsewhere
    pooled_v = np.zeros((block_q, dv), v.dtype)
    qblk = np.zeros((block_q, d), qf.dtype)
    vh = aligned_rows(v, nk)  # the current head's value rows, 64-byte aligned (sum w v)
    plain = (mode == 0 or mode == 1) and not has_bias
    for task in range(t0, t1):
        bh = task // n_qblocks
        i0 = (task % n_qblocks) * block_q
        i1 = min(nq, i0 + block_q)
        nrows = i1 - i0
        kend = min(nk, i1) if is_causal else nk
        slot = mask_index[bh] if has_bias else 0
        if kend == 0:
            continue
        if bh != current:
            if use_vnni:
                vnni.pack_keys(k8, bh, nk, False, kbytes.reshape((d4, nk_pad, 4)), kw, corr)
            else:
                for j in range(nk):
                    for cc in range(d):
                        hk[j, cc] = k8[bh, j, cc] >> 4
            if stages >= 4:
                vh[0] = v[bh]
            current = bh
        if use_vnni:
            vnni.pack_queries(q8, bh, i0, nrows, False, qbytes.reshape((rows_pad, 4 * d4)))
            for tj in range(0, kend, vnni.NR):  # a key block's words stay in L1 for all rows
                for ti in range(0, nrows, vnni.MR):
                    vnni.estimate_tile(est_tiles, qw, kw, corr, ti, tj)
            est = est_tiles
        else:
            for i in range(nrows):
                for cc in range(d):
                    hq[i, cc] = q8[bh, i0 + i, cc] >> 4
            est = est_buf[: nrows * kend].reshape((nrows, kend))
            np.dot(hq[:nrows], hk[:kend].T, est)
        th = theta[bh]
        if stages < 2:  # (benchmarks: the estimate alone)
            continue
        for i in range(nrows):  # the keep rule, in exact float64 steps (latte.naive.keep_rows)
            row = i0 + i
            rend = min(kend, row + 1) if is_causal else kend
            r = row if row_bias else 0
            c = scale * np.float64(s_q[bh, row])
            if plain:
                cut, n = _plain_keep(est[i], sk256[bh], rend, mode, th, c, idxb[i])
                top = _NINF  # (done)
            else:
                top = _row_units(est, i, sk256, bh, rend, bias, slot, r, has_bias, c, low[i], lanes)
                cut = _NINF
                n = 0
            if top != _NINF:
                if mode == 0:
                    cut = top - th / c
                elif mode == 1:
                    cut = min(th / c, top)
                else:
                    cut = _topk_cut(low[i], rend, np.int64(th), has_bias, sel, cand, hist)
                for j in range(rend):  # branch-free packing of the kept indices
                    x = low[i, j]
                    idxb[i, n] = j
                    n += (x >= cut) & (x != _NINF)
            cuts[i] = cut
            cnt[i] = n
            kept_out[bh, row] = n
            for cc in range(d):
                qblk[i, cc] = qf[bh, row, cc]
        if stages < 3:  # (benchmarks: estimate and keep rule)
            continue
        _kept_dots(qblk, kf, bh, nrows, idxb, cnt, scb, posb, block_k)
        for i in range(nrows):  # softmax weights of the kept keys, the pooled block shares
            n = cnt[i]
            if pooled:
                fclean[i] = 0.0
            if n == 0:
                continue
            row = i0 + i
            r = row if row_bias else 0
            smax = _NINF
            for t in range(n):
                sval = np.float64(scb[i, t]) * scale
                if has_bias:
                    sval += np.float64(bias[slot, r, idxb[i, t]])
                scb[i, t] = sval
                smax = max(smax, np.float64(scb[i, t]))
            for t in range(n):
                scb[i, t] -= smax
            exp_block(scb[i:i + 1], bits, 1, n)
            total = 0.0
            for t in range(n):
                total += scb[i, t]
            tot[i] = total
            rem[i] = 0.0
            if pooled:
                rend = min(kend, row + 1) if is_causal else kend
                c = scale * np.float64(s_q[bh, row])
                rem[i] = _block_masses(low[i], est[i], sk256[bh], rend, nk, cuts[i], c, smax, block,
                                       idxb[i], n, has_bias, ex, bits, count, fb[i], clean[i])
                for t in range(n):  # a clean block's dropped values: vsum_B minus its kept ones
                    bb = idxb[i, t] // block
                    if clean[i, bb]:
                        scb[i, t] -= fb[i, bb]
                for bb in range(nblocks):
                    fclean[i, bb] = fb[i, bb] if clean[i, bb] and bb * block < rend else 0.0
        if stages < 4:  # (benchmarks: up to the weights and block shares)
            continue
        weighted_values(vh, 0, nrows, idxb, cnt, scb, accb, posb, block_k)
        if pooled:  # the clean blocks' terms of all rows at once: sum_B f_B vsum_B, one product
            np.dot(fclean[:nrows], vsum[bh], pooled_v[:nrows])
        for i in range(nrows):
            n = cnt[i]
            if n == 0:
                continue
            row = i0 + i
            if pooled:
                rend = min(kend, row + 1) if is_causal else kend
                for cc in range(dv):
                    accb[i, cc] += pooled_v[i, cc]
                for bb in range((rend + block - 1) // block):
                    f = fb[i, bb]
                    if f == 0.0 or clean[i, bb]:
                        continue
                    cut = cuts[i]  # cut by the causal mask or holding masked keys: its dropped keys
                    for j in range(bb * block, min(bb * block + block, rend)):
                        x = low[i, j] if has_bias else np.float64(est[i, j]) * sk256[bh, j]
                        if x < cut and x != _NINF:
                            for cc in range(dv):
                                accb[i, cc] += f * v[bh, j, cc]
            den = tot[i] + rem[i]
            share_out[bh, row] = rem[i] / den
            inv = 1.0 / den
            for cc in range(dv):
                out[bh, row, cc] = accb[i, cc] * inv


def forward(lat, remainder, block, stages=4):
    """Hybrid attention of canonical LATTE inputs; as :func:`mcattn.hybrid.naive.forward`.

    Parameters
    ----------
    lat : mcattn.latte.LatteInputs
        Float exact scores.
    remainder : {"pooled", "none"}
    block : int
    stages : int
        For ``benchmarks/hybrid_speed.py``'s phases only: stop after the estimate (1), the
        keep rule (2), the kept scores, weights and block shares (3); 4 (default) is the call.

    Returns
    -------
    out : numpy.ndarray ``[BH, Nq, dv]`` (compute dtype)
    kept : numpy.ndarray of int64 ``[BH, Nq]``
    remainder_share : numpy.ndarray of float64 ``[BH, Nq]``
    """
    inp = lat.inp
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, nk, dv = q.shape[0], inp.nq, inp.nk, inp.value_dim
    out = np.zeros((bh, nq, dv), dtype=q.dtype)
    kept = np.zeros((bh, nq), np.int64)
    share = np.zeros((bh, nq), np.float64)
    if bh == 0 or nq == 0 or nk == 0:
        return out, kept, share
    pooled = remainder == "pooled"
    nblocks = -(-nk // block)
    if pooled:  # each block's value sum, once per call (the last block may be shorter)
        vpad = np.zeros((bh, nblocks * block, dv), np.float64)
        vpad[:, :nk] = v
        vsum = vpad.reshape(bh, nblocks, block, dv).sum(2).astype(v.dtype)
    else:
        vsum = np.zeros((1, 1, 1), v.dtype)
    block_q = max(1, min(int(config.LATTE_CPU_BLOCK_Q), nq, max(vnni.MR, (1 << 18) // nk)))
    mask = inp.mask
    has_bias = mask.bias is not None
    bias = mask.bias if has_bias else np.zeros((1, 1, 1), q.dtype)
    mask_index = mask.mask_index if has_bias else np.zeros(1, np.int64)
    n_tasks = bh * ((nq + block_q - 1) // block_q)
    run_tasks(_hybrid_tasks, n_tasks, lat.q8, lat.k8, q, k, v, lat.s_q,
              256.0 * lat.s_k.astype(np.float64), float(inp.scale), lat.theta, MODES[lat.mode], bias,
              mask_index, has_bias, bool(mask.is_causal), block_q, int(block), pooled, vsum, out, kept,
              share, bits_dtype(q.dtype), use_vnni(lat), max(1, int(config.LATTE_CPU_BLOCK_K)), int(stages))
    return out, kept, share
