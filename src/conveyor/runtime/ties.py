"""Tied parameters held by several stages (GPT-2's ``wte`` and ``lm_head``): after each step the
stages holding a tie exchange their gradient contributions and all add them in stage order, so
every copy receives the same, bit-identical gradient and the copies never drift apart."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["TiedGradients", "check_ties"]


def check_ties(program: Any, ties: Mapping[str, Sequence[int]]) -> None:
    """Refuse what tied weights across stages cannot run under (``program``: a validated
    :class:`~conveyor.schedule.Schedule`): schedules that update each stage on its own (the
    copies would drift apart) and replicated stages. The runner and the planner both call it."""
    if not ties:
        return
    if program.is_streaming:
        raise ValueError(f"schedule {program.name!r} updates each stage on its own, so tied weights "
                         "across stages would drift apart: untie them or use a synchronous schedule")
    if any(len(group) > 1 for group in program.replicas):
        raise ValueError("replicated stages with tied weights are not supported: untie them or drop replicas")


class TiedGradients:
    """The ties of one rank: for each tied name, this rank's parameter and the other holders.

    Gradients travel point-to-point on the pipeline's group after every program message of
    the step, so both ends match them in order without tags.
    """

    def __init__(self, ties: Mapping[str, Sequence[int]], placement: Sequence[int], rank: int,
                 parameters: Mapping[str, nn.Parameter], group: dist.ProcessGroup | None,
                 through_host: bool = False) -> None:
        self.group = group
        self.through_host = through_host  # gloo with CUDA parameters: exchange CPU copies
        self.rank = rank
        self._ties: list[tuple[str, nn.Parameter, list[int]]] = []
        for name, stages in sorted(ties.items()):
            holders = sorted({placement[stage] for stage in stages})
            if rank in holders and len(holders) > 1:
                self._ties.append((name, parameters[name], holders))
        self._previous: dict[str, torch.Tensor | None] = {}
        self._host: dict[tuple[str, int], torch.Tensor] = {}  # reused host buffers (through_host)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self._ties]

    def align_values(self) -> None:
        """Give every copy of a tied parameter the values of its lowest-ranked holder (copies
        initialised separately, e.g. after materialising a meta-device model, start equal)."""
        pending = []
        for _, parameter, holders in self._ties:
            source = holders[0]
            if self.rank == source:
                pending += [dist.isend(self._wire(parameter.detach()), self._global(peer), group=self.group)
                            for peer in holders[1:]]
            else:
                buffer = torch.empty(parameter.shape, dtype=parameter.dtype,
                                     device="cpu" if self.through_host else parameter.device)
                dist.irecv(buffer, self._global(source), group=self.group).wait()
                with torch.no_grad():
                    parameter.copy_(buffer)
        for work in pending:
            work.wait()

    def before_step(self) -> None:
        """Set aside accumulated gradients so the step's own contribution can be isolated."""
        self._previous = {}
        for name, parameter, _ in self._ties:
            self._previous[name] = parameter.grad
            parameter.grad = None

    def after_step(self) -> None:
        """Exchange this step's contributions and give every copy their sum (in rank order)."""
        pending = []
        received: dict[tuple[str, int], torch.Tensor] = {}
        for name, parameter, holders in self._ties:
            mine = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            parameter.grad = mine
            outgoing = self._wire(mine, (name, self.rank))  # one host copy, sent to every peer
            for peer in holders:
                if peer == self.rank:
                    continue
                buffer = self._host_buffer((name, peer), mine) if self.through_host else torch.empty_like(outgoing)
                received[(name, peer)] = buffer
                pending.append(dist.P2POp(dist.isend, outgoing, self._global(peer), group=self.group))
                pending.append(dist.P2POp(dist.irecv, buffer, self._global(peer), group=self.group))
        if pending and dist.get_backend(self.group) == "nccl":  # both directions at once, as one group
            pending = dist.batch_isend_irecv(pending)
        else:
            pending = [op.op(op.tensor, op.peer, op.group) for op in pending]
        for work in pending:
            work.wait()
        for name, parameter, holders in self._ties:
            total = None
            for holder in holders:
                part = (parameter.grad if holder == self.rank
                        else received[(name, holder)].to(parameter.device))  # the buffer is reused: no async copy
                total = part.clone() if total is None else total + part
            previous = self._previous.get(name)
            parameter.grad = total if previous is None else previous + total

    def _wire(self, tensor: torch.Tensor, key: tuple[str, int] | None = None) -> torch.Tensor:
        """What goes on the wire: the tensor itself, or (gloo with CUDA parameters) its copy in a
        host buffer kept for ``key`` (pinned, so the copy runs at full speed and is reused)."""
        if not self.through_host:
            return tensor.contiguous()
        if key is None or not tensor.is_cuda:
            return tensor.cpu().contiguous()
        host = self._host_buffer(key, tensor)
        host.copy_(tensor)  # into pinned memory: a direct DMA copy, synchronous
        return host

    def _host_buffer(self, key: tuple[str, int], like: torch.Tensor) -> torch.Tensor:
        buffer = self._host.get(key)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)
            self._host[key] = buffer
        return buffer

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)
