"""The REST source against a real (fake) JSON API over HTTP: every pagination style, both
incremental modes, the high-water mark at equal timestamps, shifted and duplicated pages,
resume from a cursor, and an API that fails, throttles and crawls (``tests.fakes.rest_source_api``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from adapters.rest.config import (
    RestApiKeyAuth,
    RestBearerAuth,
    RestCursorPagination,
    RestLinkPagination,
    RestModifiedSince,
    RestOffsetPagination,
    RestPagePagination,
    RestSourceConfig,
    RestSyncCursor,
)
from adapters.rest.source import RestSource, _format_since, _version
from mesh.adapters import Change
from mesh.config import parse_agent_config
from mesh.errors import ConfigError, SystemUnavailable
from tests.fakes.rest_source_api import RestSourceApi, serve_rest_source_api

pytestmark = pytest.mark.anyio

STYLES: dict[str, dict[str, Any]] = {
    "page": {"path": "/page/contacts", "records_path": "data", "pagination": RestPagePagination(size=5)},
    "offset": {
        "path": "/offset/contacts",
        "records_path": "items",
        "pagination": RestOffsetPagination(size=5),
    },
    "cursor": {
        "path": "/cursor/contacts",
        "records_path": "data",
        "pagination": RestCursorPagination(cursor_path="meta.next_cursor", size_param="limit", size=5),
    },
    "link": {"path": "/link/contacts", "pagination": RestLinkPagination(size_param="per_page", size=5)},
    "all": {"path": "/all/contacts"},
}


@pytest.fixture
async def api() -> AsyncIterator[RestSourceApi]:
    async with serve_rest_source_api() as server:
        yield server


def config(url: str, style: str = "page", **kw: Any) -> RestSourceConfig:
    settings: dict[str, Any] = {
        "version_field": "updated_at",
        "version_type": "timestamp",
        "poll_interval": 0.05,
        "timeout": 2.0,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
        **STYLES[style],
        **kw,
    }
    return RestSourceConfig(base_url=url, **settings)


async def collect(
    source: RestSource, cursor: str | None, n: int, *, limit: int = 1000
) -> tuple[list[Change], str | None]:
    """Read until ``n`` changes have arrived (at least); fails after 10 s."""
    got: list[Change] = []
    with anyio.fail_after(10):
        while len(got) < n:
            batch = await source.read(cursor, limit)
            assert 0 < len(batch.changes) <= limit
            got += batch.changes
            cursor = batch.cursor
    return got, cursor


async def assert_quiet(source: RestSource, cursor: str | None) -> None:
    """Several polls happen and nothing is emitted (the read stays blocked until cancelled)."""
    with anyio.move_on_after(0.3) as scope:
        batch = await source.read(cursor, 1000)
        pytest.fail(f"nothing should be emitted, got {batch.changes}")
    assert scope.cancelled_caught


def pairs(changes: list[Change]) -> list[tuple[str, int]]:
    return [(c.key, c.version) for c in changes]


def fill(api: RestSourceApi, n: int, start: int = 1) -> None:
    for i in range(start, start + n):
        api.put("contacts", i, name=f"c{i}", email=f"c{i}@example.com")


@pytest.mark.parametrize(
    ("style", "requests"), [("page", 5), ("offset", 5), ("cursor", 5), ("link", 5), ("all", 1)]
)
async def test_every_pagination_style_lists_everything_once(
    api: RestSourceApi, style: str, requests: int
) -> None:
    fill(api, 23)
    async with RestSource(config(api.url, style)) as source:
        changes, _ = await collect(source, None, 23)
    assert sorted(int(c.key) for c in changes) == list(range(1, 24))
    assert len(api.listings()) == requests  # the stop rule: short page, no next cursor, no next link
    first = changes[0]
    assert (first.row["name"], first.deleted) == (f"c{first.key}", False)
    assert first.version == _version(first.row["updated_at"], "timestamp")
    assert first.occurred_at == first.version // 1000
    versions = [c.version for c in changes]
    assert versions == sorted(versions)  # handed out in (version, key) order


async def test_stop_on_empty_page_asks_once_more(api: RestSourceApi) -> None:
    fill(api, 10)
    cfg = config(api.url, "page", pagination=RestPagePagination(size=5, stop="empty"))
    async with RestSource(cfg) as source:
        await collect(source, None, 10)
    assert [c.query["page"] for c in api.listings()] == ["1", "2", "3"]


async def test_modified_since_never_loses_records_at_the_mark(api: RestSourceApi) -> None:
    api.freeze("2026-03-01T10:00:00.250")
    fill(api, 3)  # three records, one timestamp
    cfg = config(api.url, incremental=RestModifiedSince(param="updated_since"))
    async with RestSource(cfg) as source:
        first, cursor = await collect(source, None, 2, limit=2)
        api.put("contacts", 4, name="c4")  # written later, still at the same millisecond
        rest, cursor = await collect(source, cursor, 2, limit=2)
        assert pairs(first + rest) == [(str(k), first[0].version) for k in (1, 2, 3, 4)]
        await assert_quiet(source, cursor)
        api.advance(1)
        api.put("contacts", 2, name="two")
        (changed,), cursor = await collect(source, cursor, 1)
    assert (changed.key, changed.row["name"], changed.row["version"]) == ("2", "two", 2)
    since = [c.query.get("updated_since") for c in api.listings()]
    assert since[0] is None  # the first poll lists everything
    assert "2026-03-01T10:00:00.250000Z" in since  # then the mark itself: ">=", not ">"


async def test_if_modified_since_header_and_304(api: RestSourceApi) -> None:
    api.freeze("2026-03-01T10:00:00.500")
    fill(api, 4)
    cfg = config(api.url, "cursor", incremental=RestModifiedSince(header="If-Modified-Since"))
    async with RestSource(cfg) as source:
        _, cursor = await collect(source, None, 4)
        await assert_quiet(source, cursor)  # the records at the mark come back, and are dropped
        assert api.listings()[-1].headers["if-modified-since"] == "Sun, 01 Mar 2026 09:59:59 GMT"
        for i in range(1, 5):
            api.remove("contacts", i)
        await assert_quiet(source, cursor)  # now nothing is newer: 304
        api.put("contacts", 9, name="late")
        (late,), _ = await collect(source, cursor, 1)
    assert late.key == "9"
    assert api.statuses[304] >= 1


async def test_a_restart_resumes_after_the_last_committed_batch(api: RestSourceApi) -> None:
    api.freeze("2026-03-01T10:00:00")
    fill(api, 10)  # all at one timestamp: the cursor must name the keys already emitted
    cfg = config(api.url, "offset", incremental=RestModifiedSince(param="updated_since"))
    async with RestSource(cfg) as source:
        batch = await source.read(None, 4)
    cursor = batch.cursor
    assert len(batch.changes) == 4
    mark = msgspec.json.decode(cursor)
    assert set(mark["seen"]) == {c.key for c in batch.changes}
    async with RestSource(cfg) as again:  # a new process, from the committed cursor
        rest, _ = await collect(again, cursor, 6)
        assert {c.key for c in rest} == {str(i) for i in range(1, 11)} - {c.key for c in batch.changes}
        await assert_quiet(again, _)


async def test_a_page_shifted_under_the_reader_emits_each_key_version_once(api: RestSourceApi) -> None:
    fill(api, 12)

    def shift(pages: int) -> None:
        if pages == 1:
            api.put("contacts", 0, name="front")  # sorts first: page 2 repeats page 1's last record

    api.after_page = shift
    async with RestSource(config(api.url, "page")) as source:
        changes, cursor = await collect(source, None, 13)
        await assert_quiet(source, cursor)
    assert sorted(pairs(changes)) == sorted(set(pairs(changes)))
    assert {c.key for c in changes} == {str(i) for i in range(13)}


async def test_overlapping_pages_are_deduplicated(api: RestSourceApi) -> None:
    fill(api, 12)
    api.fault("duplicate")  # every page after the first repeats the previous page's last record
    async with RestSource(config(api.url, "offset")) as source:
        changes, cursor = await collect(source, None, 12)
        await assert_quiet(source, cursor)
    assert sorted(int(c.key) for c in changes) == list(range(1, 13))


async def test_lookback_recovers_a_record_a_shifting_offset_listing_skipped(api: RestSourceApi) -> None:
    fill(api, 6)

    def move_first_to_the_end(pages: int) -> None:
        if pages == 1:
            api.put("contacts", 1, name="moved")  # order=updated_at: the offset listing shifts left

    api.after_page = move_first_to_the_end
    cfg = config(
        api.url, "offset", params={"order": "updated_at"}, pagination=RestOffsetPagination(size=2),
        incremental=RestModifiedSince(param="updated_since"), lookback=60,
    )  # fmt: skip
    async with RestSource(cfg) as source:
        changes, cursor = await collect(source, None, 7)
        await assert_quiet(source, cursor)
    assert sorted(pairs(changes)) == sorted(set(pairs(changes)))
    assert {c.key for c in changes} == {str(i) for i in range(1, 7)}
    assert [c.row["name"] for c in changes if c.key == "1"] == ["c1", "moved"]


async def test_api_sync_cursor_mode(api: RestSourceApi) -> None:
    fill(api, 7)
    cfg = config(
        api.url, "cursor", incremental=RestSyncCursor(cursor_path="next_sync_token", param="sync_token"),
        version_field="version", version_type="integer",
    )  # fmt: skip
    async with RestSource(cfg) as source:
        first = await source.read(None, 5)
        assert [c.key for c in first.changes] == ["1", "2", "3", "4", "5"]
        middle = msgspec.json.decode(first.cursor)
        assert middle == {"since": 1, "seen": dict.fromkeys("12345", 1)}  # mid-poll: no sync cursor yet
    async with RestSource(cfg) as source:  # a restart in the middle of a poll
        rest, cursor = await collect(source, first.cursor, 2)
        assert [c.key for c in rest] == ["6", "7"]
        assert msgspec.json.decode(cursor) == {"sync": "sync-7"}
        await assert_quiet(source, cursor)
        api.put("contacts", 3, name="three")
        api.put("contacts", 8, name="eight")
        changed, cursor = await collect(source, cursor, 2)
    assert pairs(changed) == [("8", 1), ("3", 2)]
    assert api.listings()[-1].query["sync_token"] == "sync-7"
    assert msgspec.json.decode(cursor) == {"sync": "sync-9"}


async def test_soft_deletes_by_flag_and_by_value(api: RestSourceApi) -> None:
    fill(api, 3)
    api.archive("contacts", 2)
    api.put("contacts", 3, status="ARCHIVED")
    async with RestSource(config(api.url, deleted_field="archived")) as source:
        changes, _ = await collect(source, None, 3)
    assert {c.key: c.deleted for c in changes} == {"1": False, "2": True, "3": False}
    cfg = config(api.url, deleted_field="status", deleted_values=["ARCHIVED"])
    async with RestSource(cfg) as source:
        changes, _ = await collect(source, None, 3)
    assert {c.key: c.deleted for c in changes} == {"1": False, "2": False, "3": True}


async def test_500s_and_429_retry_after_are_ridden_out(api: RestSourceApi) -> None:
    fill(api, 8)
    api.fault("500", count=2)
    async with RestSource(config(api.url, max_attempts=3)) as source:
        changes, cursor = await collect(source, None, 8)
        api.put("contacts", 20, name="x")
        api.fault("429", count=1, retry_after=0.2)
        (late,), _ = await collect(source, cursor, 1)
    assert (len(changes), late.key) == (8, "20")
    assert (api.statuses[500], api.statuses[429]) == (2, 1)


async def test_a_failed_poll_is_retried_not_raised(
    api: RestSourceApi, caplog: pytest.LogCaptureFixture
) -> None:
    fill(api, 3)
    api.fault("500", count=4)  # two polls of two attempts each fail
    async with RestSource(config(api.url, max_attempts=2, breaker_threshold=10)) as source:
        changes, _ = await collect(source, None, 3)
        assert "failed_polls=2" in repr(source)
    assert len(changes) == 3
    assert "poll failed" in caplog.text


async def test_the_breaker_opens_and_nothing_is_sent_while_it_cools_down(api: RestSourceApi) -> None:
    fill(api, 3)
    api.fault("500")
    cfg = config(api.url, max_attempts=2, breaker_threshold=3, breaker_cooldown=30)
    async with RestSource(cfg) as source, anyio.create_task_group() as tg:
        tg.start_soon(source.read, None, 10)
        with anyio.fail_after(10):
            while "breaker=open" not in repr(source):
                await anyio.sleep(0.01)
        sent = len(api.calls)
        assert sent == 3
        await anyio.sleep(0.3)  # within the 30 s cooldown: the read waits, sending nothing
        assert len(api.calls) == sent
        tg.cancel_scope.cancel()
    api.fault("ok")
    cfg = config(api.url, max_attempts=1, breaker_threshold=1, breaker_cooldown=0.2)
    api.fault("500", count=1)
    async with RestSource(cfg) as source:
        changes, _ = await collect(source, None, 3)  # one failure opens it; the probe closes it
        assert "breaker=closed" in repr(source)
    assert len(changes) == 3


async def test_a_slow_page_times_out_and_is_retried(api: RestSourceApi) -> None:
    fill(api, 6)
    api.fault("slow", count=1, delay=1.0)
    async with RestSource(config(api.url, timeout=0.3)) as source:
        changes, _ = await collect(source, None, 6)
        assert "retries=1" in repr(source)
    assert len(changes) == 6


async def test_a_blocked_read_is_cancellable_and_wakes_up_on_a_change(api: RestSourceApi) -> None:
    async with RestSource(config(api.url)) as source:
        await assert_quiet(source, None)
        polls = len(api.listings())
        assert polls >= 2
        api.put("contacts", 1, name="first")
        (change,), _ = await collect(source, None, 1)
    assert change.key == "1"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"path": "/nope/contacts"}, "GET /nope/contacts: HTTP 404"),
        ({"records_path": "dta"}, "records_path 'dta' holds nothing, not a list"),
        ({"records_path": None}, "the body is an object, not a list of records (set records_path)"),
        ({"version_field": "modified"}, "record 0 (key 1): version_field 'modified' holds nothing"),
        ({"version_type": "integer"}, "version_field 'updated_at' holds '2"),
        ({"key_field": "name.first"}, "key_field 'name.first' holds nothing"),
    ],
    ids=["404", "records_path", "not-a-list", "version", "version-type", "key"],
)
async def test_misconfiguration_is_a_config_error_naming_the_field(
    api: RestSourceApi, settings: dict[str, Any], message: str
) -> None:
    fill(api, 2)
    async with RestSource(config(api.url, **settings)) as source:
        with (
            anyio.fail_after(10),
            pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")),
        ):
            await source.read(None, 10)


async def test_a_foreign_cursor_is_refused(api: RestSourceApi) -> None:
    async with RestSource(config(api.url)) as source:
        with pytest.raises(ConfigError, match="is not a cursor of a REST source"):
            await source.read("12345", 10)


def transport(pages: dict[str, httpx.Response]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return pages[str(request.url)]

    return httpx.MockTransport(handler)


async def test_a_next_link_to_another_origin_is_refused() -> None:
    body = [{"id": 1, "v": 1}]
    pages = {
        "https://api.test/items": httpx.Response(
            200, json=body, headers={"Link": '<https://evil.test/items?page=2>; rel="next"'}
        )
    }
    cfg = RestSourceConfig(
        base_url="https://api.test", path="/items", version_field="v", pagination=RestLinkPagination()
    )
    async with RestSource(cfg, transport=transport(pages)) as source:
        with pytest.raises(ConfigError, match="leads to another origin"):
            await source.read(None, 10)


async def test_a_listing_that_loops_or_never_ends_is_an_error() -> None:
    same = {"data": [{"id": 1, "v": 1}], "next": "abc"}
    pages = {
        "https://api.test/items": httpx.Response(200, json=same),
        "https://api.test/items?cursor=abc": httpx.Response(200, json=same),
    }
    cfg = RestSourceConfig(
        base_url="https://api.test", path="/items", version_field="v", records_path="data",
        pagination=RestCursorPagination(cursor_path="next"),
    )  # fmt: skip
    async with RestSource(cfg, transport=transport(pages)) as source:
        with pytest.raises(ConfigError, match="already followed"):
            await source.read(None, 10)
    cfg = msgspec.structs.replace(cfg, pagination=RestPagePagination(size=1), max_pages=3, records_path=None)
    endless = httpx.MockTransport(lambda request: httpx.Response(200, json=[{"id": 1, "v": 1}]))
    async with RestSource(cfg, transport=endless) as source:
        with pytest.raises(ConfigError, match="did not end after 3 pages"):
            await source.read(None, 10)


async def test_credentials_refused_are_raised_for_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKEN", "t0ken-value")
    refuse = httpx.MockTransport(lambda request: httpx.Response(403, json={"error": "forbidden"}))
    cfg = RestSourceConfig(
        base_url="https://api.test",
        path="/items",
        version_field="v",
        auth=RestBearerAuth(token_env="API_TOKEN"),
    )
    async with RestSource(cfg, transport=refuse) as source:
        with pytest.raises(SystemUnavailable, match="HTTP 403: the API refuses our credentials") as info:
            await source.read(None, 10)
        assert "t0ken-value" not in str(info.value) + repr(source)


def test_versions_and_marks_convert_both_ways() -> None:
    assert _version("2026-03-01T10:00:00.25Z", "timestamp") == 1772359200250000
    assert _version("2026-03-01T10:00:00", "timestamp") == 1772359200000000  # naive: UTC
    assert _version("2026-03-01T11:00:00+01:00", "timestamp") == 1772359200000000
    assert _version("/Date(1772359200250+0000)/", "timestamp") == 1772359200250000
    assert _version(1772359200.25, "epoch_seconds") == 1772359200250000
    assert _version("1772359200250", "epoch_millis") == 1772359200250000
    assert [_version(v, "integer") for v in (7, "7", 7.0, 7.5, True, None)] == [7, 7, 7, None, None, None]
    assert _version(1772359200, "timestamp") is None
    assert _version("yesterday", "timestamp") is None
    mark = 1772359200250000
    assert _format_since(mark, "iso8601") == "2026-03-01T10:00:00.250000Z"
    assert _format_since(mark, "http_date") == "Sun, 01 Mar 2026 09:59:59 GMT"  # "strictly after"
    assert _format_since(mark, "epoch_seconds") == "1772359200"
    assert _format_since(mark, "epoch_millis") == "1772359200250"
    assert _format_since(42, "integer") == "42"


AGENT = """
[agent]
name = "api-agent"
system = "crm"
state_dir = "state"
[[flows]]
name = "contacts"
entity = "contact"
[flows.source]
adapter = "rest"
base_url = "https://api.test"
path = "/items"
version_field = "v"
{extra}
"""


def test_rest_source_config_parses() -> None:
    extra = """records_path = "Contacts"
key_field = "ContactID"
version_field = "UpdatedDateUTC"
version_type = "timestamp"
deleted_field = "ContactStatus"
deleted_values = ["ARCHIVED"]
params = { order = "UpdatedDateUTC" }
[flows.source.pagination]
type = "page"
size_param = "pageSize"
[flows.source.incremental]
type = "modified_since"
header = "If-Modified-Since"
[flows.source.auth]
type = "oauth2"
token_url = "https://identity.xero.com/connect/token"
client_id = "abc"
client_secret_env = "XERO_SECRET"
scope = "accounting.contacts.read"
"""
    src = (
        parse_agent_config(AGENT.format(extra="").replace('version_field = "v"\n', "") + extra)
        .flows[0]
        .source
    )
    assert isinstance(src, RestSourceConfig)
    assert src.pagination == RestPagePagination(size_param="pageSize")
    assert src.incremental == RestModifiedSince(header="If-Modified-Since")
    assert src.auth is not None
    assert src.auth.__struct_config__.tag == "oauth2"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            '[flows.source.incremental]\ntype = "modified_since"',
            "incremental: param / header: set exactly one",
        ),
        (
            '[flows.source.incremental]\ntype = "modified_since"\nparam = "since"\nformat = "iso8601"',
            "flows[0].source: incremental.format: 'iso8601' does not fit version_type = 'integer'",
        ),
        (
            '[flows.source.pagination]\ntype = "pages"',
            "flows[0].source.pagination.type: invalid value 'pages'",
        ),
        (
            '[flows.source.pagination]\ntype = "cursor"',
            "flows[0].source.pagination: object missing required field",
        ),
        ('deleted_values = ["X"]', "deleted_field: required with deleted_values"),
        (
            'lookback = 5\n[flows.source.incremental]\ntype = "cursor_field"\ncursor_path = "n"\nparam = "s"',
            "lookback: not used with incremental.type = 'cursor_field'",
        ),
        ('path = "items"', "flows[0].source.path: expected `str` matching regex"),
    ],
    ids=["since-where", "since-format", "paging-type", "cursor-path", "deleted", "lookback", "path"],
)
def test_bad_rest_source_config_names_the_field(extra: str, message: str) -> None:
    text = AGENT.format(extra=extra)
    if extra.startswith("path"):
        text = text.replace('path = "/items"\n', "")
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
    ):
        parse_agent_config(text)


async def test_logs_never_show_the_secret(
    api: RestSourceApi, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("API_KEY", "k3y-value-123")
    fill(api, 2)
    api.fault("500", count=3)
    cfg = config(api.url, auth=RestApiKeyAuth(key_env="API_KEY"))
    async with RestSource(cfg) as source:
        await collect(source, None, 2)
        text = repr(source) + caplog.text
    assert "k3y-value-123" not in text
