"""Cut a captured (``torch.export``) graph into stage modules that follow the pipeline protocol.

Every compute node goes to the stage its position falls in. A value made in stage ``p`` and last
used in stage ``q > p`` leaves every stage ``p .. q-1`` in its output tuple, so a residual made
in stage 0 and added in stage 2 travels *through* stage 1::

    inputs ─► [stage 0] ─(h, r, mask)─► [stage 1] ─(h', r, mask)─► [stage 2] ─► output
                             r and mask pass through stage 1 untouched ─┘

Parameters and buffers are not values: a stage reads them as attributes under the unsplit
model's names, so a parameter used by two stages (tied weights) is held by both.
"""

from __future__ import annotations

import operator
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from .inputs import CheckedInputs

__all__ = ["Captured", "StageCuts", "assemble_stage", "build_stage", "plan_stages"]

# ops whose train flag was frozen at trace time: they follow the stage's train()/eval() instead
_TRAIN_FLAG_ARG = {
    torch.ops.aten.dropout.default: 2,
    torch.ops.aten.feature_dropout.default: 2,
    torch.ops.aten.alpha_dropout.default: 2,
    torch.ops.aten.feature_alpha_dropout.default: 2,
    torch.ops.aten.batch_norm.default: 5,
}
# asserts about the trace-time device and dtype: the stage may run elsewhere
_DROPPED = {torch.ops.aten._assert_tensor_metadata.default}


def _assign(buffer: torch.Tensor, value: torch.Tensor) -> None:
    """Write a mutated buffer's new value back (export's functional buffer-mutation outputs)."""
    with torch.no_grad():
        buffer.copy_(value)


@dataclass
class Captured:
    """An exported program with what the splitter needs to know about its nodes."""

    program: ExportedProgram
    model: nn.Module
    marker: Any  # the pipe_split op overload
    compute: list[fx.Node] = field(default_factory=list)     # nodes that run, in execution order
    markers: list[int] = field(default_factory=list)         # positions in ``compute`` where a marker cuts
    user_inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)         # user outputs (nodes or constants)
    mutations: list[tuple[fx.Node, str]] = field(default_factory=list)  # (new value, buffer name)
    states: dict[fx.Node, tuple[str, str]] = field(default_factory=dict)  # placeholder -> (kind, name)
    constants: dict[fx.Node, Any] = field(default_factory=dict)
    devices: set[torch.device] = field(default_factory=set)  # devices of the trace, rewritten at run time
    traced_inputs: list[Any] | None = None  # the traced call's arguments, positional then keyword (checked)
    positional_names: list[str] = field(default_factory=list)  # forward's parameters that may be positional
    settings: list[str] = field(default_factory=list)  # options conveyor set for the trace (use_cache=False)

    def __post_init__(self) -> None:
        signature = self.program.graph_signature
        canonical = {id(t): name for name, t in self.model.named_parameters()}
        canonical.update({id(t): name for name, t in self.model.named_buffers()})
        specs = {spec.arg.name: spec for spec in signature.input_specs if hasattr(spec.arg, "name")}
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                spec = specs[node.name]
                if spec.kind == InputKind.USER_INPUT:
                    self.user_inputs.append(node)
                elif spec.kind == InputKind.PARAMETER:
                    self.states[node] = ("parameter", canonical[id(self.model.get_parameter(spec.target))])
                elif spec.kind == InputKind.BUFFER:
                    self.states[node] = ("buffer", canonical[id(self.model.get_buffer(spec.target))])
                elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                    constant = self.program.constants[spec.target]
                    if isinstance(constant, torch.Tensor) and constant.is_meta:
                        raise ValueError(
                            f"{spec.target!r} is a plain tensor attribute (neither parameter nor buffer) made on "
                            "the meta device, so it has no value to run with; register it as a buffer "
                            "(self.register_buffer) so that it is materialised and loaded, or create it on a "
                            "real device")
                    self.constants[node] = constant
                else:
                    raise ValueError(f"the captured forward has an input of kind {spec.kind.name} ({node.name}), which "
                                     "cannot be split across stages; pass a list of stage modules instead")
            elif node.op in ("call_function", "call_module", "call_method"):
                if node.target == self.marker:
                    self.markers.append(len(self.compute))
                elif node.target not in _DROPPED:
                    self.compute.append(node)
            elif node.op == "output":
                results = list(node.args[0])
                for spec, value in zip(signature.output_specs, results):
                    if spec.kind == OutputKind.USER_OUTPUT:
                        self.outputs.append(value)
                    elif spec.kind == OutputKind.BUFFER_MUTATION:
                        self.mutations.append((value, canonical[id(self.model.get_buffer(spec.target))]))
                    else:
                        raise ValueError(f"the captured forward has an output of kind {spec.kind.name} (e.g. it "
                                         "changes an input in place), which cannot be split across stages; "
                                         "avoid in-place changes to inputs or pass a list of stage modules")
        self.position = {node: index for index, node in enumerate(self.compute)}
        self.module_names = {name for name, _ in self.model.named_modules() if name}
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            self.devices.add(tensor.device)
        for node in self.user_inputs:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                self.devices.add(value.device)

    def modules_of(self, node: fx.Node) -> list[str]:
        """The module paths a node was traced inside, outermost first (the root is '')."""
        stack = node.meta.get("nn_module_stack") or {}
        return [path for path, _ in stack.values() if path in self.module_names]


@dataclass
class StageCuts:
    """Which stage runs each node, and the values that leave each stage (the splitter's cut of one
    captured graph; not to be confused with ``planning.search.Plan``, the planner's ranked choices)."""

    n_stages: int
    stage_of: dict[fx.Node, int]
    boundaries: list[list[fx.Node]]  # boundaries[s]: values stage s hands to stage s+1, in graph order


def plan_stages(captured: Captured, cuts: Sequence[int]) -> StageCuts:
    """Assign nodes to stages: ``cuts`` are positions in ``captured.compute`` where a stage starts."""
    n_stages = len(cuts) + 1
    stage_of: dict[fx.Node, int] = {node: 0 for node in captured.user_inputs}
    for node in captured.compute:
        source = node.args[0] if node.target is operator.getitem and node.args else None
        if isinstance(source, fx.Node) and source in stage_of:  # a tuple's items stay with the tuple
            stage_of[node] = stage_of[source]
        else:
            stage_of[node] = bisect_right(cuts, captured.position[node])
    outputs = {value for value in captured.outputs if isinstance(value, fx.Node)}
    mutated = {value for value, _ in captured.mutations}
    boundaries: list[list[fx.Node]] = [[] for _ in range(n_stages - 1)]
    for node in captured.program.graph.nodes:
        if node not in stage_of:
            continue
        made = stage_of[node]
        last = made if node in mutated else 0
        for user in node.users:
            if user in stage_of:
                last = max(last, stage_of[user])
            elif user.op == "output" and node in outputs:
                last = n_stages - 1
        for stage in range(made, last):
            boundaries[stage].append(node)
    return StageCuts(n_stages, stage_of, boundaries)


def _bundle(values: Sequence[Any]) -> Any:
    """One value travels bare, several (or none) as a tuple."""
    return values[0] if len(values) == 1 else tuple(values)


def _owner_and_field(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, field_name = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), field_name


def _attach_state(stage: nn.Module, model: nn.Module, held: set[str]) -> None:
    """Give ``stage`` the parameters and buffers named in ``held`` under their original names.

    A submodule all of whose tensors the stage holds (under their canonical names) is attached
    whole, so its ``reset_parameters`` still initialises a meta-built stage; other tensors are
    registered one by one on plain container modules.
    """
    canonical = {id(t): name for name, t in model.named_parameters()}
    canonical.update({id(t): name for name, t in model.named_buffers()})
    covered: set[str] = set()

    def whole(path: str, module: nn.Module) -> bool:
        tensors = list(module.named_parameters(prefix=path, remove_duplicate=False))
        tensors += list(module.named_buffers(prefix=path, remove_duplicate=False))
        return bool(tensors) and all(canonical.get(id(t)) == name and name in held for name, t in tensors)

    def container(path: str) -> nn.Module:
        current = stage
        for item in path.split(".") if path else []:
            if item not in current._modules:
                current.add_module(item, nn.Module())
            current = current._modules[item]  # type: ignore[assignment]
        return current

    def visit(path: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if whole(child_path, child):
                parent_path, _, item = child_path.rpartition(".")
                container(parent_path).add_module(item, child)
                names = [n for n, _ in child.named_parameters(prefix=child_path, remove_duplicate=False)]
                names += [n for n, _ in child.named_buffers(prefix=child_path, remove_duplicate=False)]
                covered.update(names)
            else:
                visit(child_path, child)

    visit("", model)
    for name in sorted(held - covered, key=list(canonical.values()).index):
        owner, field_name = _owner_and_field(model, name)
        prefix = name.rpartition(".")[0]
        if field_name in owner._parameters:
            container(prefix).register_parameter(field_name, owner._parameters[field_name])
        else:
            persistent = field_name not in owner._non_persistent_buffers_set
            container(prefix).register_buffer(field_name, owner._buffers[field_name], persistent=persistent)


class _StageGraph:
    """Builds the graph of one stage."""

    def __init__(self, captured: Captured, cuts: StageCuts, index: int) -> None:
        self.captured, self.cuts, self.index = captured, cuts, index
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.held: set[str] = set()
        self.attributes: dict[str, Any] = {}
        self._device: fx.Node | None = None
        self._training: fx.Node | None = None

    def value(self, node: fx.Node) -> fx.Node:
        """The stage's node for ``node`` of the captured graph (parameters fetched on first use)."""
        if node in self.env:
            return self.env[node]
        if node.graph is self.graph:  # made here (the device, the training flag)
            return node
        captured = self.captured
        if node in captured.states:
            name = captured.states[node][1]
            self.held.add(name)
            new = self.graph.get_attr(name)
        elif node in captured.constants:
            constant = captured.constants[node]
            name = f"_constant_{len(self.attributes)}"
            self.attributes[name] = constant
            new = self.graph.get_attr(name)
            device = self.device()
            if isinstance(constant, torch.Tensor) and device is not None:
                new = self.graph.call_method("to", (new, device))
        elif node.op == "get_attr":  # a higher-order op's body (no_grad region, autocast, ...)
            self.attributes[str(node.target)] = getattr(captured.program.graph_module, str(node.target))
            new = self.graph.get_attr(str(node.target))
        else:
            raise AssertionError(f"stage {self.index} needs {node.name}, which no earlier stage hands over")
        new.meta = dict(node.meta)
        self.env[node] = new
        return new

    def device(self) -> fx.Node | None:
        """Where the stage runs: the device of its first tensor input (else of a parameter)."""
        if self._device is None:
            anchor = next((self.env[node] for node in self.inputs()
                           if isinstance(node.meta.get("val"), torch.Tensor)), None)
            if anchor is None and self.captured.states:
                anchor = self.value(next(iter(self.captured.states)))
            if anchor is not None:
                self._device = self.graph.call_function(getattr, (anchor, "device"))
        return self._device

    def training(self) -> fx.Node:
        if self._training is None:
            self._training = self.graph.get_attr("training")
        return self._training

    def inputs(self) -> list[fx.Node]:
        return self.captured.user_inputs if self.index == 0 else self.cuts.boundaries[self.index - 1]

    def _rewrite(self, argument: Any) -> Any:
        if isinstance(argument, torch.device) and argument in self.captured.devices:
            device = self.device()
            return argument if device is None else device
        if isinstance(argument, (list, tuple)) and not isinstance(argument, fx.Node):
            items = [self._rewrite(item) for item in argument]
            return type(argument)(items) if isinstance(argument, list) else tuple(items)
        if isinstance(argument, dict):
            return {key: self._rewrite(item) for key, item in argument.items()}
        return argument

    def build(self) -> fx.Graph:
        captured, cuts, graph = self.captured, self.cuts, self.graph
        for node in self.inputs():
            placeholder = graph.placeholder(node.name)
            placeholder.meta = dict(node.meta)
            self.env[node] = placeholder
        for node in captured.compute:
            if cuts.stage_of[node] != self.index:
                continue
            args = self._rewrite(node.args)  # nodes it adds (device, training) come before the copy
            kwargs = self._rewrite(node.kwargs)
            flag = _TRAIN_FLAG_ARG.get(node.target)  # type: ignore[arg-type]
            if flag is not None and len(args) > flag:
                args = (*args[:flag], self.training(), *args[flag + 1:])
            new = graph.create_node(node.op, node.target, fx.map_arg(args, self.value),
                                    fx.map_arg(kwargs, self.value), name=node.name)
            new.meta = dict(node.meta)
            self.env[node] = new
        for value, buffer in captured.mutations:
            if cuts.stage_of.get(value) == self.index:
                self.held.add(buffer)
                graph.call_function(_assign, (graph.get_attr(buffer), self.env[value]))
        last = self.index == cuts.n_stages - 1
        if last:
            results = [self.env[v] if isinstance(v, fx.Node) else v for v in captured.outputs]
            out_spec = captured.program.call_spec.out_spec
        else:
            leaving = cuts.boundaries[self.index]
            results = [self.env[v] for v in leaving]
            out_spec = pytree.tree_structure(_bundle(leaving))
        graph.output(tuple(results))
        if self.index == 0:
            in_spec = captured.program.call_spec.in_spec
            signature = captured.program.module_call_graph[0].signature
            positional = in_spec.child(0).num_children
            names = list(getattr(signature, "forward_arg_names", None) or [])[:positional]
            names += [f"arg_{i}" for i in range(len(names), positional)]
            names += list(in_spec.child(1).context)
            if captured.traced_inputs is not None:
                traced = dict(zip(names, captured.traced_inputs))
                graph._codegen = CheckedInputs(_PyTreeInfo(names, in_spec, out_spec), type(captured.model).__name__,
                                               captured.positional_names, traced)
                return graph
        else:
            in_spec = pytree.tree_structure(((_bundle(self.inputs()),), {}))
            names = ["value"]
        # torch has no public code generator that takes and returns pytrees (torch.export's own
        # unflattened modules use this one); Graph.set_codegen is public. Pinned by
        # tests/test_trace.py::test_stage_modules_take_the_model_signature_and_return_pytrees.
        graph.set_codegen(_PyTreeCodeGen(_PyTreeInfo(names, in_spec, out_spec)))
        return graph


def build_stage(captured: Captured, cuts: StageCuts, index: int) -> tuple[fx.GraphModule, set[str]]:
    """The module of stage ``index`` and the names of the parameters and buffers it holds."""
    builder = _StageGraph(captured, cuts, index)
    graph = builder.build()
    return assemble_stage(captured.model, graph, builder.held, builder.attributes, index), builder.held


def assemble_stage(model: nn.Module, graph: fx.Graph, held: set[str], attributes: dict[str, Any],
                   index: int) -> fx.GraphModule:
    """A stage module running ``graph`` on ``model``'s tensors named in ``held``."""
    empty = fx.Graph()
    empty.output(None)
    stage = fx.GraphModule(nn.Module(), empty, class_name=f"Stage{index}")
    _attach_state(stage, model, held)
    for name, attribute in attributes.items():
        if isinstance(attribute, nn.Module):
            stage.add_module(name, attribute)
        else:
            object.__setattr__(stage, name, attribute)
    stage.graph = graph
    if isinstance(graph._codegen, CheckedInputs):  # the generated forward takes (*args, **kwargs)
        type(stage).forward.__signature__ = graph._codegen.signature()  # type: ignore[attr-defined]
    stage.train(model.training)
    return stage
