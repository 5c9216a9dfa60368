"""LATTE on the CPU: a streaming Numba kernel (integer estimate per block, then only kept keys).

A task is one block of query rows of one batch row (``LATTE_CPU_BLOCK_Q``, at most
``2^18 / Nk`` so that a block's tiles stay in L2):

1. the MS4B estimate of the block, ``hi(q8) . hi(k8)`` for every key: on a CPU with
   AVX-512 VNNI int8 tiles (:mod:`mcattn.latte.vnni`, ``vpdpbusd``, about a quarter of
   the float32 product's time), else one BLAS float32 product of the nibble matrices
   (small integers: exact in float32 up to ``d = 262144``); the same integers either
   way. ``safe`` adds one product of width ``3d`` for the error bound;
2. per query row, the keep rule in exact float64 arithmetic (the same operations as
   :mod:`mcattn.latte.naive`, so the kept sets are identical) gives the list of kept
   keys. The relative and absolute rules without a float mask (the common case, "plain")
   take one vectorised pass for the row maximum and one that packs the kept indices 16
   keys at a time (:func:`_row_keep_plain`); the other rules store the row's float64
   estimates first (:func:`_row_units`, :func:`_select`);
3. only the kept keys are visited: their score (``q8 . k8``, exact, or ``q . k``), the
   softmax, and ``sum p_j v_j``, for all rows of the block at once (:func:`_block_output`).
   With VNNI the int8 scores are dot products of the kept key rows alone
   (:func:`_gathered_scores`, :func:`mcattn.latte.vnni.kept_scores`: one 64-byte load and
   one ``vpdpbusd`` per kept key and 64 bytes of ``d``, 16 keys at a time, scaled in vector
   registers; 1.7 ns per kept key against 3.3 for the dense ``q8 . k8`` tile of the block
   that it replaced); else one dot product per kept key, a key chunk
   (``LATTE_CPU_BLOCK_K``) at a time. ``sum p v`` keeps each row's accumulator in
   registers over its kept keys of a chunk (:func:`mcattn._cpu_math.gather_axpy`),
   reading a 64-byte aligned copy of the head's values. Every rule and mask takes this
   pass, so a float mask of zeros or ``return_info`` leaves the output bit for bit
   unchanged.

Scratch is ``O(BLOCK_Q * Nk)`` numbers per thread (the block's estimate and score
tiles, kept lists) plus the current head's nibble and int8 matrices (``Nk x d``): no
``Nq x Nk`` buffer. With ``want_mass`` the exact scores of the block are computed too
(one more BLAS product) to report the dropped attention mass.

Backward (hard mask, :func:`backward`): a task is a batch row; each query row revisits
its kept keys (from :func:`kept_mask`) to recompute the probabilities and accumulate
the gradients, ``O(Nk)`` scratch per thread.
"""

import math

import numpy as np

from .. import config
from .._cpu import run_tasks
from .._cpu_math import aligned_rows, exp_scalar, gather_axpy
from .._jit import njit
from . import vnni
from .naive import MODES

__all__ = ["forward", "kept_mask", "backward", "kernel_arrays", "use_vnni", "quantize_rows"]


_FAST = {"nsz", "contract", "reassoc"}  # order of sums only, for the kept scores and P V


@njit(nogil=True, cache=True)
def _row_units(est, i, sk256, bh, rend, bias, slot, r, has_bias, c, low, lanes):
    """``low[j] = 256 hh_ij s_k[j] (+ bias / c)``, -inf if masked; returns the row max.

    Exact IEEE steps (no fast-math: the kept sets must match the reference bit for bit);
    the max runs in 8 independent lanes so that LLVM vectorises it.
    """
    for j in range(rend):
        low[j] = np.float64(est[i, j]) * sk256[bh, j]
    if has_bias:
        for j in range(rend):
            b = bias[slot, r, j]
            low[j] = -np.inf if b == -np.inf else low[j] + np.float64(b) / c
    for a in range(8):
        lanes[a] = -np.inf
    m = rend // 8 * 8
    for j in range(0, m, 8):
        for a in range(8):
            x = low[j + a]
            lanes[a] = x if x > lanes[a] else lanes[a]
    top = -np.inf
    for a in range(8):
        top = max(top, lanes[a])
    for j in range(m, rend):
        top = max(top, low[j])
    return top


@njit(nogil=True, cache=True)
def _dropped_plain(ts, i, rend, scale, idx, n, sel):
    """Exact attention mass of the keys ``j < rend`` not in ``idx[:n]`` (row ``i`` of ``ts``)."""
    tmax = -np.inf
    for j in range(rend):
        sel[j] = np.float64(ts[i, j]) * scale
        tmax = max(tmax, sel[j])
    return _dropped_share(sel, rend, tmax, idx, n)


@njit(nogil=True, cache=True)
def _dropped_share(sel, rend, tmax, idx, n):
    """Softmax mass of the scores ``sel[:rend]`` (largest ``tmax``; ``-inf`` = invisible) outside
    the kept keys ``idx[:n]`` (ascending, all visible)."""
    total = 0.0
    dropped = 0.0
    t = 0
    for j in range(rend):
        w = math.exp(sel[j] - tmax)  # 0 for an invisible key, which is never kept
        total += w
        if t < n and idx[t] == j:
            t += 1
        else:
            dropped += w
    return dropped / total if total > 0 else 0.0


@njit(nogil=True, cache=True)
def _row_keep_plain(est, i, sk256, s_k, bh, rend, mode, th, c, idx):
    """Relative / absolute rule of one row without a float mask, in one pass over the tile row.

    The same IEEE operations as :func:`_row_units` and :func:`_select` (``u = est * 256 s_k``
    in float64, exact, then one compare with the row's cut), but ``u`` is recomputed in
    vector registers instead of stored, and the kept indices are packed 16 keys at a
    time (:func:`mcattn.latte.vnni.compress_groups_screened`: decided in float32 where that
    is exact, in float64 otherwise), with no branch per key (a 15 % rule
    would mispredict most kept keys). ``idx`` needs ``rend + 16`` slots. Returns the kept
    count.
    """
    est_row = est[i]
    sk_row = sk256[bh]
    g8 = rend // 8
    top = vnni.max_groups(est_row, sk_row, g8)
    for j in range(8 * g8, rend):
        top = max(top, np.float64(est_row[j]) * sk_row[j])
    if top == -np.inf:
        return 0
    cut = top - th / c if mode == 0 else min(th / c, top)
    g16 = rend // 16
    n = vnni.compress_groups_screened(est_row, sk_row, s_k[bh], g16, cut, idx)
    for j in range(16 * g16, rend):
        idx[n] = j
        n += np.float64(est_row[j]) * sk_row[j] >= cut
    return n


@njit(nogil=True, cache=True)
def _select(low, up, top, rend, mode, th, c, sel, idx):
    """The kept keys of one row into ``idx``; returns their count (the rule of naive.keep_rows)."""
    ninf = -np.inf
    if top == ninf:  # nothing visible
        return 0
    if mode == 0 or mode == 3:
        cut = top - th / c
    elif mode == 1:
        cut = min(th / c, top)
    else:
        kk = np.int64(th)
        m = 0
        for j in range(rend):
            if low[j] != ninf:
                sel[m] = low[j]
                m += 1
        if m <= kk:
            cut = ninf
        else:
            cut = np.partition(sel[:m], m - kk)[m - kk]
    n = 0
    if cut == ninf:
        for j in range(rend):
            if up[j] != ninf:
                idx[n] = j
                n += 1
        return n
    for j in range(rend):
        if up[j] >= cut:
            idx[n] = j
            n += 1
    return n


@njit(nogil=True, cache=True)
def weighted_values(v, bh, nrows, idxb, cnt, sc, acc, pos, chunk):
    """``acc[i] = sum_t sc[i, t] v[bh, idxb[i, t]]`` for the block's rows, a key chunk at a time.

    Each row's run of kept keys inside the chunk goes through one
    :func:`mcattn._cpu_math.gather_axpy` (the row's accumulator in registers for the run).
    """
    nk = v.shape[1]
    acc[:nrows] = 0.0
    pos[:nrows] = 0
    for c0 in range(0, nk, chunk):
        c1 = min(nk, c0 + chunk)
        for i in range(nrows):
            t = pos[i]
            e = t
            n = cnt[i]
            while e < n and idxb[i, e] < c1:
                e += 1
            if e > t:
                gather_axpy(acc, i, v, bh, idxb, sc, t, e)
            pos[i] = e


@njit(nogil=True, cache=True)
def _gathered_scores(qb8, kpad, corr128, s_k, bh, nrows, idxb, cnt, cvals, dots, sc, tot, bias,
                     slot, r0, row_bias, has_bias):
    """The VNNI path of :func:`_block_output`: each row's kept int8 scores ``q8 . k8`` from its
    kept key rows only (:func:`mcattn.latte.vnni.kept_dots`, 16 keys at a time), scaled to
    ``c s_k q8.k8 (+ bias)`` into ``sc``, and each row's maximum into ``tot``.

    ``qb8 [rows, dpad]`` holds the block's queries ``q8 + 128``, ``kpad [Nk, dpad]`` the
    head's int8 keys (aligned, zero-padded), ``corr128 [Nk]`` ``128 sum_c k8``. Compiled
    without fast-math, so that ``+ bias`` is never fused with the product into one
    multiply-add: an all-visible float mask must leave the scores, hence the output, bit for
    bit unchanged (the caller's ``P V`` sums may be reordered).
    """
    for i in range(nrows):
        n = cnt[i]
        if not has_bias:  # dots, scales and the max in vector registers
            tot[i] = vnni.kept_scores(sc, i, qb8, kpad, idxb, n, corr128, s_k, bh, cvals[i])
            continue
        smax = -np.inf
        if n > 0:
            vnni.kept_dots(dots, i, qb8, kpad, idxb, 0, n)
        c = cvals[i]
        for t in range(n):
            j = idxb[i, t]
            sval = c * np.float64(s_k[bh, j]) * np.float64(dots[i, t] - corr128[j])
            if has_bias:
                sval += np.float64(bias[slot, r0 + i if row_bias else 0, j])
            sc[i, t] = sval
            smax = max(smax, sc[i, t])
        tot[i] = smax


@njit(nogil=True, cache=True, fastmath=_FAST)
def _block_output(qblk, krows, vh, s_k, bh, i0, nrows, cvals, scale, int8_scores, idxb, cnt, sc,
                  acc, pos, tot, chunk, gathered, qb8, kpad, corr128, dots, out, bias, slot,
                  has_bias, do_pv):
    """Softmax over each row's kept keys and ``sum p v`` for a block of query rows.

    Row ``i`` (query ``i0 + i``) keeps ``idxb[i, :cnt[i]]`` (ascending). The keys are
    visited a chunk of ``chunk`` keys at a time for all the rows of the block, so the
    chunk's key and value rows stay in cache while every row takes its kept keys from it
    (row by row, each row would sweep the head's whole ``K`` and ``V``). ``qblk [nrows, d]``
    holds the rows' int8 (as floats) or float queries; ``cvals [nrows]`` their
    ``scale s_q``; ``sc`` the kept scores, then probabilities; ``vh [1, Nk, dv]`` the
    head's value rows. With ``gathered`` (VNNI, int8 scores) the scores are the kept key
    rows' int8 dot products (:func:`_gathered_scores`): ``qb8 [>= nrows, dpad]`` the
    block's queries ``q8 + 128``, ``kpad [Nk, dpad]`` the head's aligned int8 keys,
    ``corr128 [Nk]`` their bias correction, ``dots`` int32 scratch (masked rows only).
    """
    nk = vh.shape[1]
    d = qblk.shape[1]
    dv = vh.shape[2]
    row_bias = bias.shape[1] > 1
    r0 = i0
    pos[:nrows] = 0
    if gathered:  # the scores' scales and the row max in the same pass as the dots
        _gathered_scores(qb8, kpad, corr128, s_k, bh, nrows, idxb, cnt, cvals, dots, sc, tot, bias,
                         slot, r0, row_bias, has_bias)
    for c0 in range(0, nk if not gathered else 0, chunk):  # kept scores q . k, four keys at a time
        c1 = min(nk, c0 + chunk)
        for i in range(nrows):
            t = pos[i]
            n = cnt[i]
            while t + 4 <= n and idxb[i, t + 3] < c1:
                j0, j1, j2, j3 = idxb[i, t], idxb[i, t + 1], idxb[i, t + 2], idxb[i, t + 3]
                z = qblk[i, 0] * 0
                d0, d1, d2, d3 = z, z, z, z
                for cc in range(d):  # int8 values in float32: exact in any order
                    x = qblk[i, cc]
                    d0 += x * krows[j0, cc]
                    d1 += x * krows[j1, cc]
                    d2 += x * krows[j2, cc]
                    d3 += x * krows[j3, cc]
                sc[i, t] = d0
                sc[i, t + 1] = d1
                sc[i, t + 2] = d2
                sc[i, t + 3] = d3
                t += 4
            while t < n and idxb[i, t] < c1:
                j = idxb[i, t]
                dot = qblk[i, 0] * 0
                for cc in range(d):
                    dot += qblk[i, cc] * krows[j, cc]
                sc[i, t] = dot
                t += 1
            pos[i] = t
    for i in range(nrows):  # the scores' scales, the row max and exp
        n = cnt[i]
        if gathered:
            smax = tot[i]
        else:
            smax = -np.inf
            for t in range(n):
                j = idxb[i, t]
                if int8_scores:
                    sval = cvals[i] * np.float64(s_k[bh, j]) * np.float64(sc[i, t])
                else:
                    sval = np.float64(sc[i, t]) * scale
                if has_bias:
                    sval += np.float64(bias[slot, r0 + i if row_bias else 0, j])
                sc[i, t] = sval
                smax = max(smax, sc[i, t])
        tot[i] = smax
        top = tot[i]  # (in the scores' dtype: the same differences as an in-place subtract)
        total = sc[i, 0] * 0
        for t in range(n):  # one pass: shifted score, exp and the row sum
            e = exp_scalar(sc[i, t] - top)
            sc[i, t] = e
            total += e
        tot[i] = total
    if not do_pv:  # (benchmarks: the kept scores and softmax alone)
        return
    weighted_values(vh, 0, nrows, idxb, cnt, sc, acc, pos, chunk)  # sum p v
    for i in range(nrows):
        if cnt[i] > 0:
            inv = 1.0 / tot[i]
            for cc in range(dv):
                out[bh, i0 + i, cc] = acc[i, cc] * inv


@njit(nogil=True, cache=True)
def _pad_keys(k8, bh, kpad, corr128):
    """Head ``bh``'s int8 keys into ``kpad [Nk, dpad]`` (bytes past ``d`` zero) and
    ``corr128[j] = 128 sum_c k8[j, c]`` (the queries' bias of :func:`mcattn.latte.vnni.kept_dots`)."""
    d = k8.shape[2]
    for j in range(k8.shape[1]):
        s = np.int32(0)
        for cc in range(d):
            x = k8[bh, j, cc]
            kpad[j, cc] = x
            s += np.int32(x)
        for cc in range(d, kpad.shape[1]):
            kpad[j, cc] = 0
        corr128[j] = 128 * s


@njit(nogil=True, cache=True)
def _latte_tasks(q8, k8, aq, bk, l1q, l1k, qf, kf, v, s_q, s_k, sk256, scale, theta,
                 mode, int8_scores, bias, mask_index, has_bias, is_causal, block_q, want_mass,
                 do_select, write_mask, do_output, out, kept_out, dropped_out, mask_out,
                 use_vnni, block_k, do_pv, t0, t1):
    bh_count, nq, d = q8.shape
    nk = k8.shape[1]
    dv = v.shape[2]
    row_bias = bias.shape[1] > 1
    n_qblocks = (nq + block_q - 1) // block_q
    est_buf = np.empty(1 if use_vnni else block_q * nk, np.float32)
    # Nibble and int8 matrices of the current head only (small integers, exact in floats).
    hk = np.empty((1 if use_vnni else nk, d), np.float32)
    hq = np.empty((block_q, d), np.float32)
    # The VNNI estimate's byte layouts (see mcattn.latte.vnni), padded to whole tiles.
    d4 = (d + 3) // 4
    nk_pad = (nk + vnni.NR - 1) // vnni.NR * vnni.NR if use_vnni else 1
    rows_pad = (block_q + vnni.MR - 1) // vnni.MR * vnni.MR if use_vnni else 1
    kbytes = np.zeros(d4 * nk_pad * 4, np.int8)
    kw = kbytes.view(np.int32).reshape((d4, nk_pad))
    corr = np.zeros(nk_pad, np.int32)
    qbytes = np.zeros(rows_pad * d4 * 4, np.uint8)
    qw = qbytes.view(np.int32).reshape((rows_pad, d4))
    est_tiles = np.empty((rows_pad, nk_pad), np.float32)
    # With VNNI, the int8 kept scores are dot products of the kept key rows in int8
    # (vnni.kept_dots): the head's keys 64-byte aligned and zero-padded to whole vectors.
    gathered = use_vnni and int8_scores and do_output
    dpad = (d + 63) // 64 * 64
    kpad = aligned_rows(np.zeros((1, 1, dpad), np.int8), nk if gathered else 1)[0]
    corr128 = np.zeros(nk if gathered else 1, np.int32)
    qb8 = np.zeros((block_q if gathered else 1, dpad), np.uint8)
    dots = np.empty((block_q if gathered else 1, nk + 32), np.int32)  # 16-lane stores past n
    kbuf = np.empty((nk if int8_scores else 1, d), qf.dtype)
    vh = aligned_rows(v, nk if do_output else 1)  # the current head's value rows (aligned)
    current = -1
    err_buf = np.empty(block_q * nk if mode == 3 else 1, np.float32)
    true_buf = np.empty(block_q * nk if want_mass else 1, qf.dtype)
    low = np.empty(nk, np.float64)
    up = np.empty(nk, np.float64) if mode == 3 else low
    idx = np.empty(nk, np.int64)
    sel = np.empty(nk, np.float64)
    lanes = np.empty(8, np.float64)
    ninf = -np.inf
    plain = (mode == 0 or mode == 1) and not has_bias  # (return_info must not change the output)
    # The plain rules' block output (_block_output): kept lists and scores of the block's rows.
    pb = block_q
    idxb = np.empty((pb, nk + 16), np.int32)  # 16 slots of slack: vnni.compress_groups
    cnt = np.zeros(pb, np.int64)
    scb = np.empty((pb, nk + 16), v.dtype)  # 15 slots of slack: vnni.kept_scores
    accb = np.empty((pb, dv), v.dtype)
    posb = np.zeros(pb, np.int64)
    totb = np.zeros(pb, v.dtype)
    cvals = np.zeros(pb, np.float64)
    qblk = np.zeros((pb, d), qf.dtype)
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
            if gathered:
                _pad_keys(k8, bh, kpad, corr128)
            for j in range(nk if not use_vnni or (int8_scores and not gathered) else 0):
                for cc in range(d):
                    x = k8[bh, j, cc]
                    if not use_vnni:
                        hk[j, cc] = x >> 4
                    if int8_scores:
                        kbuf[j, cc] = x
            if do_output:
                vh[0] = v[bh]
            current = bh
        if use_vnni:  # the same integers as the BLAS product, in int8 arithmetic
            vnni.pack_queries(q8, bh, i0, nrows, False, qbytes.reshape((rows_pad, 4 * d4)))
            for tj in range(0, kend, vnni.NR):  # a key block's words stay in L1 for all rows
                for ti in range(0, nrows, vnni.MR):
                    vnni.estimate_tile(est_tiles, qw, kw, corr, ti, tj)
            if gathered and do_select:
                for i in range(nrows):
                    for cc in range(d):
                        qb8[i, cc] = np.uint8(np.int32(q8[bh, i0 + i, cc]) + 128)
            est = est_tiles
        else:
            for i in range(nrows):
                for cc in range(d):
                    hq[i, cc] = q8[bh, i0 + i, cc] >> 4
            est = est_buf[: nrows * kend].reshape((nrows, kend))
            np.dot(hq[:nrows], hk[:kend].T, est)
        if mode == 3:
            err = err_buf[: nrows * kend].reshape((nrows, kend))
            np.dot(aq[bh, i0:i1], bk[bh, :kend].T, err)
        if want_mass:
            ts = true_buf[: nrows * kend].reshape((nrows, kend))
            np.dot(qf[bh, i0:i1], kf[bh, :kend].T, ts)
        th = theta[bh]
        if not do_select:  # (benchmarks: the estimate product alone)
            continue
        if plain:
            for i in range(nrows):
                row = i0 + i
                rend = min(kend, row + 1) if is_causal else kend
                c = scale * np.float64(s_q[bh, row])
                cvals[i] = c
                n = _row_keep_plain(est, i, sk256, s_k, bh, rend, mode, th, c, idxb[i])
                cnt[i] = n
                kept_out[bh, row] = n
                if write_mask:
                    for t in range(n):
                        mask_out[bh, row, idxb[i, t]] = True
                if want_mass:  # every key j < rend is visible here (no float mask)
                    dropped_out[bh, row] = _dropped_plain(ts, i, rend, scale, idxb[i], n, sel)
                for cc in range(d if do_output and not gathered else 0):  # (gathered: qb8)
                    qblk[i, cc] = q8[bh, row, cc] if int8_scores else qf[bh, row, cc]
            if do_output:
                _block_output(qblk, kbuf if int8_scores else kf[bh], vh, s_k, bh, i0, nrows, cvals,
                              scale, int8_scores, idxb, cnt, scb, accb, posb, totb,
                              block_k, gathered, qb8, kpad, corr128, dots, out, bias, slot,
                          has_bias, do_pv)
            continue
        for i in range(nrows):
            row = i0 + i
            rend = min(kend, row + 1) if is_causal else kend
            r = row if row_bias else 0
            c = scale * np.float64(s_q[bh, row])
            top = _row_units(est, i, sk256, bh, rend, bias, slot, r, has_bias, c, low, lanes)
            if mode == 3:  # widen by the error bound: lower and upper estimates
                top = ninf
                for j in range(rend):
                    if low[j] != ninf:
                        e = (np.float64(err[i, j]) + (2.0 * (l1q[bh, row] + l1k[bh, j]) + d) / 4.0) \
                            * np.float64(s_k[bh, j])
                        up[j] = low[j] + e
                        low[j] = low[j] - e
                        top = max(top, low[j])
                    else:
                        up[j] = ninf
            n = _select(low, up, top, rend, mode, th, c, sel, idx)
            kept_out[bh, row] = n
            if write_mask:
                for t in range(n):
                    mask_out[bh, row, idx[t]] = True
            if want_mass:
                tmax = ninf
                for j in range(rend):
                    if up[j] != ninf:
                        sval = np.float64(ts[i, j]) * scale
                        if has_bias:
                            sval += np.float64(bias[slot, r, j])
                        sel[j] = sval
                        tmax = max(tmax, sval)
                    else:
                        sel[j] = ninf
                dropped_out[bh, row] = _dropped_share(sel, rend, tmax, idx, n)
            if do_output:  # the block's kept keys go through _block_output below
                for t in range(n):
                    idxb[i, t] = idx[t]
                cnt[i] = n
                cvals[i] = c
                for cc in range(d):
                    qblk[i, cc] = q8[bh, row, cc] if int8_scores else qf[bh, row, cc]
        if do_output:
            _block_output(qblk, kbuf if int8_scores else kf[bh], vh, s_k, bh, i0, nrows, cvals,
                          scale, int8_scores, idxb, cnt, scb, accb, posb, totb,
                          block_k, gathered, qb8, kpad, corr128, dots, out, bias, slot,
                          has_bias, do_pv)


@njit(nogil=True, cache=True)
def _quantize_tasks(rows, x8, scale, bad, t0, t1):
    """Rows ``[t0 * 64, t1 * 64)`` of :func:`quantize_rows` (64 rows a task)."""
    n, d = rows.shape
    for r in range(t0 * 64, min(n, t1 * 64)):
        amax = 0.0
        finite = True
        for c in range(d):
            a = abs(np.float64(rows[r, c]))
            finite &= a <= 1.7976931348623157e308  # False for inf and NaN
            amax = a if a > amax else amax
        if not finite:  # (the caller redoes the row with NumPy's semantics)
            bad[r] = True
            continue
        s = np.float32(amax / 127.0)
        s = s if s > 0 else np.float32(1.0)
        scale[r, 0] = s
        s64 = np.float64(s)
        for c in range(d):
            y = np.rint(np.float64(rows[r, c]) / s64)
            x8[r, c] = np.int8(min(127.0, max(-127.0, y)))


def quantize_rows(x):
    """:func:`mcattn.latte.naive.quantize_rows` of a NumPy float array on the CPU threads.

    The same IEEE operations per element (float64 row maximum, the float32 scale, one
    float64 division, round half to even, clip), so the same int8 values and scales bit for
    bit; rows holding inf or NaN are redone by the NumPy reference (its casts define them).

    Parameters
    ----------
    x : numpy.ndarray, float32 or float64, ``[..., N, d]``

    Returns
    -------
    x8 : numpy.ndarray of int8, ``[..., N, d]``
    scale : numpy.ndarray of float32, ``[..., N, 1]``
    """
    from .naive import quantize_rows as reference

    d = x.shape[-1] if x.ndim else 1
    if x.dtype not in (np.float32, np.float64) or d == 0 or x.size == 0:
        return reference(x)
    rows = np.ascontiguousarray(x).reshape(-1, d)
    x8 = np.empty(rows.shape, np.int8)
    scale = np.empty((rows.shape[0], 1), np.float32)
    bad = np.zeros(rows.shape[0], np.bool_)
    run_tasks(_quantize_tasks, (rows.shape[0] + 63) // 64, rows, x8, scale, bad,
              work=rows.size * 8, blas=False)
    if bad.any():
        r = np.flatnonzero(bad)
        x8[r], scale[r] = reference(rows[r])
    return x8.reshape(x.shape), scale.reshape(x.shape[:-1] + (1,))


def use_vnni(lat):
    """Whether the estimate takes the int8 (VNNI) tiles: on a VNNI CPU, unless
    ``config.LATTE_CPU_VNNI`` is off; the kept sets are the same either way."""
    return bool(vnni.AVAILABLE and config.LATTE_CPU_VNNI)


def kernel_arrays(lat):
    """Host arrays of ``safe`` mode: the nibble matrices of its error bound (float32) and row norms."""
    if lat.mode != "safe":
        empty = np.zeros((1, 1, 1), np.float32)
        return {"aq": empty, "bk": empty, "l1q": np.zeros((1, 1)), "l1k": np.zeros((1, 1))}
    q8 = lat.q8.astype(np.int16)
    k8 = lat.k8.astype(np.int16)
    hq, lq = q8 >> 4, q8 & 15
    hk, lk = k8 >> 4, k8 & 15
    return {
        "aq": np.ascontiguousarray(np.concatenate([16 * np.abs(hq), 16 * lq, lq], axis=-1),
                                   dtype=np.float32),
        "bk": np.ascontiguousarray(np.concatenate([lk, np.abs(hk), lk], axis=-1), dtype=np.float32),
        "l1q": np.abs(q8).sum(-1).astype(np.float64),
        "l1k": np.abs(k8).sum(-1).astype(np.float64),
    }


def _run(lat, *, do_output, write_mask, select=True, pv=True):
    inp = lat.inp
    q, k, v = inp.q, inp.k, inp.v
    bh, nq, nk = q.shape[0], inp.nq, inp.nk
    out = np.zeros((bh, nq, v.shape[2]), dtype=q.dtype)
    kept = np.zeros((bh, nq), dtype=np.int64)
    dropped = np.zeros((bh, nq), dtype=np.float64)
    mask_out = np.zeros((bh, nq, nk) if write_mask else (1, 1, 1), dtype=np.bool_)
    if bh == 0 or nq == 0 or nk == 0:
        return out, kept, dropped, mask_out
    arrays = kernel_arrays(lat)
    int8_scores = lat.exact_scores == "int8"
    # Query rows per task, at most 2^18 estimates per thread (1 MiB float32 tiles stay in L2).
    block_q = max(1, min(int(config.LATTE_CPU_BLOCK_Q), nq, max(vnni.MR, (1 << 18) // nk)))
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else np.zeros((1, 1, 1), q.dtype)
    mask_index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    n_tasks = bh * ((nq + block_q - 1) // block_q)
    run_tasks(_latte_tasks, n_tasks, lat.q8, lat.k8, arrays["aq"], arrays["bk"],
              arrays["l1q"], arrays["l1k"], q, k, v, lat.s_q, lat.s_k,
              256.0 * lat.s_k.astype(np.float64), float(inp.scale),
              lat.theta, MODES[lat.mode], int8_scores, bias, mask_index, has_bias,
              bool(inp.mask.is_causal), block_q, bool(lat.want_mass), select, write_mask, do_output,
              out, kept, dropped, mask_out, use_vnni(lat),
              max(1, int(config.LATTE_CPU_BLOCK_K)), bool(pv))
    return out, kept, dropped, mask_out


def forward(lat):
    """LATTE attention of canonical inputs on the CPU threads.

    Returns
    -------
    out : numpy.ndarray, ``[BH, Nq, dv]``
    kept : numpy.ndarray of int64, ``[BH, Nq]``
    dropped : numpy.ndarray of float64, ``[BH, Nq]``, or None without ``lat.want_mass``
    """
    out, kept, dropped, _ = _run(lat, do_output=True, write_mask=False)
    return out, kept, dropped if lat.want_mass else None


def kept_mask(lat):
    """The kept sets, bool ``[BH, Nq, Nk]``, from the same kernel."""
    return _run(lat, do_output=False, write_mask=True)[3]


@njit(nogil=True, cache=True, fastmath=_FAST)
def _backward_tasks(keep, q8, k8, q, k, v, dout, s_q, s_k, scale, int8_scores, bias, mask_index,
                    has_bias, dq, dk, dv, t0, t1):
    nq, d = q.shape[1], q.shape[2]
    nk, width = v.shape[1], v.shape[2]
    row_bias = bias.shape[1] > 1
    idx = np.empty(nk, np.int64)
    p = np.empty(nk, np.float64)
    dp = np.empty(nk, np.float64)
    qi = np.empty(d, np.float64)
    q8i = np.empty(d, np.float64)
    gi = np.empty(width, np.float64)
    for b in range(t0, t1):  # one batch row per task: dk, dv are summed over its queries only
        slot = mask_index[b] if has_bias else 0
        for i in range(nq):
            n = 0
            for j in range(nk):
                if keep[b, i, j]:
                    idx[n] = j
                    n += 1
            if n == 0:
                continue  # no visible key: zero gradients
            c = scale * np.float64(s_q[b, i])
            for cc in range(d):
                qi[cc] = q[b, i, cc]
                q8i[cc] = q8[b, i, cc]
            for cc in range(width):
                gi[cc] = dout[b, i, cc]
            top = -np.inf
            for t in range(n):  # the kept scores, as the forward computes them
                j = idx[t]
                dot = 0.0
                if int8_scores:
                    for cc in range(d):
                        dot += q8i[cc] * np.float64(k8[b, j, cc])
                    s = c * np.float64(s_k[b, j]) * dot
                else:
                    for cc in range(d):
                        dot += qi[cc] * np.float64(k[b, j, cc])
                    s = dot * scale
                if has_bias:
                    s += np.float64(bias[slot, i if row_bias else 0, j])
                p[t] = s
                top = max(top, s)
            total = 0.0
            for t in range(n):
                e = math.exp(p[t] - top)
                p[t] = e
                total += e
            delta = 0.0
            for t in range(n):
                p[t] /= total
                acc = 0.0
                j = idx[t]
                for cc in range(width):
                    acc += gi[cc] * np.float64(v[b, j, cc])
                dp[t] = acc
                delta += p[t] * acc
            for t in range(n):
                j = idx[t]
                ds = scale * p[t] * (dp[t] - delta)  # straight-through: d s / d q = scale k
                for cc in range(width):
                    dv[b, j, cc] += p[t] * gi[cc]
                for cc in range(d):
                    dq[b, i, cc] += ds * k[b, j, cc]
                    dk[b, j, cc] += ds * qi[cc]


def backward(lat, keep, dout):
    """Gradients of the hard-mask LATTE attention on the CPU threads (float64 accumulation).

    A task is a batch row; each query row visits its kept keys only: their scores as the
    forward computes them (int8 or float), the softmax, then ``dS = P (dO . v - delta)``
    and ``dq += scale dS k``, ``dk += scale dS q``, ``dv += P dO`` (straight-through for
    int8 scores; see :mod:`mcattn.latte.grad`; the reference is
    :func:`mcattn.latte.naive.reference_backward`).

    Parameters
    ----------
    lat : mcattn.latte.LatteInputs
    keep : numpy.ndarray of bool, ``[BH, Nq, Nk]``
        The kept sets (:func:`kept_mask`).
    dout : numpy.ndarray, ``[BH, Nq, dv]``

    Returns
    -------
    dq, dk, dv : numpy.ndarray of float64, ``[BH, Nq, d]``, ``[BH, Nk, d]``, ``[BH, Nk, dv]``
    """
    inp = lat.inp
    q, k, v = inp.q, inp.k, inp.v
    dq = np.zeros(q.shape, np.float64)
    dk = np.zeros(k.shape, np.float64)
    dv = np.zeros(v.shape, np.float64)
    if q.shape[0] == 0 or inp.nq == 0 or inp.nk == 0:
        return dq, dk, dv
    has_bias = inp.mask.bias is not None
    bias = inp.mask.bias if has_bias else np.zeros((1, 1, 1), q.dtype)
    mask_index = inp.mask.mask_index if has_bias else np.zeros(1, np.int64)
    run_tasks(_backward_tasks, q.shape[0], np.ascontiguousarray(keep), lat.q8, lat.k8, q, k, v,
              np.ascontiguousarray(dout), lat.s_q, lat.s_k, float(inp.scale),
              lat.exact_scores == "int8", bias, mask_index, has_bias, dq, dk, dv)
    return dq, dk, dv
