"""`meshctl dev up` as a user runs it: it syncs, reports, and stops everything it started; it is
secured by default (anonymous refused, each agent with one 0600 least-privilege creds file)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import nats
import nats.errors
import pytest
from nats.aio.client import Client

from mesh.security.authority import read_creds
from mesh.security.jwt import UserClaims, decode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd and int(pid) != os.getpid():
            found.append(f"{pid}: {cmd}")
    return found


def _dev_up(data: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mesh", "dev", "up", "--data-dir", str(data), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_dev_up_syncs_and_exits_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    proc = _dev_up(data, "--duration", "6", "--records", "500", "--rate", "100")
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "ERP and CRM in sync: yes" in out
    assert "applied=" in out
    assert "outbox=" in out
    assert "latency" in out
    assert "metrics http://127.0.0.1:" in out
    assert not _processes_mentioning(str(data)), "dev up left processes behind"
    # The flow carries canonical customers: named in the banner and status, one event shown decoded.
    assert "canonical customer/1" in out
    assert "sample canonical event  evt.customer.upserted.erp" in out
    assert "schema=customer/1" in out
    assert '"currency": "EUR"' in out  # money as {amount (minor units), currency}
    # ... and the CRM holds them in its own shape (text ids, decimal strings).
    with sqlite3.connect(data / "crm.db") as conn:
        rows = conn.execute("SELECT account_id, company, credit_limit FROM accounts").fetchall()
    assert rows
    assert all(isinstance(key, str) and re.fullmatch(r"\d+\.\d{2}", limit) for key, _, limit in rows)
    # Secured: each agent has exactly one creds file, 0600, with only its own part of the table.
    creds = data / "creds"
    assert sorted(p.name for p in creds.glob("*.creds")) == [
        "admin.creds",
        "cloud-agent.creds",
        "erp-agent.creds",
        "orchestrator.creds",
    ]
    assert "orchestrator  saga demo (trigger cmd.orchestrator.demo)" in out
    assert f"export MESH_CREDS={creds / 'admin.creds'}" in out
    for name, other in (("erp-agent", "crm"), ("cloud-agent", "erp")):
        path = creds / f"{name}.creds"
        assert path.stat().st_mode & 0o777 == 0o600
        claims = decode(read_creds(path).jwt, kind=UserClaims)
        assert claims.name == name
        assert isinstance(claims.nats, UserClaims)
        pub, sub = claims.nats.pub.allow, claims.nats.sub.allow
        assert ">" not in pub
        assert ">" not in sub
        assert f"mesh.cp.heartbeat.{name}" in pub
        assert f"evt.*.*.{other}" not in pub
        assert f"_INBOX.{name}.>" in sub
        # ... and no second credential: the broker authenticates its heartbeats, so the state
        # dir holds only its registration (agent id, no token) and no identity secret.
        state = data / "state" / name
        assert not (state / "credentials.json").exists()
        assert not (state / "identity").exists()
        assert json.loads((state / "registration.json").read_text())["token"] == ""
    erp_pub = decode(read_creds(creds / "erp-agent.creds").jwt, kind=UserClaims).nats.pub.allow  # type: ignore[union-attr]
    cloud_pub = decode(read_creds(creds / "cloud-agent.creds").jwt, kind=UserClaims).nats.pub.allow  # type: ignore[union-attr]
    assert "evt.*.*.erp" in erp_pub
    assert "$JS.API.CONSUMER.CREATE.MESH_EVENTS.customers-crm" in cloud_pub
    assert not any(p.startswith("$JS.API.CONSUMER.CREATE") for p in erp_pub)


async def _anonymous_refused(url: str, admin: Path) -> None:
    nc = Client()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nc.connect(url, allow_reconnect=False, connect_timeout=2)
    finally:
        await nc.close()
    ok = await nats.connect(url, user_credentials=str(admin), allow_reconnect=False, connect_timeout=2)
    await ok.close()


def test_sigterm_stops_everything_within_10s(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    proc = _dev_up(data, "--records", "200", "--rate", "200")
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    url = ""
    for line in proc.stdout:
        if "export MESH_NATS_URL=" in line:
            url = line.split("=", 1)[1].strip()
        if "applied=" in line:  # the first status line: everything is up
            break
        assert time.monotonic() < deadline, "no status line within 60 s"
    assert _processes_mentioning(str(data)), "expected nats-server and agents to be running"
    anyio.run(_anonymous_refused, url, data / "creds" / "admin.creds")
    # the banner's two exports are all an operator command needs
    env = {**os.environ, "MESH_NATS_URL": url, "MESH_CREDS": str(data / "creds" / "admin.creds")}
    listed = subprocess.run(
        [sys.executable, "-m", "mesh", "agent", "list"], env=env, capture_output=True, text=True, timeout=30
    )
    assert listed.returncode == 0, listed.stderr
    assert "erp-agent" in listed.stdout
    assert "cloud-agent" in listed.stdout
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=15)
    took = time.monotonic() - started
    assert took < 10, f"dev up took {took:.1f}s to stop"
    assert "stopped" in rest
    assert not _processes_mentioning(str(data)), "dev up left processes behind"
