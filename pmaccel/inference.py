"""``infer()``: parallel decoding over a data file, the ``GenerateJob`` of the job runner (``pmaccel.run``).

    rows -> samples (the runner) -> GenerateJob.run_samples: one decode engine for the process's
    share (continuous batching; an out-of-memory error halves its pool) -> compact results, with the
    ``--compare`` / ``--leakage`` extras (``pmaccel.measure``) -> one record per input row
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pmaccel import output, run
from pmaccel.grouping import Sample
from pmaccel.rows import Row
from pmaccel.run import Job, Records, run_job, run_settings
from pmaccel.settings import Settings

logger = logging.getLogger("pmaccel")
EXTRAS_CHUNK = 32  # --compare/--leakage run on this many finished samples at a time
ENGINE_PHASES = ("capture_s", "prefill_s", "decode_s", "steps", "rows", "lanes")


def infer(settings: Settings | None = None, /, **kwargs: Any) -> Records | None:
    """Run parallel inference over a data file and write one JSONL line per input row, in input order.

    The same call works in a plain Python process, under ``accelerate launch`` / ``torchrun`` (each
    process takes a share of the samples; results are gathered) and under ``notebook_launcher``.
    Finished samples are appended to per-process part files as they come, so an interrupted run
    resumes where it stopped.

    Args:
        settings: a ``Settings`` (``notebook_launcher`` passes arguments by position); keyword
            arguments override its fields.
        **kwargs: any ``Settings`` field (``pmaccel --help`` lists them).

    Returns:
        On the main process, the records written (a list with a ``summary`` attribute); on the
        other processes ``None``. With ``num_processes=N`` (N > 1, no launcher) the call starts the N
        processes itself, one per GPU, and returns the records once they have ended.

    Raises:
        PMAccelError: a bad setting or input (file, row and field in the message); nothing is
            written to ``out_path`` then. In processes forked by ``notebook_launcher`` or
            ``debug_launcher`` the main one prints that message in one line and every one ends with
            ``SystemExit(2)`` instead, so the launcher reports failed processes, not tracebacks.

    Example:
        >>> records = pmaccel.infer(data_path="rows.jsonl", out_path="out.jsonl")  # doctest: +SKIP
        >>> records.summary.samples  # doctest: +SKIP
        >>> from accelerate import notebook_launcher  # doctest: +SKIP
        >>> settings = pmaccel.Settings(data_path="rows.jsonl", out_path="out.jsonl")  # doctest: +SKIP
        >>> notebook_launcher(pmaccel.infer, (settings,), num_processes=2)  # doctest: +SKIP
        >>> records = pmaccel.infer(settings, num_processes=2)  # doctest: +SKIP
    """
    return run_job(run_settings(settings, kwargs), GenerateJob())


class GenerateJob(Job):
    """Decoding: every sample continues on the engine; ``--compare`` / ``--leakage`` add their fields."""

    def run_samples(self, settings: Settings, model: Any, tokenizer: Any, samples: Sequence[Sample],
                    on_results: Callable[[list[tuple[int, dict]]], None]) -> dict[str, float]:
        """Compute every sample's result; hand finished ones to ``on_results`` as ``(position, result)``
        pairs as they come (the caller writes them out). Returns the engine's timings.

        Decoding runs on one engine for the whole share (continuous batching), RUN_CHUNK samples per call
        (``samples`` materialises them on access; their ids were tokenized once); an out-of-memory error
        releases it and goes on with half the rows, keeping what had finished.
        """
        from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

        from pmaccel import decode, request

        engine = _engine(settings, model)
        extras = _Extras(settings, model, tokenizer) if settings.compare or settings.leakage else None
        held: list[tuple[int, dict]] = []  # finished, waiting for their --compare/--leakage extras

        def finished(i: int, result: dict) -> None:
            if extras is None:
                on_results([(i, output.compact_result(result))])
                return
            held.append((i, result))
            if len(held) >= EXTRAS_CHUNK:
                on_results(extras([(j, samples[j], r) for j, r in held]))
                held.clear()

        try:
            for start in range(0, len(samples), run.RUN_CHUNK):
                todo = list(range(start, min(start + run.RUN_CHUNK, len(samples))))
                while todo:
                    done: set[int] = set()
                    try:
                        for pos, result in decode.decode_stream(
                                model, tokenizer, [samples[i].decode_input() for i in todo],
                                indices=[samples[i].index for i in todo], engine=engine,
                                **request.generate_kwargs(settings)):
                            done.add(todo[pos])
                            finished(todo[pos], result)
                        todo = []
                    except RuntimeError as e:
                        rows = int(engine.stats["rows"])
                        if not should_reduce_batch_size(e) or rows <= 1:
                            raise
                        engine.release()
                        clear_device_cache(garbage_collection=True)
                        engine.config.max_rows = max(1, rows // 2)
                        logger.warning("out of memory; going on with %d rows", engine.config.max_rows)
                        todo = [i for i in todo if i not in done]
                if held:
                    on_results(extras([(j, samples[j], r) for j, r in held]))
                    held.clear()
            return {k: float(engine.stats[k]) for k in ENGINE_PHASES}
        finally:
            engine.release()
            if extras:
                extras.engine.release()

    def tokens(self, result: dict) -> int:
        """What a result counts toward the progress bar's tokens/s."""
        return sum(result["num_generated_tokens"])

    def records(self, sample: Sample, rows: Sequence[Row], result: dict,
                settings: Settings) -> list[tuple[int, dict]]:
        """The output records of a sample's rows, as ``(row position, record)``."""
        from pmaccel import measure

        keys, parallel, flat = measure.record_keys(settings)
        return output.row_records(sample, rows, result, keys=keys, parallel_keys=parallel, flat_keys=flat)

    def totals(self, settings: Settings) -> run.Totals | None:
        """The ``--compare`` / ``--leakage`` totals, when either is on."""
        from pmaccel import measure

        return measure.MeasureTotals(settings) if settings.compare or settings.leakage else None


def _engine(settings: Settings, model: Any) -> Any:
    """A decode engine whose pool ``--batch_size`` caps (0: sized from the device memory)."""
    from pmaccel import decode
    from pmaccel.engine import Engine

    return Engine(model, decode.engine_config(settings.batch_size or None, settings.batch_by_samples,
                                              settings.deterministic))


class _Extras:
    """``--compare`` / ``--leakage`` for a chunk of finished samples (the reference decode has its own engine)."""

    def __init__(self, settings: Settings, model: Any, tokenizer: Any):
        self.settings, self.model, self.tokenizer = settings, model, tokenizer
        self.engine = _engine(settings, model)

    def __call__(self, items: list[tuple[int, Sample, dict]]) -> list[tuple[int, dict]]:
        """``(position, sample, full result)`` -> ``(position, compact result with the extras)``."""
        from pmaccel import measure, request

        positions, samples, results = zip(*items)
        compact = [output.compact_result(r) for r in results]
        inputs, indices = [s.as_input() for s in samples], [s.index for s in samples]
        if self.settings.compare:
            measure.add_reference(compact, results, self.model, self.tokenizer, inputs, indices=indices,
                                  engine=self.engine, **request.generate_kwargs(self.settings))
        if self.settings.leakage:
            measure.add_leakage(compact, results, self.model, self.tokenizer, inputs, indices, self.settings)
        return list(zip(positions, compact))
