"""A Python client for Sluice, a durable message broker.

- :class:`Producer`: ``send`` and ``send_batch``, answered once the messages are durable;
  idempotent by default (every message carries an id) and retried on ``UNAVAILABLE``.
- :class:`Consumer`: iterate over a topic from any position, following the tail, resuming
  where it left after a lost connection.
- :class:`GroupConsumer`: a consumer-group member that acks or nacks each message.
- :mod:`sluice_client.aio`: the same on asyncio.
- :class:`Tls` for TLS and mutual TLS; ``token=`` for a bearer token.
"""

from ._common import Message, Position, Record, Since, Tls
from .client import Consumer, GroupConsumer, Producer, SluiceError

__all__ = [
    "Consumer",
    "GroupConsumer",
    "Message",
    "Position",
    "Producer",
    "Record",
    "Since",
    "SluiceError",
    "Tls",
]
