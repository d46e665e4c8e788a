"""Parallel decoding (SPEC §5): prefill the packed prompts, then one forward per step that emits a
token for every unfinished branch of every sample in the batch.

The loop is a handful of small functions over plain tensors:

    prefill      -> logits at each branch's last prompt token
    next_tokens  -> greedy / sampled token per branch (transformers' logits processors)
    finish       -> EOS / stop ids / max_new_tokens bookkeeping (host side)
    step_inputs  -> the step's new tokens, appended in branch order, with their positions and mask
    ModelCall    -> the model over the step, with the KV cache (pmaccel.forward)

Every forward gets its positions (``position_ids``) and a custom 4D mask; nothing is left in the
model between calls.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import LogitsProcessorList

from pmaccel.errors import PMAccelError
from pmaccel.fast import decode_batch_fast
from pmaccel.forward import ModelCall
from pmaccel.layout import (
    ALIGNS,
    MASKS,
    PackedSample,
    TokenMeta,
    collate,
    pack_sample,
    stack_positions,
)
from pmaccel.rope import is_rope_2d
from pmaccel.samples import batch_end, tokenize_sample
from pmaccel.sampling import draw, make_processors, uniforms


@dataclass(frozen=True)
class DecodeOptions:
    """What a decode needs besides the model and the samples."""

    max_new_tokens: int
    mask: str
    rope_2d: bool
    stop_ids: frozenset[int]
    greedy: bool
    sampling: tuple[float, float, int, float]  # temperature, top_p, top_k, repetition_penalty
    processors: LogitsProcessorList = field(hash=False, compare=False)  # built from `sampling`
    seed: int = 0


@dataclass
class _Branch:
    row: int  # row of its sample in the current batch
    sample: int  # position of its sample in the micro-batch
    index: int  # the sample's global index
    branch_id: int
    bpos: int
    last_time: int
    history: list[int]  # main + prompt + generated ids (for the repetition penalty)
    out: list[int] = field(default_factory=list)
    finish: str | None = None


def sample_seed(seed: int, index: int) -> int:
    """The RNG seed of sample ``index``: a fixed mix of (seed, index), whatever the batch or process."""
    return (seed * 0x9E3779B1 + index * 0x85EBCA77 + 0x165667B1) % (2**63 - 1)


def _stop_ids(model: Any, tokenizer: Any, extra: Sequence[int] | None = None) -> frozenset[int]:
    """EOS ids from the model's generation config (else the tokenizer's), plus ``extra`` stop ids."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return frozenset(int(i) for i in [*ids, *(extra or [])])


# ----------------------------------------------------------------------------- the step functions


def prefill(call: ModelCall, packs: list[PackedSample], opts: DecodeOptions, cache, pad_id: int):
    """Run the packed prompts. Returns (logits [E, V] at each branch's last prompt token, key meta [B, N])."""
    batch = collate(packs, pad_id)
    device = next(call.model.parameters()).device
    meta = TokenMeta(*(t.to(device) for t in batch.meta.astuple()))
    rows = [b for b, p in enumerate(packs) for _ in p.last_index]
    cols = [i for p in packs for i in p.last_index]
    keep = sorted(set(cols))  # only the logits we need: [B, len(keep), V] instead of [B, N, V]
    where = {c: i for i, c in enumerate(keep)}
    n = batch.input_ids.shape[1]
    logits = call(
        batch.input_ids.to(device),
        stack_positions(batch.pos1d, batch.bpos, batch.meta.time, opts.rope_2d).to(device),
        meta,
        meta,
        torch.arange(n, device=device).expand(len(packs), n),
        cache,
        keep=torch.tensor(keep, device=device),
    )
    return logits[torch.tensor(rows), torch.tensor([where[c] for c in cols])].float(), meta


def next_tokens(logits: torch.Tensor, branches: list[_Branch], opts: DecodeOptions) -> torch.Tensor:
    """logits: [E, V] of the active branches -> token ids [E]."""
    scores = logits
    if opts.processors:
        width = max(len(b.history) for b in branches)
        # pad each history with its own first id: repeats do not change the repetition penalty
        hist = torch.tensor([b.history + b.history[:1] * (width - len(b.history)) for b in branches])
        scores = opts.processors(hist.to(logits.device), scores)
    if opts.greedy:
        return scores.argmax(dim=-1)
    index, branch, step = (
        torch.tensor(x, device=logits.device)
        for x in zip(*[(b.index, b.branch_id, len(b.out)) for b in branches])
    )
    return draw(scores, uniforms(opts.seed, index, branch, step))


def finish(branches: list[_Branch], tokens: list[int], opts: DecodeOptions) -> list[_Branch]:
    """Record each branch's new token; return the branches that go on (their token is fed back)."""
    going = []
    for b, t in zip(branches, tokens):
        if t in opts.stop_ids:
            b.finish = "stop"  # the stop token is the finish reason, not part of the output
            continue
        b.out.append(t)
        b.history.append(t)
        if len(b.out) >= opts.max_new_tokens:
            b.finish = "length"
        else:
            going.append(b)
    return going


def step_inputs(going: list[_Branch], n_real: list[int], num_rows: int, device):
    """The step's new tokens: per row, its going branches in branch order.

    Returns input_ids [B, T], positions pieces (pos1d, bpos, time) [B, T], query meta [B, T] and, per
    going branch, its (row, column).
    """
    per_row: list[list[_Branch]] = [[] for _ in range(num_rows)]
    for b in going:
        per_row[b.row].append(b)
    width = max(len(r) for r in per_row)
    ids = torch.zeros(num_rows, width, dtype=torch.long)
    pos1d, bpos, time = (torch.zeros(num_rows, width, dtype=torch.long) for _ in range(3))
    branch = torch.full((num_rows, width), -1, dtype=torch.long)
    valid = torch.zeros(num_rows, width, dtype=torch.bool)
    where = []
    for r, bs in enumerate(per_row):
        for k, b in enumerate(sorted(bs, key=lambda b: b.branch_id)):
            b.last_time += 1
            ids[r, k], pos1d[r, k], bpos[r, k], time[r, k] = b.out[-1], n_real[r] + k, b.bpos, b.last_time
            branch[r, k], valid[r, k] = b.branch_id, True
            where.append((b, r, k))
        n_real[r] += len(bs)
    query = TokenMeta(time=time, branch=branch, is_main=torch.zeros_like(valid), valid=valid)
    move = (lambda t: t.to(device))  # noqa: E731
    return move(ids), (move(pos1d), move(bpos), move(time)), TokenMeta(*map(move, query.astuple())), where


# ----------------------------------------------------------------------------- one micro-batch


def decode_batch(
    model,
    packs: list[PackedSample],
    prompts: list[list[list[int]]],
    indices: list[int],
    opts: DecodeOptions,
    pad_id: int,
    on_step: Callable[[int, list[dict]], None] | None = None,
) -> tuple[list[list[list[int]]], list[list[str]]]:
    """Decode a few packed samples together (the reference path).

    Returns each sample's generated ids and finish reasons, per branch.

    ``prompts[s][k]`` is main + branch k's prompt ids of sample s (the repetition-penalty history).
    """
    device = next(model.parameters()).device
    cache = DynamicCache()  # one layer type for all: the mask, not the cache, decides what is seen
    call = ModelCall.of(model, opts.mask)
    samples = [
        [
            _Branch(row=s, sample=s, index=indices[s], branch_id=bid, bpos=int(p.bpos[last]), last_time=lt,
                    history=list(prompts[s][k]))
            for k, (bid, last, lt) in enumerate(zip(p.branch_ids, p.last_index, p.last_time))
        ]
        for s, p in enumerate(packs)
    ]
    active = [b for bs in samples for b in bs]
    n_real = [p.num_tokens for p in packs]

    with torch.inference_mode():
        logits, keys = prefill(call, packs, opts, cache, pad_id)
        step = 0
        while active:
            tokens = next_tokens(logits, active, opts).tolist()
            going = finish(active, tokens, opts)
            step += 1
            if on_step is not None:
                on_step(step, [_partial(indices[s], bs) for s, bs in enumerate(samples)])
            if not going:
                break
            rows_alive = sorted({b.row for b in going})
            if len(rows_alive) < keys.time.shape[0]:  # drop finished samples from the batch and cache
                keep = torch.tensor(rows_alive, device=device)
                cache.batch_select_indices(keep)
                keys = keys.select(keep)
                remap = {r: i for i, r in enumerate(rows_alive)}
                n_real = [n_real[r] for r in rows_alive]
                for b in going:
                    b.row = remap[b.row]
            ids, (pos1d, bpos, time), query, where = step_inputs(going, n_real, len(rows_alive), device)
            slot0 = keys.time.shape[1]
            keys = keys.cat(query)
            slots = slot0 + torch.arange(ids.shape[1], device=device).expand_as(ids)
            out = call(ids, stack_positions(pos1d, bpos, time, opts.rope_2d), query, keys, slots, cache)
            active = [b for b, _, _ in where]
            rows = torch.tensor([r for _, r, _ in where], device=device)
            cols = torch.tensor([k for _, _, k in where], device=device)
            logits = out[rows, cols].float()  # [E, V]
    return [[b.out for b in bs] for bs in samples], [[b.finish for b in bs] for bs in samples]


def _partial(index: int, branches: list[_Branch]) -> dict:
    return {
        "index": index,
        "output_ids": [list(b.out) for b in branches],
        "finish_reasons": [b.finish for b in branches],
    }


# ----------------------------------------------------------------------------- the public entry point


def check_call(model: Any, samples: Sequence, *, mask: str | None, batch_size: int,
               indices: Sequence[int] | None) -> tuple[bool, str, list[int]]:
    """Checks shared by ``generate`` and ``score_samples``. Returns (2D RoPE on, mask, indices)."""
    rope_2d = is_rope_2d(model)
    mask = mask or ("columnar" if rope_2d else "isolated")
    if mask not in MASKS:
        raise PMAccelError(f"unknown mask {mask!r}; use one of {', '.join(MASKS)}", field="mask")
    if batch_size < 1:
        raise PMAccelError(f"batch_size must be at least 1, got {batch_size}", field="batch_size")
    attn = getattr(getattr(model, "config", None), "_attn_implementation", "eager")
    if attn not in (None, "eager", "sdpa"):
        raise PMAccelError(
            f"attention implementation {attn!r} cannot take the packed 4D mask; load the model with "
            "attn_implementation='sdpa' or 'eager'",
            field="attn_implementation",
        )
    indices = list(range(len(samples))) if indices is None else list(indices)
    if len(indices) != len(samples):
        raise PMAccelError(f"got {len(indices)} indices for {len(samples)} samples", field="indices")
    return rope_2d, mask, indices


def generate(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 128,
    mask: str | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    do_sample: bool | None = None,
    seed: int = 0,
    batch_size: int = 16,
    batch_by_samples: bool = True,
    chat_template: bool = False,
    branch_stride: int = 128,
    align: str = "left",
    interleave_branches: bool = True,
    random_time_offset: bool = False,
    stop_token_ids: Sequence[int] | None = None,
    indices: Sequence[int] | None = None,
    on_step: Callable[[int, list[dict]], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    fast: bool | None = None,
) -> list[dict]:
    """Decode parallel samples: every branch of every sample continues in one packed sequence.

    Args:
        model: a causal LM from ``pmaccel.load_model`` (2D RoPE is used when the model was patched).
        tokenizer: its tokenizer.
        samples: ``[{"main": str, "branches": [str | {"text": str} | {"input_ids": [int]}, ...]}, ...]``.
        max_new_tokens: the most tokens each branch generates.
        mask: ``"columnar"`` or ``"isolated"``; default columnar with 2D RoPE, isolated without.
        temperature: 0 means greedy.
        top_p: nucleus sampling threshold (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        repetition_penalty: transformers' repetition penalty over main + branch + generated ids.
        do_sample: force sampling on/off; default: sample iff ``temperature > 0``.
        seed: sampling seed; sample i uses an RNG seeded from ``(seed, indices[i])``.
        batch_size: samples per forward batch (``batch_by_samples``), else the most branches per batch.
        batch_by_samples: how ``batch_size`` counts.
        chat_template: wrap each branch in the tokenizer's chat template (SPEC §1).
        branch_stride: ``bpos = branch_id * branch_stride``.
        align: ``"left"`` or ``"right"`` (branches end together).
        interleave_branches: packed order by (time, branch); ``False``: by (branch, time).
        random_time_offset: shift each branch's times by a seeded random amount (training augmentation).
        stop_token_ids: extra ids that end a branch, besides the model's EOS.
        indices: the global index of each sample (seeds its RNG); default ``range(len(samples))``.
        on_step: called after every decode step with ``(step, partial results of the micro-batch)``.
        progress: called after every micro-batch with ``(samples_done, new_tokens)``.
        fast: use the fast path (static KV slots, CUDA graphs on GPU); default: on CUDA when neither
            ``on_step`` nor a repetition penalty asks for the reference path. Same results either way.

    Returns:
        One dict per sample, in input order: ``outputs`` (text per branch), ``output_ids``,
        ``finish_reasons`` (``"stop"``/``"length"``), ``num_generated_tokens`` and ``num_prompt_tokens``.

    Example:
        >>> model, tok = pmaccel.load_model()  # doctest: +SKIP
        >>> pmaccel.generate(model, tok, [{"main": "Name a colour.", "branches": ["A:", "B:"]}],
        ...                  max_new_tokens=8)[0]["outputs"]  # doctest: +SKIP
    """
    rope_2d, mask, indices = check_call(model, samples, mask=mask, batch_size=batch_size, indices=indices)
    if align not in ALIGNS:
        raise PMAccelError(f"align must be one of {', '.join(ALIGNS)}, got {align!r}", field="align")
    if max_new_tokens < 1:
        raise PMAccelError(f"max_new_tokens must be at least 1, got {max_new_tokens}", field="max_new_tokens")
    greedy = do_sample is False or temperature == 0.0
    if do_sample and temperature == 0.0:
        greedy = False
        temperature = 1.0
    opts = DecodeOptions(
        max_new_tokens=max_new_tokens,
        mask=mask,
        rope_2d=rope_2d,
        stop_ids=_stop_ids(model, tokenizer, stop_token_ids),
        greedy=greedy,
        sampling=(temperature, top_p, top_k, repetition_penalty),
        processors=make_processors(temperature, top_p, top_k, repetition_penalty, greedy),
        seed=seed,
    )
    tokenized, packs = [], []
    for i, s in zip(indices, samples):
        try:
            ts = tokenize_sample(s, tokenizer, chat_template=chat_template)
        except PMAccelError as e:
            raise PMAccelError(f"sample {i}: {e}") from None
        rng = random.Random(sample_seed(seed, i)) if random_time_offset else None
        tokenized.append(ts)
        packs.append(pack_sample(ts, branch_stride=branch_stride, align=align,
                                 interleave_branches=interleave_branches, time_offset_rng=rng))

    if fast is None:
        fast = next(model.parameters()).device.type == "cuda" and on_step is None and repetition_penalty == 1.0
    elif fast and (on_step is not None or repetition_penalty != 1.0):
        raise PMAccelError("the fast path takes neither on_step nor repetition_penalty; use fast=False", field="fast")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(packs)), key=lambda i: packs[i].num_tokens)  # less padding per batch
    sizes = [len(tokenized[i].branches) for i in order]
    results: list[dict | None] = [None] * len(packs)
    done = 0
    start = 0
    while start < len(order):
        end = batch_end(sizes, start, batch_size, batch_by_samples)
        mb, start = order[start:end], end
        mb_packs, mb_indices = [packs[i] for i in mb], [indices[i] for i in mb]
        if fast:
            # rows up to the configured batch (a power of two below it): a short last batch reuses the graph
            max_rows = batch_size if batch_by_samples else len(mb)
            ids_per_sample, reasons = decode_batch_fast(model, mb_packs, mb_indices, opts, pad_id, max_rows)
        else:
            prompts = [[tokenized[i].main + b for b in tokenized[i].branches] for i in mb]
            ids_per_sample, reasons = decode_batch(model, mb_packs, prompts, mb_indices, opts, pad_id, on_step)
        new_tokens = 0
        for i, ids, why in zip(mb, ids_per_sample, reasons):
            new_tokens += sum(map(len, ids))
            results[i] = {
                "outputs": [tokenizer.decode(x, skip_special_tokens=True) for x in ids],
                "output_ids": ids,
                "finish_reasons": why,
                "num_generated_tokens": [len(x) for x in ids],
                "num_prompt_tokens": packs[i].num_tokens,
            }
        done += len(mb)
        if progress is not None:
            progress(done, new_tokens)
    return results  # type: ignore[return-value]

