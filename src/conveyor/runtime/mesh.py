"""Device meshes: ``conveyor.mesh(pp=2, dp=2, tp=2)`` builds one, :class:`MeshLayout` reads one.

A pipeline runs on the mesh's ``pp`` dimension; the other dimensions are data parallel
(``dp``, or torchtitan's ``dp_replicate`` and ``dp_shard``: each coordinate feeds its own shard
of the batch) or tensor parallel (``tp``: every coordinate sees the same batch). The ranks that
hold one stage are the ranks with the same ``pp`` coordinate::

    pp2 x dp2 x tp2 (8 ranks)        stage 0: ranks 0-3        stage 1: ranks 4-7
    rank = pp * 4 + dp * 2 + tp      dp group of rank 5: {5, 7}   tp group of rank 5: {4, 5}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["DATA_DIMS", "TENSOR_DIMS", "MESH_ORDER", "MeshLayout", "mesh"]

DATA_DIMS = ("dp_replicate", "dp_shard", "dp")  # each coordinate feeds its own shard of the batch
TENSOR_DIMS = ("tp",)                           # every coordinate sees the same batch
MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "dp", "tp")  # torchtitan's order, outermost first


def mesh(*, device_type: str | None = None, **sizes: int) -> DeviceMesh:
    """An initialised :class:`DeviceMesh` over the whole job with the named dimensions, e.g.
    ``conveyor.mesh(pp=2, dp=2, tp=2)``; dimensions are ordered ``pp, dp_replicate, dp_shard,
    dp, tp`` (torchtitan's order: ``tp`` innermost, so its ranks are neighbours) whatever the
    keyword order. ``device_type`` defaults to ``"cuda"`` under NCCL, ``"cpu"`` otherwise."""
    if not dist.is_initialized():
        raise RuntimeError("conveyor.mesh needs a process group: call it inside conveyor.launch(...) or "
                           "conveyor.run(...), or after torch.distributed.init_process_group")
    unknown = sorted(set(sizes) - set(MESH_ORDER))
    if unknown:
        raise ValueError(f"unknown mesh dimension(s) {unknown}: conveyor knows {list(MESH_ORDER)}")
    if "pp" not in sizes:
        raise ValueError("the mesh needs a 'pp' dimension (the pipeline's ranks), e.g. conveyor.mesh(pp=2, dp=2)")
    if "dp" in sizes and ("dp_shard" in sizes or "dp_replicate" in sizes):
        raise ValueError("give either dp= or dp_replicate=/dp_shard= (HSDP), not both")
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh dimension {name}={size!r} must be a positive integer")
    names = tuple(name for name in MESH_ORDER if name in sizes)
    shape = tuple(sizes[name] for name in names)
    world = dist.get_world_size()
    total = 1
    for size in shape:
        total *= size
    if total != world:
        described = " x ".join(f"{name}{size}" for name, size in zip(names, shape))
        raise ValueError(f"the mesh {described} has {total} ranks but the job has {world}: make the sizes "
                         f"multiply to {world} (or launch {total} processes)")
    if device_type is None:
        device_type = "cuda" if "nccl" in str(dist.get_backend()).lower() else "cpu"
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


@dataclass
class MeshLayout:
    """What a runner needs from a mesh: the pipeline's group and the data-parallel groups."""

    mesh: DeviceMesh
    pp_dim: str
    pp_group: dist.ProcessGroup
    data_dims: tuple[str, ...]             # data-parallel dimensions of size > 1
    data_groups: tuple[dist.ProcessGroup, ...]
    data_size: int                         # replicas that feed their own shard of the batch
    tensor_size: int

    @classmethod
    def of(cls, device_mesh: DeviceMesh, pp_dim: str = "pp") -> MeshLayout:
        """Check ``device_mesh`` and resolve its groups (every rank calls this)."""
        if not isinstance(device_mesh, DeviceMesh):
            raise TypeError(f"mesh= takes a torch.distributed.device_mesh.DeviceMesh, not {type(device_mesh).__name__}"
                            " (build one with conveyor.mesh(pp=..., dp=...))")
        names = tuple(device_mesh.mesh_dim_names or ())
        if pp_dim not in names:
            raise ValueError(f"the mesh has no dimension {pp_dim!r} (its dimensions: {list(names)}): name the "
                             f"pipeline dimension with pp_dim=, or build the mesh with conveyor.mesh(pp=...)")
        known = {pp_dim, *DATA_DIMS, *TENSOR_DIMS}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"mesh dimension(s) {unknown} are neither the pipeline ({pp_dim!r}), data parallel "
                             f"{list(DATA_DIMS)} nor tensor parallel {list(TENSOR_DIMS)}: conveyor cannot tell "
                             "how they split the batch; rename them or drop them from the mesh")
        sizes = dict(zip(names, device_mesh.mesh.shape))
        data_dims = tuple(name for name in names if name in DATA_DIMS and sizes[name] > 1)
        data_size = 1
        for name in data_dims:
            data_size *= sizes[name]
        tensor_size = 1
        for name in names:
            if name in TENSOR_DIMS:
                tensor_size *= sizes[name]
        return cls(device_mesh, pp_dim, device_mesh.get_group(pp_dim), data_dims,
                   tuple(device_mesh.get_group(name) for name in data_dims), data_size, tensor_size)

    @property
    def pp_size(self) -> int:
        return dist.get_world_size(self.pp_group)

    def describe(self) -> str:
        names = self.mesh.mesh_dim_names or ()
        return " x ".join(f"{name}{size}" for name, size in zip(names, self.mesh.mesh.shape))
