"""Rows -> samples (SPEC §1, §8): tokenized once, then grouped over the token counts alone.

    tokenize_rows  rows -> per row: prompt tokens, ids, or the row's error; ``Dataset.map(batched=True,
                   num_proc=...)`` with the fast tokenizer, cached, so other processes and a resumed run reuse it
    group_samples  token counts -> ``SampleTable``: which rows make each sample (numpy arrays, no row held)
    SampleTable    materialises the samples asked for (a chunk of a rank's share), never all of them
    make_samples   the same as a list of ``Sample`` (previews, small inputs)

Grouping runs over the token-count column of ALL rows on every process, deterministically, so
samples (and their indices) do not depend on the number of processes.
"""

from __future__ import annotations

import itertools
import json
import random
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pmaccel.errors import PMAccelError
from pmaccel.rows import (
    LAYOUT,
    REMAP_ROWS,
    TAKE_CHUNK,
    Row,
    RowsView,
    Skipped,
    Table,
    TakeSequence,
    _digest,
    _error_text,
    _quiet_datasets,
    _row,
    read_columns,
    remap,
    remapped,
)
from pmaccel.samples import tokenize_sample

TOKENIZE_RANGE = 500_000  # rows tokenized per Dataset.map call (the pages a process reads are released after)
TOKENIZE_BATCH = 10_000  # rows per call of the tokenizing function (one tokenizer call; one Arrow record batch:
# mapping a table reads every batch's header, and each header read brings its neighbouring pages into the
# process's resident memory, so the batch count is what a mapped token table costs a process)
GROUP_CHUNK = 65_536  # rows' token counts turned into Python values at a time while flat rows are grouped


@dataclass(frozen=True)
class Sample:
    """One unit of parallel decoding: ``main`` and its branches, from one parallel row or several flat rows.

    ``rows`` are the positions in ``Table.rows`` of the rows it came from (one per branch when flat).
    ``input_ids``: ``(main ids, [ids per branch])`` when the rows were tokenized once for the run.
    """

    index: int
    rows: tuple[int, ...]
    flat: bool
    main: str
    branches: list[str | dict[str, Any]]
    num_tokens: int = 0  # prompt tokens (with chat_template: the sum of the branches' full templates)
    input_ids: tuple[list[int], list[list[int]]] | None = field(default=None, compare=False, repr=False)

    def as_input(self) -> dict[str, Any]:
        """The sample as ``pmaccel.generate`` takes it."""
        return {"main": self.main, "branches": self.branches}

    def decode_input(self) -> dict[str, Any]:
        """The sample for ``pmaccel.generate``: its token ids where known (the same ids ``as_input`` gives)."""
        if self.input_ids is None:
            return self.as_input()
        main, branches = self.input_ids
        return {"main": {"input_ids": main} if main else "", "branches": [{"input_ids": b} for b in branches]}



# ----------------------------------------------------------------------------- rows -> samples


@dataclass(frozen=True)
class Grouping:
    """How rows become samples; the fields of ``Settings`` with the same names."""

    branches_per_sample: int = 1
    min_branches_per_sample: int = 1
    max_branches_per_sample: int = 0
    max_total_tokens: int = 0
    max_samples: int | None = None
    seed: int = 0
    chat_template: bool = False
    on_error: str = "raise"
    vocab_size: int | None = None  # the model's: given token ids must lie below it

    @classmethod
    def from_settings(cls, settings: Any, vocab_size: int | None = None) -> Grouping:
        names = [f for f in cls.__dataclass_fields__ if f != "vocab_size"]
        return cls(**{f: getattr(settings, f) for f in names}, vocab_size=vocab_size)


def tokenize_rows(rows: Any, tokenizer: Any, grouping: Grouping, *, count: Callable[[Row], int] | None = None,
                  count_name: str = "", lists_as_json: bool = False, num_workers: int = 0) -> Any:
    """Per valid row: its prompt tokens, its ids and whether it can be used, with ``Dataset.map``.

    Text is tokenized in batches with the (fast) tokenizer, in ``num_workers`` processes when more than 1;
    the result is cached under a fingerprint of the rows, the tokenizer and the settings that change it,
    so other processes and a resumed run load it instead of tokenizing again.

    Args:
        rows: the valid rows (``RowTable.check``'s dataset: ``number``, ``fields``).
        tokenizer: the model's tokenizer.
        grouping: the grouping settings (``chat_template``, ``max_total_tokens``, ``vocab_size`` apply here).
        count: ``row -> tokens``, raising ``PMAccelError`` for a row that cannot be used (``pmaccel score``);
            default: the prompt tokens of its branches, and their ids are kept.
        count_name: names ``count`` in the cache fingerprint.
        lists_as_json: CSV rows (lists as JSON text in cells).
        num_workers: tokenizing processes when more than 1.

    Returns:
        A dataset aligned with ``rows``: ``flat``, ``num_tokens``, ``num_branches``, ``tok_error``/``tok_field``
        (a row that cannot be used), ``main_ids``/``branch_ids`` (null unless kept).

    Example:
        >>> valid, _ = load_rows("rows.jsonl").check("raise")  # doctest: +SKIP
        >>> tokens = tokenize_rows(valid, tokenizer, Grouping(), num_workers=8)  # doctest: +SKIP
    """
    import datasets

    int_list = datasets.List(datasets.Value("int32"))
    features = datasets.Features({
        "flat": datasets.Value("bool"), "num_tokens": datasets.Value("int64"), "num_branches": datasets.Value("int32"),
        "tok_error": datasets.Value("string"), "tok_field": datasets.Value("string"),
        "main_ids": int_list, "branch_ids": datasets.List(int_list)})
    keep_ids = count is None and not grouping.chat_template and grouping.vocab_size is not None \
        and grouping.vocab_size < 2**31
    fn = _Tokenize(tokenizer, grouping, count, lists_as_json, keep_ids)
    fingerprint = _digest([rows._fingerprint, _tokenizer_digest(tokenizer), grouping.chat_template,
                           grouping.max_total_tokens, grouping.vocab_size, count_name, lists_as_json, keep_ids,
                           LAYOUT, TOKENIZE_BATCH])
    if not len(rows):  # every row skipped
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    parts = []
    for start in range(0, len(rows), TOKENIZE_RANGE):  # a range at a time, each from a fresh mapping of the rows
        end = min(start + TOKENIZE_RANGE, len(rows))
        part = rows if end - start == len(rows) else remapped(rows).select(range(start, end))
        nproc = num_workers if num_workers > 1 and len(part) > TOKENIZE_BATCH else None
        with _quiet_datasets():
            parts.append(part.map(fn, batched=True, batch_size=TOKENIZE_BATCH, writer_batch_size=TOKENIZE_BATCH,
                                  num_proc=nproc, features=features, remove_columns=rows.column_names,
                                  new_fingerprint=fingerprint if part is rows else _digest([fingerprint, start, end])))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


class _Tokenize:
    """The ``Dataset.map`` function of ``tokenize_rows`` (a class: picklable for datasets' workers)."""

    def __init__(self, tokenizer: Any, g: Grouping, count: Callable[[Row], int] | None, lists_as_json: bool,
                 keep_ids: bool):
        self.tokenizer, self.g, self.count, self.lists_as_json, self.keep_ids = (
            tokenizer, g, count, lists_as_json, keep_ids)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        rows = [_row(n, text, self.lists_as_json) for n, text in zip(batch["number"], batch["fields"])]
        out: dict[str, list] = {"flat": [r.flat for r in rows], "num_tokens": [], "num_branches": [],
                                "tok_error": [], "tok_field": [], "main_ids": [], "branch_ids": []}
        batched = self.count is None and not self.g.chat_template
        pieces = _piece_ids(rows, self.tokenizer) if batched else [None] * len(rows)
        for row, ids in zip(rows, pieces):
            try:
                n = _count_tokens(row, self.tokenizer, self.g, self.count, None if ids is None else list(map(len, ids)))
            except PMAccelError as e:
                n, error, field, ids = -1, e.problem, e.field, None
            else:
                error = field = None
            out["num_tokens"].append(n)
            out["num_branches"].append(len(row.branches))
            out["tok_error"].append(error)
            out["tok_field"].append(field)
            keep = self.keep_ids and ids is not None
            out["main_ids"].append(ids[0] if keep else None)
            out["branch_ids"].append(ids[1:] if keep else None)
        return out


def _piece_ids(rows: Sequence[Row], tokenizer: Any) -> list[list[list[int]]]:
    """Per row, the ids of main and of each branch (text tokenized in one batch, without special tokens, as
    ``tokenize_sample`` does; given ids as they are)."""
    texts: list[str] = []
    slots: list[list[Any]] = []  # per row: ids, or a text's place in `texts`
    for row in rows:
        per_row: list[Any] = []
        for piece in [row.main, *row.branches]:
            text = piece if isinstance(piece, str) else piece.get("text") if "input_ids" not in piece else None
            if text is None:
                per_row.append(list(piece["input_ids"]))
            elif not text:
                per_row.append([])
            else:
                per_row.append(len(texts))
                texts.append(text)
        slots.append(per_row)
    ids = _batch_ids(tokenizer, texts) if texts else []
    return [[ids[x] if isinstance(x, int) else x for x in per_row] for per_row in slots]  # each list used once


def _batch_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``. A fast tokenizer whose call is the library's
    own and whose backend is in the state that call sets (no truncation, no padding, special tokens as it
    says) is asked for the ids alone: the call's conversion of every encoding to a dict cost half the time."""
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    plain = (isinstance(tokenizer, PreTrainedTokenizerFast) and hasattr(backend, "encode_batch_fast")
             and cls.__call__ is PreTrainedTokenizerFast.__call__
             and cls._encode_plus is PreTrainedTokenizerFast._encode_plus)
    if (plain and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _tokenizer_digest(tokenizer: Any) -> str:
    """What identifies a tokenizer's output: its backend's definition (less the padding/truncation state a
    call changes) and its chat template; datasets' hash of the object for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        text = json.dumps(spec, sort_keys=True)
    else:
        from datasets.fingerprint import Hasher

        text = Hasher.hash(tokenizer)
    return _digest([type(tokenizer).__name__, text, getattr(tokenizer, "chat_template", None)])


def _narrowest(counts: Any) -> Any:
    """Non-negative ``counts`` as a new array of the narrowest signed integer type that holds the largest (a sample
    table keeps two counts per sample: at millions of samples, 2-3 bytes a sample instead of 8)."""
    import numpy as np

    top = int(counts.max()) if len(counts) else 0
    dtype = next(t for t in (np.int8, np.int16, np.int32, np.int64) if top <= np.iinfo(t).max)
    return counts.astype(dtype)  # always a copy: a slice of a longer column does not keep the column alive


@dataclass
class SampleTable(TakeSequence):
    """The samples of a run (SPEC §1, §8): which valid rows make each (numpy arrays), materialised on request.

    ``samples[i]`` / ``take(indices)`` read just those rows from the Arrow tables; nothing else is held, so
    each process materialises only the samples it works on.
    """

    path: str
    rows: RowsView  # the valid rows
    tokens: Any  # ``tokenize_rows``' dataset, aligned with ``rows``
    offsets: Any  # [S + 1]: sample s's rows are positions[offsets[s]:offsets[s + 1]]; None: sample s is row s
    positions: Any  # positions in ``rows``, sample by sample (None with ``offsets``)
    num_tokens: Any  # [S] prompt tokens (the narrowest integer type that holds them)
    num_branches: Any  # [S] (likewise)
    flat: Any  # [S] bool (a read-only view of one False where no row is flat)
    _read: int = 0  # token rows read since ``tokens`` was mapped

    def __len__(self) -> int:
        return len(self.num_tokens)

    def __iter__(self) -> Iterator[Sample]:
        for start in range(0, len(self), TAKE_CHUNK):
            yield from self.take(range(start, min(start + TAKE_CHUNK, len(self))))

    def sample_rows(self, index: int) -> tuple[int, ...]:
        """Positions (in ``rows``) of sample ``index``'s rows."""
        if self.offsets is None:
            return (index,)
        return tuple(int(p) for p in self.positions[self.offsets[index]:self.offsets[index + 1]])

    def take(self, indices: Sequence[int], rows: dict[int, Row] | None = None,
             with_ids: bool = True) -> list[Sample]:
        """The samples ``indices``, in that order; ``rows`` (if given) receives their rows by position;
        ``with_ids``: with the token ids of the rows (for decoding)."""
        per_sample = [self.sample_rows(int(i)) for i in indices]
        wanted = sorted({p for ps in per_sample for p in ps})
        if not wanted:
            return []
        got = dict(zip(wanted, self.rows.take(wanted)))
        ids: dict[int, tuple[Any, Any]] = {p: (None, None) for p in wanted}
        if with_ids:
            self._read += len(wanted)
            if self._read > REMAP_ROWS:
                remap(self, "tokens")
                self._read = len(wanted)
            columns = self.tokens.select_columns(["main_ids", "branch_ids"])[wanted]
            ids = {p: (m, b) for p, m, b in zip(wanted, columns["main_ids"], columns["branch_ids"])}
        if rows is not None:
            rows.update(got)
        samples = []
        for i, ps in zip(indices, per_sample):
            i = int(i)
            first = got[ps[0]]
            if self.flat[i]:
                known = all(ids[p][1] is not None for p in ps)
                samples.append(Sample(index=i, rows=ps, flat=True, main="",
                                      branches=[got[p].branches[0] for p in ps], num_tokens=int(self.num_tokens[i]),
                                      input_ids=([], [ids[p][1][0] for p in ps]) if known else None))
            else:
                main_ids, branch_ids = ids[ps[0]]
                samples.append(Sample(index=i, rows=ps, flat=False, main=first.main, branches=first.branches,
                                      num_tokens=int(self.num_tokens[i]),
                                      input_ids=None if branch_ids is None else (main_ids, branch_ids)))
        return samples


def group_samples(rows: RowsView, tokens: Any, path: str, grouping: Grouping,
                  skipped: Sequence[Skipped] = ()) -> tuple[SampleTable, list[Skipped]]:
    """Group rows into samples over the token-count column only (SPEC §1, §8).

    A parallel row is one sample. Consecutive flat rows are grouped: ``branches_per_sample`` per
    sample, or a count drawn from ``[min, max]_branches_per_sample`` by ``random.Random(seed)``;
    with ``max_total_tokens`` a group also closes before its prompt tokens would pass the budget.
    Stops after ``max_samples`` samples.

    Args:
        rows: the valid rows.
        tokens: ``tokenize_rows``' dataset for them.
        path: the input file (for messages).
        grouping: the grouping settings.
        skipped: rows already skipped while reading.

    Returns:
        The ``SampleTable`` and every skipped row up to the last row used, by row number.

    Raises:
        PMAccelError: a row that cannot be used (``on_error="raise"``), as ``file:row: field: problem``.
    """
    import numpy as np

    # read as the table keeps them (4 bytes a count: per-sample counts are int32, as are a row's)
    columns = read_columns(tokens, ["flat", "num_tokens", "num_branches"], valid=["tok_error"],
                           dtypes={"flat": bool, "num_tokens": np.int32, "num_branches": np.int32})
    flat, bad = columns.pop("flat"), columns.pop("tok_error").astype(bool, copy=False)
    ntok, nbr = columns.pop("num_tokens"), columns.pop("num_branches")
    found: list[int] = []  # positions of rows that cannot be used

    def on_bad(pos: int) -> None:
        if grouping.on_error != "skip":
            got = tokens[pos]
            raise PMAccelError(got["tok_error"], file=path, row=rows[pos].number, field=got["tok_field"])
        found.append(pos)

    limit = grouping.max_samples or None
    # the token table as it is: its columns were read above with plain reads, not through its mapping, and a
    # new mapping beside the caller's would hold both mappings' pages at once (the peak of a 4M-row run)
    if not flat.any() and not bad.any():  # parallel rows only: sample s is row s (no offsets or positions held)
        n = len(ntok) if limit is None else min(limit, len(ntok))
        # the counts of the first n in the narrowest type that holds them (a copy: the rest goes); no flat flags
        samples = SampleTable(path=path, rows=rows, tokens=tokens, offsets=None, positions=None,
                              num_tokens=_narrowest(ntok[:n]), num_branches=_narrowest(nbr[:n]),
                              flat=np.broadcast_to(np.False_, (n,)))
    else:
        wide = len(ntok) >= 2**31
        offsets, positions = array("q" if wide else "i", [0]), array("q" if wide else "i")  # 4 bytes where they fit
        counts, kinds = array("q"), array("b")
        for group, is_flat, load in itertools.islice(_groups(_items(flat), _items(ntok), _items(bad), grouping,
                                                             on_bad), limit):
            positions.extend(group)
            offsets.append(len(positions))
            counts.append(load)
            kinds.append(is_flat)
        del flat, bad, ntok
        offsets = np.frombuffer(offsets, dtype=offsets.typecode)
        positions = np.frombuffer(positions, dtype=positions.typecode)
        kinds = np.frombuffer(kinds, dtype=np.int8).astype(bool)
        branches = np.where(kinds, np.diff(offsets), nbr[positions[offsets[:-1]]] if len(positions) else 0)
        del nbr
        samples = SampleTable(path=path, rows=rows, tokens=tokens, offsets=offsets, positions=positions,
                              num_tokens=_narrowest(np.frombuffer(counts, dtype=np.int64)),
                              num_branches=_narrowest(branches), flat=kinds)
    more = []
    if found:
        got = rows.data[found]
        more = [Skipped(number=n, error=_error_text(path, n, tokens[p]["tok_error"], tokens[p]["tok_field"]),
                        content=json.loads(text)) for p, n, text in zip(found, got["number"], got["fields"])]
    every = sorted([*skipped, *more], key=lambda s: s.number)
    if limit is not None and len(samples) == limit and len(samples):
        last = rows[samples.sample_rows(len(samples) - 1)[-1]].number
        every = [s for s in every if s.number <= last]
    return samples, every


def _items(column: Any) -> Iterator[Any]:
    """The values of a numpy column as Python values, converted GROUP_CHUNK at a time (not a list of all)."""
    for start in range(0, len(column), GROUP_CHUNK):
        yield from column[start:start + GROUP_CHUNK].tolist()


def _groups(flat: Iterable[bool], ntok: Iterable[int], bad: Iterable[bool], g: Grouping,
            on_bad: Callable[[int], None]) -> Iterator[tuple[list[int], bool, int]]:
    """``(row positions, flat, prompt tokens)`` per sample, in order; ``on_bad(position)`` for a row that cannot
    be used, when it is reached."""
    rng = random.Random(g.seed)
    group: list[int] = []  # positions of the flat rows of the sample being built
    target = load = 0
    for pos, (is_flat, n, is_bad) in enumerate(zip(flat, ntok, bad)):
        if group and (not is_flat or len(group) >= target):
            yield group, True, load
            group = []
        if is_bad:
            on_bad(pos)
            continue
        if not is_flat:
            yield [pos], False, n
            continue
        if group and g.max_total_tokens and load + n > g.max_total_tokens:
            yield group, True, load
            group = []
        if not group:
            target = (rng.randint(g.min_branches_per_sample, g.max_branches_per_sample)
                      if g.max_branches_per_sample else g.branches_per_sample)
            load = 0
        group.append(pos)
        load += n
    if group:
        yield group, True, load


def make_samples(table: Table, tokenizer: Any, grouping: Grouping,
                 count: Callable[[Row], int] | None = None) -> tuple[list[Sample], list[Skipped]]:
    """Turn rows into samples (SPEC §1, §8), checking that every branch tokenizes: ``tokenize_rows`` then
    ``group_samples``, as a list (for previews and small inputs; a run keeps the ``SampleTable``).

    Args:
        table: rows from ``read_rows`` (or a ``Table`` of ``Row``s).
        tokenizer: the model's tokenizer (to count tokens and catch branches with none).
        grouping: the grouping settings.
        count: ``row -> tokens``, raising ``PMAccelError`` for a row that cannot be used; default: the
            prompt tokens of its branches (``pmaccel score`` counts prompts and targets, and checks them).

    Returns:
        The samples, indexed 0.., and every skipped row up to the last row used, by row number.

    Raises:
        PMAccelError: a row that does not tokenize or is over budget (``on_error="raise"``).

    Example:
        >>> samples, skipped = make_samples(read_rows("rows.jsonl"), tokenizer, Grouping())  # doctest: +SKIP
    """
    rows = table.rows
    if not isinstance(rows, RowsView):
        import datasets

        data = datasets.Dataset.from_dict({"number": [r.number for r in rows],
                                           "fields": [json.dumps(r.fields, ensure_ascii=False) for r in rows]})
        rows = RowsView(data)
    tokens = tokenize_rows(rows.data, tokenizer, grouping, count=count, lists_as_json=rows.lists_as_json,
                           count_name=_callable_name(count))
    samples, skipped = group_samples(rows, tokens, table.path, grouping, table.skipped)
    return list(samples), skipped


def _callable_name(count: Callable[..., Any] | None) -> str:
    return "" if count is None else f"{count.__module__}.{count.__qualname__}"


def _check_ids(row: Row, vocab_size: int) -> None:
    """Given token ids (main, branches, targets) must be ids of the model's vocabulary."""
    parts = [("main", row.main)] + [(f"branches[{k}]", b) for k, b in enumerate(row.branches)]
    for name, part in parts:
        if not isinstance(part, Mapping):
            continue
        for key in ("input_ids", "target"):
            ids = part.get(key)
            if not isinstance(ids, list):
                continue
            bad = next((t for t in ids if isinstance(t, int) and not 0 <= t < vocab_size), None)
            if bad is not None:
                field = row.key if row.flat else f"{name}.{key}"
                raise PMAccelError(f"token id {bad} is outside the model's vocabulary (0..{vocab_size - 1}); "
                                   "give ids of this model's tokenizer", field=field)


def _count_tokens(row: Row, tokenizer: Any, g: Grouping, count: Callable[[Row], int] | None = None,
                  pieces: list[int] | None = None) -> int:
    """Prompt tokens of a row's branches (or ``count(row)``; ``pieces``: main's and each branch's counts,
    already tokenized); checks that each branch has tokens and the row fits the budget (flat rows)."""
    try:
        if pieces is not None:
            empty = next((k for k, n in enumerate(pieces[1:]) if n == 0), None)
            if empty is not None:
                raise PMAccelError("branch is empty after tokenization; give it some text", field=f"branches[{empty}]")
            n = sum(pieces)
        elif count is not None:
            n = count(row)
        else:
            n = tokenize_sample({"main": row.main, "branches": row.branches}, tokenizer,
                                chat_template=g.chat_template).num_tokens
        if g.vocab_size is not None:
            _check_ids(row, g.vocab_size)
    except PMAccelError as e:
        raise PMAccelError(e.problem, field=row.key if row.flat else e.field) from None
    if row.flat and g.max_total_tokens and n > g.max_total_tokens:
        raise PMAccelError(
            f"the branch has {n} prompt tokens, more than max_total_tokens={g.max_total_tokens}; "
            "raise max_total_tokens or shorten the text (branches are never cut)",
            field=row.key,
        )
    return n
