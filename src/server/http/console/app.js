// The Sluice console: reads /api/v1/ once a second and redraws the current page.
// Pages (by URL hash): #/ overview, #/topics, #/topics/NAME, #/groups, #/groups/NAME.
// Every value from the broker is inserted as text, never as markup.
"use strict";

const REFRESH_MS = 1000;
const HISTORY = 300; // samples kept for the rate chart: five minutes
const history = []; // {t, appended, delivered}
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
  for (const c of children.flat()) {
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

// The produce and consume rates over the last minutes (at most HISTORY samples), as two lines
// spread over the chart's width, oldest at the left.
function chart() {
  const w = 600, h = 150;
  const rates = [];
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1], b = history[i];
    const dt = (b.t - a.t) / 1000;
    if (dt <= 0) continue;
    rates.push({ t: b.t, produce: Math.max(0, b.appended - a.appended) / dt, consume: Math.max(0, b.delivered - a.delivered) / dt });
  }
  const max = Math.max(1, ...rates.map(r => Math.max(r.produce, r.consume)));
  const t0 = rates.length ? rates[0].t : 0;
  const span = rates.length > 1 ? rates[rates.length - 1].t - t0 : 1;
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  for (const [key, color] of [["produce", "#1570ef"], ["consume", "#12b76a"]]) {
    const points = rates.map(r => `${((r.t - t0) / span) * w},${h - 2 - (r[key] / max) * (h - 4)}`);
    const line = document.createElementNS(svgNS, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", color);
    line.setAttribute("stroke-width", "2");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(line);
  }
  const last = rates[rates.length - 1] || { produce: 0, consume: 0 };
  const seconds = Math.round(span / 1000);
  return el("div", { class: "chart" },
    el("div", { class: "legend" },
      el("span", {}, el("i", { class: "produce" }), "produce ", el("b", { testid: "produce-rate" }, count(Math.round(last.produce))), " records/s"),
      el("span", {}, el("i", { class: "consume" }), "consume ", el("b", { testid: "consume-rate" }, count(Math.round(last.consume))), " records/s"),
      el("span", {}, "top of the chart: ", count(Math.round(max)), " records/s; the last ", seconds < 120 ? seconds + " s" : Math.round(seconds / 60) + " min")),
    svg);
}

async function overview() {
  const o = await api("overview");
  history.push({ t: Date.now(), appended: o.records_appended, delivered: o.records_delivered });
  while (history.length > HISTORY) history.shift();
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
    chart(),
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
    table([["Partition"], ["First offset", 1], ["Next offset", 1], ["Records", 1], ["Size", 1], ["Segments", 1], ["Held back", 1], ["Held by"]],
      t.partitions.map(p => [p.partition, count(p.first_offset), count(p.next_offset), count(p.records), bytes(p.size_bytes), count(p.segments),
        p.held_bytes ? el("span", { class: "warn" }, bytes(p.held_bytes)) : "0 B",
        p.held_by ? link("#/groups/" + encodeURIComponent(p.held_by), p.held_by) : "–"]),
      "partitions"),
    el("h2", {}, "Consumer groups"),
    t.groups.length ? el("p", {}, t.groups.map(g => [link("#/groups/" + encodeURIComponent(g), g), " "])) : el("p", { class: "empty" }, "none"),
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
    const dlq = await api("topics/" + encodeURIComponent(t.topic) + "/dead-letters?limit=20");
    const mine = dlq.dead_letters.filter(d => header(d, "sluice.dlq.group") === g.group);
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
      table([["Time"], ["DLQ offset", 1], ["From"], ["Reason"], ["Key"], ["Headers"]],
        mine.map(d => [new Date(d.timestamp_ms).toISOString(), count(d.offset),
          `${header(d, "sluice.dlq.partition")}:${header(d, "sluice.dlq.offset")}`, header(d, "sluice.dlq.reason"), d.key || "–",
          el("span", { class: "headers" }, d.headers.map(h => `${h.key}=${h.value}`).join("  "))]),
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
    document.getElementById("view").replaceChildren(...nodes);
    status.textContent = "updated " + new Date().toLocaleTimeString();
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
