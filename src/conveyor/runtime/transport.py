"""The interface every transport implements: how boundary values move between the ranks of a
pipeline group.

Implementations: :class:`~conveyor.runtime.comm.DirectTransport` (the process group's own
point-to-point: gloo or NCCL), :class:`~conveyor.runtime.staged.HostStagedTransport` (CUDA
values through pinned host memory over gloo) and :class:`~conveyor.runtime.sockets.SocketTransport`
(a loopback socket per pair of CPU ranks on one host). All three put the same bytes on the
wire for a value (:mod:`.codec`). Every wait of a transport is bounded by its ``timeout``.
:class:`InOrderTransport` holds what the direct and socket transports share: receiving each
link's messages in order, with a mailbox for those that arrive early.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from ..schedule.links import Message
from .bundle import detached_leaves

__all__ = ["Transport", "InOrderTransport", "local_value", "lost_or_explained"]


class Transport(ABC):
    """Sends and receives the boundary values of one rank of a pipeline group.

    A step goes: :meth:`expect` (the messages each peer will send, in order), then any
    interleaving of :meth:`send`, :meth:`receive` and :meth:`deliver_local` in program order,
    :meth:`flush` before a collective, and :meth:`finish` at the end. :meth:`close` releases what
    the transport holds (sockets, process groups it created); it is idempotent, and a transport
    is also a context manager.

    Attributes every implementation sets: ``rank`` (in the group), ``pg`` (the group's process
    group, also used for collectives of the runner), ``device`` (where received values land),
    ``timeout`` (seconds), ``bytes_sent`` and ``transfers`` (counters).
    """

    rank: int
    pg: dist.ProcessGroup
    device: torch.device
    timeout: float
    bytes_sent: int
    transfers: int
    # the watchdog's side (watchdog.py): while a receive blocks, ``waiting`` is a fresh
    # ``(source, message)``; a wait loop raises ``verdict`` once it is set, and a closed connection
    # is first offered to ``explain(source)``, which may return the error that says why
    waiting: tuple[int, Message] | None = None
    verdict: BaseException | None = None
    explain: Callable[[int], BaseException | None] | None = None

    @abstractmethod
    def expect(self, incoming: dict[int, Iterable[Message]]) -> None:
        """Start a step: ``incoming[source]`` lists (or lazily yields) the messages rank ``source``
        sends here, in its sending order."""

    @abstractmethod
    def send(self, destination: int, message: Message, value: Any) -> None:
        """Send ``value`` as ``message`` to rank ``destination`` of the group without waiting for
        the receiver; the caller may change ``value`` once this returns."""

    @abstractmethod
    def receive(self, message: Message, source: int) -> Any:
        """The value of ``message`` from rank ``source``, waiting for it (at most ``timeout``)."""

    @abstractmethod
    def deliver_local(self, message: Message, value: Any) -> None:
        """Hand ``value`` to a stage on this same rank, as if received (detached leaves)."""

    @abstractmethod
    def flush(self) -> None:
        """Post every send held back, so no peer waits on it behind a collective."""

    @abstractmethod
    def finish(self) -> None:
        """End the step: wait until this step's sends have completed."""

    @abstractmethod
    def close(self) -> None:
        """Release sockets and process groups this transport created; idempotent."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InOrderTransport(Transport):
    """A transport that takes each inbound link's messages strictly in order (:meth:`_next`),
    keeping those that arrive before their stage asks for them in a mailbox, where values for
    stages on this rank also go."""

    _arrived: dict[Message, Any]

    @abstractmethod
    def _next(self, source: int) -> tuple[Message, Any]:
        """The next message from ``source`` in link order and its value, waiting for it."""

    def receive(self, message: Message, source: int) -> Any:
        """The value of ``message`` from rank ``source``, waiting for it if it has not arrived."""
        if message in self._arrived:
            return self._arrived.pop(message)
        while True:
            arrived, value = self._next(source)
            if arrived == message:
                return value
            self._arrived[arrived] = value

    def has_arrived(self, message: Message) -> bool:
        """Whether ``message`` is already in the mailbox (receiving it will not wait)."""
        return message in self._arrived

    def deliver_local(self, message: Message, value: Any) -> None:
        """Hand a value to a stage on this same rank (detached: like a received value, a leaf of
        its own for the consuming stage)."""
        self._arrived[message] = local_value(message, value)


def local_value(message: Message, value: Any) -> Any:
    """``value`` as a stage on the same rank receives it: every tensor a fresh leaf keeping its
    requires-grad flag."""
    return detached_leaves(value, f"stage {message.stage} {message.kind}")[0]


def lost_or_explained(transport: Transport, source: int, lost: BaseException) -> BaseException:
    """What a receive that found rank ``source``'s connection closed (or was woken by the
    watchdog) raises: the watchdog's verdict, its explanation, else ``lost``."""
    if transport.verdict is not None:
        return transport.verdict
    if transport.explain is not None:
        explained = transport.explain(source)
        if explained is not None:
            return explained
    return lost
