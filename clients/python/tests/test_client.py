"""sluice_client against a real broker: sends (idempotent, batched, retried across a restart),
plain consumers from every kind of start position that resume after a restart, group members
that ack, nack and leave, the asyncio flavour of each, TLS, mutual TLS and tokens."""

import asyncio
import datetime as dt
import os
import subprocess
import tempfile
import threading
import uuid

import grpc
import pytest

from sluice_client import (Consumer, GroupConsumer, Message, Producer, Since, SluiceError, Tls,
                           aio)

from conftest import Broker, sluice_bin


def take(iterable, n):
    out = []
    for r in iterable:
        out.append(r)
        if len(out) == n:
            break
    return out


def test_send_answers_positions_and_a_repeated_id_is_a_duplicate(broker, topic):
    with Producer(broker.address) as p:
        sid = uuid.uuid4().bytes
        first = p.send(topic, b'{"phq9": 7}', key="patient-17", headers={"source": "app"}, id=sid)
        assert (first.offset, first.duplicate) == (0, False)
        again = p.send(topic, b'{"phq9": 7}', key="patient-17", id=sid)
        assert (again.partition, again.offset, again.duplicate) == (first.partition, 0, True)
        batch = p.send_batch(topic, [b"a", "b", Message(value=b"c", key=b"k", headers={"h": b"v"})])
        assert [x.offset for x in batch] == [1, 2, 3]
        assert not any(x.duplicate for x in batch)
    with Consumer(broker.address, topic) as c:
        records = take(c, 4)
    assert [r.value for r in records] == [b'{"phq9": 7}', b"a", b"b", b"c"]
    assert records[0].key == b"patient-17" and records[0].header("source") == b"app"
    assert records[0].id == sid
    # Messages sent without an id got one each: a retry could not store them twice.
    assert all(r.id for r in records)


def test_bad_input_is_refused_with_its_status_and_stores_nothing(broker, topic):
    with Producer(broker.address) as p:
        with pytest.raises(SluiceError) as e:
            p.send("../x", b"v")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(SluiceError) as e:
            p.send(topic, b"v", id=b"x" * 129)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert p.send(topic, b"first").offset == 0


def test_a_send_while_the_broker_restarts_is_retried_with_its_id_and_stored_once(broker, topic):
    with Producer(broker.address, retry_for=60) as p:
        p.send(topic, b"before", partition=0)
        broker.stop()
        restarter = threading.Timer(0.5, broker.start)
        restarter.start()
        sid = uuid.uuid4().bytes
        pos = p.send(topic, b"during", id=sid, partition=0)
        restarter.join()
        assert pos.offset == 1
        assert p.send(topic, b"during", id=sid, partition=0).duplicate
    with Consumer(broker.address, topic) as c:
        assert [r.value for r in take(c, 2)] == [b"before", b"during"]


@pytest.mark.parametrize("start,first", [("earliest", 0), (3, 3)])
def test_a_consumer_starts_where_asked(broker, topic, start, first):
    with Producer(broker.address) as p:
        p.send_batch(topic, [Message(value=str(i).encode(), partition=0) for i in range(5)])
    with Consumer(broker.address, topic, start=start) as c:
        assert take(c, 1)[0].offset == first


def test_a_consumer_from_latest_sees_only_what_comes_after_it_started(broker, topic):
    with Producer(broker.address) as p:
        p.send_batch(topic, [Message(value=b"old", partition=0) for _ in range(5)])
        done = threading.Event()

        def keep_sending():
            # The subscription starts at some moment after Consumer() returns: send until the
            # consumer has seen one message, instead of guessing when that moment is.
            while not done.wait(0.1):
                p.send(topic, b"new", partition=0)

        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            with Consumer(broker.address, topic, start="latest") as c:
                got = take(c, 1)[0]
        finally:
            done.set()
            sender.join()
    assert got.offset >= 5 and got.value == b"new"


def test_a_consumer_starts_at_a_time(broker, topic):
    with Producer(broker.address) as p:
        p.send(topic, b"old", partition=0)
        now = dt.datetime.now(dt.timezone.utc)
        later = int(now.timestamp() * 1000) + 1
        while int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000) <= later:
            pass
        p.send(topic, b"new", partition=0)
    with Consumer(broker.address, topic, start=Since(later)) as c:
        assert take(c, 1)[0].value == b"new"
    with pytest.raises(ValueError):
        Consumer(broker.address, topic, start=dt.datetime.now())  # no time zone


def test_a_consumer_resumes_where_it_left_after_a_broker_restart(broker, topic):
    with Producer(broker.address) as p:
        p.send_batch(topic, [Message(value=f"m{i}".encode(), key=f"k{i}") for i in range(20)])
    consumer = Consumer(broker.address, topic, retry_for=60)
    it = iter(consumer)
    seen = [next(it) for _ in range(20)]
    broker.restart()
    with Producer(broker.address) as p:
        p.send_batch(topic, [Message(value=f"m{i}".encode(), key=f"k{i}") for i in range(20, 30)])
    seen += [next(it) for _ in range(10)]
    consumer.close()
    # Every message once: nothing repeated after the resume, nothing lost.
    assert sorted(r.value for r in seen) == sorted(f"m{i}".encode() for i in range(30))
    assert len({(r.partition, r.offset) for r in seen}) == 30


def test_group_members_share_ack_nack_and_leaving_hands_work_on(broker, topic):
    with Producer(broker.address) as p:
        p.send_batch(topic, [f"m{i}" for i in range(6)])
    with GroupConsumer(broker.address, topic, "scoring", max_in_flight=3) as a:
        it = iter(a)
        held = [next(it) for _ in range(3)]
        assert a.ack(held[0])
        assert a.nack(held[1])
        again = next(it)  # the nacked one comes back (or the next fresh one)
        assert again.ack_id
        # Leaving with held[2] and `again` unacknowledged.
    with GroupConsumer(broker.address, topic, "scoring") as b:
        got = []
        for r in b:
            assert b.ack(r)
            got.append(r.value)
            if len(set(got)) == 5:
                break
    assert held[0].value not in got
    assert set(got) == {f"m{i}".encode() for i in range(6)} - {held[0].value}


def test_the_asyncio_flavour_sends_consumes_and_acks(broker, topic):
    async def main():
        async with aio.Producer(broker.address) as p:
            sid = uuid.uuid4().bytes
            pos = await p.send(topic, b"one", id=sid, partition=0)
            assert (await p.send(topic, b"one", id=sid, partition=0)).duplicate
            await p.send_batch(topic, [Message(value=b"two", partition=0)])
            assert pos.offset == 0
        async with aio.Consumer(broker.address, topic) as c:
            got = []
            async for r in c:
                got.append(r.value)
                if len(got) == 2:
                    break
            assert got == [b"one", b"two"]
            assert c.positions == {0: 2}
        async with aio.GroupConsumer(broker.address, topic, "g") as g:
            acked = []
            async for r in g:
                assert await g.ack(r)
                acked.append(r.value)
                if len(acked) == 2:
                    break
            assert acked == [b"one", b"two"]

    asyncio.run(main())


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki():
    """A CA, a broker certificate for 127.0.0.1 and a client certificate (CN=intake)."""
    d = tempfile.mkdtemp()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=Test CA", "-keyout", "ca.key",
            "-out", "ca.pem", cwd=d)
    for name, ext in [("broker", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("intake", "extendedKeyUsage=clientAuth\n")]:
        openssl("req", *ec, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", cwd=d)
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
                cwd=d)
    return d


def test_tls_mutual_tls_and_tokens(pki, topic):
    token_out = subprocess.run([sluice_bin(), "auth", "token", "admin"], check=True,
                               capture_output=True, text=True).stdout
    token = token_out.splitlines()[1].strip()
    principals = token_out[token_out.index("[[auth.principals]]"):]
    config = os.path.join(pki, "sluice.toml")
    with open(config, "w") as f:
        f.write(f"""[tls]
cert_file = "{pki}/broker.pem"
key_file = "{pki}/broker.key"
client_ca_file = "{pki}/ca.pem"
client_auth = "optional"
[auth]
required = true
{principals}
[[auth.principals]]
name = "intake"
tls_subject = "CN=intake"
[[auth.grants]]
principal = "intake"
topics = ["py.*"]
allow = ["produce", "admin"]
[[auth.grants]]
principal = "admin"
topics = ["*"]
groups = ["*"]
allow = ["produce", "consume", "describe", "admin"]
""")
    os.chmod(config, 0o600)
    with tempfile.TemporaryDirectory() as d:
        b = Broker(os.path.join(d, "data"), extra=["--config", config])
        try:
            ca = Tls(ca=f"{pki}/ca.pem")
            mutual = Tls(ca=f"{pki}/ca.pem", cert=f"{pki}/intake.pem", key=f"{pki}/intake.key")
            with Producer(b.address, tls=mutual) as p:
                assert p.send(topic, b"over mutual TLS").offset == 0
            # TLS without a certificate or token: not authenticated.
            with Producer(b.address, tls=ca, retry_for=0) as p:
                with pytest.raises(SluiceError) as e:
                    p.send(topic, b"anonymous")
                assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            # The certificate's principal may produce, not consume.
            with Consumer(b.address, topic, tls=mutual, partitions=[0], retry_for=0) as c:
                with pytest.raises(SluiceError) as e:
                    take(c, 1)
                assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
            with Consumer(b.address, topic, tls=ca, token=token) as c:
                assert take(c, 1)[0].value == b"over mutual TLS"
        finally:
            b.stop()
