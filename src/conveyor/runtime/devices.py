"""Where a rank's stages live, and how its boundary values travel.

Placement: a given ``device`` wins; otherwise an NCCL group uses the current CUDA device (set
by ``launch``/``run`` to the local rank's GPU), and a gloo group uses ``cuda:<local rank mod GPU
count>`` when CUDA is present (several ranks may share one GPU), else the CPU.

Transport: ``"direct"`` hands tensors to the process group as they are (CPU tensors over gloo,
CUDA tensors over NCCL); ``"host-staged"`` copies CUDA tensors into pinned host memory on a
side stream and sends those over gloo (NCCL refuses two ranks on one GPU, and gloo cannot send
CUDA tensors). ``"auto"`` picks direct for NCCL and for CPU stages, host-staged for CUDA stages
on a gloo group. Both ends of a gloo link see the same bytes either way, so a host-staged GPU
rank and a direct CPU rank talk to each other unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .comm import Transport
from .staged import HostStagedTransport

__all__ = ["TRANSPORTS", "default_device", "choose_transport", "local_rank", "make_transport"]

TRANSPORTS = ("auto", "direct", "host-staged")


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
    """Resolve ``requested`` (one of :data:`TRANSPORTS`) to ``"direct"`` or ``"host-staged"``."""
    if requested not in TRANSPORTS:
        raise ValueError(f"transport={requested!r} is not one of {TRANSPORTS}")
    if requested == "auto":
        return "host-staged" if backend != "nccl" and device.type == "cuda" else "direct"
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


def make_transport(requested: str, group: dist.ProcessGroup | None, device: torch.device) -> Transport:
    """The transport for this rank: ``requested`` resolved by :func:`choose_transport`."""
    if choose_transport(requested, dist.get_backend(group), device) == "host-staged":
        return HostStagedTransport(group, device)
    return Transport(group, device)
