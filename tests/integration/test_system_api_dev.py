"""``meshctl dev up`` serves the demo ERP's System API: ``customer.get`` and
``sales_order.create`` answer through ``meshctl api call`` with the admin creds it prints, the
ERP agent's control-plane-issued creds allow serving ``api.erp.>`` and the CRM agent's do not."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.security.authority import read_creds
from mesh.security.jwt import UserClaims, decode
from tests.integration._harness import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]


def test_dev_up_serves_the_erp_api(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", "dev", "up", "--data-dir", str(data),
         "--records", "20", "--rate", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    out: list[str] = []
    try:
        for line in proc.stdout:
            out.append(line)
            if "export MESH_CREDS=" in line:
                break
        text = "".join(out)
        assert "meshctl api call erp.customer.get --read" in text, text
        url = re.search(r"export MESH_NATS_URL=(\S+)", text)
        creds = re.search(r"export MESH_CREDS=(\S+)", text)
        assert url is not None, text
        assert creds is not None, text
        env = {**os.environ, "MESH_NATS_URL": url.group(1), "MESH_CREDS": creds.group(1)}

        def meshctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "mesh", "api", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        def served() -> bool:
            listed = meshctl("list", "--json", "--wait", "0.5")
            return listed.returncode == 0 and any(s["name"] == "mesh-erp" for s in json.loads(listed.stdout))

        wait_until(served, 30, "mesh-erp to answer $SRV.INFO")
        # A customer of our own: the demo load updates and deletes only the ones it inserted.
        cid, name = 9_000_001, "Queen Cozinha"
        with sqlite3.connect(data / "erp.db", timeout=10) as conn:
            conn.execute("INSERT INTO customers (id, name, country) VALUES (?, ?, 'BR')", (cid, name))
        got = meshctl("call", "erp.customer.get", "--read", "--data", json.dumps({"id": cid}))
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["name"] == name
        order = {"number": "SO-1", "customer_id": cid, "total": {"amount": 9900, "currency": "EUR"}}
        made = meshctl("call", "erp.sales_order.create", "--data", json.dumps(order), "--key", "demo-1")
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout) == {"order_id": 1, "number": "SO-1", "status": "confirmed"}
        again = meshctl("call", "erp.sales_order.create", "--data", json.dumps(order), "--key", "demo-1")
        assert json.loads(again.stdout) == json.loads(made.stdout)
        assert "replayed" in again.stderr
        with sqlite3.connect(data / "erp.db") as conn:
            assert conn.execute("SELECT count(*) FROM sales_orders").fetchone() == (1,)
        erp = decode(read_creds(data / "creds" / "erp-agent.creds").jwt, kind=UserClaims).nats
        cloud = decode(read_creds(data / "creds" / "cloud-agent.creds").jwt, kind=UserClaims).nats
        assert isinstance(erp, UserClaims)
        assert isinstance(cloud, UserClaims)
        assert "api.erp.>" in erp.sub.allow
        assert not any(s.startswith("api.") for s in cloud.sub.allow)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
