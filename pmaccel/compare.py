"""The ``--compare`` and ``--leakage`` extras of ``infer``: how parallel decoding differs from one
question at a time, and how much the branches attend to each other.

    --compare   every sample is decoded twice: as configured, and as independent branches (isolated
                mask, 2D RoPE off, left alignment, no time offset: each branch is ``main + branch``
                alone). Per branch: exact agreement of the generated ids and the first generated
                token where they differ.
    --leakage   after decoding, one forward per sample over its final packed sequence (prompt and
                generated tokens) with attention probabilities (``pmaccel.attention.group_attention``).
                Per branch and layer: the mean, over the branch's tokens, of the attention mass
                (averaged over heads) they put on the tokens of OTHER branches (not main, not
                themselves). Exactly 0 under the isolated mask.

Dataset totals are sums over branches (and branch tokens), taken on the main process from the
de-duplicated results, so they do not depend on the number of processes::

    agreement         = agreeing branches / branches
    leakage[layer]    = sum over branches of leakage[b][layer] * tokens[b] / sum of tokens[b]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from pmaccel.output import FLAT_KEYS, PARALLEL_KEYS, RESULT_KEYS

COMPARE_KEYS = ("agree", "first_divergence", "reference_outputs")  # per branch, in a result / parallel row
COMPARE_FLAT_KEYS = ("agree", "first_divergence", "reference_output")  # in a flat row
LEAKAGE_KEYS = ("leakage", "leakage_tokens")  # per branch: [per layer] and the branch's token count


def record_keys(settings: Any) -> tuple[list[str], list[str], list[str]]:
    """The result keys an ``infer`` run writes, and their names in parallel and in flat rows."""
    keys, parallel, flat = list(RESULT_KEYS), list(PARALLEL_KEYS), list(FLAT_KEYS)
    if settings.compare:
        keys, parallel, flat = keys + list(COMPARE_KEYS), parallel + list(COMPARE_KEYS), flat + list(COMPARE_FLAT_KEYS)
    if settings.leakage:
        keys, parallel, flat = keys + list(LEAKAGE_KEYS), parallel + list(LEAKAGE_KEYS), flat + list(LEAKAGE_KEYS)
    return keys, parallel, flat


# ----------------------------------------------------------------------------- compare


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The index of the first generated token where ``a`` and ``b`` differ (the shorter length when one
    is a prefix of the other), or ``None`` when they are equal.

    Example:
        >>> first_divergence([5, 6, 7], [5, 6, 9]), first_divergence([5, 6], [5, 6, 7]), first_divergence([1], [1])
        (2, 2, None)
    """
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@contextlib.contextmanager
def rope_2d_off(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with the model's own rotary modules in place of the 2D RoPE wrappers, then put
    the wrappers back (a model without 2D RoPE is left as it is)."""
    from pmaccel.rope import Rope2D

    swapped = [(name, m) for name, m in model.named_modules() if isinstance(m, Rope2D)]
    for name, wrapper in swapped:
        _set_module(model, name, wrapper.rotary)
    try:
        yield
    finally:
        for name, wrapper in swapped:
            _set_module(model, name, wrapper)


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def add_reference(compact: list[dict], results: list[dict], model: Any, tokenizer: Any,
                  inputs: list[Mapping[str, Any]], **generate_kwargs: Any) -> None:
    """Decode ``inputs`` again as independent branches and add ``agree``, ``first_divergence`` and
    ``reference_outputs`` (per branch) to each compact result, in place.

    Args:
        compact: the results to extend (one per sample).
        results: the full ``generate`` results of the configured run (with ``output_ids``).
        model: the model; 2D RoPE, if any, is switched off for the reference only.
        tokenizer: its tokenizer.
        inputs: the samples, as ``generate`` took them.
        **generate_kwargs: the configured run's ``generate`` arguments (``indices``, sampling, ...);
            mask, alignment and the time offset are overridden.
    """
    from pmaccel import decode

    kwargs = {**generate_kwargs, "mask": "isolated", "align": "left", "random_time_offset": False}
    with rope_2d_off(model):
        reference = decode.generate(model, tokenizer, inputs, **kwargs)
    for out, mine, ref in zip(compact, results, reference):
        where = [first_divergence(a, b) for a, b in zip(mine["output_ids"], ref["output_ids"])]
        out.update(agree=[w is None for w in where], first_divergence=where, reference_outputs=ref["outputs"])


# ----------------------------------------------------------------------------- leakage


def branch_leakage(model: Any, packed: Any, *, mask: str | None = None,
                   rope_2d: bool | None = None) -> tuple[list[list[float]], list[int]]:
    """Per given branch: per layer, the mean over its tokens of the attention mass on other branches.

    Args:
        model: the model (switched to eager attention for the forward).
        packed: the sample's final packed sequence (``append_outputs(pack_sample(...), output_ids)``).
        mask: ``"columnar"`` or ``"isolated"``; default as ``generate``.
        rope_2d: default: whether the model was patched.

    Returns:
        ``(leakage, tokens)``: ``leakage[k][layer]`` for the k-th given branch, and its token count.
    """
    from pmaccel.attention import group_attention, token_groups

    ga = group_attention(model, packed, mask=mask, rope_2d=rope_2d)  # per_layer: [L, G, G]
    groups, group_ids = token_groups(packed)
    counts = torch.bincount(groups, minlength=len(group_ids))  # [G]
    leakage, tokens = [], []
    for branch_id in packed.branch_ids:
        g = group_ids.index(branch_id)
        others = torch.ones(len(group_ids), dtype=torch.bool)
        others[g] = False
        if ga.has_main:
            others[0] = False
        leakage.append(ga.per_layer[:, g, others].sum(dim=-1).tolist())  # [L]
        tokens.append(int(counts[g]))
    return leakage, tokens


def add_leakage(compact: list[dict], results: list[dict], model: Any, tokenizer: Any,
                inputs: list[Mapping[str, Any]], indices: Sequence[int], settings: Any) -> None:
    """Add ``leakage`` and ``leakage_tokens`` (per branch) to each compact result, in place: one forward
    per sample over its final packed sequence, laid out as ``generate`` laid it out."""
    from pmaccel.layout import append_outputs
    from pmaccel.request import Layout, pack_request

    layout = Layout.of(settings)
    for out, result, sample, index in zip(compact, results, inputs, indices):
        _, packed = pack_request(sample, tokenizer, layout, index)
        leakage, tokens = branch_leakage(model, append_outputs(packed, result["output_ids"]), mask=settings.mask)
        out.update(leakage=leakage, leakage_tokens=tokens)


# ----------------------------------------------------------------------------- dataset totals


def totals(results: Sequence[Mapping[str, Any]], settings: Any) -> tuple[dict[str, Any], list[str]]:
    """Dataset totals of ``--compare`` / ``--leakage`` from every sample's result, and the same in words."""
    out: dict[str, Any] = {}
    notes: list[str] = []
    if settings.compare:
        out["compare"] = compare_totals(results)
        c = out["compare"]
        notes.append(f"compare: {c['agree']}/{c['branches']} branches agree with independent decoding "
                     f"({100 * c['agreement']:.1f}%)" + (
                         f"; the others diverge at generated token {c['mean_first_divergence']:.1f} on average"
                         if c["diverged"] else ""))
    if settings.leakage:
        out["leakage"] = leakage_totals(results)
        per_layer = out["leakage"]["per_layer"]
        notes.append(f"leakage (attention mass of branch tokens on other branches), mean over layers "
                     f"{out['leakage']['mean']:.4f}; per layer: " + " ".join(f"{x:.4f}" for x in per_layer))
    return out, notes


def compare_totals(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``branches``, ``agree``, ``agreement``, ``diverged``, ``mean_first_divergence`` (over diverged)."""
    agree = [a for r in results for a in r["agree"]]
    where = [w for r in results for w in r["first_divergence"] if w is not None]
    return {"branches": len(agree), "agree": sum(agree), "agreement": sum(agree) / len(agree) if agree else 1.0,
            "diverged": len(where), "mean_first_divergence": sum(where) / len(where) if where else None}


def leakage_totals(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``per_layer`` (token-weighted over every branch token of the dataset), ``mean`` over layers, ``tokens``."""
    num_layers = next((len(x) for r in results for x in r["leakage"]), 0)
    sums, tokens = [0.0] * num_layers, 0
    for r in results:
        for per_layer, n in zip(r["leakage"], r["leakage_tokens"]):
            tokens += n
            for layer, value in enumerate(per_layer):
                sums[layer] += value * n
    per_layer = [s / tokens if tokens else 0.0 for s in sums]
    return {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer) if per_layer else 0.0, "tokens": tokens}
