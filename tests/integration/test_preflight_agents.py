"""``meshctl flow apply --dry-run --connect``: the agents named in a flow file check their side of
each flow against the real systems, on their existing command subject, as they would run it
(their path confinement included), and nothing is applied. Secured nats-server, the control
plane and two enrolled agents as processes; another agent may not ask them."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.integration._harness import AgentProcess, make_crm, make_erp
from tests.integration.test_enrollment import Mesh, Raw

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("preflight"))
    m.start()
    try:
        yield m
    finally:
        m.stop()


def flow_file(path: Path, erp: Path, crm: Path) -> Path:
    path.write_text(
        f"""
[[flows]]
name = "customers"
entity = "customer"
[flows.source]
agent = "erp-agent"
adapter = "sqlite"
path = "{erp}"
table = "custs"
key = "id"
[flows.sink]
agent = "crm-agent"
adapter = "sqlite"
path = "{crm}"
table = "customers"
key = "id"
[flows.from_canonical.fields]
id = "id"
name = "name"
vat = "tax_number"

[[flows]]
name = "ok-customers"
entity = "customer"
[flows.source]
agent = "erp-agent"
adapter = "sqlite"
path = "{erp}"
table = "customers"
key = "id"

[[flows]]
name = "elsewhere"
entity = "customer"
[flows.sink]
agent = "crm-agent"
adapter = "sqlite"
path = "{crm}"
table = "customers"
key = "cust_id"
"""
    )
    return path


def test_agents_preflight_their_parts_and_nothing_is_applied(mesh: Mesh) -> None:
    erp_cfg, _ = mesh.enroll("erp-agent", "erp")
    crm_cfg, _ = mesh.enroll("crm-agent", "crm")
    erp_db, crm_db = mesh.root / "erp.db", mesh.root / "crm.db"
    make_erp(erp_db)
    make_crm(crm_db)
    agents = [AgentProcess(erp_cfg, mesh.root / "erp.log"), AgentProcess(crm_cfg, mesh.root / "crm.log")]
    try:
        for a in agents:
            a.start(timeout=60)
        file = flow_file(mesh.root / "flows.toml", erp_db, crm_db)
        out = mesh.cli("flow", "apply", "--dry-run", "--connect", str(file), code=1)
        lines = [line for line in out.splitlines() if line.startswith(f"{file}: ")]
        assert lines, out
        assert (
            f'{file}: flows[0].source.table: table "custs" not found in sqlite {erp_db} (agent erp-agent)'
            in lines
        )
        assert (
            f'{file}: flows[0].sink.table: column "vat" (written by the mapping) not found in table '
            f'"customers" (sqlite {crm_db}) (agent crm-agent)'
        ) in lines
        assert f"{file}: ok-customers: erp-agent: every source and sink reached" in lines
        assert (
            f'{file}: flows[2].sink.key: column "cust_id" not found in table "customers" (sqlite {crm_db}) '
            "(agent crm-agent)"
        ) in lines
        assert len(set(lines)) == 4, out  # (stderr shows twice in the captured output)
        assert "flow customers: would be created" in out
        assert "no flows applied" in mesh.cli("flow", "list")
        with sqlite3.connect(erp_db) as c:  # nothing installed: the dry run writes nothing
            assert c.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall() == []
        mesh.cli("flow", "apply", "--connect", str(file), code=2)  # --connect needs --dry-run
        assert agents[1].terminate() == 0  # an agent that is not running: said, per flow
        out = mesh.cli("flow", "apply", "--dry-run", "--connect", str(file), code=1)
        assert f"{file}: flows[0]: agent crm-agent did not answer: " in out
        assert f"{file}: flows[2]: agent crm-agent did not answer: " in out
        assert "Traceback" not in out
    finally:
        for a in agents:
            a.terminate()


def test_another_agent_may_not_ask_an_agent_to_preflight(mesh: Mesh) -> None:
    _, creds = mesh.enroll("nosy", "erp")

    async def main() -> None:
        raw = await Raw().connect(mesh.url, creds, "_INBOX.nosy")
        try:
            await raw.refused("mesh.agent.crm-agent")
        finally:
            await raw.nc.close()

    anyio.run(main)
