"""The floor: the least a Python pipeline runtime can do, hand-written, as a third contender.

It runs conveyor's program for a schedule (the same actions in the same order) with nothing a
library adds: boundary values are one tensor of a shape known in advance, a message is a
12-byte head (kind, stage, micro-batch) and the tensor's raw bytes on a blocking loopback TCP
socket per rank pair, a message that arrives before it is needed waits in a dictionary, and a
backward calls autograd's engine directly. No checks, no metadata, no traces, no flexibility::

    F:  x = inputs[i] or receive(ACTIVATION of stage - 1, i);  out = stage(x);  send(out)
    B:  g = receive(GRADIENT of stage + 1, i);  engine(out, g);  send(x.grad)
    I:  like B, but only the input's gradient (graph kept);  W: the parameters' gradients

Its step time over the ideal is what the machine leaves for any runtime with these stages:
the benchmark reports conveyor's and torch's times against it as well.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.graph import _engine_run_backward

from conveyor.runtime.sockets import connect_peers
from conveyor.schedule import make_schedule
from conveyor.schedule.actions import BACKWARD, FORWARD, WEIGHT_GRAD, Action

__all__ = ["floor_step"]

_HEAD = struct.Struct("<iii")  # kind (0 activation, 1 gradient), producing stage, micro-batch
_ACTIVATION, _GRADIENT = 0, 1


def _connect() -> dict[int, socket.socket]:
    """A connected blocking loopback socket to every other rank (conveyor's set-up, untimed),
    with no receive timeout: a read here waits until its bytes come."""
    sockets = connect_peers(None)
    if sockets is None:
        raise RuntimeError("the floor pipeline runs its ranks on one host")
    for sock in sockets.values():
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
    return sockets


class _Floor:
    """This rank's share of one program, run with the least work (see the module docstring)."""

    def __init__(self, modules: list[nn.Module], schedule: str, n_microbatches: int,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                 target: torch.Tensor) -> None:
        self.rank = dist.get_rank()
        self.program = make_schedule(schedule, dist.get_world_size(), len(modules), n_microbatches)
        self.actions = self.program.ranks[self.rank]
        self.modules, self.loss_fn, self.last = modules, loss_fn, len(modules) - 1
        self.inputs, self.targets = inputs.chunk(n_microbatches), target.chunk(n_microbatches)
        self.loss_share = 1 / n_microbatches  # each micro-batch's share of the batch loss, as conveyor weighs it
        self.shape = self.inputs[0].shape  # every boundary value has the micro-batch's shape
        self.sockets = _connect()
        self.mailbox: dict[tuple[int, int, int], torch.Tensor] = {}
        self.stash: dict[tuple[int, int], tuple] = {}  # (input, output[, output's gradient])
        self.parameters = {stage: tuple(modules[stage].parameters()) for stage in self.program.stages_of(self.rank)}

    def step(self) -> None:
        for action in self.actions:
            self._run(action)

    def _run(self, action: Action) -> None:
        stage, microbatch = action.stage, action.microbatch
        if action.kind == FORWARD:
            if stage == 0:
                x = self.inputs[microbatch]
            else:
                x = self._receive(_ACTIVATION, stage - 1, microbatch).requires_grad_()
            out = self.modules[stage](x)
            if stage == self.last:
                out = self.loss_fn(out, self.targets[microbatch]) * self.loss_share
            else:
                self._send(_ACTIVATION, stage, microbatch, out.detach(), stage + 1)
            self.stash[stage, microbatch] = (x, out)
            return
        key = (stage, microbatch)
        if action.kind == WEIGHT_GRAD:
            _, out, grad = self.stash.pop(key)
            _engine_run_backward((out,), (grad,), False, False, self.parameters[stage], allow_unreachable=True,
                                 accumulate_grad=True)
            return
        x, out = self.stash.pop(key)
        grad = torch.ones_like(out) if stage == self.last else self._receive(_GRADIENT, stage + 1, microbatch)
        if action.kind == BACKWARD:
            _engine_run_backward((out,), (grad,), False, False, (), allow_unreachable=True, accumulate_grad=True)
        else:  # INPUT_GRAD: the input's gradient only, the graph kept for W
            self.stash[key] = (x, out, grad)
            if stage > 0:
                (x.grad,) = _engine_run_backward((out,), (grad,), True, False, (x,), allow_unreachable=True,
                                                 accumulate_grad=False)
        if stage > 0:
            self._send(_GRADIENT, stage, microbatch, x.grad, stage - 1)

    def _send(self, kind: int, stage: int, microbatch: int, value: torch.Tensor, to_stage: int) -> None:
        destination = self.program.rank_of(to_stage, microbatch)
        if destination == self.rank:
            self.mailbox[kind, stage, microbatch] = value.clone()
            return
        self.sockets[destination].sendmsg([_HEAD.pack(kind, stage, microbatch), value.numpy()])

    def _receive(self, kind: int, stage: int, microbatch: int) -> torch.Tensor:
        key = (kind, stage, microbatch)
        source = self.program.rank_of(stage, microbatch)
        while key not in self.mailbox:
            sock = self.sockets[source]
            arrived = _HEAD.unpack(sock.recv(_HEAD.size, socket.MSG_WAITALL))
            value = torch.empty(self.shape)
            sock.recv_into(memoryview(value.numpy()).cast("B"), 0, socket.MSG_WAITALL)
            self.mailbox[arrived] = value
        return self.mailbox.pop(key)


def floor_step(modules: list[nn.Module], schedule: str, n_microbatches: int,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: torch.Tensor,
               target: torch.Tensor) -> Callable[[], None]:
    """A step function (collective: every rank builds it) running ``modules`` under the floor
    runtime on conveyor's program for ``schedule``; every boundary value has the shape of one
    micro-batch of ``inputs``."""
    return _Floor(modules, schedule, n_microbatches, loss_fn, inputs, target).step
