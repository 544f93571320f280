"""Values that cross a stage boundary, flattened into tensors plus a picklable structure.

A boundary value may be a tensor or any nesting of tuples, lists, dicts and typed records (dict subclasses such as
``ModelOutput``, dataclasses: rebuilt with their type) of tensors, with
``None``, numbers and strings travelling as constants. Tensors may be of any dtype (integer
ids, bool masks) and need not require grad.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["Leaf", "Record", "flatten", "unflatten", "describe"]

_CONSTANTS = (type(None), bool, int, float, str)


class Record:
    """The structure of a typed record (a dict subclass such as a Hugging Face ``ModelOutput``,
    or a dataclass): its class and its fields' structures, rebuilt as ``cls(**fields)``."""

    __slots__ = ("cls", "fields")

    def __init__(self, cls: type, fields: dict[str, Any]) -> None:
        self.cls, self.fields = cls, fields

    def __reduce__(self) -> tuple:
        return Record, (self.cls, self.fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and other.cls is self.cls and other.fields == self.fields

    def __hash__(self) -> int:
        return hash((self.cls, tuple(self.fields)))

    def __repr__(self) -> str:
        return f"Record({self.cls.__name__}, {self.fields!r})"

    def build(self, values: dict[str, Any]) -> Any:
        if all(isinstance(key, str) for key in values):
            return self.cls(**values)
        return self.cls(values)


def _record_items(item: Any) -> dict[str, Any] | None:
    """The fields of a typed record, or None if ``item`` is not one."""
    if isinstance(item, dict):
        return dict(item.items())
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return {f.name: getattr(item, f.name) for f in dataclasses.fields(item) if f.init}
    return None


class Leaf:
    """Placeholder for the ``index``-th tensor of a flattened value (cheap to pickle)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple:
        return Leaf, (self.index,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Leaf) and other.index == self.index

    def __hash__(self) -> int:
        return hash(self.index)

    def __repr__(self) -> str:
        return f"Leaf({self.index})"


_LEAVES = [Leaf(index) for index in range(64)]  # placeholders are immutable: the first ones are shared


def _leaf(index: int) -> Leaf:
    return _LEAVES[index] if index < len(_LEAVES) else Leaf(index)


def flatten(value: Any, where: str = "boundary value") -> tuple[Any, list[torch.Tensor]]:
    """Split ``value`` into (structure with :class:`Leaf` placeholders, list of tensors).

    A plain recursive function, not a closure: a closure referring to itself would form a
    reference cycle holding the tensors (and their autograd graphs) until the garbage collector
    ran, which defeated re-materialisation. A bare tensor, the usual boundary value, takes no
    recursion.
    """
    if isinstance(value, torch.Tensor):
        return _LEAVES[0], [value]
    tensors: list[torch.Tensor] = []
    try:
        return _visit(value, tensors), tensors
    except _Unsupported:
        path, item = _find_unsupported(value, "output")
        raise TypeError(
            f"{where} contains a {type(item).__name__} at {path}: only tensors (in tuples, lists and "
            "dicts) and constants (None, numbers, strings) can cross a stage boundary; return tensors"
        ) from None


class _Unsupported(Exception):
    pass


def _visit(item: Any, tensors: list[torch.Tensor]) -> Any:
    # runs on every boundary crossing, so it builds no path strings: _find_unsupported names the culprit
    if isinstance(item, torch.Tensor):
        tensors.append(item)
        return _leaf(len(tensors) - 1)
    if isinstance(item, _CONSTANTS):
        return item
    if isinstance(item, tuple):
        items = [_visit(x, tensors) for x in item]
        return type(item)(*items) if hasattr(item, "_fields") else tuple(items)
    if isinstance(item, list):
        return [_visit(x, tensors) for x in item]
    if type(item) is dict:
        return {key: _visit(x, tensors) for key, x in item.items()}
    fields = _record_items(item)
    if fields is not None:  # a dict subclass (ModelOutput) or a dataclass keeps its type
        return Record(type(item), {key: _visit(x, tensors) for key, x in fields.items()})
    raise _Unsupported


def _find_unsupported(item: Any, path: str) -> tuple[str, Any]:
    """(path, item) of the first value in ``item`` that cannot cross a boundary, or ("", None)."""
    if isinstance(item, (tuple, list)):
        children = [(f"{path}[{i}]", x) for i, x in enumerate(item)]
    elif isinstance(item, (torch.Tensor, *_CONSTANTS)):
        return "", None
    elif _record_items(item) is not None:
        children = [(f"{path}[{key!r}]", x) for key, x in (_record_items(item) or {}).items()]
    else:
        return path, item
    for child_path, child in children:
        found = _find_unsupported(child, child_path)
        if found[0]:
            return found
    return "", None


def detached_leaves(value: Any, where: str) -> tuple[Any, list[torch.Tensor]]:
    """``value`` with every tensor detached into a fresh leaf that keeps its requires-grad flag
    (floating point only), and the list of those leaves."""
    structure, tensors = flatten(value, where)
    leaves = [t.detach().requires_grad_() if t.requires_grad else t.detach() for t in tensors]
    return unflatten(structure, leaves), leaves


def unflatten(structure: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(structure, Leaf):
        return tensors[structure.index]
    if isinstance(structure, tuple):
        items = [unflatten(x, tensors) for x in structure]
        return type(structure)(*items) if hasattr(structure, "_fields") else tuple(items)
    if isinstance(structure, list):
        return [unflatten(x, tensors) for x in structure]
    if isinstance(structure, dict):
        return {key: unflatten(x, tensors) for key, x in structure.items()}
    if isinstance(structure, Record):
        return structure.build({key: unflatten(x, tensors) for key, x in structure.fields.items()})
    return structure


def describe(value: Any) -> str:
    """A short description of the tensors in a value: ``[float32(4, 16), int64(4,)]``."""
    try:
        _, tensors = flatten(value)
    except TypeError:
        return type(value).__name__
    return "[" + ", ".join(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}" for t in tensors) + "]"
