"""The fast decode path: pre-allocated KV slots, fixed-shape steps, the whole step as one CUDA graph.

Same contract as ``decode.decode_batch`` (the reference path) and, in float32, the same tokens;
organised for the GPU:

- a batch of B samples with at most K branches gets a slot cache of S positions per row
  (``S >= prompt + K * max_new_tokens``); every step writes K slots per row, one column per branch
  (a finished branch's column is padding, masked like any pad);
- the step (choose tokens -> bookkeeping -> positions and mask -> forward) reads and writes only
  static device buffers, so it runs without a host sync and is captured once per shape as a CUDA
  graph; the host only checks every few steps whether anything is still running;
- masks and positions are built on the device from per-slot metadata, as in the reference path.

Shapes are bucketed (B to a power of two up to the batch size, the rows past the samples being
padding; S to a multiple of 256) so a run captures a few graphs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pmaccel.forward import ModelCall
from pmaccel.layout import PackedSample, TokenMeta, collate, stack_positions
from pmaccel.sampling import draw, uniforms

SYNC_EVERY = 16  # steps between host checks for "all branches finished"
S_BUCKET = 256
MAX_GRAPHS = 2  # shapes kept per model (each holds a KV cache)
FOLD_MAX = 1024  # fold GQA groups into the query length up to this many query rows (decode steps)
# Folded attention kernel: two GEMMs and a softmax ("matmul") beat torch's fused kernels ("sdpa") on
# small decode steps and lose on large ones (H200, Qwen2.5-0.5B shape: docs/PERFORMANCE.md).
FOLD_KERNEL = "auto"
MATMUL_ROWS = 2048  # "auto": matmul up to this many folded query rows (B * H_kv * G * Q)
# torch.compile the step before capturing it (fuses the model's elementwise work: 1.7-2.1x faster steps
# on H200 for ~30 s of compilation per shape). None = when the batch decodes at least COMPILE_MIN_STEPS.
COMPILE: bool | None = None
COMPILE_MIN_STEPS = 64
GROUPED_SDPA = "pmaccel_grouped_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA with a packed mask, without repeating the KV cache for every query head.

    transformers' sdpa path copies K/V once per query head when a mask is given (GQA with a mask
    falls back to the math kernel), i.e. the whole static cache every step. Here the G query heads
    that share a KV head are folded into the query length instead:
    query [B, H, Q, D] -> [B, H_kv, G*Q, D]; mask [B, 1, Q, S] -> [B, 1, G*Q, S].
    """
    b, h, q_len, d = query.shape
    h_kv, s = key.shape[1], key.shape[2]
    g = h // h_kv
    if g == 1 or attention_mask is None or g * q_len > FOLD_MAX or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query.reshape(b, h_kv, g * q_len, d)
    mask = attention_mask[:, :, None].expand(b, 1, g, q_len, s).reshape(b, 1, g * q_len, s)
    kernel = FOLD_KERNEL if FOLD_KERNEL != "auto" else "matmul" if b * h * q_len <= MATMUL_ROWS else "sdpa"
    if kernel == "sdpa":
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)  # [B, H_kv, G*Q, Dv]
    else:
        scale = d**-0.5 if scaling is None else scaling
        scores = torch.matmul(q, key.transpose(-1, -2)) * scale + mask  # [B, H_kv, G*Q, S]
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype), value)
    return out.reshape(b, h, q_len, -1).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)


@contextlib.contextmanager
def grouped_attention(model):
    """Run ``model`` with ``grouped_sdpa`` where it uses sdpa (the same attention, computed leaner)."""
    before = model.config._attn_implementation
    if before != "sdpa":
        yield
        return
    model.set_attn_implementation(GROUPED_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


class SlotCache:
    """A KV cache of fixed size for transformers' attention layers: each forward writes its keys and
    values at ``slots`` (one index per query column) and attends over all S slots (the mask decides).

    Duck-types the part of transformers' ``Cache`` that attention layers use (``update``).
    """

    def __init__(self, max_slots: int):
        self.max_slots = max_slots
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots: torch.Tensor | None = None  # [Q] long
        self.visible: int | None = None  # attend over the first `visible` slots only (the prefill)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states: [B, H_kv, Q, D]
        if layer_idx == len(self.keys):  # allocated on first use, in the eager prefill
            b, h, _, d = key_states.shape
            self.keys.append(key_states.new_zeros(b, h, self.max_slots, d))
            self.values.append(value_states.new_zeros(b, h, self.max_slots, value_states.shape[-1]))
        self.keys[layer_idx].index_copy_(2, self.slots, key_states)
        self.values[layer_idx].index_copy_(2, self.slots, value_states)
        if self.visible is not None:
            return self.keys[layer_idx][:, :, : self.visible], self.values[layer_idx][:, :, : self.visible]
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly

    def __len__(self) -> int:
        return len(self.keys)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class StepRunner:
    """Static buffers for one (B, K, S) shape and the captured decode step."""

    def __init__(self, model, B: int, K: int, S: int, opts, device: torch.device, compile: bool):
        self.call, self.opts, self.B, self.K, self.S = ModelCall.of(model, opts.mask), opts, B, K, S
        self.dtype = self.call.dtype
        V = model.get_output_embeddings().weight.shape[0]
        z = lambda *shape, dt=torch.long: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
        self.cache = SlotCache(S)
        # per key slot: [B, S]
        self.keys = TokenMeta(time=z(B, S), branch=z(B, S) - 1, is_main=z(B, S, dt=torch.bool),
                              valid=z(B, S, dt=torch.bool))
        # per (sample, branch column): [B, K]
        self.branch_id, self.bpos, self.last_time, self.ngen, self.finish = (z(B, K) for _ in range(5))
        self.active = z(B, K, dt=torch.bool)
        self.index = z(B, 1)  # global sample index (sampling key)
        self.n_real = z(B)  # real tokens so far per row (pos1d continues from here)
        self.out = z(B, K, opts.max_new_tokens)  # generated ids
        self.logits = torch.zeros(B, K, V, dtype=self.dtype, device=device)  # next-token logits
        self.slots = z(K)  # key slots of this step's K columns
        self.stop_ids = torch.tensor(sorted(opts.stop_ids), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._step = torch.compile(self.step, dynamic=False) if compile else self.step

    # ------------------------------------------------------------------ model call
    def _forward(self, ids, positions, query: TokenMeta, query_slot, keep=None, keys: TokenMeta | None = None):
        return self.call(ids, positions, query, self.keys if keys is None else keys, query_slot, self.cache, keep=keep)

    # ------------------------------------------------------------------ prefill (eager, any prompt length)
    def prefill(self, packs: list[PackedSample], indices: list[int], pad_id: int) -> None:
        dev = self.logits.device
        B, K = self.B, self.K
        batch = collate(packs, pad_id)
        n = batch.input_ids.shape[1]
        rows = len(packs)

        def rows_padded(t, value):  # [rows, n] -> [B, n] on the device
            out = torch.full((B, n), value, dtype=t.dtype, device=dev)
            out[:rows] = t.to(dev)
            return out

        meta = TokenMeta(rows_padded(batch.meta.time, 0), rows_padded(batch.meta.branch, -1),
                         rows_padded(batch.meta.is_main, False), rows_padded(batch.meta.valid, False))
        for t in (self.keys.time, self.keys.is_main, self.keys.valid):
            t.zero_()
        self.keys.branch.fill_(-1)
        for dst, src in zip(self.keys.astuple(), meta.astuple()):
            dst[:, :n] = src
        positions = stack_positions(rows_padded(batch.pos1d, 0), rows_padded(batch.bpos, 0), meta.time,
                                    self.opts.rope_2d)
        keep = sorted({i for p in packs for i in p.last_index})
        where = {c: j for j, c in enumerate(keep)}
        self.cache.slots, self.cache.visible = torch.arange(n, device=dev), n  # the prompt sees only itself
        logits = self._forward(rows_padded(batch.input_ids, pad_id), positions, meta,
                               self.cache.slots.expand(B, n), keep=torch.tensor(keep, device=dev), keys=meta)
        self.cache.visible = None

        # per-branch state
        r_idx, k_idx, col = [], [], []
        bid, bpos, ltime = (torch.zeros(B, K, dtype=torch.long) for _ in range(3))
        active = torch.zeros(B, K, dtype=torch.bool)
        for r, p in enumerate(packs):
            for k, (b, last, t) in enumerate(zip(p.branch_ids, p.last_index, p.last_time)):
                r_idx.append(r)
                k_idx.append(k)
                col.append(where[last])
                bid[r, k], bpos[r, k], ltime[r, k], active[r, k] = b, int(p.bpos[last]), t, True
        self.logits.zero_()
        self.logits[r_idx, k_idx] = logits[r_idx, col]
        for dst, src in ((self.branch_id, bid), (self.bpos, bpos), (self.last_time, ltime), (self.active, active)):
            dst.copy_(src)
        for t in (self.ngen, self.finish, self.out, self.index):
            t.zero_()
        self.index[:rows, 0] = torch.tensor(indices, device=dev)
        self.n_real.zero_()
        self.n_real[:rows] = torch.tensor([p.num_tokens for p in packs], device=dev)
        self.slots.copy_(n - K + torch.arange(K, device=dev))
        self.cache.slots = self.slots

    # ------------------------------------------------------------------ one step (capturable)
    def step(self) -> None:
        """Choose every running branch's token from ``self.logits``, then run the forward of the
        tokens that go on, leaving the next logits in ``self.logits``. Device work only."""
        B, K, opts = self.B, self.K, self.opts
        scores = self.logits.view(B * K, -1)
        if opts.processors:  # warpers only (the repetition penalty takes the reference path)
            scores = opts.processors(self.out.view(B * K, -1), scores.float())
        if opts.greedy:
            tok = scores.argmax(dim=-1)
        else:
            u = uniforms(opts.seed, self.index.expand(B, K).reshape(-1), self.branch_id.view(-1), self.ngen.view(-1))
            tok = draw(scores, u)
        tok = tok.view(B, K)

        # bookkeeping: stop ids end a branch (not recorded), max_new_tokens ends it after recording
        stop = torch.isin(tok, self.stop_ids) & self.active
        emit = self.active & ~stop
        at = self.ngen.clamp(max=opts.max_new_tokens - 1).unsqueeze(-1)  # [B, K, 1]
        self.out.scatter_(2, at, torch.where(emit.unsqueeze(-1), tok.unsqueeze(-1), self.out.gather(2, at)))
        self.ngen += emit
        full = emit & (self.ngen >= opts.max_new_tokens)
        self.finish.copy_(torch.where(stop, 1, torch.where(full, 2, self.finish)))
        self.active.copy_(emit & ~full)

        # the step's inputs: column k = branch k; branches that do not go on are padding
        going = self.active
        self.slots += K
        self.last_time += going
        order = going.long().cumsum(1)  # branch order among the going ones
        pos1d = self.n_real[:, None] + order - 1
        self.n_real += order[:, -1]
        query = TokenMeta(time=self.last_time.clone(), branch=torch.where(going, self.branch_id, -1),
                          is_main=torch.zeros_like(going), valid=going.clone())
        for dst, src in zip(self.keys.astuple(), query.astuple()):
            dst.index_copy_(1, self.slots, src)
        ids = torch.where(going, tok, 0)
        positions = stack_positions(pos1d, self.bpos, query.time, opts.rope_2d)
        self.logits.copy_(self._forward(ids, positions, query, self.slots.expand(B, K)))

    def capture(self) -> None:
        """Record ``step`` as a CUDA graph (after two eager warm-up steps on a side stream)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            try:
                self._step()  # compiles, when the step is compiled
            except Exception as e:  # a model torch.compile cannot take: keep the eager step (same results)
                if self._step is self.step:
                    raise
                warnings.warn(f"torch.compile failed on the decode step ({type(e).__name__}: {e}); "
                              "capturing the eager step instead", stacklevel=2)
                self._step = self.step
                self._step()
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def run(self) -> int:
        """Replay the step until every branch is done; returns the number of steps run."""
        for n in range(self.opts.max_new_tokens):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            if (n + 1) % SYNC_EVERY == 0 and not bool(self.active.any()):
                break
        return n + 1


class _Timer:
    """Device-side intervals (CUDA events; host clock on the CPU), read once at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = [self._now()]

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        import time

        return time.perf_counter()

    def mark(self) -> None:
        self.marks.append(self._now())

    def seconds(self) -> list[float]:
        pairs = zip(self.marks, self.marks[1:])
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in pairs]
        return [b - a for a, b in pairs]


def decode_batch_fast(
    model: Any,
    packs: list[PackedSample],
    indices: list[int],
    opts: Any,
    pad_id: int,
    max_batch: int,
    use_graph: bool | None = None,
) -> tuple[list[list[list[int]]], list[list[str]]]:
    """Decode a few packed samples on the fast path. Returns (output ids, finish reasons) per sample."""
    device = next(model.parameters()).device
    use_graph = device.type == "cuda" if use_graph is None else use_graph
    compile = COMPILE if COMPILE is not None else use_graph and opts.max_new_tokens >= COMPILE_MIN_STEPS
    B = max(min(_next_pow2(len(packs)), max_batch), len(packs))  # rows past the samples are padding
    K = max(len(p.branch_ids) for p in packs)
    n = max(p.num_tokens for p in packs)
    # every step takes K slots; two more steps' worth for the warm-up before a capture
    S = -(-(n + K * (opts.max_new_tokens + 2)) // S_BUCKET) * S_BUCKET
    runners: OrderedDict = model.__dict__.setdefault("_pmaccel_runners", OrderedDict())
    key = (B, K, S, opts, use_graph, compile)  # opts hashes by its settings (not the processor objects)
    with torch.inference_mode(), grouped_attention(model):
        runner = runners.pop(key, None)
        if runner is None:
            while len(runners) >= MAX_GRAPHS:
                runners.popitem(last=False)
            runner = StepRunner(model, B, K, S, opts, device, compile)
            if use_graph:
                runner.prefill(packs, indices, pad_id)
                runner.capture()
        runners[key] = runner
        timer = _Timer(device)
        runner.prefill(packs, indices, pad_id)
        timer.mark()
        steps = runner.run()
        timer.mark()
        out, ngen, finish = runner.out.cpu(), runner.ngen.cpu(), runner.finish.cpu()
    prefill_s, decode_s = timer.seconds()
    model.__dict__.setdefault("_pmaccel_stats", []).append(
        dict(prefill_s=prefill_s, decode_s=decode_s, steps=steps, rows=len(packs), B=B, K=K, S=S))
    ids, reasons = [], []
    for r, p in enumerate(packs):
        k_n = len(p.branch_ids)
        ids.append([out[r, k, : ngen[r, k]].tolist() for k in range(k_n)])
        reasons.append(["stop" if int(finish[r, k]) == 1 else "length" for k in range(k_n)])
    return ids, reasons
