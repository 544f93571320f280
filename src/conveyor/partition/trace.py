"""Any ``nn.Module``: capture its forward with ``torch.export`` (non-strict) and cut the graph.

::

    pipeline(model, split_points=["layers.2"], example_args=(x,))        cut before layers.2
    pipeline(model, split_points={"layers.1": "end"}, example_args=(x,)) cut after layers.1
    pipeline(model, n_stages=4, example_args=(x,))                       balanced among the blocks
    def forward(self, x): ...; conveyor.pipe_split(); ...                cut where the marker runs

Why ``torch.export`` and not ``torch.fx.symbolic_trace``: see docs/splitting.md.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..errors import ConveyorError
from .balance import _ALONE, decide_on_rank_zero, partition_min_max, partition_ranges, union_costs
from .graph_split import Captured, StageCuts, assemble_stage, build_stage, plan_stages
from .pipe import ALIASES, Pipe, is_meta, state_aliases
from .profile import profile_times
from .shipping import decode_graph, encode_graph, in_job, shared_split

__all__ = ["TraceError", "TracedPipe", "capture", "from_traced", "pipe_split"]

_LIBRARY = torch.library.Library("conveyor", "DEF")
_LIBRARY.define("pipe_split() -> ()")


@torch.library.impl(_LIBRARY, "pipe_split", "BackendSelect")
def _pipe_split_eager() -> None:
    return None


@torch.library.register_fake("conveyor::pipe_split")
def _pipe_split_fake() -> None:
    return None


_PIPE_SPLIT = torch.ops.conveyor.pipe_split.default
fx.node.has_side_effect(_PIPE_SPLIT)


def pipe_split() -> None:
    """Mark a stage boundary inside a ``forward``: ``conveyor.pipeline`` cuts the traced graph
    where the call runs. Run eagerly, it does nothing."""
    _PIPE_SPLIT()


class TraceError(ConveyorError):
    """The model's forward could not be captured as a graph."""


def _as_args(example_args: Any) -> tuple:
    if example_args is None:
        return ()
    return example_args if isinstance(example_args, tuple) else (example_args,)


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Every dimension of every tensor input may vary (``Dim.AUTO``): micro-batches are smaller
    than a batch and sequence lengths change; export keeps the dimensions the model fixes."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as error:
        raise TraceError(f"the example inputs do not fit {type(model).__name__}.forward"
                         f"{inspect.signature(model.forward)}: {error}; pass example_args and example_kwargs "
                         "as you would call the model") from None
    return {name: pytree.tree_map(lambda v: {d: Dim.AUTO for d in range(v.dim())}
                                  if isinstance(v, torch.Tensor) else None, value)
            for name, value in bound.arguments.items()}


def _switch_off_cache(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """Set ``use_cache=False`` where ``model.forward`` has that option and the caller left it
    out: a key/value cache object cannot cross a stage boundary (nor be captured by export).
    Returns the settings made, for the pipe's summary."""
    try:
        parameters = inspect.signature(model.forward).parameters
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return []
    if "use_cache" in parameters and "use_cache" not in bound:
        kwargs["use_cache"] = False
        return ["use_cache=False"]
    return []


def _hints(model: nn.Module, error: BaseException) -> list[str]:
    """The usual fixes for a model's construct that export cannot capture."""
    text = f"{type(error).__name__}: {error}"
    config = getattr(model, "config", None)
    hints = []
    if "Cache" in text or "past_key_values" in text:
        hints.append("pass example_kwargs={'use_cache': False} (a key/value cache cannot be captured; "
                     "conveyor sets it when forward has a use_cache option, see docs/splitting.md)")
    if config is not None and any(getattr(config, name, 0) for name in ("layerdrop", "encoder_layerdrop",
                                                                        "decoder_layerdrop")):
        hints.append("set layerdrop=0 in the config (randomly skipped layers are data-dependent control flow)")
    if config is not None and (getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)):
        hints.append("use an experts implementation that traces: model.set_experts_implementation('batched_mm') "
                     "or experts_implementation='batched_mm' in the config")
    return hints


def capture(model: nn.Module, example_args: Any, example_kwargs: dict | None) -> Captured:
    """Export ``model`` (non-strict) on the example inputs, with dynamic dimensions."""
    name = type(model).__name__
    args, kwargs = _as_args(example_args), dict(example_kwargs or {})
    if not args and not kwargs:
        raise ValueError(f"tracing {name} needs example inputs: pass example_args=(inputs,) (and example_kwargs="
                         "{...}) as you will pass them to runner.step(); or pass a list of stage modules")
    settings = _switch_off_cache(model, args, kwargs)
    if is_meta(model):  # only shapes matter to the trace; meta inputs keep it off real storage
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
    dynamic = _dynamic_shapes(model, args, kwargs)
    try:
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as error:
        text = str(error).strip().splitlines()
        summary = " ".join(text[:3]) if text else ""
        hints = _hints(model, error)
        usual = "".join(f"\n  - {hint}" for hint in hints)
        raise TraceError(
            f"torch.export could not capture {name}.forward: {type(error).__name__}: {summary}\n"
            "How to fix: pass example_args=(...) and example_kwargs={...} exactly as the model is called "
            "(real tensors of a micro-batch); avoid Python control flow that depends on tensor values; or "
            "cut the model yourself: pass a list of stage modules to conveyor.pipeline, or place "
            "conveyor.pipe_split() markers in a forward that export can capture"
            + (f"\nUsual fixes for {name}:{usual}" if usual else "")
        ) from error
    captured = Captured(program, model, _PIPE_SPLIT)
    captured.settings = settings
    captured.traced_inputs = [*args, *kwargs.values()]
    captured.positional_names = [p.name for p in inspect.signature(model.forward).parameters.values()
                                 if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                               inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for node in captured.user_inputs[:1]:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() > 0 and isinstance(value.shape[0], int):
            warnings.warn(f"the traced graph of {name} fixed the batch size at {value.shape[0]}: every micro-batch "
                          "must have that many rows (example inputs with 1 row fix it; pass at least 2)",
                          stacklevel=3)
    return captured


def _spans(captured: Captured) -> dict[str, tuple[int, int]]:
    """For each module that runs: positions of its first and last node."""
    spans: dict[str, tuple[int, int]] = {}
    for node in captured.compute:
        position = captured.position[node]
        for path in captured.modules_of(node):
            first, last = spans.get(path, (position, position))
            spans[path] = (min(first, position), max(last, position))
    return spans


def _split_point_cuts(captured: Captured, split_points: Any) -> list[tuple[int, str]]:
    model = captured.model
    if isinstance(split_points, str):
        split_points = [split_points]
    if isinstance(split_points, dict):
        items = list(split_points.items())
    elif isinstance(split_points, (list, tuple)):
        items = [(name, "beginning") for name in split_points]
    else:
        raise TypeError(f"split_points is a {type(split_points).__name__}: pass a list of module names (cut "
                        "before each) or a dict {name: 'beginning' | 'end'}")
    names = [name for name, _ in model.named_modules() if name]
    spans = _spans(captured)
    cuts: list[tuple[int, str]] = []
    for name, where in items:
        if where not in ("beginning", "end"):
            raise ValueError(f"split point {name!r}: {where!r} is neither 'beginning' (cut before the module) "
                             "nor 'end' (cut after it)")
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"split point {name!r} is not a submodule of {type(model).__name__}{hint} "
                             "(split points are names from model.named_modules())")
        if name not in spans:
            raise ValueError(f"split point {name!r} never runs in {type(model).__name__}.forward on the example "
                             "inputs, so there is no place to cut; choose a module that runs")
        first, last = spans[name]
        cuts.append((first if where == "beginning" else last + 1, f"the {where} of {name}"))
    for (before, what_before), (after, what_after) in zip(cuts, cuts[1:]):
        if after <= before:
            raise ValueError(f"split points are out of execution order: {what_after} does not come after "
                             f"{what_before} in the forward; list split points in the order the forward runs them")
    return cuts


def _check_cuts(captured: Captured, cuts: list[tuple[int, str]]) -> list[int]:
    cuts = sorted(cuts)
    size = len(captured.compute)
    for (before, what_before), (after, what_after) in zip(cuts, cuts[1:]):
        if after == before:
            raise ValueError(f"{what_before} and {what_after} cut at the same place, which would leave an empty "
                             "stage; drop one of them")
    if cuts and cuts[0][0] <= 0:
        raise ValueError(f"stage 0 would be empty: nothing runs before {cuts[0][1]}; drop that split point")
    if cuts and cuts[-1][0] >= size:
        raise ValueError(f"the last stage would be empty: nothing runs after {cuts[-1][1]}; drop that split point")
    return [position for position, _ in cuts]


def _blocks(captured: Captured) -> tuple[str, list[str]]:
    """The repeated blocks to cut among, in execution order: the children of every ModuleList (or
    Sequential) of repeated blocks that is not inside another one and holds at least a tenth of
    the parameters of the biggest (so T5's and BART's encoder and decoder blocks, or a vision and
    a text tower, are all cut among); else the model's top-level children."""
    spans = _spans(captured)
    containers = [(name, module) for name, module in captured.model.named_modules()
                  if name and isinstance(module, (nn.ModuleList, nn.Sequential))]
    sizes = {name: sum(p.numel() for p in module.parameters()) for name, module in containers}
    ranked = sorted(containers, key=lambda item: (sizes[item[0]], len(item[1])), reverse=True)
    chosen: list[tuple[str, list[str]]] = []
    for name, module in ranked:
        if chosen and sizes[name] < 0.1 * sizes[chosen[0][0]]:
            break
        if any(name.startswith(other + ".") for other, _ in chosen):
            continue  # the layers inside a block
        blocks = [f"{name}.{child}" for child in module._modules if f"{name}.{child}" in spans]
        if len(blocks) >= 2:
            chosen.append((name, blocks))
    if chosen:
        blocks = sorted((b for _, bs in chosen for b in bs), key=lambda b: spans[b][0])
        names = " and ".join(name for name, _ in sorted(chosen, key=lambda item: spans[item[1][0]][0]))
        return f"the {len(blocks)} blocks of {names}", blocks
    children = [name for name, _ in captured.model.named_children() if name in spans]
    return f"the {len(children)} top-level children", sorted(children, key=lambda b: spans[b][0])


def _parameter_numel(captured: Captured, cuts: StageCuts) -> list[dict[str, int]]:
    """Per stage: the parameters its nodes use, with their sizes."""
    used: list[dict[str, int]] = [{} for _ in range(cuts.n_stages)]
    for node in captured.compute:
        for argument in node.all_input_nodes:
            kind_name = captured.states.get(argument)
            if kind_name is not None and kind_name[0] == "parameter":
                used[cuts.stage_of[node]][kind_name[1]] = captured.model.get_parameter(kind_name[1]).numel()
    return used


def _labels(captured: Captured, cuts: StageCuts, depth: int) -> list[str]:
    """Per stage: its first and last module (paths cut to ``depth`` components)."""
    seen: list[dict[str, None]] = [{} for _ in range(cuts.n_stages)]
    for node in captured.compute:
        paths = [p for p in captured.modules_of(node) if p.count(".") < depth]
        if paths:
            seen[cuts.stage_of[node]][paths[-1]] = None
    labels = []
    for paths in seen:
        leaves = [p for p in paths if not any(q.startswith(p + ".") for q in paths)]
        if not leaves:
            labels.append("(no module)")
        else:
            labels.append(leaves[0] if len(leaves) == 1 else f"{leaves[0]} .. {leaves[-1]}")
    return labels


def _describe(node: fx.Node) -> str:
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}({', '.join(str(d) for d in value.shape)})"
    if isinstance(value, torch.SymInt) or isinstance(value, int):
        return "int"
    return type(value).__name__


class TracedPipe(Pipe):
    """A :class:`Pipe` cut from a traced graph; ``ties`` maps each parameter held by several
    stages to those stages (their gradients must be summed across them)."""

    def __init__(self, stages: Sequence[nn.Module], description: str, costs: Sequence[float], *,
                 cost_unit: str, labels: list[str], boundaries: list[list[str]], ties: dict[str, list[int]],
                 total_parameters: int) -> None:
        super().__init__(stages, description, costs)
        self.cost_unit = cost_unit
        self.labels = labels
        self.boundaries = boundaries
        self.ties = ties
        self.total_parameters = total_parameters
        self.model: nn.Module | None = None  # the unsplit model (generate() rebuilds stages from its modules)
        self.held: list[set[str]] = []  # per stage: the parameters and buffers it holds (unsplit names)

    def __repr__(self) -> str:
        lines = [f"Pipe: {self.n_stages} stages ({self.description})"]
        total = self.total_parameters or 1
        for index in range(self.n_stages):
            params = sum(p.numel() for p in self.stage_module(index).parameters())
            cost = self.costs[index] if self.costs else 0.0
            shown = f", cost {cost * 1e3:.3g} ms" if self.cost_unit == "seconds" else ""  # else cost = parameters
            lines.append(f"  stage {index}: {self.labels[index]}, {params:,} parameters "
                         f"({100 * params / total:.1f}%){shown}")
            if index < len(self.boundaries):
                values = self.boundaries[index]
                listed = ", ".join(values[:6]) + (f", ... ({len(values)} values)" if len(values) > 6 else "")
                lines.append(f"    -> stage {index + 1}: {listed}")
        for name, stages in self.ties.items():
            lines.append(f"  tied: {name} on stages {', '.join(map(str, stages))} (gradients summed across them)")
        return "\n".join(lines)


def from_traced(model: nn.Module, *, n_stages: int | None, split_points: Any, balance: Any,
                example_args: Any, example_kwargs: dict | None) -> TracedPipe:
    """Trace ``model`` and cut it at split points, ``pipe_split()`` markers or into ``n_stages``
    balanced stages. In a job of several ranks, rank 0 traces and the others receive the cut
    (shipping.py): one trace per job."""
    def split() -> TracedPipe:
        return _from_traced(model, n_stages=n_stages, split_points=split_points, balance=balance,
                            example_args=example_args, example_kwargs=example_kwargs)

    if not in_job():
        return split()
    _ALONE[0] = True
    try:
        return shared_split(split, _recipe, lambda recipe: _rebuild(model, recipe))
    finally:
        _ALONE[0] = False


def _recipe(pipe: TracedPipe) -> dict[str, Any]:
    """What another rank needs to rebuild ``pipe`` around its own model."""
    stages = []
    for index in range(pipe.n_stages):
        stage = pipe.stage_module(index)
        attributes = {name: value for name, value in stage.__dict__.items() if name.startswith("_constant_")}
        stages.append({"graph": encode_graph(stage), "held": pipe.held[index], "attributes": attributes})
    return {"stages": stages, "description": pipe.description, "costs": pipe.costs, "cost_unit": pipe.cost_unit,
            "labels": pipe.labels, "boundaries": pipe.boundaries, "ties": pipe.ties,
            "total_parameters": pipe.total_parameters}


def _rebuild(model: nn.Module, recipe: dict[str, Any]) -> TracedPipe:
    stages = []
    aliases = state_aliases(model)
    for index, part in enumerate(recipe["stages"]):
        graph, children = decode_graph(part["graph"])
        stage = assemble_stage(model, graph, set(part["held"]), {**children, **part["attributes"]}, index)
        object.__setattr__(stage, ALIASES, {alias: name for alias, name in aliases.items() if name in part["held"]})
        stages.append(stage)
    pipe = TracedPipe(stages, recipe["description"], recipe["costs"], cost_unit=recipe["cost_unit"],
                      labels=recipe["labels"], boundaries=recipe["boundaries"], ties=recipe["ties"],
                      total_parameters=recipe["total_parameters"])
    pipe.held = [set(part["held"]) for part in recipe["stages"]]
    pipe.model = model
    return pipe


def _from_traced(model: nn.Module, *, n_stages: int | None, split_points: Any, balance: Any,
                 example_args: Any, example_kwargs: dict | None) -> TracedPipe:
    name = type(model).__name__
    if balance == "time" and (example_args is None and not example_kwargs):
        raise ValueError("balance='time' profiles the model and needs example inputs: pass example_args=(...) "
                         "(a micro-batch), or use balance='params'")
    if balance == "time" and is_meta(model):
        raise ValueError(f"balance='time' cannot profile {name}: it is on the meta device and its weights have no "
                         "storage; use balance='params', or build the model on a real device to profile it")
    if not (isinstance(balance, str) and balance in ("params", "time")) and not isinstance(balance, (list, tuple)):
        raise ValueError(f"balance={balance!r} is not 'params', 'time' or a list of blocks per stage")
    captured = capture(model, example_args, example_kwargs)
    marked = [(position, f"pipe_split() marker {i}") for i, position in enumerate(captured.markers)]
    if split_points is not None or marked:
        named = _split_point_cuts(captured, split_points) if split_points is not None else []
        cuts = _check_cuts(captured, named + marked)
        if n_stages is not None and n_stages != len(cuts) + 1:
            raise ValueError(f"n_stages={n_stages} but the split points and pipe_split() markers make "
                             f"{len(cuts) + 1} stages; drop n_stages or make them agree")
        depth = max([str(n).count(".") + 1 for n in (split_points or [])] or [1])
        how = "split points" if not marked else "pipe_split() markers" if split_points is None else \
            "split points and pipe_split() markers"
        stage_cuts = plan_stages(captured, cuts)
        costs = [float(sum(used.values())) for used in _parameter_numel(captured, stage_cuts)]
        cost_unit, description = "parameters", f"traced with torch.export, cut at {how}"
    else:
        if n_stages is None:
            raise ValueError(f"say how to cut {name}: n_stages=k (balanced), split_points=[module names], or "
                             "conveyor.pipe_split() markers in its forward")
        what, blocks = _blocks(captured)
        if n_stages > len(blocks):
            raise ValueError(f"cannot cut {name} into {n_stages} stages: it has {len(blocks)} cuttable blocks "
                             f"({what}); use at most {len(blocks)} stages, or pass split_points=[...] to cut "
                             "inside blocks")
        spans = _spans(captured)
        candidates = [spans[block][0] for block in blocks[1:]]
        units = plan_stages(captured, candidates)
        unit_parameters = _parameter_numel(captured, units)
        if balance == "time":
            modules = [build_stage(captured, units, i)[0] for i in range(units.n_stages)]
            unit_costs = decide_on_rank_zero(lambda: profile_times(modules, _as_args(example_args), example_kwargs))
            cost_unit, how = "seconds", "profiled forward+backward time"
        else:
            unit_costs = [float(sum(used.values())) for used in unit_parameters]
            cost_unit, how = "parameters", "parameter count"
        if isinstance(balance, (list, tuple)):
            sizes = [int(size) for size in balance]
            if any(size < 1 for size in sizes) or sum(sizes) != len(blocks):
                raise ValueError(f"balance={list(balance)} must give each stage at least one block and cover all "
                                 f"{len(blocks)} blocks ({what})")
            if n_stages != len(sizes):
                raise ValueError(f"n_stages={n_stages} disagrees with balance={list(balance)}")
            how = f"balance {sizes}"
        elif cost_unit == "parameters":  # a weight tied between blocks of one stage counts once there
            sizes = partition_ranges(len(unit_costs), n_stages, union_costs(unit_parameters))
        else:
            sizes = partition_min_max(unit_costs, n_stages)
        starts = [sum(sizes[:j]) for j in range(1, len(sizes))]
        cuts = [candidates[start - 1] for start in starts]
        stage_cuts = plan_stages(captured, cuts)
        if cost_unit == "seconds":
            bounds = [0, *starts, len(blocks)]
            costs = [sum(unit_costs[bounds[j]:bounds[j + 1]]) for j in range(len(sizes))]
        else:
            costs = [float(sum(used.values())) for used in _parameter_numel(captured, stage_cuts)]
        depth = blocks[0].count(".") + 1
        description = f"traced with torch.export, balanced by {how} among {what}"
    if captured.settings:
        description += f"; set {', '.join(captured.settings)} for tracing and training"
    stages, held = [], []
    for index in range(stage_cuts.n_stages):
        stage, names = build_stage(captured, stage_cuts, index)
        stages.append(stage)
        held.append(names)
    aliases = state_aliases(model)
    for stage, names in zip(stages, held):  # tied names the traced stages lost (head.weight -> embed.weight)
        object.__setattr__(stage, ALIASES, {alias: name for alias, name in aliases.items() if name in names})
    parameters = {n for n, _ in model.named_parameters()}
    ties = {n: [s for s in range(stage_cuts.n_stages) if n in held[s]] for n in sorted(parameters)}
    ties = {n: stages_of for n, stages_of in ties.items() if len(stages_of) > 1}
    boundaries = [[_describe(node) for node in values] for values in stage_cuts.boundaries]
    pipe = TracedPipe(stages, description, costs, cost_unit=cost_unit, labels=_labels(captured, stage_cuts, depth),
                      boundaries=boundaries, ties=ties, total_parameters=sum(p.numel() for p in model.parameters()))
    pipe.model = model
    pipe.held = held
    return pipe
