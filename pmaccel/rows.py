"""Input rows → samples (SPEC §1, §8), through HF ``datasets``.

    load_rows      file -> ``RowTable``: an Arrow table of the rows as read (one JSON text each, with its
                   line number and, for a bad row, its error), built once with ``Dataset.from_generator``
                   (workers read byte ranges of a JSON-lines file) and memory-mapped from datasets' cache
    tokenize_rows  rows -> per row: prompt tokens, ids, or the row's error; ``Dataset.map(batched=True,
                   num_proc=...)`` with the fast tokenizer, cached, so other processes and a resumed run reuse it
    group_samples  token counts -> ``SampleTable``: which rows make each sample (numpy arrays, no row held)
    SampleTable    materialises the samples asked for (a chunk of a rank's share), never all of them
    read_rows / make_samples   the same, as a ``Table`` and a list of ``Sample`` (previews, small inputs)

Reading and the structural checks need no tokenizer, so bad input is reported before the model
loads. Rows keep their own keys, in their own order (the JSON text of each row is what is stored).
Grouping runs over the token-count column of ALL rows on every process, deterministically, so
samples (and their indices) do not depend on the number of processes.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import random
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmaccel.errors import PMAccelError
from pmaccel.samples import tokenize_sample

FLAT_KEYS = ("text", "prompt", "input_ids")
SCORE_KEYS = ("target", "answer_offset")  # what ``pmaccel score`` reads from a branch (or a flat row)
DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
LAYOUT = 2  # part of every cache fingerprint: bump when what the row or token tables hold changes
READ_SHARD_BYTES = 32 << 20  # a JSON-lines file is read in byte ranges of about this size
READ_SHARD_ROWS = 200_000  # rows of a parquet/csv/arrow table per reading task
TOKENIZE_BATCH = 10_000  # rows per call of the tokenizing function (one tokenizer call; one Arrow record batch)
WRITE_BATCH_ROWS = 10_000  # rows per record batch of the row table: opening a mapping reads every batch's header
TAKE_CHUNK = 4096  # samples materialised at a time when a whole table is iterated
REMAP_ROWS = 65536  # rows read through a memory-mapped table before it is mapped afresh (bounds RSS)
TOKENIZE_RANGE = 500_000  # rows tokenized per Dataset.map call (the pages a process reads are released after)


def example_path() -> Path:
    """The example file shipped with pmaccel: the data of a run without ``data_path``."""
    return Path(__file__).parent / "data" / "example.jsonl"


@dataclass(frozen=True)
class Row:
    """One valid input row.

    ``number`` is the 1-based line (JSON lines) or row number used in messages; ``fields`` the row
    as read (carried to the output); ``branches`` the branches in the form ``generate`` takes.
    """

    number: int
    fields: dict[str, Any]
    flat: bool
    main: str
    branches: list[str | dict[str, Any]]
    key: str = "branches"  # the field that holds the branches: "branches", or text/prompt/input_ids


@dataclass(frozen=True)
class Skipped:
    """A row left out with ``on_error="skip"``: where it was, why, and what it held."""

    number: int
    error: str
    content: Any


@dataclass
class Table:
    """The rows of one input file: ``rows`` are the valid ones (a view over the Arrow table, or a list)."""

    path: str
    rows: Sequence[Row]
    skipped: list[Skipped] = field(default_factory=list)


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


def _error_text(path: str, number: int, problem: str, field: str | None) -> str:
    return str(PMAccelError(problem, file=path, row=number, field=field))


# ----------------------------------------------------------------------------- reading


@dataclass
class RowTable:
    """Every row of one input file, in order, as an Arrow table (``data``: ``number``, ``fields`` = the row's
    JSON text, ``error``/``field`` = what is wrong with a bad row, else null), memory-mapped from datasets' cache."""

    path: str
    data: Any
    lists_as_json: bool = False  # tables (CSV, Parquet, Arrow): a cell may hold a list as JSON text

    def __len__(self) -> int:
        return len(self.data)

    def bad_positions(self) -> Any:
        """Positions of the rows with an error (numpy)."""
        import numpy as np

        return np.flatnonzero(read_columns(self.data, [], valid=["error"])["error"])

    def skipped(self, positions: Iterable[int]) -> list[Skipped]:
        """The bad rows at ``positions``, as ``Skipped``."""
        positions = [int(p) for p in positions]
        if not positions:
            return []
        got = self.data[positions]
        return [Skipped(number=n, error=_error_text(self.path, n, e, f), content=json.loads(text))
                for n, text, e, f in zip(got["number"], got["fields"], got["error"], got["field"])]

    def check(self, on_error: str) -> tuple[Any, list[Skipped]]:
        """The valid rows (a ``datasets.Dataset``) and the skipped ones; with ``on_error="raise"`` the first bad
        row is an error."""
        bad = self.bad_positions()
        if len(bad) and on_error != "skip":
            got = self.data[int(bad[0])]
            raise PMAccelError(got["error"], file=self.path, row=got["number"], field=got["field"])
        if not len(bad):
            return remapped(self.data), []
        import numpy as np

        keep = np.ones(len(self.data), dtype=bool)
        keep[bad] = False
        return remapped(self.data).select(np.flatnonzero(keep)), self.skipped(bad)


def load_rows(data_path: str | Path | None = None, *, num_workers: int = 0) -> RowTable:
    """Read every row of an input file into an Arrow table, checking each (SPEC §1).

    A bad row is kept in the table with its error (``RowTable.check`` raises it or skips it), so the
    table does not depend on ``on_error`` and is built once: datasets caches it by the file's path,
    size and modification time, and other processes (or a resumed run) memory-map the same files.

    Args:
        data_path: a ``.jsonl``/``.json``/``.parquet``/``.csv``/``.arrow`` file or a directory written by
            ``Dataset.save_to_disk``; ``None`` = the shipped example file.
        num_workers: worker processes that read (byte ranges of a JSON-lines file, row ranges of the
            others) when more than 1.

    Returns:
        The file's ``RowTable``.

    Raises:
        PMAccelError: a missing, unreadable or unsupported file, or a broken JSON array.

    Example:
        >>> rows = load_rows("rows.jsonl", num_workers=8)  # doctest: +SKIP
        >>> valid, skipped = rows.check(on_error="skip")  # doctest: +SKIP
    """
    import datasets

    path = check_data_path(data_path)
    name, suffix = str(path), path.suffix.lower()
    workers = num_workers if num_workers > 1 else 1
    lists_as_json = False
    if path.is_dir():
        source, shards = ("saved", name), _row_ranges(len(_load_saved_dataset(path)), workers)
        lists_as_json = True
    elif suffix in JSON_SUFFIXES:
        whole = suffix == ".json" and _read_json_whole(path) is not None
        source, shards = ("json", name) if whole else ("jsonl", name), [(0, 0, 1)] if whole else _line_shards(
            path, workers)
    else:
        source, shards = (suffix, name), _row_ranges(len(_load_with_datasets(path, num_workers)), workers)
        lists_as_json = True  # a table's column has one type: lists of mixed shapes come as JSON text cells
    features = datasets.Features({"number": datasets.Value("int64"), "fields": datasets.Value("string"),
                                  "error": datasets.Value("string"), "field": datasets.Value("string")})
    nproc = min(workers, len(shards))
    with _quiet_datasets():
        data = datasets.Dataset.from_generator(
            _generate_rows, features=features, num_proc=nproc if nproc > 1 else None,
            writer_batch_size=WRITE_BATCH_ROWS,
            gen_kwargs={"shards": shards, "source": source, "lists_as_json": lists_as_json,
                        "stamp": _stamp(path), "layout": LAYOUT})
    return RowTable(path=name, data=data, lists_as_json=lists_as_json)


def check_data_path(data_path: str | Path | None) -> Path:
    """The input's path (``None``: the shipped example), checked to exist and to be of a format pmaccel reads.

    Raises:
        PMAccelError: a missing file or an unsupported format.
    """
    path = example_path() if data_path is None else Path(data_path)
    if not path.exists():
        raise PMAccelError("data file not found; pass an existing file with --data_path", file=str(path))
    if not path.is_dir() and path.suffix.lower() not in (*JSON_SUFFIXES, *DATASETS_BUILDERS):
        raise PMAccelError(
            f"unsupported data format {path.suffix or '(no suffix)'!r}; use .jsonl, .json, .parquet, .csv, "
            ".arrow or a directory written by Dataset.save_to_disk",
            file=str(path),
        )
    return path


def read_rows(data_path: str | Path | None = None, *, on_error: str = "raise", num_workers: int = 0) -> Table:
    """Read and check the input rows (SPEC §1): ``load_rows`` and ``RowTable.check``.

    Args:
        data_path: a ``.jsonl``/``.json``/``.parquet``/``.csv``/``.arrow`` file or a directory written by
            ``Dataset.save_to_disk``; ``None`` = the shipped example file.
        on_error: ``"raise"`` stops at the first bad row; ``"skip"`` records it in ``Table.skipped``.
        num_workers: reading processes when more than 1.

    Returns:
        The valid rows, in input order (a view over the Arrow table), and the skipped ones.

    Raises:
        PMAccelError: a missing or unreadable file, or (``on_error="raise"``) a bad row, as
            ``file:row: field: problem``.

    Example:
        >>> table = read_rows("rows.jsonl")  # doctest: +SKIP
        >>> table.rows[0].branches  # doctest: +SKIP
    """
    table = load_rows(data_path, num_workers=num_workers)
    valid, skipped = table.check(on_error)
    return Table(path=table.path, rows=RowsView(valid, table.lists_as_json), skipped=skipped)


def read_columns(data: Any, names: Sequence[str], valid: Sequence[str] = ()) -> dict[str, Any]:
    """Whole columns of a dataset as numpy arrays (``valid``: whether each value is non-null), read batch by
    batch from its cache files with plain reads: through the memory map, the OS's read-ahead would bring the
    neighbouring list columns into this process's resident memory too."""
    import numpy as np
    import pyarrow as pa

    out: dict[str, list] = {n: [] for n in [*names, *valid]}
    files = [f["filename"] for f in data.cache_files]
    if data._indices is None and files and len(data.data) == len(data):
        total = 0
        for name in files:
            with pa.OSFile(name) as source:
                for batch in pa.ipc.open_stream(source):
                    total += batch.num_rows
                    for n in names:
                        out[n].append(batch.column(n).to_numpy(zero_copy_only=False).copy())
                    for n in valid:
                        out[n].append(batch.column(n).is_valid().to_numpy(zero_copy_only=False))
        if total == len(data):
            return {n: np.concatenate(v) if v else np.zeros(0) for n, v in out.items()}
        out = {n: [] for n in out}
    table = data.with_format("arrow")[:]  # in memory, or not one table per file: through the table
    return {**{n: table.column(n).to_numpy() for n in names},
            **{n: table.column(n).is_valid().to_numpy(zero_copy_only=False) for n in valid}}


def remapped(data: Any) -> Any:
    """``data`` mapped afresh from its cache files (the old mapping goes with the old object): the pages a
    process has read stay in the OS page cache but leave its resident memory, which would otherwise grow to
    the size of every table it has read through. An in-memory dataset is returned as it is."""
    import pickle

    return pickle.loads(pickle.dumps(data)) if data.cache_files else data


class RowsView(Sequence):
    """The valid rows of a table as ``Row``s, read from the Arrow table on access (nothing held; the table is
    mapped afresh every REMAP_ROWS rows read)."""

    def __init__(self, data: Any, lists_as_json: bool = False):
        self.data, self.lists_as_json = data, lists_as_json
        self._read = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.take([i % len(self)])[0]

    def take(self, positions: Sequence[int]) -> list[Row]:
        """The rows at ``positions``, in that order."""
        if not len(positions):
            return []
        self._read += len(positions)
        if self._read > REMAP_ROWS:
            self.data, self._read = remapped(self.data), len(positions)
        got = self.data[[int(p) for p in positions]]
        return [_row(n, text, self.lists_as_json) for n, text in zip(got["number"], got["fields"])]

    def __iter__(self) -> Iterator[Row]:
        for start in range(0, len(self), TAKE_CHUNK):
            yield from self.take(range(start, min(start + TAKE_CHUNK, len(self))))


def _row(number: int, text: str, lists_as_json: bool) -> Row:
    return check_row(json.loads(text), number, lists_as_json=lists_as_json)


# --- building the row table (these run in datasets' workers)


def _generate_rows(shards: list[tuple[int, int, int]], source: tuple[str, str], lists_as_json: bool,
                   stamp: Any, layout: int) -> Iterator[dict[str, Any]]:
    """The row table's entries, shard by shard: ``(start, end, first row number)`` byte ranges of a JSON-lines
    file, or row ranges of a table (``stamp`` and ``layout`` only key datasets' cache)."""
    kind, name = source
    path = Path(name)
    for start, end, first in shards:
        if kind == "jsonl":
            yield from _jsonl_entries(path, start, end, first)
        elif kind == "json":
            whole = _read_json_whole(path)
            for number, content in enumerate(whole if isinstance(whole, list) else [whole], start=1):
                yield _entry(number, content, json.dumps(content, ensure_ascii=False), lists_as_json)
        else:
            ds = _load_saved_dataset(path) if kind == "saved" else _load_with_datasets(path, 0)
            number = start + 1
            for batch in ds.select(range(start, end)).iter(batch_size=1000):
                keys = list(batch)
                for values in zip(*batch.values()):
                    content = dict(zip(keys, values))
                    yield _entry(number, content, json.dumps(content, ensure_ascii=False), lists_as_json)
                    number += 1


def _entry(number: int, content: Any, text: str, lists_as_json: bool = False) -> dict[str, Any]:
    try:
        check_row(content, number, lists_as_json=lists_as_json)
    except PMAccelError as e:
        return {"number": number, "fields": text, "error": e.problem, "field": e.field}
    return {"number": number, "fields": text, "error": None, "field": None}


def _jsonl_entries(path: Path, start: int, end: int, first: int) -> Iterator[dict[str, Any]]:
    number = first - 1
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < end:
            raw = f.readline()
            if not raw:
                return
            pos += len(raw)
            if pos == len(raw) and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            for line in raw.splitlines():  # a lone CR ends a line too
                number += 1
                if not line.strip():
                    continue
                try:
                    text = line.decode("utf-8")
                    content = json.loads(text)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    bad = line.decode("utf-8", errors="replace")
                    yield {"number": number, "fields": json.dumps(bad, ensure_ascii=False),
                           "error": _json_error(e).problem, "field": None}
                    continue
                yield _entry(number, content, text)


def _line_shards(path: Path, workers: int) -> list[tuple[int, int, int]]:
    """Byte ranges of a JSON-lines file that end at a line break, each with the number of its first line."""
    size = path.stat().st_size
    count = max(1, min(size // READ_SHARD_BYTES + 1, 4 * workers) if workers > 1 else 1)
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, count):
            f.seek(max(size * k // count, cuts[-1]))
            f.readline()  # to the next line start
            if f.tell() < size and f.tell() > cuts[-1]:
                cuts.append(f.tell())
        cuts.append(size)
        shards, number = [], 1
        for start, end in zip(cuts, cuts[1:]):
            shards.append((start, end, number))
            f.seek(start)
            left = end - start
            after_cr = False
            while left > 0:  # line breaks as bytes.splitlines counts them (LF, CRLF, CR)
                chunk = f.read(min(left, 16 << 20))
                left -= len(chunk)
                number += chunk.count(b"\n") + chunk.count(b"\r") - chunk.count(b"\r\n")
                number -= after_cr and chunk.startswith(b"\n")  # a CRLF split between two reads
                after_cr = chunk.endswith(b"\r")
    return shards


def _row_ranges(n: int, workers: int) -> list[tuple[int, int, int]]:
    count = max(1, min(-(-n // READ_SHARD_ROWS), 4 * workers)) if workers > 1 else 1
    cuts = [n * k // count for k in range(count + 1)]
    return [(a, b, a + 1) for a, b in zip(cuts, cuts[1:])]


def _stamp(path: Path) -> str:
    """What identifies the file's content for the cache: name, size and modification time (of every file
    of a dataset directory)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return _digest([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def _read_json_whole(path: Path) -> Any:
    """A ``.json`` file that is one JSON document (an array of rows, or one row): its value; ``None`` for
    JSON lines. A broken array is an error (it cannot be read row by row)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8):].lstrip()
    if head[:1] not in (b"[", b"{"):
        return None
    raw = path.read_bytes()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if head[:1] == b"[":
            raise _json_error(e, str(path)) from None
        return None


def _json_error(e: ValueError, file: str | None = None) -> PMAccelError:
    if isinstance(e, json.JSONDecodeError):
        message = f"malformed JSON: {e.msg} at column {e.colno}"
        return PMAccelError(message, file=file, row=e.lineno) if file else PMAccelError(message)
    return PMAccelError(f"not valid UTF-8 text: {e}", file=file)


def _load_with_datasets(path: Path, num_workers: int) -> Any:
    import datasets

    try:
        with _quiet_datasets():
            return datasets.load_dataset(DATASETS_BUILDERS[path.suffix.lower()], data_files=str(path),
                                         split="train", num_proc=num_workers if num_workers > 1 else None)
    except Exception as e:  # a corrupt or unreadable file: datasets/pyarrow raise many kinds
        raise PMAccelError(f"cannot read the file: {_first_line(e)}", file=str(path)) from None


def _load_saved_dataset(path: Path) -> Any:
    import datasets

    if not any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise PMAccelError("a directory must be a dataset written by Dataset.save_to_disk; or pass a file",
                           file=str(path))
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged dataset directory
        raise PMAccelError(f"cannot read the dataset: {_first_line(e)}", file=str(path)) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise PMAccelError(f"the dataset has splits {', '.join(ds)}; save one split or a 'train' split",
                               file=str(path))
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _quiet_datasets:  # noqa: N801 (used as a context manager)
    """No progress bars from datasets while it builds a table (the run has its own)."""

    def __enter__(self) -> None:
        import datasets

        self.was = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()

    def __exit__(self, *exc: object) -> None:
        import datasets

        if self.was:
            datasets.enable_progress_bars()


# ----------------------------------------------------------------------------- checking one row


def check_row(content: Any, number: int, *, lists_as_json: bool = False) -> Row:
    """Check one row's structure and return it as a ``Row`` (parallel or flat).

    Raises:
        PMAccelError: with the offending field, but without file and row (the caller adds them).
    """
    if not isinstance(content, Mapping):
        raise PMAccelError(f"a row must be a JSON object, got {_type_name(content)}")
    fields = dict(content)
    if fields.get("branches") is not None:
        branches = fields["branches"]
        if lists_as_json and isinstance(branches, str) and branches.lstrip().startswith("["):
            branches = _json_list(branches)
        if not isinstance(branches, Sequence) or isinstance(branches, str | bytes):
            raise PMAccelError(f"branches must be a list, got {_type_name(branches)}", field="branches")
        if len(branches) == 0:
            raise PMAccelError("branches is empty; give at least one branch", field="branches")
        main = fields.get("main")
        if main is not None and not isinstance(main, str):
            raise PMAccelError(f"main must be a string, got {_type_name(main)}", field="main")
        checked = [_check_branch(b, f"branches[{k}]") for k, b in enumerate(branches)]
        return Row(number=number, fields=fields, flat=False, main=main or "", branches=checked)
    for key in FLAT_KEYS:
        if fields.get(key) is not None:
            value = fields[key]
            score = {k: fields[k] for k in SCORE_KEYS if fields.get(k) is not None}
            if lists_as_json and key == "input_ids":  # CSV cells are strings: ids (and id targets) as JSON lists
                value = _json_cell(value, key)
                if "target" in score:
                    score["target"] = _json_cell(score["target"], "target")
            source = {"input_ids": value} if key == "input_ids" else value
            if score:  # a flat row to score: keep its target
                source = {"input_ids" if key == "input_ids" else "text": value, **score}
            branch = _check_branch(source, key)
            return Row(number=number, fields=fields, flat=True, main="", branches=[branch], key=key)
    raise PMAccelError("the row has neither 'branches' (a parallel row) nor 'text', 'prompt' or 'input_ids' "
                       "(a flat row)")


def _check_branch(branch: Any, name: str) -> str | dict[str, Any]:
    if isinstance(branch, str):
        return branch
    if isinstance(branch, Mapping):
        ids, text = branch.get("input_ids"), branch.get("text")
        if ids is not None:
            if _is_ids(ids):
                return {"input_ids": list(ids), **_score_fields(branch)}
            raise PMAccelError(f"input_ids must be a list of integers, got {_type_name(ids)}", field=name)
        if isinstance(text, str):
            return {"text": text, **_score_fields(branch)}
        if text is None and branch.get("target") is not None:  # scoring: a target with no prompt of its own
            return {"text": "", **_score_fields(branch)}
    raise PMAccelError(
        f"a branch must be a string, {{'text': str}} or {{'input_ids': [int]}}, got {_type_name(branch)}",
        field=name,
    )


def _is_ids(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _score_fields(branch: Mapping[str, Any]) -> dict[str, Any]:
    """A branch's ``target`` and ``answer_offset``, as given (``pmaccel score`` checks them; infer ignores them)."""
    return {k: branch[k] for k in SCORE_KEYS if branch.get(k) is not None}


def _json_list(text: str, field: str = "branches") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PMAccelError(f"malformed JSON list: {e.msg} at column {e.colno}", field=field) from None


def _json_cell(value: Any, field: str) -> Any:
    return _json_list(value, field) if isinstance(value, str) and value.lstrip().startswith("[") else value


def _type_name(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"an object with keys {sorted(map(str, value))}" if value else "an empty object"
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
            type(None): "null"}.get(type(value), type(value).__name__)


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
                           LAYOUT])
    if not len(rows):  # every row skipped
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    parts = []
    for start in range(0, len(rows), TOKENIZE_RANGE):  # a range at a time, each from a fresh mapping of the rows
        end = min(start + TOKENIZE_RANGE, len(rows))
        part = rows if end - start == len(rows) else remapped(rows).select(range(start, end))
        nproc = num_workers if num_workers > 1 and len(part) > TOKENIZE_BATCH else None
        with _quiet_datasets():
            parts.append(part.map(fn, batched=True, batch_size=TOKENIZE_BATCH, num_proc=nproc, features=features,
                                  remove_columns=rows.column_names,
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
    return [[list(ids[x]) if isinstance(x, int) else x for x in per_row] for per_row in slots]


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


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class SampleTable(Sequence):
    """The samples of a run (SPEC §1, §8): which valid rows make each (numpy arrays), materialised on request.

    ``samples[i]`` / ``take(indices)`` read just those rows from the Arrow tables; nothing else is held, so
    each process materialises only the samples it works on.
    """

    path: str
    rows: RowsView  # the valid rows
    tokens: Any  # ``tokenize_rows``' dataset, aligned with ``rows``
    offsets: Any  # [S + 1]: sample s's rows are positions[offsets[s]:offsets[s + 1]]
    positions: Any  # positions in ``rows``, sample by sample
    num_tokens: Any  # [S] prompt tokens
    num_branches: Any  # [S]
    flat: Any  # [S] bool
    _read: int = 0  # token rows read since ``tokens`` was mapped

    def __len__(self) -> int:
        return len(self.num_tokens)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.take([i % len(self)])[0]

    def __iter__(self) -> Iterator[Sample]:
        for start in range(0, len(self), TAKE_CHUNK):
            yield from self.take(range(start, min(start + TAKE_CHUNK, len(self))))

    def sample_rows(self, index: int) -> tuple[int, ...]:
        """Positions (in ``rows``) of sample ``index``'s rows."""
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
                self.tokens, self._read = remapped(self.tokens), len(wanted)
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

    columns = read_columns(tokens, ["flat", "num_tokens", "num_branches"], valid=["tok_error"])
    flat, bad = columns["flat"].astype(bool), columns["tok_error"].astype(bool)
    ntok, nbr = columns["num_tokens"].astype(np.int64), columns["num_branches"].astype(np.int64)
    found: list[int] = []  # positions of rows that cannot be used

    def on_bad(pos: int) -> None:
        if grouping.on_error != "skip":
            got = tokens[pos]
            raise PMAccelError(got["tok_error"], file=path, row=rows[pos].number, field=got["tok_field"])
        found.append(pos)

    limit = grouping.max_samples or None
    offsets, positions, counts, kinds = array("q", [0]), array("q"), array("q"), array("b")
    if not flat.any() and not bad.any():  # parallel rows only: one sample each
        n = len(ntok) if limit is None else min(limit, len(ntok))
        offsets, positions = np.arange(n + 1), np.arange(n)
        counts, kinds = ntok[:n], np.zeros(n, dtype=bool)
    else:
        for group, is_flat, load in itertools.islice(_groups(flat.tolist(), ntok.tolist(), bad.tolist(), grouping,
                                                             on_bad), limit):
            positions.extend(group)
            offsets.append(len(positions))
            counts.append(load)
            kinds.append(is_flat)
    offsets, positions = np.asarray(offsets, dtype=np.int64), np.asarray(positions, dtype=np.int64)
    kinds = np.asarray(kinds, dtype=bool)
    counts = np.asarray(counts, dtype=np.int64)
    branches = np.where(kinds, np.diff(offsets), nbr[positions[offsets[:-1]]] if len(positions) else 0)
    samples = SampleTable(path=path, rows=rows, tokens=remapped(tokens), offsets=offsets, positions=positions,
                          num_tokens=counts, num_branches=branches.astype(np.int64), flat=kinds)
    more = []
    if found:
        got = rows.data[found]
        more = [Skipped(number=n, error=_error_text(path, n, tokens[p]["tok_error"], tokens[p]["tok_field"]),
                        content=json.loads(text)) for p, n, text in zip(found, got["number"], got["fields"])]
    every = sorted([*skipped, *more], key=lambda s: s.number)
    if limit is not None and len(samples) == limit and len(samples):
        last = rows[int(positions[-1])].number
        every = [s for s in every if s.number <= last]
    return samples, every


def _groups(flat: list[bool], ntok: list[int], bad: list[bool], g: Grouping,
            on_bad: Callable[[int], None]) -> Iterator[tuple[list[int], bool, int]]:
    """``(row positions, flat, prompt tokens)`` per sample, in order; ``on_bad(position)`` for a row that cannot
    be used, when it is reached."""
    rng = random.Random(g.seed)
    group: list[int] = []  # positions of the flat rows of the sample being built
    target = load = 0
    for pos, (is_flat, n) in enumerate(zip(flat, ntok)):
        if group and (not is_flat or len(group) >= target):
            yield group, True, load
            group = []
        if bad[pos]:
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
