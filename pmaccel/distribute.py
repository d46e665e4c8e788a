"""Spreading samples over processes with Accelerate (SPEC §7), and the per-rank batch loop.

    agree_on_done    one gather before the loop: which samples are finished (a bit per sample)
    shard            ``split_between_processes`` (padding on) over the unfinished sample indices (a tensor)
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


def agree_on_done(accelerator: Any, done: Any) -> Any:
    """Combine what each rank found in the part files it can see.

    Args:
        accelerator: the run's ``Accelerator`` (every rank must call this).
        done: ``[S]`` bool, the finished samples this rank found.

    Returns:
        ``[S]`` bool: finished on some rank, the same on every rank (so the ranks agree on what is left
        even without a shared filesystem). Ranks exchange one bit per sample, not indices.

    Example:
        >>> todo = np.flatnonzero(~agree_on_done(accelerator, done))  # doctest: +SKIP
    """
    import numpy as np
    from accelerate.utils import gather_object

    done = np.asarray(done, dtype=bool)
    if accelerator.num_processes == 1:
        return done
    agreed = np.zeros(len(done), dtype=bool)
    for bits in gather_object([np.packbits(done)]):
        agreed |= np.unpackbits(bits, count=len(done)).astype(bool)
    return agreed


def shard(accelerator: Any, indices: Any) -> Any:
    """This rank's share of ``indices``: ``split_between_processes`` with padding (over a tensor, so a
    million indices cost 8 MB), repeats dropped.

    Returns:
        A numpy array of sample indices, in the given order.

    Example:
        >>> shard(accelerator, np.arange(7))  # 3 processes: [0, 1, 2] / [3, 4] / [5, 6]  # doctest: +SKIP
    """
    import numpy as np
    import torch

    indices = np.asarray(indices, dtype=np.int64)
    if not len(indices):
        return indices
    with accelerator.split_between_processes(torch.from_numpy(indices), apply_padding=True) as mine:
        mine = np.asarray(mine.cpu().numpy() if isinstance(mine, torch.Tensor) else mine, dtype=np.int64)
    _, first = np.unique(mine, return_index=True)
    return mine[np.sort(first)]


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
