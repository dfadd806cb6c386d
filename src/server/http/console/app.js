// The Sluice console: reads /api/v1/ once a second and redraws the current page.
// Pages (by URL hash): #/ overview, #/topics, #/topics/NAME, #/groups, #/groups/NAME.
// Every value from the broker is inserted as text, never as markup. Times are shown in the
// browser's time zone, as in the header's "updated" line.
"use strict";

const REFRESH_MS = 1000;
let token = sessionStorage.getItem("sluice-token") || "";
let timer = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else if (k === "testid") e.dataset.testid = v;
    else e.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (!isFinite(s)) return "> 2.5 s";
  return s < 1 ? (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms" : s.toFixed(2) + " s";
}

function count(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en");
}

async function api(path) {
  const headers = token ? { authorization: "Bearer " + token } : {};
  const r = await fetch("/api/v1/" + path, { headers });
  if (r.status === 401) {
    document.getElementById("login").hidden = false;
    throw new Error("a token is needed");
  }
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function card(label, value, testid) {
  return el("div", { class: "card" },
    el("div", { class: "label" }, label),
    el("div", { class: "value", testid }, value));
}

function table(columns, rows, testid) {
  const head = el("tr", {}, columns.map(([name, num]) => el("th", { class: num ? "num" : null }, name)));
  const body = rows.length
    ? rows.map((cells, i) => el("tr", { testid: testid ? testid + "-" + i : null },
        cells.map((c, j) => el("td", { class: columns[j][1] ? "num" : null }, c))))
    : [el("tr", {}, el("td", { class: "empty", colspan: columns.length }, "none"))];
  return el("table", { testid }, el("thead", {}, head), el("tbody", {}, body));
}

function link(href, text) {
  return el("a", { href }, text);
}

// Local time of day, as the header shows it.
function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

// A date and time in the browser's zone.
function when(ms) {
  return new Date(ms).toLocaleString();
}

// A rate for an axis label: 1,234 or 12.3k records/s.
function rate(n) {
  return n >= 10000 ? (n / 1000).toFixed(n >= 100000 ? 0 : 1) + "k" : count(Math.round(n));
}

// The produce and consume rates over the broker's history (samples of its running totals,
// kept by the broker: the last 15 minutes every 5 s), as two lines over a time axis (local
// time) and a rate axis (records/s), with a grid.
function chart(history) {
  const samples = (history && history.samples) || [];
  const rates = [];
  for (let i = 1; i < samples.length; i++) {
    const a = samples[i - 1], b = samples[i];
    const dt = (b.t_ms - a.t_ms) / 1000;
    if (dt <= 0) continue;
    rates.push({ t: b.t_ms, produce: Math.max(0, b.appended - a.appended) / dt, consume: Math.max(0, b.delivered - a.delivered) / dt });
  }
  const w = 640, h = 180, left = 56, right = 12, top = 10, bottom = 26;
  const pw = w - left - right, ph = h - top - bottom;
  const max = Math.max(1, ...rates.map(r => Math.max(r.produce, r.consume)));
  const t1 = rates.length ? rates[rates.length - 1].t : Date.now();
  const t0 = rates.length > 1 ? rates[0].t : t1 - 60000;
  const span = Math.max(1, t1 - t0);
  const x = t => left + ((t - t0) / span) * pw;
  const y = v => top + ph - (v / max) * ph;
  const svgNS = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const e = document.createElementNS(svgNS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const svg = node("svg", { viewBox: `0 0 ${w} ${h}`, role: "img", "data-testid": "rate-chart" });
  svg.append(node("title", {}, "Produce and consume rates, records per second, by local time"));
  // Rate axis: a grid line and a label at 0, half and the top.
  for (const v of [0, max / 2, max]) {
    svg.append(node("line", { x1: left, x2: w - right, y1: y(v), y2: y(v), class: "grid" }));
    svg.append(node("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", class: "axis y-label" }, rate(v)));
  }
  svg.append(node("text", { x: 4, y: top + 4, class: "axis unit", "data-testid": "rate-unit" }, "rec/s"));
  // Time axis: a tick and a label at the start, the middle and the end.
  for (const t of [t0, t0 + span / 2, t1]) {
    svg.append(node("line", { x1: x(t), x2: x(t), y1: top, y2: top + ph, class: "grid" }));
    svg.append(node("text", { x: x(t), y: h - 8, "text-anchor": t === t0 ? "start" : t === t1 ? "end" : "middle", class: "axis x-label" }, clock(t)));
  }
  svg.append(node("line", { x1: left, x2: w - right, y1: top + ph, y2: top + ph, class: "axis-line" }));
  svg.append(node("line", { x1: left, x2: left, y1: top, y2: top + ph, class: "axis-line" }));
  for (const [key, color] of [["produce", "#1570ef"], ["consume", "#12b76a"]]) {
    const points = rates.map(r => `${x(r.t).toFixed(1)},${y(r[key]).toFixed(1)}`);
    svg.append(node("polyline", { points: points.join(" "), fill: "none", stroke: color, "stroke-width": "2", "data-testid": "rate-" + key }));
  }
  const last = rates[rates.length - 1] || { produce: 0, consume: 0 };
  const minutes = Math.round(span / 60000);
  return el("div", { class: "chart" },
    el("div", { class: "legend" },
      el("span", {}, el("i", { class: "produce" }), "produce ", el("b", { testid: "produce-rate" }, count(Math.round(last.produce))), " records/s"),
      el("span", {}, el("i", { class: "consume" }), "consume ", el("b", { testid: "consume-rate" }, count(Math.round(last.consume))), " records/s"),
      el("span", { testid: "chart-span" }, rates.length
        ? `the last ${minutes >= 2 ? minutes + " min" : Math.round(span / 1000) + " s"}, one point every ${history.interval_seconds} s`
        : history ? "history starts with the next sample (every " + history.interval_seconds + " s)" : "no history: your grants do not cover every topic")),
    svg);
}

// Cluster mode: every node, reachable or not, and how many partitions each leads.
function nodes(c) {
  const leads = id => c.partitions.filter(p => p.leader === id).length;
  return [
    el("h2", {}, "Nodes"),
    table([["Node"], ["Address"], ["State"], ["Leads", 1]],
      c.nodes.map(n => [
        n.id === c.node_id ? n.id + " (this node)" : String(n.id),
        n.address,
        n.reachable ? "up" : el("span", { class: "warn" }, "unreachable: " + (n.error || "")),
        count(leads(n.id))]),
      "nodes"),
  ];
}

async function overview() {
  const o = await api("overview");
  const c = o.cluster ? await api("cluster") : null;
  return [
    el("h1", {}, "Overview"),
    el("div", { class: "cards" },
      card("Topics", count(o.topics), "topics"),
      card("Consumer groups", count(o.groups), "groups"),
      card("Records appended", count(o.records_appended), "records-appended"),
      card("Records delivered", count(o.records_delivered), "records-delivered"),
      card("Disk used", bytes(o.disk_bytes), "disk-used"),
      card("Disk free", bytes(o.free_bytes), "disk-free"),
      card("fsync p99", seconds(o.fsync_p99_seconds), "fsync-p99"),
      card("Send p99 (durable)", seconds(o.send_p99_seconds), "send-p99"),
      card("Total lag", count(o.lag), "lag"),
      card("Dead letters", count(o.dead_lettered), "dead-letters"),
      card("Connections", count(o.connections), "connections"),
      card("Subscriptions", count(o.subscriptions), "subscriptions")),
    chart(o.history),
    c ? nodes(c) : null,
    el("p", { class: "empty" }, "Sluice ", o.version, " · refreshes every second"),
  ];
}

async function topics() {
  const { topics } = await api("topics");
  return [
    el("h1", {}, "Topics"),
    table([["Topic"], ["Partitions", 1], ["Records held", 1], ["Size", 1], ["Appended since start", 1]],
      topics.map(t => [link("#/topics/" + encodeURIComponent(t.name), t.name), count(t.partitions), count(t.records), bytes(t.size_bytes), count(t.records_appended)]),
      "topics"),
  ];
}

async function topic(name) {
  const t = await api("topics/" + encodeURIComponent(name));
  // Cluster mode (partitions have replicas): each replica and how far it is behind.
  const c = t.partitions.some(p => p.replicas && p.replicas.length) ? await api("cluster") : null;
  const replicas = p => {
    const g = c && c.partitions.find(q => q.topic === t.name && q.partition === p.partition);
    if (!g) return "–";
    return g.replicas.map(r => r.node_id + (r.leader ? "*" : "") +
      (r.behind === null ? " (?)" : r.behind ? " (" + count(r.behind) + " behind)" : "")).join(", ");
  };
  const total = t.partitions.reduce((s, p) => s + p.records, 0);
  const size = t.partitions.reduce((s, p) => s + p.size_bytes, 0);
  return [
    el("h1", {}, "Topic ", el("span", { testid: "topic-name" }, t.name)),
    el("div", { class: "cards" },
      card("Records held", count(total), "topic-records"),
      card("Size", bytes(size), "topic-size"),
      card("Partitions", count(t.partitions.length), "topic-partitions"),
      t.ids ? card("Duplicates answered", count(t.ids.duplicates), "topic-duplicates") : null),
    el("h2", {}, "Partitions"),
    table([["Partition"], ["First offset", 1], ["Next offset", 1], ["Records", 1], ["Size", 1], ["Segments", 1], ["Held back", 1], ["Held by"]]
        .concat(c ? [["Leader"], ["Replicas (* leads)"]] : []),
      t.partitions.map(p => [p.partition, count(p.first_offset), count(p.next_offset), count(p.records), bytes(p.size_bytes), count(p.segments),
        p.held_bytes ? el("span", { class: "warn" }, bytes(p.held_bytes)) : "0 B",
        p.held_by ? link("#/groups/" + encodeURIComponent(p.held_by), p.held_by) : "–"]
        .concat(c ? [p.leader === null || p.leader === undefined ? el("span", { class: "warn" }, "none") : String(p.leader), replicas(p)] : [])),
      "partitions"),
    el("h2", {}, "Consumer groups"),
    t.groups.length ? el("p", { testid: "topic-groups" }, t.groups.map(g => [link("#/groups/" + encodeURIComponent(g), g), " "])) : el("p", { class: "empty" }, "none"),
    el("h2", {}, "Settings"),
    table([["Setting"], ["Value"]], Object.entries(t.settings || {}).map(([k, v]) => [k, v === null ? "–" : String(v)])),
  ];
}

async function groups() {
  const { groups } = await api("groups");
  return [
    el("h1", {}, "Consumer groups"),
    table([["Group"], ["Topics"]],
      groups.map(g => [link("#/groups/" + encodeURIComponent(g.group), g.group), g.topics.join(", ")]), "groups"),
  ];
}

function header(d, key) {
  const h = d.headers.find(h => h.key === key);
  return h ? h.value : "";
}

async function group(name) {
  const g = await api("groups/" + encodeURIComponent(name));
  const out = [el("h1", {}, "Group ", el("span", { testid: "group-name" }, g.group))];
  for (const t of g.topics) {
    // This group's newest dead letters, filtered by the broker (another group's newer ones do
    // not hide them).
    const dlq = await api("topics/" + encodeURIComponent(t.topic) + "/dead-letters?limit=20&group=" + encodeURIComponent(g.group));
    const mine = dlq.dead_letters;
    out.push(
      el("h2", {}, "on ", link("#/topics/" + encodeURIComponent(t.topic), t.topic)),
      el("div", { class: "cards" },
        card("Lag", count(t.lag), "group-lag"),
        card("Members", count(t.members.length), "group-members"),
        card("In flight", count(t.partitions.reduce((s, p) => s + p.in_flight, 0)), "group-in-flight"),
        card("Redeliveries", count(t.partitions.reduce((s, p) => s + p.redeliveries, 0)), "group-redeliveries"),
        card("Dead letters", count(t.dead_lettered), "group-dead-letters")),
      el("h2", {}, "Partitions"),
      table([["Partition"], ["Committed", 1], ["End", 1], ["Lag", 1], ["In flight", 1], ["Pending", 1], ["Redeliveries", 1], ["Ack timeouts", 1], ["Dead letters", 1], ["Owner"]],
        t.partitions.map(p => [p.partition, count(p.committed), count(p.end), count(p.lag), count(p.in_flight), count(p.pending), count(p.redeliveries), count(p.ack_timeouts), count(p.dead_lettered),
          p.blocked ? el("span", { class: "warn" }, "blocked: " + p.blocked) : (p.owner === null ? "–" : "member " + p.owner)]),
        "group-partitions"),
      el("h2", {}, "Members"),
      table([["Member"], ["In flight", 1], ["Max in flight", 1], ["Exclusive"]],
        t.members.map(m => [m.id, count(m.in_flight), count(m.max_in_flight), m.exclusive ? "yes" : "no"]), "members"),
      el("h2", {}, "Newest dead letters"),
      table([["Time"], ["DLQ offset", 1], ["From"], ["Reason"], ["Attempts", 1], ["Key"], ["Message headers"]],
        mine.map(d => [when(d.timestamp_ms), count(d.offset),
          `${header(d, "sluice.dlq.partition")}:${header(d, "sluice.dlq.offset")}`, header(d, "sluice.dlq.reason"),
          header(d, "sluice.dlq.attempts"), d.key || "–",
          // The message's own headers: the sluice.dlq.* ones are the columns before.
          el("span", { class: "headers" }, d.headers.filter(h => !h.key.startsWith("sluice.dlq.")).map(h => `${h.key}=${h.value}`).join("  ") || "–")]),
        "dead-letter-list"));
  }
  return out;
}

async function render() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  let page;
  if (parts[0] === "topics" && parts[1]) page = topic(parts[1]);
  else if (parts[0] === "topics") page = topics();
  else if (parts[0] === "groups" && parts[1]) page = group(parts[1]);
  else if (parts[0] === "groups") page = groups();
  else page = overview();
  const status = document.getElementById("status");
  try {
    const nodes = await page;
    document.getElementById("view").replaceChildren(...nodes.flat(Infinity).filter(n => n !== null && n !== undefined));
    status.textContent = "updated " + clock(Date.now());
    status.className = "status";
  } catch (e) {
    status.textContent = e.message;
    status.className = "status bad";
  }
}

function schedule() {
  clearTimeout(timer);
  render().finally(() => { timer = setTimeout(schedule, REFRESH_MS); });
}

document.getElementById("login").addEventListener("submit", ev => {
  ev.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem("sluice-token", token);
  document.getElementById("login").hidden = true;
  schedule();
});
window.addEventListener("hashchange", schedule);
schedule();
