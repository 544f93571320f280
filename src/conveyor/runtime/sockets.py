"""Messages over loopback TCP sockets: the CPU transport when every rank of a pipeline runs on
one host.

Why: gloo hands each send and receive to its own loop thread and wakes the caller through a
condition variable; on a small machine those threads compete with the stages for the cores,
and with cold caches each gloo call is slow. Here one socket joins each pair of ranks, written
and read by the calling thread without blocking::

    rank a  --send: length + message, written at once (queued if the socket is full)-->  rank b
            <--------- the reverse direction on the same socket --------------------------

A message is a 16-byte frame (head bytes, data bytes), the head of :mod:`.codec`'s layout
(prefix, metadata: an explicit encoding, never pickle) and the tensors' bytes at 16-byte
offsets. A send writes the tensors straight from their memory (``sendmsg`` gathers frame, head
and data; no copy, no torch call); only what the socket does not take at once is copied and
queued. A read takes in whatever the socket holds (usually whole messages) into the peer's
64 KiB inbox; a bare tensor's data is copied from there into a tensor of its shape (one
``torch.empty``), and a message too large for the inbox is read straight into its own buffer.
A rank waiting for a message makes one read that sleeps in the kernel until bytes come (the
sockets block, up to a second per read; every other call passes ``MSG_DONTWAIT``); while bytes
of its own wait to go out it instead polls every socket, reads what is ready and writes what
fits, so no pair can block the other. Values larger than ``INLINE_LIMIT`` send only their
metadata here and their data over the process group (gloo, its own tag), received the moment
the metadata is read.

Set-up: :mod:`.socket_mesh` (authenticated connections, bounded by the timeout).

Received values own their memory. A peer that closes its socket, dies or sends bytes that are
not a message ends the wait with :class:`~conveyor.errors.PeerLostError` at once; a peer that
stops sending is bounded by the transport's ``timeout``.
"""

from __future__ import annotations

import ctypes
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable, Iterator
from datetime import timedelta
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PeerLostError
from ..schedule.links import Message
from .bundle import Leaf
from .codec import Described, MessageError, decode_head, describe, pack, unpack
from .comm import DATA_TAG
from .socket_mesh import connect_peers
from .transport import InOrderTransport, lost_or_explained

__all__ = ["SocketTransport", "INLINE_LIMIT", "connect_peers"]

INLINE_LIMIT = 1 << 20  # data bytes of a message sent whole over its socket; larger data goes over gloo
INBOX_BYTES = 1 << 16  # per peer: what one read may take in; larger messages are read straight into place
_FRAME = struct.Struct("<qq")  # head bytes, data bytes that follow on the socket
_GATHER = 32  # buffers per sendmsg call
_ZEROS = bytes(16)  # padding between tensors
_EVENTS_READ = select.POLLIN | select.POLLHUP | select.POLLERR
_DONTWAIT = socket.MSG_DONTWAIT  # the sockets block; every call but a waiting read asks them not to
_WAIT_SECONDS = 1.0  # a waiting read returns after at most this long (SO_RCVTIMEO), to check the deadline


def _memory(tensor: torch.Tensor, size: int) -> Any:
    """The ``size`` bytes of a contiguous CPU tensor as a buffer (a ctypes array over its
    memory: no copy, no torch call beyond ``data_ptr``)."""
    return (ctypes.c_char * size).from_address(tensor.data_ptr())


class _Layout:
    """How values of one description go on the socket: the frames that start their messages,
    and each tensor's byte size with the padding that precedes it."""

    __slots__ = ("frames", "tensors", "inline", "message_bytes")

    def __init__(self, described: Described) -> None:
        self.tensors: list[tuple[int, int, int]] = []  # (index, bytes, padding before them), empty ones left out
        end = 0
        for index, (offset, size) in enumerate(described.places):
            if size:
                self.tensors.append((index, size, offset - end))
                end = offset + size
        self.frames = {inline: _FRAME.pack(len(head), end if inline else 0) + head
                       for inline in (True, False) for head in [described.head_bytes(inline)]}
        self.inline = described.data_bytes <= INLINE_LIMIT
        self.message_bytes = len(self.frames[True]) + end


class _Pending:
    """A message whose data is larger than what is left of the inbox: read straight into its buffer."""

    __slots__ = ("head", "buffer", "view", "got")

    def __init__(self, head: tuple, buffer: torch.Tensor, size: int, got: int) -> None:
        self.head, self.buffer, self.got = head, buffer, got
        self.view = memoryview(_memory(buffer, size)).cast("B")


class _Peer:
    """One connection: queued outgoing bytes, an inbox that reads take in, and the values of
    complete messages."""

    __slots__ = ("rank", "sock", "outgoing", "inbox", "inbox_view", "inbox_address", "begin", "end", "pending",
                 "complete", "closed")

    def __init__(self, rank: int, sock: socket.socket) -> None:
        self.rank, self.sock = rank, sock
        self.outgoing: deque[memoryview] = deque()  # copies: a sent value may change once send returns
        self.inbox = bytearray(INBOX_BYTES)
        self.inbox_view = memoryview(self.inbox)
        self.inbox_address = ctypes.addressof((ctypes.c_char * INBOX_BYTES).from_buffer(self.inbox))
        self.begin = self.end = 0  # the inbox's unread bytes
        self.pending: _Pending | None = None
        self.complete: deque[tuple[Any, tuple, Any]] = deque()  # (value or None, head, data receive or None)
        self.closed = ""  # why the peer's side ended (it finished, or died): read no more

    def write(self) -> None:
        """Write queued bytes (gathered, one system call for a whole message) until the socket
        would block."""
        outgoing = self.outgoing
        while outgoing:
            try:
                written = self.sock.sendmsg(list(islice(outgoing, _GATHER)), [], _DONTWAIT)
            except BlockingIOError:
                return
            while written:
                view = outgoing[0]
                if written < len(view):
                    outgoing[0] = view[written:]
                    break
                written -= len(view)
                outgoing.popleft()


class SocketTransport(InOrderTransport):
    """The :class:`~conveyor.runtime.transport.Transport` interface over one socket per pair of
    ranks (``sockets``, from :func:`connect_peers`); every wait is bounded by ``timeout`` seconds."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device,
                 sockets: dict[int, socket.socket], *, timeout: float = 300.0) -> None:
        self.group = group
        self.pg: dist.ProcessGroup = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(group)
        self.device = device
        self.timeout = float(timeout)
        self._wait_limit = timedelta(seconds=self.timeout)
        self.data_tag = DATA_TAG
        wait = max(0.001, min(_WAIT_SECONDS, self.timeout))
        receive_limit = struct.pack("ll", int(wait), int(round((wait - int(wait)) * 1_000_000)))
        for sock in sockets.values():
            sock.setblocking(True)  # calls that must not wait say MSG_DONTWAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, receive_limit)
        self._peers = {rank: _Peer(rank, sock) for rank, sock in sockets.items()}
        self._by_descriptor = {peer.sock.fileno(): peer for peer in self._peers.values()}
        self._poller = select.poll()  # every open peer, for reading
        for peer in self._peers.values():
            self._poller.register(peer.sock, select.POLLIN)
        self._messages: dict[int, Iterator[Message]] = {}
        self._data_works: list[tuple[Any, torch.Tensor]] = []
        self._described: dict[tuple[int, str, int], Described] = {}  # outbound, the previous value's metadata
        self.known_meta: dict[bytes, tuple[Any, list, int, int]] = {}  # inbound, decoded metadata by its bytes
        self._arrived: dict[Message, Any] = {}
        self.bytes_sent = 0
        self.transfers = 0
        self.queued_sends = 0  # sends that did not fit the socket at once (for tests and tuning)
        self.closed = False

    # --- receiving ---------------------------------------------------------------------------
    def expect(self, incoming: dict[int, Iterable[Message]]) -> None:
        """Name the messages each peer will send, in order (``incoming[source]``, may be lazy)."""
        self._arrived = {}
        self._messages = {source: iter(messages) for source, messages in incoming.items()}

    def _next(self, source: int) -> tuple[Message, Any]:
        """The next message from ``source`` in link order, waiting for it."""
        peer = self._peers[source]
        message = next(self._messages[source], None)
        if message is None:
            raise RuntimeError(f"no more messages are expected from rank {source} in this step")
        if not peer.complete:
            self._progress(peer, message)
        value, head, data_work = peer.complete.popleft()
        if data_work is not None:
            work, data = data_work
            try:
                work.wait(self._wait_limit)
            except RuntimeError as error:
                raise self._lost(source, message, f"its data transfer failed: {error}") from None
            value = unpack(head[0], head[1], data, self.device)
        return message, value

    def _progress(self, wanted: _Peer, message: Message) -> None:
        """Read until ``wanted`` has a complete message: first what its socket holds already,
        then by a read that waits on its socket (one system call that sleeps until bytes come),
        or, while bytes of ours wait to go out, whatever sockets ``poll`` reports ready."""
        if not wanted.closed:
            self._read(wanted)
        if wanted.complete:
            return
        deadline = time.monotonic() + self.timeout
        self.waiting = (wanted.rank, message)  # a fresh tuple per wait: the watchdog times it
        try:
            while not wanted.complete:
                if self.verdict is not None:  # the watchdog's: the ranks disagree, or a peer stalled or left
                    raise self.verdict
                if wanted.closed:
                    raise lost_or_explained(self, wanted.rank, self._lost(wanted.rank, message, wanted.closed))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._lost(wanted.rank, message, f"nothing arrived in {self.timeout:g} s")
                if any(peer.outgoing for peer in self._peers.values()):
                    self._wait_ready(min(remaining, _WAIT_SECONDS), message)
                else:
                    self._read(wanted, wait=True)
        finally:
            self.waiting = None

    def _wait_ready(self, seconds: float, message: Message | None) -> None:
        """Block until a socket is readable, or writable where bytes wait to go (poll: no limit
        on descriptor numbers, unlike select); then read and write what it reported."""
        poller = self._poller
        if any(peer.outgoing for peer in self._peers.values()):
            poller = select.poll()
            for peer in self._peers.values():
                events = (0 if peer.closed else select.POLLIN) | (select.POLLOUT if peer.outgoing else 0)
                if events:
                    poller.register(peer.sock, events)
        for descriptor, events in poller.poll(max(1, min(int(seconds * 1000), 60_000))):
            peer = self._by_descriptor[descriptor]
            if events & select.POLLOUT:
                self._write(peer, message)
            if events & _EVENTS_READ and not peer.closed:
                self._read(peer)

    def _write(self, peer: _Peer, message: Message | None) -> None:
        try:
            peer.write()
        except OSError as error:
            raise lost_or_explained(self, peer.rank,
                                    self._lost(peer.rank, message, f"sending to it failed: {error}")) from None

    def _read(self, peer: _Peer, wait: bool = False) -> None:
        """Take in what ``peer``'s socket holds (``wait``: the first read waits up to a second
        for bytes); queue complete messages. The end of the connection is noted, not raised: it
        matters only to a rank still waiting on it."""
        sock = peer.sock
        flags = 0 if wait else _DONTWAIT
        try:
            while True:
                pending = peer.pending
                if pending is not None:  # a large message: its data goes straight into its buffer
                    got = sock.recv_into(pending.view[pending.got:], 0, flags)
                    flags = _DONTWAIT
                    if got == 0:
                        return self._closed(peer, "it closed the connection in the middle of a message")
                    pending.got += got
                    if pending.got < len(pending.view):
                        continue
                    peer.pending = None
                    peer.complete.append((self._value(pending.head, pending.buffer), pending.head, None))
                    continue
                room = len(peer.inbox) - peer.end
                got = sock.recv_into(peer.inbox_view[peer.end:], 0, flags)
                flags = _DONTWAIT
                if got == 0:
                    middle = peer.begin != peer.end
                    return self._closed(peer, "it closed the connection in the middle of a message" if middle
                                        else "it closed the connection (the process ended or failed)")
                peer.end += got
                self._take_messages(peer)
                if got < room:
                    return  # the socket is drained: no further call just to hear it would block
        except BlockingIOError:
            return
        except MessageError as error:
            self._closed(peer, f"it sent bytes that are not a conveyor message ({error})")
        except OSError as error:
            self._closed(peer, f"the connection failed: {error}")

    def _closed(self, peer: _Peer, why: str) -> None:
        if not peer.closed:
            peer.closed = why
            self._poller.unregister(peer.sock)

    def _take_messages(self, peer: _Peer) -> None:
        """Turn the complete messages at the front of ``peer``'s inbox into values; start reading
        a message too large for the inbox's room straight into its own buffer."""
        inbox = peer.inbox
        while peer.end - peer.begin >= _FRAME.size:
            head_bytes, data_bytes = _FRAME.unpack_from(inbox, peer.begin)
            body = peer.begin + _FRAME.size
            if head_bytes < 0 or data_bytes < 0 or data_bytes > INLINE_LIMIT:
                raise MessageError(f"a frame announces {head_bytes} head and {data_bytes} data bytes")
            if body + head_bytes > peer.end:
                if _FRAME.size + head_bytes > len(inbox):
                    raise MessageError(f"a message head of {head_bytes} bytes does not fit the {len(inbox)}-byte "
                                       "inbox (a sender sends fewer tensors per boundary value)")
                break
            head = decode_head(inbox, self.known_meta, body, body + head_bytes)
            if head[4] - head[3] != head_bytes or data_bytes != (head[5] if head[2] else 0):
                raise MessageError(f"a frame ({head_bytes} head, {data_bytes} data bytes) disagrees with its head")
            data_at = body + head_bytes
            available = peer.end - data_at
            if not head[2]:  # its data comes over gloo: post that receive now
                peer.begin = data_at
                data = torch.empty(head[3], dtype=torch.uint8)
                peer.complete.append((None, head, (self.pg.recv([data], peer.rank, self.data_tag), data)))
                continue
            if available >= data_bytes:
                peer.begin = data_at + data_bytes
                buffer = _buffer(head, data_bytes)
                if data_bytes:
                    ctypes.memmove(buffer.data_ptr(), peer.inbox_address + data_at, data_bytes)
                peer.complete.append((self._value(head, buffer), head, None))
                continue
            if data_at + data_bytes > len(inbox):  # will not fit: read the rest into its own buffer
                buffer = _buffer(head, data_bytes)
                if available:
                    ctypes.memmove(buffer.data_ptr(), peer.inbox_address + data_at, available)
                peer.pending = _Pending(head, buffer, data_bytes, available)
                peer.begin = peer.end = 0
                return
            break
        if peer.begin == peer.end:
            peer.begin = peer.end = 0
        elif peer.begin and len(inbox) - peer.end < INBOX_BYTES // 4:  # make room at the back
            left = peer.end - peer.begin
            inbox[:left] = inbox[peer.begin:peer.end]
            peer.begin, peer.end = 0, left

    def _value(self, head: tuple, buffer: torch.Tensor) -> Any:
        """The received value: a bare tensor is its buffer, anything else is unpacked from it."""
        structure, specs = head[0], head[1]
        if not isinstance(structure, Leaf):
            return unpack(structure, specs, buffer, self.device)
        if specs[0][2] and buffer.is_floating_point():
            buffer.requires_grad_(True)
        return buffer

    def _lost(self, source: int, message: Message | None, why: str) -> PeerLostError:
        if message is None:
            return PeerLostError(f"the connection to rank {source} failed: {why}", rank=self.rank)
        return PeerLostError(f"receiving {message.kind} of stage {message.stage} from rank {source} failed: {why}",
                             rank=self.rank, stage=message.target_stage, microbatch=message.microbatch)

    # --- sending ---------------------------------------------------------------------------
    def send(self, destination: int, message: Message, value: Any) -> None:
        """Write ``value`` to ``destination``'s socket now, straight from the tensors' memory; what
        does not fit is copied, queued and written at later transport calls."""
        key = (destination, message.kind, message.stage)
        described, tensors = describe(value, f"stage {message.stage} {message.kind}", self._described.get(key))
        self._described[key] = described
        layout = described.encodings.get("socket")
        if layout is None:
            if _FRAME.size + described.start > INBOX_BYTES:
                raise ValueError(f"stage {message.stage} {message.kind} has too many tensors ({len(described.specs)}) "
                                 f"to describe in {INBOX_BYTES} bytes; merge them into fewer tensors")
            layout = described.encodings["socket"] = _Layout(described)
        if layout.inline and (tensors[0].is_cpu if len(tensors) == 1 else all(t.is_cpu for t in tensors)):
            parts: list[Any] = [layout.frames[True]]  # the tensors' own bytes, padded to the layout's offsets
            for index, size, pad in layout.tensors:
                tensor = tensors[index]
                if pad:
                    parts.append(_ZEROS[:pad])
                if not tensor.is_contiguous():
                    tensor = tensors[index] = tensor.contiguous()  # held until written or copied
                parts.append(_memory(tensor, size))
            self.bytes_sent += layout.message_bytes
        else:
            parts = [layout.frames[False]]
            data = torch.empty(described.data_bytes, dtype=torch.uint8, device=tensors[0].device)
            pack([t.detach().contiguous() for t in tensors], data)
            self._data_works.append((self.pg.send([data], destination, self.data_tag), data))
            self.bytes_sent += len(parts[0]) + data.numel()
            self.transfers += 1
        self.transfers += 1
        peer = self._peers[destination]
        if not peer.outgoing:
            try:
                written = peer.sock.sendmsg(parts, [], _DONTWAIT)
            except BlockingIOError:
                written = 0
            except OSError as error:
                raise lost_or_explained(self, destination, PeerLostError(
                    f"sending {message.kind} of stage {message.stage} to rank {destination} failed: {error}",
                    rank=self.rank, stage=message.stage, microbatch=message.microbatch)) from None
            for part in parts:  # what did not fit is copied: the value may change once send returns
                if written >= len(part):
                    written -= len(part)
                    continue
                peer.outgoing.append(memoryview(bytes(part[written:])))
                written = 0
        else:
            peer.outgoing.extend(memoryview(bytes(part)) for part in parts)
            self._write(peer, message)
        if peer.outgoing:
            self.queued_sends += 1  # the socket was full: the rest goes out at later transport calls

    def flush(self) -> None:
        """Write what the sockets take now (nothing is held back for later)."""
        for peer in self._peers.values():
            if peer.outgoing:
                self._write(peer, None)

    def finish(self) -> None:
        """Wait until every queued byte is written and every data transfer has completed."""
        deadline = time.monotonic() + self.timeout
        while True:
            self.flush()
            stuck = [peer for peer in self._peers.values() if peer.outgoing]
            if not stuck:
                break
            if time.monotonic() > deadline:
                raise PeerLostError(f"rank {stuck[0].rank} read nothing for {self.timeout:.0f} s", rank=self.rank)
            self._wait_ready(1.0, None)  # readable sockets wake it too: a writer may wait on us
        for work, _ in self._data_works:
            try:
                work.wait(self._wait_limit)
            except RuntimeError as error:
                raise PeerLostError(f"a data transfer did not complete (limit {self.timeout:.0f} s): {error}",
                                    rank=self.rank) from None
        self._data_works.clear()

    def close(self) -> None:
        """Close every socket (peers see the connection end); idempotent."""
        if self.closed:
            return
        self.closed = True
        for peer in self._peers.values():
            if not peer.closed:
                peer.closed = "this rank closed its transport"
                self._poller.unregister(peer.sock)
            peer.sock.close()
            peer.outgoing.clear()
            peer.complete.clear()
        self._data_works.clear()
        self._arrived = {}


def _buffer(head: tuple, size: int) -> torch.Tensor:
    """Where a message's ``size`` data bytes go: a bare tensor's own storage, else a byte buffer."""
    structure, specs = head[0], head[1]
    if isinstance(structure, Leaf):
        return torch.empty(specs[0][0], dtype=specs[0][1])
    return torch.empty(size, dtype=torch.uint8)
