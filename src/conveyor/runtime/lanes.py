"""Execution lanes for single-process pipelines: one per rank of the schedule, each a device and
(on CUDA) its own stream, and the in-memory hand-over of boundary values between lanes.

A value produced on lane ``a`` and needed on lane ``b``::

    stream a  --F(s, m)--(event)
    stream b               wait(event) --copy to b's device (non-blocking)-- F(s+1, m)

The consumer waits on the producer's event, not on ``synchronize()``; tensors used by a stream
other than the one that allocated them are marked with ``record_stream`` so the caching
allocator does not reuse their memory early. On CPU there are no streams: the hand-over is a
plain ``.to(device)`` (a no-op on the same device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..schedule.links import Message
from .bundle import flatten, unflatten

__all__ = ["LaneMailbox", "Lanes"]

_NOTHING_TO_SWITCH = contextlib.nullcontext()  # reusable: a CPU lane has no stream to enter


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` detached on ``device``, a leaf with the same requires-grad flag."""
    copy = tensor.detach().to(device, non_blocking=True)
    if tensor.requires_grad and (copy.is_floating_point() or copy.is_complex()):
        copy.requires_grad_(True)
    return copy


class Lanes:
    """The devices (and CUDA streams) of a single-process pipeline, one per schedule rank."""

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.devices = [_with_index(device) for device in devices]
        self.streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for device in self.devices]

    def __len__(self) -> int:
        return len(self.devices)

    def on(self, lane: int) -> contextlib.AbstractContextManager[Any]:
        """Run the body on ``lane``'s device stream (nothing to switch on CPU)."""
        stream = self.streams[lane]
        return _NOTHING_TO_SWITCH if stream is None else self._switched(self.devices[lane], stream)

    @staticmethod
    @contextlib.contextmanager
    def _switched(device: torch.device, stream: torch.cuda.Stream) -> Iterator[None]:
        with torch.cuda.device(device), torch.cuda.stream(stream):
            yield

    def begin(self) -> None:
        """Every lane waits for the work the caller queued before the step (inputs, zero_grad)."""
        for device, stream in zip(self.devices, self.streams):
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(device))

    def end(self) -> None:
        """The caller's streams wait for every lane (gradients ready for the optimizer)."""
        for device, stream in zip(self.devices, self.streams):
            if stream is not None:
                torch.cuda.current_stream(device).wait_stream(stream)

    def mark(self, lane: int) -> torch.cuda.Event | None:
        """An event after everything queued so far on ``lane`` (None on CPU)."""
        stream = self.streams[lane]
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def take(self, value: Any, ready: torch.cuda.Event | None, lane: int) -> Any:
        """``value`` (produced before ``ready``) made usable on ``lane``: its tensors detached,
        on the lane's device, with their requires-grad flags; call inside ``on(lane)``."""
        structure, tensors = flatten(value, "boundary value")
        stream = self.streams[lane]
        if stream is not None and ready is not None:
            stream.wait_event(ready)
        device = self.devices[lane]
        with torch.no_grad():
            moved = [_moved(t, device) for t in tensors]
        if stream is not None:
            for original in tensors:
                if original.device.type == "cuda":
                    original.record_stream(stream)
                    if original.device != device:  # a peer copy also runs on the source device's stream
                        original.record_stream(torch.cuda.current_stream(original.device))
        return unflatten(structure, moved)


class LaneMailbox:
    """How values move for the executor of one lane (``executor.Mover``): a value sent is left in
    a mailbox shared by all lanes with an event after its producer, and taken by its consumer."""

    def __init__(self, lanes: Lanes, lane: int, box: dict[Message, tuple[Any, Any]]) -> None:
        self.lanes = lanes
        self.lane = lane
        self.box = box

    def receive(self, message: Message, source: int) -> Any:
        return self.lanes.take(*self.box.pop(message), self.lane)

    def deliver_local(self, message: Message, value: Any) -> None:
        self.box[message] = (value, self.lanes.mark(self.lane))

    def send(self, destination: int, message: Message, value: Any) -> None:
        self.deliver_local(message, value)


def _with_index(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
