"""Sluice from Python with the sluice-client package (clients/python): send, subscribe from the
earliest offset, and a consumer-group member that acknowledges what it processed.

    pip install ./clients/python
    python examples/python/sluice_example.py 127.0.0.1:7070

Exits non-zero if the broker does not answer as documented (examples/run.sh runs it in CI).
"""

import sys
import uuid

from sluice_client import Consumer, GroupConsumer, Message, Producer


def main(address: str) -> None:
    topic = "examples.python." + uuid.uuid4().hex[:8]

    # Send: the answer comes once every message is durable. An id makes the Send idempotent:
    # a retry with the same id is answered with the original position and duplicate = true.
    submissions = [f'{{"questionnaire": "PRO-{i}"}}'.encode() for i in range(3)]
    ids = [uuid.uuid4().bytes for _ in submissions]
    with Producer(address) as producer:
        sent = producer.send_batch(topic, [
            Message(value=v, key=b"patient-1", id=i, headers={"source": b"python"})
            for v, i in zip(submissions, ids)
        ])
        offsets = [p.offset for p in sent]
        assert offsets == [0, 1, 2], offsets
        retry = producer.send(topic, submissions[0], key=b"patient-1", id=ids[0])
        assert retry.duplicate and retry.offset == 0, retry
    print(f"sent {len(offsets)} messages to {topic}; the retry was a duplicate of offset 0")

    # Read from the earliest offset: an iterator that follows the tail until closed.
    with Consumer(address, topic, start="earliest") as consumer:
        seen = []
        for record in consumer:
            seen.append(record)
            if len(seen) == 3:
                break
    assert [r.value for r in seen] == submissions, seen
    assert seen[0].header("source") == b"python"
    print(f"read {len(seen)} messages from the earliest offset")

    # A consumer-group member: ack what was processed.
    with GroupConsumer(address, topic, "examples") as member:
        acked = []
        for record in member:
            assert member.ack(record), "acked while in flight"
            acked.append(record.offset)
            if len(acked) == 3:
                break
    assert sorted(acked) == [0, 1, 2], acked
    print(f"group 'examples' processed and acknowledged offsets {sorted(acked)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7070")
