"""Output (SPEC §7): one JSONL line per input row, in input order, written once and renamed into place;
plus the per-rank part files that make a run resumable.

    check_writable      fail before the model loads if the output cannot be written
    sample_keys         what a finished sample is remembered by: (index, settings, sample) digest
    PartWriter          each rank appends its finished samples, flushed and fsynced per batch
    PartResults         every part file of any world size: where each finished result lies, by (index, key)
                        (numpy offsets, not results; sorted a range of indices at a time, the rest on disk)
    row_records         a sample's result -> the output records of its rows
    write_jsonl         ``<path>.tmp`` then ``os.replace``: no partial or overwritten output on error
    write_json          the same for ``<out>.summary.json`` (dataset totals of score / compare / leakage)

A part file line is ``{"index": i, "key": k, "result": {...}}``. The key digests the settings that
change a result and the sample itself, so a resumed run reuses a line only where it would compute
the same thing; a line cut by a crash is ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pmaccel.errors import PMAccelError

PARALLEL_KEYS = ("outputs", "finish_reasons", "num_generated_tokens")  # added to a parallel row
FLAT_KEYS = ("output", "finish_reason", "num_generated_tokens")  # added to a flat row
RESULT_KEYS = ("outputs", "finish_reasons", "num_generated_tokens")  # kept from a generate() result


def dumps(record: Any) -> str:
    """The one JSON form of a line: UTF-8 text as is, keys in their given order."""
    return json.dumps(record, ensure_ascii=False)


def check_writable(out_path: str | os.PathLike) -> Path:
    """Create the output's directory if needed and check that files can be written in it.

    Raises:
        PMAccelError: the path is a directory, or its directory cannot be created or written.
    """
    path = Path(out_path)
    if path.is_dir():
        raise PMAccelError(f"{path} is a directory; give the path of a .jsonl file", field="out_path")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise PMAccelError(f"cannot write in the output directory {parent}: {e.strerror or e}; "
                           "choose a writable --out_path", field="out_path") from None
    return path


def errors_path(out_path: Path) -> Path:
    """Where skipped rows go with ``on_error="skip"``."""
    return out_path.with_name(out_path.name + ".errors.jsonl")


def summary_path(out_path: Path) -> Path:
    """Where a run writes its summary (counts, dataset totals, per-rank timings)."""
    return out_path.with_name(out_path.name + ".summary.json")


# ----------------------------------------------------------------------------- resume bookkeeping


def settings_digest(settings: Any, ignore: Sequence[str] = ()) -> str:
    """Digest of the settings whose change changes a sample's result (field metadata ``result``), less
    the ``ignore``d ones (settings a job does not use)."""
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
              if f.metadata.get("result", True) and f.name not in ignore}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def sample_keys(samples: Sequence[Any], settings: Any, *, kind: str = "",
                ignore: Sequence[str] = (), runtime: str = "") -> list[str]:
    """One key per sample: the same on every rank and run iff the sample's result would be the same.

    ``kind`` names what the result is (``""`` for decoding, ``"score"``, ...): results of another
    kind are never reused. ``ignore``: settings that do not change this kind's results. ``runtime``:
    what the settings do not say but the numbers depend on (the resolved dtype and device type), so
    a run resumed in bf16 on a GPU never mixes in float32 results from the CPU.
    """
    digest = settings_digest(settings, ignore)
    head = [digest, kind] if kind else [digest]
    if runtime:
        head.append(runtime)
    return [
        hashlib.sha256(json.dumps([*head, s.index, s.as_input()], sort_keys=True, ensure_ascii=False)
                       .encode()).hexdigest()[:32]
        for s in samples
    ]


@contextlib.contextmanager
def exclusive(out_path: Path) -> Iterator[None]:
    """One run at a time writes ``out_path``: a second one (another process, another notebook kernel) waits
    for the first to finish, so that neither removes part files the other still needs."""
    from filelock import FileLock, Timeout

    path = out_path.with_name(out_path.name + ".lock")
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"pmaccel: waiting for another run writing {out_path} to finish", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
        path.unlink(missing_ok=True)  # no lock file left beside the output


def part_path(out_path: Path, rank: int, world_size: int) -> Path:
    """The part file of one rank: ``<out>.part-<rank>-of-<world>.jsonl``."""
    return out_path.with_name(f"{out_path.name}.part-{rank:05d}-of-{world_size:05d}.jsonl")


def find_part_files(out_path: Path) -> list[Path]:
    """Part files of any earlier run to the same output, whatever its number of processes."""
    return sorted(out_path.parent.glob(f"{_glob_escape(out_path.name)}.part-*-of-*.jsonl"))


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


INDEX_RANGE = 1 << 19  # sample indices whose results' places PartResults holds sorted in memory at once
INDEX_BUFFER = 16 << 20  # bytes of places PartResults gathers in memory before they go to files on disk
_PLACE = None  # numpy dtype of one place (set on first use: numpy loads with a run)


def _place_dtype() -> Any:
    import numpy as np

    global _PLACE
    if _PLACE is None:  # 26 bytes, packed: index, key digest, file, byte offset
        _PLACE = np.dtype([("index", "<i8"), ("key", "<u8"), ("file", "<u2"), ("offset", "<i8")])
    return _PLACE


class PartResults:
    """Where each finished result lies in the part files this process can see, by ``(sample index, key)``:
    places (index, key digest, file, byte offset; 26 bytes a result), not results; ``get`` reads one. Cut
    lines are skipped.

    The places are gathered per range of INDEX_RANGE sample indices; once they pass INDEX_BUFFER bytes they
    go to one file per range in a temporary directory beside the output (removed by ``close``). A lookup
    sorts the places of its range alone, and the one range last looked up stays in memory, so memory does
    not grow with the part files when the lookups come in index order (a merge, a resume): a range is
    read and sorted once.

    Example:
        >>> with PartResults(Path("out.jsonl")) as found:  # doctest: +SKIP
        ...     result = found.get(0, key) if (0, key) in found else None
    """

    def __init__(self, out_path: Path, share: tuple[int, int] | None = None):
        """``share``: ``(k, n)`` keeps the results of the sample indices ``i % n == k`` only; the others'
        lines are passed over without being parsed."""
        self.paths = find_part_files(out_path)
        self._files: dict[int, Any] = {}
        self._out_path = out_path
        self._dir: Path | None = None  # the ranges' files, once the places outgrow INDEX_BUFFER
        self._cleanup: Any = None
        self._buffers: dict[int, bytearray] = {}  # per range: places not yet in its file
        self._ranges: set[int] = set()
        self._count = 0
        self._loaded: tuple[int, Any, Any, Any] | None = None  # (range, index, key, place), sorted by index
        pack, size, buffered = struct.Struct("<qQHq").pack, _place_dtype().itemsize, 0
        for n, path in enumerate(self.paths):
            for at, entry in _read_part_lines(path, share):
                digest = _key64(entry["key"])
                if digest is None:
                    continue
                index = entry["index"]
                part = index // INDEX_RANGE
                buffer = self._buffers.get(part)
                if buffer is None:
                    buffer = self._buffers[part] = bytearray()
                    self._ranges.add(part)
                buffer += pack(index, digest, n, at)
                self._count += 1
                buffered += size
                if buffered >= INDEX_BUFFER:
                    self._spill()
                    buffered = 0
        if self._dir is not None:
            self._spill()  # every range's places in its file

    def _spill(self) -> None:
        """The gathered places to their ranges' files (appended: a range's places keep the part files' order)."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(dir=self._out_path.parent, prefix=f".{self._out_path.name}.places-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        for part, buffer in self._buffers.items():
            with open(self._dir / f"{part}.bin", "ab") as f:
                f.write(buffer)
        self._buffers.clear()

    def _range(self, part: int) -> tuple[Any, Any, Any]:
        """The places of sample indices ``[part * INDEX_RANGE, (part + 1) * INDEX_RANGE)``, sorted by index
        (stable: in part-file order within an index): index, key digest and ``file | offset << 16``."""
        import numpy as np

        if self._loaded is None or self._loaded[0] != part:
            self._loaded = None  # the previous range goes first
            if self._dir is not None and part in self._ranges:
                raw: Any = (self._dir / f"{part}.bin").read_bytes()
            else:
                raw = self._buffers.get(part, b"")
            places = np.frombuffer(raw, dtype=_place_dtype())
            order = np.argsort(places["index"], kind="stable")
            where = places["offset"][order] << 16
            where |= places["file"][order]
            self._loaded = (part, places["index"][order], places["key"][order], where)
        return self._loaded[1:]

    def __len__(self) -> int:
        return self._count

    def index_ranges(self) -> Iterator[Any]:
        """The sample indices with at least one result: a sorted numpy array per range of INDEX_RANGE indices
        that has any, in index order."""
        import numpy as np

        for part in sorted(self._ranges):
            yield np.unique(self._range(part)[0])

    def locate(self, indices: Sequence[int], keys: Sequence[str]) -> Any:
        """Per ``(indices[j], keys[j])``, where its result lies, for ``read`` (-1: none), for a whole chunk at
        once (numpy int64 array)."""
        import numpy as np

        index = np.asarray(indices, dtype=np.int64)
        digests = [_key64(k) for k in keys]
        digest = np.array([0 if d is None else d for d in digests], dtype=np.uint64)
        known = np.array([d is not None for d in digests], dtype=bool)
        out = np.full(len(index), -1, dtype=np.int64)
        parts = index // INDEX_RANGE
        for part in np.unique(parts[known]).tolist() if known.any() else []:
            if part not in self._ranges:
                continue
            chunk = np.flatnonzero(known & (parts == part))
            out[chunk] = self._locate(self._range(part), index[chunk], digest[chunk])
        return out

    @staticmethod
    def _locate(places: tuple[Any, Any, Any], index: Any, digest: Any) -> Any:
        import numpy as np

        by_index, key, where = places
        lo, hi = np.searchsorted(by_index, index, "left"), np.searchsorted(by_index, index, "right")
        out = np.full(len(index), -1, dtype=np.int64)
        has = hi > lo
        hit = has & (key[np.where(has, lo, 0)] == digest)  # usually one result per index: the first
        out[hit] = where[lo[hit]]
        for j in np.flatnonzero(has & ~hit & (hi - lo > 1)):  # several keys for one index (other settings)
            out[j] = next((where[e] for e in range(int(lo[j]) + 1, int(hi[j])) if key[e] == digest[j]), -1)
        return out

    def __contains__(self, index_key: tuple[int, str]) -> bool:
        return bool(self.locate([index_key[0]], [index_key[1]])[0] >= 0)

    def get(self, index: int, key: str) -> dict[str, Any]:
        e = int(self.locate([index], [key])[0])
        if e < 0:
            raise KeyError((index, key))
        return self.read(e)

    def read(self, e: int) -> dict[str, Any]:
        """The result at ``e`` (from ``locate``)."""
        n, offset = int(e) & 0xFFFF, int(e) >> 16
        if n not in self._files:
            self._files[n] = open(self.paths[n], "rb")  # noqa: SIM115 (closed by close())
        f = self._files[n]
        f.seek(offset)
        return json.loads(f.readline())["result"]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._loaded = None
        if self._cleanup is not None:
            self._cleanup()  # the ranges' files

    def __enter__(self) -> PartResults:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key64(key: str) -> int | None:
    """The first 64 bits of a resume key (hex), what ``PartResults`` keeps of it."""
    try:
        return int(key[:16], 16)
    except ValueError:  # not a key of ours
        return None


_PART_INDEX = re.compile(rb'\{"index": (\d+), ')  # how PartWriter begins a line


def _read_part_lines(path: Path, share: tuple[int, int] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(byte offset, entry)`` of every whole line of a part file (``share``: see ``PartResults``)."""
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        offset = 0
        for line in f:
            at, offset = offset, offset + len(line)
            if share is not None:
                head = _PART_INDEX.match(line)
                if head is not None and int(head.group(1)) % share[1] != share[0]:
                    continue  # another process's share: it parses (and checks) this line
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # the last line of a crashed run
            if _is_part_entry(entry) and (share is None or entry["index"] % share[1] == share[0]):
                yield at, entry


def _is_part_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("index"), int)
            and isinstance(entry.get("key"), str) and isinstance(entry.get("result"), dict))


def remove_stale_places(out_path: Path) -> None:
    """The directories of ``PartResults``' places that a run killed during its resume or merge left beside
    ``out_path`` (a run that ends removes its own)."""
    for path in out_path.parent.glob(f".{_glob_escape(out_path.name)}.places-*"):
        shutil.rmtree(path, ignore_errors=True)


def remove_part_files(paths: Iterable[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class PartWriter:
    """Appends finished samples to one rank's part file; each batch is flushed and fsynced.

    Example:
        >>> with PartWriter(Path("out.jsonl.part-00000-of-00001.jsonl")) as w:  # doctest: +SKIP
        ...     w.append([(0, key, result)])
    """

    def __init__(self, path: Path):
        self.path = path
        self._file: Any = None

    def __enter__(self) -> PartWriter:
        self._file = open(self.path, "ab")
        if self._file.tell() > 0 and not _ends_with_newline(self.path):
            self._file.write(b"\n")  # seal a line cut by a crash
        return self

    def append(self, entries: Iterable[tuple[int, str, Mapping[str, Any]]]) -> None:
        lines = [dumps({"index": i, "key": k, "result": dict(r)}) + "\n" for i, k, r in entries]
        self._file.write("".join(lines).encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# ----------------------------------------------------------------------------- records


def compact_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a ``generate()`` result that goes to the output (and to part files)."""
    return {k: result[k] for k in RESULT_KEYS}


def row_records(sample: Any, rows: Sequence[Any], result: Mapping[str, Any], *,
                keys: Sequence[str] = RESULT_KEYS, parallel_keys: Sequence[str] = PARALLEL_KEYS,
                flat_keys: Sequence[str] = FLAT_KEYS) -> list[tuple[int, dict[str, Any]]]:
    """The output records of a sample's rows, as ``(row position, record)``.

    A parallel row gets ``outputs``, ``finish_reasons`` and ``num_generated_tokens`` (lists); each
    flat row its own ``output``, ``finish_reason`` and ``num_generated_tokens``. The row's fields
    come first, in their order (a field with one of those names is replaced).

    Other jobs name their own per-branch lists: ``result[keys[i]]`` (one value per branch) goes to a
    parallel row as ``parallel_keys[i]`` and, value by value, to each flat row as ``flat_keys[i]``.
    """
    if not sample.flat:
        (pos,) = sample.rows
        return [(pos, _record(rows[pos].fields, parallel_keys, [result[k] for k in keys]))]
    return [
        (pos, _record(rows[pos].fields, flat_keys, [result[k][b] for k in keys]))
        for b, pos in enumerate(sample.rows)
    ]


def _record(fields: Mapping[str, Any], keys: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
    record = {k: v for k, v in fields.items() if k not in keys}
    record.update(zip(keys, values))
    return record


def write_jsonl(path: Path, records: Iterable[Any]) -> None:
    """Write records as JSONL to ``<path>.tmp``, fsync, then rename over ``path``."""
    _write_atomic(path, (dumps(record) + "\n" for record in records))


def write_json(path: Path, value: Any) -> None:
    """Write one JSON document (indented) the same way: ``<path>.tmp``, fsync, rename."""
    _write_atomic(path, [json.dumps(value, ensure_ascii=False, indent=2) + "\n"])


def _write_atomic(path: Path, chunks: Iterable[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
