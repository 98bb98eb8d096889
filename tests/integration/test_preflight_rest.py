"""REST preflight against a real local HTTP API that wants a bearer token everywhere (as Xero
does): a wrong token is a problem at ``auth`` (401), a wrong list path at ``path`` (404), an
unreachable API at ``base_url``; the token never shows. Run in process through
``meshctl config check --connect``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from typer.testing import CliRunner

from mesh.broker import free_port
from mesh.cli import app
from mesh.controlplane.http import HttpServer

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(60)]

TOKEN = "right-token-4242"


@asynccontextmanager
async def serve_api() -> AsyncIterator[tuple[str, list[str]]]:
    """An API under ``/api`` whose every route (HEAD of the root included) wants the token."""
    seen: list[str] = []

    async def handle(request: Request) -> Response:
        seen.append(f"{request.method} {request.url.path}")
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse({"Type": "Unauthorized", "Title": "Unauthorized"}, 401)
        if request.url.path in ("/api", "/api/", "/api/customers"):
            return JSONResponse({"customers": []})
        return JSONResponse({"error": "not found"}, 404)

    routes = [Route("/{path:path}", handle, methods=["GET", "HEAD", "POST", "PUT"])]
    server = HttpServer(Starlette(routes=routes), "127.0.0.1", 0, grace=1.0, name="preflight-api")
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        yield server.url + "/api", seen
        tg.cancel_scope.cancel()


def rest_flows(api: str, tmp: Path, *, path: str = "/customers") -> str:
    return f"""
[agent]
name = "crm-agent"
system = "crm"
state_dir = "state"
[[flows]]
name = "customers-in"
entity = "customer"
[flows.source]
adapter = "rest"
base_url = "{api}"
path = "{path}"
version_field = "version"
records_path = "customers"
[flows.source.auth]
type = "bearer"
token_env = "CRM_TOKEN"
[[flows]]
name = "customers-out"
entity = "customer"
[flows.sink]
adapter = "rest"
base_url = "{api}"
upsert_path = "/customers/{{key}}"
state_path = "{tmp / "rest.db"}"
timeout = 2.0
[flows.sink.auth]
type = "bearer"
token_env = "CRM_TOKEN"
"""


async def check(tmp: Path, body: str, token: str) -> tuple[int, list[str], str]:
    config = tmp / "agent.toml"
    config.write_text(body)

    def invoke() -> tuple[int, str]:
        result = CliRunner().invoke(
            app, ["config", "check", "--connect", str(config)], env={"CRM_TOKEN": token}
        )
        return result.exit_code, result.output

    # The CLI runs its own event loop: in a worker thread, while this loop serves the API.
    code, out = await anyio.to_thread.run_sync(invoke)
    prefix = f"{config}: "
    return (
        code,
        [line.removeprefix(prefix) for line in out.splitlines() if line.startswith(prefix + "flows[")],
        out,
    )


async def test_the_right_token_passes_with_one_request_per_side(tmp_path: Path) -> None:
    async with serve_api() as (api, seen):
        code, lines, out = await check(tmp_path, rest_flows(api, tmp_path), TOKEN)
    assert (code, lines) == (0, []), out
    assert sorted(seen) == ["GET /api/customers", "HEAD /api"]
    assert not (tmp_path / "rest.db").exists()  # nothing written, not even the sink's state


async def test_a_refused_token_is_a_problem_at_auth_and_never_shown(tmp_path: Path) -> None:
    async with serve_api() as (api, _):
        code, lines, out = await check(tmp_path, rest_flows(api, tmp_path), "wrong-token-1717")
    assert code == 1, out
    assert lines == [
        f"flows[0].source.auth: GET {api}/customers answered HTTP 401: the API refused the credentials",
        f"flows[1].sink.auth: HEAD {api} answered HTTP 401: the API refused the credentials",
    ]
    assert "wrong-token-1717" not in out


async def test_a_wrong_path_and_an_unreachable_api(tmp_path: Path) -> None:
    async with serve_api() as (api, _):
        code, lines, out = await check(tmp_path, rest_flows(api, tmp_path, path="/custmers"), TOKEN)
    assert code == 1, out
    assert lines == [f"flows[0].source.path: GET {api}/custmers answered HTTP 404: no such endpoint"]
    dead = f"http://127.0.0.1:{free_port()}/api"
    code, lines, out = await check(tmp_path, rest_flows(dead, tmp_path), TOKEN)
    assert code == 1, out
    assert [line.split(": ", 1)[0] for line in lines] == [
        "flows[0].source.base_url",
        "flows[1].sink.base_url",
    ]
    assert lines[1].startswith(f"flows[1].sink.base_url: cannot reach HEAD {dead}: ")


async def test_an_unset_token_variable_is_a_problem_at_auth(tmp_path: Path) -> None:
    async with serve_api() as (api, seen):
        code, lines, out = await check(tmp_path, rest_flows(api, tmp_path), "")
    assert code == 1, out
    assert [line.split(": ", 1)[0] for line in lines] == ["flows[0].source.auth", "flows[1].sink.auth"]
    assert "CRM_TOKEN" in lines[0]
    assert seen == []  # no request without credentials


async def test_preflight_path_is_what_both_sides_get(tmp_path: Path) -> None:
    """``preflight_path`` replaces the source's first page and the sink's HEAD of ``base_url``;
    a 404 there is a problem at that field."""
    body = rest_flows("API", tmp_path).replace(
        'records_path = "customers"', 'records_path = "customers"\npreflight_path = "/"'
    ).replace('timeout = 2.0', 'timeout = 2.0\npreflight_path = "/Organisation"')  # fmt: skip
    async with serve_api() as (api, seen):
        code, lines, out = await check(tmp_path, body.replace("API", api), TOKEN)
    assert code == 1, out
    assert sorted(seen) == ["GET /api/", "GET /api/Organisation"]
    assert lines == [
        f"flows[1].sink.preflight_path: GET {api}/Organisation answered HTTP 404: no such endpoint"
    ]
