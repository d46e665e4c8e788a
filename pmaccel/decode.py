"""Parallel decoding (SPEC §5): every branch of every sample continues in one packed sequence, one
token per branch per step, on the decode engine (``pmaccel.engine``).

    generate       samples -> tokenize -> pack (``pmaccel.layout``) -> Engine.run -> texts
    DecodeOptions  what a decode needs besides the model and the samples

Every forward gets its positions and a custom 4D mask; nothing is left in the model between calls.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers.generation.logits_process import LogitsProcessorList

from pmaccel.engine import Engine, EngineConfig
from pmaccel.errors import PMAccelError
from pmaccel.layout import PackOnRead, pack_sample
from pmaccel.request import LAYOUT_SETTINGS, Layout, check_call, stop_ids, tokenize_request
from pmaccel.sampling import make_processors
from pmaccel.settings import default


@dataclass(frozen=True)
class DecodeOptions:
    """What a decode needs besides the model and the samples (hashable: it keys the engine's graphs)."""

    max_new_tokens: int
    mask: str
    rope_2d: bool
    stop_ids: frozenset[int]
    greedy: bool
    sampling: tuple[float, float, int, float]  # temperature, top_p, top_k, repetition_penalty
    processors: LogitsProcessorList = field(hash=False, compare=False)  # built from `sampling`
    seed: int = 0


def engine_config(batch_size: int | None, batch_by_samples: bool = True,
                  deterministic: bool | None = None) -> EngineConfig:
    """The engine configuration for a ``batch_size`` (an upper bound on the pool; ``None``: automatic)."""
    if batch_size is None:
        return EngineConfig(deterministic=deterministic)
    if batch_by_samples:
        return EngineConfig(max_rows=batch_size, deterministic=deterministic)
    return EngineConfig(max_lanes=batch_size, deterministic=deterministic)


def generate(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = default("max_new_tokens"),
    mask: str | None = default("mask"),
    temperature: float = default("temperature"),
    top_p: float = default("top_p"),
    top_k: int = default("top_k"),
    repetition_penalty: float = default("repetition_penalty"),
    do_sample: bool | None = None,
    seed: int = default("seed"),
    batch_size: int | None = None,
    batch_by_samples: bool = default("batch_by_samples"),
    chat_template: bool = default("chat_template"),
    branch_stride: int = default("branch_stride"),
    align: str = default("align"),
    interleave_branches: bool = default("interleave_branches"),
    random_time_offset: bool = default("random_time_offset"),
    stop_token_ids: Sequence[int] | None = None,
    indices: Sequence[int] | None = None,
    on_step: Callable[[int, list[dict]], None] | None = None,
    engine: Engine | None = None,
    deterministic: bool | None = default("deterministic"),
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
        batch_size: the most samples decoded at once (``batch_by_samples``), else the most branches per
            step; ``None``: as many as the device memory holds (the engine sizes its pool).
        batch_by_samples: how ``batch_size`` counts.
        chat_template: wrap each branch in the tokenizer's chat template (SPEC §1).
        branch_stride: ``bpos = branch_id * branch_stride``.
        align: ``"left"`` or ``"right"`` (branches end together).
        interleave_branches: packed order by (time, branch); ``False``: by (branch, time).
        random_time_offset: shift each branch's times by a seeded random amount (training augmentation).
        stop_token_ids: extra ids that end a branch, besides the model's EOS.
        indices: the global index of each sample (seeds its RNG); default ``range(len(samples))``.
        on_step: called after every decode step with ``(step, partial results of the samples in flight)``.
        engine: the ``pmaccel.engine.Engine`` to decode on (keeps its graphs and KV memory for the next
            call; its own configuration sizes the pool, ``batch_size`` is not used); default: a new one,
            released before returning.
        deterministic: batch-invariant kernels on CUDA (``pmaccel.invariant``): each sample's tokens are
            the same whatever its companions, the batch size or the process count; ``None``: on where
            Triton is available (a given ``engine`` keeps its own setting).

    Returns:
        One dict per sample, in input order: ``outputs`` (text per branch), ``output_ids``,
        ``finish_reasons`` (``"stop"``/``"length"``), ``num_generated_tokens`` and ``num_prompt_tokens``.

    Example:
        >>> model, tok = pmaccel.load_model()  # doctest: +SKIP
        >>> pmaccel.generate(model, tok, [{"main": "Name a colour.", "branches": ["A:", "B:"]}],
        ...                  max_new_tokens=8)[0]["outputs"]  # doctest: +SKIP
    """
    results: list[dict | None] = [None] * len(samples)
    for position, result in decode_stream(
            model, tokenizer, samples, max_new_tokens=max_new_tokens, mask=mask, temperature=temperature,
            top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, do_sample=do_sample, seed=seed,
            batch_size=batch_size, batch_by_samples=batch_by_samples, chat_template=chat_template,
            branch_stride=branch_stride, align=align, interleave_branches=interleave_branches,
            random_time_offset=random_time_offset, stop_token_ids=stop_token_ids, indices=indices,
            on_step=on_step, engine=engine, deterministic=deterministic):
        results[position] = result
    return results  # type: ignore[return-value]


def decode_stream(model: Any, tokenizer: Any, samples: Sequence[Mapping[str, Any]], *,
                  max_new_tokens: int = default("max_new_tokens"), mask: str | None = default("mask"),
                  temperature: float = default("temperature"), top_p: float = default("top_p"),
                  top_k: int = default("top_k"), repetition_penalty: float = default("repetition_penalty"),
                  do_sample: bool | None = None, batch_size: int | None = None,
                  batch_by_samples: bool = default("batch_by_samples"), stop_token_ids: Sequence[int] | None = None,
                  indices: Sequence[int] | None = None, on_step: Callable[[int, list[dict]], None] | None = None,
                  engine: Engine | None = None, deterministic: bool | None = default("deterministic"),
                  **layout: Any) -> Iterator[tuple[int, dict]]:
    """``generate``, yielding ``(position in samples, result)`` as each sample finishes (arguments as there;
    ``layout``: the ``pmaccel.request.Layout`` fields, ``seed`` among them)."""
    rope_2d, mask, indices = check_call(model, samples, mask=mask, batch_size=batch_size, indices=indices)
    unknown = sorted(set(layout) - set(LAYOUT_SETTINGS))
    if unknown:
        raise TypeError(f"decode_stream() got unexpected keyword arguments: {', '.join(unknown)}")
    lay = Layout.of(layout)
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
        stop_ids=stop_ids(model, tokenizer, stop_token_ids),
        greedy=greedy,
        sampling=(temperature, top_p, top_k, repetition_penalty),
        processors=make_processors(temperature, top_p, top_k, repetition_penalty, greedy),
        seed=lay.seed,
    )
    tokenized = [tokenize_request(s, tokenizer, lay, i) for i, s in zip(indices, samples)]
    vocab = model.get_input_embeddings().num_embeddings
    for i, ts in zip(indices, tokenized):
        ids = [*ts.branches, ts.main] if ts.main else ts.branches  # a branch has tokens; main may have none
        if not 0 <= min(map(min, ids)) <= max(map(max, ids)) < vocab:
            bad = next(int(t) for t in itertools.chain(ts.main, *ts.branches) if not 0 <= int(t) < vocab)
            raise PMAccelError(f"sample {i}: input_ids: token id {bad} is outside the model's vocabulary "
                               f"(0..{vocab - 1}); give ids of this model's tokenizer")
    # packed as the engine admits them (the next ones while the device runs its steps)
    packs = PackOnRead(tokenized, lambda pos, ts: pack_sample(ts, **lay.pack_kwargs(indices[pos])))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    own = engine is None
    if engine is None:
        engine = Engine(model, engine_config(batch_size, batch_by_samples, deterministic))
    try:
        for r in engine.run(packs, indices, opts, pad_id=pad_id, on_step=on_step):
            yield r.position, {
                "outputs": [tokenizer.decode(x, skip_special_tokens=True) for x in r.output_ids],
                "output_ids": r.output_ids,
                "finish_reasons": r.finish_reasons,
                "num_generated_tokens": [len(x) for x in r.output_ids],
                "num_prompt_tokens": packs[r.position].num_tokens,
            }
    finally:
        if own:
            engine.release()
