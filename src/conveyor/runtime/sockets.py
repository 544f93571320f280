"""Messages over loopback TCP sockets: the CPU transport when every rank of a pipeline runs on
one host.

Why: gloo hands each send and receive to its own loop thread and wakes the caller through a
condition variable; on a small machine those threads compete with the stages for the cores,
and with cold caches each gloo call costs a few hundred µs. Here one socket joins each pair of
ranks, written and read by the calling thread without blocking::

    rank a  --send: length + message, written at once (queued if the socket is full)-->  rank b
            <--------- the reverse direction on the same socket --------------------------

A message is the same byte layout as :mod:`.comm`'s, sized to fit (no capacity to agree on),
preceded by its 8-byte length. While a rank waits for a message it also drains every other
socket into per-peer queues and writes its own queued bytes, so no pair can block the other.
Values larger than ``INLINE_LIMIT`` send only their metadata here and their data over the
process group (gloo, its own tag), received the moment the metadata is read; kernel socket
buffers (4 MiB and more on Linux loopback) then always absorb what is written, so a send
never waits for its receiver.

Received values are views of the received buffer (no copy). A peer that closes its socket or
dies ends the wait with :class:`~conveyor.errors.PeerLostError` at once; a peer that stops
sending is bounded by the process group's timeout.
"""

from __future__ import annotations

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
from .comm import DATA_TAG, Transport, _decode_prefix, _encode, _Slot, _unpack

__all__ = ["SocketTransport", "INLINE_LIMIT", "connect_peers"]

INLINE_LIMIT = 1 << 20  # bytes of a message sent whole over its socket; larger data goes over gloo
_LENGTH = struct.Struct("<q")
_GATHER = 32  # buffers per sendmsg call


class _Peer:
    """One connection: queued outgoing bytes, and incoming messages as they complete."""

    __slots__ = ("rank", "sock", "outgoing", "length", "length_view", "length_got", "message", "view", "got",
                 "complete", "closed")

    def __init__(self, rank: int, sock: socket.socket) -> None:
        self.rank, self.sock = rank, sock
        self.outgoing: deque[tuple[memoryview, _Slot | None]] = deque()
        self.length = bytearray(_LENGTH.size)
        self.length_view = memoryview(self.length)
        self.length_got = 0
        self.message: torch.Tensor | None = None
        self.view: memoryview | None = None
        self.got = 0
        self.complete: deque[tuple[torch.Tensor, tuple, Any]] = deque()  # (message, its decoded prefix,
        #                                                                    data receive or None)
        self.closed = ""  # why the peer's side ended (it finished, or died): read no more

    def write(self) -> None:
        """Write queued bytes (gathered, one system call for a whole message) until the socket
        would block."""
        outgoing = self.outgoing
        while outgoing:
            try:
                written = self.sock.sendmsg([view for view, _ in islice(outgoing, _GATHER)])
            except BlockingIOError:
                return
            while written:
                view, slot = outgoing[0]
                if written < len(view):
                    outgoing[0] = (view[written:], slot)
                    break
                written -= len(view)
                outgoing.popleft()
                if slot is not None:
                    slot.release()


class SocketTransport(Transport):
    """The :class:`~conveyor.runtime.comm.Transport` interface over one socket per pair of ranks."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device,
                 sockets: dict[int, socket.socket]) -> None:
        super().__init__(group, device)
        self.data_tag = DATA_TAG
        self._peers = {rank: _Peer(rank, sock) for rank, sock in sockets.items()}
        self._timeout = _group_timeout(self.pg)
        self._poller = select.poll()  # every open peer, for reading
        for peer in self._peers.values():
            self._poller.register(peer.sock, select.POLLIN)
        self._messages: dict[int, Iterator[Message]] = {}
        self._data_works: list[tuple[Any, torch.Tensor]] = []
        self.queued_sends = 0  # sends that did not fit the socket at once (for tests and tuning)

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
        raw, (structure, specs, inline, data_bytes, needed), data_work = peer.complete.popleft()
        data: torch.Tensor | None = None
        if inline:
            data = raw[needed - data_bytes:needed]
        elif data_bytes:
            work, data = data_work
            try:
                work.wait()
            except RuntimeError as error:
                raise self._lost(source, message, f"its data transfer failed: {error}") from None
        return message, _unpack(structure, specs, data, self.device)

    def _progress(self, wanted: _Peer, message: Message) -> None:
        """Write queued bytes and read every socket until ``wanted`` has a complete message."""
        deadline = time.monotonic() + self._timeout
        while True:
            self._pump(message)
            if wanted.complete:
                return
            if wanted.closed:
                raise self._lost(wanted.rank, message, wanted.closed)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._lost(wanted.rank, message, f"nothing arrived in {self._timeout:.0f} s")
            self._sleep(remaining)

    def _sleep(self, seconds: float) -> None:
        """Block until a socket is readable, or writable where bytes wait to go (poll: no limit
        on descriptor numbers, unlike select)."""
        poller = self._poller
        if any(peer.outgoing for peer in self._peers.values()):
            poller = select.poll()
            for peer in self._peers.values():
                events = (0 if peer.closed else select.POLLIN) | (select.POLLOUT if peer.outgoing else 0)
                if events:
                    poller.register(peer.sock, events)
        poller.poll(max(1, min(int(seconds * 1000), 60_000)))

    def _pump(self, message: Message | None = None) -> None:
        for peer in self._peers.values():
            if peer.outgoing:
                try:
                    peer.write()
                except OSError as error:
                    raise self._lost(peer.rank, message, f"sending to it failed: {error}") from None
            if not peer.closed:
                self._read(peer)
                if peer.closed:
                    self._poller.unregister(peer.sock)

    def _read(self, peer: _Peer) -> None:
        """Read what ``peer``'s socket holds without blocking; queue complete messages. The end
        of the connection is noted, not raised: it matters only to a rank still waiting on it."""
        sock = peer.sock
        try:
            while True:
                if peer.view is None:
                    got = sock.recv_into(peer.length_view[peer.length_got:])
                    if got == 0:
                        peer.closed = "it closed the connection (the process ended or failed)"
                        return
                    peer.length_got += got
                    if peer.length_got < _LENGTH.size:
                        continue
                    peer.length_got = 0
                    size = _LENGTH.unpack(peer.length)[0]
                    peer.message = torch.empty(size, dtype=torch.uint8)
                    peer.view, peer.got = memoryview(peer.message.numpy()), 0
                if peer.got < len(peer.view):
                    got = sock.recv_into(peer.view[peer.got:])
                    if got == 0:
                        peer.closed = "it closed the connection in the middle of a message"
                        return
                    peer.got += got
                if peer.got == len(peer.view):
                    assert peer.message is not None
                    prefix = _decode_prefix(peer.message, self.known_meta)
                    peer.complete.append((peer.message, prefix, self._post_data(peer.rank, prefix)))
                    peer.message, peer.view = None, None
        except BlockingIOError:
            return
        except OSError as error:
            peer.closed = f"the connection failed: {error}"

    def _post_data(self, source: int, prefix: tuple) -> Any:
        """Post the gloo receive of a large value's data as soon as its metadata is read."""
        _, _, inline, data_bytes, _ = prefix
        if inline or not data_bytes:
            return None
        data = torch.empty(data_bytes, dtype=torch.uint8)
        return self.pg.recv([data], source, self.data_tag), data

    def _lost(self, source: int, message: Message | None, why: str) -> PeerLostError:
        if message is None:
            return PeerLostError(f"the connection to rank {source} failed: {why}", rank=self.rank)
        return PeerLostError(f"receiving {message.kind} of stage {message.stage} from rank {source} failed: {why}",
                             rank=self.rank, stage=message.target_stage, microbatch=message.microbatch)

    # --- sending ---------------------------------------------------------------------------
    def send(self, destination: int, message: Message, value: Any) -> None:
        """Queue ``value`` for ``destination`` and write what the socket takes now."""
        key = (destination, message.kind, message.stage)
        encoded, data, needed, self._described[key] = _encode(
            value, f"stage {message.stage} {message.kind}", 0, self._described.get(key), fit_limit=INLINE_LIMIT)
        peer = self._peers[destination]
        if isinstance(encoded, _Slot):
            body, slot = memoryview(encoded.message.numpy())[:needed], encoded
        else:
            body, slot = memoryview(encoded.numpy())[:needed - (data.numel() if data is not None else 0)], None
        peer.outgoing.append((memoryview(_LENGTH.pack(len(body))), None))
        peer.outgoing.append((body, slot))
        self.bytes_sent += len(body) + _LENGTH.size
        self.transfers += 1
        if data is not None:
            self._data_works.append((self.pg.send([data], destination, self.data_tag), data))
            self.bytes_sent += data.numel()
            self.transfers += 1
        try:
            peer.write()
        except OSError as error:
            raise PeerLostError(f"sending {message.kind} of stage {message.stage} to rank {destination} failed: "
                                f"{error}", rank=self.rank, stage=message.stage,
                                microbatch=message.microbatch) from None
        if peer.outgoing:
            self.queued_sends += 1  # the socket was full: the rest goes out at later transport calls

    def flush(self) -> None:
        """Write what the sockets take now (nothing is held back for later)."""
        self._pump()

    def finish(self) -> None:
        """Wait until every queued byte is written and every data transfer has completed."""
        deadline = time.monotonic() + self._timeout
        while True:
            self._pump()
            stuck = [peer for peer in self._peers.values() if peer.outgoing]
            if not stuck:
                break
            if time.monotonic() > deadline:
                raise PeerLostError(f"rank {stuck[0].rank} read nothing for {self._timeout:.0f} s", rank=self.rank)
            self._sleep(1.0)  # readable sockets wake it too: a writer may wait on us
        for work, _ in self._data_works:
            work.wait()
        self._data_works.clear()

    def close(self) -> None:
        for peer in self._peers.values():
            peer.sock.close()


def _group_timeout(pg: dist.ProcessGroup) -> float:
    try:
        return pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except Exception:  # noqa: BLE001 - a private attribute that may move between torch versions
        return float(timedelta(minutes=30).total_seconds())


def connect_peers(group: dist.ProcessGroup | None) -> dict[int, socket.socket] | None:
    """One connected, non-blocking loopback socket per other rank of ``group`` (group ranks), or
    None on every rank when the ranks do not all run on this host. Collective over ``group``."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(size)
    mine = (_this_host(), listener.getsockname()[1])
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, mine, group=group)
    if len({host for host, _ in everyone}) != 1:
        listener.close()
        return None
    sockets: dict[int, socket.socket] = {}
    for lower in range(rank):  # connect to every lower rank, say who we are
        sock = socket.create_connection(("127.0.0.1", everyone[lower][1]))
        sock.sendall(struct.pack("<q", rank))
        sockets[lower] = sock
    for _ in range(size - 1 - rank):  # and accept every higher one
        sock, _ = listener.accept()
        sockets[_read_rank(sock)] = sock
    listener.close()
    for sock in sockets.values():
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
    return sockets


def _this_host() -> tuple[str, str]:
    """This machine: its name and its boot id (two machines may share a name, not a boot id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            boot = file.read().strip()
    except OSError:
        boot = ""
    return socket.gethostname(), boot


def _read_rank(sock: socket.socket) -> int:
    raw = b""
    while len(raw) < 8:
        chunk = sock.recv(8 - len(raw))
        if not chunk:
            raise ConnectionError("a peer closed its connection before saying its rank")
        raw += chunk
    return struct.unpack("<q", raw)[0]
