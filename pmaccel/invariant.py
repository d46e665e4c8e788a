"""Batch-invariant decoding on CUDA (``--deterministic``): a sample's arithmetic does not depend on its
companions, the batch size, its row or lane, or the number of processes.

Why tokens change with the batch on a GPU: cuBLAS picks its GEMM kernel (tiling, split-K) from the
shapes, torch's reductions pick their split from the number of rows, and attention kernels split the
keys by length; each choice changes the order of a sum, and bf16 rounds the difference into other
tokens. Under ``invariant_mode(model)`` the three operations whose sums run across a dimension go to
kernels with one fixed reduction order whatever the shapes:

    F.linear          a tiled GEMM without split-K: each output element sums its K products in blocks
                      of BLOCK_K, in one order, whatever M is; the output tile (rows x columns per
                      program) is chosen from the grid it makes (small tiles where large ones would
                      leave the device's multiprocessors idle), which changes no element's sum; a long
                      K on a narrow tile is read in blocks of twice that, whose MMA steps chain into
                      the accumulator in the same order (the same bits: ``k_block``); on Hopper the
                      128-row tiles of 2-byte types arrive by TMA, in persistent programs (the same
                      K blocks in the same order: the same bits)
    mean(dim=-1)      (RMSNorm) one program per row, the row summed in one fixed tree
    RMSNorm modules   the same sum, fused with the rest of the norm into one kernel (one launch instead
                      of ~8 elementwise ones per norm: a decode step is bound by its kernel count), for
                      every norm module that computes transformers' Llama-style RMSNorm (checked once
                      per class against the module's own forward)
    attention         per query, over the ordered list of the keys it may see (the mask compacted):
                      the sum runs in fixed chunks and blocks of that list, merged in order, so it
                      depends neither on the other rows nor on where the keys sit in the KV memory
                      (gaps, padding, slot count), nor on whether the chunks ran in one program or
                      each in its own (a decode step of few queries over long lists)

Everything else in a decoder is elementwise or per row already. The last property makes a branch of a
packed sample under the isolated mask compute exactly what it computes decoded alone (``--compare``).

A decode step is bound by its kernel count more than by its arithmetic, so a few steps run in fewer
launches, each giving the bits of what it replaces:

    sibling GEMMs     an attention's q/k/v, an MLP's gate and up projections (one input): one launch, each
                      weight where it is; the first layer called computes the others' results too
    RoPE              transformers' ``apply_rotary_pos_emb`` (``q * cos + rotate_half(q) * sin``, five
                      kernels per tensor): queries and keys in one kernel, each product and the sum rounded
                      as torch rounds them, for every modeling module whose own function gives the same bits
                      on a test input
    KV write          the step's keys and values into the slots in one kernel (``SlotCache``, any mode)

(Tried and left out: SiLU x up in one kernel. With exp and the division correctly rounded, as torch's give
them, it took as long as torch's two kernels on H200, and longer over a prefill's many rows.)

The kernels are Triton (shipped with CUDA builds of torch). On the CPU the mode changes nothing: the
CPU path is batch-invariant in fp32 as it is (tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface

from pmaccel.embedded import cache_root
from pmaccel.model import text_config

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton
    triton = None
try:  # host-side descriptors of the tensor memory accelerator (Hopper's TMA), in Triton 3.3 and later
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

logger = logging.getLogger(__name__)

INVARIANT_ATTENTION = "pmaccel_invariant"
KEYS_KWARG = "pmaccel_keys"  # the compacted key lists of one forward, computed once for every layer
ROWS_KWARG = "pmaccel_kv_rows"  # [B]: batch row b's queries read K/V row rows[b] of the cache (a decode step)
BLOCK_K = 64  # the K block of every GEMM tiling: the order in which an output element sums its products
# GEMM tilings (rows, columns, warps, pipeline stages): whatever the tile, an element's K products are summed
# in blocks of BLOCK_K in one order (bit-identical results, checked on H200 by benchmarks/gemm_tiles.py)
WIDE_TILE, NARROW_TILE = (128, 128, 8, 3), (64, 64, 4, 4)
HALF_WAVE_TILE = (128, 128, 8, 4)  # the wide tile with one more pipeline stage (2-byte types only)
DEEP_NARROW_TILE = (64, 64, 4, 6)  # the narrow tile with two more stages (2-byte types: their stages fit)
SKINNY_TILE = (64, 16, 4, 6)  # few rows of a narrow weight: four times the programs of the narrow tile
# On Hopper, 2-byte types: 128-row tiles are loaded by the tensor memory accelerator and the programs persist over
# the tiles (``_linear_tma_kernel``; the same K blocks in the same order, so the same bits). Many rows of a wide
# weight take 128 x 256 tiles, fewer the 128 x 128 tile with four stages (``gemm_tiling``)
TMA_WIDE_TILE = (128, 256, 8, 3)
TMA_GROUP = 8  # row blocks per group in a persistent program's order of tiles (neighbours share weight tiles in L2)
# a reduction this long (an MLP's down projection) on a 64-row tile is read LONG_K_BLOCK at a time, with one
# pipeline stage less (``k_block``; measured faster at K = 4864, not measured at 2048-4095)
LONG_K, LONG_K_BLOCK = 4096, 128
KEY_CHUNK = 512  # keys per attention chunk: a query's list is summed chunk by chunk, then the chunks merged
# keys per block (the chunk's inner sum), keys per chunk, warps, pipeline stages; 4-byte types take half the keys
# per block, so that two stages of K and V blocks fit in the shared memory of smaller cards. On H200, bf16, the
# Qwen2.5-0.5B attention (benchmarks/attention_tiles.py): 128-key blocks in 512-key chunks took 25 % less time
# per decode step than 64-key blocks in 256-key chunks, with 256 rows x 8 lanes and with 128 x 4
ATTENTION_BLOCKS = {2: (128, KEY_CHUNK, 4, 2), 4: (64, KEY_CHUNK, 4, 2)}  # by element size
BLOCK_KEYS = 64  # keys of the list compile_ahead launches the attention kernels over
ROPE_HEADS = 8  # heads per RoPE program (queries and keys then share one compiled kernel)


def available() -> bool:
    """Whether the invariant kernels can run here (a CUDA device and Triton)."""
    return triton is not None and torch.cuda.is_available()


def resolve(requested: bool | None, device: torch.device | str) -> bool:
    """Whether a model on ``device`` runs the invariant kernels: on CUDA when ``requested`` (``None``: where
    Triton is available, the default); never elsewhere (the CPU path needs none)."""
    if torch.device(device).type != "cuda" or requested is False:
        return False
    return requested is True or triton is not None


if triton is not None:

    @triton.jit
    def _gemm_tile(x, w, rm, rn, M, N, K, sxm, sxk, swn, swk, PRECISION: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr):
        # the [BM, BN] tile of x @ w^T at rows rm, columns rn: each element sums its K products BK at a time, in
        # one order, in fp32
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            a = tl.load(x + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(w + rn[None, :] * swn + kk[:, None] * swk, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit(do_not_specialize=["M"])
    def _linear_kernel(x, w, bias, out, M, N, K, sxm, sxk, swn, swk, som, son,
                       HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # int64: M x N may pass 2**31
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = _gemm_tile(x, w, rm, rn, M, N, K, sxm, sxk, swn, swk, PRECISION, BM, BN, BK)
        if HAS_BIAS:
            acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out + rm[:, None] * som + rn[None, :] * son, acc.to(out.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit(do_not_specialize=["M"])
    def _linear_parts_kernel(x, w0, w1, w2, b0, b1, b2, o0, o1, o2, M, N0, N1, N2, K, sxm, sxk, sw0, sw1, sw2,
                             HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # x @ w_i^T (+ b_i) into o_i [M, N_i] (contiguous) for up to three weights [N_i, K] of one input, in one
        # launch: column tile j is w0's while j < cdiv(N0, BN), then w1's, then w2's; each tile as _linear_kernel
        # computes it (the same bits)
        j = tl.program_id(1)
        t1 = tl.cdiv(N0, BN)
        t2 = t1 + tl.cdiv(N1, BN)
        in1, in2 = j >= t1, j >= t2
        w = tl.where(in2, w2, tl.where(in1, w1, w0))
        o = tl.where(in2, o2, tl.where(in1, o1, o0))
        N = tl.where(in2, N2, tl.where(in1, N1, N0))
        swn = tl.where(in2, sw2, tl.where(in1, sw1, sw0))
        rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        rn = (j - tl.where(in2, t2, tl.where(in1, t1, 0))) * BN + tl.arange(0, BN)
        acc = _gemm_tile(x, w, rm, rn, M, N, K, sxm, sxk, swn, 1, PRECISION, BM, BN, BK)
        if HAS_BIAS:
            b = tl.where(in2, b2, tl.where(in1, b1, b0))
            acc += tl.load(b + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(o + rm[:, None] * N + rn[None, :], acc.to(o.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _tma_tile(t, num_m, num_n, GROUP: tl.constexpr):
        # tile t of a num_m x num_n grid, GROUP row blocks at a time, column by column within a group
        per_group = GROUP * num_n
        first = (t // per_group) * GROUP
        rows = tl.minimum(num_m - first, GROUP)
        return first + (t % per_group) % rows, (t % per_group) // rows

    @triton.jit
    def _tma_part(xd, wd, od, bias, first, M, N, K, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, GROUP: tl.constexpr):
        # this program's tiles of x @ w^T, from tile ``first`` on, one in every num_programs: each element sums
        # its K products BK at a time, in one order, in fp32 (as _gemm_tile); the blocks arrive by TMA, and
        # rows or columns past the tensors' ends read as zeros and are not written
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        for t in tl.range(first, num_m * num_n, tl.num_programs(0), flatten=True):
            pm, pn = _tma_tile(t, num_m, num_n, GROUP)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                acc = tl.dot(xd.load([pm * BM, k0]), wd.load([pn * BN, k0]).T, acc)
            if HAS_BIAS:
                rn = pn * BN + tl.arange(0, BN)
                acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            od.store([pm * BM, pn * BN], acc.to(od.dtype))

    @triton.jit(do_not_specialize=["M"])
    def _linear_tma_kernel(xd, wd0, wd1, wd2, od0, od1, od2, b0, b1, b2, M, N0, N1, N2, K,
                           PARTS: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, GROUP: tl.constexpr):
        # x @ w_i^T (+ b_i) for up to three weights of one input (``linear_parts``; one weight: ``linear``),
        # persistent: the tiles of every part numbered one after the other, program p taking every P-th
        p = tl.program_id(0)
        P = tl.num_programs(0)
        _tma_part(xd, wd0, od0, b0, p, M, N0, K, HAS_BIAS, BM, BN, BK, GROUP)
        if PARTS > 1:
            before = tl.cdiv(M, BM) * tl.cdiv(N0, BN)
            _tma_part(xd, wd1, od1, b1, (p + P - before % P) % P, M, N1, K, HAS_BIAS, BM, BN, BK, GROUP)
            if PARTS > 2:
                before += tl.cdiv(M, BM) * tl.cdiv(N1, BN)
                _tma_part(xd, wd2, od2, b2, (p + P - before % P) % P, M, N2, K, HAS_BIAS, BM, BN, BK, GROUP)

    @triton.jit
    def _row_mean_kernel(x, out, n, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n, BLOCK):
            acc += tl.load(x + row * stride + start + offs, mask=start + offs < n, other=0.0).to(tl.float32)
        tl.store(out + row, tl.sum(acc, axis=0) / n)

    @triton.jit
    def _rms_norm_kernel(x, w, out, n, sx, so, eps, BLOCK: tl.constexpr):
        # transformers' Llama RMSNorm, one row per program: w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype),
        # the mean summed exactly as _row_mean_kernel sums it
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n, BLOCK):
            v = tl.load(x + row * sx + start + offs, mask=start + offs < n, other=0.0).to(tl.float32)
            acc += v * v
        r = tl.rsqrt(tl.sum(acc, axis=0) / n + eps)
        for start in range(0, n, BLOCK):
            m = start + offs < n
            v = tl.load(x + row * sx + start + offs, mask=m, other=0.0)
            y = (v.to(tl.float32) * r).to(v.dtype).to(tl.float32)
            g = tl.load(w + start + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(out + row * so + start + offs, (g * y).to(out.dtype.element_ty), mask=m)

    @triton.jit
    def _row_cumsum_kernel(x, out, n, sx, so, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        carry = tl.zeros((), dtype=tl.float32)
        for start in range(0, n, BLOCK):
            v = tl.load(x + row * sx + start + offs, mask=start + offs < n, other=0.0).to(tl.float32)
            c = tl.cumsum(v, axis=0) + carry
            tl.store(out + row * so + start + offs, c.to(out.dtype.element_ty), mask=start + offs < n)
            carry = tl.sum(tl.where(offs == BLOCK - 1, c, 0.0), axis=0)  # the chunk's last sum, exactly

    @triton.jit(do_not_specialize=["T"])
    def _rope_kernel(x0, x1, cos, sin, out0, out1, H0, H1, T, sxb0, sxh0, sxt0, sxb1, sxh1, sxt1, scb, sct, ssb, sst,
                     sob0, soh0, sot0, sob1, soh1, sot1, HALF: tl.constexpr, BH: tl.constexpr, BHALF: tl.constexpr):
        # x [B, H, T, D] -> out: (x * cos) + (rotate_half(x) * sin), every product and the sum rounded to
        # out's type as torch's elementwise kernels round them; for two tensors of one cos/sin (queries and
        # keys) in one launch: one program per (token, batch, BH heads of x0, then BH heads of x1)
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        t1 = tl.cdiv(H0, BH)
        second = tl.program_id(2) >= t1
        x = tl.where(second, x1, x0)
        out = tl.where(second, out1, out0)
        H = tl.where(second, H1, H0)
        sxb, sxh, sxt = tl.where(second, sxb1, sxb0), tl.where(second, sxh1, sxh0), tl.where(second, sxt1, sxt0)
        sob, soh, sot = tl.where(second, sob1, sob0), tl.where(second, soh1, soh0), tl.where(second, sot1, sot0)
        h = (tl.program_id(2) - tl.where(second, t1, 0)) * BH + tl.arange(0, BH)
        j = tl.arange(0, BHALF)
        jm = j < HALF
        m = (h < H)[:, None] & jm[None, :]
        dt = out.dtype.element_ty
        xp = x + b * sxb + t * sxt + h[:, None] * sxh + j[None, :]
        x1 = tl.load(xp, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(cos + b * scb + t * sct + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos + b * scb + t * sct + HALF + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin + b * ssb + t * sst + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin + b * ssb + t * sst + HALF + j, mask=jm, other=0.0).to(tl.float32)[None, :]
        lo = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)  # -x2: rotate_half's sign
        hi = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        op = out + b * sob + t * sot + h[:, None] * soh + j[None, :]
        tl.store(op, lo.to(dt), mask=m)
        tl.store(op + HALF, hi.to(dt), mask=m)

    @triton.jit(do_not_specialize=["Q", "srb", "srq", "ssb", "ssq"])
    def _slot_write_kernel(k, v, kc, vc, rows, slots, Q, H, skb, skh, skq, svb, svh, svq, srb, srq, ssb, ssq,
                           ckr, ckh, cks, cvr, cvh, cvs, D: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
        # token (b, q) of K and V [B, H, Q, D] into the KV memories [R, H, S, D] at row rows[b, q], slot
        # slots[b, q]: one program per token, both tensors
        i = tl.program_id(0).to(tl.int64)
        b, q = i // Q, i % Q
        r = tl.load(rows + b * srb + q * srq)
        s = tl.load(slots + b * ssb + q * ssq)
        h = tl.arange(0, BH)
        d = tl.arange(0, BD)
        m = (h < H)[:, None] & (d < D)[None, :]
        kx = tl.load(k + b * skb + q * skq + h[:, None] * skh + d[None, :], mask=m)
        tl.store(kc + r * ckr + s * cks + h[:, None] * ckh + d[None, :], kx, mask=m)
        vx = tl.load(v + b * svb + q * svq + h[:, None] * svh + d[None, :], mask=m)
        tl.store(vc + r * cvr + s * cvs + h[:, None] * cvh + d[None, :], vx, mask=m)

    # One query's attention over part of its key list, and the merge of two such parts: shared by the kernels
    # below, so that a list attended in one program or split over several sums in the same order, bit for bit.
    @triton.jit
    def _attend_chunk(qt, k, v, keys, scale, start, stop, kbase, vbase, skh_hk, svh_hk, sks, svs, d, dm,
                      PRECISION: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
        # keys[start:stop] (a chunk of the list), in blocks of BS -> (running max, sum of exp, weighted values)
        m_i = tl.full((BG,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BG,), dtype=tl.float32)
        acc = tl.zeros((BG, BD), dtype=tl.float32)
        for j0 in range(start, stop, BS):
            j = j0 + tl.arange(0, BS)
            jm = j < stop
            slot = tl.load(keys + j, mask=jm, other=0)
            kt = tl.load(k + kbase + skh_hk + slot[None, :] * sks + d[:, None], mask=jm[None, :] & dm[:, None],
                         other=0.0)  # [BD, BS]
            s = tl.dot(qt, kt, input_precision=PRECISION) * scale  # [BG, BS]
            s = tl.where(jm[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(v + vbase + svh_hk + slot[:, None] * svs + d[None, :], mask=jm[:, None] & dm[None, :],
                         other=0.0)  # [BS, BD]
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _merge_chunk(m, total, acc, m_c, l_c, acc_c):
        # the running (max, sum, values) of the chunks before, and the next chunk's: exact for an empty start
        m_new = tl.maximum(m, m_c)
        a = tl.exp(m - m_new)
        b = tl.exp(m_c - m_new)
        return m_new, total * a + l_c * b, acc * a[:, None] + acc_c * b[:, None]

    # the key lists' strides follow the step's query count and slot count: unspecialized, one compiled kernel
    # serves every shape (and can be compiled before the first one is known)
    @triton.jit(do_not_specialize=["B", "Q", "sib", "siq", "scb"])
    def _attention_kernel(q, k, v, out, keys, count, rows, scale, B, Q, G, D,
                          sqb, sqh, sqq, skb, skh, sks, svb, svh, svs, sob, soq, soh, sib, siq, scb,
                          PRECISION: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                          CHUNK: tl.constexpr):
        # one program per (query, row, KV head): the list's chunks one after the other; row b's keys are K/V
        # row rows[b]
        qi = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)  # int64: a large KV memory passes 2**31 elements
        kb = tl.load(rows + b).to(tl.int64)
        hk = tl.program_id(2)
        g = tl.arange(0, BG)
        d = tl.arange(0, BD)
        heads = hk * G + g
        gm = g < G
        dm = d < D
        qt = tl.load(q + b * sqb + heads[:, None] * sqh + qi * sqq + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
        n = tl.load(count + b * scb + qi)
        m = tl.full((BG,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BG,), dtype=tl.float32)
        acc = tl.zeros((BG, BD), dtype=tl.float32)
        for c0 in range(0, n, CHUNK):
            m_c, l_c, acc_c = _attend_chunk(qt, k, v, keys + b * sib + qi * siq, scale, c0, tl.minimum(c0 + CHUNK, n),
                                            kb * skb, kb * svb, hk * skh, hk * svh, sks, svs, d, dm,
                                            PRECISION, BG, BS, BD)
            m, total, acc = _merge_chunk(m, total, acc, m_c, l_c, acc_c)
        o = tl.where(total[:, None] > 0, acc / total[:, None], 0.0)
        tl.store(out + b * sob + qi * soq + heads[:, None] * soh + d[None, :], o.to(out.dtype.element_ty),
                 mask=gm[:, None] & dm[None, :])

    @triton.jit(do_not_specialize=["B", "Q", "sib", "siq", "scb", "CHUNKS"])
    def _attention_chunks_kernel(q, k, v, part_m, part_l, part_acc, keys, count, rows, scale, B, Q, G, D,
                                 sqb, sqh, sqq, skb, skh, sks, svb, svh, svs, sib, siq, scb, CHUNKS,
                                 PRECISION: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                                 CHUNK: tl.constexpr):
        # one program per (query, row, KV head x chunk): that chunk's part, merged by _attention_merge_kernel
        qi = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        hk = tl.program_id(2) // CHUNKS
        c = tl.program_id(2) % CHUNKS
        n = tl.load(count + b * scb + qi)
        if c * CHUNK < n:
            g = tl.arange(0, BG)
            d = tl.arange(0, BD)
            heads = hk * G + g
            gm = g < G
            dm = d < D
            qt = tl.load(q + b * sqb + heads[:, None] * sqh + qi * sqq + d[None, :], mask=gm[:, None] & dm[None, :],
                         other=0.0)
            kb = tl.load(rows + b).to(tl.int64)
            m_c, l_c, acc_c = _attend_chunk(qt, k, v, keys + b * sib + qi * siq, scale, c * CHUNK,
                                            tl.minimum(c * CHUNK + CHUNK, n), kb * skb, kb * svb, hk * skh, hk * svh,
                                            sks, svs, d, dm, PRECISION, BG, BS, BD)
            at = ((b * Q + qi) * tl.num_programs(2) + tl.program_id(2)) * BG  # part_* [B, Q, H_kv * CHUNKS, BG(, BD)]
            tl.store(part_m + at + g, m_c)
            tl.store(part_l + at + g, l_c)
            tl.store(part_acc + (at + g[:, None]) * BD + d[None, :], acc_c)

    @triton.jit(do_not_specialize=["B", "Q", "scb", "CHUNKS"])
    def _attention_merge_kernel(part_m, part_l, part_acc, out, count, B, Q, G, D, sob, soq, soh, scb, CHUNKS,
                                BG: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr):
        qi = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        hk = tl.program_id(2)
        g = tl.arange(0, BG)
        d = tl.arange(0, BD)
        heads = hk * G + g
        n = tl.load(count + b * scb + qi)
        m = tl.full((BG,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BG,), dtype=tl.float32)
        acc = tl.zeros((BG, BD), dtype=tl.float32)
        for c in range(0, tl.cdiv(n, CHUNK)):
            at = ((b * Q + qi) * (tl.num_programs(2) * CHUNKS) + hk * CHUNKS + c) * BG
            m, total, acc = _merge_chunk(m, total, acc, tl.load(part_m + at + g), tl.load(part_l + at + g),
                                     tl.load(part_acc + (at + g[:, None]) * BD + d[None, :]))
        o = tl.where(total[:, None] > 0, acc / total[:, None], 0.0)
        tl.store(out + b * sob + qi * soq + heads[:, None] * soh + d[None, :], o.to(out.dtype.element_ty),
                 mask=(g < G)[:, None] & (d < D)[None, :])


ATTENTION_KERNELS = (_attention_kernel, _attention_chunks_kernel, _attention_merge_kernel) if triton is not None else ()


def _unmoded(fn: Callable) -> Callable:
    """``fn`` with torch-function modes (``_InvariantOps``) off while it runs: a kernel's wrapper reads dozens of
    strides and shapes per launch, and each read would go through the mode's Python (a prefill's forward is
    bound by its host time)."""

    @functools.wraps(fn)
    def unmoded(*args: Any, **kwargs: Any) -> Any:
        with torch._C.DisableTorchFunction():
            return fn(*args, **kwargs)

    return unmoded


@_unmoded
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           tiling: tuple[int, int, int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with one K blocking for every shape: row i of the result depends on row i of ``x``
    alone, bit for bit, whatever the number of rows. ``tiling``: (rows, columns, warps, stages) per
    program instead of ``gemm_tiling``'s choice (benchmarks compare them). ``out``: a contiguous tensor of
    the result's shape and ``x``'s dtype to write the result into (and return)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    M, K = x2.shape
    N = weight.shape[0]
    if out is None:
        result = out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    else:
        if out.shape != (*shape[:-1], N) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
            raise ValueError(f"linear: out must be a contiguous {x.dtype} tensor of shape {(*shape[:-1], N)} on "
                             f"{x.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
        result, out = out, out.view(M, N)
    if M:
        tiling = tiling or gemm_tiling(M, N, x.element_size(), x.device)
        if _tma_launch(x2, [weight], [bias], [out], tiling):
            return result.reshape(*shape[:-1], N)
        bm, bn, warps, _ = tiling
        bk, stages = k_block(K, tiling, x.element_size(), x.device)
        _linear_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            x2, weight, bias if bias is not None else out, out, M, N, K,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return result.reshape(*shape[:-1], N)


@_unmoded
def linear_parts(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None], *,
                 tiling: tuple[int, int, int, int] | None = None) -> list[torch.Tensor]:
    """``[linear(x, w, b) for w, b in zip(weights, biases)]`` in one launch, the same bits: up to three weights of
    one input (an attention's q/k/v, an MLP's gate and up projections), with a bias each or none at all.
    Each weight stays where it is (no concatenated copy); the outputs are contiguous tensors of their own."""
    if not 1 <= len(weights) <= 3 or len(biases) != len(weights):
        raise ValueError(f"linear_parts takes one to three weights with a bias each, got {len(weights)}, {len(biases)}")
    has_bias = biases[0] is not None
    if any((b is not None) != has_bias for b in biases):
        raise ValueError("linear_parts: either every weight has a bias or none has")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    M, K = x2.shape
    weights = [w if w.stride(-1) == 1 else w.contiguous() for w in weights]
    outs = [torch.empty(M, w.shape[0], dtype=x.dtype, device=x.device) for w in weights]
    if M:
        Ns = [w.shape[0] for w in weights]
        tiling = tiling or gemm_tiling(M, sum(Ns), x.element_size(), x.device)
        if _tma_launch(x2, weights, biases, outs, tiling):
            return [o.reshape(*shape[:-1], o.shape[-1]) for o in outs]
        bm, bn, warps, _ = tiling
        bk, stages = k_block(K, tiling, x.element_size(), x.device)
        pad = lambda seq, fill: [*seq, *[fill] * (3 - len(seq))]  # noqa: E731  (absent parts: no tiles)
        tiles = sum(triton.cdiv(n, bn) for n in Ns)
        _linear_parts_kernel[(triton.cdiv(M, bm), tiles)](
            x2, *pad(weights, weights[0]), *pad(biases if has_bias else [outs[0]], outs[0]), *pad(outs, outs[0]),
            M, *pad(Ns, 0), K, x2.stride(0), x2.stride(1), *pad([w.stride(0) for w in weights], 0),
            HAS_BIAS=has_bias, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return [o.reshape(*shape[:-1], o.shape[-1]) for o in outs]


def _tma_device(itemsize: int, device: torch.device) -> bool:
    """Whether 128-row tiles of ``itemsize``-byte types run the TMA kernel on ``device``: Hopper (measured on
    H200; not ROCm, whose capability numbers mean other cards), 2-byte types, a Triton with host-side tensor
    descriptors."""
    if TensorDescriptor is None or itemsize != 2 or device.type != "cuda" or torch.version.hip is not None:
        return False
    index = device.index
    if index is None:
        if not torch.cuda.is_available():
            return False
        index = torch.cuda.current_device()
    if index not in _HOPPER:
        _HOPPER[index] = torch.cuda.is_available() and torch.cuda.get_device_capability(index)[0] == 9
    return _HOPPER[index]


def _tma_tiling(tiling: tuple[int, int, int, int], itemsize: int, device: torch.device) -> bool:
    """Whether ``tiling`` runs the TMA kernel on ``device`` (given tensors it can read): a 128-row tile whose
    stages and output tile fit in a program's shared memory."""
    bm, bn, _, stages = tiling
    need = (stages * (bm + bn) * BLOCK_K + bm * bn) * itemsize + SHARED_MEMORY_SPARE
    return bm == 128 and _tma_device(itemsize, device) and need <= _shared_memory(device)


def _tma_readable(t: torch.Tensor) -> bool:
    """A 2-D tensor TMA can address: rows 16-byte aligned, elements contiguous within a row."""
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.shape[0] > 0 and t.shape[1] > 0)


def _tma_launch(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                outs: Sequence[torch.Tensor], tiling: tuple[int, int, int, int]) -> bool:
    """``outs[i] = x @ weights[i]^T (+ biases[i])`` by ``_linear_tma_kernel`` where ``tiling`` runs it and every
    tensor is readable by TMA (else nothing is launched: ``False``); the bits of ``_linear_kernel``'s tiles."""
    if not _tma_tiling(tiling, x.element_size(), x.device) or not all(map(_tma_readable, (x, *weights, *outs))):
        return False
    bm, bn, warps, stages = tiling
    M, K = x.shape
    Ns = [w.shape[0] for w in weights]
    tiles = triton.cdiv(M, bm) * sum(triton.cdiv(n, bn) for n in Ns)
    descriptor = TensorDescriptor.from_tensor
    wds = [descriptor(w, [bn, BLOCK_K]) for w in weights]
    ods = [descriptor(o, [bm, bn]) for o in outs]
    pad = lambda seq: [*seq, *[seq[0]] * (3 - len(seq))]  # noqa: E731  (absent parts: no tiles)
    _linear_tma_kernel[(min(tiles, _multiprocessors(x.device)),)](
        descriptor(x, [bm, BLOCK_K]), *pad(wds), *pad(ods), *pad(biases if biases[0] is not None else outs),
        M, *[*Ns, 0, 0][:3], K, PARTS=len(weights), HAS_BIAS=biases[0] is not None, BM=bm, BN=bn, BK=BLOCK_K,
        GROUP=TMA_GROUP, num_warps=warps, num_stages=stages)
    return True


def gemm_tiling(M: int, N: int, itemsize: int, device: torch.device) -> tuple[int, int, int, int]:
    """The tiling of an [M, K] x [K, N] GEMM: (rows, columns, warps, stages) per program.

    Wide 128 x 128 tiles while they fill every multiprocessor at least once; where they fill half of them
    or more, the same tiles with one more pipeline stage (2-byte types: the stage's shared memory fits).
    Below that, or for 64 rows or fewer (a wide tile would compute rows that are not there), 64 x 64 tiles
    while they fill half the multiprocessors (with two more stages for 2-byte types), else 64 x 16 tiles:
    a few rows of a narrow weight (a decode step's tail, one sample's branches) then read it with four
    times the programs. Measured on H200 over the Qwen2.5-0.5B weight shapes, each launch replayed from a
    CUDA graph (``benchmarks/gemm_tiles.py --graph``): at 8 to 128 rows the MLP's down projection takes
    13 us instead of 23 us, q/o 3.8-4.4 us instead of 5.5-6.3 us. The K block, and so every result bit,
    stays the same.

    On Hopper, for 2-byte types, the 128-row tiles run the TMA kernel (``_linear_tma_kernel``): 128 x 256 tiles
    where they fill every multiprocessor twice, else the 128 x 128 tile with four stages where it fills half of
    them. On H200 (bf16, replayed from a CUDA graph: ``benchmarks/gemm_tiles.py --graph --tma``), against the
    plain kernel's choice, the 0.5B model's weights: its output head 238 us instead of 322 at 512 rows, 917
    instead of 1,163 at 2,048; the down projection 28.9 us instead of 36.9 at 2,048 rows, 470 instead of 687 at
    32,768; one of the gate and up projections 33.8 us instead of 38.4 at 2,048 rows, 454 instead of 784 at
    32,768 (cuBLAS: 465). Below 128-row tiles nothing changes.
    """
    sms = _multiprocessors(device)
    if M > NARROW_TILE[0]:
        tiles = -(-M // WIDE_TILE[0]) * -(-N // WIDE_TILE[1])
        if _tma_tiling(HALF_WAVE_TILE, itemsize, device):
            if -(-M // TMA_WIDE_TILE[0]) * -(-N // TMA_WIDE_TILE[1]) >= 2 * sms and _tma_tiling(
                    TMA_WIDE_TILE, itemsize, device):
                return TMA_WIDE_TILE
            if 2 * tiles >= sms:
                return HALF_WAVE_TILE
        elif tiles >= sms:
            return WIDE_TILE
        elif 2 * tiles >= sms and itemsize <= 2:
            return HALF_WAVE_TILE
    if 2 * -(-M // NARROW_TILE[0]) * -(-N // NARROW_TILE[1]) >= sms:
        return DEEP_NARROW_TILE if itemsize <= 2 else NARROW_TILE
    return SKINNY_TILE


def gemm_tilings(itemsize: int, N: int | None = None,
                 device: torch.device | None = None) -> list[tuple[int, int, int, int]]:
    """Every tiling ``gemm_tiling`` may choose for an element size (one compiled kernel each; with a device, the
    TMA kernel's wide tile where it runs there); given a weight's ``N`` and its device, only those it chooses for
    some row count of that weight there."""
    if N is None or device is None:
        narrow = [DEEP_NARROW_TILE, HALF_WAVE_TILE] if itemsize <= 2 else [NARROW_TILE]
        tma = [TMA_WIDE_TILE] if device is not None and _tma_tiling(TMA_WIDE_TILE, itemsize, device) else []
        return [WIDE_TILE, *narrow, SKINNY_TILE, *tma]
    last = widest_tiling(itemsize, device)
    chosen, M = [], 1  # the choice depends on M through whole 64-row blocks only, and ends at the widest tile
    while not chosen or chosen[-1] != last:
        tiling = gemm_tiling(M, N, itemsize, device)
        if tiling not in chosen:
            chosen.append(tiling)
        M += NARROW_TILE[0]
    return chosen


def widest_tiling(itemsize: int, device: torch.device) -> tuple[int, int, int, int]:
    """The tiling ``gemm_tiling`` chooses for every row count past some: the TMA kernel's wide tile where it runs
    (its 128 x 128 tile where only that one fits in shared memory), else the wide tile."""
    if _tma_tiling(HALF_WAVE_TILE, itemsize, device):
        return TMA_WIDE_TILE if _tma_tiling(TMA_WIDE_TILE, itemsize, device) else HALF_WAVE_TILE
    return WIDE_TILE


def k_block(K: int, tiling: tuple[int, int, int, int], itemsize: int, device: torch.device) -> tuple[int, int]:
    """The K block and pipeline stages of a GEMM over ``K`` under ``tiling``: ``(BLOCK_K, its stages)``, or for a
    long K (``LONG_K`` or more) on a 64-row tile of a 2-byte type ``(LONG_K_BLOCK, one stage less)`` where the
    device's shared memory holds those stages. A program then runs half the loop iterations over K; its
    ``tl.dot`` still issues one MMA step per 16 products of K, in order, into one fp32 accumulator, so every
    element's sum, and every result bit, is that of ``BLOCK_K`` (checked on H200 by
    ``benchmarks/gemm_tiles.py`` and the GPU tests). On H200, bf16, each launch replayed from a CUDA graph, the
    Qwen2.5-0.5B down projection (K = 4864) took 15.3 us instead of 19.4 at 512 rows and 10.2-10.8 us instead
    of 13.0-13.1 at 8-64 rows; the wide tile and K = 896 (q/k/v/o, gate/up) were not faster so."""
    bm, bn, _, stages = tiling
    if K < LONG_K or bm != NARROW_TILE[0] or itemsize > 2:
        return BLOCK_K, stages
    need = (stages - 1) * (bm + bn) * LONG_K_BLOCK * itemsize + SHARED_MEMORY_SPARE
    return (LONG_K_BLOCK, stages - 1) if need <= _shared_memory(device) else (BLOCK_K, stages)


SHARED_MEMORY_SPARE = 8192  # bytes of a program's shared memory besides its pipeline's blocks (barriers, epilogue)
_SMS: dict[int, int] = {}
_SHARED: dict[int, int] = {}
_HOPPER: dict[int, bool] = {}


def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory a program may use on ``device`` (0 where unknown: Triton's interpreter)."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SHARED:
        _SHARED[index] = int(getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0))
    return _SHARED[index]


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter: any tiling does
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


@_unmoded
def row_mean(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """``x.mean(-1)`` summed in one fixed order per row (RMSNorm's variance), whatever the number of rows."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        block = min(triton.next_power_of_2(n), 4096)
        _row_mean_kernel[(x2.shape[0],)](x2, out, n, x2.stride(0), BLOCK=block, num_warps=4)
    out = out.to(x.dtype).reshape(x.shape[:-1])
    return out.unsqueeze(-1) if keepdim else out


@_unmoded
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama-style RMSNorm over the last dimension in one kernel, one program per row:
    ``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``, in the dtype torch would give."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0]:
        block = min(triton.next_power_of_2(n), 4096)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, n, x2.stride(0), out.stride(0), float(eps), BLOCK=block,
                                         num_warps=4)
    return out.reshape(x.shape)


_FUSABLE_NORMS: dict[type, bool] = {}  # norm class -> its forward is the Llama RMSNorm (checked once)


def _fusable_norm(module: Any) -> bool:
    """Whether ``module`` is an RMSNorm that ``rms_norm`` computes: the right attributes, and on a test input
    the same values as its class's own forward (Gemma's ``1 + weight``, say, is left alone)."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if (not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.ndim != 1
            or not isinstance(eps, float) or "forward" in vars(module)):
        return False
    cls = type(module)
    if cls not in _FUSABLE_NORMS:
        x = torch.randn(4, weight.shape[0], generator=torch.Generator(device=weight.device).manual_seed(0),
                        device=weight.device).to(weight.dtype)
        try:
            with torch.no_grad():
                ref = cls.forward(module, x)
        except Exception:  # a norm whose forward wants more than a hidden-states tensor
            ref = None
        got = rms_norm(x, weight, eps)
        _FUSABLE_NORMS[cls] = (isinstance(ref, torch.Tensor) and ref.shape == got.shape and ref.dtype == got.dtype
                               and torch.allclose(ref.float(), got.float(), rtol=1e-2, atol=1e-3))
    return _FUSABLE_NORMS[cls]


def _fusable_norms(model: Any) -> list[Any]:
    """The norm modules of ``model`` that ``rms_norm`` computes (``_fusable_norm``)."""
    return [m for m in model.modules() if _fusable_norm(m)]


@contextlib.contextmanager
def _fused_norms(model: Any, norms: Sequence[Any] | None = None) -> Iterator[None]:
    """Every fusable RMSNorm of ``model`` (or ``norms``, found so before) runs ``rms_norm`` while the context
    lasts."""
    norms = _fusable_norms(model) if norms is None else norms
    for m in norms:
        m.forward = lambda x, m=m: rms_norm(x, m.weight, m.variance_epsilon)
    try:
        yield
    finally:
        for m in norms:
            del m.forward


@_unmoded
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         other: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotary embedding of x [B, H, T, D] with cos/sin [B or 1, T, D] (``unsqueeze_dim=1``) in one
    kernel: ``x * cos + rotate_half(x) * sin``, rounded as torch's separate kernels round it; the result
    has x's strides. Given ``other`` (the keys of the queries ``x``: [B, H', T, D] of x's dtype), both in one
    launch: returns the pair."""
    B, H, T, D = x.shape
    y = x if other is None else other
    H1 = 0 if other is None else y.shape[1]
    out, out1 = torch.empty_like(x), torch.empty_like(y) if other is not None else None
    if out.numel():
        o1 = out if out1 is None else out1
        _rope_kernel[(T, B, triton.cdiv(H, ROPE_HEADS) + triton.cdiv(H1, ROPE_HEADS))](
            x, y, cos, sin, out, o1, H, H1, T, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1),
            y.stride(2), cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
            sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1), out.stride(0), out.stride(1), out.stride(2),
            o1.stride(0), o1.stride(1), o1.stride(2),
            HALF=D // 2, BH=ROPE_HEADS, BHALF=triton.next_power_of_2(D // 2), num_warps=4, enable_fp_fusion=False)
    return out if other is None else (out, out1)


def _rope_applies(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``rope`` computes these (in one launch): CUDA, one dtype, [B, H, T, D] with D even and contiguous
    (the head counts may differ), cos/sin [B or 1, T, D]."""
    return (q.is_cuda and q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3 and q.shape[-1] % 2 == 0
            and q.shape[0] == k.shape[0]
            and q.dtype == k.dtype == cos.dtype == sin.dtype and cos.shape == sin.shape
            and cos.shape[-1] == q.shape[-1] == k.shape[-1] and q.stride(-1) == k.stride(-1) == 1
            and cos.stride(-1) == sin.stride(-1) == 1
            and cos.shape[0] in (1, q.shape[0]) and cos.shape[1] == q.shape[2] == k.shape[2])


def _fused_apply(original: Callable) -> Callable:
    """``apply_rotary_pos_emb(q, k, cos, sin)`` through ``rope``; any other call goes to ``original``."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        plain = not args and set(kwargs) <= {"unsqueeze_dim"} and kwargs.get("unsqueeze_dim", 1) == 1
        if not plain or not _rope_applies(q, k, cos, sin):
            return original(q, k, cos, sin, *args, **kwargs)
        return rope(q, cos, sin, k)

    apply_rotary_pos_emb.pmaccel_original = original
    return apply_rotary_pos_emb


_FUSABLE_ROPE: dict[tuple[str, int, torch.dtype], bool] = {}  # (modeling module, head dim, dtype) -> same bits


def _rope_modules(model: Any, device: torch.device | None = None) -> list[Any]:
    """The modeling modules of ``model``'s attention layers whose ``apply_rotary_pos_emb`` ``rope`` reproduces,
    bit for bit, on a test input of the layers' head size and dtype (checked once per module; on ``device``
    for layers whose weights are on the meta device)."""
    found = {}
    for m in model.modules():
        module = sys.modules.get(type(m).__module__)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        head_dim = getattr(m, "head_dim", None)
        if not callable(fn) or not isinstance(head_dim, int) or hasattr(fn, "pmaccel_original"):
            continue
        weight = next(m.parameters(), None)
        if weight is None or not weight.is_floating_point():
            continue
        at = device if weight.is_meta and device is not None else weight.device
        if at.type != "cuda":
            continue
        key = (module.__name__, head_dim, weight.dtype)
        if key not in _FUSABLE_ROPE:
            # the layer's own head counts: the check compiles the kernel the forwards will run
            heads = [max(1, getattr(getattr(m, name, None), "out_features", 2 * head_dim) // head_dim)
                     for name in ("q_proj", "k_proj")]
            g = torch.Generator(device=at).manual_seed(0)
            q, k = (torch.randn(2, 5, h, head_dim, generator=g, device=at).to(weight.dtype).transpose(1, 2)
                    for h in heads)
            angle = 100 * torch.rand(2, 5, head_dim, generator=g, device=at)
            cos, sin = angle.cos().to(weight.dtype), angle.sin().to(weight.dtype)
            try:
                with torch.no_grad():
                    ref = fn(q, k, cos, sin)
                same = (_rope_applies(q, k, cos, sin) and isinstance(ref, tuple) and len(ref) == 2
                        and all(torch.equal(r, x) for r, x in zip(ref, rope(q, cos, sin, k))))
            except Exception:  # noqa: BLE001  (another signature or layout: that module keeps its own)
                same = False
            _FUSABLE_ROPE[key] = same
        if _FUSABLE_ROPE[key]:
            found[module.__name__] = module
    return list(found.values())


@contextlib.contextmanager
def _fused_rope(model: Any, modules: Sequence[Any] | None = None) -> Iterator[None]:
    """The attention layers of ``model`` apply RoPE through ``rope`` while the context lasts (their modeling
    module's ``apply_rotary_pos_emb``, or that of ``modules`` found so before, is swapped for it, then
    restored)."""
    modules = _rope_modules(model) if modules is None else modules
    originals = [m.apply_rotary_pos_emb for m in modules]
    for m, fn in zip(modules, originals):
        m.apply_rotary_pos_emb = _fused_apply(fn)
    try:
        yield
    finally:
        for m, fn in zip(modules, originals):
            m.apply_rotary_pos_emb = fn


@_unmoded
def slot_write(key: torch.Tensor, value: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               rows: torch.Tensor, slots: torch.Tensor) -> bool:
    """``keys[rows, :, slots] = key.transpose(1, 2)`` and the same for the values, in one launch: key and value
    [B, H, Q, D], the KV memories [R, H, S, D], rows and slots [B, Q] (integer tensors of any strides; where
    two tokens name one place, either may land). False, with nothing written, where the kernel does not apply
    (no Triton, other shapes or dtypes): the caller then indexes as usual."""
    if (triton is None or key.shape != value.shape or keys.shape != values.shape
            or key.dtype != keys.dtype or value.dtype != values.dtype or key.stride(-1) != 1 or value.stride(-1) != 1
            or keys.stride(-1) != 1 or values.stride(-1) != 1 or key.shape[1] != keys.shape[1]
            or key.shape[-1] != keys.shape[-1] or rows.shape != slots.shape or tuple(rows.shape) != key.shape[::2]):
        return False
    B, H, Q, D = key.shape
    if B * Q:
        _slot_write_kernel[(B * Q,)](
            key, value, keys, values, rows, slots, Q, H, key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2), rows.stride(0), rows.stride(1), slots.stride(0),
            slots.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1),
            values.stride(2), D=D, BH=triton.next_power_of_2(H), BD=triton.next_power_of_2(D), num_warps=4)
    return True


@_unmoded
def row_cumsum(x: torch.Tensor) -> torch.Tensor:
    """``x.cumsum(-1)`` of a float tensor, each row scanned in one fixed order whatever the number of rows."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.numel():
        _row_cumsum_kernel[(x2.shape[0],)](x2, out, n, x2.stride(0), out.stride(0), BLOCK=1024, num_warps=4)
    return out.reshape(x.shape)


def key_lists(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """allowed [B, Q, S] bool -> (keys [B, Q, S] int32: the slots query q may see, in slot order, first;
    count [B, Q] int32)."""
    B, Q, S = allowed.shape
    at = allowed.long().cumsum(-1) - 1  # where each allowed slot goes in its query's list
    keys = torch.zeros(B, Q, S + 1, dtype=torch.int32, device=allowed.device)
    slots = torch.arange(S, dtype=torch.int32, device=allowed.device).expand(B, Q, S)
    keys.scatter_(2, torch.where(allowed, at, S), slots)  # the slots not allowed all land in column S
    return keys[..., :S], allowed.sum(-1, dtype=torch.int32)


@_unmoded
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keys: torch.Tensor, count: torch.Tensor,
              scale: float, *, rows: torch.Tensor | None = None, split: bool | None = None,
              blocks: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Each query over its own key list. query [B, H, Q, D]; key/value [B', H_kv, S, D]; keys [B, Q, >=n]
    and count [B, Q] from ``key_lists`` -> [B, Q, H, D]. Row b's queries read K/V row ``rows[b]`` ([B]
    int64; default b itself): a decode step's lanes read their samples' rows of the KV memory in place.
    The G query heads that share a KV head are one program (no K/V copy per head).

    A list is summed in chunks of ``KEY_CHUNK`` keys, each chunk in blocks (``ATTENTION_BLOCKS``), the chunks then
    merged in order. Few queries over long lists (a decode step of one sample: a program per query and KV
    head leaves most multiprocessors idle) run each chunk in a program of its own and merge them in a second
    launch; otherwise one program runs a query's chunks one after the other. Both sum in the same order, so
    the choice (``split``; ``None``: by the grid and the list length) changes no bit. ``blocks``: (keys per
    block, keys per chunk, warps, stages) instead of the defaults (benchmarks compare them; other bits).
    """
    B, H, Q, D = query.shape
    h_kv = key.shape[1]
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = torch.empty(B, Q, H, D, dtype=query.dtype, device=query.device)
    G = H // h_kv
    if not (B and Q):
        return out
    if rows is None:
        rows = torch.arange(B, device=query.device)
    bs, chunk, warps, stages = blocks or ATTENTION_BLOCKS[min(4, max(2, query.element_size()))]
    chunks = triton.cdiv(keys.shape[-1], chunk)
    if split is None:
        split = chunks > 1 and B * Q * h_kv < _multiprocessors(query.device)
    BG, BD = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(D))
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    qkv_strides = (query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
                   value.stride(0), value.stride(1), value.stride(2))
    if not split:
        _attention_kernel[(Q, B, h_kv)](
            query, key, value, out, keys, count, rows, scale, B, Q, G, D, *qkv_strides,
            out.stride(0), out.stride(1), out.stride(2), keys.stride(0), keys.stride(1), count.stride(0),
            PRECISION=precision, BG=BG, BS=bs, BD=BD, CHUNK=chunk, num_warps=warps, num_stages=stages,
            enable_fp_fusion=False)
        return out
    part_m = torch.empty(B, Q, h_kv * chunks, BG, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(B, Q, h_kv * chunks, BG, BD, dtype=torch.float32, device=query.device)
    _attention_chunks_kernel[(Q, B, h_kv * chunks)](
        query, key, value, part_m, part_l, part_acc, keys, count, rows, scale, B, Q, G, D, *qkv_strides,
        keys.stride(0), keys.stride(1), count.stride(0), chunks,
        PRECISION=precision, BG=BG, BS=bs, BD=BD, CHUNK=chunk, num_warps=warps, num_stages=stages,
        enable_fp_fusion=False)
    _attention_merge_kernel[(Q, B, h_kv)](
        part_m, part_l, part_acc, out, count, B, Q, G, D, out.stride(0), out.stride(1), out.stride(2),
        count.stride(0), chunks, BG=BG, BD=BD, CHUNK=chunk, num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    return out


def invariant_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``attention`` for transformers' ``AttentionInterface``: mask [B, 1, Q, S] additive (0 = allowed);
    the key lists come with the forward's keyword arguments (``KEYS_KWARG``), else from the mask. With
    ``ROWS_KWARG`` (a decode step) key/value are the whole KV memory and batch row b reads its row rows[b]."""
    rows = kwargs.pop(ROWS_KWARG, None)
    if attention_mask is None or kwargs.get("softcap") is not None or not query.is_cuda:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        kwargs.pop(KEYS_KWARG, None)
        if rows is not None:
            key, value = key[rows], value[rows]
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, _, Q, D = query.shape
    lists = kwargs.get(KEYS_KWARG)
    if lists is None or tuple(lists[1].shape) != (B, Q):
        lists = key_lists(attention_mask[:, 0] == 0)
    return attention(query, key, value, *lists, D**-0.5 if scaling is None else scaling, rows=rows), None


AttentionInterface.register(INVARIANT_ATTENTION, invariant_attention)


LINEAR_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # sibling layers that read one input


def linear_groups(model: Any) -> dict[int, tuple[torch.nn.Linear, ...]]:
    """The sibling layers of ``model`` whose GEMMs ``linear_parts`` runs as one launch: an attention's q/k/v, an
    MLP's gate and up projections (``LINEAR_GROUPS``), where they are plain ``nn.Linear`` layers of one input
    size, dtype and device, with a bias each or none. Keyed by ``id`` of each layer's weight."""
    groups: dict[int, tuple[torch.nn.Linear, ...]] = {}
    for m in model.modules():
        for names in LINEAR_GROUPS:
            layers = tuple(getattr(m, name, None) for name in names)
            if not all(isinstance(layer, torch.nn.Linear) and type(layer).forward is torch.nn.Linear.forward
                       and "forward" not in vars(layer) for layer in layers):
                continue
            w = layers[0].weight
            if all(layer.weight.shape[1] == w.shape[1] and layer.weight.dtype == w.dtype
                   and layer.weight.device == w.device and (layer.bias is None) == (layers[0].bias is None)
                   for layer in layers):
                groups.update({id(layer.weight): layers for layer in layers})
    return groups


_ROUTED = frozenset({torch.sort, torch.Tensor.sort, torch.cumsum, torch.Tensor.cumsum, F.linear, torch.mean,
                     torch.Tensor.mean})  # what _InvariantOps looks at


class _InvariantOps(TorchFunctionMode):
    """Sends ``F.linear`` and last-dimension ``mean`` and ``cumsum`` on CUDA to the fixed-order kernels, and
    makes ``sort`` stable (top-p sorts the scores: equal scores must come out in one order).

    ``groups`` (``linear_groups``): the first of a group's layers to be called on an input runs the whole
    group's GEMM; its siblings' results wait for their own calls on that same input. ``into``
    (``output_into``): where the next call with a weight writes its result."""

    def __init__(self, groups: dict[int, tuple[torch.nn.Linear, ...]] | None = None):
        super().__init__()
        self.groups = groups or {}
        self.ready: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        self.into: dict[int, torch.Tensor] = {}

    def __enter__(self) -> _InvariantOps:
        _MODES.append(self)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        _MODES.remove(self)
        self.into.clear()
        super().__exit__(*exc)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ready = self.ready.pop(id(weight), None)
        if ready is not None and ready[0] is x and ready[1] is weight and ready[2] is bias:
            return ready[3]
        dest = self.into.pop(id(weight), None)
        if (dest is not None and dest.shape == (*x.shape[:-1], weight.shape[0]) and dest.dtype == x.dtype
                and dest.device == x.device and dest.is_contiguous()):
            return linear(x, weight, bias, out=dest)
        layers = self.groups.get(id(weight))
        i = next((i for i, layer in enumerate(layers or ()) if layer.weight is weight), None)
        if i is None or layers[i].bias is not bias:
            return linear(x, weight, bias)
        outs = linear_parts(x, [layer.weight for layer in layers], [layer.bias for layer in layers])
        for j, (layer, out) in enumerate(zip(layers, outs)):
            if j != i:
                self.ready[id(layer.weight)] = (x, layer.weight, layer.bias, out)
        return outs[i]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _ROUTED:  # most calls (views, shapes, elementwise ops): straight through
            return func(*args, **kwargs)
        if func in (torch.sort, torch.Tensor.sort) and args[0].is_cuda:
            return func(*args, **{**kwargs, "stable": True})
        if func in (torch.cumsum, torch.Tensor.cumsum) and args[0].is_cuda and args[0].is_floating_point():
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim in (-1, args[0].ndim - 1) and kwargs.get("dtype") is None and kwargs.get("out") is None:
                return row_cumsum(args[0])
        if func is F.linear and args[0].is_cuda:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return self.linear(args[0], args[1], bias)
        if func in (torch.mean, torch.Tensor.mean) and args[0].is_cuda and args[0].is_floating_point():
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            if dim in (-1, args[0].ndim - 1, (-1,), [-1]) and kwargs.get("dtype") is None:
                return row_mean(args[0], keepdim)
        return func(*args, **kwargs)


_MODES: list[_InvariantOps] = []  # the invariant modes entered and not yet left, innermost last


@contextlib.contextmanager
def output_into(weight: torch.Tensor, out: torch.Tensor) -> Iterator[None]:
    """Inside ``invariant_mode``: the next ``F.linear`` with ``weight`` whose result has ``out``'s shape and
    dtype (``out`` contiguous) writes it into ``out`` instead of a new tensor (a decode step's output layer
    then writes the state's logits, without a copy of them afterwards); anywhere else nothing changes.

    Args:
        weight: the layer's weight.
        out: where its result goes.

    Example:
        >>> with invariant_mode(model), output_into(model.lm_head.weight, logits):  # doctest: +SKIP
        ...     model(input_ids=ids).logits.data_ptr() == logits.data_ptr()
        True
    """
    ops = _MODES[-1] if _MODES else None
    if ops is None:
        yield
        return
    ops.into[id(weight)] = out
    try:
        yield
    finally:
        ops.into.pop(id(weight), None)


@dataclasses.dataclass(frozen=True)
class ModePlan:
    """What ``invariant_mode`` found in a model on entry: the GEMM groups, the fusable norms and the modeling
    modules whose RoPE is swapped (three walks over the model's modules, a few ms)."""

    groups: dict[int, tuple[torch.nn.Linear, ...]]
    norms: list[Any]
    rope_modules: list[Any]

    @classmethod
    def of(cls, model: Any) -> ModePlan:
        return cls(linear_groups(model), _fusable_norms(model), _rope_modules(model))


@contextlib.contextmanager
def invariant_mode(model: Any, enabled: bool | None = True, *,
                   plan: ModePlan | None = None) -> Iterator[ModePlan | None]:
    """Run ``model`` with the batch-invariant kernels (on CUDA; a no-op elsewhere or when not ``enabled``).

    Args:
        model: a transformers causal LM with sdpa or eager attention.
        enabled: ``False`` makes this a no-op, ``None`` uses the kernels where Triton is available
            (callers pass their ``deterministic`` setting).
        plan: what an earlier entry for this model yielded: entered again (a decode's many short entries)
            without looking through the model's modules again; the model must not have changed since.

    Yields:
        The ``ModePlan`` of this entry (``None`` where the mode is a no-op).

    Example:
        >>> with invariant_mode(model) as plan:  # doctest: +SKIP
        ...     logits = model(input_ids=ids, attention_mask=mask4d).logits
        >>> with invariant_mode(model, plan=plan):  # doctest: +SKIP
        ...     logits = model(input_ids=ids, attention_mask=mask4d).logits
    """
    if not resolve(enabled, next(model.parameters()).device):
        yield None
        return
    if triton is None:
        from pmaccel.errors import PMAccelError

        raise PMAccelError("--deterministic on CUDA needs Triton (it ships with the CUDA builds of torch); "
                           "install torch with CUDA support or drop --deterministic", field="deterministic")
    _wait_ahead(model)  # the checks below then find the kernels compiled
    plan = ModePlan.of(model) if plan is None else plan
    before = model.config._attn_implementation
    model.set_attn_implementation(INVARIANT_ATTENTION)
    try:
        with (_fused_norms(model, plan.norms), _fused_rope(model, plan.rope_modules),
              _InvariantOps(plan.groups)):
            yield plan
    finally:
        model.set_attn_implementation(before)


def is_invariant(model: Any) -> bool:
    """Whether ``model`` currently runs the invariant attention (``ModelCall`` then passes the key lists)."""
    cfg = text_config(model)
    return cfg._attn_implementation == INVARIANT_ATTENTION


# ----------------------------------------------------------------------------- compiling ahead

_AHEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its kernels' compiling (a future)
AHEAD_THREADS = 8  # most kernels compiled at once


def compile_ahead(model: Any, device: torch.device | None = None,
                  after: Callable[[], Any] | None = None) -> Future | None:
    """Start compiling the kernels ``model``'s invariant forwards launch, in background threads, and return.

    Triton compiles a kernel variant on its first launch, a few hundred ms each (or loads it from its
    cache), and the variants of a decode (the GEMM tilings with and without bias, the norms, RoPE,
    attention) would otherwise compile one after the other on the first steps. Here each variant is
    launched once on tiny inputs in its own thread while the caller goes on (tokenizing, say); the
    compilers run in parallel. ``invariant_mode(model)`` waits for them on entry, so no launch from the
    threads overlaps a forward or a graph capture. A variant missed here (other shapes or layouts) still
    compiles on its first launch, as without this.

    Args:
        model: a transformers causal LM on a CUDA device, or on the meta device (built from its config alone:
            each launch then gets zero weights of a layer's shape on ``device``; ``pmaccel.warmup``).
        device: the CUDA device to compile for; default: that of the model's weights.
        after: called first, in the background (waiting for another process that compiles the same
            variants: ``pmaccel.warmup.wait``).

    Returns:
        A future that is done when every launch is (its result: how many failed; a failure is only
        logged); ``None`` where the kernels do not run (not CUDA, no Triton) or when this model's are
        compiling or compiled already.

    Example:
        >>> compile_ahead(model)  # doctest: +SKIP
        >>> tokens = tokenize(rows)  # meanwhile the kernels compile
        >>> with invariant_mode(model): ...  # doctest: +SKIP
    """
    param = next(model.parameters(), None)
    device = device if device is not None else getattr(param, "device", None)
    if param is None or device is None or device.type != "cuda" or not available() or model in _AHEAD:
        return None
    threads = max(1, min(os.cpu_count() or 1, AHEAD_THREADS))
    pool = ThreadPoolExecutor(max_workers=threads + 1, thread_name_prefix="pmaccel-compile")  # + the one below
    future = pool.submit(_compile_all, model, device, pool, after)
    _AHEAD[model] = future
    return future


def _compile_all(model: Any, device: torch.device, pool: ThreadPoolExecutor,
                 after: Callable[[], Any] | None = None) -> int:
    """(In a thread of ``pool``.) Launch every variant, each in a thread of its own; the number that failed."""
    if after is not None:
        after()
    index = prepare_triton(device)
    with torch.cuda.device(device):
        # Triton makes a kernel's per-device table of compiled variants on its first launch: made here, once,
        # so that the first launches racing below all add to the same table
        for kernel in (_linear_kernel, _linear_parts_kernel, _rms_norm_kernel, _rope_kernel, _slot_write_kernel,
                       *ATTENTION_KERNELS):
            tables = getattr(kernel, "device_caches", None)
            if isinstance(tables, dict):
                tables[index]  # noqa: B018  (a defaultdict: the lookup makes it)
    futures = [pool.submit(_launch_on, device, task) for _, task in _ahead_tasks(model, device)]
    pool.shutdown(wait=False)  # its threads end with their last task
    failed = [f.exception() for f in futures if f.exception() is not None]
    for error in failed:
        logger.debug("compiling a kernel ahead failed: %r", error)
    return len(failed)


def prepare_triton(device: torch.device) -> int:
    """Settle what Triton computes once per process before its first compile or cache lookup: the key of its
    cache and its driver on ``device`` (the CUDA context too); the device's index, as Triton numbers it.

    Triton keys its cache of compiled kernels by a hash of its own files (half a gigabyte of library, 0.3-0.7
    s), computed on a process's first compile or cache lookup and cached without a lock: settled here once,
    before launches look their kernels up in parallel (each thread hashed them again), and read from pmaccel's
    cache while Triton's files are those it was computed from (a file per installation). On a machine's first
    process its driver builds a helper module (a C compiler's run).

    Args:
        device: a CUDA device.

    Example:
        >>> prepare_triton(torch.device("cuda"))  # doctest: +SKIP
        0
    """
    if (module := _triton_key_module()) is not None:
        try:
            root = os.path.dirname(os.path.abspath(triton.__file__))
            store = cache_root() / "triton_keys" / f"{hashlib.sha256(root.encode()).hexdigest()[:16]}.json"
            remember_triton_key(module, root, store)
        except Exception as e:  # noqa: BLE001  (an unexpected Triton layout: it computes its key as it would)
            logger.debug("remembering Triton's cache key failed: %r", e)
            module.triton_key()
    with torch.cuda.device(device):
        return triton.runtime.driver.active.get_current_device()


def _triton_key_module() -> Any | None:
    """The module of Triton's function for the hash of its own files (``triton_key``: the key of its kernel cache),
    wherever this version has it."""
    for module in (getattr(triton.runtime, "cache", None), getattr(triton.compiler, "compiler", None)):
        if callable(getattr(module, "triton_key", None)):
            return module
    return None


def remember_triton_key(module: Any, root: str | os.PathLike[str], store: str | os.PathLike[str]) -> str:
    """``module.triton_key()``, read from ``store`` while the files under ``root`` are unchanged since it was
    stored there, else computed and stored; ``module.triton_key`` then returns it without hashing.

    Triton hashes its sources and its half-gigabyte library in every process before its first kernel compile
    or cache lookup (0.3-0.7 s on the critical path of a short run). Triton's own worker processes are handed
    the parent's key the same way (their ``triton_key`` replaced by a function returning it). The stamp is
    every Python file and shared library under ``root`` (path, size, modification time) and the version: an
    upgrade or an edit of Triton computes the key afresh.

    Args:
        module: the module whose ``triton_key`` Triton's cache lookups call.
        root: Triton's package directory.
        store: the JSON file that keeps the key and its stamp (written atomically; unwritable: not kept).

    Example:
        >>> remember_triton_key(triton.runtime.cache, os.path.dirname(triton.__file__),  # doctest: +SKIP
        ...                     cache_root() / "triton_keys" / "mine.json")
    """
    compute = module.triton_key
    if getattr(compute, "pmaccel_remembered", False):
        return compute()
    stamp = _files_stamp(root)
    store = Path(store)
    try:
        stored = json.loads(store.read_text())
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, dict) and stored.get("stamp") == stamp and isinstance(stored.get("key"), str):
        key = stored["key"]
    else:
        key = compute()
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"stamp": stamp, "key": key}))
            os.replace(tmp, store)
        except OSError as e:
            logger.debug("could not keep Triton's cache key in %s: %r", store, e)

    def remembered() -> str:
        return key

    remembered.pmaccel_remembered = True
    remembered.pmaccel_original = compute
    module.triton_key = remembered
    return key


def _files_stamp(root: str | os.PathLike[str]) -> str:
    """A hash of the version and of every Python file and shared library under ``root``: path, size, mtime."""
    entries = [getattr(triton, "__version__", "") if triton is not None else ""]
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.endswith((".py", ".so")):
                st = os.stat(os.path.join(folder, name))
                entries.append(f"{os.path.relpath(os.path.join(folder, name), root)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _wait_ahead(model: Any) -> None:
    """Wait for ``compile_ahead(model)``'s launches, if it was called (a failure was logged there: the kernel
    then compiles, or reports its error, on its first real launch)."""
    future = _AHEAD.get(model)
    if future is not None and future.exception() is not None:
        logger.debug("compiling kernels ahead failed: %r", future.exception())


def _launch_on(device: torch.device, task: Callable[[], Any]) -> None:
    with torch.cuda.device(device), torch.inference_mode():
        task()
        torch.cuda.current_stream(device).synchronize()


def _ahead_tasks(model: Any, device: torch.device) -> list[tuple[tuple, Callable[[], Any]]]:
    """One launch per kernel variant the forwards of ``model`` will run, on inputs laid out as theirs are
    (Triton specializes a kernel on its tensors' dtypes and on which integer arguments are multiples of 16),
    each with the key of its variant. Weights on the meta device are launched as zeros of their shape."""
    tasks: list[tuple[tuple, Callable[[], Any]]] = []
    seen: set[tuple] = set()

    def once(key: tuple, task: Callable[[], Any]) -> None:
        if key not in seen:
            seen.add(key)
            tasks.append((key, task))

    zeros = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    here = lambda w: w.device == device or w.is_meta  # noqa: E731  (a weight launchable on device)
    real = lambda t: zeros(*t.shape, dtype=t.dtype) if t is not None and t.is_meta else t  # noqa: E731
    groups = linear_groups(model)
    for layers in {tuple(id(layer) for layer in g): g for g in groups.values()}.values():
        w0, b0 = layers[0].weight, layers[0].bias
        if not here(w0):
            continue
        Ns, K = [layer.weight.shape[0] for layer in layers], w0.shape[1]
        for tiling in gemm_tilings(w0.element_size(), sum(Ns), device):
            once(("parts", *(N % 16 == 0 for N in Ns), K % 16 == 0, b0 is None, w0.dtype, tiling,
                  k_block(K, tiling, w0.element_size(), device)),
                 lambda layers=layers, K=K, tiling=tiling: linear_parts(
                     zeros(1, K, dtype=layers[0].weight.dtype), [real(layer.weight) for layer in layers],
                     [real(layer.bias) for layer in layers], tiling=tiling))
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and here(m.weight) and id(m.weight) not in groups:
            w, b = m.weight, m.bias
            N, K = w.shape
            for tiling in gemm_tilings(w.element_size(), N, device):
                once(("linear", N % 16 == 0, K % 16 == 0, b is None, w.dtype, tiling,
                      k_block(K, tiling, w.element_size(), device)),
                     lambda w=w, b=b, K=K, tiling=tiling: linear(zeros(1, K, dtype=w.dtype), real(w), real(b),
                                                                 tiling=tiling))
        elif type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor):
            n = m.weight.shape[-1]
            once(("norm", type(m), n, m.weight.dtype), lambda m=m, n=n: _fusable_norm(m) and rms_norm(
                zeros(1, n, dtype=m.weight.dtype), m.weight, m.variance_epsilon))
        head_dim = getattr(m, "head_dim", None)
        q_proj, k_proj = getattr(m, "q_proj", None), getattr(m, "k_proj", None)
        if isinstance(head_dim, int) and isinstance(q_proj, torch.nn.Linear) and isinstance(k_proj, torch.nn.Linear):
            heads, kv_heads = q_proj.out_features // head_dim, k_proj.out_features // head_dim
            dtype = q_proj.weight.dtype
            once(("attention", heads, kv_heads, head_dim, dtype),
                 lambda h=heads, hk=kv_heads, d=head_dim, dt=dtype: _attention_on_zeros(h, hk, d, dt, device))
            once(("slots", kv_heads, head_dim, dtype), lambda hk=kv_heads, d=head_dim, dt=dtype: slot_write(
                zeros(1, hk, 1, d, dtype=dt), zeros(1, hk, 1, d, dtype=dt), zeros(1, hk, 2, d, dtype=dt),
                zeros(1, hk, 2, d, dtype=dt), zeros(1, 1, dtype=torch.long), zeros(1, 1, dtype=torch.long)))
    # RoPE's check launches the kernel with the layers' head counts
    tasks.append((("rope",), lambda: _rope_modules(model, device)))
    return tasks


def _attention_on_zeros(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
    """One query over a block of keys, the query a transposed [B, T, H, D] view as the layers make it; in one
    program, then split over chunks (the two kernels of a long list)."""
    q = torch.zeros(1, 1, heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
    k = torch.zeros(1, kv_heads, BLOCK_KEYS, head_dim, dtype=dtype, device=device)
    keys, count = key_lists(torch.ones(1, 1, BLOCK_KEYS, dtype=torch.bool, device=device))
    for split in (False, True):
        attention(q, k, k, keys, count, head_dim**-0.5, split=split)
