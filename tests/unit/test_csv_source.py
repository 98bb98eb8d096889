"""CSV import (adapters/files/csv_source.py) against real files and a real state file."""

from __future__ import annotations

import csv
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from adapters.files.config import CsvSourceConfig
from adapters.files.csv_source import CsvSource
from adapters.files.runs import RunRecord, read_runs
from mesh.adapters import Change
from mesh.config import parse_agent_config
from mesh.errors import ConfigError

pytestmark = pytest.mark.anyio


def drop(directory: Path, name: str, data: bytes | str, *, age: float = 10.0) -> Path:
    """Write a file into the inbox as a finished, settled file (mtime ``age`` seconds ago)."""
    path = directory / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def config(tmp: Path, **kw: Any) -> CsvSourceConfig:
    (tmp / "in").mkdir(exist_ok=True)
    base: dict[str, Any] = {
        "state_path": str(tmp / "state" / "import.db"),
        "key": "id",
        "inbox_dir": str(tmp / "in"),
        "settle_time": 0.0,
        "poll_interval": 0.02,
        "chunk_rows": 1000,
    }
    return CsvSourceConfig(**(base | kw))


async def read_n(
    source: CsvSource, n: int, cursor: str | None = None, *, commit: bool = True
) -> tuple[list[Change], str | None]:
    """Read until ``n`` changes arrived (committing each batch like the agent does)."""
    got: list[Change] = []
    with anyio.fail_after(10):
        while len(got) < n:
            batch = await source.read(cursor, source._cfg.chunk_rows)
            got.extend(batch.changes)
            cursor = batch.cursor
            if commit:
                await source.committed(cursor)
    assert len(got) == n, f"read {len(got)} changes, wanted {n}"
    return got, cursor


async def settle_runs(cfg: CsvSourceConfig, cursor: str | None, want: int) -> list[RunRecord]:
    """Let the source finish what it read (a read that finds nothing new), then the runs."""
    async with CsvSource(cfg) as source:
        with anyio.move_on_after(0.3):  # nothing more to read: read blocks; meanwhile runs end
            await source.read(cursor, cfg.chunk_rows)
            raise AssertionError("no change expected")
    runs = read_runs(cfg.state_path, direction="import")
    assert len(runs) == want, runs
    return runs


async def test_dialect_quotes_newlines_bom_crlf_and_line_numbers(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    data = (
        b"\xef\xbb\xbfid,name,note\r\n"
        b'1,"Smith, John","said ""hi"""\r\n'
        b"\r\n"
        b'2,"two\r\nlines",plain\r\n'
        b"3,M\xc3\xbcller,\xe2\x82\xac\r\n"
    )
    drop(tmp_path / "in", "a.csv", data)
    async with CsvSource(cfg) as source:
        changes, _ = await read_n(source, 3)
    assert [c.row for c in changes] == [
        {"id": "1", "name": "Smith, John", "note": 'said "hi"'},
        {"id": "2", "name": "two\r\nlines", "note": "plain"},
        {"id": "3", "name": "Müller", "note": "€"},
    ]
    # the BOM is not part of the first column's name; versions carry the physical line
    assert [c.key for c in changes] == ["1", "2", "3"]
    run = read_runs(cfg.state_path)[0].id
    assert [c.version - (run << 32) for c in changes] == [2, 4, 6]


async def test_semicolons_cp1252_and_no_quoting(tmp_path: Path) -> None:
    cfg = config(tmp_path, delimiter=";", encoding="cp1252", quoting="none")
    drop(tmp_path / "in", "b.csv", 'id;name;quote\n7;Caf\xe9;"as is"\n'.encode("cp1252"))
    async with CsvSource(cfg) as source:
        changes, _ = await read_n(source, 1)
    assert changes[0].row == {"id": "7", "name": "Café", "quote": '"as is"'}


async def test_column_types_keep_strings_and_decimals_exact(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        columns={"qty": "int", "price": "decimal", "active": "bool", "day": "date", "at": "datetime"},
    )
    drop(
        tmp_path / "in",
        "t.csv",
        "id,qty,price,active,day,at,code\n"
        "00123,42,0.10,yes,2024-02-29,2024-02-29T10:00:00+01:00,007\n"
        "00124, -3 ,12345678901234567890.123456789,FALSE,,,\n",
    )
    async with CsvSource(cfg) as source:
        changes, _ = await read_n(source, 2)
    assert changes[0].key == "00123"
    assert changes[0].row == {
        "id": "00123", "qty": 42, "price": "0.10", "active": True, "day": "2024-02-29",
        "at": "2024-02-29T10:00:00+01:00", "code": "007",
    }  # fmt: skip
    assert changes[1].row == {
        "id": "00124", "qty": -3, "price": "12345678901234567890.123456789", "active": False,
        "day": None, "at": None, "code": "",
    }  # fmt: skip
    for change in changes:
        assert not any(isinstance(v, float) for v in change.row.values())


async def test_bad_rows_are_rejected_with_line_and_reason_and_the_import_goes_on(tmp_path: Path) -> None:
    cfg = config(tmp_path, columns={"qty": "int"}, done_dir=str(tmp_path / "done"), chunk_rows=2)
    data = (
        b"id,name,qty\n"
        b"1,ok,1\n"
        b"2,short\n"  # wrong field count
        b",nokey,3\n"  # missing key
        b"4,badint,4.5\n"  # bad type
        b'5,"bad"quote,5\n'  # malformed quoting
        b"6,\xff\xfe,6\n"  # not UTF-8
        b"7,ok,7\n"
        b"8,a,b,c\n"  # too many fields
    )
    path = drop(tmp_path / "in", "r.csv", data)
    checksum = hashlib.sha256(data).hexdigest()
    async with CsvSource(cfg) as source:
        changes, cursor = await read_n(source, 2)
    assert [c.key for c in changes] == ["1", "7"]
    [run] = await settle_runs(cfg, cursor, 1)
    assert (run.status, run.rows_in, run.rows_out, run.rows_failed) == ("complete", 8, 2, 6)
    assert run.checksum == checksum
    assert run.moved_to == str(tmp_path / "done" / "r.csv")
    assert not path.exists()
    assert run.rejects_file is not None
    rejects = read_csv(run.rejects_file)
    assert [(int(r["line"]), r["raw"]) for r in rejects] == [
        (3, "2,short"), (4, ",nokey,3"), (5, "4,badint,4.5"), (6, '5,"bad"quote,5'),
        (7, "6,\ufffd\ufffd,6"), (9, "8,a,b,c"),
    ]  # fmt: skip
    reasons = [r["reason"] for r in rejects]
    assert reasons[0] == "expected 3 fields, found 2"
    assert reasons[1] == "missing key (column 'id' is empty)"
    assert reasons[2] == "column 'qty': '4.5' is not a 64-bit integer"
    assert reasons[3].startswith("malformed CSV")
    assert reasons[4] == "not valid utf-8 text"
    assert reasons[5] == "expected 3 fields, found 4"


async def test_same_file_dropped_twice_is_imported_once(tmp_path: Path) -> None:
    cfg = config(tmp_path, done_dir=str(tmp_path / "done"))
    data = "id,name\n1,a\n2,b\n"
    drop(tmp_path / "in", "orders.csv", data, age=20)
    drop(tmp_path / "in", "orders-copy.csv", data, age=10)
    async with CsvSource(cfg) as source:
        _changes, cursor = await read_n(source, 2)
    runs = await settle_runs(cfg, cursor, 2)
    dup, first = runs  # newest first
    assert (first.status, first.rows_out) == ("complete", 2)
    assert dup.status == "duplicate"
    assert f"same content as run {first.id}" in dup.detail
    assert dup.checksum == first.checksum
    assert sorted(os.listdir(tmp_path / "done")) == ["orders-copy.csv", "orders.csv"]
    # the same name again, with the same content, after the first was moved away: still once
    drop(tmp_path / "in", "orders.csv", data)
    runs = await settle_runs(cfg, cursor, 3)
    assert runs[0].status == "duplicate"
    assert sorted(os.listdir(tmp_path / "done")) == ["orders-copy.csv", "orders.csv", "orders.run-000003.csv"]


async def test_files_left_in_place_are_not_imported_again(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    path = drop(tmp_path / "in", "a.csv", "id,v\n1,x\n")
    async with CsvSource(cfg) as source:
        _, cursor = await read_n(source, 1)
        with anyio.move_on_after(0.3):
            await source.read(cursor, 10)
            raise AssertionError("the file was read again")
    [run] = read_runs(cfg.state_path)
    assert run.status == "complete"
    assert run.moved_to is None
    assert path.exists()
    # a new version of the same file (other content) is a new run, and supersedes the first
    drop(tmp_path / "in", "a.csv", "id,v\n1,y\n", age=5)
    async with CsvSource(cfg) as source:
        [change], _ = await read_n(source, 1, cursor)
    assert change.row == {"id": "1", "v": "y"}
    assert change.version > (run.id << 32)  # later run: a higher version for the same key


async def test_a_later_file_supersedes_an_earlier_one(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    drop(tmp_path / "in", "2-newer.csv", "id,v\n1,new\n", age=5)
    drop(tmp_path / "in", "1-older.csv", "id,v\n1,old\n2,x\n1,older-but-later-line\n", age=50)
    async with CsvSource(cfg) as source:
        changes, _ = await read_n(source, 4)
    assert [c.row["v"] for c in changes] == ["old", "x", "older-but-later-line", "new"]
    ones = [c.version for c in changes if c.key == "1"]
    assert ones == sorted(ones)
    assert len(set(ones)) == 3


async def test_resume_from_a_cursor_mid_file_loses_and_repeats_nothing(tmp_path: Path) -> None:
    lines = ["id,name,amount"] + [f"{i:05d},name {i},{i}.{i % 100:02d}" for i in range(1, 1001)]
    lines.insert(500, "bad row")
    cfg = config(tmp_path, chunk_rows=100, columns={"amount": "decimal"}, done_dir=str(tmp_path / "done"))
    drop(tmp_path / "in", "big.csv", "\n".join(lines) + "\n")
    # An uninterrupted import, for reference (its own state and inbox copy).
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref_cfg = config(ref_dir, chunk_rows=100, columns={"amount": "decimal"})
    drop(ref_dir / "in", "big.csv", (tmp_path / "in" / "big.csv").read_bytes())
    async with CsvSource(ref_cfg) as ref:
        expected, _ = await read_n(ref, 1000)

    async with CsvSource(cfg) as source:
        first, cursor = await read_n(source, 400)
        # "SIGKILL" after the outbox committed the next chunk but before committed() ran
        batch = await source.read(cursor, 100)
        cursor = batch.cursor
        first += batch.changes
    in_flight = read_runs(cfg.state_path)[0]
    assert in_flight.status == "running"
    assert in_flight.rows_out < len(first)
    async with CsvSource(cfg) as source:  # a new process resumes from the stored cursor
        rest, cursor = await read_n(source, 1000 - len(first), cursor)
    got = first + rest
    assert [(c.key, c.version, c.row) for c in got] == [(c.key, c.version, c.row) for c in expected]
    [run] = await settle_runs(cfg, cursor, 1)
    assert (run.status, run.rows_in, run.rows_out, run.rows_failed) == ("complete", 1001, 1000, 1)


async def test_resume_after_the_state_knows_more_than_the_cursor(tmp_path: Path) -> None:
    """A crash after a chunk was read (and its rejects stored) but before the outbox committed
    it: the next read redoes that chunk with the same versions and counts it once."""
    cfg = config(tmp_path, chunk_rows=2)
    drop(tmp_path / "in", "a.csv", "id\n1\n\n2\n3\n4\n")
    async with CsvSource(cfg) as source:
        _first, cursor = await read_n(source, 2)
        lost = await source.read(cursor, 2)  # never committed
    async with CsvSource(cfg) as source:
        again, cursor = await read_n(source, 2, cursor)
    assert [(c.key, c.version) for c in again] == [(c.key, c.version) for c in lost.changes]
    [run] = await settle_runs(cfg, cursor, 1)
    assert (run.rows_in, run.rows_out) == (4, 4)


async def test_version_and_delete_columns_and_composite_keys(tmp_path: Path) -> None:
    cfg = config(tmp_path, key=["order", "line"], version_column="rev", delete_column="gone")
    drop(
        tmp_path / "in",
        "v.csv",
        "order,line,rev,gone\nA/1,1,5,\nA/1,1,2024-01-01T00:00:00Z,yes\nB,2,x,\n",
    )
    async with CsvSource(cfg) as source:
        changes, cursor = await read_n(source, 2)
    assert [(c.key, c.version, c.deleted) for c in changes] == [
        ("A%2F1/1", 5, False),
        ("A%2F1/1", 1704067200000000, True),
    ]
    [run] = await settle_runs(cfg, cursor, 1)
    assert run.rows_failed == 1


async def test_a_file_without_a_configured_column_fails_and_the_next_one_goes_on(tmp_path: Path) -> None:
    cfg = config(tmp_path, failed_dir=str(tmp_path / "failed"), columns={"qty": "int"})
    drop(tmp_path / "in", "1.csv", "ident,qty\n1,2\n", age=30)
    drop(tmp_path / "in", "2.csv", "", age=20)
    drop(tmp_path / "in", "3.csv", "id,qty\n1,2\n", age=10)
    async with CsvSource(cfg) as source:
        [change], cursor = await read_n(source, 1)
    assert change.row == {"id": "1", "qty": 2}
    third, second, first = await settle_runs(cfg, cursor, 3)
    assert first.status == "failed"
    assert "header lacks configured column(s) 'id'" in first.detail
    assert second.status == "failed"
    assert "no header row" in second.detail
    assert third.status == "complete"
    assert sorted(os.listdir(tmp_path / "failed")) == ["1.csv", "2.csv"]


async def test_a_file_changed_during_its_import_fails_its_run(tmp_path: Path) -> None:
    cfg = config(tmp_path, chunk_rows=1, failed_dir=str(tmp_path / "failed"))
    path = drop(tmp_path / "in", "a.csv", "id\n1\n2\n3\n", age=30)
    async with CsvSource(cfg) as source:
        [first], cursor = await read_n(source, 1)
    drop(tmp_path / "in", "a.csv", "id\n1\n2\n3\n4\n", age=20)  # rewritten in place
    drop(tmp_path / "in", "b.csv", "id\n9\n", age=10)
    async with CsvSource(cfg) as source:  # resumes the cursor: the checksum no longer matches
        [nine], cursor = await read_n(source, 1, cursor)
    assert (first.key, nine.key) == ("1", "9")
    second, first_run = await settle_runs(cfg, cursor, 2)
    assert first_run.status == "failed"
    assert first_run.detail == "the file changed while it was being imported"
    assert (first_run.rows_in, first_run.rows_out) == (1, 1)
    assert first_run.moved_to == str(tmp_path / "failed" / "a.csv")
    assert not path.exists()
    assert second.status == "complete"


async def test_read_blocks_until_a_settled_file_arrives(tmp_path: Path) -> None:
    cfg = config(tmp_path, settle_time=0.2)
    with anyio.fail_after(10):
        async with CsvSource(cfg) as source, anyio.create_task_group() as tg:
            got: list[Change] = []

            async def reader() -> None:
                batch = await source.read(None, 10)
                got.extend(batch.changes)

            tg.start_soon(reader)
            await anyio.sleep(0.1)
            assert not got  # no file yet: read is still waiting
            drop(tmp_path / "in", "late.csv", "id\n1\n", age=0)
    assert [c.key for c in got] == ["1"]


async def test_one_path_mode(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    file = drop(tmp_path / "in", "daily.csv", "id\n1\n")
    cfg = CsvSourceConfig(state_path=str(tmp_path / "s.db"), key="id", path=str(file), settle_time=0)
    async with CsvSource(cfg) as source:
        batch = await source.read(None, 10)
    assert [c.key for c in batch.changes] == ["1"]


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    def load(source: str) -> None:
        parse_agent_config(
            '[agent]\nname = "a"\nsystem = "files"\nstate_dir = "s"\n'
            '[[flows]]\nname = "f"\nentity = "e"\n[flows.source]\nadapter = "csv"\n' + source,
            source="agent.toml",
            base=tmp_path,
        )

    with pytest.raises(
        ConfigError, match=r"agent.toml: flows\[0\].source: inbox_dir / path: set exactly one"
    ):
        load('state_path = "s.db"\nkey = "id"\n')
    with pytest.raises(ConfigError, match="encoding: 'utf-16' is not ASCII-compatible"):
        load('state_path = "s.db"\nkey = "id"\npath = "a.csv"\nencoding = "utf-16"\n')
    with pytest.raises(
        ConfigError, match=r"flows\[0\].source: columns.qty: 'float' is not a column type \(expected"
    ):
        load('state_path = "s.db"\nkey = "id"\npath = "a.csv"\ncolumns = { qty = "float" }\n')
    with pytest.raises(ConfigError, match=r"flows\[0\].source.delimiter"):
        load('state_path = "s.db"\nkey = "id"\npath = "a.csv"\ndelimiter = ";;"\n')


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    cfg = parse_agent_config(
        '[agent]\nname = "a"\nsystem = "files"\nstate_dir = "s"\n'
        '[[flows]]\nname = "f"\nentity = "e"\n[flows.source]\nadapter = "csv"\n'
        'state_path = "state/imp.db"\nkey = "id"\ninbox_dir = "in"\ndone_dir = "done"\nchunk_rows = 7\n',
        base=tmp_path,
    )
    src = cfg.flows[0].source
    assert isinstance(src, CsvSourceConfig)
    assert src.inbox_dir == str(tmp_path / "in")
    assert src.done_dir == str(tmp_path / "done")
    assert src.state_path == str(tmp_path / "state" / "imp.db")
    assert src.batch_size == 7


async def test_missing_inbox_is_a_config_error(tmp_path: Path) -> None:
    cfg = CsvSourceConfig(state_path=str(tmp_path / "s.db"), key="id", inbox_dir=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="does not exist"):
        async with CsvSource(cfg):
            pass
