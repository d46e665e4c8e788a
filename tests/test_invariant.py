"""Batch-invariant decoding (``pmaccel.invariant``, ``--deterministic``).

Kernel tests run where Triton can run them: on a CUDA device, or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1`` with Triton installed); without either they are skipped. The end-to-end tests
are ``gpu``: bf16 on random weights (where argmax flips are most likely), files compared byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from pmaccel import invariant


def _kernel_device(dtype: torch.dtype = torch.float32) -> str:
    if invariant.triton is None:
        pytest.skip("needs Triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a CUDA device or TRITON_INTERPRET=1")
    if dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 is not the GPU's (it truncates where the GPU rounds, and its "
                    "dots run in fp32)")
    return "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_do_not_depend_on_the_other_rows(dtype):
    dev = _kernel_device(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 192, generator=g).to(dev, dtype)
    w = torch.randn(136, 192, generator=g).to(dev, dtype)
    b = torch.randn(136, generator=g).to(dev, dtype)
    full = invariant.linear(x, w, b)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    assert torch.allclose(full.float(), ref, rtol=2e-2, atol=2e-1 if dtype == torch.bfloat16 else 1e-3)
    for rows in ([0], [5, 6, 7], list(range(100, 229)), [299]):
        assert torch.equal(invariant.linear(x[rows], w, b), full[rows])  # bit for bit
    assert torch.equal(invariant.linear(x[:7].reshape(1, 7, 192), w, None)[0], invariant.linear(x[:7], w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_tiling_gives_the_same_bits(dtype, monkeypatch):
    """The tiling follows the grid (few multiprocessors here: every tiling in one test); a row's bits do not."""
    dev = _kernel_device(dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 160, generator=g).to(dev, dtype)
    w = torch.randn(136, 160, generator=g).to(dev, dtype)
    b = torch.randn(136, generator=g).to(dev, dtype)
    half = dtype != torch.float32  # 2-byte types: the deeper pipelines fit in shared memory
    narrow = invariant.DEEP_NARROW_TILE if half else invariant.NARROW_TILE
    # 128 x 128 tiles: 6 for 300 rows, 4 for 129; 64 x 64 tiles: 15 for 300 rows, 9 for 129, 3 for 3
    expect = {5: {300: invariant.WIDE_TILE, 129: invariant.HALF_WAVE_TILE if half else narrow, 3: narrow},
              11: {300: invariant.HALF_WAVE_TILE if half else narrow, 129: narrow, 3: invariant.SKINNY_TILE}}
    if invariant._tma_tiling(invariant.HALF_WAVE_TILE, x.element_size(), x.device):  # Hopper, 2 bytes: TMA tiles
        # 128 x 256 tiles: 3 for 300 rows (twice the one multiprocessor); else the 128 x 128 tile with four stages
        expect = {1: {300: invariant.TMA_WIDE_TILE, 3: narrow}, 5: {300: invariant.HALF_WAVE_TILE, 3: narrow},
                  11: {300: invariant.HALF_WAVE_TILE, 129: narrow, 3: invariant.SKINNY_TILE}}
    seen = set()
    full = None
    for sms, chosen in expect.items():
        monkeypatch.setattr(invariant, "_multiprocessors", lambda device, sms=sms: sms)
        assert {rows: invariant.gemm_tiling(rows, 136, x.element_size(), x.device) for rows in chosen} == chosen
        assert set(chosen.values()) <= set(invariant.gemm_tilings(x.element_size(), 136, x.device))
        seen |= set(chosen.values())
        got = invariant.linear(x, w, b)
        full = got if full is None else full
        assert torch.equal(got, full)  # the second grid's tilings give the first one's bits
        for rows in (list(range(100, 229)), [7, 8, 9], [299]):
            assert torch.equal(invariant.linear(x[rows], w, b), full[rows])
    every = set(invariant.gemm_tilings(x.element_size(), device=x.device))
    assert seen <= every
    for tiling in every - seen:  # the others there are (the wide plain tile on TMA devices): chosen by hand
        assert torch.equal(invariant.linear(x, w, b, tiling=tiling), full)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    assert torch.allclose(full.float(), ref, rtol=2e-2, atol=2e-1 if dtype == torch.bfloat16 else 1e-3)


def test_a_long_k_is_read_in_larger_blocks_on_narrow_tiles_where_shared_memory_holds_them(monkeypatch):
    """``k_block``: ``LONG_K_BLOCK`` with one stage less for K of ``LONG_K`` or more on a 64-row tile of a 2-byte
    type, where the device's shared memory holds the stages; ``BLOCK_K`` and the tiling's stages otherwise."""
    dev = torch.device("cuda", 0)
    long_k, plain = invariant.LONG_K, invariant.BLOCK_K
    monkeypatch.setattr(invariant, "_shared_memory", lambda device: 227 * 1024)  # an H100's or H200's
    for tiling in (invariant.DEEP_NARROW_TILE, invariant.SKINNY_TILE, invariant.NARROW_TILE):
        assert invariant.k_block(long_k, tiling, 2, dev) == (invariant.LONG_K_BLOCK, tiling[3] - 1)
        assert invariant.k_block(long_k - 1, tiling, 2, dev) == (plain, tiling[3])  # a short K
        assert invariant.k_block(long_k, tiling, 4, dev) == (plain, tiling[3])  # fp32: twice the shared memory
    for tiling in (invariant.WIDE_TILE, invariant.HALF_WAVE_TILE):  # 128-row tiles: slower so on H200
        assert invariant.k_block(4 * long_k, tiling, 2, dev) == (plain, tiling[3])
    deep = invariant.DEEP_NARROW_TILE  # 5 stages of 64 x 128 and 128 x 64 bf16 blocks: 160 KiB
    monkeypatch.setattr(invariant, "_shared_memory", lambda device: 112 * 1024)  # a card with less
    assert invariant.k_block(long_k, deep, 2, dev) == (plain, deep[3])
    assert invariant.k_block(long_k, invariant.SKINNY_TILE, 2, dev) == (invariant.LONG_K_BLOCK, 5)  # 100 KiB
    monkeypatch.setattr(invariant, "_shared_memory", lambda device: 0)  # unknown (Triton's interpreter)
    assert invariant.k_block(long_k, deep, 2, dev) == (plain, deep[3])


def test_a_long_k_block_gives_the_bits_of_the_short_one(monkeypatch):
    """bf16 on CUDA: the long K block gives ``BLOCK_K``'s bits at every narrow tiling, for a K that is a whole number
    of long blocks and one that is not, and a row's bits still do not depend on the other rows."""
    if not torch.cuda.is_available() or invariant.triton is None:
        pytest.skip("the MMA steps of a CUDA device")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(11)
    for K in (4864, 4160):
        x = torch.randn(300, K, generator=g).to(dev, torch.bfloat16)
        w = (torch.randn(200, K, generator=g) * K**-0.5).to(dev, torch.bfloat16)
        for tiling in (invariant.DEEP_NARROW_TILE, invariant.SKINNY_TILE):
            if invariant.k_block(K, tiling, 2, dev)[0] != invariant.LONG_K_BLOCK:
                continue  # this card's shared memory does not hold the long blocks' stages
            long = invariant.linear(x, w, tiling=tiling)
            assert torch.equal(invariant.linear(x[5:8], w, tiling=tiling), long[5:8])
            with monkeypatch.context() as m:
                m.setattr(invariant, "LONG_K", K + 1)
                assert invariant.k_block(K, tiling, 2, dev)[0] == invariant.BLOCK_K
                assert torch.equal(invariant.linear(x, w, tiling=tiling), long)


def test_tma_tiles_run_only_on_hopper_for_two_byte_types(monkeypatch):
    """The TMA kernel's conditions: a CUDA build's Hopper card (capability 9; not ROCm's numbers), 2-byte types,
    Triton's host descriptors; and a tiling of 128 rows whose stages and output tile fit in shared memory."""
    monkeypatch.setattr(invariant, "_HOPPER", {0: True})  # device 0 taken for a Hopper card
    monkeypatch.setattr(invariant, "TensorDescriptor", invariant.TensorDescriptor or object)
    monkeypatch.setattr(torch.version, "hip", None)
    dev = torch.device("cuda", 0)
    assert invariant._tma_device(2, dev) and not invariant._tma_device(4, dev)
    assert not invariant._tma_device(2, torch.device("cpu"))
    monkeypatch.setattr(invariant, "_shared_memory", lambda device: 227 * 1024)
    assert invariant._tma_tiling(invariant.TMA_WIDE_TILE, 2, dev) and invariant._tma_tiling(invariant.HALF_WAVE_TILE, 2, dev)
    assert not invariant._tma_tiling(invariant.DEEP_NARROW_TILE, 2, dev)  # 64-row tiles: the plain kernel
    monkeypatch.setattr(invariant, "_shared_memory", lambda device: 180 * 1024)
    assert not invariant._tma_tiling(invariant.TMA_WIDE_TILE, 2, dev)
    monkeypatch.setattr(torch.version, "hip", "6.4")  # ROCm: an MI300's capability is 9.4
    assert not invariant._tma_device(2, dev)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(invariant, "TensorDescriptor", None)  # a Triton without host descriptors
    assert not invariant._tma_device(2, dev)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_tma_kernel_gives_the_plain_kernels_bits(dtype, monkeypatch):
    """Hopper, 2-byte types: the 128-row tiles by TMA in persistent programs give the plain kernel's bits (widths and
    K not whole tiles, with and without biases, one to three weights, rows past a tile's end), a row's bits do not
    depend on the other rows, and tensors TMA cannot read (rows not 16-byte aligned) take the plain kernel."""
    if not torch.cuda.is_available() or invariant.triton is None:
        pytest.skip("TMA is a CUDA device's")
    dev = torch.device("cuda")
    if not invariant._tma_tiling(invariant.HALF_WAVE_TILE, 2, dev):
        pytest.skip("TMA tiles run on Hopper")
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1000, 200, generator=g).to(dev, dtype)
    ws = [(torch.randn(n, 200, generator=g) / 14).to(dev, dtype) for n in (136, 40, 264)]
    bs = [torch.randn(w.shape[0], generator=g).to(dev, dtype) for w in ws]
    launched = []
    original = invariant._linear_tma_kernel
    monkeypatch.setattr(invariant, "_linear_tma_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: launched.append(grid) or original[grid]})())
    for tiling in (invariant.HALF_WAVE_TILE, invariant.TMA_WIDE_TILE):
        for rows in (1000, 70, 1):
            for parts in (1, 2, 3):
                for biases in (bs[:parts], [None] * parts):
                    got = invariant.linear_parts(x[:rows], ws[:parts], biases, tiling=tiling)
                    with monkeypatch.context() as m:
                        m.setattr(invariant, "_tma_device", lambda itemsize, device: False)
                        plain = invariant.linear_parts(x[:rows], ws[:parts], biases, tiling=tiling)
                    assert all(torch.equal(a, b) for a, b in zip(got, plain))
                    for o, w, b in zip(got, ws, biases):  # and torch's GEMM in fp32, to bf16/fp16 precision
                        ref = torch.nn.functional.linear(x[:rows].float(), w.float(), None if b is None else b.float())
                        assert torch.allclose(o.float(), ref, rtol=2e-2, atol=1e-1)
        full = invariant.linear(x, ws[0], bs[0], tiling=tiling)
        assert torch.equal(invariant.linear(x[300:303], ws[0], bs[0], tiling=tiling), full[300:303])
    assert len(launched) == 2 * (3 * 3 * 2 + 2)  # every call above ran on TMA
    odd = torch.randn(10, 201, generator=g).to(dev, dtype)[:, 1:]  # rows of 402 bytes: not TMA's
    launched.clear()
    got = invariant.linear(odd, ws[0], tiling=invariant.HALF_WAVE_TILE)
    assert not launched and torch.equal(got, invariant.linear(odd.contiguous(), ws[0], tiling=invariant.HALF_WAVE_TILE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sibling_gemms_in_one_launch_give_each_layers_bits(dtype):
    """``linear_parts``: two or three weights of one input (widths that are not whole tiles), with and without
    biases, each output bit for bit ``linear``'s, at every tiling; its rows independent of the other rows."""
    dev = _kernel_device(dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(70, 96, generator=g).to(dev, dtype)
    ws = [torch.randn(n, 96, generator=g).to(dev, dtype) for n in (64, 40, 72)]
    bs = [torch.randn(w.shape[0], generator=g).to(dev, dtype) for w in ws]
    for parts in (2, 3):
        for biases in (bs[:parts], [None] * parts):
            ref = [invariant.linear(x, w, b) for w, b in zip(ws[:parts], biases)]
            for tiling in invariant.gemm_tilings(x.element_size(), device=x.device):
                got = invariant.linear_parts(x, ws[:parts], biases, tiling=tiling)
                assert [o.shape for o in got] == [r.shape for r in ref]
                assert all(o.is_contiguous() and torch.equal(o, r) for o, r in zip(got, ref))
            few = invariant.linear_parts(x[3:6].reshape(1, 3, 96), ws[:parts], biases)
            assert all(torch.equal(o[0], r[3:6]) for o, r in zip(few, ref))
    with pytest.raises(ValueError, match="every weight has a bias or none"):
        invariant.linear_parts(x, ws[:2], [bs[0], None])


def test_sibling_layers_are_computed_once_whichever_is_called_first(monkeypatch):
    """The dispatch of ``invariant_mode``'s F.linear: q/k/v and gate/up are groups, the others are not; the first
    call of a group on an input computes all of it, each sibling then gets its own result for that input
    (in any order); another input, another weight or a repeated call computes again."""
    model = _tiny_qwen2()
    groups = invariant.linear_groups(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert groups[id(attn.k_proj.weight)] == (attn.q_proj, attn.k_proj, attn.v_proj)
    assert groups[id(mlp.up_proj.weight)] == (mlp.gate_proj, mlp.up_proj)
    assert len(groups) == 5 * 2 and id(attn.o_proj.weight) not in groups and id(mlp.down_proj.weight) not in groups
    assert id(model.lm_head.weight) not in groups
    calls = []
    F = torch.nn.functional
    monkeypatch.setattr(invariant, "linear_parts", lambda x, ws, bs: calls.append(len(ws)) or [
        F.linear(x, w, b) for w, b in zip(ws, bs)])
    monkeypatch.setattr(invariant, "linear", lambda x, w, b: calls.append(1) or F.linear(x, w, b))
    ops = invariant._InvariantOps(groups)
    x, y = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        for layer in (attn.k_proj, attn.q_proj, attn.v_proj, mlp.up_proj, mlp.gate_proj, attn.o_proj):
            assert torch.equal(ops.linear(x, layer.weight, layer.bias), layer(x))
        assert calls == [3, 2, 1]
        assert torch.equal(ops.linear(x, attn.q_proj.weight, attn.q_proj.bias), attn.q_proj(x))  # again: computed
        assert torch.equal(ops.linear(y, attn.k_proj.weight, attn.k_proj.bias), attn.k_proj(y))  # another input
        assert torch.equal(ops.linear(x, attn.k_proj.weight, None), F.linear(x, attn.k_proj.weight))  # no bias
        assert calls == [3, 2, 1, 3, 3, 1]
    model.model.layers[1].mlp.up_proj = torch.nn.Linear(64, 136, bias=True)  # a bias where gate has none
    assert id(model.model.layers[1].mlp.gate_proj.weight) not in invariant.linear_groups(model)


def test_output_into_is_taken_by_the_next_call_of_its_weight_only(monkeypatch):
    """``output_into``: inside the mode, the next F.linear with the weight whose result fits (shape, dtype, a
    contiguous tensor) writes into the given tensor, once; a tensor that does not fit is left alone; outside the
    mode nothing changes."""
    F = torch.nn.functional
    written = []

    def fake_linear(x, w, b, out=None):  # the kernel's contract, on the CPU
        written.append(out)
        y = F.linear(x, w, b)
        return y if out is None else out.copy_(y)

    monkeypatch.setattr(invariant, "linear", fake_linear)
    head = torch.nn.Linear(8, 5, bias=False)
    x = torch.randn(2, 3, 8)
    dest = torch.full((2, 3, 5), float("nan"))
    with torch.no_grad():
        with invariant.output_into(head.weight, dest):  # no mode entered: nothing to take it
            assert not invariant._MODES
        ops = invariant._InvariantOps({})
        with ops:
            with invariant.output_into(head.weight, dest):
                got = ops.linear(x, head.weight, None)
                again = ops.linear(x, head.weight, None)  # one call only
            with invariant.output_into(head.weight, torch.empty(2, 3, 4)):  # another shape: a tensor of its own
                other = ops.linear(x, head.weight, None)
            with invariant.output_into(head.weight, torch.empty(2, 5, 3).transpose(1, 2)):  # not contiguous
                ops.linear(x, head.weight, None)
            with invariant.output_into(head.weight, dest.double()):  # another dtype
                ops.linear(x, head.weight, None)
            assert not ops.into
        assert not invariant._MODES
    assert got is dest and torch.equal(dest, head(x)) and torch.equal(again, dest) and again is not dest
    assert torch.equal(other, head(x)) and written[0] is dest and written[1:] == [None] * 4


def _cuda_qwen2_and_ids() -> tuple[torch.nn.Module, torch.Tensor]:
    """The tiny Qwen2 in bf16 on CUDA and a batch of ids for it (skips without CUDA kernels)."""
    if not torch.cuda.is_available() or invariant.triton is None:
        pytest.skip("runs the CUDA kernels")
    return _tiny_qwen2().to("cuda", torch.bfloat16), torch.randint(0, 100, (3, 11), device="cuda")


def test_the_output_layer_writes_the_given_tensor_with_the_same_bits():
    """On CUDA, a whole forward: the logits land in the tensor given (no copy), bit for bit those of a forward that
    makes its own; ``linear(out=...)`` refuses a tensor that does not fit."""
    model, ids = _cuda_qwen2_and_ids()
    with torch.no_grad(), invariant.invariant_mode(model):
        ref = model(input_ids=ids).logits
        into = torch.full_like(ref, float("nan"))
        with invariant.output_into(model.get_output_embeddings().weight, into):
            got = model(input_ids=ids).logits
    assert got.data_ptr() == into.data_ptr() and torch.equal(into, ref)
    x, w = torch.randn(4, 64, device="cuda"), torch.randn(10, 64, device="cuda")
    with pytest.raises(ValueError, match="out must be a contiguous"):
        invariant.linear(x, w, out=torch.empty(4, 9, device="cuda"))
    assert torch.equal(invariant.linear(x, w, out=torch.empty(4, 10, device="cuda")), invariant.linear(x, w))


def test_a_forward_runs_each_group_in_one_launch_with_the_same_bits(monkeypatch):
    """On CUDA, under ``invariant_mode``: the logits of a forward are those of the layer-by-layer GEMMs, bit for
    bit, with one ``linear_parts`` launch per q/k/v and per gate/up."""
    model, ids = _cuda_qwen2_and_ids()
    with torch.no_grad(), invariant.invariant_mode(model):
        grouped = model(input_ids=ids).logits
    parts = []
    original = invariant.linear_parts
    monkeypatch.setattr(invariant, "linear_parts", lambda *a, **k: parts.append(len(a[1])) or original(*a, **k))
    with torch.no_grad(), invariant.invariant_mode(model):
        assert torch.equal(model(input_ids=ids).logits, grouped)
    assert parts == [3, 2] * 2
    monkeypatch.setattr(invariant, "linear_groups", lambda model: {})
    with torch.no_grad(), invariant.invariant_mode(model):
        assert torch.equal(model(input_ids=ids).logits, grouped)
    assert parts == [3, 2] * 2


def test_kernel_wrappers_run_outside_the_mode_and_the_mode_passes_other_calls_straight_through():
    """The wrappers' own tensor calls (strides, shapes) do not go through ``_InvariantOps`` (a prefill is bound by
    its host time); calls the mode does not route reach torch unchanged."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    def reads(t):
        return t.stride(0), t.shape, t.reshape(-1).numel()

    t = torch.zeros(3, 4)
    with Count():
        direct = reads(t)
        assert len(seen) >= 3  # stride, shape, reshape, numel: each through the mode
        seen.clear()
        assert invariant._unmoded(reads)(t) == direct and not seen
    ops = invariant._InvariantOps({})
    with ops:
        assert torch.equal(torch.sort(torch.tensor([3.0, 1.0, 2.0])).values, torch.tensor([1.0, 2.0, 3.0]))
        assert (t + 1).sum().item() == 12


def test_slot_write_is_the_indexed_assignment():
    """``slot_write``: K and V of a decode step (rows x lanes, scratch slots) and of a prefill (broadcast rows and
    slots, transposed views as the layers make them) land where the indexed assignment puts them; other shapes
    are left to the caller."""
    dev = _kernel_device()
    g = torch.Generator().manual_seed(4)
    R, H, S, D = 5, 2, 12, 16
    for rows, slots, B, Q in (
        (torch.arange(3)[:, None].expand(3, 4), torch.tensor([[4, 5, 11, 11], [0, 1, 2, 3], [7, 11, 11, 11]]), 3, 4),
        (torch.tensor([4, 1])[:, None].expand(2, 6), torch.arange(6)[None, :].expand(2, 6), 2, 6),
    ):
        k, v = (torch.randn(B, Q, H * D, generator=g).view(B, Q, H, D).transpose(1, 2).to(dev) for _ in "kv")
        keys, values = torch.randn(R, H, S, D, generator=g).to(dev), torch.randn(R, H, S, D, generator=g).to(dev)
        ref_k, ref_v = keys.clone(), values.clone()
        rows, slots = rows.to(dev), slots.to(dev)
        ref_k[rows, :, slots] = k.transpose(1, 2)
        ref_v[rows, :, slots] = v.transpose(1, 2)
        assert invariant.slot_write(k, v, keys, values, rows, slots)
        scratch = slots == S - 1  # several lanes write there: any one may land
        keep = torch.ones(R, S, dtype=torch.bool, device=dev)
        keep[rows[scratch], slots[scratch]] = False
        assert torch.equal(keys.transpose(1, 2)[keep], ref_k.transpose(1, 2)[keep])
        assert torch.equal(values.transpose(1, 2)[keep], ref_v.transpose(1, 2)[keep])
    assert not invariant.slot_write(k, v[..., :8], keys, values, rows, slots)  # another value size


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("hopper", [False, True])
def test_the_tilings_compiled_ahead_are_those_any_row_count_chooses(itemsize, hopper, monkeypatch):
    """``gemm_tilings(itemsize, N, device)`` (what compile_ahead compiles) against every row count up to where
    the widest tile is chosen for good, for the 0.5B model's weight widths on an H200-sized grid; on a Hopper
    card (its TMA tiles for 2-byte types) and on one without."""
    monkeypatch.setattr(invariant, "_multiprocessors", lambda device: 132)
    monkeypatch.setattr(invariant, "_tma_device", lambda size, device: hopper and size == 2)
    monkeypatch.setattr(invariant, "_shared_memory", lambda device: 227 * 1024)  # an H100's or H200's
    dev = torch.device("cuda")  # only asked for what is patched above
    widest = invariant.widest_tiling(itemsize, dev)
    assert widest == (invariant.TMA_WIDE_TILE if hopper and itemsize == 2 else invariant.WIDE_TILE)
    top = 2 * 132 * 128 + 1 if widest == invariant.TMA_WIDE_TILE else 132 * 128 + 1  # N <= 256: chosen from here
    for N in (128, 896, 4864, 151936, 100):
        every = {invariant.gemm_tiling(M, N, itemsize, dev) for M in range(1, top + 1)}
        assert set(invariant.gemm_tilings(itemsize, N, dev)) == every
        assert invariant.gemm_tiling(top, N, itemsize, dev) == widest
        assert every <= set(invariant.gemm_tilings(itemsize, device=dev))
    assert invariant.gemm_tiling(8, 896, itemsize, dev) == invariant.SKINNY_TILE  # 14 narrow tiles: a few rows
    assert invariant.gemm_tiling(64, 151936, itemsize, dev)[0] == 64  # no 128-row tile for 64 rows
    if widest == invariant.TMA_WIDE_TILE:
        assert invariant.WIDE_TILE not in invariant.gemm_tilings(itemsize, 896, dev)  # 128 rows: four stages or 256
        assert invariant.gemm_tiling(2048, 9728, itemsize, dev) == invariant.TMA_WIDE_TILE  # 608 tiles of 128 x 256
        assert invariant.gemm_tiling(512, 9728, itemsize, dev) == invariant.HALF_WAVE_TILE  # 152 of them
        monkeypatch.setattr(invariant, "_shared_memory", lambda device: 180 * 1024)  # the 128 x 256 tile's do not fit
        assert invariant.widest_tiling(itemsize, dev) == invariant.HALF_WAVE_TILE
        assert invariant.gemm_tilings(itemsize, 896, dev)[-1] == invariant.HALF_WAVE_TILE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_transformers_rope_bit_for_bit(dtype):
    """One kernel against transformers' apply_rotary_pos_emb on the layout a layer gives it (a transposed
    view), with cos/sin as its rotary module makes them (several batch rows, or one broadcast)."""
    from transformers.models.qwen2 import modeling_qwen2

    dev = _kernel_device(dtype)
    g = torch.Generator().manual_seed(6)
    B, T, H, H_kv, D = 3, 7, 14, 2, 64
    q = torch.randn(B, T, H * D, generator=g).to(dev, dtype).view(B, T, H, D).transpose(1, 2)
    k = torch.randn(B, T, H_kv * D, generator=g).to(dev, dtype).view(B, T, H_kv, D).transpose(1, 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    for rows in (B, 1):
        freqs = torch.randint(0, 4000, (rows, T, 1), generator=g).float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1).to(dev)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        ref_q, ref_k = modeling_qwen2.apply_rotary_pos_emb(q, k, cos, sin)
        got_q, got_k = invariant.rope(q, cos, sin), invariant.rope(k, cos, sin)
        assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
        assert got_q.stride() == q.stride()
        pair_q, pair_k = invariant.rope(q, cos, sin, k)  # both in one launch
        assert torch.equal(pair_q, ref_q) and torch.equal(pair_k, ref_k) and pair_k.stride() == k.stride()


def test_rope_is_swapped_in_only_while_the_context_lasts():
    """transformers' function is replaced for a model's layers inside the context and restored after; the
    model computes the same bits either way; calls the kernel does not cover still reach the original."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2 import modeling_qwen2

    if not torch.cuda.is_available() or invariant.triton is None:
        pytest.skip("the swap is made for CUDA models")
    original = modeling_qwen2.apply_rotary_pos_emb
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 9), device="cuda")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with invariant._fused_rope(model):
            swapped = modeling_qwen2.apply_rotary_pos_emb
            assert swapped is not original and swapped.pmaccel_original is original
            got = model(input_ids=ids).logits
            q = torch.randn(2, 3, 5, 16, device="cuda", dtype=torch.bfloat16)
            cos = torch.randn(2, 5, 16, device="cuda", dtype=torch.bfloat16)
            a = swapped(q, q, cos, cos, unsqueeze_dim=1)
            b = swapped(q.transpose(1, 2), q.transpose(1, 2), cos, cos, unsqueeze_dim=2)  # not the kernel's
            assert torch.equal(a[0], original(q, q, cos, cos)[0])
            assert torch.equal(b[0], original(q.transpose(1, 2), q.transpose(1, 2), cos, cos, unsqueeze_dim=2)[0])
    assert modeling_qwen2.apply_rotary_pos_emb is original
    assert torch.equal(got, ref)


def _tiny_qwen2(vocab_size: int = 100):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # GEMM shapes: q (64 x 64, bias), k/v (32 x 64, bias), o (64 x 64), gate/up (136 x 64), down (64 x 136),
    # head (vocab x 64); 136 and 100 are not multiples of 16 (Triton compiles those apart)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval()


def test_compile_ahead_launches_each_kernel_variant_once(monkeypatch):
    """One launch per variant a forward runs: per GEMM (by bias and which of its sizes are multiples of 16) each
    tiling, the norm, the attention and the RoPE check; each launch runs."""
    dev = _kernel_device()
    monkeypatch.setattr(invariant, "_multiprocessors", lambda device: 1)  # as Triton's interpreter has it
    model = _tiny_qwen2().to(dev)
    tasks = invariant._ahead_tasks(model, next(model.parameters()).device)
    # GEMM variants: q/k/v in one launch (16 | N, 16 | K, bias), gate/up in one (16 ∤ N, no bias), o (16 | N, no
    # bias), head (16 ∤ N), down (16 ∤ K); each the tilings chosen for its N (for a group: the sum of its N) (with
    # one multiprocessor: the wide and the narrow tiling)
    assert all(invariant.gemm_tilings(4, n, model.device) == [invariant.NARROW_TILE, invariant.WIDE_TILE]
               for n in (128, 272, 64, 100))
    assert len(tasks) == 5 * 2 + 1 + 1 + 1 + 1  # + the KV write
    with torch.inference_mode():
        for _, task in tasks:
            task()


def test_a_model_built_on_the_meta_device_has_the_kernel_variants_of_the_loaded_one(monkeypatch):
    """What ``pmaccel.warmup`` compiles from a model's config alone: the same variants, in the same order, as
    the model with its weights (zero weights of each layer's shape stand in for them)."""
    from transformers import Qwen2ForCausalLM

    monkeypatch.setattr(invariant, "_multiprocessors", lambda device: 1)
    loaded = _tiny_qwen2().to(torch.bfloat16)
    with torch.device("meta"):
        skeleton = Qwen2ForCausalLM(loaded.config).to(torch.bfloat16)
    assert next(skeleton.parameters()).is_meta
    dev = next(loaded.parameters()).device
    keys = [key for key, _ in invariant._ahead_tasks(loaded, dev)]
    assert keys == [key for key, _ in invariant._ahead_tasks(skeleton, dev)]
    assert len(keys) == len(set(keys)) == 5 * 2 + 1 + 1 + 1 + 1
    assert {key[0] for key in keys} == {"parts", "linear", "norm", "attention", "slots", "rope"}


def test_compile_ahead_leaves_nothing_to_compile_for_a_decode(monkeypatch, tmp_path):
    """After compile_ahead, a whole decode (prefill, graph captures, steps) launches only compiled variants
    (fp16: no other test compiles for it, so every variant is new here), the down projection's (K = 136) with
    the long K block on its narrow tilings."""
    from pmaccel import generate

    if not torch.cuda.is_available() or invariant.triton is None:
        pytest.skip("compiles CUDA kernels")
    monkeypatch.setattr(invariant, "LONG_K", 136)
    model = _tiny_qwen2(VOCAB).to("cuda", torch.float16)
    kernels = (invariant._linear_kernel, invariant._linear_parts_kernel, invariant._rms_norm_kernel,
               invariant._rope_kernel, invariant._slot_write_kernel, *invariant.ATTENTION_KERNELS)

    def compiled() -> int:  # each kernel's table of compiled variants per device (Triton's own)
        return sum(len(tables[0]) for kernel in kernels for tables in kernel.device_caches.values())

    module = invariant._triton_key_module()  # where Triton's hash of its files (the key of its cache) lives
    assert module is not None
    original = getattr(module.triton_key, "pmaccel_original", module.triton_key)  # Triton's own (lru-cached)
    monkeypatch.setattr(module, "triton_key", original)  # as in a new process
    monkeypatch.setenv("PMACCEL_CACHE", str(tmp_path))
    original.cache_clear()
    before = compiled()
    future = invariant.compile_ahead(model)
    assert future is not None and invariant.compile_ahead(model) is None  # started once per model
    assert future.result() == 0 and compiled() > before
    assert original.cache_info().misses == 1  # hashed once, not by each compiling thread at the same time
    assert module.triton_key() == original()  # and kept: the next process reads it from the cache
    assert len(list((tmp_path / "triton_keys").glob("*.json"))) == 1
    ahead = compiled()
    results = generate(model, _word_tokenizer(), _rows(12), max_new_tokens=6)
    assert len(results) == 12 and compiled() == ahead


def test_the_engine_looks_through_the_model_once_per_run(monkeypatch):
    """A decode enters the invariant mode at every harvest; only the first entry looks through the model's modules
    (the others reuse its ``ModePlan``), and the tokens are those of fresh entries."""
    import threading

    from pmaccel import generate
    from pmaccel.engine import Engine, EngineConfig

    if not torch.cuda.is_available() or invariant.triton is None:
        pytest.skip("the mode runs on CUDA")
    model = _tiny_qwen2(VOCAB).to("cuda", torch.bfloat16)
    engine = Engine(model, EngineConfig(max_rows=2, sync_every=2))  # starts compile_ahead(model)
    invariant._AHEAD[model].result()  # its own look at the model, in threads, done before counting
    fresh = []
    for i in range(12):  # each sample in a run of its own: a fresh plan each
        fresh += generate(model, _word_tokenizer(), _rows(12)[i:i + 1], indices=[i], max_new_tokens=6, engine=engine)
    walks, entries = [], []
    original, enter = invariant.linear_groups, invariant._InvariantOps.__enter__
    monkeypatch.setattr(invariant, "linear_groups", lambda m: walks.append(threading.current_thread()) or original(m))
    monkeypatch.setattr(invariant._InvariantOps, "__enter__", lambda self: entries.append(1) or enter(self))
    got = generate(model, _word_tokenizer(), _rows(12), max_new_tokens=6, engine=engine)
    assert len(walks) == 1 and len(entries) > 3
    assert [r["output_ids"] for r in got] == [r["output_ids"] for r in fresh]


def test_triton_key_is_read_back_while_its_files_are_unchanged(tmp_path):
    """Triton's cache key: computed and stored on the first run, read back on the next (nothing hashed), computed
    again once a file it covers changes or the stored copy is unreadable."""
    import types

    root = tmp_path / "triton"
    (root / "_C").mkdir(parents=True)
    (root / "_C" / "libtriton.so").write_bytes(b"\0" * 100)
    (root / "compiler.py").write_text("x = 1\n")
    store = tmp_path / "cache" / "triton_key.json"
    calls = []

    def fresh() -> types.SimpleNamespace:  # a new process's Triton: its own key function
        return types.SimpleNamespace(triton_key=lambda: calls.append(1) or f"key{len(calls)}")

    first = fresh()
    assert invariant.remember_triton_key(first, root, store) == "key1" and len(calls) == 1
    assert first.triton_key() == "key1" and len(calls) == 1  # replaced: no more hashing in this process
    assert json.loads(store.read_text())["key"] == "key1"
    second = fresh()
    assert invariant.remember_triton_key(second, root, store) == "key1" and len(calls) == 1  # read back
    assert second.triton_key() == "key1"
    os.utime(root / "_C" / "libtriton.so", ns=(1, 1))  # another library (an upgrade): computed again
    assert invariant.remember_triton_key(fresh(), root, store) == "key2" and len(calls) == 2
    (root / "language.py").write_text("y = 2\n")  # a new source file
    assert invariant.remember_triton_key(fresh(), root, store) == "key3"
    store.write_text("{not json")
    assert invariant.remember_triton_key(fresh(), root, store) == "key4"
    assert invariant.remember_triton_key(fresh(), root, store) == "key4" and len(calls) == 4
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert invariant.remember_triton_key(fresh(), root, blocked / "triton_key.json") == "key5"  # not kept: no error


def test_row_mean_is_the_mean_and_per_row():
    dev = _kernel_device()
    x = torch.randn(9, 5000, generator=torch.Generator().manual_seed(1)).to(dev)
    got = invariant.row_mean(x, keepdim=True)
    assert got.shape == (9, 1) and torch.allclose(got, x.mean(-1, keepdim=True), atol=1e-6)
    assert torch.equal(invariant.row_mean(x[3:4]), got[3:4, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_llama_norm_in_one_kernel_and_per_row(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    dev = _kernel_device(dtype)
    g = torch.Generator().manual_seed(2)
    norm = LlamaRMSNorm(300, eps=1e-5).to(dev, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(300, generator=g) + 0.5)
        x = (3 * torch.randn(2, 5, 300, generator=g)).to(dev, dtype)
        ref = norm(x)
    got = invariant.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.allclose(got.float(), ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    assert torch.equal(invariant.rms_norm(x[1, 2:3], norm.weight, 1e-5), got[1, 2:3])  # bit for bit alone


def test_only_llama_style_norms_are_fused_and_only_while_the_context_lasts():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    dev = _kernel_device()
    model = torch.nn.Sequential(LlamaRMSNorm(64), Gemma2RMSNorm(64)).to(dev)  # Gemma's is x * (1 + weight)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4)).to(dev)
    with torch.no_grad():
        ref = model(x)
        with invariant._fused_norms(model):
            assert "forward" in vars(model[0]) and "forward" not in vars(model[1])
            got = model(x)
    assert not any("forward" in vars(m) for m in model)
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("split", [False, True])
def test_attention_depends_only_on_the_keys_a_query_sees(split):
    """The same query over the same ordered keys: alone in a compact KV memory, or in a batch whose
    memory has the keys at other slots, with gaps and more slots -> the same bits, whether each list's chunks
    run in one program or each in its own (``split``); close to sdpa."""
    dev = _kernel_device()
    g = torch.Generator().manual_seed(2)
    H, H_kv, D, n = 6, 2, 32, 2 * invariant.KEY_CHUNK + 150  # three chunks, the last one partly full
    q = torch.randn(1, H, 1, D, generator=g).to(dev)
    k = torch.randn(1, H_kv, n, D, generator=g).to(dev)
    v = torch.randn(1, H_kv, n, D, generator=g).to(dev)
    alone = invariant.attention(q, k, v, *invariant.key_lists(torch.ones(1, 1, n, dtype=torch.bool, device=dev)),
                                D**-0.5, split=not split)
    S = 1500
    slots = torch.sort(torch.randperm(S, generator=g)[:n]).values.to(dev)  # the same keys, in order, with gaps
    big_k = torch.randn(3, H_kv, S, D, generator=g).to(dev)
    big_v = torch.randn(3, H_kv, S, D, generator=g).to(dev)
    big_k[1][:, slots], big_v[1][:, slots] = k[0], v[0]
    seen = torch.rand(3, 4, S, generator=g).to(dev) < 0.5
    seen[1, 2] = False
    seen[1, 2, slots] = True
    seen[2, 1] = False  # a query that sees nothing: zeros
    big_q = torch.randn(3, H, 4, D, generator=g).to(dev)
    big_q[1, :, 2] = q[0, :, 0]
    got = invariant.attention(big_q, big_k, big_v, *invariant.key_lists(seen), D**-0.5, split=split)  # [3, 4, H, D]
    assert torch.equal(got[1, 2], alone[0, 0])
    assert not got[2, 1].any()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // H_kv, 1), v.repeat_interleave(H // H_kv, 1))
    assert torch.allclose(alone[0, 0], ref[0, :, 0], atol=1e-5)
    ref = torch.nn.functional.scaled_dot_product_attention(  # every query of the batch
        big_q, big_k.repeat_interleave(H // H_kv, 1), big_v.repeat_interleave(H // H_kv, 1),
        attn_mask=seen[:, None])
    assert torch.allclose(got[seen.any(-1)], ref.transpose(1, 2)[seen.any(-1)], atol=1e-5)


@pytest.mark.parametrize("split", [False, True])
def test_attention_reads_the_given_kv_rows_in_place(split):
    """Batch row b over KV row rows[b] of a larger memory (a decode step's lanes, several on one row): the
    same bits as over a copy of those rows."""
    dev = _kernel_device()
    g = torch.Generator().manual_seed(3)
    H, H_kv, D, S = 4, 2, 16, invariant.KEY_CHUNK + 40  # two chunks
    k = torch.randn(5, H_kv, S, D, generator=g).to(dev)
    v = torch.randn(5, H_kv, S, D, generator=g).to(dev)
    rows = torch.tensor([3, 0, 3, 4, 1, 3], device=dev)
    q = torch.randn(len(rows), H, 1, D, generator=g).to(dev)
    seen = torch.rand(len(rows), 1, S, generator=g).to(dev) < 0.7
    lists = invariant.key_lists(seen)
    got = invariant.attention(q, k, v, *lists, D**-0.5, rows=rows, split=split)
    copied = invariant.attention(q, k[rows], v[rows], *lists, D**-0.5, split=split)
    assert torch.equal(got, copied)


def test_the_attention_that_falls_back_reads_the_given_kv_rows_too():
    """Where the invariant kernel does not run (here: CPU tensors; also soft-capped attention), the layer's
    attention with a decode step's KV rows reads a copy of those rows: the result of sdpa over them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(4)
    H, H_kv, D, S = 4, 2, 8, 12
    k, v = torch.randn(5, H_kv, S, D, generator=g), torch.randn(5, H_kv, S, D, generator=g)
    rows = torch.tensor([3, 0, 3])
    q = torch.randn(3, H, 1, D, generator=g)
    mask = torch.where(torch.rand(3, 1, 1, S, generator=g) < 0.7, 0.0, torch.finfo(torch.float32).min)
    module = types.SimpleNamespace(is_causal=False, num_key_value_groups=H // H_kv)
    got, _ = invariant.invariant_attention(module, q, k, v, mask, **{invariant.ROWS_KWARG: rows})
    ref, _ = sdpa_attention_forward(module, q, k[rows], v[rows], mask)
    assert torch.equal(got, ref)


def test_key_lists_compact_the_mask_in_slot_order():
    seen = torch.tensor([[[True, False, True, True], [False, False, False, True]]])
    keys, count = invariant.key_lists(seen)
    assert count.tolist() == [[3, 1]]
    assert keys[0, 0, :3].tolist() == [0, 2, 3] and keys[0, 1, :1].tolist() == [3]


def test_deterministic_is_a_setting_of_every_entry_point(tmp_path):
    """The flag reaches the engine, and the summary says so; the CPU's claims (there the kernels are not needed)."""
    from helpers_infer import save_tiny_model

    import pmaccel
    from pmaccel.decode import engine_config

    assert engine_config(None, deterministic=True).deterministic
    assert engine_config(4, False, True).max_lanes == 4 and engine_config(4, False, True).deterministic
    model = save_tiny_model(tmp_path / "m")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"main": "once upon a time", "branches": ["a cat", "the dog"]}) + "\n")
    run = lambda out, **kw: pmaccel.infer(base_model=str(model), data_path=str(rows),  # noqa: E731
                                          out_path=str(tmp_path / out), max_new_tokens=4, device="cpu", **kw)
    plain, det, bf16 = run("a.jsonl"), run("b.jsonl", deterministic=True), run("c.jsonl", dtype="bf16")
    # fp32 on the CPU is batch-invariant as it is (tests/test_engine.py); bf16 on the CPU is not claimed
    assert plain.summary.deterministic and det.summary.deterministic and not bf16.summary.deterministic
    assert "deterministic" in str(det.summary)
    assert json.loads((tmp_path / "b.jsonl.summary.json").read_text())["deterministic"] is True
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    # scores on the CPU are not claimed: their last bits follow the batch's shape even in fp32
    scores = pmaccel.score(base_model=str(model), data_path=str(rows), out_path=str(tmp_path / "s.jsonl"),
                           device="cpu")
    assert not scores.summary.deterministic


# ----------------------------------------------------------------------------- bf16 on the GPU

VOCAB = 32000


def _word_tokenizer():
    """A word-level tokenizer whose words are the ids ("t17" is id 17): rows can carry ids or text."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)} | {"<pad>": 0, "</s>": 1, "<unk>": 3}
    del vocab["t0"], vocab["t1"], vocab["t3"]  # special tokens are matched inside words: not "t1" ("t17")
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _save_model(path: Path) -> Path:
    """Random weights of Qwen2.5-0.5B's layer shape in Qwen3 (its q/k norms too), 4 layers, bf16; stops on
    every id i % 97 == 5. (Not qwen2: transformers loads a qwen2 directory's tokenizer as Qwen2's BPE.)"""
    import transformers

    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=4,
                                   num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=None,
                                   eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=[i for i in range(VOCAB) if i % 97 == 5], pad_token_id=0, bos_token_id=None)
    model.save_pretrained(path)
    _word_tokenizer().save_pretrained(path)
    return path


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = lambda lo, hi: " ".join(f"t{rng.randrange(4, VOCAB)}" for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"id": i, "main": words(0, 60), "branches": [" " + words(2, 30) for _ in range(rng.randint(1, 6))]}
            for i in range(n)]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    model = _save_model(root / "model")
    rows = _rows(48)
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shuffled = root / "shuffled.jsonl"
    mixed = rows[:]
    random.Random(1).shuffle(mixed)
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    return root, model, data, shuffled


def _by_id(path: Path) -> list[str]:
    return sorted(path.read_text().splitlines(), key=lambda line: json.loads(line)["id"])


@pytest.mark.gpu
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_bf16_outputs_do_not_depend_on_the_batch(bf16_run, sampled):
    import pmaccel

    root, model, data, shuffled = bf16_run
    kw = dict(base_model=str(model), max_new_tokens=48, dtype="bf16", deterministic=True, patch_rope=True)
    if sampled:
        kw.update(temperature=0.8, top_p=0.9, seed=3)
    files = {}
    for batch in (1, 7, 64, 0):
        out = root / f"{'s' if sampled else 'g'}-b{batch}.jsonl"
        flag = {} if batch == 0 else {"deterministic": True}  # the automatic size with the default setting
        done = pmaccel.infer(data_path=str(data), out_path=str(out), batch_size=batch,
                             **{k: v for k, v in kw.items() if k != "deterministic"}, **flag)
        assert done.summary.deterministic
        files[batch] = out.read_bytes()
    assert files[1] == files[7] == files[64] == files[0]
    if not sampled:  # a shuffled file: every sample at another index (which keys a sampled draw, SPEC §5)
        out = root / "g-shuffled.jsonl"
        pmaccel.infer(data_path=str(shuffled), out_path=str(out), **kw)
        assert _by_id(out) == _by_id(root / "g-b0.jsonl")
    # the same samples (same indices) admitted in another order, with other companions
    loaded, tok = pmaccel.load_model(str(model), dtype="bf16", patch_rope=True)
    samples = [json.loads(line) for line in data.read_text().splitlines()]
    gen = dict(max_new_tokens=48, deterministic=True, temperature=0.8 if sampled else 0.0, top_p=0.9, seed=3)
    ref = pmaccel.generate(loaded, tok, samples, batch_size=5, **gen)
    order = list(range(len(samples)))
    random.Random(2).shuffle(order)
    got = pmaccel.generate(loaded, tok, [samples[i] for i in order], indices=order, batch_size=11, **gen)
    assert [r["output_ids"] for r in got] == [ref[i]["output_ids"] for i in order]
    # the same runs without --deterministic: how often the default kernels change a sample's tokens
    plain = {}
    for batch in (1, 64):
        out = root / f"{'s' if sampled else 'g'}-plain-b{batch}.jsonl"
        pmaccel.infer(data_path=str(data), out_path=str(out), batch_size=batch, **{**kw, "deterministic": False})
        plain[batch] = out.read_text().splitlines()
    same = sum(a == b for a, b in zip(plain[1], plain[64]))
    print(f"default kernels, batch 1 vs 64: {same}/{len(plain[1])} rows identical")


@pytest.mark.gpu
def test_bf16_compare_agrees_fully(bf16_run):
    """Isolated mask, 2D RoPE off: every branch decoded in its packed sample == decoded alone, in bf16."""
    import pmaccel

    root, model, data, _ = bf16_run
    for batch in (3, 0):
        records = pmaccel.infer(base_model=str(model), data_path=str(data), out_path=str(root / f"cmp{batch}.jsonl"),
                                max_new_tokens=48, dtype="bf16", deterministic=True, compare=True, mask="isolated",
                                batch_size=batch)
        assert records.summary.totals["compare"]["agreement"] == 1.0, records.summary.notes


@pytest.mark.gpu
def test_bf16_files_identical_at_any_process_count(bf16_run):
    root, model, data, _ = bf16_run
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip("needs 2 GPUs or more")
    for sampled in (False, True):
        files = []
        # accelerate's launcher, and pmaccel's own (--num_processes) from 2 processes on
        runs = [(p, launcher) for p in (1, 2, 4) if p <= gpus for launcher in ("accelerate", "pmaccel")[:1 + (p > 1)]]
        for procs, launcher in runs:
            out = root / f"procs{procs}-{launcher}-{sampled}.jsonl"
            if launcher == "accelerate":
                launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs),
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
                launch += ["--multi_gpu"] if procs > 1 else []
                launch += ["-m", "pmaccel"]
            else:
                launch = [sys.executable, "-m", "pmaccel", "--num_processes", str(procs)]
            cmd = launch + ["--base_model", str(model), "--data_path", str(data), "--out_path",
                            str(out), "--max_new_tokens", "48", "--dtype", "bf16", "--deterministic", "--patch_rope"]
            cmd += ["--temperature", "0.8", "--top_p", "0.9", "--seed", "3"] if sampled else []
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            files.append(out.read_bytes())
        assert all(f == files[0] for f in files), "outputs differ between process counts"


def test_row_cumsum_is_the_cumsum_and_per_row():
    dev = _kernel_device()
    x = torch.rand(5, 2500, generator=torch.Generator().manual_seed(3)).to(dev)
    got = invariant.row_cumsum(x)
    assert torch.allclose(got, x.cumsum(-1), rtol=1e-5)
    assert torch.equal(invariant.row_cumsum(x[2:3]), got[2:3])
    assert bool((got.diff(dim=-1) >= 0).all())  # a cdf stays a cdf across the chunk boundaries


@pytest.mark.gpu
def test_bf16_scores_do_not_depend_on_the_batch(bf16_run):
    """``pmaccel score``: every branch's log-likelihood is the same bits at any batch size."""
    import pmaccel

    root, model, data, _ = bf16_run
    scored = root / "scored.jsonl"  # a branch is scored after its main, so every row needs one
    scored.write_text("".join(line + "\n" for line in data.read_text().splitlines() if json.loads(line)["main"]))
    files = []
    for batch in (1, 7, 64):
        out = root / f"score-b{batch}.jsonl"
        done = pmaccel.score(base_model=str(model), data_path=str(scored), out_path=str(out), dtype="bf16",
                             patch_rope=True, batch_size=batch)
        assert done.summary.deterministic
        files.append(out.read_bytes())
    assert files[0] == files[1] == files[2]
