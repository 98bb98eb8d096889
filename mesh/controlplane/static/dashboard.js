/* The control plane's dashboard: refreshes the tables from /status and draws the charts from
 * /api/series every 5 s, without reloading the page. Everything agents report is inserted as
 * text (never as HTML). Charts: uPlot (static/uPlot.iife.min.js, MIT). The chart objects are in
 * window.meshCharts[flow][kind] (kind: throughput, latency, failures, retries, backlog). */
(function () {
  "use strict";
  var REFRESH_MS = 5000;
  var charts = {};
  window.meshCharts = charts;

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
  function health(h) { var b = el("b", h); var s = el("span", null, "h-" + h); s.appendChild(b); return s; }
  function replace(id, node) { var box = document.getElementById(id); box.replaceChildren(node); }

  function renderStatus(doc) {
    var cp = doc.control_plane, now = doc.generated_at;
    document.getElementById("summary").textContent =
      "replica " + cp.replica + " (" + (cp.is_leader ? "leader" : "follower") + ") · leader " +
      (cp.leader || "none") + " · NATS " + (cp.nats_connected ? "connected" : "DISCONNECTED") + " · " +
      new Date(now * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
    document.getElementById("counts").textContent = doc.agents.length + " agent(s): " +
      Object.keys(doc.counts).map(function (k) { return k + " " + doc.counts[k]; }).join(" · ");
    var bySite = {};
    doc.agents.forEach(function (a) { (bySite[a.site] = bySite[a.site] || []).push(a); });
    var agents = el("div");
    Object.keys(bySite).sort().forEach(function (site) {
      agents.appendChild(el("h3", "site " + site));
      agents.appendChild(table(
        ["name", "system", "host", "version", "health", "state", "last heartbeat", "outbox", "errors", "why"],
        bySite[site].map(function (a) {
          return [a.name, a.manifest.system || "-", a.host, a.version, health(a.health), a.state,
                  ago(a.last_heartbeat, now), a.outbox_depth, a.errors, a.reason];
        })));
    });
    if (!doc.agents.length) agents.appendChild(el("p", "no agent registered"));
    replace("agents", agents);
    replace("systems", table(
      ["system", "sites", "agents", "health", "captured/s", "applied/s", "failures/s", "backlog"],
      (doc.systems || []).map(function (s) {
        return [s.name, s.sites.join(", "), s.agents.join(", "), health(s.health),
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
    var box = document.getElementById("charts");
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

  function get(path) {
    return fetch(path, { credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (!r.ok) throw new Error(path + ": HTTP " + r.status);
      return r.json();
    });
  }

  function refresh() {
    Promise.all([get("status?agents=all"), get("api/series?minutes=60")]).then(function (res) {
      renderStatus(res[0]);
      renderSeries(res[1].flows);
      document.getElementById("error").textContent = "";
      document.body.dataset.updated = String(Date.now());
    }).catch(function (err) {
      document.getElementById("error").textContent = "update failed: " + err.message + " (retrying)";
    }).then(function () { setTimeout(refresh, REFRESH_MS); });
  }
  refresh();
})();
