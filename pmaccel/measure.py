"""Measurements of parallel decoding: how it differs from one question at a time, and where attention
goes between the branches. The ``--compare`` / ``--leakage`` extras of ``infer`` and the inspector's
attention view.

    --compare   every sample is decoded twice: as configured, and as independent branches (isolated
                mask, 2D RoPE off, left alignment, no time offset: each branch is ``main + branch``
                alone). Per branch: exact agreement of the generated ids and the first generated
                token where they differ.
    --leakage   after decoding, one forward per sample over its final packed sequence (prompt and
                generated tokens) with attention probabilities (``group_attention``). Per branch and
                layer: the mean, over the branch's tokens, of the attention mass (averaged over heads)
                they put on the tokens of OTHER branches (not main, not themselves). Exactly 0 under
                the isolated mask.

Dataset totals are sums over branches (and branch tokens), taken on the main process from the
de-duplicated results, so they do not depend on the number of processes::

    agreement         = agreeing branches / branches
    leakage[layer]    = sum over branches of leakage[b][layer] * tokens[b] / sum of tokens[b]

``group_attention``: the columnar mask (SPEC §3) lets a branch see the earlier tokens of *every*
branch; this measures how much the model uses that. One forward over a sample's final packed sequence
(``pmaccel.layout.append_outputs``) with the same mask and positions as decoding, eager attention,
``output_attentions=True``; then, per layer::

    P      [H, N, N]   attention probabilities (a query's row sums to 1)
    p      [N, N]      averaged over heads
    onto   [N, G]      p summed over the keys of each group        (G = main? + branches)
    M      [G, G]      onto averaged over the queries of each group

Row g of ``M`` is the average attention distribution of group g's tokens over the groups; it sums to
1. A token's attention to itself counts toward its own group (the diagonal). Under the isolated mask a
branch's row is exactly 0 outside main and itself; main's row is ``[1, 0, ..., 0]`` under both masks
(main tokens come before every branch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pmaccel.errors import PMAccelError
from pmaccel.layout import MASKS, PackedSample, TokenMeta, additive_mask, allowed, stack_positions
from pmaccel.output import FLAT_KEYS, PARALLEL_KEYS, RESULT_KEYS
from pmaccel.rope import is_rope_2d
from pmaccel.run import Totals

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


class MeasureTotals(Totals):
    """The dataset totals of ``--compare`` / ``--leakage``, summed a result at a time in index order."""

    def __init__(self, settings: Any):
        self.compare, self.leakage = settings.compare, settings.leakage
        self.branches = self.agree = self.diverged = self.divergence_sum = 0  # --compare
        self.layer_sums: list[float] = []  # --leakage: per layer, sum of leakage * tokens
        self.leakage_tokens = 0

    def add(self, sample: Any, rows: Mapping[int, Any], result: Mapping[str, Any]) -> None:
        if self.compare:
            self.branches += len(result["agree"])
            self.agree += sum(result["agree"])
            where = [w for w in result["first_divergence"] if w is not None]
            self.diverged += len(where)
            self.divergence_sum += sum(where)
        if self.leakage:
            for per_layer, n in zip(result["leakage"], result["leakage_tokens"]):
                if not self.layer_sums:
                    self.layer_sums = [0.0] * len(per_layer)
                self.leakage_tokens += n
                for layer, value in enumerate(per_layer):
                    self.layer_sums[layer] += value * n

    def summary(self) -> tuple[dict[str, Any], list[str]]:
        out: dict[str, Any] = {}
        notes: list[str] = []
        if self.compare:
            c = out["compare"] = {
                "branches": self.branches, "agree": self.agree,
                "agreement": self.agree / self.branches if self.branches else 1.0, "diverged": self.diverged,
                "mean_first_divergence": self.divergence_sum / self.diverged if self.diverged else None}
            notes.append(f"compare: {c['agree']}/{c['branches']} branches agree with independent decoding "
                         f"({100 * c['agreement']:.1f}%)" + (
                             f"; the others diverge at generated token {c['mean_first_divergence']:.1f} on average"
                             if c["diverged"] else ""))
        if self.leakage:
            tokens = self.leakage_tokens
            per_layer = [s / tokens if tokens else 0.0 for s in self.layer_sums]
            out["leakage"] = {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer) if per_layer else 0.0,
                              "tokens": tokens}
            notes.append(f"leakage (attention mass of branch tokens on other branches), mean over layers "
                         f"{out['leakage']['mean']:.4f}; per layer: " + " ".join(f"{x:.4f}" for x in per_layer))
        return out, notes


# ----------------------------------------------------------------------------- attention mass between groups


@dataclass
class GroupAttention:
    """Attention mass between the groups (main, then each branch) of one sample.

    Attributes:
        per_layer: [L, G, G]; ``per_layer[l, g, h]`` = the mean, over the tokens of group g, of the
            attention (averaged over heads) they put on the tokens of group h in layer l.
        branch_ids: the branch id of each group (main is 0 when present).
        labels: ``"main"``, ``"branch 1"``, ... (the given branches are numbered from 1).
        has_main: whether group 0 is main.
        mask: the mask of the forward.
    """

    per_layer: torch.Tensor
    branch_ids: list[int]
    labels: list[str]
    has_main: bool
    mask: str

    @property
    def num_layers(self) -> int:
        return int(self.per_layer.shape[0])

    def matrix(self, layer: int | None = None) -> torch.Tensor:
        """[G, G] for one layer, or averaged over the layers when ``layer`` is None (rows still sum to 1)."""
        if layer is None:
            return self.per_layer.mean(dim=0)
        if not -self.num_layers <= layer < self.num_layers:
            raise PMAccelError(f"layer must be in 0..{self.num_layers - 1}, got {layer}", field="layer")
        return self.per_layer[layer]


def token_groups(packed: PackedSample) -> tuple[torch.Tensor, list[int]]:
    """The group index of every token ([N], main = 0 when present) and the branch id of every group."""
    group_ids = sorted(set(packed.branch.tolist()))
    index = {b: g for g, b in enumerate(group_ids)}
    return torch.tensor([index[b] for b in packed.branch.tolist()], dtype=torch.long), group_ids


def sample_mask(packed: PackedSample, mask: str) -> torch.Tensor:
    """Which tokens each token may attend to, [N, N] bool (query rows, key columns), in packed order."""
    meta = _meta(packed)
    n = packed.num_tokens
    return allowed(meta, meta, torch.arange(n)[None], mask)[0]


def group_attention(
    model: Any,
    packed: PackedSample,
    *,
    mask: str | None = None,
    rope_2d: bool | None = None,
) -> GroupAttention:
    """Measure the attention mass between main and the branches of one sample (one forward, no cache).

    The model runs with eager attention for this call (sdpa and flash kernels do not return
    probabilities); its attention implementation is restored afterwards.

    Args:
        model: a causal LM from ``pmaccel.load_model`` (patched for 2D RoPE or not).
        packed: the final packed sequence, ``append_outputs(pack_sample(ts, ...), output_ids)``
            (the prompt alone works too).
        mask: ``"columnar"`` or ``"isolated"``; default columnar with 2D RoPE, isolated without.
        rope_2d: positions as (pos1d, bpos, time); default: whether the model was patched.

    Returns:
        A ``GroupAttention``; ``.matrix(layer)`` is the [G, G] heatmap, rows summing to 1.

    Example:
        >>> ts = tokenize_sample({"main": "Q:", "branches": ["a", "b"]}, tokenizer)  # doctest: +SKIP
        >>> packed = append_outputs(pack_sample(ts), result["output_ids"])  # doctest: +SKIP
        >>> group_attention(model, packed, mask="columnar").matrix()  # doctest: +SKIP
        tensor([[1.0000, 0.0000, 0.0000], [0.7000, 0.2600, 0.0400], [0.6800, 0.0300, 0.2900]])
    """
    rope_2d = is_rope_2d(model) if rope_2d is None else rope_2d
    mask = mask or ("columnar" if rope_2d else "isolated")
    if mask not in MASKS:
        raise PMAccelError(f"unknown mask {mask!r}; use one of {', '.join(MASKS)}", field="mask")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = packed.num_tokens
    meta = _meta(packed)
    attn_mask = additive_mask(allowed(meta, meta, torch.arange(n)[None], mask), dtype)  # [1, 1, N, N]
    positions = stack_positions(packed.pos1d, packed.bpos, packed.time, rope_2d)[None]  # [1, N(, 3)]

    with _eager_attention(model), torch.inference_mode():
        out = model(
            input_ids=packed.input_ids[None].to(device),
            attention_mask=attn_mask.to(device),
            position_ids=positions.to(device),
            output_attentions=True,
            use_cache=False,
            logits_to_keep=1,  # the logits are not needed
        )
    if not out.attentions or any(a is None for a in out.attentions):
        raise PMAccelError(f"{type(model).__name__} returned no attention probabilities", field="model")

    groups, branch_ids = token_groups(packed)
    onehot = torch.nn.functional.one_hot(groups, len(branch_ids)).float()  # [N, G]
    counts = onehot.sum(dim=0)  # [G]
    per_layer = []
    for probs in out.attentions:  # [1, H, N, N] per layer
        p = probs[0].float().mean(dim=0).cpu()  # [N, N]
        onto = p @ onehot  # [N, G]: each query's mass on each group
        per_layer.append((onehot.T @ onto) / counts[:, None])  # [G, G]
    has_main = bool(packed.is_main.any())
    labels = ["main" if has_main and g == 0 else f"branch {g + (0 if has_main else 1)}" for g in range(len(branch_ids))]
    return GroupAttention(torch.stack(per_layer), branch_ids, labels, has_main, mask)


def _meta(packed: PackedSample) -> TokenMeta:  # [1, N] each
    return TokenMeta(time=packed.time[None], branch=packed.branch[None], is_main=packed.is_main[None],
                     valid=torch.ones(1, packed.num_tokens, dtype=torch.bool))


@contextlib.contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """Switch the model to eager attention for the block, then back (PEFT wrappers are looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(base.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    try:
        base.set_attn_implementation("eager")
    except (ValueError, AttributeError) as e:
        raise PMAccelError(f"cannot switch {type(base).__name__} to eager attention ({e}); load the model "
                           "with attn_implementation='eager'", field="attn_implementation") from None
    try:
        yield
    finally:
        base.set_attn_implementation(before)
