/* The control plane's dashboard: refreshes the page from /status and the charts from /api/series
 * every 5 s, without reloading. Everything agents report is inserted as text (never as HTML).
 *
 * - /status is read as the default summary (counts, sites needing attention, agents that are not
 *   healthy); the agent controls page and filter every agent on demand (?agents=all&site=&health=
 *   &limit=&offset=). The last answer's ETag goes back as If-None-Match: an unchanged status costs
 *   a 304 with no body (window.meshStats counts them).
 * - A failed transaction links to #trace=<correlation id>; the trace panel renders /trace/<id>.
 * - With a bearer token configured (body[data-auth=token], or any 401), the page asks for the
 *   token, keeps it in sessionStorage (this tab only; never in a URL or a cookie) and sends it as
 *   "Authorization: Bearer" on every fetch. A 401 shows that the token was refused.
 * - When a refresh fails, a banner says since when the data is stale. A hidden tab stops polling
 *   and refreshes as soon as it is shown again.
 * Charts: uPlot (static/uPlot.iife.min.js, MIT); chart objects in window.meshCharts[flow][kind]
 * (kind: throughput, latency, failures, retries, backlog). */
(function () {
  "use strict";
  var REFRESH_MS = 5000;
  var TOKEN_KEY = "mesh.dashboard.token";
  var HEALTH = ["healthy", "degraded", "stale", "lost"];
  var MAX_SITES = 50;
  var charts = {};
  var stats = { refreshes: 0, notModified: 0, failures: 0 };
  window.meshCharts = charts;
  window.meshStats = stats;
  var view = { mode: "summary", site: "", health: "", limit: 50, offset: 0 };
  var lastStatus = null;   // {path, etag, doc}: the last /status answer, reused on a 304
  var lastGood = null;     // Date of the last refresh that succeeded
  var timer = null;
  var waitingForToken = false;

  function $(id) { return document.getElementById(id); }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function table(headers, rows) {
    var t = el("table"), tr = el("tr");
    headers.forEach(function (h) { tr.appendChild(el("th", h)); });
    t.appendChild(tr);
    rows.forEach(function (r) {
      var row = el("tr");
      r.forEach(function (c) {
        if (c instanceof Node) { var td = el("td"); td.appendChild(c); row.appendChild(td); }
        else row.appendChild(el("td", c));
      });
      t.appendChild(row);
    });
    return t;
  }
  function num(x, scale, unit, digits) {
    if (x === null || x === undefined) return "-";
    return (x * (scale || 1)).toFixed(digits === undefined ? 1 : digits) + (unit || "");
  }
  function ago(t, now) { return t === null ? "never" : Math.max(0, now - t).toFixed(1) + "s ago"; }
  function when(t) {  // seconds since the epoch -> "YYYY-MM-DD HH:MM:SS" (UTC)
    return t === null || t === undefined ? "-" : new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19);
  }
  function clock(d) { return d.toISOString().slice(11, 19) + " UTC"; }
  function badge(text, prefix) { var s = el("span", null, prefix + text); s.appendChild(el("b", text)); return s; }
  function replace(id, node) { $(id).replaceChildren(node); }

  /* ---- the bearer token: sessionStorage only ---- */
  function token() { try { return sessionStorage.getItem(TOKEN_KEY); } catch (e) { return null; } }
  function setToken(t) {
    try { if (t) sessionStorage.setItem(TOKEN_KEY, t); else sessionStorage.removeItem(TOKEN_KEY); }
    catch (e) { /* storage disabled: the token lives as long as this page */ }
    memoryToken = t;
  }
  var memoryToken = null;
  function currentToken() { return token() || memoryToken; }

  function AuthError(sent) {
    this.sent = sent;
    this.message = sent ? "the control plane refused this token (HTTP 401): check it and enter it again"
                        : "this control plane requires a bearer token";
  }

  function get(path, conditional) {
    var headers = {}, t = currentToken();
    if (t) headers.Authorization = "Bearer " + t;
    var prior = conditional && lastStatus && lastStatus.path === path ? lastStatus : null;
    if (prior) headers["If-None-Match"] = prior.etag;
    // no-store: the browser's cache stays out of it; the If-None-Match above does the revalidation
    return fetch(path, { headers: headers, cache: "no-store", credentials: "omit" }).then(function (r) {
      if (r.status === 304 && prior) { stats.notModified += 1; return prior.doc; }
      if (r.status === 401) throw new AuthError(!!t);
      if (!r.ok) {
        return r.json().catch(function () { return {}; }).then(function (body) {
          throw new Error(path + ": HTTP " + r.status + (body.error ? " (" + body.error + ")" : ""));
        });
      }
      return r.json().then(function (doc) {
        var etag = r.headers.get("ETag");
        if (conditional) lastStatus = etag ? { path: path, etag: etag, doc: doc } : null;
        return doc;
      });
    });
  }

  function showLogin(message) {
    waitingForToken = true;
    $("login").hidden = false;
    $("session").hidden = true;
    $("login-msg").textContent = message || "";
    $("token").focus();
  }

  /* ---- rendering ---- */
  function renderIdentity(doc) {
    var cp = doc.control_plane;
    $("summary").textContent =
      "replica " + cp.replica + " (" + (cp.is_leader ? "leader" : "follower") + ") · leader " +
      (cp.leader || "none") + " · NATS " + (cp.nats_connected ? "connected" : "DISCONNECTED") +
      " · version " + cp.version + " · " + when(doc.generated_at) + " UTC";
    var total = 0;
    Object.keys(doc.counts).forEach(function (k) { total += doc.counts[k]; });
    $("counts").textContent = total + " agent(s): " +
      Object.keys(doc.counts).map(function (k) { return k + " " + doc.counts[k]; }).join(" · ");
  }

  function renderTransactions(doc) {
    var tx = doc.transactions, box = el("div");
    if (!tx) { replace("transactions", el("p", "no transaction traced yet")); return; }
    var counts = el("p", null, "counts");
    Object.keys(tx.counts).forEach(function (k, i) {
      if (i) counts.appendChild(document.createTextNode(" · "));
      counts.appendChild(el("span", k + " " + tx.counts[k], "t-" + k));
    });
    box.appendChild(counts);
    if (!tx.recent_failed.length) box.appendChild(el("p", "no failed transaction"));
    else box.appendChild(table(["failed transaction", "business keys", "systems", "last record (UTC)", "why"],
      tx.recent_failed.map(function (t) {
        var a = el("a", t.correlation_id);
        a.href = "#trace=" + encodeURIComponent(t.correlation_id);
        return [a, t.business_keys.slice(0, 3).join(", "), t.systems.join(", "), when(t.updated / 1000), t.reason];
      })));
    replace("transactions", box);
  }

  function renderRuns(doc) {
    var runs = doc.runs || [];
    if (!runs.length) { replace("runs", el("p", "no bulk run recorded")); return; }
    replace("runs", table(["flow", "run", "agent", "adapter", "state", "started (UTC)", "finished (UTC)", "read",
                           "published", "applied", "skipped", "failed", "resumed", "checksum"],
      runs.map(function (r) {
        return [r.flow, r.run, r.agent, r.adapter, badge(r.state, "r-"), when(r.started_at), when(r.finished_at),
                r.read, r.published, r.applied, r.skipped, r.failed, r.resumed || 0,
                el("span", (r.checksum || "-").slice(0, 16), "mono")];
      })));
  }

  function renderAgents(doc) {
    var now = doc.generated_at, page = doc.agents_page;
    var bySite = {};
    doc.agents.forEach(function (a) { (bySite[a.site] = bySite[a.site] || []).push(a); });
    var agents = el("div");
    Object.keys(bySite).sort().forEach(function (site) {
      agents.appendChild(el("h3", "site " + site));
      agents.appendChild(table(
        ["name", "system", "host", "version", "health", "state", "last heartbeat", "outbox", "errors", "why"],
        bySite[site].map(function (a) {
          return [a.name, a.manifest.system || "-", a.host, a.version, badge(a.health, "h-"), a.state,
                  ago(a.last_heartbeat, now), a.outbox_depth, a.errors, a.reason];
        })));
    });
    var total = 0;
    Object.keys(doc.counts).forEach(function (k) { total += doc.counts[k]; });
    if (!doc.agents.length) {
      var filtered = view.site || view.health || view.offset;
      agents.appendChild(el("p", !total ? "no agent registered"
        : filtered ? "no agent matches" : view.mode === "summary" ? "every agent is healthy" : "no agent"));
    }
    replace("agents", agents);
    // sites needing attention (summary) or every site (all): click one to list its agents
    // at most MAX_SITES rows, the sites with the most agents needing attention first
    var sites = doc.sites || {};
    var trouble = function (s) { return (sites[s].degraded || 0) + (sites[s].stale || 0) + (sites[s].lost || 0); };
    var names = Object.keys(sites).sort(function (a, b) { return trouble(b) - trouble(a) || (a < b ? -1 : 1); });
    var siteBox = el("div");
    if (names.length) {
      siteBox.appendChild(table(["site"].concat(HEALTH), names.slice(0, MAX_SITES).map(function (s) {
        var b = el("button", s, "link");
        b.type = "button";
        b.dataset.site = s;
        return [b].concat(HEALTH.map(function (h) { return sites[s][h] || 0; }));
      })));
      if (names.length > MAX_SITES) {
        siteBox.appendChild(el("p", (names.length - MAX_SITES) + " more site(s): type a site's name to list its agents"));
      }
    }
    replace("sites", siteBox);
    if (page) {
      var first = page.total ? page.offset + 1 : 0, last = page.offset + doc.agents.length;
      $("agent-page").textContent = (page.mode === "summary" ? "needing attention: " : "agents: ") + first +
        "-" + last + " of " + page.total + " · " + page.sites + " site(s)";
      $("agent-prev").disabled = page.offset <= 0;
      $("agent-next").disabled = last >= page.total;
    }
  }

  function renderStatus(doc) {
    renderIdentity(doc);
    renderTransactions(doc);
    renderRuns(doc);
    renderAgents(doc);
    replace("systems", table(
      ["system", "sites", "agents", "health", "captured/s", "applied/s", "failures/s", "backlog"],
      (doc.systems || []).map(function (s) {
        return [s.name, s.sites.join(", "), s.agents.join(", "), badge(s.health, "h-"),
                num(s.captured_per_second), num(s.applied_per_second), num(s.failures_per_second, 1, "", 2),
                s.backlog];
      })));
    replace("flows", table(
      ["name", "state", "agents", "applied/s", "p50", "p99", "failures/s", "retries/s", "backlog",
       "consumer pending", "dead letters", "freshness", "SLO"],
      doc.flows.map(function (f) {
        return [f.name, f.state, f.agents.join(", "), num(f.applied_per_second),
                num(f.latency_p50_seconds, 1000, " ms"), num(f.latency_p99_seconds, 1000, " ms"),
                num(f.failures_per_second, 1, "", 2), num(f.retries_per_second, 1, "", 2), f.backlog,
                f.consumer_pending, f.dlq_depth, num(f.freshness_seconds, 1, " s"),
                num(f.slo_ratio, 100, " %")];
      })));
    replace("dlq", table(["flow", "depth", "oldest", "top reasons"],
      doc.flows.filter(function (f) { return f.dlq_depth > 0; }).map(function (f) {
        var reasons = el("div");
        (f.dlq_top_reasons || []).forEach(function (r) {
          reasons.appendChild(el("div", r.count + " x " + r.error_class + ": " + r.reason.slice(0, 160)));
        });
        return [f.name, f.dlq_depth, num(f.dlq_oldest_age_seconds, 1, " s", 0), reasons];
      })));
  }

  var KINDS = [
    ["throughput", "throughput (changes/s)", [["applied/s", "applied_per_second", "#1a7f37"],
                                              ["captured/s", "captured_per_second", "#0969da"]], 1],
    ["latency", "latency (ms)", [["p50", "latency_p50_seconds", "#0969da"],
                                 ["p99", "latency_p99_seconds", "#cf222e"]], 1000],
    ["failures", "failures/s", [["failures/s", "failures_per_second", "#cf222e"]], 1],
    ["retries", "retries/s", [["retries/s", "retries_per_second", "#9a6700"]], 1],
    ["backlog", "backlog (messages)", [["backlog", "backlog_messages", "#8250df"]], 1],
  ];

  function columns(doc, kind) {
    var data = [doc.t];
    kind[2].forEach(function (s) {
      data.push(doc[s[1]].map(function (v) { return v === null ? null : v * kind[3]; }));
    });
    return data;
  }

  function renderSeries(docs) {
    var box = $("charts");
    if (!docs.length) {
      box.replaceChildren(el("p", "no flow has reported yet"));
      return;
    }
    if (box.querySelector("p")) box.replaceChildren();
    docs.forEach(function (doc) {
      var flow = doc.flow;
      if (!charts[flow]) {
        charts[flow] = {};
        var row = el("div", null, "flow-charts");
        row.appendChild(el("h3", "flow " + flow));
        box.appendChild(row);
        KINDS.forEach(function (kind) {
          var holder = el("div", null, "chart");
          row.appendChild(holder);
          var series = [{}].concat(kind[2].map(function (s) {
            return { label: s[0], stroke: s[2], width: 1.5, spanGaps: true };
          }));
          charts[flow][kind[0]] = new uPlot(
            { title: kind[1], width: 360, height: 180, series: series, scales: { x: { time: true } } },
            columns(doc, kind), holder);
        });
      } else {
        KINDS.forEach(function (kind) { charts[flow][kind[0]].setData(columns(doc, kind)); });
      }
    });
  }

  /* ---- the trace panel: #trace=<correlation id, envelope id or entity:key> ---- */
  function traceTarget() {
    var m = /^#trace=(.+)$/.exec(location.hash);
    if (!m) return null;
    try { return decodeURIComponent(m[1]); } catch (e) { return m[1]; }
  }

  function loadTrace() {
    var ident = traceTarget(), panel = $("trace");
    if (!ident) { panel.hidden = true; $("trace-body").replaceChildren(); return; }
    panel.hidden = false;
    $("trace-id").textContent = ident;
    $("trace-body").replaceChildren(el("p", "loading…"));
    get("trace/" + encodeURIComponent(ident), false).then(function (doc) {
      if (traceTarget() !== ident) return;
      var box = el("div");
      doc.transactions.forEach(function (t) {
        var head = el("p");
        head.appendChild(el("span", "transaction " + t.correlation_id + ": "));
        head.appendChild(badge(t.status, "t-"));
        if (t.reason) head.appendChild(el("span", " — " + t.reason));
        box.appendChild(head);
        box.appendChild(table(["time (UTC)", "kind", "agent", "system", "flow", "business key", "outcome",
                               "latency", "detail"],
          t.records.map(function (r) {
            return [new Date(r.at).toISOString().replace("T", " ").slice(0, 23), r.kind, r.agent, r.system || "-",
                    r.flow || "-", r.business_key || "-", r.outcome || "-",
                    r.latency_ms ? r.latency_ms + " ms" : "-", r.detail || ""];
          })));
      });
      $("trace-body").replaceChildren(box);
    }).catch(function (err) {
      if (traceTarget() !== ident) return;
      if (err instanceof AuthError) { showLogin(err.message); return; }
      $("trace-body").replaceChildren(el("p", "cannot load the trace: " + err.message, "error"));
    });
  }

  /* ---- refresh loop ---- */
  function statusPath() {
    var q = ["agents=" + view.mode, "limit=" + view.limit, "offset=" + view.offset];
    if (view.site) q.push("site=" + encodeURIComponent(view.site));
    if (view.health) q.push("health=" + encodeURIComponent(view.health));
    return "status?" + q.join("&");
  }

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(refresh, ms);
  }

  function stale(message) {
    var banner = $("stale");
    banner.textContent = (lastGood
      ? "Data is stale: last good refresh at " + clock(lastGood) + " (" +
        Math.round((Date.now() - lastGood.getTime()) / 1000) + " s ago). "
      : "No data yet. ") + message + " Retrying every " + REFRESH_MS / 1000 + " s.";
    banner.hidden = false;
    document.body.classList.add("is-stale");
  }

  var paused = false;
  var generation = 0;  // a refresh started later (the view changed) wins over one in flight

  function refresh() {
    clearTimeout(timer);
    if (waitingForToken) return;
    if (document.hidden) { paused = true; return; }  // a background tab polls nothing
    var mine = ++generation;
    Promise.all([get(statusPath(), true), get("api/series?minutes=60", false)]).then(function (res) {
      if (mine !== generation) return;
      renderStatus(res[0]);
      renderSeries(res[1].flows);
      lastGood = new Date();
      stats.refreshes += 1;
      var cp = res[0].control_plane;
      if (!cp.nats_connected) {
        stale("Replica " + cp.replica + " has lost its NATS connection: agents' reports are not arriving.");
      } else {
        $("stale").hidden = true;
        document.body.classList.remove("is-stale");
      }
      $("error").textContent = "";
      $("session").hidden = !currentToken();
      document.body.dataset.updated = String(Date.now());
      schedule(REFRESH_MS);
    }).catch(function (err) {
      if (mine !== generation) return;
      stats.failures += 1;
      if (err instanceof AuthError) {
        if (err.sent) setToken(null);
        showLogin(err.message);
        return;
      }
      var what = err instanceof TypeError ? "The control plane is unreachable (" + err.message + ")."
                                          : "Update failed: " + err.message + ".";
      stale(what);
      schedule(REFRESH_MS);
    });
  }

  function changeView(patch) {
    Object.keys(patch).forEach(function (k) { view[k] = patch[k]; });
    lastStatus = null;
    refresh();
  }

  function wire() {
    $("agent-controls").hidden = false;
    $("agent-mode").addEventListener("change", function (e) { changeView({ mode: e.target.value, offset: 0 }); });
    $("agent-health").addEventListener("change", function (e) { changeView({ health: e.target.value, offset: 0 }); });
    $("agent-limit").addEventListener("change", function (e) {
      changeView({ limit: parseInt(e.target.value, 10), offset: 0 });
    });
    $("agent-site").addEventListener("change", function (e) { changeView({ site: e.target.value.trim(), offset: 0 }); });
    $("agent-prev").addEventListener("click", function () {
      changeView({ offset: Math.max(0, view.offset - view.limit) });
    });
    $("agent-next").addEventListener("click", function () { changeView({ offset: view.offset + view.limit }); });
    $("sites").addEventListener("click", function (e) {
      var site = e.target.dataset && e.target.dataset.site;
      if (site) { $("agent-site").value = site; $("agent-mode").value = "all"; changeView({ mode: "all", site: site, offset: 0 }); }
    });
    $("login").addEventListener("submit", function (e) {
      e.preventDefault();
      var t = $("token").value.trim();
      if (!t) { $("login-msg").textContent = "enter the token"; return; }
      setToken(t);
      $("token").value = "";
      $("login-msg").textContent = "";
      $("login").hidden = true;
      waitingForToken = false;
      lastStatus = null;
      refresh();
      loadTrace();
    });
    $("signout").addEventListener("click", function () {
      setToken(null);
      showLogin("token forgotten");
    });
    $("trace-close").addEventListener("click", function () { history.replaceState(null, "", location.pathname); loadTrace(); });
    window.addEventListener("hashchange", loadTrace);
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && paused) { paused = false; refresh(); }
    });
  }

  wire();
  if (document.body.dataset.auth === "token" && !currentToken()) showLogin("");
  else { refresh(); loadTrace(); }
})();
