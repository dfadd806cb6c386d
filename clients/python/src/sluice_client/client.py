"""The blocking client: :class:`Producer`, :class:`Consumer` and :class:`GroupConsumer`.

Each takes the broker's address (``host:port``), and optionally :class:`~sluice_client.Tls`
settings and a bearer ``token`` (``sluice auth token NAME`` makes one).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Union

import grpc

from ._common import (
    Backoff,
    Message,
    Position,
    Record,
    Start,
    Tls,
    ack_request,
    channel_args,
    group_request,
    message_of,
    metadata,
    nack_request,
    send_request,
    to_position,
    to_record,
    to_start,
)
from ._proto import broker_pb2 as pb
from ._proto import broker_pb2_grpc as rpc

__all__ = ["Producer", "Consumer", "GroupConsumer", "SluiceError"]


class SluiceError(Exception):
    """A call the broker refused or could not answer: ``code`` is the gRPC status code (for
    example ``grpc.StatusCode.INVALID_ARGUMENT``), ``details`` the broker's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def of(cls, e: grpc.RpcError) -> "SluiceError":
        return cls(e.code(), e.details() or "")


def _channel(target: str, tls: Optional[Tls]) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target, options=channel_args(None))
    return grpc.secure_channel(target, tls.credentials(), options=channel_args(tls))


class _Client:
    def __init__(self, target: str, tls: Optional[Tls], token: Optional[str]):
        self._channel = _channel(target, tls)
        self._stub = rpc.BrokerStub(self._channel)
        self._admin = rpc.AdminStub(self._channel)
        self._metadata = metadata(token)

    def close(self) -> None:
        """Closes the connection."""
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Producer(_Client):
    """Sends messages; each call returns once the broker has made them durable.

    Every message carries an id (the one given, else a new UUID): a Send that fails with
    ``UNAVAILABLE`` or a deadline is retried with the same ids, so a retry is never stored twice
    (on a topic with ``dedup_window_ms`` 0 the broker keeps no ids; there, pass
    ``idempotent=False``, and nothing is retried).

    >>> with Producer("127.0.0.1:7070") as producer:
    ...     pos = producer.send("prom-submissions", b'{"phq9": 7}', key="patient-17",
    ...                         id=submission_id.bytes)
    ...     print(pos.partition, pos.offset, pos.duplicate)
    """

    def __init__(
        self,
        target: str = "127.0.0.1:7070",
        *,
        tls: Optional[Tls] = None,
        token: Optional[str] = None,
        idempotent: bool = True,
        retry_for: float = 30.0,
        timeout: float = 30.0,
    ):
        super().__init__(target, tls, token)
        self._idempotent = idempotent
        self._retry_for = retry_for
        self._timeout = timeout

    def send(
        self,
        topic: str,
        value: Union[bytes, str, None],
        *,
        key: Union[bytes, str, None] = None,
        headers: Optional[Mapping[str, Union[bytes, str]]] = None,
        id: Union[bytes, str, None] = None,
        partition: Optional[int] = None,
    ) -> Position:
        """Sends one message; returns where it is stored (``duplicate`` if its id was stored
        before). ``value`` None is a tombstone (on compacted topics: delete this key)."""
        message = message_of(value, key, headers, id, partition)
        return self.send_batch(topic, [message])[0]

    def send_batch(self, topic: str, messages: Iterable[Union[Message, bytes, str]]) -> List[Position]:
        """Sends messages in one request (stored together, one sync); returns their positions
        in order."""
        request, retry = send_request(topic, messages, self._idempotent)
        backoff = Backoff(self._retry_for if retry else 0.0)
        while True:
            try:
                answer = self._stub.Send(request, timeout=self._timeout, metadata=self._metadata)
                return [to_position(p) for p in answer.positions]
            except grpc.RpcError as e:
                pause = backoff.again(e.code()) if retry else None
                if pause is None:
                    raise SluiceError.of(e) from None
            time.sleep(pause)


class _Partition(threading.Thread):
    """One partition's stream: delivers into the consumer's queue, resubscribing from the next
    offset after a lost connection."""

    def __init__(self, consumer: "Consumer", partition: int, start: pb.StartPosition):
        super().__init__(daemon=True, name=f"sluice-{consumer.topic}-{partition}")
        self.c = consumer
        self.partition = partition
        self.start_at = start
        self.call = None

    def run(self) -> None:
        c = self.c
        backoff = Backoff(c._retry_for)
        while not c._closed.is_set():
            nxt = c._next.get(self.partition)
            start = pb.StartPosition(offset=nxt) if nxt is not None else self.start_at
            request = pb.SubscribeRequest(topic=c.topic, partitions=[self.partition], start=start)
            try:
                self.call = c._stub.Subscribe(request, metadata=c._metadata)
                for response in self.call:
                    backoff.ok()
                    for d in response.deliveries:
                        c._put(to_record(d))
                return
            except grpc.RpcError as e:
                if c._closed.is_set():
                    return
                pause = backoff.again(e.code())
                if pause is None:
                    c._put(SluiceError.of(e))
                    return
            time.sleep(pause)


class Consumer(_Client):
    """Iterates over a topic's messages from ``start``, following the tail. After a lost
    connection (a broker restart) it resumes each partition at the offset after the last
    message it returned, for up to ``retry_for`` seconds of failures.

    ``start``: "earliest" (default), "latest", an offset (in every partition), a
    timezone-aware ``datetime``, or :class:`~sluice_client.Since` (ms since the epoch).

    >>> with Consumer("127.0.0.1:7070", "prom-submissions", start="earliest") as consumer:
    ...     for record in consumer:
    ...         print(record.partition, record.offset, record.value)
    """

    def __init__(
        self,
        target: str,
        topic: str,
        *,
        start: Start = "earliest",
        partitions: Optional[Iterable[int]] = None,
        tls: Optional[Tls] = None,
        token: Optional[str] = None,
        retry_for: float = 30.0,
        buffer: int = 1024,
    ):
        super().__init__(target, tls, token)
        self.topic = topic
        self._start = to_start(start)
        self._partitions = list(partitions) if partitions is not None else None
        self._retry_for = retry_for
        self._queue: "queue.Queue[object]" = queue.Queue(maxsize=buffer)
        self._next: Dict[int, int] = {}
        self._closed = threading.Event()
        self._streams: List[_Partition] = []

    @property
    def positions(self) -> Dict[int, int]:
        """Per partition, the offset after the last message returned."""
        return dict(self._next)

    def _put(self, item: object) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _begin(self) -> None:
        partitions = self._partitions
        if partitions is None:
            try:
                described = self._admin.DescribeTopic(
                    pb.DescribeTopicRequest(name=self.topic), metadata=self._metadata, timeout=30
                )
            except grpc.RpcError as e:
                raise SluiceError.of(e) from None
            partitions = [p.partition for p in described.partitions]
        for p in partitions:
            stream = _Partition(self, p, self._start)
            self._streams.append(stream)
            stream.start()

    def __iter__(self) -> Iterator[Record]:
        if not self._streams:
            self._begin()
        while True:
            item = self._queue.get()
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, Record)
            if item.offset < self._next.get(item.partition, 0):
                continue  # delivered again after a resume
            self._next[item.partition] = item.offset + 1
            yield item

    def close(self) -> None:
        """Stops every stream and closes the connection."""
        self._closed.set()
        for s in self._streams:
            if s.call is not None:
                s.call.cancel()
        super().close()


class GroupConsumer(_Client):
    """A member of consumer group ``group`` on ``topic``: members share the topic's messages;
    each must be acknowledged (:meth:`ack`) or it is delivered again after the group's ack
    timeout; :meth:`nack` asks for it again (after ``delay`` seconds). Leaving the ``with``
    block leaves the group: what this member held unacknowledged goes to the others.

    >>> with GroupConsumer("127.0.0.1:7070", "prom-submissions", "scoring") as member:
    ...     for record in member:
    ...         score(record.value)
    ...         member.ack(record)
    """

    def __init__(
        self,
        target: str,
        topic: str,
        group: str,
        *,
        start: Start = "earliest",
        max_in_flight: int = 0,
        exclusive: bool = False,
        tls: Optional[Tls] = None,
        token: Optional[str] = None,
        retry_for: float = 30.0,
    ):
        super().__init__(target, tls, token)
        self.topic = topic
        self.group = group
        self._request = group_request(topic, group, start, max_in_flight, exclusive)
        self._retry_for = retry_for
        self._call = None
        self._closed = False

    def __iter__(self) -> Iterator[Record]:
        backoff = Backoff(self._retry_for)
        while not self._closed:
            try:
                self._call = self._stub.Subscribe(self._request, metadata=self._metadata)
                for response in self._call:
                    backoff.ok()
                    for d in response.deliveries:
                        yield to_record(d)
                return
            except grpc.RpcError as e:
                if self._closed:
                    return
                pause = backoff.again(e.code())
                if pause is None:
                    raise SluiceError.of(e) from None
            time.sleep(pause)

    def ack(self, *records: Record) -> bool:
        """Acknowledges records this member was given; True when all of them were still in
        flight (an ack after the ack timeout finds the record handed on, and returns False)."""
        try:
            answer = self._stub.Ack(
                ack_request(self.group, self.topic, records),
                metadata=self._metadata,
                timeout=30,
            )
        except grpc.RpcError as e:
            raise SluiceError.of(e) from None
        return not answer.not_in_flight

    def nack(self, *records: Record, delay: float = 0.0) -> bool:
        """Gives records back to be delivered again, no sooner than ``delay`` seconds; True when
        all of them were still in flight. A record nacked past the group's ``max_deliveries``
        goes to the dead-letter topic ``<topic>.dlq``."""
        try:
            answer = self._stub.Nack(
                nack_request(self.group, self.topic, records, delay),
                metadata=self._metadata,
                timeout=30,
            )
        except grpc.RpcError as e:
            raise SluiceError.of(e) from None
        return not answer.not_in_flight

    def close(self) -> None:
        """Leaves the group and closes the connection."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        super().close()
