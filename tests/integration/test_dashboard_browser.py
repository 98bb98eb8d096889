"""The control plane's dashboard in headless Chromium against a running mesh (secured
nats-server, control plane, an on-prem and a cloud agent moving changes): every chart is drawn
with data points read back from uPlot (not an empty frame), the page updates itself without a
reload, agents are grouped by site, dead letters list their reason, no console error (a CSP
violation would be one), and a screenshot is kept (tmp dir, copied to $MESH_ARTIFACTS_DIR).

Needs Debian's ``chromium`` (driven by Playwright with ``executable_path``: no browser
download); without it the test skips with the reason, unless ``MESH_REQUIRE_CHROMIUM=1``: then it
fails.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import anyio
import pytest

from tests._secure import SecuredNatsServer
from tests.integration._harness import rows, wait_until
from tests.integration._ops_stack import ops_stack
from tests.integration.test_kpis import _publish_garbage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

KINDS = ("throughput", "latency", "failures", "retries", "backlog")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    reason = "chromium not found (apt-get install chromium)"
    if os.environ.get("MESH_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"{reason} (and MESH_REQUIRE_CHROMIUM=1)")
    pytest.skip(reason)


def test_dashboard_draws_charts_from_the_running_mesh(nats_server: SecuredNatsServer, tmp_path: Path) -> None:
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    with ops_stack(nats_server, tmp_path) as stack:
        stop = threading.Event()

        def load() -> None:
            while not stop.wait(0.05):
                stack.erp.mixed(5)

        stack.erp.insert(200)
        wait_until(lambda: len(rows(stack.crm_db)) == 200, 30, "200 rows at the CRM")
        anyio.run(_publish_garbage, stack, nats_server)
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        try:

            def series_ready() -> bool:
                doc = stack.get("/api/series?flow=customers&minutes=5")
                return len(doc["t"]) >= 3 and any(v for v in doc["applied_per_second"])

            wait_until(series_ready, 30, "3 points of series with changes applied")
            wait_until(lambda: any(f["dlq_top_reasons"] for f in stack.get("/status")["flows"]), 20,
                       "the dead letters' reasons in /status")  # fmt: skip
            errors: list[str] = []
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                try:
                    page = browser.new_page(viewport={"width": 1700, "height": 1300})
                    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    page.on(
                        "response",
                        lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None,
                    )
                    page.goto(stack.http + "/")
                    page.evaluate("() => { window.__sameDocument = true; }")
                    page.wait_for_function(
                        "() => window.meshCharts && window.meshCharts.customers"
                        " && window.meshCharts.customers.throughput.data[0].length >= 3",
                        timeout=20_000,
                    )
                    data = page.evaluate(
                        "() => Object.fromEntries(Object.entries(window.meshCharts.customers)"
                        ".map(([k, u]) => [k, u.data]))"
                    )
                    assert set(data) == set(KINDS)
                    assert any(v and v > 0 for v in data["throughput"][1]), data["throughput"]  # applied/s
                    assert any(v is not None and v > 0 for v in data["latency"][2]), data["latency"]  # p99
                    for kind in KINDS:
                        assert len(data[kind][0]) >= 3, kind
                        assert all(len(col) == len(data[kind][0]) for col in data[kind][1:]), kind
                    assert page.locator("#charts canvas").count() >= len(KINDS)
                    # updated in place: a later refresh, same document (no reload)
                    first = page.evaluate("() => document.body.dataset.updated")
                    page.wait_for_function(
                        f"() => document.body.dataset.updated && document.body.dataset.updated !== '{first}'",
                        timeout=15_000,
                    )
                    assert page.evaluate("() => window.__sameDocument === true")
                    agents = page.locator("#agents").inner_text()
                    assert "site cloud" in agents
                    assert "site on-prem" in agents
                    assert agents.index("crm-agent") < agents.index("erp-agent")  # cloud first
                    assert "DecodeError" in page.locator("#dlq").inner_text()
                    assert page.locator("#error").inner_text() == ""
                    shot = tmp_path / "dashboard.png"
                    page.screenshot(path=str(shot), full_page=True)
                finally:
                    browser.close()
            assert errors == []
            assert shot.stat().st_size > 10_000
            artifacts = os.environ.get("MESH_ARTIFACTS_DIR")
            if artifacts:
                Path(artifacts).mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, Path(artifacts) / "dashboard.png")
        finally:
            stop.set()
            worker.join(10)
