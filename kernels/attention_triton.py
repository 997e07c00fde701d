"""The Triton code of flash attention: forward, backward, and the helpers they share.

`kernels/attention.py` owns the API, the references, the launchers and the autotune
configs; it jits these functions on first use (`kernels._utils.jit_kernel` for the
kernels, `jit_helpers` for the ``@triton.jit`` helpers they call, which Triton
inlines). `tl` is bound into this module's globals then; importing this module never
imports triton.

Kernels: `attn_fwd_kernel` (one program per query block and head: online softmax,
writes O and the row log-sum-exp), `attn_bwd_preprocess_kernel` (delta = rowsum(O * dO)),
`attn_bwd_dkdv_kernel` (one program per key block and kv head: dK and dV accumulated
over the query blocks and, for GQA, over the query heads of its group) and
`attn_bwd_dq_kernel` (one program per query block; its key loop mirrors the forward's).

Index conventions: programs own (block, batch * heads). Dense tensors are addressed as
(batch, head, token, dim) through four strides; packed (varlen) tensors use batch
stride 0 and start at token cu_seqlens[b]. LSE / delta are (B, H, T) dense or
(H, total_q) packed, addressed as b * stride_lb + h * stride_lh + token.
"""

from __future__ import annotations  # kernel annotations (tl.constexpr) stay unevaluated until jit

# Names of the helpers below: `jit_helpers` swaps each for its `triton.jit` version.
HELPERS = ("packed_range", "key_blocks", "load_rows", "load_key_tile")


# ----------------------------------------------------------------------------- helpers


def packed_range(CuSeqlens, off_b, seqlen, VARLEN: tl.constexpr):
    # (first token, length) of batch row off_b: from cu_seqlens when packed, else (0, seqlen).
    if VARLEN:
        start = tl.load(CuSeqlens + off_b).to(tl.int64)
        seqlen = (tl.load(CuSeqlens + off_b + 1) - start).to(tl.int32)
    else:
        start = 0
    return start, seqlen


def key_blocks(start_m, shift, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Key range [0, hi) of query block start_m, split at mask_lo: blocks below it need no
    # mask; [mask_lo, hi) holds the causal diagonal, or (non-causal) the last partial block.
    # Query i sits at key position i + shift (bottom-right causal).
    if CAUSAL:
        mask_lo = tl.maximum(start_m * BLOCK_M + shift, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(seqlen_k, start_m * BLOCK_M + BLOCK_M + shift)
    else:
        mask_lo = seqlen_k // BLOCK_N * BLOCK_N
        hi = seqlen_k
    return mask_lo, hi


def load_rows(base, offs_t, stride_t, offs_d, stride_d, rows_ok):
    # A (rows, D) tile of token rows offs_t; rows that are not rows_ok read as 0.
    return tl.load(base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d, mask=rows_ok[:, None], other=0.0)


def load_key_tile(k_base, v_base, cols, offs_d, stride_kt, stride_kd, stride_vt, stride_vd, seqlen_k,
                  MASKED: tl.constexpr):
    # K and V rows `cols` (BLOCK_N, D); bounds-masked only where the tile may pass seqlen_k.
    k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd
    if MASKED:
        k = tl.load(k_ptrs, mask=cols[:, None] < seqlen_k, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < seqlen_k, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


# ----------------------------------------------------------------------------- forward


def attn_fwd_kernel(
    Q, K, V, Out, Lse, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads, group_size, qk_scale, n_bh,
    SEQ_BUCKET_Q, SEQ_BUCKET_K,  # autotune keys only
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    # (batch x heads) over grid axes 1 and 2: axis 1 stops at 65535 (see _utils.grid_yz)
    off_bh = tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
    if off_bh >= n_bh:
        return
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    off_hk = off_h // group_size  # GQA: the kv head this query head reads
    q_start, seqlen_q = packed_range(CuSeqlensQ, off_b, seqlen_q, VARLEN)
    k_start, seqlen_k = packed_range(CuSeqlensK, off_b, seqlen_k, VARLEN)
    if CAUSAL:  # the last query blocks see the most keys: schedule them first
        start_m = tl.num_programs(0) - 1 - start_m
    if start_m * BLOCK_M >= seqlen_q:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen_q
    k_base = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kt
    v_base = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vt
    q = load_rows(Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qt, offs_m, stride_qt,
                  offs_d, stride_qd, row_ok)  # (BLOCK_M, D)

    # Float arguments arrive as fp32 from a plain launch but as fp64 from torch.compile's
    # (inductor's) launcher: pin them to fp32 so the math and the dot accumulators stay fp32.
    qk_scale = tl.cast(qk_scale, tl.float32)
    # Running max starts finite so a fully masked block gives exp2(-inf) = 0, not NaN.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30  # row max of scores * qk_scale
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # row sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    shift = seqlen_k - seqlen_q
    mask_lo, hi = key_blocks(start_m, shift, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    for stage in tl.static_range(2):  # 0: unmasked key blocks, 1: masked key blocks
        if stage == 0:
            lo_s = 0
            hi_s = mask_lo
        else:
            lo_s = mask_lo
            hi_s = hi
        for start_n in range(lo_s, hi_s, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            cols = start_n + offs_n
            k, v = load_key_tile(k_base, v_base, cols, offs_d, stride_kt, stride_kd, stride_vt, stride_vd,
                                 seqlen_k, stage == 1)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            if stage == 1:
                keep = cols[None, :] < seqlen_k
                if CAUSAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
                qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new

    no_keys = l_i == 0.0
    acc = acc / tl.where(no_keys, 1.0, l_i)[:, None]
    # LSE in log2 units; +inf for rows that saw no key, so the backward's exp2(s - lse) is 0.
    lse = tl.where(no_keys, float("inf"), m_i + tl.log2(tl.where(no_keys, 1.0, l_i)))
    tl.store(Lse + off_b * stride_lb + off_h * stride_lh + q_start + offs_m, lse, mask=row_ok)
    o_base = Out + off_b * stride_ob + off_h * stride_oh + q_start * stride_ot
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             acc.to(Out.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- backward


def attn_bwd_preprocess_kernel(
    Out, DOut, Delta, CuSeqlensQ,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_db, stride_dh, stride_dt, stride_dd,
    stride_lb, stride_lh,
    seqlen_q, n_heads, n_bh,
    VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta[row] = sum_d O * dO: the softmax-backward correction term.
    start_m = tl.program_id(0)
    # (batch x heads) over grid axes 1 and 2: axis 1 stops at 65535 (see _utils.grid_yz)
    off_bh = tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
    if off_bh >= n_bh:
        return
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    q_start, seqlen_q = packed_range(CuSeqlensQ, off_b, seqlen_q, VARLEN)
    if start_m * BLOCK_M >= seqlen_q:
        return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen_q
    o = load_rows(Out + off_b * stride_ob + off_h * stride_oh + q_start * stride_ot, offs_m, stride_ot,
                  offs_d, stride_od, row_ok).to(tl.float32)
    do = load_rows(DOut + off_b * stride_db + off_h * stride_dh + q_start * stride_dt, offs_m, stride_dt,
                   offs_d, stride_dd, row_ok).to(tl.float32)
    tl.store(Delta + off_b * stride_lb + off_h * stride_lh + q_start + offs_m, tl.sum(o * do, axis=1), mask=row_ok)


def attn_bwd_dkdv_kernel(
    Q, K, V, DOut, DK, DV, Lse, Delta, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_db, stride_dh, stride_dt, stride_dd,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_kv_heads, group_size, sm_scale, qk_scale, n_bh,
    SEQ_BUCKET_Q, SEQ_BUCKET_K,  # autotune keys only
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (key block, batch, kv head): dK and dV stay in registers while it
    # walks every query block of every query head in its GQA group.
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 under torch.compile (see the forward)
    qk_scale = tl.cast(qk_scale, tl.float32)
    start_n = tl.program_id(0)
    # (batch x heads) over grid axes 1 and 2: axis 1 stops at 65535 (see _utils.grid_yz)
    off_bh = tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
    if off_bh >= n_bh:
        return
    off_b = (off_bh // n_kv_heads).to(tl.int64)
    off_hk = (off_bh % n_kv_heads).to(tl.int64)
    q_start, seqlen_q = packed_range(CuSeqlensQ, off_b, seqlen_q, VARLEN)
    k_start, seqlen_k = packed_range(CuSeqlensK, off_b, seqlen_k, VARLEN)
    if start_n * BLOCK_N >= seqlen_k:
        return

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < seqlen_k
    k = load_rows(K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kt, offs_n, stride_kt,
                  offs_d, stride_kd, key_ok)  # (BLOCK_N, D)
    v = load_rows(V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vt, offs_n, stride_vt,
                  offs_d, stride_vd, key_ok)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    shift = seqlen_k - seqlen_q
    if CAUSAL:
        # Query rows >= q_full see the whole key block; [q_lo, q_full) is the diagonal.
        q_lo = tl.maximum(start_n * BLOCK_N - shift, 0) // BLOCK_M * BLOCK_M
        q_full = tl.maximum(start_n * BLOCK_N + BLOCK_N - 1 - shift, 0)
        q_full = tl.minimum((q_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M, seqlen_q)
    else:
        q_lo = 0
        q_full = 0

    offs_m_base = tl.arange(0, BLOCK_M)
    for g in range(group_size):
        off_h = off_hk * group_size + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qt
        do_base = DOut + off_b * stride_db + off_h * stride_dh + q_start * stride_dt
        row_base = off_b * stride_lb + off_h * stride_lh + q_start
        for stage in tl.static_range(2):  # 0: causal diagonal (masked), 1: fully visible
            if stage == 0:
                lo_s = q_lo
                hi_s = q_full
            else:
                lo_s = q_full
                hi_s = seqlen_q
            for start_m in range(lo_s, hi_s, BLOCK_M):
                offs_m = start_m + offs_m_base
                row_ok = offs_m < seqlen_q
                q = load_rows(q_base, offs_m, stride_qt, offs_d, stride_qd, row_ok)  # (BLOCK_M, D)
                do = load_rows(do_base, offs_m, stride_dt, offs_d, stride_dd, row_ok)
                # Rows past the end load lse = +inf, so their probabilities are exactly 0.
                lse = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))
                delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
                qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
                p_t = tl.exp2(qk_t * qk_scale - lse[None, :])
                if stage == 0:
                    p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, p_t, 0.0)
                dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
                ds_t = p_t * (dp_t - delta[None, :])
                dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + (k_start + offs_n[:, None]) * stride_dkt
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + (k_start + offs_n[:, None]) * stride_dvt
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


def attn_bwd_dq_kernel(
    Q, K, V, DOut, DQ, Lse, Delta, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_db, stride_dh, stride_dt, stride_dd,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, n_heads, group_size, sm_scale, qk_scale, n_bh,
    SEQ_BUCKET_Q, SEQ_BUCKET_K,  # autotune keys only
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (query block, batch, head); the key loop mirrors the forward.
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 under torch.compile (see the forward)
    qk_scale = tl.cast(qk_scale, tl.float32)
    start_m = tl.program_id(0)
    # (batch x heads) over grid axes 1 and 2: axis 1 stops at 65535 (see _utils.grid_yz)
    off_bh = tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
    if off_bh >= n_bh:
        return
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    off_hk = off_h // group_size
    q_start, seqlen_q = packed_range(CuSeqlensQ, off_b, seqlen_q, VARLEN)
    k_start, seqlen_k = packed_range(CuSeqlensK, off_b, seqlen_k, VARLEN)
    if CAUSAL:
        start_m = tl.num_programs(0) - 1 - start_m
    if start_m * BLOCK_M >= seqlen_q:
        return

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen_q
    q = load_rows(Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qt, offs_m, stride_qt,
                  offs_d, stride_qd, row_ok)  # (BLOCK_M, D)
    do = load_rows(DOut + off_b * stride_db + off_h * stride_dh + q_start * stride_dt, offs_m, stride_dt,
                   offs_d, stride_dd, row_ok)
    row_base = off_b * stride_lb + off_h * stride_lh + q_start
    lse = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kt
    v_base = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vt
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    shift = seqlen_k - seqlen_q
    mask_lo, hi = key_blocks(start_m, shift, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    for stage in tl.static_range(2):  # 0: unmasked key blocks, 1: masked key blocks
        if stage == 0:
            lo_s = 0
            hi_s = mask_lo
        else:
            lo_s = mask_lo
            hi_s = hi
        for start_n in range(lo_s, hi_s, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            cols = start_n + offs_n
            k, v = load_key_tile(k_base, v_base, cols, offs_d, stride_kt, stride_kd, stride_vt, stride_vd,
                                 seqlen_k, stage == 1)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            p = tl.exp2(qk * qk_scale - lse[:, None])
            if stage == 1:
                keep = cols[None, :] < seqlen_k
                if CAUSAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + (q_start + offs_m[:, None]) * stride_dqt
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
