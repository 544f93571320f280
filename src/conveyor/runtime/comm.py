"""Point-to-point transport: tensor bundles with a header, receives posted ahead by threads.

Every message starts with a fixed-size header (the value's structure, the shape, dtype and
requires-grad flag of each tensor). Small values ride inside the header; larger ones follow as
one flat byte buffer holding all the tensors (a lone contiguous tensor is sent as it is). Because the receiver reads
shapes from the header, shapes may change from one step to the next.

For each inbound link the receiver knows, from the program (``schedule.links``), the order in
which messages will arrive, and receives them strictly in that order: the header of the next
message is posted before it is needed, and no point-to-point tags are used. Values that arrive
before their stage asks for them wait in a mailbox. Everything runs on the calling thread:
gloo cannot poll a pending receive, and a receiving thread would fight the compute thread for
the GIL (measured: several hundred microseconds a message).
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PeerLostError
from ..schedule.links import Message
from .bundle import flatten, unflatten

__all__ = ["Transport", "HEADER_BYTES"]

HEADER_BYTES = 4096
_ALIGN = 16
_PREFIX = 16  # int64 metadata length, int64 1 if the data is inline


def _pad(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _nbytes(shape: tuple, dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * dtype.itemsize


def _encode(value: Any, where: str) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """(header, separate data buffer or None, tensors to keep alive) for ``value``.

    Small CPU values travel inside the fixed-size header (one transfer); larger ones in a second,
    flat buffer (a lone contiguous tensor is sent as it is, without a copy).
    """
    structure, originals = flatten(value, where)
    specs = [(tuple(t.shape), t.dtype, t.requires_grad) for t in originals]
    tensors = [t.detach().contiguous() for t in originals]
    sizes = [t.numel() * t.element_size() for t in tensors]
    meta = pickle.dumps((structure, specs), protocol=pickle.HIGHEST_PROTOCOL)
    start = _pad(_PREFIX + len(meta))
    if start > HEADER_BYTES:
        raise ValueError(f"{where} has too many tensors ({len(tensors)}) to describe in one header; "
                         "merge them into fewer tensors")
    packed = sum(_pad(size) for size in sizes)
    inline = start + packed <= HEADER_BYTES and all(t.device.type == "cpu" for t in tensors)
    header = bytearray(HEADER_BYTES)
    struct.pack_into("<qq", header, 0, len(meta), int(inline))
    header[_PREFIX:_PREFIX + len(meta)] = meta
    if inline:
        offset = start
        for tensor, size in zip(tensors, sizes):
            if size:
                header[offset:offset + size] = tensor.view(-1).view(torch.uint8).numpy().tobytes()
            offset += _pad(size)
        return torch.frombuffer(header, dtype=torch.uint8), None, []
    header_tensor = torch.frombuffer(header, dtype=torch.uint8)
    if not packed:
        return header_tensor, None, []
    if len(tensors) == 1:
        return header_tensor, tensors[0].reshape(-1).view(torch.uint8), tensors
    data = torch.empty(packed, dtype=torch.uint8, device=tensors[0].device)
    offset = 0
    for tensor, size in zip(tensors, sizes):
        if size:
            data[offset:offset + size].copy_(tensor.reshape(-1).view(torch.uint8))
        offset += _pad(size)
    return header_tensor, data, tensors


def _decode_header(header: torch.Tensor) -> tuple[Any, list, torch.Tensor | None, int]:
    """(structure, specs, inline data or None, bytes of the separate data buffer)."""
    raw = header.numpy()
    length, inline = struct.unpack_from("<qq", raw, 0)
    structure, specs = pickle.loads(raw[_PREFIX:_PREFIX + length])
    if inline:
        return structure, specs, header[_pad(_PREFIX + length):], 0
    sizes = [_nbytes(shape, dtype) for shape, dtype, _ in specs]
    total = sizes[0] if len(specs) == 1 else sum(_pad(s) for s in sizes)
    return structure, specs, None, total


def _decode_data(structure: Any, specs: list, data: torch.Tensor | None, device: torch.device) -> Any:
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


class _Inbound:
    """The messages expected from one source rank in this step, received strictly in order.

    The header of the next message is always posted before it is needed; a separate data
    buffer is posted the moment its header has been read, before the next header.
    """

    def __init__(self, transport: Transport, source: int, messages: list[Message]) -> None:
        self.transport = transport
        self.source = source
        self.peer = transport.global_rank(source)
        self.messages = messages
        self.index = 0
        self.header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        self.work: Any = None
        self._post_header()

    def _post_header(self) -> None:
        if self.index < len(self.messages):
            self.header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
            self.work = dist.irecv(self.header, self.peer, group=self.transport.group)

    def _wait(self, work: Any) -> None:
        message = self.messages[self.index]
        try:
            work.wait()  # bounded by the process group's timeout; wait(timeout) spins in gloo
        except RuntimeError as error:
            raise PeerLostError(
                f"receiving {message.kind} of stage {message.stage} from rank {self.source} failed: {error}",
                rank=self.transport.rank, stage=message.target_stage, microbatch=message.microbatch) from None

    def next(self) -> tuple[Message, Any]:
        """Block until the next message on this link has arrived; return it."""
        if self.index >= len(self.messages):
            raise RuntimeError(f"no more messages are expected from rank {self.source} in this step")
        self._wait(self.work)
        structure, specs, data, total = _decode_header(self.header)
        data_work = None
        if total:
            data = torch.empty(total, dtype=torch.uint8, device=self.transport.device)
            data_work = dist.irecv(data, self.peer, group=self.transport.group)
        message = self.messages[self.index]
        if data_work is not None:
            self._wait(data_work)
        self.index += 1
        self._post_header()
        return message, _decode_data(structure, specs, data, self.transport.device)


class Transport:
    """Sends and receives boundary values for one rank of a pipeline group."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.device = device
        self._arrived: dict[Message, Any] = {}
        self._inbound: dict[int, _Inbound] = {}
        self._source_of: dict[Message, int] = {}
        self._pending_sends: list[tuple[list[Any], list[Any]]] = []
        self.bytes_sent = 0

    def global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    # --- receiving ---------------------------------------------------------------------------
    def expect(self, incoming: dict[int, list[Message]]) -> None:
        """Post the first receive of every inbound link of this step."""
        self._arrived = {}
        self._inbound = {source: _Inbound(self, source, messages) for source, messages in incoming.items()
                         if messages}
        self._source_of = {message: source for source, messages in incoming.items() for message in messages}

    def receive(self, message: Message) -> Any:
        """The value of ``message``, waiting for it if it has not arrived yet."""
        if message in self._arrived:
            return self._arrived.pop(message)
        link = self._inbound[self._source_of[message]]
        while True:
            arrived, value = link.next()
            if arrived == message:
                return value
            self._arrived[arrived] = value

    def deliver_local(self, message: Message, value: Any) -> None:
        """Hand a value to a stage on this same rank."""
        self._arrived[message] = value

    # --- sending ---------------------------------------------------------------------------
    def send(self, destination: int, value: Any, where: str) -> None:
        """Post the sends of ``value`` to ``destination`` (a rank of the group) without waiting."""
        header, data, keep = _encode(value, where)
        peer = self.global_rank(destination)
        works = [dist.isend(header, peer, group=self.group)]
        if data is not None:
            works.append(dist.isend(data, peer, group=self.group))
            self.bytes_sent += data.numel()
        self._pending_sends.append((works, [header, data, *keep]))

    def finish(self) -> None:
        """Wait for this step's sends to complete."""
        for works, _ in self._pending_sends:
            for work in works:
                work.wait()
        self._pending_sends.clear()
        self._inbound = {}
