"""End to end through the CLI: `meshctl agent register --config` reports the agent's state_dir
and allowed_paths in its manifest, and `meshctl flow apply` (dry run and real) refuses a flow
whose paths leave them, with the field path, before anything is stored."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from agents.control_plane import ControlPlane
from mesh.cli import agent_cp as cli_agent_cp
from mesh.cli import flow as cli_flow
from mesh.controlplane.client import ControlPlaneClient
from mesh.controlplane.settings import settings_from
from mesh.transport import JetStream
from tests._secure import SecuredNatsServer as NatsServer

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(90)]


def _cli(app: object, *args: str, creds: Path, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args), env={"MESH_CREDS": str(creds)})  # type: ignore[arg-type]
    assert result.exit_code == code, f"exit {result.exit_code} (expected {code}): {result.output}"
    assert "Traceback" not in result.output
    return result.output


def _flow(path: str) -> str:
    return f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.sink]
agent = "crm-agent"
adapter = "sqlite"
path = "{path}"
table = "customers"
key = "id"
"""


async def test_register_reports_the_dirs_and_apply_refuses_paths_outside(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    url = nats_server.url
    state, shared = tmp_path / "crm-state", tmp_path / "exports"
    config = tmp_path / "crm-agent.toml"
    config.write_text(
        f'[agent]\nname = "crm-agent"\nsystem = "crm"\nstate_dir = "crm-state"\n'
        f'allowed_paths = ["exports"]\n[nats]\nservers = ["{url}"]\n'
    )
    cp_creds = str(nats_server.security_dir / "creds" / "control-plane.creds")
    cp = ControlPlane(
        settings_from({"name": "cp1", "nats": {"servers": [url], "request_timeout": 2.0, "creds": cp_creds}})
    )
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(15):
            await tg.start(lambda task_status: cp.run(task_status=task_status))
            await cp.lease.wait(leader=True)  # type: ignore[union-attr]

        def cli(app: object, *args: str, code: int = 0) -> str:
            return _cli(app, *args, "--control-plane", url, creds=nats_server.admin_creds, code=code)

        await anyio.to_thread.run_sync(lambda: cli(cli_agent_cp.app, "register", "--config", str(config)))
        async with JetStream(nats_server.nats_config(request_timeout=2.0), name="test") as js:
            (record,) = (await ControlPlaneClient(js, timeout=5).agents("crm-agent")).agents
        assert record.manifest.state_dir == str(state.resolve())
        assert record.manifest.allowed_paths == [str(shared.resolve())]

        bad = tmp_path / "bad.toml"
        bad.write_text(_flow("../elsewhere/crm.db"))

        def refused(*extra: str) -> str:
            return cli(cli_flow.app, "apply", str(bad), *extra, code=1)

        outs = [await anyio.to_thread.run_sync(refused, "--dry-run"), await anyio.to_thread.run_sync(refused)]
        for out in outs:
            assert "flows[0].sink.path: path '../elsewhere/crm.db' resolves to" in out
            assert "outside the directories this agent allows" in out
        assert "no flows applied" in await anyio.to_thread.run_sync(lambda: cli(cli_flow.app, "list"))

        good = tmp_path / "good.toml"
        good.write_text(_flow(str(shared / "crm.db")))
        await anyio.to_thread.run_sync(lambda: cli(cli_flow.app, "apply", str(good)))
        assert "customers" in await anyio.to_thread.run_sync(lambda: cli(cli_flow.app, "list"))
        cp.stop()
        tg.cancel_scope.cancel()
