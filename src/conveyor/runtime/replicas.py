"""Replicated stages: several ranks hold one stage and take its micro-batches round robin.

The replicas of a stage form a data-parallel process group (``dist.new_group`` over their
ranks, built by every rank of the job in stage order, as ``new_group`` requires). They start
from the first replica's weights (one broadcast) and, whenever they update, sum their gradients
with all-reduces of flattened buckets (one per dtype and device, at most ``BUCKET_BYTES`` each).
An all-reduce hands every member the same bits, so the copies never drift apart.

A pipeline on a subgroup of the job (``group=``) cannot have the other ranks of the job build
its replica groups; there the sums go point to point through the first replica on the
pipeline's own group (replicas of one stage exchange no pipeline messages, so nothing else is in
flight between them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

__all__ = ["BUCKET_BYTES", "ReplicaGroup", "replica_groups"]

BUCKET_BYTES = 32 * 2**20  # the most gradient bytes flattened into one all-reduce
_TAG = 1


def _buckets(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by dtype and device, in order, at most BUCKET_BYTES a bucket
    (a larger tensor goes alone)."""
    buckets: list[list[int]] = []
    open_bucket: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    for index, tensor in enumerate(tensors):
        key = (tensor.dtype, tensor.device)
        size = tensor.numel() * tensor.element_size()
        bucket, used = open_bucket.get(key, ([], 0))
        if bucket and used + size > BUCKET_BYTES:
            bucket, used = [], 0
        if not bucket:
            buckets.append(bucket)
        bucket.append(index)
        open_bucket[key] = (bucket, used + size)
    return buckets


class ReplicaGroup:
    """This rank's replica group for one stage: ``ranks`` (pipeline ranks, in replica order),
    ``collective`` (the process group of those ranks), or None for the point-to-point fallback
    over ``pg`` (the pipeline's group)."""

    def __init__(self, ranks: Sequence[int], rank: int, pg: dist.ProcessGroup,
                 collective: dist.ProcessGroup | None = None, first_global: int | None = None) -> None:
        self.ranks = list(ranks)
        self.rank = rank
        self.pg = pg
        self.collective = collective
        self.first_global = first_global  # the first replica's rank in the default group

    @property
    def size(self) -> int:
        return len(self.ranks)

    def _sum(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` summed over the replicas (in place under a collective group)."""
        if self.collective is not None:
            dist.all_reduce(flat, group=self.collective)
            return flat
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
        for bucket in _buckets(grads):
            total = self._sum(torch.cat([grads[i].detach().reshape(-1) for i in bucket]))
            offset = 0
            for index in bucket:
                parameter = parameters[index]
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
            for bucket in _buckets(tensors):
                flat = torch.cat([tensors[i].detach().reshape(-1) for i in bucket])
                self._broadcast(flat)
                offset = 0
                for index in bucket:
                    tensor = tensors[index]
                    tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                    offset += tensor.numel()

    def _broadcast(self, flat: torch.Tensor) -> None:
        if self.collective is not None:
            dist.broadcast(flat, self.first_global, group=self.collective)
            return
        if self.rank == self.ranks[0]:
            for work in [self.pg.send([flat], other, _TAG) for other in self.ranks[1:]]:
                work.wait()
            return
        self.pg.recv([flat], self.ranks[0], _TAG).wait()


def replica_groups(replicas: Sequence[Sequence[int]], rank: int, group: dist.ProcessGroup | None,
                   pg: dist.ProcessGroup) -> dict[int, ReplicaGroup]:
    """This rank's :class:`ReplicaGroup` per replicated stage it holds. ``replicas``: per stage,
    the pipeline ranks holding it; ``group``: the pipeline's group (None: the whole job).

    When the pipeline spans the whole job, every rank builds every replicated stage's process
    group in stage order (``dist.new_group`` is collective over the default group)."""
    spans_job = group is None or dist.get_world_size(group) == dist.get_world_size()
    size = dist.get_world_size(group)
    to_global = [dist.get_global_rank(group, r) for r in range(size)] if group is not None else list(range(size))
    out: dict[int, ReplicaGroup] = {}
    for stage, ranks in enumerate(replicas):
        if len(ranks) < 2:
            continue
        global_ranks = [to_global[r] for r in ranks]
        collective = dist.new_group(global_ranks) if spans_job else None
        if rank in ranks:
            out[stage] = ReplicaGroup(ranks, rank, pg, collective, global_ranks[0])
    return out
