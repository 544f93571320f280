"""Point-to-point transport: tensor bundles with a header, receives posted ahead by threads.

Every message starts with a fixed-size header (the value's structure, the shape, dtype and
requires-grad flag of each tensor). Small values ride inside the header; larger ones follow as
one flat byte buffer holding all the tensors (a lone contiguous tensor is sent as it is). Because the receiver reads
shapes from the header, shapes may change from one step to the next.

For each inbound link a thread walks the list of messages the program says will arrive on it
(``schedule.links``) and receives them in that order, so receives are always posted before
they are needed and no point-to-point tags are used. Arrived values wait in a mailbox.
"""

from __future__ import annotations

import pickle
import threading
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

    Small values travel inside the fixed-size header (one transfer); larger ones in a second,
    flat buffer (a lone contiguous tensor is sent as it is, without a copy).
    """
    structure, originals = flatten(value, where)
    specs = [(tuple(t.shape), t.dtype, t.requires_grad) for t in originals]
    tensors = [t.detach().contiguous() for t in originals]
    sizes = [t.numel() * t.element_size() for t in tensors]
    meta = pickle.dumps((structure, specs), protocol=pickle.HIGHEST_PROTOCOL)
    if _PREFIX + len(meta) > HEADER_BYTES:
        raise ValueError(f"{where} has too many tensors ({len(tensors)}) to describe in one header; "
                         "merge them into fewer tensors")
    header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
    start = _pad(_PREFIX + len(meta))
    packed = sum(_pad(size) for size in sizes)
    inline = all(t.device.type == "cpu" for t in tensors) and start + packed <= HEADER_BYTES
    header[:_PREFIX] = torch.tensor([len(meta), int(inline)], dtype=torch.int64).view(torch.uint8)
    header[_PREFIX:_PREFIX + len(meta)] = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
    if inline:
        _pack(tensors, sizes, header[start:])
        return header, None, []
    if not packed:
        return header, None, []
    if len(tensors) == 1:
        return header, tensors[0].reshape(-1).view(torch.uint8), tensors
    data = torch.empty(packed, dtype=torch.uint8, device=tensors[0].device)
    _pack(tensors, sizes, data)
    return header, data, tensors


def _pack(tensors: list[torch.Tensor], sizes: list[int], into: torch.Tensor) -> None:
    offset = 0
    for tensor, size in zip(tensors, sizes):
        if size:
            into[offset:offset + size].copy_(tensor.reshape(-1).view(torch.uint8))
        offset += _pad(size)


def _decode_header(header: torch.Tensor) -> tuple[Any, list, torch.Tensor | None, int]:
    """(structure, specs, inline data or None, bytes of the separate data buffer)."""
    length, inline = header[:_PREFIX].view(torch.int64).tolist()
    structure, specs = pickle.loads(header[_PREFIX:_PREFIX + length].numpy().tobytes())
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
            tensor = data[offset:offset + size].view(dtype).view(shape).to(device)
        offset += _pad(size)
        if requires_grad and tensor.is_floating_point():
            tensor.requires_grad_(True)
        tensors.append(tensor)
    return unflatten(structure, tensors)


class _Mailbox:
    """Values that have arrived, keyed by message; readers block until theirs arrives."""

    def __init__(self) -> None:
        self._values: dict[Message, Any] = {}
        self._failure: BaseException | None = None
        self._condition = threading.Condition()

    def put(self, message: Message, value: Any) -> None:
        with self._condition:
            self._values[message] = value
            self._condition.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._condition:
            self._failure = error
            self._condition.notify_all()

    def take(self, message: Message, timeout: float) -> Any:
        with self._condition:
            ready = self._condition.wait_for(lambda: message in self._values or self._failure is not None,
                                             timeout=timeout)
            if message in self._values:
                return self._values.pop(message)
            if self._failure is not None:
                raise self._failure
            assert not ready
            raise TimeoutError(f"{message} did not arrive within {timeout:g} s")


class Transport:
    """Sends and receives boundary values for one rank of a pipeline group."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device, timeout: float) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.device = device
        self.timeout = timeout
        self._mailbox = _Mailbox()
        self._pending_sends: list[tuple[Any, list[torch.Tensor]]] = []
        self._threads: list[threading.Thread] = []
        self.bytes_sent = 0

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    # --- receiving ---------------------------------------------------------------------------
    def expect(self, incoming: dict[int, list[Message]]) -> None:
        """Start one receiving thread per source rank for this step's inbound messages."""
        self._mailbox = _Mailbox()
        self._threads = [
            threading.Thread(target=self._receive_all, args=(source, messages), daemon=True,
                             name=f"conveyor-recv-from-{source}")
            for source, messages in incoming.items() if messages
        ]
        for thread in self._threads:
            thread.start()

    def _receive_all(self, source: int, messages: list[Message]) -> None:
        peer = self._global(source)
        message = messages[0]
        try:
            for message in messages:
                header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
                dist.recv(header, peer, group=self.group)
                structure, specs, data, total = _decode_header(header)
                if total:
                    data = torch.empty(total, dtype=torch.uint8, device=self.device)
                    dist.recv(data, peer, group=self.group)
                self._mailbox.put(message, _decode_data(structure, specs, data, self.device))
        except BaseException as error:  # noqa: BLE001 - surfaced to the compute thread
            lost = PeerLostError(f"receiving {message.kind} of stage {message.stage} from rank {source} "
                                 f"failed: {error}", rank=self.rank, stage=message.target_stage,
                                 microbatch=message.microbatch)
            self._mailbox.fail(lost)

    def receive(self, message: Message) -> Any:
        """The value of ``message``, waiting for it if it has not arrived yet."""
        try:
            return self._mailbox.take(message, self.timeout)
        except TimeoutError:
            raise PeerLostError(f"no {message.kind} from stage {message.stage} within {self.timeout:g} s "
                                "(a peer is stuck or gone; raise the runner's timeout if it is only slow)",
                                rank=self.rank, stage=message.target_stage, microbatch=message.microbatch) from None

    def deliver_local(self, message: Message, value: Any) -> None:
        """Hand a value to a stage on this same rank."""
        self._mailbox.put(message, value)

    # --- sending ---------------------------------------------------------------------------
    def send(self, destination: int, value: Any, where: str) -> None:
        """Post the sends of ``value`` to ``destination`` (a rank of the group) without waiting."""
        header, data, keep = _encode(value, where)
        peer = self._global(destination)
        works = [dist.isend(header, peer, group=self.group)]
        if data is not None:
            works.append(dist.isend(data, peer, group=self.group))
            self.bytes_sent += data.numel()
        self._pending_sends.append((works, [header, data, *keep]))

    def finish(self) -> None:
        """Wait for this step's sends to complete and its receiving threads to end."""
        for works, _ in self._pending_sends:
            for work in works:
                work.wait()
        self._pending_sends.clear()
        for thread in self._threads:
            thread.join(self.timeout)
        self._threads = []
