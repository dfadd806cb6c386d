// The web console in a real browser (Debian's Chromium, headless, driven by playwright-core).
// Run by tests/browser/run.sh, which starts a broker and passes its addresses:
//   node console.mjs --bin target/release/sluice --grpc 127.0.0.1:P --http http://127.0.0.1:Q/
//                    [--screenshots docs]
// It produces and consumes through the CLI (and nacks with @grpc/grpc-js until messages are
// dead-lettered) and checks that the pages show the new counts, lag and dead letters without
// being reloaded; it ends with screenshots of the overview and a group page. Then, against a
// second broker with `auth.required`, the console asks for a token and keeps it for the tab.
import { chromium } from "playwright-core";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import { execFileSync } from "node:child_process";
import { parseArgs } from "node:util";
import assert from "node:assert/strict";

const { values: args } = parseArgs({
  options: {
    bin: { type: "string" },
    grpc: { type: "string" },
    http: { type: "string" },
    screenshots: { type: "string" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
    "auth-http": { type: "string" },
    token: { type: "string" },
    "cluster-http": { type: "string" },
    "cluster-topic": { type: "string" },
  },
});
for (const required of ["bin", "grpc", "http"]) {
  if (!args[required]) throw new Error(`--${required} is required`);
}

const TOPIC = "epro.submissions";
const GROUP = "scoring";
const TRIAGE = "triage";
const TIMEOUT = 15000;

function sluice(argv, input) {
  return execFileSync(args.bin, [...argv, "--broker", args.grpc], {
    input: input ?? "",
    env: { ...process.env, SLUICE_BROKER: "", SLUICE_TOKEN: "" },
  }).toString();
}

function produce(n, from) {
  const lines = Array.from({ length: n }, (_, i) =>
    JSON.stringify({ key: `patient-${(from + i) % 7}`, value: `{"questionnaire":"PRO-${from + i}"}`, headers: { source: "app" } }));
  sluice(["produce", "--topic", TOPIC, "--format", "json"], lines.join("\n") + "\n");
}

// Waits until the element's text is `want`, without reloading the page.
async function expectText(page, testid, want) {
  const locator = page.locator(`[data-testid="${testid}"]`).first();
  try {
    await locator.filter({ hasText: new RegExp(`^${want}$`) }).waitFor({ timeout: TIMEOUT });
  } catch (e) {
    const got = await locator.textContent().catch(() => "(missing)");
    throw new Error(`${testid}: wanted ${want}, the page shows ${got}`);
  }
}

// A member of `group` that joins at the tail, runs `then`, and nacks every delivery until
// `count` messages have been dead-lettered (the broker stops delivering them).
async function nackUntilDeadLettered(group, count, then) {
  const definition = protoLoader.loadSync("sluice/v1/broker.proto", {
    includeDirs: [new URL("../../proto", import.meta.url).pathname],
    keepCase: true, longs: String, defaults: true, oneofs: true,
  });
  const sluiceV1 = grpc.loadPackageDefinition(definition).sluice.v1;
  const client = new sluiceV1.Broker(args.grpc, grpc.credentials.createInsecure());
  const stream = client.Subscribe({ topic: TOPIC, group, start: { latest: true } });
  stream.on("error", () => {});
  const describe = async () => (await (await fetch(new URL(`api/v1/groups/${group}`, args.http))).json()).topics[0];
  // The member has joined once the group exists with one member.
  for (let t = Date.now(); ; await new Promise(r => setTimeout(r, 20))) {
    const g = await fetch(new URL(`api/v1/groups/${group}`, args.http));
    if (g.ok && (await g.json()).topics[0]?.members.length === 1) break;
    if (Date.now() - t > TIMEOUT) throw new Error(`${group}: member did not join`);
  }
  stream.on("data", response => {
    const ack_ids = response.deliveries.map(d => d.ack_id);
    client.Nack({ group, topic: TOPIC, ack_ids, delay_ms: 0 }, () => {});
  });
  then();
  for (let t = Date.now(); ; await new Promise(r => setTimeout(r, 20))) {
    if ((await describe()).dead_lettered === count) break;
    if (Date.now() - t > TIMEOUT) throw new Error(`${group}: not dead-lettered`);
  }
  stream.cancel();
  client.close();
}

const browser = await chromium.launch({
  executablePath: args.chromium,
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  const errors = [];
  page.on("pageerror", e => errors.push(e.message));
  const outside = [];
  page.on("request", r => { if (!r.url().startsWith(args.http)) outside.push(r.url()); });
  let loads = 0;
  page.on("load", () => loads++);

  sluice(["topics", "create", TOPIC, "--partitions", "3"]);
  produce(30, 0);
  await page.goto(new URL(`#/topics/${TOPIC}`, args.http).href);
  await expectText(page, "topic-name", TOPIC);
  await expectText(page, "topic-records", "30");
  await expectText(page, "topic-partitions", "3");

  // New messages appear on the page as it refreshes itself.
  produce(12, 30);
  await expectText(page, "topic-records", "42");

  // A group consumes 10: the topic page links to it, and its page (reached by clicking the
  // link) shows a lag of 32, then 40 after 8 more messages.
  sluice(["consume", "--topic", TOPIC, "--group", GROUP, "--from", "earliest", "--count", "10"]);
  const groupLink = page.locator('[data-testid="topic-groups"] a', { hasText: GROUP });
  await groupLink.waitFor({ timeout: TIMEOUT });
  assert.equal(await groupLink.getAttribute("href"), `#/groups/${GROUP}`);
  await groupLink.click();
  await expectText(page, "group-name", GROUP);
  await expectText(page, "group-lag", "32");
  produce(8, 42);
  await expectText(page, "group-lag", "40");
  await expectText(page, "group-members", "0");
  await expectText(page, "group-dead-letters", "0");
  assert.equal(await page.locator("#login").isVisible(), false, "no token asked for without auth");

  // A second group, "triage", joins at the tail and nacks 3 new messages until the broker
  // dead-letters them (after groups.max_deliveries, 5): the group page lists them.
  const dead = 3;
  await nackUntilDeadLettered(TRIAGE, dead, () => produce(dead, 50));
  await page.evaluate(g => { location.hash = `#/groups/${g}`; }, TRIAGE);
  await expectText(page, "group-name", TRIAGE);
  await expectText(page, "group-dead-letters", String(dead));
  await expectText(page, "group-lag", "0");
  const rows = page.locator('[data-testid^="dead-letter-list-"]');
  await rows.nth(dead - 1).waitFor({ timeout: TIMEOUT });
  assert.equal(await rows.count(), dead);
  const firstRow = await rows.first().textContent();
  assert.match(firstRow, /nacked.*source=app/);
  // The message's own headers only: the sluice.dlq.* ones are the columns before them.
  assert.doesNotMatch(firstRow, /sluice\.dlq\./);
  // Times are in the browser's zone, as the header's "updated" time is.
  const newest = (await (await fetch(new URL(`api/v1/topics/${TOPIC}/dead-letters?limit=1&group=${TRIAGE}`, args.http))).json()).dead_letters[0];
  const local = await page.evaluate(ms => new Date(ms).toLocaleString(), newest.timestamp_ms);
  assert.equal(await rows.first().locator("td").first().textContent(), local);
  await page.evaluate(g => { location.hash = `#/groups/${g}`; }, GROUP);
  await expectText(page, "group-lag", String(40 + dead));
  await expectText(page, "group-dead-letters", "0");

  // The overview counts everything appended (the DLQ too); its chart draws the rates.
  await page.evaluate(() => { location.hash = "#/"; });
  let appended = 50 + dead, consumed = 10;
  await expectText(page, "records-appended", String(appended + dead));
  await expectText(page, "topics", "2");
  await expectText(page, "groups", "2");
  await expectText(page, "dead-letters", String(dead));
  // Both groups lag: scoring by what it has not consumed, triage (no member) by what came
  // after the messages it dead-lettered.
  const lag = () => String((appended - consumed) + (appended - 50 - dead));
  await expectText(page, "lag", lag());
  for (let i = 0; i < 8; i++) {
    produce(20 + 10 * i, 1000 + i * 100);
    appended += 20 + 10 * i;
    sluice(["consume", "--topic", TOPIC, "--group", GROUP, "--count", String(15 + 5 * i)]);
    consumed += 15 + 5 * i;
    await page.waitForTimeout(700); // not a wait for a result: time for the chart to take samples
  }
  await expectText(page, "records-appended", String(appended + dead));
  await expectText(page, "lag", lag());

  // The chart has axes: three time labels in local time, three rate labels and the unit.
  const chart = page.locator('[data-testid="rate-chart"]');
  await chart.waitFor({ timeout: TIMEOUT });
  assert.equal(await chart.locator(".x-label").count(), 3);
  assert.equal(await chart.locator(".y-label").count(), 3);
  assert.equal(await chart.locator('[data-testid="rate-unit"]').textContent(), "rec/s");
  for (const label of await chart.locator(".x-label").allTextContents()) {
    assert.match(label, /\d{1,2}:\d{2}:\d{2}/, "a time of day");
  }
  assert.equal(loads, 1, "the page was loaded once and refreshed itself");

  // The history is the broker's: once it holds two samples (one every 5 s from its start), a
  // page that has just loaded draws the rates at once, with nothing sampled by the page.
  for (let t = Date.now(); ; await new Promise(r => setTimeout(r, 100))) {
    const o = await (await fetch(new URL("api/v1/overview", args.http))).json();
    if (o.history.samples.length >= 3) break;
    if (Date.now() - t > 30000) throw new Error("the broker kept no history");
  }
  const fresh = await browser.newPage();
  fresh.on("pageerror", e => errors.push(e.message));
  await fresh.goto(args.http);
  await fresh.locator('[data-testid="rate-produce"]').waitFor({ timeout: TIMEOUT });
  const points = await fresh.locator('[data-testid="rate-produce"]').getAttribute("points");
  assert.ok(points.trim().split(" ").length >= 2, `history drawn on load: ${points}`);
  await fresh.close();

  // Another group's dead letters, newer and more than a page holds, do not hide triage's.
  const NOISY = "noisy";
  await nackUntilDeadLettered(NOISY, 25, () => produce(25, 5000));
  await page.evaluate(g => { location.hash = `#/groups/${g}`; }, TRIAGE);
  await expectText(page, "group-name", TRIAGE);
  await page.locator('[data-testid^="dead-letter-list-"]').nth(dead - 1).waitFor({ timeout: TIMEOUT });
  assert.equal(await page.locator('[data-testid^="dead-letter-list-"]').count(), dead);
  await page.evaluate(g => { location.hash = `#/groups/${g}`; }, NOISY);
  await expectText(page, "group-name", NOISY);
  await page.locator('[data-testid^="dead-letter-list-"]').nth(19).waitFor({ timeout: TIMEOUT });
  assert.equal(await page.locator('[data-testid^="dead-letter-list-"]').count(), 20, "the newest 20");
  await page.evaluate(() => { location.hash = "#/"; });
  await expectText(page, "dead-letters", String(dead + 25));
  assert.deepEqual(errors, [], "no script errors");
  assert.deepEqual(outside, [], "nothing fetched from outside the broker");
  if (args.screenshots) {
    await page.screenshot({ path: `${args.screenshots}/console.png` });
    await page.evaluate(g => { location.hash = `#/groups/${g}`; }, TRIAGE);
    await rows.nth(dead - 1).waitFor({ timeout: TIMEOUT });
    await page.screenshot({ path: `${args.screenshots}/console-group.png` });
  }
  // Against a broker with auth.required: the console asks for a token, then shows the data.
  if (args["auth-http"]) {
    const locked = await browser.newPage();
    locked.on("pageerror", e => errors.push(e.message));
    await locked.goto(args["auth-http"]);
    await locked.locator("#login").waitFor({ state: "visible", timeout: TIMEOUT });
    await expectText(locked, "status", "a token is needed");
    await locked.fill("#token", args.token);
    await locked.click("#login button");
    await expectText(locked, "topics", "0");
    assert.equal(await locked.locator("#login").isVisible(), false);
    // The token is kept for the tab's session: a reload does not ask again.
    await locked.reload();
    await expectText(locked, "topics", "0");
    assert.equal(await locked.locator("#login").isVisible(), false);
    assert.deepEqual(errors, [], "no script errors");
  }
  // A node of a three-node cluster: the overview lists the nodes, each up; a topic's page shows
  // each partition's leader and its replicas (the leader starred), none behind once idle.
  if (args["cluster-http"]) {
    const node = await browser.newPage();
    node.on("pageerror", e => errors.push(e.message));
    await node.goto(args["cluster-http"]);
    for (const i of [0, 1, 2]) {
      const row = node.locator(`[data-testid="nodes-${i}"]`);
      await row.filter({ hasText: /up/ }).waitFor({ timeout: TIMEOUT });
    }
    assert.equal(await node.locator('[data-testid^="nodes-"]').count(), 3);
    await node.evaluate(t => { location.hash = `#/topics/${t}`; }, args["cluster-topic"]);
    for (const i of [0, 1]) {
      // "2*, 1, 3": three replicas, one of them leading, none with entries behind.
      const row = node.locator(`[data-testid="partitions-${i}"]`);
      await row.filter({ hasText: /\d\*(, \d){2}$|\d, \d\*, \d$|(\d, ){2}\d\*$/ }).waitFor({ timeout: TIMEOUT });
    }
    assert.deepEqual(errors, [], "no script errors");
  }
  console.log(`console: ok (${appended} records appended, lag ${appended - consumed}, one page load)`);
} catch (e) {
  failed = true;
  console.error(`console: FAILED: ${e.message}`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
