// Sluice from Node.js (@grpc/grpc-js + @grpc/proto-loader): send, subscribe from the earliest
// offset, and a consumer-group member that acknowledges what it processed.
//
//   npm install && node example.js 127.0.0.1:7070
//
// proto-loader's defaults turn field names into camelCase (ack_id becomes ackId) and read
// 64-bit numbers as Long objects. Code written against the proto's own names then reads
// `undefined` without any error: a member that acks `d.ack_id` acks nothing and gets every
// message again after the ack timeout. So load with keepCase (names as in the .proto) and
// longs: String (offsets exactly, as strings). Exits non-zero if the broker does not answer
// as documented (examples/run.sh runs it in CI).
"use strict";

const path = require("node:path");
const crypto = require("node:crypto");
const assert = require("node:assert/strict");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_DIR = path.join(__dirname, "..", "..", "proto");
const definition = protoLoader.loadSync("sluice/v1/broker.proto", {
  includeDirs: [PROTO_DIR],
  keepCase: true, // ack_id stays ack_id
  longs: String, // uint64 offsets arrive exactly, as strings
  defaults: true,
  oneofs: true,
});
const sluice = grpc.loadPackageDefinition(definition).sluice.v1;

const address = process.argv[2] || "127.0.0.1:7070";
const broker = new sluice.Broker(address, grpc.credentials.createInsecure());

const call = (method, request) =>
  new Promise((resolve, reject) =>
    broker[method](request, (err, answer) => (err ? reject(err) : resolve(answer))));

// Reads `n` deliveries from a Subscribe stream, handing each to `each`, then cancels it.
function take(request, n, each = async () => {}) {
  return new Promise((resolve, reject) => {
    const seen = [];
    const stream = broker.Subscribe(request);
    let chain = Promise.resolve();
    stream.on("data", response => {
      for (const d of response.deliveries) {
        chain = chain.then(() => each(d)).then(() => {
          seen.push(d);
          if (seen.length === n) {
            stream.cancel();
            resolve(seen);
          }
        }, reject);
      }
    });
    stream.on("error", err => {
      if (err.code !== grpc.status.CANCELLED) reject(err);
    });
  });
}

async function main() {
  const topic = "examples.node." + crypto.randomBytes(4).toString("hex");
  const submissions = [0, 1, 2].map(i => Buffer.from(JSON.stringify({ questionnaire: `PRO-${i}` })));
  const ids = submissions.map(() => crypto.randomBytes(16));

  // Send: answered once durable. An id makes it idempotent: a retry is a duplicate.
  const sent = await call("Send", {
    topic,
    messages: submissions.map((value, i) => ({
      key: Buffer.from("patient-1"), value, id: ids[i],
      headers: [{ key: "source", value: Buffer.from("node") }],
    })),
  });
  assert.deepEqual(sent.positions.map(p => p.offset), ["0", "1", "2"]);
  const retry = await call("Send", { topic, messages: [{ key: Buffer.from("patient-1"), value: submissions[0], id: ids[0] }] });
  assert.equal(retry.positions[0].duplicate, true);
  assert.equal(retry.positions[0].offset, "0");
  console.log(`sent 3 messages to ${topic}; the retry was a duplicate of offset 0`);

  // Subscribe from the earliest offset.
  const seen = await take({ topic, start: { earliest: true } }, 3);
  assert.deepEqual(seen.map(d => d.value.toString()), submissions.map(s => s.toString()));
  assert.equal(seen[0].headers[0].key, "source");
  console.log("read 3 messages from the earliest offset");

  // A consumer-group member: ack each delivery by its ack_id once processed.
  const acked = [];
  await take({ topic, group: "examples", start: { earliest: true } }, 3, async d => {
    assert.ok(d.ack_id, "a group delivery carries ack_id (load the proto with keepCase)");
    const answer = await call("Ack", { group: "examples", topic, ack_ids: [d.ack_id] });
    assert.deepEqual(answer.acked, [d.ack_id]);
    acked.push(d.offset);
  });
  assert.deepEqual(acked.sort(), ["0", "1", "2"]);
  console.log(`group 'examples' processed and acknowledged offsets ${acked.join(", ")}`);
  broker.close();
}

main().catch(err => {
  console.error(`example failed: ${err.stack || err}`);
  process.exit(1);
});
