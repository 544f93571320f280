"""Point-to-point transport: each boundary value travels as one message, in program order.

A message is a byte buffer: a prefix (metadata length, an inline flag, the data size), the
pickled metadata (the value's structure and each tensor's shape, dtype and requires-grad flag),
then the tensors packed at 16-byte offsets. Its size, the *capacity*, is agreed without asking:
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
thread fights the compute thread for the GIL (we measured several hundred microseconds a message
that way).

Why so frugal: after a stage's compute the interpreter and torch run with cold caches (on the
2-core benchmark VM a torch call costs about 20 µs for a while after 10 ms of other work, 1 µs
warm), so each call between a message's arrival and the compute, or the compute and the send,
lengthens every hop of the pipeline.
"""

from __future__ import annotations

import pickle
import struct
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PeerLostError
from ..schedule.links import Message
from .bundle import Leaf, detached_leaves, flatten, unflatten

__all__ = ["Transport", "MIN_CAPACITY"]

MIN_CAPACITY = 4096
DATA_TAG = 2  # gloo: data too large to travel inline (tag 1 carries replicas' gradient sums)
_ALIGN = 16
_PREFIX = struct.Struct("<qqq")  # metadata length, 1 if the data is inline, data bytes

Key = tuple[int, str, int]  # (peer rank in the group, message kind, producing stage)


def _pad(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _capacity(needed: int) -> int:
    return max(MIN_CAPACITY, (needed + MIN_CAPACITY - 1) // MIN_CAPACITY * MIN_CAPACITY)


def _nbytes(shape: tuple, dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * dtype.itemsize


def _pack(tensors: list[torch.Tensor], into: torch.Tensor) -> None:
    offset = 0
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if size:
            into[offset:offset + size].copy_(tensor.reshape(-1).view(torch.uint8))
        offset += _pad(size)


class _Described:
    """A sent value's metadata and the message head built from it, reused while a link keeps
    sending values of the same structure, shapes and dtypes (pickling it costs tens of µs).

    It also keeps the link's spare message buffers for such values: the head already written
    and a typed view of each tensor's place, so packing a value is one ``copy_`` per tensor.
    """

    __slots__ = ("structure", "specs", "meta", "heads", "spare", "start", "places", "data_bytes", "single",
                 "encodings")

    def __init__(self, structure: Any, specs: list) -> None:
        self.structure, self.specs = structure, specs
        self.meta = pickle.dumps((structure, specs), protocol=pickle.HIGHEST_PROTOCOL)
        self.heads: dict[bool, torch.Tensor] = {}
        self.spare: dict[int, list[_Slot]] = {}  # by capacity: inline message buffers not in flight
        self.start = _pad(_PREFIX.size + len(self.meta))  # where the data begins in an inline message
        self.places: list[tuple[int, int]] = []  # per tensor: (offset in the data, bytes)
        offset = 0
        for shape, dtype, _ in specs:
            size = _nbytes(shape, dtype)
            self.places.append((offset, size))
            offset += _pad(size)
        self.data_bytes = offset
        self.single = specs[0] if isinstance(structure, Leaf) else None  # a bare tensor's spec
        self.encodings: dict[Any, Any] = {}  # a transport's own encodings of the head, cached

    def head_bytes(self, inline: bool) -> bytes:
        """The message head (prefix, metadata, padding up to the data) as bytes."""
        raw = _PREFIX.pack(len(self.meta), int(inline), self.data_bytes) + self.meta
        return raw + bytes(self.start - len(raw))

    def describes(self, value: Any) -> bool:
        """Whether ``value`` is a bare tensor described by this (the common case, decided
        without flattening)."""
        single = self.single
        return (single is not None and isinstance(value, torch.Tensor) and value.shape == single[0]
                and value.dtype is single[1] and value.requires_grad == single[2])

    def head(self, inline: bool) -> torch.Tensor:
        """:meth:`head_bytes` as a tensor (cached)."""
        if inline not in self.heads:
            self.heads[inline] = torch.frombuffer(bytearray(self.head_bytes(inline)), dtype=torch.uint8).clone()
        return self.heads[inline]

    def slot(self, capacity: int) -> _Slot:
        """A message buffer of ``capacity`` bytes for an inline value, from the spares or new."""
        spare = self.spare.get(capacity)
        if spare:
            return spare.pop()
        message = torch.empty(capacity, dtype=torch.uint8)
        message[:self.start].copy_(self.head(True))
        places = [message[self.start + offset:self.start + offset + size].view(dtype).view(shape) if size else None
                  for (offset, size), (shape, dtype, _) in zip(self.places, self.specs)]
        return _Slot(message, places, self, capacity)


class _Slot:
    """One reusable inline message buffer and the typed places of its tensors."""

    __slots__ = ("message", "places", "owner", "capacity")

    def __init__(self, message: torch.Tensor, places: list[torch.Tensor | None], owner: _Described,
                 capacity: int) -> None:
        self.message, self.places, self.owner, self.capacity = message, places, owner, capacity

    def fill(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        for place, tensor in zip(self.places, tensors):
            if place is not None:
                place.copy_(tensor.detach() if tensor.requires_grad else tensor)
        return self.message

    def release(self) -> None:
        """The send completed: the buffer may carry the link's next value."""
        self.owner.spare.setdefault(self.capacity, []).append(self)


def _describe(value: Any, where: str, previous: _Described | None = None) -> tuple[_Described, list[torch.Tensor]]:
    """``value``'s description (``previous`` when it describes the value the same way) and its
    tensors."""
    if previous is not None and previous.describes(value):
        return previous, [value]
    structure, originals = flatten(value, where)
    specs = [(tuple(t.shape), t.dtype, t.requires_grad) for t in originals]
    same = previous is not None and previous.specs == specs and previous.structure == structure
    return (previous if same and previous is not None else _Described(structure, specs)), originals


def _encode(value: Any, where: str, capacity: int, previous: _Described | None = None
            ) -> tuple[torch.Tensor | _Slot, torch.Tensor | None, int, _Described]:
    """(message of ``capacity`` bytes, separate data buffer or None, bytes the value needs, its
    description, reusing ``previous`` when the value is described the same way). An inline
    value on CPU comes as a filled :class:`_Slot` (release it when its send completes)."""
    described, originals = _describe(value, where, previous)
    start, data_bytes = described.start, described.data_bytes
    needed = start + data_bytes
    if start > capacity:
        raise ValueError(f"{where} has too many tensors ({len(originals)}) to describe in {capacity} bytes; "
                         "merge them into fewer tensors")
    on_cpu = all(t.is_cpu for t in originals)
    if on_cpu and needed <= capacity:
        slot = described.slot(capacity)
        slot.fill(originals)
        return slot, None, needed, described
    tensors = [t.detach().contiguous() for t in originals]
    message = torch.empty(capacity, dtype=torch.uint8)
    message[:start].copy_(described.head(False))
    if not data_bytes:
        return message, None, needed, described
    data = torch.empty(data_bytes, dtype=torch.uint8, device=tensors[0].device)
    _pack(tensors, data)
    return message, data, needed, described


def _decode_head(raw: Any, known: dict[bytes, tuple[Any, list]] | None = None, offset: int = 0
                 ) -> tuple[Any, list, bool, int, int]:
    """(structure, specs, inline?, data bytes, bytes the value needed from the head on) of the
    message head at ``offset`` of the buffer ``raw``; ``known`` caches unpickled metadata by its bytes."""
    length, inline, data_bytes = _PREFIX.unpack_from(raw, offset)
    meta = bytes(raw[offset + _PREFIX.size:offset + _PREFIX.size + length])
    if known is not None and meta in known:
        structure, specs = known[meta]
    else:
        structure, specs = pickle.loads(meta)
        if known is not None:
            if len(known) > 64:
                known.clear()
            known[meta] = (structure, specs)
    start = _pad(_PREFIX.size + length)
    return structure, specs, bool(inline), data_bytes, start + data_bytes


def _unpack(structure: Any, specs: list, data: torch.Tensor | None, device: torch.device) -> Any:
    tensors, offset = [], 0
    for shape, dtype, requires_grad in specs:
        size = _nbytes(shape, dtype)
        if size == 0 or data is None:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        else:
            tensor = data[offset:offset + size].view(dtype).view(shape)
            if tensor.device != device:
                tensor = tensor.to(device)
        offset += _pad(size)
        if requires_grad and tensor.is_floating_point():
            tensor.requires_grad_(True)
        tensors.append(tensor)
    return unflatten(structure, tensors)


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

    def __init__(self, transport: Transport, source: int, messages: Iterable[Message],
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
        try:
            work.wait()  # bounded by the process group's timeout; wait(timeout) spins in gloo
        except RuntimeError as error:
            raise PeerLostError(
                f"receiving {message.kind} of stage {message.stage} from rank {self.source} failed: {error}",
                rank=self.transport.rank, stage=message.target_stage, microbatch=message.microbatch) from None

    def next(self) -> tuple[Message, Any]:
        """Block until the next message on this link has arrived; return it."""
        if not self.posted:
            raise RuntimeError(f"no more messages are expected from rank {self.source} in this step")
        head = self.posted[0]
        if self.transport.lag > 1 and not head.work.is_completed():
            self._post(self.transport.lag)  # about to wait anyway
        self._wait(head.work, head.message)
        self.posted.popleft()
        structure, specs, inline, data_bytes, needed = _decode_head(head.buffer.cpu().numpy(),  # NCCL: waits
                                                                    self.transport.known_meta)
        self.capacities.learn(head.position, self._key(head.message), needed)
        data: torch.Tensor | None = None
        if inline:
            data = head.buffer[needed - data_bytes:needed]
        elif data_bytes:
            data = torch.empty(data_bytes, dtype=torch.uint8, device=self.transport.device,
                               pin_memory=self.transport.pin_memory)
            data_work = self.transport.link_pg(self.source, self.transport.rank).recv(
                [data], self.source, self.transport.data_tag)
            self._wait(data_work, head.message)
        self._post(1)
        return head.message, _unpack(structure, specs, data, self.transport.device)


class _InFlight:
    """A posted send: its works, the buffers they read, and the reusable slot to give back."""

    __slots__ = ("works", "buffers", "slot")

    def __init__(self, works: list[Any], buffers: list[Any], slot: _Slot | None) -> None:
        self.works, self.buffers, self.slot = works, buffers, slot

    def completed(self) -> bool:
        return all(work.is_completed() for work in self.works)

    def done(self) -> None:
        if self.slot is not None:
            self.slot.release()
            self.slot = None


class Transport:
    """Sends and receives boundary values for one rank of a pipeline group."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device) -> None:
        self.group = group
        self.pg: dist.ProcessGroup = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(group)
        self.device = device
        self.pin_memory = False  # receive into pinned host memory (host-staged transport, staged.py)
        self.wire_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")  # headers
        # NCCL runs a pair's operations in order on one stream: messages to lower ranks get their
        # own communicators, so an early receive never waits in front of a send (docs/gpu.md)
        self._downward = self.pg if self.wire_device.type == "cpu" else dist.new_group(
            dist.get_process_group_ranks(self.pg), use_local_synchronization=True)
        # receives posted ahead per link (gloo); NCCL keeps one, and with it the tag-free order
        self.lag = 2 if self.wire_device.type == "cpu" else 1
        self.data_tag = DATA_TAG if self.lag > 1 else 0
        self.capacities: dict[Key, int] = {}  # inbound, learned from earlier messages (_Capacities)
        self._send_capacities: dict[Key, int] = {}
        self._inbound_links: dict[int, _Capacities] = {}
        self._outbound_links: dict[int, _Capacities] = {}
        self._described: dict[Key, _Described] = {}  # outbound, the previous value's metadata
        self.known_meta: dict[bytes, tuple[Any, list]] = {}  # inbound, unpickled metadata
        self._arrived: dict[Message, Any] = {}
        self._inbound: dict[int, _Inbound] = {}
        self._pending_sends: list[_InFlight] = []
        self.bytes_sent = 0
        self.transfers = 0

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

    def receive(self, message: Message, source: int) -> Any:
        """The value of ``message`` from rank ``source``, waiting for it if it has not arrived."""
        if message in self._arrived:
            return self._arrived.pop(message)
        while True:
            arrived, value = self._next(source)
            if arrived == message:
                return value
            self._arrived[arrived] = value

    def _next(self, source: int) -> tuple[Message, Any]:
        """The next message from ``source`` in link order, waiting for it."""
        return self._inbound[source].next()

    def deliver_local(self, message: Message, value: Any) -> None:
        """Hand a value to a stage on this same rank (detached: like a received value, a leaf of
        its own for the consuming stage)."""
        self._arrived[message] = detached_leaves(value, f"stage {message.stage} {message.kind}")[0]

    # --- sending ---------------------------------------------------------------------------
    def send(self, destination: int, message: Message, value: Any) -> None:
        """Post the transfers of ``value`` to ``destination`` (a rank of the group) without waiting."""
        key = (destination, message.kind, message.stage)
        if destination not in self._outbound_links:
            self._outbound_links[destination] = _Capacities(self._send_capacities, self.lag)
        link = self._outbound_links[destination]
        position, capacity = link.next(key)
        encoded, data, needed, self._described[key] = _encode(value, f"stage {message.stage} {message.kind}",
                                                              capacity, self._described.get(key))
        link.learn(position, key, needed)
        slot, buffer = (encoded, encoded.message) if isinstance(encoded, _Slot) else (None, encoded)
        if self.wire_device.type == "cuda":  # NCCL: a pinned copy, so the host does not wait for the GPU
            buffer = buffer.pin_memory().to(self.wire_device, non_blocking=True)
        pg = self.link_pg(self.rank, destination)
        works = [pg.send([buffer], destination, 0)]
        if data is not None:
            works.append(pg.send([data], destination, self.data_tag))
        self.bytes_sent += buffer.numel() + (data.numel() if data is not None else 0)
        self.transfers += len(works)
        self._pending_sends.append(_InFlight(works, [buffer, data], slot))
        while len(self._pending_sends) > 1 and self._pending_sends[0].completed():
            self._pending_sends.pop(0).done()  # a long stream must not hold every buffer it ever sent

    def flush(self) -> None:
        """Post every send held back (none here; the host-staged transport defers some)."""

    def finish(self) -> None:
        """Wait for this step's sends to complete."""
        for sent in self._pending_sends:
            for work in sent.works:
                work.wait()
            sent.done()
        self._pending_sends.clear()
        for link in self._outbound_links.values():
            link.settle()
        self._inbound = {}
