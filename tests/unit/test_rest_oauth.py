"""OAuth2 client credentials for the REST sink and source, against the fake API's real token
endpoint (``tests.fakes.rest_source_api``): tokens are cached, refreshed before they expire and
once on a 401, token endpoint failures are retryable, refusals are configuration errors naming
the token URL, and no secret or token ever shows."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from adapters.rest._auth import Credentials
from adapters.rest.config import RestOAuth2Auth, RestPagePagination, RestSinkConfig, RestSourceConfig
from adapters.rest.sink import RestSink
from adapters.rest.source import RestSource
from mesh.adapters import Applied, SinkRecord
from mesh.config import parse_agent_config
from mesh.errors import ConfigError, SystemUnavailable
from tests.fakes.rest_source_api import OAuthClient, RestSourceApi, serve_rest_source_api

pytestmark = pytest.mark.anyio

SECRET = "cl13nt-s3cret+/="  # characters that basic auth must form-encode


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIENT_SECRET", SECRET)


@pytest.fixture
async def api() -> AsyncIterator[RestSourceApi]:
    client = OAuthClient(
        "mesh-agent", SECRET, ttl=60.0, scopes=frozenset({"contacts.read", "contacts.write"})
    )
    async with serve_rest_source_api(client) as server:
        yield server


def oauth(url: str, **kw: Any) -> RestOAuth2Auth:
    return RestOAuth2Auth(
        token_url=f"{url}/oauth/token", client_id="mesh-agent", client_secret_env="CLIENT_SECRET", **kw
    )


def source_config(url: str, **kw: Any) -> RestSourceConfig:
    settings: dict[str, Any] = {
        "path": "/page/contacts",
        "records_path": "data",
        "pagination": RestPagePagination(size=5),
        "version_field": "version",
        "poll_interval": 0.05,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
        "auth": oauth(url),
        **kw,
    }
    return RestSourceConfig(base_url=url, **settings)


def sink_config(url: str, tmp_path: Path, **kw: Any) -> RestSinkConfig:
    settings: dict[str, Any] = {
        "upsert_path": "/api/contacts/{key}",
        "state_path": str(tmp_path / "rest-state.db"),
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
        "auth": oauth(url),
        **kw,
    }
    return RestSinkConfig(base_url=url, **settings)


def rec(key: int, version: int) -> SinkRecord:
    return SinkRecord(
        id=f"env-{key}-{version}", key=str(key), version=version, deleted=False,
        row={"name": f"n{key}v{version}"}, origin="erp",
    )  # fmt: skip


def tokens(api: RestSourceApi) -> list[str]:
    return list(api._tokens)


async def read_keys(source: RestSource, n: int) -> list[str]:
    keys: list[str] = []
    cursor = None
    with anyio.fail_after(10):
        while len(keys) < n:
            batch = await source.read(cursor, 100)
            keys += [c.key for c in batch.changes]
            cursor = batch.cursor
    return keys


async def test_source_token_is_fetched_once_cached_and_sent(api: RestSourceApi) -> None:
    for i in range(1, 13):
        api.put("contacts", i, name=f"c{i}")
    async with RestSource(source_config(api.url, auth=oauth(api.url, scope="contacts.read"))) as source:
        assert len(await read_keys(source, 12)) == 12
    assert len(api.token_requests) == 1  # three pages, one token
    assert api.token_requests[0] == {
        "grant_type": "client_credentials", "scope": "contacts.read", "client_auth": "basic",
    }  # fmt: skip
    (token,) = tokens(api)
    assert {c.headers["authorization"] for c in api.listings()} == {f"Bearer {token}"}


async def test_an_expiring_token_is_replaced_before_it_runs_out(tmp_path: Path) -> None:
    client = OAuthClient("mesh-agent", SECRET, ttl=0.4)
    async with serve_rest_source_api(client) as api:
        api.put("contacts", 1, name="one")
        async with RestSource(source_config(api.url)) as source:
            await read_keys(source, 1)
            await anyio.sleep(0.5)  # the token's lifetime is over
            api.put("contacts", 2, name="two")
            assert await source.read(None, 100)
        async with RestSink(sink_config(api.url, tmp_path)) as sink:
            assert await sink.apply([rec(1, 1)]) == [Applied.APPLIED]
            await anyio.sleep(0.5)
            assert await sink.apply([rec(2, 1)]) == [Applied.APPLIED]
    assert len(api.token_requests) == 4
    assert api.expired_hits == 0  # refreshed ahead of expiry: the API never saw an expired token


async def test_a_401_refreshes_the_token_once_and_retries(api: RestSourceApi, tmp_path: Path) -> None:
    api.put("contacts", 1, name="one")
    async with RestSource(source_config(api.url)) as source:
        await read_keys(source, 1)
        api.revoke_tokens()  # expired early (revoked, clock skew): the API says 401
        api.put("contacts", 2, name="two")
        batch = await source.read(None, 100)
        assert [c.key for c in batch.changes] == ["1", "2"]
    assert (api.expired_hits, len(api.token_requests)) == (1, 2)
    async with RestSink(sink_config(api.url, tmp_path)) as sink:
        assert await sink.apply([rec(1, 1)]) == [Applied.APPLIED]
        api.revoke_tokens()
        assert await sink.apply([rec(2, 1)]) == [Applied.APPLIED]  # not "credentials refused"
    assert (api.expired_hits, len(api.token_requests)) == (2, 4)
    assert api.record("contacts", 2) is not None


async def test_concurrent_requests_share_one_token_fetch(api: RestSourceApi, tmp_path: Path) -> None:
    async with RestSink(sink_config(api.url, tmp_path, concurrency=8)) as sink:
        assert await sink.apply([rec(i, 1) for i in range(20)]) == [Applied.APPLIED] * 20
        api.revoke_tokens()  # eight requests get a 401 at once: still one new token
        assert await sink.apply([rec(i, 2) for i in range(20)]) == [Applied.APPLIED] * 20
    assert len(api.token_requests) == 2


async def test_a_failing_token_endpoint_is_retryable(
    api: RestSourceApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    api.token_fault("500", count=1)
    async with RestSink(sink_config(api.url, tmp_path, max_attempts=1)) as sink:
        with pytest.raises(
            SystemUnavailable, match=rf"OAuth2 token endpoint {api.url}/oauth/token: HTTP 500"
        ):
            await sink.apply([rec(1, 1)])
        assert await sink.apply([rec(1, 1)]) == [Applied.APPLIED]
    api.put("contacts", 1, name="one")
    api.token_fault("429", count=2, retry_after=1)
    async with RestSource(source_config(api.url)) as source:
        assert await read_keys(source, 1) == ["1"]  # the source rides it out
    assert "OAuth2 token endpoint" in caplog.text
    assert "HTTP 429" in caplog.text


async def test_an_unreachable_token_endpoint_is_retryable(api: RestSourceApi, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    auth = RestOAuth2Auth(
        token_url=f"http://127.0.0.1:{port}/token",
        client_id="x",
        client_secret_env="CLIENT_SECRET",
        timeout=1.0,
    )
    cfg = sink_config(api.url, tmp_path, auth=auth)
    async with RestSink(cfg) as sink:
        with pytest.raises(
            SystemUnavailable, match=rf"OAuth2 token endpoint http://127.0.0.1:{port}/token: Connect"
        ):
            await sink.apply([rec(1, 1)])


@pytest.mark.parametrize(
    ("auth", "error"),
    [
        ({"client_id": "someone-else"}, "HTTP 401 invalid_client: unknown client or wrong secret"),
        ({"scope": "contacts.delete"}, "HTTP 400 invalid_scope: scope 'contacts.delete' not allowed"),
    ],
    ids=["wrong-client", "wrong-scope"],
)
async def test_a_refused_grant_is_a_config_error_naming_the_token_url(
    api: RestSourceApi, tmp_path: Path, auth: dict[str, str], error: str
) -> None:
    settings = {
        "token_url": f"{api.url}/oauth/token",
        "client_id": "mesh-agent",
        "client_secret_env": "CLIENT_SECRET",
    }
    bad = RestOAuth2Auth(**{**settings, **auth})
    expected = rf"OAuth2 token endpoint {api.url}/oauth/token refused the client credentials grant: {error}"
    async with RestSink(sink_config(api.url, tmp_path, auth=bad)) as sink:
        with pytest.raises(ConfigError, match=expected) as info:
            await sink.apply([rec(1, 1)])
    assert SECRET not in str(info.value)
    api.put("contacts", 1, name="one")
    async with RestSource(source_config(api.url, auth=bad)) as source:
        with anyio.fail_after(10), pytest.raises(ConfigError, match=expected):
            await source.read(None, 10)


async def test_client_secret_in_the_body_and_an_audience(tmp_path: Path) -> None:
    client = OAuthClient("mesh-agent", SECRET, audience="https://api.example.com")
    async with serve_rest_source_api(client) as api:
        auth = oauth(api.url, client_auth="body", audience="https://api.example.com")
        async with RestSink(sink_config(api.url, tmp_path, auth=auth)) as sink:
            assert await sink.apply([rec(1, 1)]) == [Applied.APPLIED]
        wrong = oauth(api.url, client_auth="body", audience="https://other.example.com")
        async with RestSink(sink_config(api.url, tmp_path, auth=wrong)) as sink:
            with pytest.raises(ConfigError, match="invalid_request: unknown audience"):
                await sink.apply([rec(2, 1)])
    assert api.token_requests[0] == {
        "grant_type": "client_credentials", "client_id": "mesh-agent",
        "audience": "https://api.example.com", "client_auth": "body",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (
            httpx.Response(200, json={"access_token": "abc", "token_type": "mac"}),
            "token_type 'mac' is not supported",
        ),
        (
            httpx.Response(200, text="<html>login</html>"),
            "HTTP 200 without an access_token: <html>login</html>",
        ),
    ],
    ids=["not-bearer", "not-json"],
)
async def test_an_answer_that_is_not_a_bearer_token_is_a_config_error(
    tmp_path: Path, answer: httpx.Response, error: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/token"
        return answer

    cfg = sink_config("https://crm.test", tmp_path, auth=RestOAuth2Auth(
        token_url="https://login.test/token", client_id="x", client_secret_env="CLIENT_SECRET",
    ))  # fmt: skip
    async with RestSink(cfg, transport=httpx.MockTransport(handler)) as sink:
        with pytest.raises(ConfigError, match=error):
            await sink.apply([rec(1, 1)])


async def test_secrets_and_tokens_never_show(
    api: RestSourceApi, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    sink = RestSink(sink_config(api.url, tmp_path, max_attempts=2))
    async with sink:
        assert await sink.apply([rec(1, 1)]) == [Applied.APPLIED]
        seen.append(repr(sink))
        credentials = Credentials(oauth(api.url))
        seen.append(repr(credentials))
    api.put("contacts", 1, name="one")
    api.fault("500", count=2)
    async with RestSource(source_config(api.url, max_attempts=1)) as source:
        await read_keys(source, 1)
        seen.append(repr(source))
    seen.append(caplog.text)
    secrets = [SECRET, *tokens(api)]
    assert len(secrets) == 3
    assert not [(s, t) for s in secrets for t in seen if s in t]
    monkeypatch.delenv("CLIENT_SECRET")
    with pytest.raises(ConfigError, match="environment variable CLIENT_SECRET"):
        await RestSource(source_config(api.url)).open()


AGENT = """
[agent]
name = "crm-agent"
system = "crm"
state_dir = "state"
[[flows]]
name = "contacts"
entity = "contact"
[flows.sink]
adapter = "rest"
base_url = "https://api.example.com"
upsert_path = "/contacts/{key}"
state_path = "versions.db"
[flows.sink.auth]
type = "oauth2"
token_url = "https://login.example.com/oauth/token"
client_id = "mesh"
"""


def test_oauth2_auth_config_parses() -> None:
    text = AGENT + 'client_secret_env = "CLIENT_SECRET"\naudience = "https://api.example.com"\n'
    sink = parse_agent_config(text).flows[0].sink
    assert isinstance(sink, RestSinkConfig)
    assert sink.auth == RestOAuth2Auth(
        token_url="https://login.example.com/oauth/token",
        client_id="mesh",
        client_secret_env="CLIENT_SECRET",
        audience="https://api.example.com",
    )
    missing = r"flows\[0\]\.sink\.auth: client_secret_env / client_secret_file: set exactly one of them"
    with pytest.raises(ConfigError, match=missing):
        parse_agent_config(AGENT)
    bad_url = r"flows\[0\]\.sink\.auth\.token_url: expected `str` matching regex"
    with pytest.raises(ConfigError, match=bad_url):
        parse_agent_config(text.replace("https://login.example.com", "login.example.com"))
