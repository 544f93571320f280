"""The first stage's inputs: bound by name and checked against the traced call.

``torch.export`` freezes every argument that is not a tensor (``use_cache=False``,
``return_dict=True``) at its traced value. The first stage of a traced pipe therefore accepts
its inputs as the model does (positionally or by name), fills in an omitted frozen argument
with its traced value, and refuses a call whose frozen argument differs from the traced one,
naming it, instead of silently running with the traced value.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

__all__ = ["CheckedInputs", "same_value"]


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def same_value(given: Any, traced: Any) -> bool:
    """Whether two non-tensor values are the same for the trace (type and value, recursively)."""
    given_leaves, given_spec = pytree.tree_flatten(given)
    traced_leaves, traced_spec = pytree.tree_flatten(traced)
    if given_spec != traced_spec:
        return False
    for a, b in zip(given_leaves, traced_leaves):
        if type(a) is not type(b):
            return False
        try:
            if not bool(a == b):
                return False
        except Exception:  # incomparable values are not the same
            return False
    return True


class CheckedInputs(_PyTreeCodeGen):
    """Code generation for a first stage: ``forward(self, *args, **kwargs)`` binds the call by
    the model's parameter names, fills frozen arguments, checks them, then flattens as export's
    own code does."""

    def __init__(self, info: _PyTreeInfo, model_name: str, positional_names: Sequence[str],
                 traced: dict[str, Any]) -> None:
        super().__init__(info)
        self.model_name = model_name
        self.positional_names = list(positional_names)  # the forward's parameters that may be positional
        self.traced = traced  # every traced argument by name, in the traced call's order
        in_spec = info.in_spec
        self.n_positional = in_spec.child(0).num_children
        self.keyword_names = list(in_spec.child(1).context)
        self.call_names = list(info.orig_args)  # positional (by trace order) then keyword names

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, **_: Any) -> str:
        names = [v.split(":")[0].split("#")[0].strip() for v in free_vars]
        names = [n for n in names if n != "self"]
        head = f"def {self._func_name}(self, *args, **kwargs){maybe_return_annotation}:"
        if not names:
            return head + "\n    self.graph._codegen.bind(args, kwargs)"
        return (head + f"\n    {', '.join(names)}, = fx_pytree.tree_flatten_spec("
                "self.graph._codegen.bind(args, kwargs), self._in_spec)")

    def signature(self) -> inspect.Signature:
        """The stage's forward signature for ``inspect`` (with ``self``): the traced call's names;
        frozen keyword arguments default to their traced values."""
        parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                      for name in ["self", *self.call_names[:self.n_positional]]]
        for name in self.call_names[self.n_positional:]:
            traced = self.traced[name]
            default = inspect.Parameter.empty if _has_tensor(traced) else traced
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default))
        return inspect.Signature(parameters)

    def _traced_as(self, name: str) -> str:
        value = self.traced[name]
        return "a tensor input" if isinstance(value, torch.Tensor) else f"{value!r}"

    def bind(self, args: tuple, kwargs: dict) -> tuple[list, dict]:
        """``(positional, keyword)`` in the traced call's layout, or an error naming the argument."""
        given: dict[str, Any] = {}
        if len(args) > len(self.positional_names):
            raise TypeError(f"{self.model_name}.forward takes at most {len(self.positional_names)} positional "
                            f"arguments ({', '.join(self.positional_names)}), got {len(args)}")
        for name, value in zip(self.positional_names, args):
            given[name] = value
        for name, value in kwargs.items():
            if name in given:
                raise TypeError(f"{self.model_name}.forward got multiple values for argument {name!r}")
            given[name] = value
        for name, value in given.items():
            if name not in self.traced:
                if value is None:
                    continue  # an explicit None for an argument the trace left at its default None
                raise ValueError(f"argument {name!r} was not given when {self.model_name} was traced, so the "
                                 f"pipeline's graph has no input for it; pass {name}=... in example_kwargs "
                                 "(example_args) to conveyor.pipeline, as you pass it here")
        values: dict[str, Any] = {}
        for name in self.call_names:
            traced = self.traced[name]
            if name not in given:
                if _has_tensor(traced):
                    raise TypeError(f"{self.model_name}.forward is missing argument {name!r} (traced as "
                                    f"{self._traced_as(name)})")
                values[name] = traced
                continue
            value = given[name]
            if not _has_tensor(traced):
                if not same_value(value, traced):
                    if name == "use_cache":
                        raise ValueError(
                            f"argument 'use_cache' is {value!r} but {self.model_name} was traced with "
                            f"use_cache={traced!r}: a key/value cache cannot cross pipeline stages; leave use_cache "
                            "out (or False) in forward and step, and call runner.generate(...) to decode with a "
                            "cache on every stage")
                    raise ValueError(
                        f"argument {name!r} is {value!r} but {self.model_name} was traced with {name}={traced!r}; "
                        "the traced graph is fixed for non-tensor arguments. Pass the traced value (or leave it out), "
                        f"or trace again with example_kwargs={{{name!r}: {value!r}}}")
            elif pytree.tree_structure(value) != pytree.tree_structure(traced):
                raise ValueError(f"argument {name!r} does not have the structure it had when {self.model_name} "
                                 f"was traced ({self._traced_as(name)}); pass it as traced, or trace again with it")
            values[name] = value
        positional = [values[name] for name in self.call_names[:self.n_positional]]
        return positional, {name: values[name] for name in self.keyword_names}
