"""Input rows → samples (SPEC §1, §8).

    read_rows     file (JSONL/JSON/Parquet/CSV/Arrow/saved dataset) -> validated ``Row``s
    make_samples  rows -> ``Sample``s: a parallel row is one sample, flat rows are grouped

Reading and the structural checks need no tokenizer, so bad input is reported before the model
loads. JSON and JSONL are parsed here, line by line (a malformed line is reported as ``file:line``
and rows keep their own keys, in their own order); the other formats go through HF ``datasets``.
Grouping runs over ALL rows on every process, deterministically, so samples (and their indices)
do not depend on the number of processes.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmaccel.errors import PMAccelError
from pmaccel.samples import tokenize_sample

FLAT_KEYS = ("text", "prompt", "input_ids")
SCORE_KEYS = ("target", "answer_offset")  # what ``pmaccel score`` reads from a branch (or a flat row)
DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
TOKENIZE_CHUNK = 512  # rows tokenized per call of the tokenizer
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


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
    """The rows of one input file."""

    path: str
    rows: list[Row]
    skipped: list[Skipped] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    """One unit of parallel decoding: ``main`` and its branches, from one parallel row or several flat rows.

    ``rows`` are the positions in ``Table.rows`` of the rows it came from (one per branch when flat).
    """

    index: int
    rows: tuple[int, ...]
    flat: bool
    main: str
    branches: list[str | dict[str, Any]]
    num_tokens: int = 0  # prompt tokens (with chat_template: the sum of the branches' full templates)

    def as_input(self) -> dict[str, Any]:
        """The sample as ``pmaccel.generate`` takes it."""
        return {"main": self.main, "branches": self.branches}


class _Errors:
    """Raise a row's error, or with ``on_error="skip"`` record it and go on."""

    def __init__(self, path: str, on_error: str, skipped: list[Skipped] | None = None):
        self.path, self.on_error = path, on_error
        self.skipped = skipped if skipped is not None else []

    def handle(self, error: PMAccelError, number: int, content: Any) -> None:
        error = PMAccelError(error.problem, file=self.path, row=number, field=error.field)
        if self.on_error != "skip":
            raise error
        self.skipped.append(Skipped(number=number, error=str(error), content=content))


# ----------------------------------------------------------------------------- reading


def read_rows(data_path: str | Path | None = None, *, on_error: str = "raise", num_workers: int = 0) -> Table:
    """Read and check the input rows (SPEC §1).

    Args:
        data_path: a ``.jsonl``/``.json``/``.parquet``/``.csv``/``.arrow`` file or a directory written by
            ``Dataset.save_to_disk``; ``None`` = the shipped example file.
        on_error: ``"raise"`` stops at the first bad row; ``"skip"`` records it in ``Table.skipped``.
        num_workers: ``num_proc`` for ``datasets.load_dataset`` when more than 1.

    Returns:
        The valid rows, in input order, and the skipped ones.

    Raises:
        PMAccelError: a missing or unreadable file, or (``on_error="raise"``) a bad row, as
            ``file:row: field: problem``.

    Example:
        >>> table = read_rows("rows.jsonl")  # doctest: +SKIP
        >>> table.rows[0].branches  # doctest: +SKIP
    """
    path = example_path() if data_path is None else Path(data_path)
    name = str(path)
    if not path.exists():
        raise PMAccelError("data file not found; pass an existing file with --data_path", file=name)
    errors = _Errors(name, on_error)
    if path.is_dir():
        records = enumerate(_load_saved_dataset(path), start=1)
        lists_as_json = False
    elif path.suffix.lower() in JSON_SUFFIXES:
        records = _read_json(path, errors)
        lists_as_json = False
    elif path.suffix.lower() in DATASETS_BUILDERS:
        records = enumerate(_load_with_datasets(path, num_workers), start=1)
        lists_as_json = path.suffix.lower() == ".csv"  # CSV cells are strings: branches as a JSON list
    else:
        raise PMAccelError(
            f"unsupported data format {path.suffix or '(no suffix)'!r}; use .jsonl, .json, .parquet, .csv, "
            ".arrow or a directory written by Dataset.save_to_disk",
            file=name,
        )
    rows = []
    for number, content in records:
        try:
            rows.append(check_row(content, number, lists_as_json=lists_as_json))
        except PMAccelError as e:
            errors.handle(e, number, content)
    return Table(path=name, rows=rows, skipped=errors.skipped)


def _read_json(path: Path, errors: _Errors) -> Iterator[tuple[int, Any]]:
    """``(number, value)`` per row of a JSON array/object file or a JSON-lines file."""
    raw = path.read_bytes()
    if path.suffix.lower() == ".json" and raw.lstrip()[:1] in (b"[", b"{"):
        try:
            whole = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if raw.lstrip()[:1] == b"[":  # a broken array cannot be read row by row
                raise _json_error(e, str(path)) from None
        else:
            yield from enumerate(whole if isinstance(whole, list) else [whole], start=1)
            return
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            errors.handle(_json_error(e), number, line.decode("utf-8", errors="replace"))


def _json_error(e: ValueError, file: str | None = None) -> PMAccelError:
    if isinstance(e, json.JSONDecodeError):
        message = f"malformed JSON: {e.msg} at column {e.colno}"
        return PMAccelError(message, file=file, row=e.lineno) if file else PMAccelError(message)
    return PMAccelError(f"not valid UTF-8 text: {e}", file=file)


def _load_with_datasets(path: Path, num_workers: int) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(DATASETS_BUILDERS[path.suffix.lower()], data_files=str(path),
                                   split="train", num_proc=num_workers if num_workers > 1 else None)
    except Exception as e:  # a corrupt or unreadable file: datasets/pyarrow raise many kinds
        raise PMAccelError(f"cannot read the file: {_first_line(e)}", file=str(path)) from None
    return ds.to_list()


def _load_saved_dataset(path: Path) -> list[dict[str, Any]]:
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
    return ds.to_list()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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


def make_samples(table: Table, tokenizer: Any, grouping: Grouping,
                 count: Callable[[Row], int] | None = None) -> tuple[list[Sample], list[Skipped]]:
    """Turn rows into samples (SPEC §1, §8), checking that every branch tokenizes.

    A parallel row is one sample. Consecutive flat rows are grouped: ``branches_per_sample`` per
    sample, or a count drawn from ``[min, max]_branches_per_sample`` by ``random.Random(seed)``;
    with ``max_total_tokens`` a group also closes before its prompt tokens would pass the budget
    (with ``chat_template``, each branch counts with its full template). A branch over the budget
    alone is an error. Stops after ``max_samples`` samples.

    Args:
        table: rows from ``read_rows``.
        tokenizer: the model's tokenizer (to count tokens and catch branches with none).
        grouping: the grouping settings.
        count: ``row -> tokens``, raising ``PMAccelError`` for a row that cannot be used; default: the
            prompt tokens of its branches (``pmaccel score`` counts prompts and targets, and checks them).

    Returns:
        The samples, indexed 0.., and every skipped row up to the last row used, by row number.

    Raises:
        PMAccelError: a row that does not tokenize or is over budget (``on_error="raise"``).
    """
    errors = _Errors(table.path, grouping.on_error, list(table.skipped))
    limit = grouping.max_samples or None
    samples = list(itertools.islice(_iter_samples(table, tokenizer, grouping, errors, count), limit))
    if limit is not None and len(samples) == limit and samples:
        last = table.rows[samples[-1].rows[-1]].number
        errors.skipped = [s for s in errors.skipped if s.number <= last]
    return samples, sorted(errors.skipped, key=lambda s: s.number)


def _iter_samples(table: Table, tokenizer: Any, g: Grouping, errors: _Errors,
                  count: Callable[[Row], int] | None) -> Iterator[Sample]:
    # rows are tokenized a chunk at a time as the samples before them go out, so max_samples stops early
    rng = random.Random(g.seed)
    counter = itertools.count()
    group: list[int] = []  # positions of the flat rows of the sample being built
    target = load = 0

    def close() -> Sample:
        nonlocal group
        rows, group = group, []
        return Sample(index=next(counter), rows=tuple(rows), flat=True, main="",
                      branches=[table.rows[p].branches[0] for p in rows], num_tokens=load)

    for pos, row, n in _counted(table.rows, tokenizer, g, count):
        if group and (not row.flat or len(group) >= target):
            yield close()
        if isinstance(n, PMAccelError):
            errors.handle(n, row.number, row.fields)
            continue
        if not row.flat:
            yield Sample(index=next(counter), rows=(pos,), flat=False, main=row.main, branches=row.branches,
                         num_tokens=n)
            continue
        if group and g.max_total_tokens and load + n > g.max_total_tokens:
            yield close()
        if not group:
            target = (rng.randint(g.min_branches_per_sample, g.max_branches_per_sample)
                      if g.max_branches_per_sample else g.branches_per_sample)
            load = 0
        group.append(pos)
        load += n
    if group:
        yield close()


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


def _counted(rows: Sequence[Row], tokenizer: Any, g: Grouping,
             count: Callable[[Row], int] | None) -> Iterator[tuple[int, Row, int | PMAccelError]]:
    """``(position, row, prompt tokens or the row's error)``, tokenizing TOKENIZE_CHUNK rows per call of
    the (fast, batched) tokenizer where the prompt is plain text: one call per row cost ~10x more."""
    batched = count is None and not g.chat_template
    for start in range(0, len(rows), TOKENIZE_CHUNK):
        chunk = rows[start:start + TOKENIZE_CHUNK]
        lengths = _piece_lengths(chunk, tokenizer) if batched else [None] * len(chunk)
        for pos, (row, pieces) in enumerate(zip(chunk, lengths), start):
            try:
                yield pos, row, _count_tokens(row, tokenizer, g, count, pieces)
            except PMAccelError as e:
                yield pos, row, e


def _piece_lengths(rows: Sequence[Row], tokenizer: Any) -> list[list[int]]:
    """Per row, the token count of main and of each branch (text tokenized in one batch, without special
    tokens, as ``tokenize_sample`` does; given ids counted as they are)."""
    texts: list[str] = []
    slots: list[list[int | str]] = []  # per row: a count, or a text's place in `texts`
    for row in rows:
        per_row: list[int | str] = []
        for piece in [row.main, *row.branches]:
            text = piece if isinstance(piece, str) else piece.get("text") if "input_ids" not in piece else None
            if text is None:
                per_row.append(len(piece["input_ids"]))
            elif not text:
                per_row.append(0)
            else:
                per_row.append(str(len(texts)))
                texts.append(text)
        slots.append(per_row)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [[len(ids[int(x)]) if isinstance(x, str) else x for x in per_row] for per_row in slots]


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
    except PMAccelError as e:
        raise PMAccelError(e.problem, field=row.key if row.flat else e.field) from None
    if g.vocab_size is not None:
        _check_ids(row, g.vocab_size)
    if row.flat and g.max_total_tokens and n > g.max_total_tokens:
        raise PMAccelError(
            f"the branch has {n} prompt tokens, more than max_total_tokens={g.max_total_tokens}; "
            "raise max_total_tokens or shorten the text (branches are never cut)",
            field=row.key,
        )
    return n
