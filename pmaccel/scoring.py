"""Teacher-forced scoring under the packed layout: log-likelihood, perplexity, multiple choice.

``pmaccel.score(...)`` / ``pmaccel score [flags]`` run like ``infer`` (same settings, launchers,
distribution, resume and ordered JSONL output) but, instead of decoding, score given continuations
(*targets*) with ONE forward per micro-batch of packed samples, under the chosen mask and RoPE.

What is scored, per branch (SPEC §1 rows, plus):

    {"text": prompt, "target": str | [ids]}   the target continues the branch's prompt (may be "")
    {"text": t, "answer_offset": c}           ParallelMind's training field: a CHARACTER offset into t;
                                              t[:c] is the prompt and t[c:] the target, each tokenized
                                              on its own (never t re-tokenized as a whole)
    "text" / {"text": t} / {"input_ids": ids} no target: the whole branch is the target, given main
    flat rows                                 the same keys on the row: {"text"/"prompt", "target"}

A row ``{"main": question, "branches": [choice, ...], "label": k}`` is multiple choice: every choice
is a branch whose target is the choice (no prompt of its own), all in ONE sample, so the question
is computed once; the predicted choice has the highest summed log-prob (``length_normalize``: the
highest mean per token).

Layout: a branch's prompt then its target tokens are that branch's tokens (the target continues the
branch's times); the logits at a branch token score the branch's next token, and the first target
token of a branch with no prompt is scored from main's last token::

    main "Q ?", branch 1 target "x y", branch 2 prompt "p", target "z"

    time      0   1   2   3
    main      Q   ?
    branch 1          x   y        x scored from "?", y from x
    branch 2          p   z        z scored from p (p itself is not scored)

Under the isolated mask with 2D RoPE off a branch's score is exactly that of ``main + prompt +
target`` alone; under columnar a target token also sees the earlier tokens of the other branches.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from pmaccel.errors import PMAccelError
from pmaccel.grouping import Sample
from pmaccel.rows import Row
from pmaccel.run import Job, Records, Totals, run_job, run_settings
from pmaccel.samples import ScoreTokens, tokenize_for_scoring
from pmaccel.settings import Settings, default

SCORE_KEYS = ("logprobs", "num_target_tokens", "nlls")  # per branch, in a result / parallel row
SCORE_FLAT_KEYS = ("logprob", "num_target_tokens", "nll")  # in a flat row
SCORE_BATCH_SIZE = 16  # samples per scoring forward when --batch_size is automatic (0)
DECODING_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "compare", "leakage")


def mc_path() -> Path:
    """The small multiple-choice set shipped with pmaccel: the data of ``pmaccel score`` without ``data_path``."""
    return Path(__file__).parent / "data" / "mc_easy.jsonl"


# ----------------------------------------------------------------------------- layout


@dataclass
class ScoredPack:
    """A packed sample and, per branch, where its target tokens are and which positions score them."""

    packed: Any  # pmaccel.layout.PackedSample
    targets: list[list[int]]  # per branch: the target ids
    scored_from: list[list[int]]  # per branch: packed index of the token whose logits score each target token


def pack_for_scoring(st: ScoreTokens, *, branch_stride: int = default("branch_stride"), align: str = default("align"),
                     interleave_branches: bool = default("interleave_branches"),
                     time_offset_rng: random.Random | None = None) -> ScoredPack:
    """Lay out main and each branch's prompt + target as one packed sample (SPEC §2) and find, for every
    target token, the packed index of its predecessor in the branch (main's last token for the first
    target token of a branch with no prompt)."""
    from pmaccel.layout import pack_sample
    from pmaccel.samples import TokenizedSample

    packed = pack_sample(TokenizedSample(main=st.main, branches=[p + t for p, t in zip(st.prompts, st.targets)]),
                         branch_stride=branch_stride, align=align, interleave_branches=interleave_branches,
                         time_offset_rng=time_offset_rng)
    main_last = int(packed.is_main.nonzero()[-1]) if st.main else -1
    scored_from = []
    for branch_id, prompt, target in zip(packed.branch_ids, st.prompts, st.targets):
        mine = (packed.branch == branch_id).nonzero().flatten().tolist()  # the branch's tokens, in time order
        before = mine[len(prompt) - 1] if prompt else main_last
        scored_from.append([before] + mine[len(prompt):len(prompt) + len(target) - 1])
    return ScoredPack(packed=packed, targets=[list(t) for t in st.targets], scored_from=scored_from)


# ----------------------------------------------------------------------------- one forward per micro-batch


def target_logprobs(model: Any, packs: list[ScoredPack], *, mask: str, rope_2d: bool,
                    pad_id: int = 0, deterministic: bool | None = None) -> list[list[list[float]]]:
    """Log-probabilities of every target token of a few packed samples, from ONE forward (no cache);
    ``deterministic``: with the batch-invariant kernels on CUDA (``pmaccel.invariant``).

    Returns:
        ``[sample][branch][token]`` log-probs (float32 log-softmax of the logits).
    """
    import torch

    from pmaccel.forward import ModelCall
    from pmaccel.invariant import invariant_mode
    from pmaccel.layout import TokenMeta, collate

    batch = collate([p.packed for p in packs], pad_id)
    device = next(model.parameters()).device
    meta = TokenMeta(*(t.to(device) for t in batch.meta.astuple()))
    n = batch.input_ids.shape[1]
    rows = [b for b, p in enumerate(packs) for cols in p.scored_from for _ in cols]
    cols = [c for p in packs for cs in p.scored_from for c in cs]
    ids = [t for p in packs for ts in p.targets for t in ts]
    keep = sorted(set(cols))  # only the logits that score something: [B, K, V]
    where = {c: i for i, c in enumerate(keep)}
    with torch.inference_mode(), invariant_mode(model, deterministic):
        logits = ModelCall.of(model, mask)(batch.input_ids.to(device), batch.positions(rope_2d).to(device), meta,
                                           meta, torch.arange(n, device=device).expand(len(packs), n), None,
                                           keep=torch.tensor(keep, device=device))
        picked = logits[torch.tensor(rows, device=device), torch.tensor([where[c] for c in cols], device=device)]
        lp = torch.log_softmax(picked.float(), dim=-1)  # [E, V]
        flat = lp.gather(-1, torch.tensor(ids, device=device)[:, None])[:, 0].cpu().tolist()  # [E]
    out, i = [], 0
    for p in packs:
        per_branch = []
        for ts in p.targets:
            per_branch.append(flat[i:i + len(ts)])
            i += len(ts)
        out.append(per_branch)
    return out


def score_samples(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Mapping[str, Any]],
    *,
    mask: str | None = default("mask"),
    batch_size: int = SCORE_BATCH_SIZE,
    batch_by_samples: bool = default("batch_by_samples"),
    chat_template: bool = default("chat_template"),
    branch_stride: int = default("branch_stride"),
    align: str = default("align"),
    interleave_branches: bool = default("interleave_branches"),
    random_time_offset: bool = default("random_time_offset"),
    seed: int = default("seed"),
    indices: Sequence[int] | None = None,
    deterministic: bool | None = default("deterministic"),
) -> list[dict]:
    """Teacher-forced log-likelihood of each branch's target under the packed layout.

    Args:
        model: a causal LM from ``pmaccel.load_model`` (2D RoPE is used when the model was patched).
        tokenizer: its tokenizer.
        samples: ``[{"main": str, "branches": [...]}, ...]``, branches as in the module docstring.
        mask: ``"columnar"`` or ``"isolated"``; default columnar with 2D RoPE, isolated without.
        batch_size: samples per forward (``batch_by_samples``), else the most branches per forward.
        batch_by_samples: how ``batch_size`` counts.
        chat_template: wrap main + prompt in the tokenizer's chat template (see ``tokenize_for_scoring``).
        branch_stride: ``bpos = branch_id * branch_stride``.
        align: ``"left"`` or ``"right"``.
        interleave_branches: packed order by (time, branch); ``False``: by (branch, time).
        random_time_offset: shift each branch's times by a seeded random amount (as ``generate``).
        seed: seeds the time offsets, per sample index.
        indices: the global index of each sample; default ``range(len(samples))``.
        deterministic: batch-invariant kernels on CUDA: each sample's scores are the same whatever the
            batch, its companions or the process count; ``None``: on where Triton is available.

    Returns:
        One dict per sample, in input order, per branch: ``logprobs`` (summed log-prob of the target),
        ``num_target_tokens``, ``nlls`` (mean negative log-likelihood per token) and
        ``token_logprobs``; plus ``num_tokens`` (the packed sample's length).

    Example:
        >>> model, tok = pmaccel.load_model()  # doctest: +SKIP
        >>> score_samples(model, tok, [{"main": "The capital of France is",
        ...                             "branches": [" Paris", " Rome"]}])[0]["logprobs"]  # doctest: +SKIP
        [-1.9, -7.4]
    """
    from pmaccel.distribute import batch_end
    from pmaccel.request import Layout, check_call

    rope_2d, mask, indices = check_call(model, samples, mask=mask, batch_size=batch_size, indices=indices)
    layout = Layout(chat_template=chat_template, branch_stride=branch_stride, align=align,
                    interleave_branches=interleave_branches, random_time_offset=random_time_offset, seed=seed)
    packs = []
    for i, s in zip(indices, samples):
        try:
            st = tokenize_for_scoring(s, tokenizer, chat_template=chat_template)
        except PMAccelError as e:
            raise PMAccelError(f"sample {i}: {e}") from None
        packs.append(pack_for_scoring(st, **layout.pack_kwargs(i)))

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(packs)), key=lambda i: packs[i].packed.num_tokens)  # less padding per batch
    sizes = [len(packs[i].targets) for i in order]
    results: list[dict | None] = [None] * len(packs)
    start = 0
    while start < len(order):
        end = batch_end(sizes, start, batch_size, batch_by_samples)
        mb = order[start:end]
        for i, per_branch in zip(mb, target_logprobs(model, [packs[i] for i in mb], mask=mask, rope_2d=rope_2d,
                                                     pad_id=pad_id, deterministic=deterministic)):
            results[i] = _result(per_branch, packs[i].packed.num_tokens)
        start = end
    return results  # type: ignore[return-value]


def _result(per_branch: list[list[float]], num_tokens: int) -> dict:
    sums = [math.fsum(x) for x in per_branch]
    counts = [len(x) for x in per_branch]
    return {"logprobs": sums, "num_target_tokens": counts, "nlls": [-s / n for s, n in zip(sums, counts)],
            "token_logprobs": per_branch, "num_tokens": num_tokens}


# ----------------------------------------------------------------------------- multiple choice


def label_of(row: Row) -> int | None:
    """A multiple-choice row's ``label`` (index of the right choice), checked; ``None`` for other rows.

    Raises:
        PMAccelError: a label that is not an index into the row's branches.
    """
    label = row.fields.get("label")
    if row.flat or label is None:
        return None
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(row.branches):
        raise PMAccelError(f"label must be the index of the right choice, 0..{len(row.branches) - 1}, "
                           f"got {label!r}", field="label")
    return label


def predict(logprobs: Sequence[float], counts: Sequence[int], length_normalize: bool = False) -> int:
    """The chosen choice: highest summed log-prob, or highest mean per token (the first on a tie)."""
    values = [lp / n for lp, n in zip(logprobs, counts)] if length_normalize else list(logprobs)
    return max(range(len(values)), key=values.__getitem__)


# ----------------------------------------------------------------------------- the job


class ScoreJob(Job):
    """``pmaccel score``: scoring instead of decoding; the rest of the ``infer`` pipeline is shared."""

    name = "pmaccel score"
    kind = "score"
    ignore = DECODING_SETTINGS
    invariant_on_cpu = False  # scores in fp32 on the CPU agree to ~1e-7 relative across batch sizes, not to the bit

    def check(self, settings: Settings) -> None:
        for name in ("compare", "leakage"):
            if getattr(settings, name):
                raise PMAccelError(f"--{name} belongs to pmaccel (inference), not to pmaccel score; drop it",
                                   field=name)

    def data_path(self, settings: Settings) -> str | None:
        return settings.data_path or str(mc_path())

    def counter(self, tokenizer: Any, settings: Settings) -> Callable[[Row], int]:
        def count(row: Row) -> int:
            label_of(row)
            sample = {"main": row.main, "branches": row.branches}
            return tokenize_for_scoring(sample, tokenizer, chat_template=settings.chat_template).num_tokens

        return count

    def run_samples(self, settings: Settings, model: Any, tokenizer: Any, samples: list[Sample],
                    on_results: Callable[[list[tuple[int, dict]]], None]) -> dict[str, float]:
        """Score the samples batch by batch (one forward each; an OOM halves the batch)."""
        from pmaccel.distribute import run_batches
        from pmaccel.request import score_kwargs

        def run_batch(start: int, end: int, batch_size: int) -> list[dict]:
            batch = samples[start:end]
            results = score_samples(model, tokenizer, [s.as_input() for s in batch], indices=[s.index for s in batch],
                                    batch_size=batch_size, **score_kwargs(settings))
            return [{"logprobs": r["logprobs"], "num_target_tokens": r["num_target_tokens"]} for r in results]

        run_batches([len(s.branches) for s in samples], run_batch,
                    lambda start, end, results: on_results(list(zip(range(start, end), results))),
                    batch_size=settings.batch_size or SCORE_BATCH_SIZE, by_samples=settings.batch_by_samples)
        return {}

    def tokens(self, result: dict) -> int:
        return sum(result["num_target_tokens"])

    def records(self, sample: Sample, rows: Sequence[Row], result: dict,
                settings: Settings) -> list[tuple[int, dict]]:
        from pmaccel.output import row_records

        full = {**result, "nlls": [-lp / n for lp, n in zip(result["logprobs"], result["num_target_tokens"])]}
        records = row_records(sample, rows, full, keys=SCORE_KEYS, parallel_keys=SCORE_KEYS,
                              flat_keys=SCORE_FLAT_KEYS)
        for pos, record in records:
            label = label_of(rows[pos])
            if label is not None:
                choice = predict(result["logprobs"], result["num_target_tokens"], settings.length_normalize)
                record.update(prediction=choice, correct=choice == label)
        return records

    def totals(self, settings: Settings) -> ScoreTotals:
        return ScoreTotals(settings.length_normalize)


class ExactSum:
    """``math.fsum``, taken a value at a time: a finite float is a whole multiple of 2**-1074, so the sum is
    kept exactly as that multiple and rounded once, as ``fsum`` rounds (the same float, whatever the order).
    Infinities carry through; both signs of them give NaN (where ``fsum`` raises)."""

    def __init__(self) -> None:
        self.units = 0  # the sum of the finite values, in 2**-1074
        self.other = 0.0  # the sum of the infinities and NaNs

    def add(self, x: float) -> None:
        if not math.isfinite(x):
            self.other += x
            return
        n, d = x.as_integer_ratio()  # d = 2**k, k <= 1074
        self.units += n << (1075 - d.bit_length())

    def value(self) -> float:
        if self.other != 0.0:  # an infinity, or NaN (never equal to anything)
            return self.other
        return float(Fraction(self.units, 1 << 1074))


class ScoreTotals(Totals):
    """Dataset totals of a score run, a result at a time in index order.

    ``perplexity = exp(-sum of log-probs / sum of target tokens)`` over the branches of rows scored for
    their targets (multiple-choice rows are left out: their wrong choices are no target; a file of
    multiple-choice rows only has no perplexity); multiple choice: ``accuracy = correct rows / labelled
    rows`` and ``chance`` = the mean of 1 / choices over those rows.
    """

    def __init__(self, length_normalize: bool = False):
        self.length_normalize = length_normalize
        self.logprob, self.tokens, self.branches = ExactSum(), 0, 0  # rows scored for their targets
        self.labelled = self.correct = 0  # multiple-choice rows
        self.chance = 0.0

    def add(self, sample: Sample, rows: Mapping[int, Row], result: Mapping[str, Any]) -> None:
        label = None if sample.flat else label_of(rows[sample.rows[0]])
        if label is None:
            for lp in result["logprobs"]:
                self.logprob.add(lp)
            self.tokens += sum(result["num_target_tokens"])
            self.branches += len(result["logprobs"])
        else:
            self.labelled += 1
            self.correct += predict(result["logprobs"], result["num_target_tokens"], self.length_normalize) == label
            self.chance += 1 / len(result["logprobs"])

    def summary(self) -> tuple[dict[str, Any], list[str]]:
        tokens, labelled, correct = self.tokens, self.labelled, self.correct
        totals: dict[str, Any] = {"branches": self.branches, "tokens": tokens}
        notes = []
        if tokens:
            logprob = self.logprob.value()
            nll = -logprob / tokens
            totals.update(logprob=logprob, nll=nll, perplexity=math.exp(nll))
            notes.append(f"log-likelihood: {tokens} target tokens in {totals['branches']} branches, sum log-prob "
                         f"{logprob:.4f}, mean NLL {nll:.4f}, perplexity {totals['perplexity']:.4f}")
        if labelled:
            mc = {"rows": labelled, "correct": correct, "accuracy": correct / labelled,
                  "chance": self.chance / labelled, "length_normalize": self.length_normalize}
            totals["multiple_choice"] = mc
            notes.append(f"multiple choice: accuracy {mc['accuracy']:.3f} ({correct}/{labelled} rows; chance "
                         f"{mc['chance']:.3f}; by {'mean' if self.length_normalize else 'summed'} log-prob)")
        return totals, notes


def score(settings: Settings | None = None, /, **kwargs: Any) -> Records | None:
    """Score the rows of a data file and write one JSONL line per input row, in input order.

    Runs exactly like ``pmaccel.infer`` (plain Python, ``accelerate launch``, ``notebook_launcher``;
    part files and resume), with one forward per micro-batch instead of decoding. Each parallel row
    gets ``logprobs``, ``num_target_tokens`` and ``nlls`` (per branch), a flat row ``logprob``,
    ``num_target_tokens`` and ``nll``; a multiple-choice row (``label``) also ``prediction`` and
    ``correct``. Dataset totals (perplexity, accuracy) go to the summary and ``<out_path>.summary.json``.

    Args:
        settings: a ``Settings``; keyword arguments override its fields.
        **kwargs: any ``Settings`` field; the decoding ones (``max_new_tokens``, ``temperature``, ...)
            are not used. Without ``data_path``: the shipped easy multiple-choice set.

    Returns:
        On the main process, the records written (``records.summary.totals`` holds the totals); on
        the other processes ``None``.

    Raises:
        PMAccelError: a bad setting or input row (file, row and field in the message); in processes
            forked by ``notebook_launcher`` / ``debug_launcher``, one line and ``SystemExit(2)`` (as
            ``infer``).

    Example:
        >>> records = pmaccel.score(data_path="heldout.jsonl", out_path="scores.jsonl")  # doctest: +SKIP
        >>> records.summary.totals["perplexity"]  # doctest: +SKIP
        >>> pmaccel.score(out_path="mc.jsonl").summary.totals["multiple_choice"]["accuracy"]  # doctest: +SKIP
    """
    return run_job(run_settings(settings, kwargs), ScoreJob())
