"""What the sync and asyncio clients share: connection settings, positions, records, and the
conversions to and from the wire messages."""

from __future__ import annotations

import datetime as _dt
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Tuple, Union

import grpc

from ._proto import broker_pb2 as pb

#: Where a subscription starts: "earliest", "latest", an offset (every partition), or a time
#: (a timezone-aware datetime, or milliseconds since the Unix epoch as ``Since(ms)``).
Start = Union[str, int, _dt.datetime, "Since"]

#: gRPC codes after which a Send is retried with the same ids: the broker was not reachable, or
#: could not say whether the batch was stored.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class Since:
    """A start position by time: the first message at or after ``ms`` (Unix epoch, ms)."""

    ms: int


@dataclass(frozen=True)
class Tls:
    """TLS to the broker. ``ca``: PEM file of the CA that signed the broker's certificate (the
    system's roots when None). ``cert`` and ``key``: this client's certificate and key, for
    mutual TLS. ``domain``: the name the broker's certificate must carry, when it differs from
    the address's host."""

    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None
    domain: Optional[str] = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Optional[str]) -> Optional[bytes]:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        if (self.cert is None) != (self.key is None):
            raise ValueError("mutual TLS needs both cert and key")
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )

    def options(self) -> list:
        return [("grpc.ssl_target_name_override", self.domain)] if self.domain else []


@dataclass(frozen=True)
class Position:
    """Where a message was stored. ``duplicate``: its id was stored before and nothing new was
    stored (partition and offset are the original's); ``removed``: that original is no longer
    held (retention or compaction)."""

    partition: int
    offset: int
    duplicate: bool = False
    removed: bool = False


@dataclass(frozen=True)
class Message:
    """A message to send. ``id`` makes its Send idempotent (1 to 128 bytes)."""

    value: Optional[bytes]
    key: Optional[bytes] = None
    headers: Mapping[str, bytes] = field(default_factory=dict)
    id: Optional[bytes] = None
    partition: Optional[int] = None


@dataclass(frozen=True)
class Record:
    """A message as read. ``attempt`` counts deliveries to a group (1 outside groups)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: Optional[bytes]
    value: Optional[bytes]
    headers: Tuple[Tuple[str, bytes], ...]
    id: Optional[bytes]
    attempt: int = 1
    ack_id: str = ""

    def header(self, key: str) -> Optional[bytes]:
        """The value of the first header named ``key``, or None."""
        for k, v in self.headers:
            if k == key:
                return v
        return None


def as_bytes(v: Union[str, bytes, None]) -> Optional[bytes]:
    if v is None or isinstance(v, bytes):
        return v
    return v.encode()


def to_message(m: Message, idempotent: bool) -> pb.Message:
    """The wire message; an idempotent producer gives a message without an id a new UUID, so
    that a retry of it can never be stored twice."""
    msg_id = m.id
    if msg_id is None and idempotent:
        msg_id = uuid.uuid4().bytes
    out = pb.Message(headers=[pb.Header(key=k, value=as_bytes(v)) for k, v in m.headers.items()])
    if m.value is not None:
        out.value = as_bytes(m.value)
    if m.key is not None:
        out.key = as_bytes(m.key)
    if msg_id is not None:
        out.id = as_bytes(msg_id)
    if m.partition is not None:
        out.partition = m.partition
    return out


def to_position(p: pb.Position) -> Position:
    return Position(p.partition, p.offset, p.duplicate, p.removed)


def to_record(d: pb.Delivery) -> Record:
    return Record(
        topic=d.topic,
        partition=d.partition,
        offset=d.offset,
        timestamp_ms=d.timestamp_ms,
        key=d.key if d.HasField("key") else None,
        value=d.value if d.HasField("value") else None,
        headers=tuple((h.key, h.value) for h in d.headers),
        id=d.id if d.HasField("id") else None,
        attempt=d.attempt,
        ack_id=d.ack_id,
    )


def to_start(start: Start) -> pb.StartPosition:
    if start == "earliest":
        return pb.StartPosition(earliest=True)
    if start == "latest":
        return pb.StartPosition(latest=True)
    if isinstance(start, bool):
        raise ValueError(f"not a start position: {start!r}")
    if isinstance(start, int):
        return pb.StartPosition(offset=start)
    if isinstance(start, Since):
        return pb.StartPosition(timestamp_ms=start.ms)
    if isinstance(start, _dt.datetime):
        if start.tzinfo is None:
            raise ValueError("a start time needs a time zone (datetime with tzinfo)")
        return pb.StartPosition(timestamp_ms=int(start.timestamp() * 1000))
    raise ValueError(f"not a start position: {start!r} (earliest, latest, an offset or a time)")


def metadata(token: Optional[str]) -> Sequence[Tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def channel_args(tls: Optional[Tls]) -> list:
    # Messages up to the broker's own limits (64 MiB requests).
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    return opts + (tls.options() if tls else [])


def messages_of(items: Iterable[Union[Message, bytes, str]]) -> list:
    return [m if isinstance(m, Message) else Message(value=as_bytes(m)) for m in items]


def message_of(
    value: Union[str, bytes, None],
    key: Union[str, bytes, None],
    headers: Optional[Mapping[str, Union[str, bytes]]],
    id: Union[str, bytes, None],
    partition: Optional[int],
) -> Message:
    """The arguments of ``send`` as a :class:`Message`."""
    return Message(
        value=as_bytes(value),
        key=as_bytes(key),
        headers={k: as_bytes(v) for k, v in (headers or {}).items()},
        id=as_bytes(id),
        partition=partition,
    )


def send_request(topic: str, messages: Iterable, idempotent: bool) -> Tuple[pb.SendRequest, bool]:
    """The request, and whether it may be retried: only when every message carries an id."""
    request = pb.SendRequest(topic=topic, messages=[to_message(m, idempotent) for m in messages_of(messages)])
    return request, all(m.HasField("id") for m in request.messages)


def group_request(topic: str, group: str, start: Start, max_in_flight: int, exclusive: bool) -> pb.SubscribeRequest:
    return pb.SubscribeRequest(
        topic=topic, group=group, start=to_start(start), max_in_flight=max_in_flight, exclusive=exclusive
    )


def ack_request(group: str, topic: str, records: Iterable[Record]) -> pb.AckRequest:
    return pb.AckRequest(group=group, topic=topic, ack_ids=[r.ack_id for r in records])


def nack_request(group: str, topic: str, records: Iterable[Record], delay: float) -> pb.NackRequest:
    return pb.NackRequest(
        group=group, topic=topic, ack_ids=[r.ack_id for r in records], delay_ms=int(delay * 1000)
    )


class Backoff:
    """Retries after a lost connection: pauses that double from 50 ms to 1 s, for at most
    ``retry_for`` seconds of failures in a row."""

    def __init__(self, retry_for: float):
        self.retry_for = retry_for
        self.failing_since: Optional[float] = None
        self.pause = 0.05

    def ok(self) -> None:
        self.failing_since = None
        self.pause = 0.05

    def again(self, code: grpc.StatusCode) -> Optional[float]:
        """After a failure with ``code``: the pause before the next try, or None to give up."""
        now = time.monotonic()
        self.failing_since = self.failing_since or now
        if code not in RETRYABLE or now + self.pause - self.failing_since > self.retry_for:
            return None
        pause, self.pause = self.pause, min(self.pause * 2, 1.0)
        return pause
