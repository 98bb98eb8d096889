"""HTTP hardening over real sockets: slow clients are cut off (headers and body), sizes are
limited (413 / 400), no redirect is built from the Host header, deep JSON is a 400, and an
open (token-less) endpoint on a non-loopback address warns at start.

The control plane's status app and the webhook receiver share :class:`HttpServer`, so its
limits are tested once with the status app (and an app that reads bodies), and the webhook's
JSON depth limit through a real receiver.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest
from anyio.abc import SocketStream
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from adapters.webhook.config import WebhookSourceConfig
from adapters.webhook.source import WebhookSource, sign
from mesh.controlplane.http import HttpServer, create_app
from mesh.controlplane.models import ControlPlaneInfo, StatusReport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


class _Source:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def status(self) -> StatusReport:
        return StatusReport(
            schema_version="mesh-cp-status/1",
            generated_at=0.0,
            control_plane=ControlPlaneInfo(
                replica="cp1", leader="cp1", is_leader=True, nats_connected=True, version="1"
            ),
            agents=[],
            flows=[],
            counts={},
        )

    async def readiness(self) -> str | None:
        return None


def _echo_app() -> Starlette:
    async def echo(request: Request) -> Response:
        return Response(str(len(await request.body())))

    return Starlette(routes=[Route("/echo", echo, methods=["POST"])])


@asynccontextmanager
async def serving(app: ASGIApp, host: str = "127.0.0.1", **limits: object) -> AsyncIterator[HttpServer]:
    server = HttpServer(app, host, 0, grace=1.0, **limits)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        yield server
        tg.cancel_scope.cancel()


async def _closed_while_dripping(stream: SocketStream, drip: bytes) -> int:
    """Send ``drip`` one byte every 0.1 s (a slowloris client); the number of bytes sent when
    the server closed the connection. Fails when the whole drip got through."""
    for sent, byte in enumerate(drip):
        try:
            await stream.send(bytes([byte]))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return sent
        with anyio.move_on_after(0.1):  # the client's own pace; also notices the server's close
            try:
                data = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return sent + 1
            raise AssertionError(f"server answered a request it had not fully received: {data!r}")
    raise AssertionError("the server let a client drip a whole request")


async def test_a_client_sending_headers_one_byte_a_second_is_cut_off() -> None:
    async with serving(create_app(_Source()), header_timeout=0.5) as server:
        request = b"GET /healthz HTTP/1.1\r\nHost: cp\r\n" + b"X-Slow: " + b"a" * 400 + b"\r\n\r\n"
        with anyio.fail_after(20):
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            async with stream:
                sent = await _closed_while_dripping(stream, request)
        assert sent < len(request)
        # The server still serves everyone else.
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{server.url}/healthz")).status_code == 200


async def test_a_client_dripping_its_body_is_cut_off() -> None:
    async with serving(_echo_app(), header_timeout=5.0, body_timeout=0.5) as server:
        body = b"x" * 400
        head = b"POST /echo HTTP/1.1\r\nHost: cp\r\nContent-Length: %d\r\n\r\n" % len(body)
        with anyio.fail_after(20):
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            async with stream:
                await stream.send(head)
                sent = await _closed_while_dripping(stream, body)
        assert sent < len(body)
        async with httpx.AsyncClient() as client:
            ok = await client.post(f"{server.url}/echo", content=b"y" * 10)
            assert (ok.status_code, ok.text) == (200, "10")


async def test_a_slow_next_request_on_a_kept_alive_connection_is_cut_off_too() -> None:
    async with serving(create_app(_Source()), header_timeout=0.5) as server:
        with anyio.fail_after(20):
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            async with stream:
                await stream.send(b"GET /healthz HTTP/1.1\r\nHost: cp\r\n\r\n")
                first = b""
                while b"alive" not in first:
                    first += await stream.receive()
                assert first.startswith(b"HTTP/1.1 200")
                second = b"GET /healthz HTTP/1.1\r\nHost: cp\r\nX-Slow: " + b"b" * 400 + b"\r\n\r\n"
                assert await _closed_while_dripping(stream, second) < len(second)


async def test_bodies_over_the_limit_are_413_declared_or_streamed() -> None:
    async with serving(_echo_app(), max_body_bytes=1000) as server, httpx.AsyncClient() as client:
        url = f"{server.url}/echo"
        declared = await client.post(url, content=b"x" * 1001)
        assert (declared.status_code, declared.json()) == (
            413,
            {"error": "body larger than 1000 bytes", "status": 413},
        )

        async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to look at
            for _ in range(5):
                yield b"x" * 300

        streamed = await client.post(url, content=chunks())
        assert streamed.status_code == 413
        fits = await client.post(url, content=b"x" * 1000)
        assert (fits.status_code, fits.text) == (200, "1000")
    async with serving(create_app(_Source()), max_body_bytes=10) as server, httpx.AsyncClient() as client:
        # The status app reads no bodies, and still refuses a large one before routing it.
        big = await client.request("GET", f"{server.url}/status", content=b"x" * 11)
        assert big.status_code == 413


async def test_an_oversized_header_block_is_refused() -> None:
    async with serving(create_app(_Source()), max_header_bytes=4096) as server:
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"{server.url}/healthz", headers={"X-Big": "z" * 8192})
            assert answer.status_code == 431
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{server.url}/healthz")).status_code == 200


async def test_no_redirect_is_built_from_the_host_header() -> None:
    async with serving(create_app(_Source())) as server, httpx.AsyncClient() as client:
        for path in ("/status/", "/healthz/", "//evil.example/status"):
            answer = await client.get(
                f"{server.url}{path}", headers={"Host": "evil.example"}, follow_redirects=False
            )
            assert answer.status_code == 404, (path, answer.status_code, answer.headers)
            assert "location" not in answer.headers
            assert "evil.example" not in answer.text


async def test_open_endpoint_on_a_public_address_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mesh.controlplane.http")
    async with serving(create_app(_Source()), host="0.0.0.0", open_access=True):
        pass
    warned = [r.getMessage() for r in caplog.records if "requires no token" in r.getMessage()]
    assert len(warned) == 1
    assert "0.0.0.0" in warned[0]
    caplog.clear()
    async with serving(create_app(_Source()), host="127.0.0.1", open_access=True):
        pass
    async with serving(create_app(_Source(), token="t0k"), host="0.0.0.0", open_access=False):
        pass
    assert not [r for r in caplog.records if "requires no token" in r.getMessage()]


SECRET = "whsec_hardening_0123456789"


def _webhook(tmp_path: Path, **extra: object) -> WebhookSource:
    cfg = msgspec.convert(
        {
            "adapter": "webhook", "port": 0, "state_path": str(tmp_path / "webhook.db"),
            "secret_env": "HOOK_SECRET", "key_field": "id", **extra,
        },
        WebhookSourceConfig,
    )  # fmt: skip
    return WebhookSource(cfg, environ={"HOOK_SECRET": SECRET})


async def test_the_webhook_receiver_cuts_slow_senders_off(tmp_path: Path) -> None:
    async with _webhook(tmp_path, header_timeout=0.5, body_timeout=0.5) as source:
        port = int((source.url or "").rsplit(":", 1)[1].split("/")[0])
        slow_head = b"POST /webhook HTTP/1.1\r\nHost: h\r\nX-Slow: " + b"a" * 400 + b"\r\n\r\n"
        body = b'{"id": 1}' + b" " * 400
        head = b"POST /webhook HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body)
        with anyio.fail_after(20):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                assert await _closed_while_dripping(stream, slow_head) < len(slow_head)
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(head)
                assert await _closed_while_dripping(stream, body) < len(body)


async def test_deeply_nested_json_to_the_webhook_is_400_not_500(tmp_path: Path) -> None:
    source = _webhook(tmp_path)
    cfg = source._config
    async with source, httpx.AsyncClient(timeout=20) as client:
        url = source.url or ""
        for depth in (65, 5000, 200_000):
            body = b'{"id": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"
            if len(body) > cfg.max_body_bytes:
                body = b"[" * (cfg.max_body_bytes // 2 - 1) + b"]" * (cfg.max_body_bytes // 2 - 1)
            headers = {"Webhook-Signature": sign(SECRET, body), "Content-Type": "application/json"}
            answer = await client.post(url, content=body, headers=headers)
            assert answer.status_code == 400, (depth, answer.status_code, answer.text)
            assert "nested deeper than 64" in answer.json()["error"]
        shallow = json.dumps({"id": 1, "x": [[[1]]]}).encode()
        ok = await client.post(url, content=shallow, headers={"Webhook-Signature": sign(SECRET, shallow)})
        assert ok.status_code != 500
