"""The packed layout of a sample and the attention masks over it (SPEC §2, §3).

One sample becomes ONE sequence. Every token carries a branch id and a time::

    main "A B C", branches "x y" and "p q r" (left-aligned, stride s)

    time      0   1   2   3   4   5
    main(0)   A   B   C
    branch 1              x   y
    branch 2              p   q   r

    packed order (time, branch):  A B C x p y q r
    pos1d                         0 1 2 3 4 5 6 7
    pos2d = (bpos, time)          (0,0) (0,1) (0,2) (s,3) (2s,3) (s,4) (2s,4) (2s,5)

Masks are functions of (time, branch) only, so they are built with tensor comparisons:
    columnar:  i sees j  iff  time_j < time_i  or  i == j
    isolated:  i sees j  iff  i == j  or  (time_j < time_i  and  j in i's branch or in main)
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from pmaccel.errors import PMAccelError
from pmaccel.samples import TokenizedSample
from pmaccel.settings import default

MASKS = ("columnar", "isolated")
ALIGNS = ("left", "right")


@dataclass
class PackedSample:
    """One sample in packed order. All tensors are 1-D of length N (number of prompt tokens)."""

    input_ids: torch.Tensor  # [N] token ids in packed order
    pos1d: torch.Tensor  # [N] 0..N-1
    bpos: torch.Tensor  # [N] branch_id * branch_stride
    time: torch.Tensor  # [N]
    branch: torch.Tensor  # [N] branch id (main is 0 when present)
    is_main: torch.Tensor  # [N] bool
    branch_ids: list[int]  # branch id of each given branch, in input order
    last_index: list[int]  # packed index of each given branch's last prompt token
    last_time: list[int]  # time of each given branch's last prompt token

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def pack_sample(
    ts: TokenizedSample,
    *,
    branch_stride: int = default("branch_stride"),
    align: str = default("align"),
    interleave_branches: bool = default("interleave_branches"),
    time_offset_rng: random.Random | None = None,
) -> PackedSample:
    """Lay one tokenized sample out as a packed sequence (SPEC §2).

    Args:
        ts: main's and each branch's token ids.
        branch_stride: ``bpos = branch_id * branch_stride``.
        align: ``"left"`` (every branch starts at time M) or ``"right"`` (branches end together).
        interleave_branches: packed order by ``(time, branch)`` (the default, SPEC §2); ``False``
            keeps each branch contiguous, ordered by ``(branch, time)``. Only pos1d depends on it.
        time_offset_rng: when given, every non-main branch's times are shifted by an integer drawn
            uniformly from ``[0, L_b]`` (``random_time_offset``, a training augmentation).

    Returns:
        The ``PackedSample``.

    Example:
        >>> p = pack_sample(TokenizedSample(main=[1, 2], branches=[[3], [4, 5]]))
        >>> p.input_ids.tolist(), p.time.tolist()
        ([1, 2, 3, 4, 5], [0, 1, 2, 2, 3])
    """
    if align not in ALIGNS:
        raise PMAccelError(f"align must be one of {ALIGNS}, got {align!r}", field="align")
    M = len(ts.main)
    first = 1 if M > 0 else 0  # main is branch 0 when present
    lens = [len(b) for b in ts.branches]
    lmax = max(lens)
    starts = []  # each branch's first time
    for n_b in lens:
        start = M if align == "left" else M + (lmax - n_b)
        if time_offset_rng is not None:
            start += time_offset_rng.randint(0, n_b)
        starts.append(start)
    # numpy, not torch: a few microseconds per operation instead of tens (a run packs every sample)
    seg_len = np.array([M, *lens], dtype=np.int64)  # segment 0 is main, segment k + 1 branch k
    n = int(seg_len.sum())
    ids = np.fromiter(itertools.chain(ts.main, *ts.branches), dtype=np.int64, count=n)
    seg = np.repeat(np.arange(len(seg_len)), seg_len)
    seg_first = np.cumsum(seg_len) - seg_len  # flat index of each segment's first token
    time = np.arange(n) - seg_first[seg] + np.array([0, *starts], dtype=np.int64)[seg]
    branch = seg - 1 + first  # main 0; branch k is first + k
    n_branch = first + len(lens)
    # sort by (time, branch) or (branch, time); keys are unique so the order is total
    key = time * n_branch + branch if interleave_branches else branch * (int(time.max()) + 1) + time
    order = np.argsort(key, kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(n)
    ends = np.cumsum(seg_len) - 1  # flat index of each segment's last token
    branch = branch[order]
    return PackedSample(
        input_ids=torch.from_numpy(ids[order]),
        pos1d=torch.arange(n),
        bpos=torch.from_numpy(branch * branch_stride),
        time=torch.from_numpy(time[order]),
        branch=torch.from_numpy(branch),
        is_main=torch.from_numpy((branch == 0) & (M > 0)),
        branch_ids=[first + k for k in range(len(lens))],
        last_index=inverse[ends[1:]].tolist(),
        last_time=[t + n_b - 1 for t, n_b in zip(starts, lens)],
    )


class PackOnRead(Sequence[PackedSample]):
    """Samples packed when first read: a run packs only the samples it admits, and the decode engine packs the
    next ones while the device runs its steps (``prepare``) instead of all of them before its first step.

    Args:
        tokenized: each sample's token ids.
        pack: packs the sample at a position from its ``TokenizedSample`` (``pack_sample`` with its layout).

    Example:
        >>> packs = PackOnRead([TokenizedSample([1], [[2], [3, 4]])], lambda i, ts: pack_sample(ts))
        >>> packs.sizes()[0].tolist(), packs[0].input_ids.tolist()
        ([4], [1, 2, 3, 4])
    """

    def __init__(self, tokenized: Sequence[TokenizedSample], pack: Callable[[int, TokenizedSample], PackedSample]):
        self._tokenized, self._pack = tokenized, pack
        self._packed: list[PackedSample | None] = [None] * len(tokenized)

    def __len__(self) -> int:
        return len(self._packed)

    def __getitem__(self, i):  # noqa: ANN001, ANN204  (int or slice, as Sequence's)
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        p = self._packed[i]
        if p is None:
            p = self._packed[i] = self._pack(i if i >= 0 else i + len(self), self._tokenized[i])
        return p

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Each sample's prompt tokens and branches, without packing it."""
        return (np.array([ts.num_tokens for ts in self._tokenized], dtype=np.int64),
                np.array([len(ts.branches) for ts in self._tokenized], dtype=np.int64))

    def prepare(self, positions: Iterable[int]) -> None:
        """Pack the samples at ``positions`` now (those packed already are left as they are)."""
        for i in positions:
            self[i]


def append_outputs(p: PackedSample, output_ids: list[list[int]]) -> PackedSample:
    """The final packed sequence: the prompt followed by the generated tokens in the order decoding
    appended them (step by step, in branch order, each at its branch's next time; SPEC §5).

    The returned sample's ``last_index``/``last_time`` point at each branch's last token.
    """
    assert len(output_ids) == len(p.branch_ids)
    ids, times, branches, bposes = [], [], [], []
    last_index, last_time = list(p.last_index), list(p.last_time)
    stride = {b: int(p.bpos[i]) for b, i in zip(p.branch_ids, p.last_index)}
    n = p.num_tokens
    for step in range(max((len(o) for o in output_ids), default=0)):
        for k, out in enumerate(output_ids):
            if step < len(out):
                last_time[k] += 1
                last_index[k] = n + len(ids)
                ids.append(out[step])
                times.append(last_time[k])
                branches.append(p.branch_ids[k])
                bposes.append(stride[p.branch_ids[k]])
    m = len(ids)
    as_t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PackedSample(
        input_ids=torch.cat([p.input_ids, as_t(ids)]),
        pos1d=torch.arange(n + m),
        bpos=torch.cat([p.bpos, as_t(bposes)]),
        time=torch.cat([p.time, as_t(times)]),
        branch=torch.cat([p.branch, as_t(branches)]),
        is_main=torch.cat([p.is_main, torch.zeros(m, dtype=torch.bool)]),
        branch_ids=list(p.branch_ids),
        last_index=last_index,
        last_time=last_time,
    )


@dataclass
class TokenMeta:
    """Per-slot metadata of a batch of packed sequences, right-padded. All tensors are [B, T]."""

    time: torch.Tensor
    branch: torch.Tensor
    is_main: torch.Tensor
    valid: torch.Tensor  # False on padding

    def cat(self, other: TokenMeta) -> TokenMeta:
        return TokenMeta(*(torch.cat([a, b], dim=1) for a, b in zip(self.astuple(), other.astuple())))

    def select(self, rows: torch.Tensor) -> TokenMeta:
        return TokenMeta(*(a[rows] for a in self.astuple()))

    def astuple(self) -> tuple[torch.Tensor, ...]:
        return (self.time, self.branch, self.is_main, self.valid)


@dataclass
class PackedBatch:
    """Several packed samples right-padded to a common length N."""

    input_ids: torch.Tensor  # [B, N]
    pos1d: torch.Tensor  # [B, N]
    bpos: torch.Tensor  # [B, N]
    meta: TokenMeta  # [B, N] each

    def positions(self, rope_2d: bool) -> torch.Tensor:
        """``position_ids`` for the model: [B, N, 3] = (pos1d, bpos, time) with 2D RoPE, else time [B, N]."""
        return stack_positions(self.pos1d, self.bpos, self.meta.time, rope_2d)


def stack_positions(pos1d: torch.Tensor, bpos: torch.Tensor, time: torch.Tensor, rope_2d: bool) -> torch.Tensor:
    # -> [B, T, 3] for 2D RoPE (see pmaccel.rope), [B, T] (time) for plain RoPE
    return torch.stack([pos1d, bpos, time], dim=-1) if rope_2d else time


def collate(samples: list[PackedSample], pad_id: int = 0) -> PackedBatch:
    """Right-pad packed samples into one batch; each keeps its own pos1d/pos2d as if it were alone."""
    lens = torch.tensor([s.num_tokens for s in samples])
    valid = torch.arange(int(lens.max()))[None, :] < lens[:, None]  # [B, n]

    def pad(field: str, value: int | bool) -> torch.Tensor:  # -> [B, n]
        return pad_sequence([getattr(s, field) for s in samples], batch_first=True, padding_value=value)

    return PackedBatch(
        input_ids=pad("input_ids", pad_id),
        pos1d=pad("pos1d", 0),
        bpos=pad("bpos", 0),
        meta=TokenMeta(time=pad("time", 0), branch=pad("branch", -1), is_main=pad("is_main", False), valid=valid),
    )


def allowed(query: TokenMeta, keys: TokenMeta, query_slot: torch.Tensor, mask: str) -> torch.Tensor:
    """Which keys each query may attend to (SPEC §3).

    Args:
        query: metadata of the queries, [B, Q].
        keys: metadata of every key slot (cache + this forward), [B, K].
        query_slot: the key-slot index of each query, [B, Q] (a token always sees itself).
        mask: ``"columnar"`` or ``"isolated"``.

    Returns:
        Boolean [B, Q, K]. Padding sees only itself and is seen by nothing.
    """
    if mask not in MASKS:
        raise PMAccelError(f"unknown mask {mask!r}; use one of {MASKS}", field="mask")
    rule = keys.time[:, None, :] < query.time[:, :, None]  # [B, Q, K]
    if mask == "isolated":
        same = keys.branch[:, None, :] == query.branch[:, :, None]
        rule &= same | keys.is_main[:, None, :]
    rule &= query.valid[:, :, None] & keys.valid[:, None, :]
    slots = torch.arange(keys.time.shape[1], device=keys.time.device)
    return rule | (slots[None, None, :] == query_slot[:, :, None])


def additive_mask(allowed_: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean [B, Q, K] -> the additive float mask [B, 1, Q, K] transformers takes as a custom 4D mask."""
    zero = torch.zeros((), dtype=dtype, device=allowed_.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed_.device)
    return torch.where(allowed_, zero, neg)[:, None]
