"""Choosing the next token: greedy, or one draw per (sample, branch, step) from a counter-based RNG.

Each draw's uniform number is a hash of ``(seed, sample index, branch id, step)``, so a branch's
tokens do not depend on which other samples share its batch, on the batch size, on the number of
processes, or on whether the decode loop runs eagerly or as a CUDA graph (no generator state).
The filtering itself (temperature, top-k, top-p, repetition penalty) is transformers' logits
processors; the draw is inverse-CDF sampling from the softmax of the filtered scores.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for x < 2**32, without int64 overflow: multiply 16-bit halves
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # murmur3's 32-bit finaliser
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniforms(seed: int, index: torch.Tensor, branch: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One uniform number in (0, 1) per element: a hash of (seed, index, branch, step). All [E] long."""
    h = _mix32(torch.full_like(index, (seed & _M32) ^ 0x9E3779B9))
    h = _mix32(h ^ _mix32(torch.full_like(index, (seed >> 32) & _M32)))
    for part in (index, branch, step):
        h = _mix32(h ^ _mix32(part + 0x632BE5AB))
    return (h.double() + 0.5) / 2.0**32


def make_processors(
    temperature: float, top_p: float, top_k: int, repetition_penalty: float, greedy: bool
) -> LogitsProcessorList:
    """transformers' processors for the settings: repetition penalty, then (sampling) temperature, top-k, top-p."""
    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if not greedy:
        procs.append(TemperatureLogitsWarper(temperature))
        if top_k and top_k > 0:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return procs


def draw(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling. scores: [E, V] filtered logits (-inf = excluded); u: [E] in (0, 1) -> ids [E]."""
    probs = torch.softmax(scores.float(), dim=-1)
    cdf = probs.cumsum(dim=-1)  # [E, V]
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)  # [E, 1]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=scores.shape[-1] - 1)
