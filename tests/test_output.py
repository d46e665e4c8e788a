"""pmaccel.output: part files read back by (index, key) whatever the process count, a line cut by a crash
ignored and sealed, atomic output files, and an unwritable output refused up front."""

from __future__ import annotations

import json

import pytest

from pmaccel.errors import PMAccelError
from pmaccel.output import PartResults, PartWriter, check_writable, part_path, write_jsonl

K, OTHER = "0123456789abcdef" * 2, "fedcba9876543210" * 2  # resume keys are hex digests


def _indices(found: PartResults) -> list[int]:
    """Every sample index with a result, from ``index_ranges`` (a sorted array per range)."""
    return [i for part in found.index_ranges() for i in part.tolist()]


def test_part_files_of_any_world_size_are_found_by_index_and_key(tmp_path):
    out = tmp_path / "out.jsonl"
    with PartWriter(part_path(out, 0, 2)) as w:
        w.append([(0, K, {"a": 1}), (2, K, {"a": 3})])
    with PartWriter(part_path(out, 1, 2)) as w:
        w.append([(1, K, {"a": 2}), (1, OTHER, {"a": 9})])
    with PartWriter(part_path(out, 0, 1)) as w:  # an earlier run on one process
        w.append([(3, K, {"a": 4})])
    with PartResults(out) as found:
        assert len(found) == 5
        assert [found.get(i, K)["a"] for i in range(4)] == [1, 2, 3, 4]
        assert (1, OTHER) in found and (2, OTHER) not in found and (7, K) not in found


def test_locate_finds_a_chunk_of_results_at_once(tmp_path):
    """``locate`` over a chunk agrees with looking each (index, key) up alone, with several keys for one index,
    keys that are not ours and indices past the end; ``read`` gives the result."""
    import random

    out = tmp_path / "out.jsonl"
    rng = random.Random(0)
    keys = [f"{rng.getrandbits(128):032x}" for _ in range(3)]
    written = {(i, k): {"a": i, "k": k} for i in range(0, 60, 2) for k in rng.sample(keys, rng.randint(1, 3))}
    with PartWriter(part_path(out, 0, 2)) as w:
        w.append((i, k, r) for (i, k), r in written.items() if i % 3)
    with PartWriter(part_path(out, 1, 2)) as w:
        w.append((i, k, r) for (i, k), r in written.items() if not i % 3)
    asked = [(i, k) for i in range(-1, 65) for k in [*keys, "not-hex"]]
    with PartResults(out) as found:
        where = found.locate([i for i, _ in asked], [k for _, k in asked])
        assert [e >= 0 for e in where] == [(i, k) in written for i, k in asked]
        assert all(found.read(int(e)) == written[ik] for ik, e in zip(asked, where) if e >= 0)
        assert found.locate([], []).tolist() == []


def test_a_line_cut_by_a_crash_is_ignored_and_sealed(tmp_path):
    out = tmp_path / "out.jsonl"
    part = part_path(out, 0, 1)
    with PartWriter(part) as w:
        w.append([(0, K, {"a": 1})])
    with open(part, "ab") as f:
        f.write(b'{"index": 1, "key": "' + K.encode() + b'", "res')  # killed mid-line
    with PartResults(out) as found:
        assert len(found) == 1
    with PartWriter(part) as w:  # the resumed run appends after the cut line
        w.append([(1, K, {"a": 2})])
    with PartResults(out) as found:
        assert found.get(1, K) == {"a": 2} and found.get(0, K) == {"a": 1}


def test_a_share_indexes_only_its_sample_indices(tmp_path):
    """``share=(k, n)``: the results of indices i % n == k; the other lines are not even parsed (another
    process checks them), and a cut line of its own share is still ignored."""
    out = tmp_path / "out.jsonl"
    part = part_path(out, 0, 1)
    with PartWriter(part) as w:
        w.append([(i, K, {"a": i}) for i in range(7)])
    with open(part, "ab") as f:
        f.write(b'{"index": 8, "key": "' + K.encode() + b'", "result": {"a": [1, 2\n')  # cut, another share
        f.write(b'{"index": 9, "key": "' + K.encode() + b'", "result": {"a": [1, 2\n')  # cut, this share
    with PartResults(out, share=(0, 3)) as found:
        assert _indices(found) == [0, 3, 6]
        assert [found.get(i, K)["a"] for i in (0, 3, 6)] == [0, 3, 6] and (1, K) not in found
    with PartResults(out, share=(2, 3)) as found:
        assert _indices(found) == [2, 5]
    with PartResults(out) as found:  # the whole: every whole line
        assert _indices(found) == list(range(7))


def test_write_jsonl_replaces_the_file_only_when_complete(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")

    def records():
        yield {"x": 1}
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        write_jsonl(path, records())
    assert path.read_text() == "old\n" and not list(tmp_path.glob("*.tmp"))
    write_jsonl(path, [{"x": 1}, {"y": "é"}])
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [{"x": 1}, {"y": "é"}]


def test_an_unwritable_output_is_refused(tmp_path):
    with pytest.raises(PMAccelError, match="is a directory"):
        check_writable(tmp_path)
    assert check_writable(tmp_path / "new" / "out.jsonl").parent.is_dir()


def test_places_kept_on_disk_a_range_at_a_time_give_the_same_lookups(tmp_path, monkeypatch):
    """Past INDEX_BUFFER bytes the places go to one file per range of INDEX_RANGE indices beside the output
    (removed on close): the same lookups, in index order or not, as places held in memory, the first of
    several lines with one (index, key) found first, and every index with a result listed once."""
    import random

    import pmaccel.output

    out = tmp_path / "out.jsonl"
    rng = random.Random(1)
    keys = [f"{rng.getrandbits(128):032x}" for _ in range(3)]
    for rank in range(3):
        with PartWriter(part_path(out, rank, 3)) as w:
            w.append((i, rng.choice(keys), {"a": i, "rank": rank}) for i in rng.sample(range(100), 40))
    asked = [(i, k) for i in range(-2, 105) for k in [*keys, "not-hex"]]
    rng.shuffle(asked)
    with PartResults(out) as found:
        expected = [found.read(int(e)) if e >= 0 else None
                    for e in found.locate([i for i, _ in asked], [k for _, k in asked])]
        indices, count = _indices(found), len(found)
    assert sum(r is not None for r in expected) > 30
    monkeypatch.setattr(pmaccel.output, "INDEX_RANGE", 8)
    monkeypatch.setattr(pmaccel.output, "INDEX_BUFFER", 26 * 5)
    with PartResults(out) as found:
        assert found._dir is not None and len(list(found._dir.iterdir())) > 5, "places on disk"
        where = found.locate([i for i, _ in asked], [k for _, k in asked])
        assert [found.read(int(e)) if e >= 0 else None for e in where] == expected
        assert [found.get(i, k) for (i, k), r in zip(asked, expected) if r is not None] == [r for r in expected if r]
        assert _indices(found) == indices and len(found) == count
        ranges = [r.tolist() for r in found.index_ranges()]
        assert all(r and r[0] // 8 == r[-1] // 8 for r in ranges) and sum(ranges, []) == indices
        place_dir = found._dir
    assert not place_dir.exists(), "removed on close"
    assert sorted(p.name for p in tmp_path.iterdir()) == [part_path(out, r, 3).name for r in range(3)]


def test_places_left_by_a_killed_run_are_removed_by_the_next(tmp_path, monkeypatch):
    """A run killed while its places were on disk leaves their directory beside the output; the next run's
    ``remove_stale_places`` removes it (and only it: part files, another output's places stay)."""
    import pmaccel.output

    out = tmp_path / "out.jsonl"
    with PartWriter(part_path(out, 0, 1)) as w:
        w.append((i, K, {"a": i}) for i in range(20))
    monkeypatch.setattr(pmaccel.output, "INDEX_BUFFER", 26 * 5)
    found = PartResults(out)  # not closed: as a process killed during its merge leaves it
    stale = found._dir
    found._cleanup.detach()  # (a killed process runs no finalizer)
    assert stale is not None and stale.name.startswith(".out.jsonl.places-") and any(stale.iterdir())
    other = tmp_path / ".other.jsonl.places-x"
    other.mkdir()
    pmaccel.output.remove_stale_places(out)
    assert not stale.exists() and other.exists() and part_path(out, 0, 1).exists()
