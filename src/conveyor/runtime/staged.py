"""Host-staged transport: CUDA boundary values travel through pinned host memory over gloo.

Used where NCCL cannot be: several ranks sharing one GPU (NCCL refuses them), or a GPU rank
talking to a CPU rank. On the wire it is a :class:`~conveyor.runtime.comm.DirectTransport` over
gloo with CPU tensors (held, not inherited), so a host-staged rank and a CPU rank interoperate.

Sending ``value`` (device to host)::

    compute stream  --F(m)--|--F(m+1)------------------
    copy stream              \\--D2H into pinned--(event)
    host                      post gloo send when the event has fired (or before blocking)

The copy stream waits on the compute stream, so the copy sees the finished value while the next
action's kernels are already queued behind it. The gloo send is posted once the copy's event has
fired, checked at every later transport call; messages stay in program order per rank, and all
of them are posted before this rank blocks on a receive (so no peer waits on a message held
back here). Receiving: gloo fills pinned host buffers; the host-to-device copy runs on the copy
stream and the compute stream waits on its event, never on ``synchronize()``.

The staging step is a :class:`Stager`: :class:`CudaStager` on GPUs, :class:`CpuStager` (a
copy, optionally reported late) so the same ordering logic runs and is tested on CPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from ..schedule.links import Message
from .bundle import flatten, unflatten
from .comm import DirectTransport
from .transport import Transport

__all__ = ["Stager", "CudaStager", "CpuStager", "HostStagedTransport"]


def _keep_flag(copy: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """The copy as a leaf with the original's requires-grad flag (floating point only)."""
    if original.requires_grad and (copy.is_floating_point() or copy.is_complex()):
        copy.requires_grad_(True)
    return copy


class Stager(ABC):
    """Moves tensors between the compute device and host memory; ``to_host`` returns a ticket
    that :meth:`ready` polls and :meth:`wait` blocks on. Implemented by :class:`CudaStager` (the
    GPU path) and :class:`CpuStager` (the same protocol on CPU, for the tests)."""

    @abstractmethod
    def to_host(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        """Start copying ``tensors`` to host memory: (the host tensors, a ticket)."""

    @abstractmethod
    def ready(self, ticket: Any) -> bool:
        """Whether the copy behind ``ticket`` has finished (never blocks)."""

    @abstractmethod
    def wait(self, ticket: Any) -> None:
        """Block until the copy behind ``ticket`` has finished."""

    @abstractmethod
    def to_device(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Received host tensors on the compute device, ordered before the compute that uses them."""


class CudaStager(Stager):
    """Copies on a side stream of ``device``; device-to-host into pinned buffers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def to_host(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        host = []
        with torch.cuda.stream(self.stream):
            for tensor in tensors:
                if tensor.device.type != "cuda":
                    host.append(tensor)
                    continue
                tensor.record_stream(self.stream)  # its memory stays valid until the copy is done
                pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                pinned.copy_(tensor, non_blocking=True)
                host.append(pinned)
            event = torch.cuda.Event()
            event.record(self.stream)
        return host, event

    def ready(self, ticket: Any) -> bool:
        return bool(ticket.query())

    def wait(self, ticket: Any) -> None:
        ticket.synchronize()  # waits for this one copy only

    def to_device(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            moved = [t.to(self.device, non_blocking=True) for t in tensors]
            event = torch.cuda.Event()
            event.record(self.stream)
        compute.wait_event(event)
        for tensor in moved:
            tensor.record_stream(compute)
        return moved


class CpuStager(Stager):
    """The staging step on CPU: a copy (so values never alias the sender's tensors), reported
    ready only after ``late`` polls, to exercise deferred sends without a GPU."""

    def __init__(self, late: int = 0) -> None:
        self.late = late
        self.copies = 0

    def to_host(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        self.copies += len(tensors)
        return [t.clone() for t in tensors], [self.late]

    def ready(self, ticket: Any) -> bool:
        if ticket[0] <= 0:
            return True
        ticket[0] -= 1
        return False

    def wait(self, ticket: Any) -> None:
        ticket[0] = 0

    def to_device(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return tensors


class HostStagedTransport(Transport):
    """A :class:`~conveyor.runtime.transport.Transport` whose values are staged through host
    memory on both ends and travel over gloo (a :class:`DirectTransport` on the CPU)."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device, stager: Stager | None = None, *,
                 timeout: float = 300.0) -> None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.compute_device = device
        # gloo receives into pinned buffers when the values go on to a GPU
        self.wire = DirectTransport(group, torch.device("cpu"), timeout=timeout, pin_memory=device.type == "cuda")
        self.rank, self.pg, self.device, self.timeout = self.wire.rank, self.wire.pg, self.wire.device, timeout
        self.stager = stager or (CudaStager(device) if device.type == "cuda" else CpuStager())
        self._staging: deque[tuple[int, Message, Any, list[torch.Tensor], Any]] = deque()
        self.deferred = 0  # sends that were not ready at the first poll (for tests and tuning)

    @property
    def bytes_sent(self) -> int:  # type: ignore[override]
        return self.wire.bytes_sent

    @property
    def transfers(self) -> int:  # type: ignore[override]
        return self.wire.transfers

    def expect(self, incoming: dict[int, Iterable[Message]]) -> None:
        self.wire.expect(incoming)

    def send(self, destination: int, message: Message, value: Any) -> None:
        """Start the copy to host now; post the gloo send once the copy has finished."""
        structure, tensors = flatten(value, f"stage {message.stage} {message.kind}")
        with torch.no_grad():
            host, ticket = self.stager.to_host([t.detach() for t in tensors])
        host = [_keep_flag(h.detach(), t) for h, t in zip(host, tensors)]
        self._staging.append((destination, message, structure, host, ticket))
        if not self._post_ready(block=False):
            self.deferred += 1

    def _post_ready(self, *, block: bool) -> bool:
        """Post staged sends in order while their copies are done (all of them if ``block``);
        True if nothing is left waiting."""
        while self._staging:
            destination, message, structure, host, ticket = self._staging[0]
            if block:
                self.stager.wait(ticket)
            elif not self.stager.ready(ticket):
                return False
            self._staging.popleft()
            self.wire.send(destination, message, unflatten(structure, host))
        return True

    def deliver_local(self, message: Message, value: Any) -> None:
        self.wire.deliver_local(message, value)

    def receive(self, message: Message, source: int) -> Any:
        """The value of ``message`` from rank ``source``, on the compute device."""
        self._post_ready(block=not self.wire.has_arrived(message))
        value = self.wire.receive(message, source)
        structure, tensors = flatten(value, f"stage {message.stage} {message.kind}")
        if all(t.device == self.compute_device for t in tensors):
            return value  # handed over in memory by a stage on this rank
        with torch.no_grad():
            moved = self.stager.to_device([t.detach() for t in tensors])
        return unflatten(structure, [_keep_flag(m, t) for m, t in zip(moved, tensors)])

    def flush(self) -> None:
        """Post every staged send now, waiting for the copies still running."""
        self._post_ready(block=True)

    def finish(self) -> None:
        self.flush()
        self.wire.finish()

    def close(self) -> None:
        self._staging.clear()
        self.wire.close()
