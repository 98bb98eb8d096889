"""The control plane owns ``mesh_api_results``: it creates it at start (direct get, one value
per key, 24 h max age) and re-creates it when it is deleted under it."""

from __future__ import annotations

import anyio
import nats
import pytest

from agents.control_plane import ControlPlane
from mesh.controlplane.settings import settings_from
from tests._secure import SecuredNatsServer
from tests.integration.test_heal import _cp_creds

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(60)]


async def test_the_control_plane_creates_and_heals_the_results_bucket(nats_server: SecuredNatsServer) -> None:
    settings = settings_from(
        {
            "name": "cp1",
            "nats": {"servers": [nats_server.url], "request_timeout": 2.0, "creds": _cp_creds(nats_server)},
        }
    )
    cp = ControlPlane(settings, heal_every=0.2)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(20):
            await tg.start(lambda task_status: cp.run(task_status=task_status))
        nc = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
        try:
            js = nc.jetstream()
            info = await js.stream_info("KV_mesh_api_results")
            assert info.config.allow_direct
            assert info.config.max_msgs_per_subject == 1
            assert info.config.max_age == 24 * 3600
            await js.delete_stream("KV_mesh_api_results")
            with anyio.fail_after(20):
                while cp.layout.heals < 1:
                    await anyio.sleep(0.05)
            assert (await js.stream_info("KV_mesh_api_results")).config.allow_direct
        finally:
            await nc.close()
            cp.stop()
