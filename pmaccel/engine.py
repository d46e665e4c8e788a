"""The decode engine: continuous batching of branches over a fixed pool of rows and lanes.

    Engine      what the caller holds: its configuration, the runners it built, ``stats``, ``release()``
    Scheduler   (``Engine.run``) which pending samples enter which free rows and lanes, when the lanes of
                ended branches are freed, how many lanes the next steps run over; finished samples reach
                the caller, and the next pending samples are packed (``PackOnRead``), while the device runs
                the steps queued after them
    Runner      the device side: static buffers for R rows x S key slots (the KV memory, ``SlotCache``)
                and per-branch state, L lanes and their table, the step, one CUDA graph per lane bucket

A row holds one sample (its K/V and its branches' state), a lane one running branch. Every step emits
one token for every running branch (SPEC §5): ``choose_tokens`` -> ``record`` -> ``step_inputs`` -> the
model. When a branch ends its lane is freed (the running lanes move down over it); when a sample's last
branch ends its row is freed too (until then its other branches still read the ended branch's tokens),
and the next pending samples are prefilled into the free rows and lanes. The step's shapes depend on
the pool, never on the rows' contents, so a run captures at most one graph per lane bucket (L, L/2,
L/4, ...). Masks and positions are built on the device from per-slot metadata
(``pmaccel.layout.allowed``), so a sample's tokens do not depend on its companions or its lanes.

The same step runs eagerly on the CPU (no graph), so there is one decode path everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from pmaccel.forward import ModelCall
from pmaccel.invariant import ModePlan, compile_ahead, invariant_mode, is_invariant, resolve
from pmaccel.layout import PackedSample, PackOnRead, TokenMeta, collate, stack_positions
from pmaccel.model import text_config
from pmaccel.sampling import draw, uniforms
from pmaccel.slots import SlotCache, grouped_attention, kv_bytes_per_slot

FINISH_REASONS = {1: "stop", 2: "length"}
SLOT_ROUND = 64  # S is rounded up to a multiple of this
PREFILL_LANES = 1024  # most branches in one prefill forward (bounds its [E, V] logits)
# most prompt tokens in one prefill forward by default, on CUDA where the memory allows (a forward's launches cost
# the host the same whatever its tokens: on H200 the Qwen2.5-0.5B prefill took 8 forwards of 8192 tokens and half
# its time waiting on the host; docs/PERFORMANCE.md), and on the CPU
PREFILL_TOKENS = {"cuda": 32768, "cpu": 8192}


@dataclasses.dataclass
class EngineConfig:
    """How the engine sizes its pool and runs its step.

    Args:
        max_rows: most samples decoded at once (``None``: from the free memory and ``max_lanes``).
        max_lanes: most branches per step (``None``: 2048 on a GPU, 64 on the CPU).
        columns: lanes per batch row of a step (``None``: 1 where the attention reads the KV memory in place,
            the invariant kernels, so that a branch that ends frees its lane; else a sample's branch count).
        graphs: capture the step as CUDA graphs (``None``: on CUDA).
        sync_every: steps between host checks for ended branches (their lanes freed) and finished samples.
        prefill_tokens: most padded prompt tokens in one prefill forward (``None``: ``PREFILL_TOKENS``, on
            CUDA as many as half the free memory holds, ``prefill_bytes_per_token``).
        memory_fraction: share of the free device memory the pool (KV slots and logits) may take.
        deterministic: run the batch-invariant kernels on CUDA (``pmaccel.invariant``): a sample's
            tokens then do not depend on its companions, the pool size or the process count (``None``:
            where Triton is available; their cost is within a few per cent, docs/PERFORMANCE.md).
    """

    max_rows: int | None = None
    max_lanes: int | None = None
    columns: int | None = None
    graphs: bool | None = None
    sync_every: int = 8
    prefill_tokens: int | None = None
    memory_fraction: float = 0.6
    deterministic: bool | None = None


# ----------------------------------------------------------------------------- state on the device


@dataclasses.dataclass
class State:
    """Everything the step reads and writes about the samples; the leading dimension is the row (a sample's
    KV row), the second the branch's position k in its sample. Row R, the last, is never used: the lanes
    that run no branch point at it."""

    keys: TokenMeta  # per key slot [R+1, S]
    branch_id: torch.Tensor  # per branch [R+1, K]
    bpos: torch.Tensor  # [R+1, K]
    last_time: torch.Tensor  # [R+1, K] time of the branch's last token
    ngen: torch.Tensor  # [R+1, K] tokens emitted
    finish: torch.Tensor  # [R+1, K] 0 running, 1 stop, 2 length
    active: torch.Tensor  # [R+1, K] bool: the branch's next token is still to be chosen
    base: torch.Tensor  # [R+1, K] first slot of the branch's generated tokens
    hist_len: torch.Tensor  # [R+1, K] main + branch prompt length (where generated ids go in `history`)
    index: torch.Tensor  # [R+1] the sample's global index (-1: empty row); keys the sampling RNG
    n_real: torch.Tensor  # [R+1] real tokens so far (pos1d continues from here)
    out: torch.Tensor  # [R+1, K, G] generated ids
    history: torch.Tensor  # [R+1, K, W] main + prompt + generated ids (repetition penalty), else [R+1, K, 0]

    @classmethod
    def empty(cls, R: int, K: int, S: int, G: int, W: int, device) -> State:
        z = lambda *shape, dt=torch.long: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
        state = cls(
            keys=TokenMeta(time=z(R, S), branch=z(R, S), is_main=z(R, S, dt=torch.bool), valid=z(R, S, dt=torch.bool)),
            branch_id=z(R, K), bpos=z(R, K), last_time=z(R, K), ngen=z(R, K), finish=z(R, K),
            active=z(R, K, dt=torch.bool), base=z(R, K), hist_len=z(R, K), index=z(R), n_real=z(R),
            out=z(R, K, G), history=z(R, K, W),
        )
        state.keys.branch.fill_(-1)
        state.index.fill_(-1)
        return state

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys.astuple(), *(getattr(self, f.name) for f in dataclasses.fields(self)[1:])]


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[R, K, ...] -> [R*K, ...]: per-branch state addressed by row * K + k (a lane's branch)."""
    return t.view(t.shape[0] * t.shape[1], *t.shape[2:])


# ----------------------------------------------------------------------------- the step functions


def choose_tokens(opts: Any, logits: torch.Tensor, history: torch.Tensor, index: torch.Tensor,
                  branch: torch.Tensor, step: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """The next token of every lane. logits [E, V]; history [E, W]; index/branch/step/active [E] -> ids [E].

    Greedy, or one draw keyed by (seed, sample index, branch id, step) from transformers' filtered
    distribution (``pmaccel.sampling``). ``active`` marks the lanes whose token counts.
    """
    scores = logits
    if opts.processors:
        scores = opts.processors(history, scores.float())
    if opts.greedy:
        return scores.argmax(dim=-1)
    return draw(scores, uniforms(opts.seed, index, branch, step))


def record(s: State, f: torch.Tensor, tok: torch.Tensor, active: torch.Tensor, ngen: torch.Tensor,
           is_stop: torch.Tensor, max_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bookkeeping of the tokens ``tok`` [m] chosen for the branches ``f`` [m] (row * K + k; ``active`` and
    ``ngen`` their state): a stop id (``is_stop`` [V] bool) ends its branch (the reason, not an output); any
    other token is recorded, and ends its branch at ``max_new`` tokens. Returns (going on, tokens emitted)."""
    stop = is_stop[tok] & active  # a table lookup: no sort, no host sync, whatever the number of stop ids
    emit = active & ~stop
    out = _flat(s.out)
    at = ngen.clamp(max=max_new - 1)
    out[f, at] = torch.where(emit, tok, out[f, at])
    if s.history.shape[-1]:
        history = _flat(s.history)
        at = (_flat(s.hist_len)[f] + ngen).clamp(max=history.shape[-1] - 1)
        history[f, at] = torch.where(emit, tok, history[f, at])
    ngen = ngen + emit
    full = emit & (ngen >= max_new)
    finish = _flat(s.finish)
    finish[f] = torch.where(stop, 1, torch.where(full, 2, finish[f]))
    going = emit & ~full
    _flat(s.ngen)[f] = ngen
    _flat(s.active)[f] = going
    return going, ngen


def step_inputs(s: State, f: torch.Tensor, first: torch.Tensor, tok: torch.Tensor, going: torch.Tensor,
                ngen: torch.Tensor, scratch: int, rope_2d: bool):
    """The step's new tokens, one per lane (branch ``f`` [m]); lanes that do not go on are padding.

    A sample's lanes are consecutive and in branch order (``first`` [m]: the position of the lane's
    sample's first lane). Going lanes advance their time by one and continue pos1d from their row's
    real-token count, in branch order. Their keys' metadata is written at their slots. Returns input_ids
    [m], positions ([m, 3] or [m]), query meta [m] and slots [m].
    """
    rows = torch.div(f, s.active.shape[1], rounding_mode="floor")
    last_time = _flat(s.last_time)[f] + going
    _flat(s.last_time)[f] = last_time
    g = going.long()
    upto = g.cumsum(0)  # going lanes up to and including each lane
    order = upto - (upto - g)[first]  # rank among the sample's going lanes
    pos1d = s.n_real[rows] + order - 1
    s.n_real.index_add_(0, rows, g)
    slots = torch.where(going, _flat(s.base)[f] + ngen - 1, scratch)
    query = TokenMeta(time=last_time, branch=torch.where(going, _flat(s.branch_id)[f], -1),
                      is_main=torch.zeros_like(going), valid=going)
    for dst, src in zip(s.keys.astuple(), query.astuple()):
        dst[rows, slots] = src
    ids = torch.where(going, tok, 0)
    return ids, stack_positions(pos1d, _flat(s.bpos)[f], last_time, rope_2d), query, slots


class Runner:
    """Static buffers for R rows (samples: KV memory and per-branch state) and L lanes (branches running), and
    the step over the first n groups of C lanes (graphed per n).

    A lane runs one branch; the lane table (``lane``) says which, as row * K + k. Lanes come in groups of C
    that belong to one sample (``group_row``: its row), the batch rows of the step's forward: with C = 1
    every lane is a batch row of its own and the attention reads each lane's KV row in place; with C = K a
    sample's branches share one batch row, as in a packed sequence, and its row is its group's index
    (``in_order``: the rows move down with their groups, so that the attention reads the first n rows as
    they lie). Lanes that run nothing point at row R.
    """

    def __init__(self, model: Any, opts: Any, R: int, K: int, S: int, W: int, graphs: bool,
                 lanes: int | None = None, columns: int | None = None):
        self.call = ModelCall.of(model, opts.mask)
        self.opts, self.R, self.K, self.S = opts, R, K, S
        self.C = columns or K
        self.L = max(lanes or R * K, K) // self.C * self.C
        self.in_order = self.C == K  # one group per sample, in its row's place
        self.groups = R if self.in_order else self.L // self.C  # the most lane groups a step runs over
        device = next(model.parameters()).device
        V = model.get_output_embeddings().weight.shape[0]
        self.state = State.empty(R + 1, K, S, opts.max_new_tokens, W, device)
        self.logits = torch.zeros(self.L, V, dtype=self.call.dtype, device=device)  # per lane: the next token's
        self.lane = torch.full((self.L,), R * K, dtype=torch.long, device=device)  # the branch each lane runs
        self.first = torch.arange(self.L, device=device)  # the first lane of each lane's sample
        self.group_row = torch.full((self.L // self.C,), R, dtype=torch.long, device=device)
        self.cache = SlotCache(R + 1, S)
        self.is_stop = torch.zeros(V, dtype=torch.bool, device=device)
        self.is_stop[[i for i in opts.stop_ids if 0 <= i < V]] = True
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # groups -> the captured step
        self.pool = torch.cuda.graph_pool_handle() if graphs else None  # one memory pool for every graph
        self._staging: torch.Tensor | None = None  # pinned host buffer of ``upload`` (CUDA)
        self._staged = torch.cuda.Event() if device.type == "cuda" else None  # its last copy to the device

    # ------------------------------------------------------------------ the step (capturable)
    def step(self, n: int) -> None:
        """One decode step over lane groups 0..n-1: choose, record, feed back; leaves the next logits in
        ``logits``."""
        s, C, opts = self.state, self.C, self.opts
        m = n * C
        f = self.lane[:m]
        active, ngen = _flat(s.active)[f], _flat(s.ngen)[f]
        rows = torch.div(f, self.K, rounding_mode="floor")
        tok = choose_tokens(opts, self.logits[:m], _flat(s.history)[f], s.index[rows], _flat(s.branch_id)[f], ngen,
                            active)
        going, ngen = record(s, f, tok, active, ngen, self.is_stop, opts.max_new_tokens)
        ids, positions, query, slots = step_inputs(s, f, self.first[:m], tok, going, ngen, self.S - 1, opts.rope_2d)
        group_row = self.group_row[:n]
        # [n, S]: each batch row's sample's slots (rows 0..n-1 as they lie where rows follow their groups)
        keys = TokenMeta(*(t[:n] if self.in_order else t[group_row] for t in s.keys.astuple()))
        grid = lambda t: t.view(n, C, *t.shape[1:])  # noqa: E731  [m, ...] -> [n, C, ...]
        in_place = is_invariant(self.call.model)
        self.cache.decode(group_row, grid(slots), in_place=in_place, in_order=self.in_order)
        into = grid(self.logits[:m])
        logits = self.call(grid(ids), grid(positions), TokenMeta(*map(grid, query.astuple())), keys, grid(slots),
                           self.cache, into=into, kv_rows=group_row if in_place else None)
        if logits.data_ptr() != into.data_ptr():  # not written in place (not the invariant kernels)
            into.copy_(logits)

    def run_steps(self, n: int, count: int) -> None:
        graph = self.graphs.get(n)
        for _ in range(count):
            if graph is not None:
                graph.replay()
            else:
                self.step(n)

    def capture(self, buckets: Sequence[int]) -> None:
        """Record the step over each bucket of lane groups as a CUDA graph; the pool must be empty (a step then
        changes nothing that counts: no lane runs a branch, scratch slots only)."""
        assert not bool(self.state.active.any()), "capture needs an empty pool"
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for n in buckets:
                self.step(n)  # warm-up: lazy allocations, cuBLAS handles
        torch.cuda.current_stream().wait_stream(side)
        # torch.cuda.graph runs a full garbage collection before each capture; with the objects alive now
        # frozen (after one collection here) those see only what the captures themselves create
        frozen_before = gc.get_freeze_count()
        gc.collect()
        gc.freeze()
        try:
            for n in sorted(buckets, reverse=True):  # largest first: the others reuse its memory
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.step(n)
                self.graphs[n] = graph
        finally:
            if not frozen_before:  # unfreeze() thaws every frozen object: an earlier freeze (the CLI's) stays
                gc.unfreeze()

    # ------------------------------------------------------------------ the lane table
    def set_lanes(self, table: np.ndarray, moves: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Lay out the lanes: ``table`` [n] the branch (row * K + k) of each of the first n lanes, -1 for a lane
        that runs nothing, in groups of C lanes of one sample (a sample's branches consecutive and in order);
        the lanes after them run nothing. ``moves``: (from, to) lane positions whose next-token logits go with
        their branch (the branches that change lanes)."""
        K, C, R, n = self.K, self.C, self.R, len(table)
        real = np.flatnonzero(table >= 0)
        row = np.full(n, R, dtype=np.int64)  # each lane's row (R: none)
        row[real] = table[real] // K
        lane = np.full(self.L, R * K, dtype=np.int64)
        lane[real] = table[real]
        first = np.arange(self.L, dtype=np.int64)  # a sample's lanes may have ended ones among them
        rows, at = np.unique(row[real], return_index=True)
        first[real] = real[at][np.searchsorted(rows, row[real])]
        group_row = np.full(self.L // C, R, dtype=np.int64)
        if self.in_order:
            group_row[:R] = np.arange(R)
        else:
            group_row[:n // C] = row.reshape(-1, C).min(1)  # a group's lanes are one sample's
        host = {"lane": torch.from_numpy(lane), "first": torch.from_numpy(first),
                "group_row": torch.from_numpy(group_row)}
        if moves is not None and len(moves[0]):
            host["moves"] = torch.from_numpy(np.stack(moves))
        d = self.upload(host)
        if "moves" in d:
            src, dst = d["moves"]
            self.logits.index_copy_(0, dst, self.logits.index_select(0, src))
        self.lane.copy_(d["lane"])
        self.first.copy_(d["first"])
        self.group_row.copy_(d["group_row"])

    def move_rows(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Samples from rows ``src`` to rows ``dst`` (their K/V and their branches' state)."""
        d = self.upload({"src": torch.tensor(src), "dst": torch.tensor(dst)})
        for t in self.state.tensors():
            t.index_copy_(0, d["dst"], t.index_select(0, d["src"]))
        self.cache.move_rows(d["src"], d["dst"])

    def lane_active(self, m: int) -> np.ndarray:
        """Whether each of the first m lanes still runs its branch (the host waits for the queued steps)."""
        return _flat(self.state.active)[self.lane[:m]].cpu().numpy()

    # ------------------------------------------------------------------ admission
    def upload(self, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The host tensors on the state's device, each with its shape and dtype. On CUDA they travel in one
        copy from a pinned buffer that the host does not wait for (a copy from pageable memory waits for
        every queued kernel first); on the CPU they are returned as they are."""
        if self._staged is None:
            return dict(host)
        parts = [t.reshape(-1).long() for t in host.values()]
        total = sum(p.numel() for p in parts)
        if self._staging is None or self._staging.numel() < total:
            # a buffer still being copied from is kept until its copy is done (torch's pinned-memory cache)
            self._staging = torch.empty(max(total, 2 * (0 if self._staging is None else self._staging.numel())),
                                        dtype=torch.long, pin_memory=True)
        else:
            self._staged.synchronize()  # the previous copy out of this buffer has been made
        flat = torch.cat(parts, out=self._staging[:total]).to(self.state.index.device, non_blocking=True)
        self._staged.record()
        return {name: part.view(t.shape).to(t.dtype)
                for (name, t), part in zip(host.items(), flat.split([p.numel() for p in parts]))}

    def prefill(self, packs: list[PackedSample], rows: list[int], indices: list[int], pad_id: int,
                lanes: list[int]) -> None:
        """Run the packed prompts of new samples into ``rows`` and set their branches running; sample b's
        branch k runs on lane ``lanes[b] + k`` (its first token's logits go there).

        Everything the admission needs from the host goes to the device in one copy (``upload``), and the
        device-side writes take device indices only: the host never waits for the device here, so it
        prepares the next forward while this one runs."""
        s, K, G = self.state, self.K, self.opts.max_new_tokens
        batch = collate(packs, pad_id)
        n = batch.input_ids.shape[1]
        # per branch, built as Python lists (no tensor operation per branch):
        # (branch id, bpos, time of the last prompt token, active, first output slot, history length)
        idle = [-1, 0, 0, 0, self.S - 1, 0]
        table = []
        for p in packs:
            bpos = p.bpos[p.last_index].tolist()
            table.append([[b, bp, t, 1, p.num_tokens + k * G, 0]
                          for k, (b, bp, t) in enumerate(zip(p.branch_ids, bpos, p.last_time))]
                         + [idle] * (K - len(p.branch_ids)))
        branches = torch.tensor(table, dtype=torch.long)  # [B, K, 6]
        history = None
        if s.history.shape[-1]:  # repetition penalty: each branch's main + branch ids, in time order
            history = torch.zeros(len(packs), K, s.history.shape[-1], dtype=torch.long)
            for b, p in enumerate(packs):
                for k, branch in enumerate(p.branch_ids):
                    h = p.input_ids[(p.branch == branch) | p.is_main]
                    history[b, k] = h[0]
                    history[b, k, : h.numel()] = h
                    branches[b, k, 5] = h.numel()
        # logits only where a branch continues: E = every branch's last prompt token, to branch k's lane
        pick = torch.tensor([[b, c, lanes[b] + k] for b, p in enumerate(packs) for k, c in enumerate(p.last_index)],
                            dtype=torch.long).view(-1, 3)  # [E, 3]
        host = {"rows": torch.tensor(rows), "index": torch.tensor(indices),
                "n_real": torch.tensor([p.num_tokens for p in packs]), "input_ids": batch.input_ids,
                "positions": stack_positions(batch.pos1d, batch.bpos, batch.meta.time, self.opts.rope_2d),
                "pick": pick, "branches": branches,
                **dict(zip(("time", "branch", "is_main", "valid"), batch.meta.astuple()))}
        if history is not None:
            host["history"] = history
        d = self.upload(host)
        r = d["rows"]
        meta = TokenMeta(d["time"], d["branch"], d["is_main"], d["valid"])
        for dst, src, empty in zip(s.keys.astuple(), meta.astuple(), (0, -1, False, False)):
            dst.index_fill_(0, r, empty)
            dst[:, :n].index_copy_(0, r, src)
        self.cache.prefill(r, n)
        slots = torch.arange(n, device=r.device).expand(len(packs), n)  # [B, N]: a prompt token's own slot
        pick = d["pick"]
        logits = self.call(d["input_ids"], d["positions"], meta, meta, slots, self.cache,
                           select=(pick[:, 0], pick[:, 1]))  # [E, V]
        for j, dst in enumerate((s.branch_id, s.bpos, s.last_time, s.active, s.base, s.hist_len)):
            dst.index_copy_(0, r, d["branches"][..., j].to(dst.dtype))
        if history is not None:
            s.history.index_copy_(0, r, d["history"])
        for t in (s.ngen, s.finish, s.out):
            t.index_fill_(0, r, 0)
        s.index.index_copy_(0, r, d["index"])
        s.n_real.index_copy_(0, r, d["n_real"])
        self.logits.index_copy_(0, pick[:, 2], logits.to(self.logits.dtype))

    def clear_row(self, row: int | slice | torch.Tensor) -> None:
        s = self.state
        for t, value in ((s.active, False), (s.index, -1), (s.keys.valid, False)):
            if isinstance(row, torch.Tensor):
                t.index_fill_(0, row, value)  # a scalar set through a tensor index would copy it from the host
            else:
                t[row] = value


# ----------------------------------------------------------------------------- the engine


@dataclasses.dataclass
class Result:
    """One finished sample."""

    position: int  # position of the sample in the ``run`` call
    output_ids: list[list[int]]
    finish_reasons: list[str]


def _buckets(most: int) -> list[int]:
    """Lane group counts the step runs over: most, most/2, most/4, ... down to 1 (at most ~log2 of it graphs)."""
    out, n = [], most
    while n >= 1:
        out.append(n)
        n //= 2
    return out


class Engine:
    """Decodes packed samples with continuous batching; holds runners, graphs and KV memory until released.

    With the batch-invariant kernels (CUDA), making the engine starts compiling them in background threads
    (``pmaccel.invariant.compile_ahead``); its first ``run`` waits for them.

    Args:
        model: a causal LM (2D RoPE if patched; sdpa or eager attention).
        config: pool sizes and step options; default ``EngineConfig()``.

    Example:
        >>> engine = Engine(model)  # doctest: +SKIP
        >>> for r in engine.run(packs, indices, opts, pad_id=0): ...  # doctest: +SKIP
        >>> engine.stats["steps"], engine.release()  # doctest: +SKIP
    """

    def __init__(self, model: Any, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self.device = next(model.parameters()).device
        self.runner: Runner | None = None
        self._runner_key: tuple | None = None
        self.stats: dict[str, float] = {}
        self._reset_stats()
        if resolve(self.config.deterministic, self.device):
            compile_ahead(model)  # the kernels compile in the background while the caller packs its samples

    def _reset_stats(self) -> None:
        self.stats = dict(steps=0, capture_s=0.0, prefill_s=0.0, decode_s=0.0, prefills=0, rows=0, lanes=0,
                          slots=0, samples=0, generated_tokens=0, graphs=0, lane_moves=0, row_moves=0, prefill_tokens=0)

    def release(self) -> None:
        """Free the KV memory, buffers and graphs (the OOM back-off calls this before retrying smaller)."""
        self.runner, self._runner_key = None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ sizing
    def _lanes(self, K: int, C: int) -> int:
        """The pool's lanes: ``max_lanes`` (2048 on a GPU, 64 on the CPU), at least one sample's, in groups of C."""
        lanes = self.config.max_lanes or (2048 if self.device.type == "cuda" else 64)
        return max(lanes, K) // C * C

    def _pool_size(self, packs: Sequence[PackedSample], opts: Any, K: int, S: int, W: int, L: int, C: int) -> int:
        """Rows (samples at once): as many as can hold a lane group each, within ``max_rows`` and the memory."""
        cfg = self.config
        R = max(1, min(len(packs), L // C, cfg.max_rows or len(packs)))
        if self.device.type == "cuda":
            V = self.model.get_output_embeddings().weight.shape[0]
            itemsize = next(self.model.parameters()).element_size()
            # K/V and 18 bytes of metadata per slot; per branch its outputs, history and ten int64 fields
            per_row = S * kv_bytes_per_slot(self.model) + S * 18 + K * (W + opts.max_new_tokens + 10) * 8
            free, _ = torch.cuda.mem_get_info(self.device)
            free = free * cfg.memory_fraction - L * V * (itemsize + 8)  # the lanes' logits, the step's scores
            R = max(1, min(R, int(free) // per_row))
        return R

    def prefill_budget(self, longest: int) -> int:
        """Most padded prompt tokens in one prefill forward, for prompts of up to ``longest`` tokens."""
        if self.config.prefill_tokens is not None:
            return self.config.prefill_tokens
        budget = PREFILL_TOKENS.get(self.device.type, PREFILL_TOKENS["cpu"])
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            budget = min(budget, free // 2 // prefill_bytes_per_token(self.model, longest))
        return max(1, budget)

    def columns(self, K: int) -> int:
        """Lanes per batch row of a step: 1 where the attention reads each lane's KV row in place (the invariant
        kernels; a lane then holds no room once its branch ends), else a sample's K (``EngineConfig.columns``
        sets it)."""
        if self.config.columns is not None:
            return max(1, min(self.config.columns, K))
        in_place = (resolve(self.config.deterministic, self.device)
                    and getattr(text_config(self.model), "attn_logit_softcapping", None) is None)
        return 1 if in_place else K

    def _runner(self, packs: Sequence[PackedSample], opts: Any, tokens: np.ndarray, branches: np.ndarray) -> Runner:
        G = opts.max_new_tokens
        K = int(branches.max())
        need = int((tokens + branches * G).max()) + 1  # + the scratch slot
        S = -(-need // SLOT_ROUND) * SLOT_ROUND
        W = 0
        if opts.processors and any(type(p).__name__ == "RepetitionPenaltyLogitsProcessor" for p in opts.processors):
            # each branch's history (main + its own tokens): this packs every sample now
            W = max(int(((p.branch == b) | p.is_main).sum()) for p in packs for b in p.branch_ids) + G
        old = self.runner
        C = self.columns(K if old is None else max(K, old.K))
        L = self._lanes(K, C)
        R = self._pool_size(packs, opts, K, S, W, L, C)
        graphs = self.config.graphs if self.config.graphs is not None else self.device.type == "cuda"
        if (old is not None and self._runner_key == (opts, graphs) and old.R >= R and old.K >= K and old.S >= S
                and old.C == C and old.L >= L
                and old.state.history.shape[-1] >= W and (W == 0) == (old.state.history.shape[-1] == 0)):
            old.clear_row(slice(None))  # rows a stopped run left behind are free again
            return old  # a later call that fits reuses the buffers and graphs
        self.release()
        self.stats["rows"] = R  # before allocating: an out-of-memory error here is retried with fewer rows
        t = time.perf_counter()
        runner = Runner(self.model, opts, R, K, S, W, graphs, lanes=L, columns=C)
        if graphs:
            runner.capture(_buckets(runner.groups))
        self.stats["capture_s"] += time.perf_counter() - t
        self.runner, self._runner_key = runner, (opts, graphs)
        return runner

    # ------------------------------------------------------------------ the scheduler
    def run(self, packs: Sequence[PackedSample], indices: Sequence[int], opts: Any, *, pad_id: int = 0,
            on_step: Callable[[int, list[dict]], None] | None = None) -> Iterator[Result]:
        """Decode ``packs`` (``indices``: their global sample indices); yields each sample as it finishes.

        Args:
            packs: the packed prompts (a ``PackOnRead`` packs each as it is admitted, the next ones while the
                device runs the steps before).
            indices: each sample's global index (seeds its sampling RNG).
            opts: a ``pmaccel.decode.DecodeOptions``.
            pad_id: the id that pads prompts in a prefill batch.
            on_step: called after every step with ``(step, partial results of the samples in the pool)``;
                steps then run one at a time with a host check after each.
        """
        if not packs:
            return
        packs = packs if isinstance(packs, PackOnRead) else list(packs)  # packed as they are admitted, or now
        batches = self._run(packs, list(indices), opts, pad_id, on_step)
        plan = None  # what the invariant mode finds in the model on its first entry, reused by the others
        while True:
            # the engine's own modes hold only while its code runs, not while the caller handles results
            with torch.inference_mode(), self.attention(plan) as plan:
                finished = next(batches, None)
            if finished is None:
                return
            yield from finished

    def attention(self, plan: ModePlan | None = None) -> contextlib.AbstractContextManager:
        """The attention (and, when deterministic, GEMM and norm) kernels the engine runs the model with
        (``plan``: what an earlier entry of ``invariant_mode`` yielded, for the same model)."""
        if resolve(self.config.deterministic, self.device):
            return invariant_mode(self.model, plan=plan)
        return grouped_attention(self.model)

    def _run(self, packs, indices, opts, pad_id, on_step) -> Iterator[list[Result]]:
        tokens, branches = _sizes(packs)
        runner = self._runner(packs, opts, tokens, branches)
        st, cfg = self.stats, self.config
        C, L = runner.C, runner.L
        st.update(rows=runner.R, lanes=L, slots=runner.S, graphs=len(runner.graphs))
        # longest first: the tail of the run holds the short ones
        size = (tokens + branches).tolist()
        pending = sorted(range(len(packs)), key=lambda i: -size[i])
        pending.reverse()  # pop() from the end
        branches = branches.tolist()
        need = [-(-k // C) for k in branches]  # lane groups a sample takes
        waiting = sum(need)  # lane groups of the pending samples
        free = list(range(runner.R - 1, -1, -1))  # pop() gives the lowest row
        live: dict[int, int] = {}  # row -> position in packs
        started: dict[int, int] = {}  # row -> the step its sample was admitted at
        table = np.zeros(0, dtype=np.int64)  # the branch of each lane in use (row * K + k; -1: none), in order
        runner.set_lanes(table)  # a run that stopped early left its lanes behind
        sync = 1 if on_step is not None else max(1, cfg.sync_every)
        budget = self.prefill_budget(int(tokens.max()))
        tokens = tokens.tolist()
        ahead = packs.prepare if isinstance(packs, PackOnRead) else None
        st["prefill_tokens"] = budget
        steps = 0
        ready: list[Result] = []  # harvested, handed to the caller once the next steps are queued
        while pending or live:
            # admit: new samples into free rows and the free lanes after the running ones, when enough lanes are
            # free (or nothing runs); prefill in chunks
            room = (L - len(table)) // C
            if (pending and free and need[pending[-1]] <= room
                    and (not live or room * C >= max(1, L // 8) or waiting <= room)):
                t = time.perf_counter()
                take = []
                while pending and free and need[pending[-1]] <= room:
                    pos = pending.pop()
                    take.append((free.pop(), pos))
                    room -= need[pos]
                    waiting -= need[pos]
                free.sort(reverse=True)
                # each sample's branches on the next free lanes, its groups filled in turn (in order, rows lowest
                # first: with one group per sample, group r is row r)
                added, lanes, end = [table], {}, len(table)
                for r, i in take:
                    k_n = branches[i]
                    added.append(np.array([r * runner.K + k for k in range(k_n)] + [-1] * (need[i] * C - k_n)))
                    lanes[r], end = end, end + need[i] * C
                table = np.concatenate(added)
                for chunk in _prefill_chunks(take, tokens, branches, budget):
                    rows, pos = [r for r, _ in chunk], [i for _, i in chunk]
                    runner.prefill([packs[i] for i in pos], rows, [indices[i] for i in pos], pad_id,
                                   [lanes[r] for r in rows])
                    live.update(chunk)
                    started.update((r, steps) for r in rows)
                    st["prefills"] += 1
                runner.set_lanes(table)
                _sync(self.device)
                st["prefill_s"] += time.perf_counter() - t
            # decode a few steps over the smallest bucket that holds every lane group
            t = time.perf_counter()
            n = _bucket_for(len(table) // C, runner.groups)
            # check again no later than the step at which the first live sample must end (max_new_tokens)
            count = max(1, min(sync, min(opts.max_new_tokens - (steps - started[r]) for r in live)))
            runner.run_steps(n, count)
            steps += count
            st["steps"] += count
            if ahead is not None:  # the samples the next admissions take, packed while the device runs the steps
                ahead(_next_up(pending, need, max(1, runner.groups // 4)))
            if ready:  # the caller handles these (text, output files) while the device runs the queued steps
                away = time.perf_counter()
                yield ready
                ready = []
                t += time.perf_counter() - away
            going = runner.lane_active(len(table))
            st["decode_s"] += time.perf_counter() - t
            if on_step is not None:
                on_step(steps, [_partial(runner, r, indices[i], branches[i]) for r, i in sorted(live.items())])
            # the lanes whose branches ended are freed: the running ones move down, in order, over them
            K = runner.K
            kept_at = np.flatnonzero(going & (table >= 0))
            kept = table[kept_at]
            alive = np.zeros(runner.R + 1, dtype=bool)
            alive[kept // K] = True
            done = [r for r in sorted(live) if not alive[r]]
            if done:
                ready = list(self._harvest(runner, done, live, branches))  # read out before any row moves
            if runner.in_order:  # one group per sample, in its row's place: the samples move down with it
                order = np.unique(kept // K)  # the live rows, ascending (= lane order)
                new_row = np.searchsorted(order, kept // K)
                src = [int(r) for j, r in enumerate(order) if r != j]
                if src:
                    dst = [j for j, r in enumerate(order) if r != j]
                    runner.move_rows(src, dst)
                    runner.clear_row(torch.tensor(sorted(set(src) - set(dst)), device=self.device, dtype=torch.long))
                    for r, j in zip(src, dst):
                        live[j], started[j] = live.pop(r), started.pop(r)
                    st["row_moves"] += len(src)
                kept, moved_to, size = new_row * K + kept % K, new_row * C + kept % K, len(order) * C
                free = list(range(runner.R - 1, len(order) - 1, -1))
            else:
                moved_to, size = _regroup(kept // K, C)
                free = sorted(free + done, reverse=True)
            new = np.full(size, -1, dtype=np.int64)
            new[moved_to] = kept
            if not np.array_equal(new, table):
                moving = moved_to != kept_at
                table = new
                runner.set_lanes(table, (kept_at[moving], moved_to[moving]))
                st["lane_moves"] += int(moving.sum())
        if ready:
            yield ready

    def _harvest(self, runner: Runner, done: list[int], live: dict[int, int], branches: list[int]) -> Iterator[Result]:
        s = runner.state
        r = torch.tensor(done, device=s.out.device)
        out, ngen, finish = s.out[r].tolist(), s.ngen[r].tolist(), s.finish[r].tolist()
        runner.clear_row(r)
        for j, row in enumerate(done):
            pos = live.pop(row)
            k_n = branches[pos]
            ids = [out[j][k][: ngen[j][k]] for k in range(k_n)]
            self.stats["samples"] += 1
            self.stats["generated_tokens"] += sum(map(len, ids))
            yield Result(pos, ids, [FINISH_REASONS[finish[j][k]] for k in range(k_n)])


def _sizes(packs: Sequence[PackedSample]) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's prompt tokens and branches (a ``PackOnRead``'s without packing them)."""
    if isinstance(packs, PackOnRead):
        return packs.sizes()
    return (np.array([p.num_tokens for p in packs], dtype=np.int64),
            np.array([len(p.branch_ids) for p in packs], dtype=np.int64))


def _next_up(pending: list[int], need: list[int], groups: int) -> list[int]:
    """The pending samples next in line (``pending`` pops from its end) that take ``groups`` lane groups."""
    out, taken = [], 0
    for pos in reversed(pending):
        if taken >= groups:
            break
        out.append(pos)
        taken += need[pos]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bucket_for(groups: int, most: int) -> int:
    n = most
    while n // 2 >= groups:
        n //= 2
    return n


def _regroup(rows: np.ndarray, C: int) -> tuple[np.ndarray, int]:
    """New lane positions for running branches whose rows, in lane order, are ``rows`` (a sample's consecutive):
    each sample's from a group of C of its own, in order. Returns (positions, lanes in use)."""
    n = len(rows)
    if not n:
        return np.zeros(0, dtype=np.int64), 0
    starts = np.ones(n, dtype=bool)
    starts[1:] = rows[1:] != rows[:-1]
    at = np.flatnonzero(starts)
    rank = np.arange(n) - np.repeat(at, np.diff(np.append(at, n)))  # rank among its sample's running branches
    groups = -(-np.diff(np.append(at, n)) // C)  # groups per sample
    first_group = np.concatenate([[0], np.cumsum(groups)[:-1]])
    return np.repeat(first_group, np.diff(np.append(at, n))) * C + rank, int(groups.sum()) * C


def prefill_bytes_per_token(model: Any, longest: int) -> int:
    """Device memory one prompt token of a prefill forward may take at once, roughly: its hidden states and MLP
    activations, and its row of the mask and key lists over a prompt of ``longest`` tokens."""
    cfg = text_config(model)
    hidden = cfg.hidden_size
    inner = getattr(cfg, "intermediate_size", None) or 4 * hidden
    itemsize = next(model.parameters()).element_size()
    return (8 * hidden + 4 * inner) * itemsize + 32 * longest


def _prefill_chunks(take: list[tuple[int, int]], tokens: Sequence[int], branches: Sequence[int],
                    budget: int) -> Iterator[list[tuple[int, int]]]:
    """Split (row, position) pairs into prefill batches of at most ``budget`` padded tokens, of which at most a
    quarter padding, and at most PREFILL_LANES branches (which bounds the logits). ``tokens``, ``branches``:
    each position's prompt tokens and branches."""
    take = sorted(take, key=lambda rp: -tokens[rp[1]])  # similar lengths together: less padding
    chunk: list[tuple[int, int]] = []
    lanes = real = 0
    for rp in take:
        n, k = tokens[rp[1]], branches[rp[1]]
        padded = (len(chunk) + 1) * (tokens[chunk[0][1]] if chunk else n)  # the longest first
        if chunk and (padded > budget or 4 * (padded - real - n) > budget or lanes + k > PREFILL_LANES):
            yield chunk
            chunk, lanes, real = [], 0, 0
        chunk.append(rp)
        lanes += k
        real += n
    if chunk:
        yield chunk


def _partial(runner: Runner, row: int, index: int, k_n: int) -> dict:
    s = runner.state
    out, ngen, finish = s.out[row].cpu(), s.ngen[row].cpu(), s.finish[row].cpu()
    return {"index": index, "output_ids": [out[k, : ngen[k]].tolist() for k in range(k_n)],
            "finish_reasons": [FINISH_REASONS.get(int(finish[k])) for k in range(k_n)]}
