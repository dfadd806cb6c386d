"""The asyncio client: the same :class:`Producer`, :class:`Consumer` and :class:`GroupConsumer`
as :mod:`sluice_client`, on ``grpc.aio``; use ``async with`` and ``async for``.

>>> async with Producer("127.0.0.1:7070") as producer:
...     pos = await producer.send("prom-submissions", b'{"phq9": 7}', id=submission_id.bytes)
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Dict, Iterable, List, Mapping, Optional, Union

import grpc
import grpc.aio

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
from .client import SluiceError

__all__ = ["Producer", "Consumer", "GroupConsumer"]


def _channel(target: str, tls: Optional[Tls]) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=channel_args(None))
    return grpc.aio.secure_channel(target, tls.credentials(), options=channel_args(tls))


class _Client:
    def __init__(self, target: str, tls: Optional[Tls], token: Optional[str]):
        self._channel = _channel(target, tls)
        self._stub = rpc.BrokerStub(self._channel)
        self._admin = rpc.AdminStub(self._channel)
        self._metadata = metadata(token)

    async def close(self) -> None:
        """Closes the connection."""
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class Producer(_Client):
    """See :class:`sluice_client.Producer`; ``send`` and ``send_batch`` are coroutines."""

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

    async def send(
        self,
        topic: str,
        value: Union[bytes, str, None],
        *,
        key: Union[bytes, str, None] = None,
        headers: Optional[Mapping[str, Union[bytes, str]]] = None,
        id: Union[bytes, str, None] = None,
        partition: Optional[int] = None,
    ) -> Position:
        """Sends one message; returns where it is stored."""
        message = message_of(value, key, headers, id, partition)
        return (await self.send_batch(topic, [message]))[0]

    async def send_batch(
        self, topic: str, messages: Iterable[Union[Message, bytes, str]]
    ) -> List[Position]:
        """Sends messages in one request; returns their positions in order."""
        request, retry = send_request(topic, messages, self._idempotent)
        backoff = Backoff(self._retry_for if retry else 0.0)
        while True:
            try:
                answer = await self._stub.Send(request, timeout=self._timeout, metadata=self._metadata)
                return [to_position(p) for p in answer.positions]
            except grpc.aio.AioRpcError as e:
                pause = backoff.again(e.code()) if retry else None
                if pause is None:
                    raise SluiceError.of(e) from None
            await asyncio.sleep(pause)


class Consumer(_Client):
    """See :class:`sluice_client.Consumer`; iterate with ``async for``."""

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
        self._buffer = buffer
        self._queue: Optional[asyncio.Queue] = None
        self._next: Dict[int, int] = {}
        self._tasks: List[asyncio.Task] = []

    @property
    def positions(self) -> Dict[int, int]:
        """Per partition, the offset after the last message returned."""
        return dict(self._next)

    async def _stream(self, partition: int) -> None:
        assert self._queue is not None
        backoff = Backoff(self._retry_for)
        while True:
            nxt = self._next.get(partition)
            start = pb.StartPosition(offset=nxt) if nxt is not None else self._start
            request = pb.SubscribeRequest(topic=self.topic, partitions=[partition], start=start)
            try:
                async for response in self._stub.Subscribe(request, metadata=self._metadata):
                    backoff.ok()
                    for d in response.deliveries:
                        await self._queue.put(to_record(d))
                return
            except grpc.aio.AioRpcError as e:
                pause = backoff.again(e.code())
                if pause is None:
                    await self._queue.put(SluiceError.of(e))
                    return
            await asyncio.sleep(pause)

    async def _begin(self) -> None:
        self._queue = asyncio.Queue(maxsize=self._buffer)
        partitions = self._partitions
        if partitions is None:
            try:
                described = await self._admin.DescribeTopic(
                    pb.DescribeTopicRequest(name=self.topic), metadata=self._metadata, timeout=30
                )
            except grpc.aio.AioRpcError as e:
                raise SluiceError.of(e) from None
            partitions = [p.partition for p in described.partitions]
        self._tasks = [asyncio.create_task(self._stream(p)) for p in partitions]

    async def __aiter__(self) -> AsyncIterator[Record]:
        if self._queue is None:
            await self._begin()
        assert self._queue is not None
        while True:
            item = await self._queue.get()
            if isinstance(item, Exception):
                raise item
            if item.offset < self._next.get(item.partition, 0):
                continue
            self._next[item.partition] = item.offset + 1
            yield item

    async def close(self) -> None:
        """Stops every stream and closes the connection."""
        for t in self._tasks:
            t.cancel()
        await super().close()


class GroupConsumer(_Client):
    """See :class:`sluice_client.GroupConsumer`; ``async with``, ``async for``, and
    ``await member.ack(record)``."""

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

    async def __aiter__(self) -> AsyncIterator[Record]:
        backoff = Backoff(self._retry_for)
        while True:
            try:
                self._call = self._stub.Subscribe(self._request, metadata=self._metadata)
                async for response in self._call:
                    backoff.ok()
                    for d in response.deliveries:
                        yield to_record(d)
                return
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.CANCELLED:
                    return
                pause = backoff.again(e.code())
                if pause is None:
                    raise SluiceError.of(e) from None
            await asyncio.sleep(pause)

    async def ack(self, *records: Record) -> bool:
        """Acknowledges records; True when all were still in flight."""
        try:
            answer = await self._stub.Ack(
                ack_request(self.group, self.topic, records),
                metadata=self._metadata,
                timeout=30,
            )
        except grpc.aio.AioRpcError as e:
            raise SluiceError.of(e) from None
        return not answer.not_in_flight

    async def nack(self, *records: Record, delay: float = 0.0) -> bool:
        """Gives records back for redelivery no sooner than ``delay`` seconds."""
        try:
            answer = await self._stub.Nack(
                nack_request(self.group, self.topic, records, delay),
                metadata=self._metadata,
                timeout=30,
            )
        except grpc.aio.AioRpcError as e:
            raise SluiceError.of(e) from None
        return not answer.not_in_flight

    async def close(self) -> None:
        """Leaves the group and closes the connection."""
        if self._call is not None:
            self._call.cancel()
        await super().close()
