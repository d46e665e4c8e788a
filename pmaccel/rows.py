"""Input rows (SPEC §1, §8), read through HF ``datasets`` and checked; ``pmaccel.grouping`` makes samples of them.

    load_rows      file -> ``RowTable``: an Arrow table of the rows as read (one JSON text each, with its
                   line number and, for a bad row, its error), built once with ``Dataset.from_generator``
                   (workers read byte ranges of a JSON-lines file) and memory-mapped from datasets' cache
    check_row      one row's structure (main, branches, flat fields, targets), no tokenizer needed
    read_rows      the same as a ``Table`` of ``Row``s (previews, small inputs)

Reading and the structural checks need no tokenizer, so bad input is reported before the model
loads. Rows keep their own keys, in their own order (the JSON text of each row is what is stored).
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmaccel.errors import PMAccelError
from pmaccel.samples import is_token_ids

FLAT_KEYS = ("text", "prompt", "input_ids")
TARGET_KEYS = ("target", "answer_offset")  # what ``pmaccel score`` reads from a branch (or a flat row)
DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
LAYOUT = 2  # part of every cache fingerprint: bump when what the row or token tables hold changes
READ_SHARD_BYTES = 32 << 20  # a JSON-lines file is read in byte ranges of about this size
READ_SHARD_ROWS = 200_000  # rows of a parquet/csv/arrow table per reading task
WRITE_BATCH_ROWS = 10_000  # rows per record batch of the row table: opening a mapping reads every batch's header
TAKE_CHUNK = 4096  # samples materialised at a time when a whole table is iterated
REMAP_ROWS = 16384  # rows read through a memory-mapped table before it is mapped afresh (bounds RSS; 2 ms a time)


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


def read_columns(data: Any, names: Sequence[str], valid: Sequence[str] = (),
                 dtypes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Whole columns of a dataset as numpy arrays (``valid``: whether each value is non-null), read batch by
    batch from its cache files with plain reads: through the memory map, the OS's read-ahead would bring the
    neighbouring list columns into this process's resident memory too. Each column is one array filled batch
    by batch (no per-batch copies concatenated at the end: half the peak); ``dtypes``: the numpy dtype a
    column is read into (cast as ``astype`` casts), so a narrower one is never held at full width."""
    import numpy as np
    import pyarrow as pa

    dtypes = dict(dtypes or {})
    files = [f["filename"] for f in data.cache_files]

    def batches() -> Iterator[Any]:
        for name in files:
            with pa.OSFile(name) as source:
                yield from pa.ipc.open_stream(source)

    if data._indices is None and files and len(data.data) == len(data):
        out: dict[str, Any] = {}
        at = 0
        for batch in batches():
            end = at + batch.num_rows
            if end > len(data):  # not the table's rows alone: read through the table
                at = -1
                break
            got = {n: batch.column(n).to_numpy(zero_copy_only=False) for n in names}
            got.update({n: batch.column(n).is_valid().to_numpy(zero_copy_only=False) for n in valid})
            for n, values in got.items():
                column = out.get(n)
                if column is None:
                    column = out[n] = np.empty(len(data), dtype=dtypes.get(n, values.dtype))
                elif n not in dtypes and np.result_type(column, values) != column.dtype:  # a batch with nulls
                    column = out[n] = column.astype(np.result_type(column, values))
                column[at:end] = values
            at = end
        if at == len(data):
            return {n: out[n] if n in out else np.zeros(0, dtype=dtypes.get(n, float)) for n in [*names, *valid]}
    table = data.with_format("arrow")[:]  # in memory, or not one table per file: through the table
    got = {**{n: table.column(n).to_numpy() for n in names},
           **{n: table.column(n).is_valid().to_numpy(zero_copy_only=False) for n in valid}}
    return {n: v.astype(dtypes[n], copy=False) if n in dtypes else v for n, v in got.items()}


def remapped(data: Any) -> Any:
    """``data`` mapped afresh from its cache files (the old mapping goes with the old object): the pages a
    process has read stay in the OS page cache but leave its resident memory, which would otherwise grow to
    the size of every table it has read through. An in-memory dataset is returned as it is."""
    import pickle

    return pickle.loads(pickle.dumps(data)) if data.cache_files else data


def remap(owner: Any, name: str) -> None:
    """``owner.<name>`` (a dataset) mapped afresh as ``remapped`` maps it, the old mapping released before the
    new one is opened: opening a mapping reads every record batch's header, and a process never holds both
    mappings' pages at once."""
    import pickle

    if not getattr(owner, name).cache_files:
        return
    state = pickle.dumps(getattr(owner, name))
    setattr(owner, name, None)  # the last reference to the old mapping (reads return copies, not views)
    setattr(owner, name, pickle.loads(state))


class TakeSequence(Sequence):
    """A sequence read in batches: subclasses define ``__len__`` and ``take(positions)``; an item or a slice
    is a ``take`` of those positions."""

    def take(self, positions: Sequence[int]) -> list:
        raise NotImplementedError

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.take([i % len(self)])[0]


class RowsView(TakeSequence):
    """The valid rows of a table as ``Row``s, read from the Arrow table on access (nothing held; the table is
    mapped afresh every REMAP_ROWS rows read)."""

    def __init__(self, data: Any, lists_as_json: bool = False):
        self.data, self.lists_as_json = data, lists_as_json
        self._read = 0

    def __len__(self) -> int:
        return len(self.data)

    def take(self, positions: Sequence[int]) -> list[Row]:
        """The rows at ``positions``, in that order."""
        if not len(positions):
            return []
        self._read += len(positions)
        if self._read > REMAP_ROWS:
            remap(self, "data")
            self._read = len(positions)
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
            score = {k: fields[k] for k in TARGET_KEYS if fields.get(k) is not None}
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
            if is_token_ids(ids):
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


def _score_fields(branch: Mapping[str, Any]) -> dict[str, Any]:
    """A branch's ``target`` and ``answer_offset``, as given (``pmaccel score`` checks them; infer ignores them)."""
    return {k: branch[k] for k in TARGET_KEYS if branch.get(k) is not None}


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


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]
