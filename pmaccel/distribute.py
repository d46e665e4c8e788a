"""Spreading samples over processes with Accelerate (SPEC §7), and the per-rank batch loop.

    agree_on_done    one gather before the loop: which samples are finished (a bit per sample)
    shard            this rank's share of the unfinished samples: ``split_between_processes`` (padding on) over
                     their indices, computed from the done flags a chunk at a time
    run_batches      this rank's samples, batch by batch (``batch_end``); an OOM halves the batch and retries it
    broadcast_from_main / gather_to_main   the results the main process cannot read from the part files
                     itself (no shared filesystem) travel to it alone, a chunk of samples at a time

No collective runs inside the batch loop: a rank that finishes early simply waits at the end.
Padding repeats the last index on the last ranks, so a sample may be computed twice; results are
keyed by sample index and read once (both copies are equal: each sample's RNG is seeded from its
index).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("pmaccel")


SHARD_CHUNK = 1 << 20  # samples of the done flags scanned at a time when a rank's share is picked


def agree_on_done(accelerator: Any, done: Any) -> Any:
    """Combine what each rank found in the part files it can see.

    Args:
        accelerator: the run's ``Accelerator`` (every rank must call this).
        done: ``[S]`` bool, the finished samples this rank found.

    Returns:
        ``[S]`` bool: finished on some rank, the same on every rank (so the ranks agree on what is left
        even without a shared filesystem). Ranks exchange one bit per sample, not indices, and combine the
        bits packed (one ``[S]`` array is unpacked, at the end).

    Example:
        >>> mine = shard(accelerator, agree_on_done(accelerator, done))  # doctest: +SKIP
    """
    import numpy as np
    from accelerate.utils import gather_object

    done = np.asarray(done, dtype=bool)
    if accelerator.num_processes == 1:
        return done
    agreed = None
    for bits in gather_object([np.packbits(done)]):
        agreed = bits if agreed is None else agreed | bits
    return np.unpackbits(agreed, count=len(done)).view(bool)


def shard(accelerator: Any, done: Any) -> Any:
    """This rank's share of the samples not ``done``: what ``split_between_processes`` with padding gives over
    their indices (a contiguous slice of them per rank; a rank whose slice is one shorter than the longest
    also gets the last index), repeats dropped, computed here from the flags a chunk at a time: no array of
    every unfinished index, and no collective.

    Args:
        accelerator: the run's ``Accelerator`` (its ``num_processes`` and ``process_index``).
        done: ``[S]`` bool, the finished samples (the same on every rank: ``agree_on_done``).

    Returns:
        A numpy array of sample indices, ascending (int32 where every index fits, else int64).

    Example:
        >>> shard(accelerator, np.zeros(7, dtype=bool))  # 3 processes: [0, 1, 2] / [3, 4, 6] / [5, 6]  # doctest: +SKIP
    """
    import numpy as np

    done = np.asarray(done, dtype=bool)
    dtype = np.int32 if len(done) < 2**31 else np.int64
    world, rank = accelerator.num_processes, accelerator.process_index
    todo = len(done) - int(np.count_nonzero(done))
    per, extra = divmod(todo, world)
    start = rank * per + min(rank, extra)
    end = start + per + (1 if rank < extra else 0)
    parts, seen = [], 0  # seen: unfinished samples before the chunk
    for at in range(0, len(done), SHARD_CHUNK):
        if seen >= end:
            break
        left = np.flatnonzero(~done[at:at + SHARD_CHUNK])
        parts.append((left[max(0, start - seen):max(0, end - seen)] + at).astype(dtype))
        seen += len(left)
    if todo and extra and rank >= extra and not start < end == todo:  # padded with the last unfinished index
        parts.append(np.array([len(done) - 1 - int(np.argmin(done[::-1]))], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def run_batches(
    sizes: Sequence[int],
    generate_batch: Callable[[int, int, int], list[dict]],
    on_batch: Callable[[int, int, list[dict]], None],
    *,
    batch_size: int,
    by_samples: bool = True,
) -> int:
    """Run a rank's samples batch by batch, halving the batch size on out-of-memory.

    Args:
        sizes: branch count of each of the rank's samples, in the order they run.
        generate_batch: ``(start, end, batch_size) -> results`` for samples ``start:end``.
        on_batch: ``(start, end, results)``, called once per finished batch (write it out there).
        batch_size: the starting batch size (samples, or branches when not ``by_samples``).
        by_samples: how ``batch_size`` counts.

    Returns:
        The batch size the run ended with.

    Raises:
        RuntimeError: out of memory even with a batch of one sample, or any other error.
    """
    from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

    start = 0
    while start < len(sizes):
        end = batch_end(sizes, start, batch_size, by_samples)
        try:
            results = generate_batch(start, end, batch_size)
        except RuntimeError as e:
            if not should_reduce_batch_size(e) or end - start == 1:
                raise
            batch_size = max(1, min(batch_size, end - start if by_samples else sum(sizes[start:end])) // 2)
            logger.warning("out of memory; retrying the batch with batch_size=%d", batch_size)
            clear_device_cache(garbage_collection=True)
            continue
        on_batch(start, end, results)
        start = end
    return batch_size


def gather_phases(accelerator: Any, phases: dict[str, float]) -> list[dict[str, float]]:
    """Every rank's phase timings, in rank order, on every rank (small: one dict per rank)."""
    from accelerate.utils import gather_object

    return [p for _, p in sorted(gather_object([(accelerator.process_index, phases)]))]


def broadcast_from_main(accelerator: Any, value: Any) -> Any:
    """The main process's ``value`` on every rank (every rank must call this)."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def gather_to_main(accelerator: Any, value: Any) -> list[Any] | None:
    """Every rank's ``value``, in rank order, on the main process only (``None`` elsewhere): results go to
    the process that writes them, never to every rank (every rank must call this)."""
    import torch.distributed as dist

    if accelerator.num_processes == 1:
        return [value]
    gathered = [None] * accelerator.num_processes if accelerator.is_main_process else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def batch_end(sizes: Sequence[int], start: int, batch_size: int, by_samples: bool) -> int:
    """End (exclusive) of the batch that starts at ``start``: ``batch_size`` samples, or, when not
    ``by_samples``, as many samples as fit in ``batch_size`` branches (at least one).

    ``sizes`` are the samples' branch counts. ``score_samples`` and ``run_batches`` cut their batches
    with this rule, so a batch formed by one is one forward batch of the other.
    """
    if by_samples:
        return min(start + batch_size, len(sizes))
    end, load = start, 0
    while end < len(sizes) and (end == start or load + sizes[end] <= batch_size):
        load += sizes[end]
        end += 1
    return end
