"""The suite runs secured: the ``nats_server`` fixture refuses anonymous clients (so CI can never
silently run without auth), accepts the admin creds, and an agent's least-privilege creds from
``meshctl security issue-agent`` publish its own origin and nothing else."""

from __future__ import annotations

import nats
import nats.errors
import pytest

from mesh.transport.jetstream import JetStream
from tests._secure import SecuredNatsServer

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def test_fixture_server_refuses_anonymous_clients(nats_server: SecuredNatsServer) -> None:
    nc = nats.aio.client.Client()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nc.connect(nats_server.url, allow_reconnect=False, connect_timeout=2)
    finally:
        await nc.close()


async def test_fixture_server_accepts_the_admin_creds(nats_server: SecuredNatsServer) -> None:
    async with JetStream(nats_server.nats_config(), name="admin") as js:
        assert js.is_connected
