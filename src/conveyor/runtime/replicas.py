"""Replicated stages: several ranks hold one stage and take its micro-batches round robin.

The replicas start from the first replica's weights and, whenever they update, combine their
gradients by a sum in replica order (gathered on the first replica, sent back to the others), so
every replica gets the same, bit-identical sum and the copies never drift apart. Messages go
point to point on the pipeline's own group with their own tag: replicas of one stage never
exchange pipeline messages, so nothing else is in flight between them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

__all__ = ["ReplicaGroup"]

_TAG = 1


class ReplicaGroup:
    """This rank's replica group for one stage (``ranks``, in replica order)."""

    def __init__(self, ranks: Sequence[int], rank: int, pg: dist.ProcessGroup) -> None:
        self.ranks = list(ranks)
        self.rank = rank
        self.pg = pg

    @property
    def size(self) -> int:
        return len(self.ranks)

    def _sum(self, flat: torch.Tensor) -> torch.Tensor:
        first, others = self.ranks[0], self.ranks[1:]
        if self.rank == first:
            total = flat.clone()
            incoming = torch.empty_like(flat)
            for other in others:
                self.pg.recv([incoming], other, _TAG).wait()
                total += incoming
            for work in [self.pg.send([total], other, _TAG) for other in others]:
                work.wait()
            return total
        self.pg.send([flat], first, _TAG).wait()
        result = torch.empty_like(flat)
        self.pg.recv([result], first, _TAG).wait()
        return result

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient with the sum over the replicas (missing = zero)."""
        parameters = list(parameters)
        if self.size == 1 or not parameters:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        total = self._sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for parameter in parameters:
            count = parameter.numel()
            parameter.grad = total[offset:offset + count].view_as(parameter).clone()
            offset += count

    def sum_value(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a tensor over the replicas."""
        return value if self.size == 1 else self._sum(value.reshape(-1).clone()).view_as(value)

    def align(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copy the first replica's values into every other replica's ``tensors``."""
        tensors = [t for t in tensors if t.numel()]
        if self.size == 1 or not tensors:
            return
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
            if self.rank == self.ranks[0]:
                for work in [self.pg.send([flat], other, _TAG) for other in self.ranks[1:]]:
                    work.wait()
                return
            self.pg.recv([flat], self.ranks[0], _TAG).wait()
            offset = 0
            for tensor in tensors:
                count = tensor.numel()
                tensor.copy_(flat[offset:offset + count].view_as(tensor))
                offset += count
