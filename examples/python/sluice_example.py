"""Sluice from Python (grpcio): send, subscribe from the earliest offset, and a consumer-group
member that acknowledges what it processed.

    python -m grpc_tools.protoc -I ../../proto --python_out=gen --grpc_python_out=gen \
        ../../proto/sluice/v1/broker.proto
    PYTHONPATH=gen python sluice_example.py 127.0.0.1:7070

Exits non-zero if the broker does not answer as documented (examples/run.sh runs it in CI).
"""

import sys
import uuid

import grpc

from sluice.v1 import broker_pb2 as pb
from sluice.v1 import broker_pb2_grpc as rpc


def main(address: str) -> None:
    channel = grpc.insecure_channel(address)
    broker = rpc.BrokerStub(channel)
    topic = "examples.python." + uuid.uuid4().hex[:8]

    # Send: the answer comes once every message is durable. An id makes the Send idempotent:
    # a retry with the same id is answered with the original position and duplicate = true.
    submissions = [f'{{"questionnaire": "PRO-{i}"}}'.encode() for i in range(3)]
    ids = [uuid.uuid4().bytes for _ in submissions]
    sent = broker.Send(pb.SendRequest(topic=topic, messages=[
        pb.Message(key=b"patient-1", value=v, id=i,
                   headers=[pb.Header(key="source", value=b"python")])
        for v, i in zip(submissions, ids)
    ]))
    offsets = [p.offset for p in sent.positions]
    assert offsets == [0, 1, 2], offsets
    retry = broker.Send(pb.SendRequest(topic=topic, messages=[
        pb.Message(key=b"patient-1", value=submissions[0], id=ids[0])]))
    assert retry.positions[0].duplicate and retry.positions[0].offset == 0, retry
    print(f"sent {len(offsets)} messages to {topic}; the retry was a duplicate of offset 0")

    # Subscribe from the earliest offset: a stream that follows the tail until cancelled.
    stream = broker.Subscribe(pb.SubscribeRequest(
        topic=topic, start=pb.StartPosition(earliest=True)))
    seen = []
    for response in stream:
        seen.extend(response.deliveries)
        if len(seen) >= 3:
            stream.cancel()
            break
    assert [d.value for d in seen] == submissions, seen
    assert seen[0].headers[0].key == "source"
    print(f"read {len(seen)} messages from the earliest offset")

    # A consumer-group member: each delivery carries an ack_id; ack what was processed.
    member = broker.Subscribe(pb.SubscribeRequest(
        topic=topic, group="examples", start=pb.StartPosition(earliest=True)))
    acked = []
    for response in member:
        for d in response.deliveries:
            assert d.ack_id, "a group delivery has an ack_id"
            answer = broker.Ack(pb.AckRequest(group="examples", topic=topic, ack_ids=[d.ack_id]))
            assert list(answer.acked) == [d.ack_id], answer
            acked.append(d.offset)
        if len(acked) >= 3:
            member.cancel()
            break
    assert sorted(acked) == [0, 1, 2], acked
    print(f"group 'examples' processed and acknowledged offsets {sorted(acked)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7070")
