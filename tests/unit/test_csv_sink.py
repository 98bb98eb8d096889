"""CSV export (adapters/files/csv_sink.py) against real files and a real state file."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from adapters.files.config import CsvSinkConfig
from adapters.files.csv_sink import CsvSink
from adapters.files.runs import RunRecord, read_runs
from mesh.adapters import Applied, SinkRecord
from mesh.config import parse_agent_config
from mesh.errors import ConfigError, RejectedRecord

pytestmark = pytest.mark.anyio


def config(tmp: Path, **kw: Any) -> CsvSinkConfig:
    (tmp / "out").mkdir(exist_ok=True)
    base: dict[str, Any] = {
        "out_dir": str(tmp / "out"),
        "state_path": str(tmp / "state" / "export.db"),
        "flush_interval": 3600.0,
    }
    return CsvSinkConfig(**(base | kw))


def rec(key: str, version: int, row: dict[str, Any] | None = None, *, deleted: bool = False,
        scope: str = "") -> SinkRecord:  # fmt: skip
    return SinkRecord(
        id=f"{key}@{version}", key=key, version=version, deleted=deleted,
        row={"id": key} if row is None else row, origin="erp", scope=scope,
    )  # fmt: skip


ROOT = Path(__file__).resolve().parents[2]


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir())


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.reader(f))


def exports(cfg: CsvSinkConfig) -> list[RunRecord]:
    return sorted(read_runs(cfg.state_path, direction="export"), key=lambda r: r.id)


async def test_a_flush_writes_one_file_with_a_run_record(tmp_path: Path) -> None:
    cfg = config(tmp_path, key_column="id", version_column="_version")
    async with CsvSink(cfg) as sink:
        outcomes = await sink.apply([
            rec("1", 10, {"id": "1", "name": "Ann, \"A\"", "amount": "12.50", "n": 3, "ok": True}),
            rec("2", 11, {"id": "2", "name": "Bob", "amount": None, "n": 1.5, "ok": False, "tags": ["x"]}),
            rec("3", 12, deleted=True),
        ])  # fmt: skip
        assert outcomes == [Applied.APPLIED] * 3
        assert await sink.flush() == 1
        assert await sink.flush() == 0  # nothing waits any more
    [path] = files(tmp_path / "out")
    assert path.name.startswith("export-")
    assert path.name.endswith("-000001.csv")
    assert read_csv(path) == [
        ["id", "name", "amount", "n", "ok", "tags", "_version", "_deleted"],
        ["1", 'Ann, "A"', "12.50", "3", "true", "", "10", "false"],
        ["2", "Bob", "", "1.5", "false", '["x"]', "11", "false"],
        ["3", "", "", "", "", "", "12", "true"],
    ]
    [run] = exports(cfg)
    assert (run.status, run.rows_in, run.rows_out, run.rows_failed) == ("complete", 3, 3, 0)
    assert run.file == str(path)
    assert run.checksum == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.read_bytes().count(b"\r\n") == 4  # RFC 4180 line ends by default


async def test_version_guard_and_redelivery_never_reach_a_second_file(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    async with CsvSink(cfg) as sink:
        assert await sink.apply([rec("a", 5, {"id": "a", "v": "five"})]) == [Applied.APPLIED]
        await sink.flush()
        again = await sink.apply([
            rec("a", 5, {"id": "a", "v": "five"}),  # redelivered
            rec("a", 4, {"id": "a", "v": "four"}),  # older
            rec("a", 6, {"id": "a", "v": "six"}, scope="crm"),  # another version sequence
        ])  # fmt: skip
        assert again == [Applied.STALE, Applied.STALE, Applied.APPLIED]
        await sink.flush()
    first, second = files(tmp_path / "out")
    assert read_csv(first)[1:] == [["a", "five", "false"]]
    assert read_csv(second)[1:] == [["a", "six", "false"]]
    # the guard survives a restart
    async with CsvSink(cfg) as sink:
        assert await sink.apply([rec("a", 5, {"id": "a", "v": "x"})]) == [Applied.STALE]
        assert await sink.flush() == 0


async def test_a_key_waiting_twice_is_written_once_with_its_latest_version(tmp_path: Path) -> None:
    cfg = config(tmp_path, deletes="omit")
    async with CsvSink(cfg) as sink:
        await sink.apply([rec("1", 1, {"id": "1", "v": "a"}), rec("2", 1, {"id": "2", "v": "b"})])
        await sink.apply([rec("1", 2, {"id": "1", "v": "a2"}), rec("2", 2, deleted=True)])
        await sink.apply([rec("3", 1, deleted=True)])  # a delete never seen before: nothing to write
        assert await sink.flush() == 1
    [path] = files(tmp_path / "out")
    assert read_csv(path) == [["id", "v"], ["1", "a2"]]
    assert exports(cfg)[0].rows_out == 1


async def test_flush_rows_cuts_files_by_itself_and_columns_stay_fixed(tmp_path: Path) -> None:
    cfg = config(tmp_path, flush_rows=3, quoting="all", line_terminator="\n", deletes="omit")
    async with CsvSink(cfg) as sink:
        await sink.apply([rec(str(i), 1, {"id": str(i), "a": i}) for i in range(4)])
        await sink.apply([rec(str(i), 1, {"id": str(i), "a": i, "b": "new"}) for i in range(4, 7)])
        with anyio.fail_after(10):
            while len(exports(cfg)) < 2 or any(r.status != "complete" for r in exports(cfg)):
                await anyio.sleep(0.02)
        assert await sink.flush() == 1  # the seventh row
    paths = files(tmp_path / "out")
    assert [len(read_csv(p)) - 1 for p in paths] == [3, 3, 1]
    assert {tuple(read_csv(p)[0]) for p in paths} == {("id", "a")}  # "b" came later: left out
    assert paths[0].read_text().splitlines()[1] == '"0","0"'


async def test_flush_interval_cuts_a_file_for_rows_that_waited(tmp_path: Path) -> None:
    cfg = config(tmp_path, flush_interval=0.1)
    async with CsvSink(cfg) as sink:
        await sink.apply([rec("1", 1)])
        with anyio.fail_after(10):
            while not exports(cfg) or exports(cfg)[0].status != "complete":
                await anyio.sleep(0.02)
    assert [read_csv(p) for p in files(tmp_path / "out")] == [[["id", "_deleted"], ["1", "false"]]]


async def test_unrepresentable_values_are_refused_per_record(tmp_path: Path) -> None:
    cfg = config(tmp_path, encoding="cp1252")
    async with CsvSink(cfg) as sink:
        outcomes = await sink.apply(
            [rec("1", 1, {"id": "1", "n": "Café €"}), rec("2", 1, {"id": "2", "n": "猫"})]
        )
        assert outcomes[0] is Applied.APPLIED
        assert isinstance(outcomes[1], RejectedRecord)
        assert "'n'" in str(outcomes[1])
        await sink.flush()
    [path] = files(tmp_path / "out")
    assert path.read_bytes().splitlines()[1] == "1,Café €,false".encode("cp1252")


async def test_bom_for_spreadsheets(tmp_path: Path) -> None:
    cfg = config(tmp_path, bom=True, columns=["id"], deletes="omit")
    async with CsvSink(cfg) as sink:
        await sink.apply([rec("1", 1, {"id": "1", "x": "dropped"})])
        await sink.flush()
    [path] = files(tmp_path / "out")
    assert path.read_bytes() == b"\xef\xbb\xbfid\r\n1\r\n"


_CHILD = textwrap.dedent(
    """
    import sys, anyio, msgspec
    from adapters.files.csv_sink import CsvSink
    from mesh.adapters import SinkRecord
    from adapters.files.config import CsvSinkConfig

    async def main() -> None:
        cfg = msgspec.json.decode(sys.argv[1], type=CsvSinkConfig)
        async with CsvSink(cfg) as sink:
            await sink.apply([
                SinkRecord(id=str(i), key=str(i), version=1, deleted=False,
                           row={"id": str(i), "name": f"n{i}"}, origin="erp")
                for i in range(50)
            ])
            await sink.flush()

    anyio.run(main)
    """
)


@pytest.mark.parametrize("point", ["csv_sink.before_rename", "csv_sink.after_rename"])
async def test_a_crash_while_cutting_a_file_is_redone_into_the_same_file(tmp_path: Path, point: str) -> None:
    cfg = config(tmp_path, flush_rows=20)
    env = {**os.environ, "MESH_FILES_CRASH_POINTS": point}
    child = await anyio.run_process(
        [sys.executable, "-c", _CHILD, msgspec.json.encode(cfg).decode()],
        env=env, check=False, cwd=ROOT,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    [interrupted] = exports(cfg)
    assert interrupted.status == "running"
    before = {p.name: p.read_bytes() for p in files(tmp_path / "out")}
    if point == "csv_sink.after_rename":
        assert list(before) == [Path(interrupted.file).name]
    else:
        assert list(before) == [f".{Path(interrupted.file).name}.tmp"]

    async with CsvSink(cfg) as sink:  # the restart finishes the run, then the rest is cut
        await sink.flush()
    runs = exports(cfg)
    assert [(r.status, r.rows_out) for r in runs] == [("complete", 20)] * 2 + [("complete", 10)]
    paths = files(tmp_path / "out")
    assert [p.name for p in paths] == sorted(Path(r.file).name for r in runs)  # no temp files left
    assert runs[0].file == interrupted.file
    if point == "csv_sink.after_rename":
        assert digest(interrupted.file) == hashlib.sha256(before[Path(interrupted.file).name]).hexdigest()
    ids = [row[0] for p in paths for row in read_csv(p)[1:]]
    assert sorted(ids, key=int) == [str(i) for i in range(50)]  # each row in exactly one file
    for r in runs:
        assert r.checksum == digest(r.file)


def test_sink_config_paths_and_errors(tmp_path: Path) -> None:
    text = (
        '[agent]\nname = "a"\nsystem = "files"\nstate_dir = "s"\n'
        '[[flows]]\nname = "f"\nentity = "e"\n[flows.sink]\nadapter = "csv"\n'
    )
    cfg = parse_agent_config(text + 'out_dir = "out"\nstate_path = "s/x.db"\n', base=tmp_path)
    sink = cfg.flows[0].sink
    assert isinstance(sink, CsvSinkConfig)
    assert (sink.out_dir, sink.state_path) == (str(tmp_path / "out"), str(tmp_path / "s" / "x.db"))
    with pytest.raises(ConfigError, match=r"flows\[0\].sink: bom: only with encoding = 'utf-8'"):
        parse_agent_config(text + 'out_dir = "o"\nstate_path = "x"\nbom = true\nencoding = "cp1252"\n')
    with pytest.raises(ConfigError, match=r"flows\[0\].sink.deletes"):
        parse_agent_config(text + 'out_dir = "o"\nstate_path = "x"\ndeletes = "drop"\n')


async def test_missing_out_dir_is_a_config_error(tmp_path: Path) -> None:
    cfg = CsvSinkConfig(out_dir=str(tmp_path / "nope"), state_path=str(tmp_path / "s.db"))
    with pytest.raises(ConfigError, match="does not exist"):
        async with CsvSink(cfg):
            pass
