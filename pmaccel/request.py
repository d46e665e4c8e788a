"""The request front end: how a sample becomes the packed sequence a forward takes, written once for
``generate``, ``score``, ``--compare``, ``--leakage`` and the inspector.

    Layout            how a sample is laid out (chat template, branch stride, alignment, packing order,
                      seeded time offsets); ``Layout.of(settings)`` / ``Layout.of(kwargs)``
    pack_request      sample -> (TokenizedSample, PackedSample), as ``generate`` packs it
    tokenize_request  sample -> TokenizedSample, as ``pack_request`` tokenizes it (``generate`` packs later)
    sample_seed       the seed of sample ``index``: its time offsets and its sampling draws
    stop_ids          the model's EOS ids (else the tokenizer's) plus extra stop ids
    check_call        the checks ``generate`` and ``score_samples`` share (mask, batch size, indices)
    generate_kwargs   ``pmaccel.generate``'s keyword arguments from a run's ``Settings``
    score_kwargs      ``score_samples``' keyword arguments from a run's ``Settings``

Every default is the ``Settings`` field's (``pmaccel.settings.default``).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any

from pmaccel.errors import PMAccelError
from pmaccel.layout import ALIGNS, MASKS, PackedSample, pack_sample
from pmaccel.rope import is_rope_2d
from pmaccel.samples import TokenizedSample, tokenize_sample
from pmaccel.settings import default


def sample_seed(seed: int, index: int) -> int:
    """The RNG seed of sample ``index``: a fixed mix of (seed, index), whatever the batch or process.

    Example:
        >>> sample_seed(0, 3) == sample_seed(0, 3) != sample_seed(1, 3)
        True
    """
    return (seed * 0x9E3779B1 + index * 0x85EBCA77 + 0x165667B1) % (2**63 - 1)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a sample is laid out in its packed sequence (SPEC §2–§4).

    Args:
        chat_template: wrap main + branch in the tokenizer's chat template.
        branch_stride: ``bpos = branch_id * branch_stride``.
        align: ``"left"`` (branches start together) or ``"right"`` (they end together).
        interleave_branches: pack by (time, branch); ``False``: by (branch, time).
        random_time_offset: shift each branch's times by an amount drawn from ``sample_seed(seed, index)``.
        seed: that seed.

    Example:
        >>> Layout.of({"align": "right"}).align, Layout().branch_stride
        ('right', 128)
    """

    chat_template: bool = default("chat_template")
    branch_stride: int = default("branch_stride")
    align: str = default("align")
    interleave_branches: bool = default("interleave_branches")
    random_time_offset: bool = default("random_time_offset")
    seed: int = default("seed")

    def __post_init__(self) -> None:
        if self.align not in ALIGNS:
            raise PMAccelError(f"align must be one of {', '.join(ALIGNS)}, got {self.align!r}", field="align")

    @classmethod
    def of(cls, source: Any) -> Layout:
        """The layout fields of ``source``: a ``Settings`` (or any object with those attributes) or a mapping."""
        get = source.get if isinstance(source, Mapping) else lambda name, d: getattr(source, name, d)
        return cls(**{f.name: get(f.name, f.default) for f in dataclasses.fields(cls)})

    def time_offset_rng(self, index: int) -> random.Random | None:
        """The RNG of sample ``index``'s random time offsets (``None`` without them)."""
        return random.Random(sample_seed(self.seed, index)) if self.random_time_offset else None

    def pack_kwargs(self, index: int) -> dict[str, Any]:
        """The keyword arguments of ``pack_sample`` (and of scoring's packing) for sample ``index``."""
        return dict(branch_stride=self.branch_stride, align=self.align, interleave_branches=self.interleave_branches,
                    time_offset_rng=self.time_offset_rng(index))


def pack_request(sample: Mapping[str, Any], tokenizer: Any, layout: Layout,
                 index: int) -> tuple[TokenizedSample, PackedSample]:
    """Tokenize and pack sample ``index`` the way ``generate`` does (its prompt, before any output).

    Args:
        sample: ``{"main": ..., "branches": [...]}`` as ``generate`` takes it.
        tokenizer: the model's tokenizer.
        layout: the run's ``Layout``.
        index: the sample's global index (seeds its time offsets).

    Example:
        >>> ts, packed = pack_request({"main": "Hi", "branches": ["a", "b"]}, tokenizer, Layout(), 0)  # doctest: +SKIP
    """
    ts = tokenize_request(sample, tokenizer, layout, index)
    return ts, pack_sample(ts, **layout.pack_kwargs(index))


def tokenize_request(sample: Mapping[str, Any], tokenizer: Any, layout: Layout, index: int) -> TokenizedSample:
    """Tokenize sample ``index`` as ``pack_request`` does; an error names the sample."""
    try:
        return tokenize_sample(sample, tokenizer, chat_template=layout.chat_template)
    except PMAccelError as e:
        raise PMAccelError(f"sample {index}: {e}") from None


def stop_ids(model: Any, tokenizer: Any, extra: Sequence[int] | None = None) -> frozenset[int]:
    """EOS ids from the model's generation config (else the tokenizer's), plus ``extra`` stop ids."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return frozenset(int(i) for i in [*ids, *(extra or [])])


def check_call(model: Any, samples: Sequence, *, mask: str | None, batch_size: int | None,
               indices: Sequence[int] | None) -> tuple[bool, str, list[int]]:
    """Checks shared by ``generate`` and ``score_samples``. Returns (2D RoPE on, mask, indices)."""
    rope_2d = is_rope_2d(model)
    mask = mask or ("columnar" if rope_2d else "isolated")
    if mask not in MASKS:
        raise PMAccelError(f"unknown mask {mask!r}; use one of {', '.join(MASKS)}", field="mask")
    if batch_size is not None and batch_size < 1:
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


LAYOUT_SETTINGS = tuple(f.name for f in dataclasses.fields(Layout))
DECODE_SETTINGS = ("max_new_tokens", "mask", "temperature", "top_p", "top_k", "repetition_penalty",
                   "batch_by_samples", "deterministic")
SCORE_SETTINGS = ("mask", "batch_by_samples", "deterministic")


def generate_kwargs(settings: Any) -> dict[str, Any]:
    """The keyword arguments of ``pmaccel.generate`` that a run's ``Settings`` give (all but the batch size,
    the indices and the engine)."""
    return {name: getattr(settings, name) for name in LAYOUT_SETTINGS + DECODE_SETTINGS}


def score_kwargs(settings: Any) -> dict[str, Any]:
    """The keyword arguments of ``pmaccel.scoring.score_samples`` that a run's ``Settings`` give (all but the
    batch size and the indices)."""
    return {name: getattr(settings, name) for name in LAYOUT_SETTINGS + SCORE_SETTINGS}
