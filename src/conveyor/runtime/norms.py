"""Which piece of a gradient a rank counts in the pipeline's global norm.

Every piece of every gradient is counted exactly once over the whole job:

- a plain tensor is whole on each rank that holds the stage, identical across the mesh's data-
  and tensor-parallel dimensions: the rank at coordinate 0 of each of them counts it;
- a DTensor is sharded over some dimensions of its own mesh and replicated over others: each
  shard is counted by the rank at coordinate 0 of the replicated ones (a partial placement is
  first reduced), and, like a plain tensor, only by the ranks at coordinate 0 of the pipeline
  mesh's dimensions the DTensor's mesh does not span (tensor parallelism with conveyor's own
  data-parallel all-reduce: a DTensor on ``mesh["tp"]`` holds the same values on every ``dp``
  coordinate).

Summing the counted pieces' ``|x|^p`` over the whole mesh (or taking their max) gives the norm
of the unsplit model's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .mesh import MeshLayout

__all__ = ["StageSlice", "counted_piece"]

try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - torch < 2.4
    from torch.distributed._tensor import DTensor, Replicate  # type: ignore[no-redef]


@dataclass(frozen=True)
class StageSlice:
    """This rank's place among the ranks holding its stages: per mesh dimension other than the
    pipeline's (of size > 1), the ranks of its group along that dimension and this rank's
    coordinate (``dims``), and that group (``groups``: the norm's sums meet along each)."""

    dims: tuple[tuple[frozenset[int], int], ...] = ()
    groups: tuple[dist.ProcessGroup, ...] = ()

    @classmethod
    def of(cls, layout: MeshLayout | None) -> StageSlice:
        if layout is None:
            return cls()
        mesh, dims, groups = layout.mesh, [], []
        for name in mesh.mesh_dim_names or ():
            if name == layout.pp_dim or mesh[name].size() == 1:
                continue
            group = mesh.get_group(name)
            dims.append((frozenset(dist.get_process_group_ranks(group)), mesh.get_local_rank(name)))
            groups.append(group)
        return cls(tuple(dims), tuple(groups))


def counted_piece(grad: torch.Tensor, where: StageSlice) -> torch.Tensor | None:
    """The local piece of ``grad`` this rank counts in the global norm, or None."""
    spanned: frozenset[int] = frozenset()
    if isinstance(grad, DTensor):
        if any(placement.is_partial() for placement in grad.placements):
            grad = grad.redistribute(grad.device_mesh, [Replicate() if placement.is_partial() else placement
                                                        for placement in grad.placements])
        mesh = grad.device_mesh
        for dim, placement in enumerate(grad.placements):
            if placement.is_replicate() and mesh.get_local_rank(dim) != 0:
                return None
        spanned = frozenset(int(r) for r in mesh.mesh.flatten().tolist())
        grad = grad.to_local()
    for ranks, coordinate in where.dims:
        if coordinate != 0 and not ranks <= spanned:
            return None
    return grad.detach()
