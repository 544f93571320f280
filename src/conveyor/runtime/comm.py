"""The direct transport: each boundary value travels as one message over the process group's own
point-to-point (gloo for CPU tensors, NCCL for CUDA ones), in program order.

A message is a byte buffer in :mod:`.codec`'s layout: a prefix, the value's metadata (its
structure and each tensor's shape, dtype and requires-grad flag; an explicit encoding, never
pickle), then the tensors packed at 16-byte offsets. Its size, the *capacity*, is agreed without asking:
both ends derive it from the earlier messages of the same key (peer, kind, producing stage) on
the link, up to two positions back (one on NCCL), rounded up to 4 KiB. When a value outgrows the
capacity the message carries only the metadata and the data follows as a second transfer (its
own tag on gloo); the next capacity grows to fit. So in steady state every value is one
transfer, and shapes may still change from step to step.

For each inbound link the receiver knows, from the program (``schedule.links``), the order in
which messages arrive and receives them strictly in that order. On gloo two receives stay posted
per link: the next, and the one after it, posted while the rank waits anyway, so posting stays
off the path from a message's arrival to the stage's compute. Values that arrive before their
stage asks for them wait in a mailbox. Inline messages on CPU reuse their link's buffers once
sent. Everything runs on the calling thread: gloo cannot poll a pending receive, and a receiving
thread fights the compute thread for the GIL (measured slower; docs/architecture.md).

Why so frugal: after a stage's compute the interpreter and torch run with cold caches, so each
call between a message's arrival and the compute, or the compute and the send, lengthens every
hop of the pipeline (docs/architecture.md, "The floor").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PeerLostError
from ..schedule.links import Message
from .codec import Described, MessageError, Slot, decode_head, encode, unpack
from .transport import InOrderTransport, lost_or_explained

__all__ = ["DirectTransport", "MIN_CAPACITY", "DATA_TAG", "PROTOCOLS"]

MIN_CAPACITY = 4096
DATA_TAG = 2  # gloo: data too large to travel inline (tag 1 carries replicas' gradient sums)

Key = tuple[int, str, int]  # (peer rank in the group, message kind, producing stage)


def _capacity(needed: int) -> int:
    return max(MIN_CAPACITY, (needed + MIN_CAPACITY - 1) // MIN_CAPACITY * MIN_CAPACITY)


class _Capacities:
    """The capacities of one link's messages, derived alike at both ends without asking: the
    message at position j of the link gets what the messages up to j - ``lag`` taught, where
    ``lag`` is how many receives the receiver keeps posted ahead. Positions restart each step."""

    def __init__(self, known: dict[Key, int], lag: int) -> None:
        self.known, self.lag = known, lag
        self.position = 0
        self._pending: deque[tuple[int, Key, int]] = deque()

    def next(self, key: Key) -> tuple[int, int]:
        """(position, capacity) of the link's next message; called once per message, in order."""
        while self._pending and self._pending[0][0] <= self.position - self.lag:
            _, learned, capacity = self._pending.popleft()
            self.known[learned] = capacity
        self.position += 1
        return self.position - 1, self.known.get(key, MIN_CAPACITY)

    def learn(self, position: int, key: Key, needed: int) -> None:
        self._pending.append((position, key, _capacity(needed)))

    def settle(self) -> None:
        """End of a step: everything learned counts from now on."""
        for _, key, capacity in self._pending:
            self.known[key] = capacity
        self._pending.clear()
        self.position = 0


class _Posted:
    __slots__ = ("message", "position", "buffer", "work")

    def __init__(self, message: Message, position: int, buffer: torch.Tensor, work: Any) -> None:
        self.message, self.position, self.buffer, self.work = message, position, buffer, work


class _Inbound:
    """The messages expected from one source rank, received strictly in order.

    ``messages`` may be a lazy iterator (a stream whose length is not known in advance). Up to
    ``transport.lag`` receives are posted ahead: the one needed next always, the one after it
    while the rank would otherwise sit waiting, so that posting (a hundred µs with cold caches)
    stays off the path from a message's arrival to the stage's compute. A data transfer too large
    to travel inline follows its message with its own tag.
    """

    def __init__(self, transport: DirectTransport, source: int, messages: Iterable[Message],
                 capacities: _Capacities) -> None:
        self.transport = transport
        self.source = source
        self.messages = iter(messages)
        self.capacities = capacities
        self.posted: deque[_Posted] = deque()
        self._ended = False
        self._post(1)

    def _key(self, message: Message) -> Key:
        return self.source, message.kind, message.stage

    def _post(self, depth: int) -> None:
        """Post receives until ``depth`` are outstanding (or the link has no more messages)."""
        while len(self.posted) < depth and not self._ended:
            message = next(self.messages, None)
            if message is None:
                self._ended = True
                return
            position, capacity = self.capacities.next(self._key(message))
            buffer = torch.empty(capacity, dtype=torch.uint8, device=self.transport.wire_device,
                                 pin_memory=self.transport.pin_memory)
            work = self.transport.link_pg(self.source, self.transport.rank).recv([buffer], self.source, 0)
            self.posted.append(_Posted(message, position, buffer, work))

    def _wait(self, work: Any, message: Message) -> None:
        transport = self.transport
        transport.waiting = (self.source, message)  # a fresh tuple per wait: the watchdog times it
        try:
            _wait_for(work, transport.wait_limit)
        except RuntimeError as error:
            raise lost_or_explained(transport, self.source, PeerLostError(
                f"receiving {message.kind} of stage {message.stage} from rank {self.source} failed: {error}",
                rank=transport.rank, stage=message.target_stage, microbatch=message.microbatch)) from None
        finally:
            transport.waiting = None

    def next(self) -> tuple[Message, Any]:
        """Block until the next message on this link has arrived; return it."""
        if not self.posted:
            raise RuntimeError(f"no more messages are expected from rank {self.source} in this step")
        head = self.posted[0]
        if self.transport.lag > 1 and not head.work.is_completed():
            self._post(self.transport.lag)  # about to wait anyway
        self._wait(head.work, head.message)
        self.posted.popleft()
        structure, specs, inline, data_bytes, needed, _ = decode_head(head.buffer.cpu().numpy(),  # NCCL: waits
                                                                    self.transport.known_meta)
        self.capacities.learn(head.position, self._key(head.message), needed)
        data: torch.Tensor | None = None
        if inline and needed > head.buffer.numel():
            raise MessageError(f"a message from rank {self.source} announces {needed} bytes in a "
                               f"{head.buffer.numel()}-byte buffer")
        if inline:
            data = head.buffer[needed - data_bytes:needed]
        elif data_bytes:
            data = torch.empty(data_bytes, dtype=torch.uint8, device=self.transport.device,
                               pin_memory=self.transport.pin_memory)
            data_work = self.transport.link_pg(self.source, self.transport.rank).recv(
                [data], self.source, self.transport.data_tag)
            self._wait(data_work, head.message)
        self._post(1)
        return head.message, unpack(structure, specs, data, self.transport.device)


PROTOCOLS = ("gloo", "nccl")


def _protocol(requested: str | None, backend: str, device: torch.device) -> str:
    """The message protocol: the backend's own unless ``requested``; ``"nccl"`` over gloo with CPU
    tensors rehearses the NCCL protocol (device headers, one receive posted per link, one tag, a
    second group for downward messages) where NCCL is absent, as the CPU tests do."""
    if requested is None:
        return "nccl" if backend == "nccl" else "gloo"
    if requested not in PROTOCOLS:
        raise ValueError(f"protocol={requested!r} is not one of {PROTOCOLS}")
    if backend == "nccl" and requested != "nccl":
        raise ValueError(f"an NCCL group cannot run the {requested!r} message protocol: "
                         "leave protocol=None (or 'nccl')")
    if requested == "nccl" and backend != "nccl" and device.type != "cpu":
        raise ValueError(f"protocol='nccl' over {backend} rehearses NCCL's protocol with CPU tensors, but this "
                         f"rank's stages are on {device}: use device='cpu' or an NCCL group")
    return requested


_DOWNWARD: dict[tuple[int, ...], tuple[Any, dist.ProcessGroup]] = {}  # ranks -> (default group, group)


def _downward_group(pg: dist.ProcessGroup, timeout: timedelta) -> dist.ProcessGroup:
    """The group carrying NCCL-protocol messages to lower ranks of ``pg``: created once per set of
    ranks (and default group) and shared by every later transport on them. Never destroyed and
    created again: torch names a group made with ``use_local_synchronization`` after its ranks
    and the number of live groups, so a recreated one would meet its predecessor's rendezvous
    keys in the store (found by the CPU rehearsal: the second runner's group failed to connect)."""
    ranks = tuple(dist.get_process_group_ranks(pg))
    world = dist.group.WORLD
    cached = _DOWNWARD.get(ranks)
    if cached is not None and cached[0] is world:
        return cached[1]
    group = dist.new_group(list(ranks), timeout=timeout, use_local_synchronization=True)
    _DOWNWARD[ranks] = (world, group)
    return group


def _wait_for(work: Any, limit: timedelta | None) -> None:
    if limit is None:
        work.wait()
    else:
        work.wait(limit)


class _InFlight:
    """A posted send: its destination, works, the buffers they read, and the reusable slot to give back."""

    __slots__ = ("destination", "works", "buffers", "slot")

    def __init__(self, destination: int, works: list[Any], buffers: list[Any], slot: Slot | None) -> None:
        self.destination, self.works, self.buffers, self.slot = destination, works, buffers, slot

    def completed(self) -> bool:
        return all(work.is_completed() for work in self.works)

    def done(self) -> None:
        if self.slot is not None:
            self.slot.release()
            self.slot = None


class DirectTransport(InOrderTransport):
    """Sends and receives boundary values for one rank of a pipeline group over the group's own
    point-to-point operations; every wait is bounded by ``timeout`` seconds. ``protocol``: the
    message protocol, by default the backend's (``"nccl"`` or ``"gloo"``); ``"nccl"`` on a gloo
    group with CPU tensors runs NCCL's protocol over gloo, so CPU tests exercise it."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device, *, timeout: float = 300.0,
                 pin_memory: bool = False, protocol: str | None = None) -> None:
        self.group = group
        self.pg: dist.ProcessGroup = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(group)
        self.device = device
        self.timeout = float(timeout)
        limit = timedelta(seconds=self.timeout)
        backend = dist.get_backend(group)
        self.protocol = _protocol(protocol, backend, device)
        # gloo's wait takes the limit; NCCL's wait(limit) would block the host until the GPU is done
        # (instead of ordering the stream), so there NCCL's watchdog bounds it by the group's timeout
        self.wait_limit = limit if backend != "nccl" else None
        self.pin_memory = pin_memory  # receive into pinned host memory (the host-staged transport)
        nccl = self.protocol == "nccl"
        self.wire_device = device if nccl else torch.device("cpu")  # where message headers travel
        # NCCL runs a pair's operations in order on one stream: messages to lower ranks get their
        # own communicators, so an early receive never waits in front of a send (docs/gpu.md)
        self._downward = self.pg if not nccl else _downward_group(self.pg, limit)
        # receives posted ahead per link (gloo); NCCL keeps one, and with it the tag-free order
        self.lag = 1 if nccl else 2
        self.data_tag = 0 if nccl else DATA_TAG
        self.capacities: dict[Key, int] = {}  # inbound, learned from earlier messages (_Capacities)
        self._send_capacities: dict[Key, int] = {}
        self._inbound_links: dict[int, _Capacities] = {}
        self._outbound_links: dict[int, _Capacities] = {}
        self._described: dict[Key, Described] = {}  # outbound, the previous value's metadata
        self.known_meta: dict[bytes, tuple[Any, list, int, int]] = {}  # inbound, decoded metadata by its bytes
        self._arrived: dict[Message, Any] = {}
        self._inbound: dict[int, _Inbound] = {}
        self._pending_sends: list[_InFlight] = []
        self.bytes_sent = 0
        self.transfers = 0
        self.closed = False

    def link_pg(self, sender: int, receiver: int) -> dist.ProcessGroup:
        """The process group carrying messages from ``sender`` to ``receiver`` (group ranks)."""
        return self.pg if sender < receiver else self._downward

    # --- receiving ---------------------------------------------------------------------------
    def expect(self, incoming: dict[int, Iterable[Message]]) -> None:
        """Post the first receive of every inbound link: ``incoming[source]`` lists (or lazily
        yields) the messages that rank sends here, in its sending order."""
        self._arrived = {}
        for link in self._inbound_links.values():
            link.settle()
        self._inbound = {source: _Inbound(self, source, messages, self._inbound_link(source))
                         for source, messages in incoming.items()}

    def _inbound_link(self, source: int) -> _Capacities:
        if source not in self._inbound_links:
            self._inbound_links[source] = _Capacities(self.capacities, self.lag)
        return self._inbound_links[source]

    def _next(self, source: int) -> tuple[Message, Any]:
        """The next message from ``source`` in link order, waiting for it."""
        return self._inbound[source].next()

    # --- sending ---------------------------------------------------------------------------
    def send(self, destination: int, message: Message, value: Any) -> None:
        """Post the transfers of ``value`` to ``destination`` (a rank of the group) without waiting."""
        key = (destination, message.kind, message.stage)
        if destination not in self._outbound_links:
            self._outbound_links[destination] = _Capacities(self._send_capacities, self.lag)
        link = self._outbound_links[destination]
        position, capacity = link.next(key)
        encoded, data, needed, self._described[key] = encode(value, f"stage {message.stage} {message.kind}",
                                                              capacity, self._described.get(key))
        link.learn(position, key, needed)
        slot, buffer = (encoded, encoded.message) if isinstance(encoded, Slot) else (None, encoded)
        if self.protocol == "nccl":  # the header goes to the device: a pinned copy, so the host does not wait
            buffer = (buffer.pin_memory().to(self.wire_device, non_blocking=True) if self.wire_device.type == "cuda"
                      else buffer.clone())  # the CPU rehearsal (protocol="nccl" over gloo) copies too
        pg = self.link_pg(self.rank, destination)
        works = [pg.send([buffer], destination, 0)]
        if data is not None:
            works.append(pg.send([data], destination, self.data_tag))
        self.bytes_sent += buffer.numel() + (data.numel() if data is not None else 0)
        self.transfers += len(works)
        self._pending_sends.append(_InFlight(destination, works, [buffer, data], slot))
        while len(self._pending_sends) > 1 and self._pending_sends[0].completed():
            self._pending_sends.pop(0).done()  # a long stream must not hold every buffer it ever sent

    def flush(self) -> None:
        """Post every send held back (none here; the host-staged transport defers some)."""

    def finish(self) -> None:
        """Wait for this step's sends to complete."""
        for sent in self._pending_sends:
            for work in sent.works:
                try:
                    _wait_for(work, self.wait_limit)
                except RuntimeError as error:
                    raise lost_or_explained(self, sent.destination, PeerLostError(
                        f"a send to rank {sent.destination} did not complete (limit {self.timeout:.0f} s): {error}",
                        rank=self.rank)) from None
            sent.done()
        self._pending_sends.clear()
        for link in self._outbound_links.values():
            link.settle()
        self._inbound = {}

    def close(self) -> None:
        """Drop this rank's buffers; idempotent. The group for NCCL's downward messages stays for
        the next transport on the same ranks (:func:`_downward_group`)."""
        if self.closed:
            return
        self.closed = True
        self._inbound, self._arrived, self._pending_sends = {}, {}, []
        self._described.clear()
