"""Where a rank's stages live, and how its boundary values travel.

Placement: a given ``device`` wins; otherwise an NCCL group uses the current CUDA device (set
by ``launch``/``run`` to the local rank's GPU), and a gloo group uses ``cuda:<local rank mod GPU
count>`` when CUDA is present (several ranks may share one GPU), else the CPU.

Transport: ``"direct"`` hands tensors to the process group as they are (CPU tensors over gloo,
CUDA tensors over NCCL); ``"host-staged"`` copies CUDA tensors into pinned host memory on a
side stream and sends those over gloo (NCCL refuses two ranks on one GPU, and gloo cannot send
CUDA tensors); ``"sockets"`` joins each pair of CPU ranks on one host by a loopback TCP socket
written and read by the calling thread (sockets.py: no gloo call per message, the large data of
a value excepted). ``"auto"`` picks direct for NCCL, host-staged for CUDA stages on a gloo
group, and sockets for CPU stages when every rank of the group chose them and runs on this host
(else direct; also where the platform lacks what the socket transport needs, e.g. Windows: the
socket transport is imported only when chosen). Both ends of a gloo link see the same bytes
either way, so a host-staged GPU rank and a direct CPU rank talk to each other unchanged.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist

from .comm import DirectTransport
from .staged import HostStagedTransport
from .transport import Transport

__all__ = ["TRANSPORTS", "TransportFactory", "default_device", "choose_transport", "local_rank", "make_transport",
           "sockets_supported"]

TRANSPORTS = ("auto", "direct", "host-staged", "sockets")


def sockets_supported() -> bool:
    """Whether this platform has what the socket transport uses (non-blocking flags, poll)."""
    return hasattr(socket, "MSG_DONTWAIT") and hasattr(select, "poll") and hasattr(select, "POLLIN")


def local_rank(group: dist.ProcessGroup | None = None) -> int:
    """``LOCAL_RANK`` under torchrun, else this process's rank in the default group."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else dist.get_rank()


def default_device(group: dist.ProcessGroup | None) -> torch.device:
    """The device this rank's stages go to when the runner is given none."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank(group) % torch.cuda.device_count())
    return torch.device("cpu")


def choose_transport(requested: str, backend: str, device: torch.device) -> str:
    """Resolve ``requested`` (one of :data:`TRANSPORTS`) to ``"direct"``, ``"host-staged"`` or
    ``"sockets"`` (CPU stages over gloo: sockets when every rank of the group is on one host,
    decided by :func:`make_transport`)."""
    if requested not in TRANSPORTS:
        raise ValueError(f"transport={requested!r} is not one of {TRANSPORTS}")
    if requested == "auto":
        if backend == "nccl":
            return "direct"
        if device.type == "cuda":
            return "host-staged"
        return "sockets" if sockets_supported() else "direct"
    if requested == "sockets" and (backend == "nccl" or device.type != "cpu"):
        raise ValueError("transport='sockets' carries CPU tensors between ranks of a gloo group: use 'auto' "
                         "(or 'host-staged' for CUDA stages over gloo)")
    if requested == "sockets" and not sockets_supported():
        raise ValueError("transport='sockets' needs socket.MSG_DONTWAIT and select.poll, which this platform "
                         "lacks: use 'auto' or 'direct'")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"an NCCL group carries only CUDA tensors, but this rank's stages are on {device}: "
                         "pass device='cuda' or launch with backend='gloo'")
    if requested == "host-staged" and backend == "nccl":
        raise ValueError("transport='host-staged' sends through host memory over gloo, but the group uses NCCL: "
                         "launch with backend='gloo' (conveyor.launch(..., backend='gloo')) or use 'direct'")
    if requested == "direct" and backend != "nccl" and device.type == "cuda":
        raise ValueError(f"gloo cannot send CUDA tensors ({device}): use transport='host-staged' (or 'auto'), "
                         "or an NCCL group with one GPU per rank")
    return requested


_CHOICES = ("direct", "host-staged", "sockets")


TransportFactory = Callable[..., Transport]


def make_transport(requested: str | TransportFactory, group: dist.ProcessGroup | None, device: torch.device, *,
                   timeout: float = 300.0) -> Transport:
    """The transport for this rank: ``requested`` resolved by :func:`choose_transport`, every
    wait bounded by ``timeout`` seconds. Sockets need every rank of the group to choose them and
    to run on one host (agreed collectively); otherwise such ranks use the group's own
    point-to-point ("direct"). A callable ``requested`` is a factory called as
    ``requested(group, device, timeout=timeout)`` (e.g. ``functools.partial(DirectTransport,
    protocol="nccl")``, NCCL's message protocol over gloo, as the CPU tests run it)."""
    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    if callable(requested):
        return requested(group, device, timeout=timeout)
    chosen = choose_transport(requested, dist.get_backend(group), device)
    if dist.get_backend(group) != "nccl":
        mine = torch.tensor([_CHOICES.index(chosen)], dtype=torch.int64)
        everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(everyone, mine, group=group)
        if chosen == "sockets" and all(_CHOICES[int(choice)] == "sockets" for choice in everyone):
            from .socket_mesh import connect_peers  # only here: the socket transport needs POSIX sockets
            from .sockets import SocketTransport

            sockets = connect_peers(group, timeout=timeout)
            if sockets is not None:
                return SocketTransport(group, device, sockets, timeout=timeout)
        if chosen == "sockets":
            chosen = "direct"
    if chosen == "host-staged":
        return HostStagedTransport(group, device, timeout=timeout)
    return DirectTransport(group, device, timeout=timeout)
