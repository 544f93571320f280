"""One trace per job: the lowest rank traces and cuts the model, the other ranks receive the cut.

``torch.export`` is the slow part of splitting (seconds for a small transformer, and every rank
of a job on a shared machine would run it at once). In a job (an initialised process group of
more than one rank) rank 0 runs the whole split and broadcasts, per stage, its graph (node by
node: operators by name, values by reference), the names of the parameters and buffers it
holds, its constants and its input/output handling; every other rank rebuilds the same stage
modules around *its own* model's tensors. The graphs are identical, so the stages compute
exactly what rank 0's would. Outside a process group nothing changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate

__all__ = ["decode_graph", "encode_graph", "in_job", "shared_split"]


class _Ref:
    """A node of the graph, by name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple:
        return _Ref, (self.name,)


class _Op:
    """An operator overload by its qualified name (``aten::add.Tensor``)."""

    __slots__ = ("namespace", "name", "overload")

    def __init__(self, namespace: str, name: str, overload: str) -> None:
        self.namespace, self.name, self.overload = namespace, name, overload

    def __reduce__(self) -> tuple:
        return _Op, (self.namespace, self.name, self.overload)

    def resolve(self) -> Any:
        return getattr(getattr(getattr(torch.ops, self.namespace), self.name), self.overload)


class _HigherOrder:
    """A higher-order operator (``wrap_with_autocast``, ``wrap_with_set_grad_enabled``) by name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple:
        return _HigherOrder, (self.name,)

    def resolve(self) -> Any:
        return getattr(torch.ops.higher_order, self.name)


def _encode_value(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return _Ref(value.name)
    if isinstance(value, torch._ops.OpOverload):
        namespace, _, rest = value.name().partition("::")
        name, _, overload = rest.partition(".")
        return _Op(namespace, name, overload or "default")
    if isinstance(value, torch._ops.HigherOrderOperator):
        return _HigherOrder(value.name())
    return value


def encode_graph(module: fx.GraphModule) -> dict[str, Any]:
    """A picklable description of ``module``'s graph, its code generation and its sub-graphs
    (the bodies of higher-order operators)."""
    nodes = []
    for node in module.graph.nodes:
        nodes.append((node.op, node.name, _encode_value(node.target), map_aggregate(node.args, _encode_value),
                      map_aggregate(node.kwargs, _encode_value)))
    children = {name: encode_graph(child) for name, child in module.named_children()
                if isinstance(child, fx.GraphModule)}
    return {"nodes": nodes, "codegen": module.graph._codegen, "children": children}


def _decode_value(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, _Ref):
        return env[value.name]
    if isinstance(value, (_Op, _HigherOrder)):
        return value.resolve()
    return value


def decode_graph(encoded: dict[str, Any]) -> tuple[fx.Graph, dict[str, fx.GraphModule]]:
    """The graph and the sub-graph modules described by :func:`encode_graph`."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs in encoded["nodes"]:
        decode = lambda value: _decode_value(value, env)  # noqa: E731
        node = graph.create_node(op, decode(target), map_aggregate(args, decode), map_aggregate(kwargs, decode),
                                 name=name)
        env[name] = node
    graph._codegen = encoded["codegen"]
    children = {}
    for name, child in encoded["children"].items():
        child_graph, grandchildren = decode_graph(child)
        root = nn.Module()
        for grandchild_name, grandchild in grandchildren.items():
            root.add_module(grandchild_name, grandchild)
        children[name] = fx.GraphModule(root, child_graph)
    return graph, children


def in_job() -> bool:
    """Whether this process is one of several ranks of an initialised default process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shared_split(split: Callable[[], Any], recipe_of: Callable[[Any], Any], rebuild: Callable[[Any], Any]) -> Any:
    """Rank 0 runs ``split()`` and broadcasts ``recipe_of(result)``; the other ranks return
    ``rebuild(recipe)``. An error on rank 0 is raised on every rank (same type where it can be)."""
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            result = split()
            box[0] = ("ok", recipe_of(result))
        except Exception as error:
            box[0] = ("error", (type(error), str(error)))
            dist.broadcast_object_list(box, src=0)
            raise
        dist.broadcast_object_list(box, src=0)
        return result
    with warnings.catch_warnings():  # unpickling torch's tree specs warns about a deprecated isinstance
        warnings.simplefilter("ignore", FutureWarning)
        dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        kind, message = value
        try:
            error = kind(message)
        except Exception:  # an exception type that cannot be built from its message
            error = RuntimeError(f"rank 0 could not split the model: {kind.__name__}: {message}")
        raise error
    return rebuild(value)
