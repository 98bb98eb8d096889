"""The control plane's dashboard page (``GET /``): the HTML shell that ``static/dashboard.js``
fills and refreshes, server-rendered with data when no bearer token guards the endpoint.

Re-exported as :func:`mesh.controlplane.http.render_dashboard`.
"""

from __future__ import annotations

import hashlib
import html
import time
from importlib import resources
from urllib.parse import quote

from mesh.controlplane.models import HEALTH_STATES, StatusReport

__all__ = ["render_dashboard"]

_STATIC = resources.files("mesh.controlplane").joinpath("static")
_V = hashlib.blake2b(
    b"".join(
        _STATIC.joinpath(n).read_bytes() for n in ("dashboard.js", "dashboard.css", "uPlot.iife.min.js")
    ),
    digest_size=6,
).hexdigest()
"""The static files' version, in their URLs (``?v=``): a new release's page never runs with the
previous release's script from the browser's cache (static files are cached 5 minutes)."""


def _ago(t: float | None, now: float) -> str:
    return "never" if t is None else f"{max(0.0, now - t):.1f}s ago"


def _num(x: float | None, scale: float = 1.0, unit: str = "", digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}{unit}"


_HEALTH_OPTIONS = "".join(f'<option value="{h}">{h}</option>' for h in HEALTH_STATES)


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _data_sections(report: StatusReport) -> dict[str, str]:
    """The server-rendered HTML of each data container of the page, by element id."""
    e = html.escape
    now = report.generated_at
    cp = report.control_plane
    sites: dict[str, list[str]] = {}
    for a in report.agents:
        sites.setdefault(a.site, []).append(
            f"<tr><td>{e(a.name)}</td><td>{e(a.manifest.system or '-')}</td><td>{e(a.host)}</td>"
            f"<td>{e(a.version)}</td>"
            f'<td class="h-{e(a.health)}"><b>{e(a.health)}</b></td><td>{e(a.state)}</td>'
            f"<td>{_ago(a.last_heartbeat, now)}</td><td>{a.outbox_depth}</td><td>{a.errors}</td>"
            f"<td>{e(a.reason)}</td></tr>"
        )
    agents_html = "".join(
        f"<h3>site {e(site)}</h3><table><tr><th>name</th><th>system</th><th>host</th><th>version</th>"
        f"<th>health</th><th>state</th><th>last heartbeat</th><th>outbox</th><th>errors</th>"
        f"<th>why</th></tr>{''.join(rows)}</table>"
        for site, rows in sorted(sites.items())
    )
    page = report.agents_page
    if not agents_html:
        agents_html = (
            "<p>every agent is healthy</p>"
            if page is not None and page.mode == "summary" and any(report.counts.values())
            else "<p>no agent registered</p>"
        )
    system_rows = "".join(
        f"<tr><td>{e(s.name)}</td><td>{e(', '.join(s.sites))}</td><td>{e(', '.join(s.agents))}</td>"
        f'<td class="h-{e(s.health)}"><b>{e(s.health)}</b></td><td>{s.captured_per_second:.1f}</td>'
        f"<td>{s.applied_per_second:.1f}</td><td>{s.failures_per_second:.2f}</td><td>{s.backlog}</td></tr>"
        for s in report.systems
    )
    flow_rows = "".join(
        f"<tr><td>{e(f.name)}</td><td>{e(f.state)}</td><td>{e(', '.join(f.agents))}</td>"
        f"<td>{f.applied_per_second:.1f}</td><td>{_num(f.latency_p50_seconds, 1000, ' ms')}</td>"
        f"<td>{_num(f.latency_p99_seconds, 1000, ' ms')}</td><td>{f.failures_per_second:.2f}</td>"
        f"<td>{f.retries_per_second:.2f}</td><td>{f.backlog}</td><td>{f.consumer_pending}</td>"
        f"<td>{f.dlq_depth}</td><td>{_num(f.freshness_seconds, 1, ' s')}</td>"
        f"<td>{_num(f.slo_ratio, 100, ' %')}</td></tr>"
        for f in report.flows
    )
    dlq_rows = "".join(
        f"<tr><td>{e(f.name)}</td><td>{f.dlq_depth}</td><td>{f.dlq_oldest_age_seconds:.0f} s</td><td>"
        + "<br>".join(f"{r.count} x {e(r.error_class)}: {e(r.reason[:160])}" for r in f.dlq_top_reasons)
        + "</td></tr>"
        for f in report.flows
        if f.dlq_depth
    )
    tx = report.transactions
    if tx is None:
        txns = "<p>no transaction traced yet</p>"
    else:
        failed = "".join(
            f'<tr><td><a href="#trace={e(quote(t.correlation_id, safe=""))}">{e(t.correlation_id)}</a></td>'
            f"<td>{e(', '.join(t.business_keys[:3]))}</td><td>{e(', '.join(t.systems))}</td>"
            f"<td>{_when(t.updated / 1000)}</td><td>{e(t.reason)}</td></tr>"
            for t in tx.recent_failed
        )
        txns = (
            '<p class="counts">'
            + " · ".join(f'<span class="t-{e(k)}">{e(k)} {v}</span>' for k, v in tx.counts.items())
            + "</p>"
            + (
                "<table><tr><th>failed transaction</th><th>business keys</th><th>systems</th>"
                f"<th>last record (UTC)</th><th>why</th></tr>{failed}</table>"
                if failed
                else "<p>no failed transaction</p>"
            )
        )
    run_rows = "".join(
        f"<tr><td>{e(r.flow)}</td><td>{e(r.run)}</td><td>{e(r.agent)}</td><td>{e(r.adapter)}</td>"
        f'<td class="r-{e(r.state)}"><b>{e(r.state)}</b></td><td>{_when(r.started_at)}</td>'
        f"<td>{_when(r.finished_at)}</td><td>{r.read}</td><td>{r.published}</td><td>{r.applied}</td>"
        f"<td>{r.skipped}</td><td>{r.failed}</td><td>{r.resumed}</td>"
        f'<td class="mono">{e(r.checksum[:16] or "-")}</td></tr>'
        for r in report.runs
    )
    runs = (
        "<table><tr><th>flow</th><th>run</th><th>agent</th><th>adapter</th><th>state</th>"
        "<th>started (UTC)</th><th>finished (UTC)</th><th>read</th><th>published</th><th>applied</th>"
        f"<th>skipped</th><th>failed</th><th>resumed</th><th>checksum</th></tr>{run_rows}</table>"
        if run_rows
        else "<p>no bulk run recorded</p>"
    )
    total = sum(report.counts.values())
    counts = " · ".join(f"{e(k)} {v}" for k, v in report.counts.items())
    return {
        "summary": (
            f"replica <b>{e(cp.replica)}</b> ({'leader' if cp.is_leader else 'follower'}) · "
            f"leader {e(cp.leader or 'none')} · NATS "
            f"{'connected' if cp.nats_connected else '<b>disconnected</b>'} · version {e(cp.version)} · "
            + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
        ),
        "counts": f"{total} agent(s): {counts}",
        "transactions": txns,
        "runs": runs,
        "agents": agents_html,
        "systems": (
            "<table><tr><th>system</th><th>sites</th><th>agents</th><th>health</th><th>captured/s</th>"
            f"<th>applied/s</th><th>failures/s</th><th>backlog</th></tr>{system_rows}</table>"
        ),
        "flows": (
            "<table><tr><th>name</th><th>state</th><th>agents</th><th>applied/s</th><th>p50</th>"
            "<th>p99</th><th>failures/s</th><th>retries/s</th><th>backlog</th><th>consumer pending</th>"
            f"<th>dead letters</th><th>freshness</th><th>SLO</th></tr>{flow_rows}</table>"
        ),
        "dlq": (
            "<table><tr><th>flow</th><th>depth</th><th>oldest</th><th>top reasons</th></tr>"
            f"{dlq_rows}</table>"
        ),
    }


def render_dashboard(report: StatusReport | None) -> str:
    """The dashboard page: identity of the replica, agents (those needing attention by default,
    every agent paged and filtered on demand), transactions with the latest failed ones (each
    opens its trace in the page), bulk runs, systems, flows with their KPIs and charts, dead
    letters. ``static/dashboard.js`` refreshes it every 5 s without reloading.

    With a ``report`` (no token configured) the data is server-rendered, readable without
    scripts; with None it is the shell served without the token: no data at all, the script
    asks for the token and fetches everything with it. Everything agents report is
    HTML-escaped; no inline script or style (the CSP allows neither)."""
    loading = "<p>loading…</p>"
    data = _data_sections(report) if report is not None else {}
    d = lambda key: data.get(key, loading)  # noqa: E731
    auth = "none" if report is not None else "token"
    # links a browser can follow only without a token (a link cannot carry the header)
    raw = (
        '<a href="status">status JSON</a> · <a href="api/series">series JSON</a> · '
        '<a href="status/schema">schema</a> · <a href="metrics">metrics</a> · '
        if report is not None
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>connector mesh · control plane</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="static/uPlot.min.css?v={_V}">
<link rel="stylesheet" href="static/dashboard.css?v={_V}">
</head>
<body data-auth="{auth}"><header><h1>Connector mesh</h1>
<p id="summary">{data.get("summary", "control plane")}</p>
<form id="login" class="login" hidden><label for="token">Bearer token</label>
<input id="token" name="token" type="password" autocomplete="off" spellcheck="false" size="40">
<button type="submit">Show dashboard</button> <span id="login-msg" class="error"></span>
<span class="hint">This control plane requires its bearer token (<code>http_token_env</code>). It is
kept in this browser tab only and sent as an <code>Authorization</code> header.</span></form>
<p id="stale" class="banner" role="alert" hidden></p>
<p id="counts">{data.get("counts", "")}</p>
<p id="session" hidden><button id="signout" type="button">Forget the token</button></p>
</header>
<h2>Transactions</h2><div id="transactions">{d("transactions")}</div>
<section id="trace" class="trace" hidden><h2>Trace <span id="trace-id"></span>
<button id="trace-close" type="button">close</button></h2><div id="trace-body"></div></section>
<h2>Bulk runs</h2><div id="runs">{d("runs")}</div>
<h2>Agents</h2>
<div id="agent-controls" class="controls" hidden>
<label>show <select id="agent-mode"><option value="summary">needing attention</option>
<option value="all">all agents</option></select></label>
<label>site <input id="agent-site" size="14" autocomplete="off"></label>
<label>health <select id="agent-health"><option value="">any</option>{_HEALTH_OPTIONS}</select></label>
<label>per page <select id="agent-limit"><option>25</option><option selected>50</option>
<option>100</option><option>500</option></select></label>
<button id="agent-prev" type="button">&lsaquo; previous</button>
<button id="agent-next" type="button">next &rsaquo;</button>
<span id="agent-page"></span></div>
<div id="sites"></div>
<div id="agents">{d("agents")}</div>
<h2>Systems</h2><div id="systems">{d("systems")}</div>
<h2>Flows</h2><div id="flows">{d("flows")}</div>
<h2>Charts (last hour)</h2><div id="charts"><p>charts need JavaScript</p></div>
<h2>Dead letters</h2><div id="dlq">{d("dlq")}</div>
<p id="error" class="error"></p>
<p>{raw}charts by <a href="static/uPlot.LICENSE">uPlot</a> (MIT)</p>
<script src="static/uPlot.iife.min.js?v={_V}"></script><script src="static/dashboard.js?v={_V}"></script>
</body></html>
"""
