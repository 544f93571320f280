"""Partition-agnostic checkpoints: tensors under the unsplit model's names, in safetensors files.

Every rank of a pipeline calls :func:`save` (or :func:`load`); each writes (reads) only its own
share, so a checkpoint saved by 4 stages loads into 2 stages, one process, or the plain
``nn.Module`` (:func:`load_full`), and back. ``path`` is a directory::

    path/
      manifest.json                 written last by rank 0: format, step, layout, every tensor
      data-<id>/                    the files of one save; <id> is new for every save
        model-00000.safetensors     parameters and buffers that rank 0 writes
        train-00000.safetensors     rank 0's optimizer tensors ("<param name>/<key>") and RNG
        model-00001.safetensors ...

A tensor held by several ranks (a tied parameter; a stage's data- and tensor-parallel peers on a
mesh) is written once, by the lowest rank holding it; every holder reads it back from there. The
same goes for its optimizer state. Sharded values (DTensors) are written whole and loaded as
this rank's shard (``checkpoint_dtensor.py``); a runner on a mesh saves over the whole mesh. A tied alias
(``head.weight``, the same tensor as ``embed.weight``) is not written again: the manifest's
``aliases`` maps it to the name it is stored under, and :func:`load_full` gives both names.

Verified: the manifest holds the SHA-256 of every data file (``checksums``); :func:`load` and
:func:`load_full` check each file against it before reading, only read files inside the
checkpoint's folder, and read tensors with safetensors (never pickle), so a corrupted, truncated,
replaced or foreign file is a :class:`CheckpointError` and loading never runs code. Checkpoints
saved before checksums existed load without verification.

Atomic: the data files go to a fresh ``data-<id>`` directory; once every rank has reported its
files written, rank 0 writes ``manifest.json.tmp`` and ``os.replace``-s it over
``manifest.json``, the single commit point. A crash before that leaves the previous manifest,
naming the previous (untouched) data directory; the orphaned files are removed by the next
successful save, as are the previous save's files.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint_dtensor import is_dtensor, job_of, shard_like, whole_share
from .errors import CheckpointError
from .partition.pipe import state_aliases

__all__ = ["FORMAT_VERSION", "CheckpointError", "complete_steps", "latest", "load", "load_full", "read_manifest",
           "save", "save_full"]

FORMAT = "conveyor-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_RNG_CPU, _RNG_CUDA = "rng/cpu", "rng/cuda"


# --- what a rank holds: a pipeline runner's share, or a whole plain module ------------------------
@dataclass
class _View:
    rank: int
    world_size: int
    stages: dict[int, list[str]]  # stage -> names of its state_dict entries
    state: dict[str, torch.Tensor]
    names: dict[int, str]  # id(parameter) -> name
    gather: Callable[[Any], list[Any]]  # all_gather_object over the ranks of the layout
    load_state: Callable[[dict[str, torch.Tensor], bool], None] | None
    device: torch.device
    layout: dict[str, Any]
    aliases: dict[str, str]  # tied alias -> the name its tensor is saved under (not in ``state``)


def _view(target: Any) -> _View:
    if isinstance(target, Mapping):
        state = dict(target)
        return _View(0, 1, {0: list(state)}, state, {}, lambda value: [value], None, torch.device("cpu"),
                     {"schedule": None, "n_microbatches": None, "placement": [0], "ties": {}}, {})
    if isinstance(target, nn.Module):
        aliases = state_aliases(target)
        state = {n: t for n, t in target.state_dict().items() if n not in aliases}
        names = {id(p): n for n, p in target.named_parameters()}
        device = next(iter(state.values())).device if state else torch.device("cpu")
        return _View(0, 1, {0: list(state)}, state, names, lambda value: [value], target.load_state_dict,
                     device, {"schedule": None, "n_microbatches": None, "placement": [0], "ties": {}}, aliases)
    runner = target  # a PipelineRunner or a LocalPipeline (duck-typed: this module does not import the runtime)
    stages = {index: list(module.state_dict()) for index, module in zip(sorted(runner.stages) if isinstance(
        runner.stages, dict) else range(len(runner.stages)), runner.modules)}
    layout = {"schedule": runner.schedule.name, "n_microbatches": runner.n_microbatches,
              "placement": list(runner.schedule.placement),
              "ties": {k: list(v) for k, v in dict(getattr(runner.pipe, "ties", {}) or {}).items()}}
    names = {id(p): n for n, p in runner.named_parameters()}
    aliases = dict(getattr(runner, "state_aliases", {}))
    state = {n: t for n, t in runner.state_dict().items() if n not in aliases}
    if not hasattr(runner, "group"):  # a LocalPipeline: every stage in this process
        return _View(0, 1, stages, state, names, lambda value: [value], runner.load_state_dict,
                     torch.device("cpu"), layout, aliases)
    rank, world_size, gather = job_of(runner)  # checkpoint_dtensor.py: with a mesh, every rank of it
    mesh = getattr(runner, "mesh", None)
    if mesh is not None:
        layout["mesh"] = {"dims": list(mesh.mesh_dim_names or ()), "shape": list(mesh.mesh.shape)}
    return _View(rank, world_size, stages, state, names, gather, runner.load_state_dict, runner.device, layout,
                 aliases)


def _describe(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


_SKIP = object()  # a value JSON cannot hold (a callable hyperparameter): not saved, the local one is kept


def _json_value(value: Any) -> Any:
    """A JSON form of an optimizer hyperparameter or non-tensor state value (or _SKIP)."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tuple):
        items = [_json_value(v) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else {"__tuple__": items}
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return _SKIP
    return value


def _from_json(value: Any, current: Any = None) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        tensor = torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        return tensor.to(current.device) if isinstance(current, torch.Tensor) else tensor
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_from_json(v) for v in value["__tuple__"])
    return value


# --- save ----------------------------------------------------------------------------------------
def _optimizer_share(optimizer: torch.optim.Optimizer, view: _View) -> tuple[dict, dict, list]:
    """(tensors "name/key" -> tensor, non-tensor values name -> {key: value}, param groups by name)."""
    def name_of(parameter: torch.Tensor) -> str:
        try:
            return view.names[id(parameter)]
        except KeyError:
            raise CheckpointError(f"rank {view.rank}: the optimizer holds a parameter of shape "
                                  f"{tuple(parameter.shape)} that is not one of this rank's "
                                  "parameters; build it on runner.parameters()") from None

    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    groups = []
    for group in optimizer.param_groups:
        names = [name_of(p) for p in group["params"]]
        hyper = {k: _json_value(v) for k, v in group.items() if k not in ("params", "param_names")}
        groups.append({"params": names, **{k: v for k, v in hyper.items() if v is not _SKIP}})
        for name, parameter in zip(names, group["params"]):
            for key, value in optimizer.state.get(parameter, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = value  # a DTensor (sharded state): gathered when written
                elif (stored := _json_value(value)) is not _SKIP:
                    values.setdefault(name, {})[key] = stored
    return tensors, values, groups


def _write_tensors(tensors: Mapping[str, torch.Tensor], file: Path) -> None:
    """Write ``tensors`` as one safetensors file and flush it to disk (patched by the crash tests)."""
    own = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    save_file(own, str(file))
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def save(target: Any, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None, *,
         step: int | None = None, extra: Any = None) -> dict[str, Any]:
    """Save ``target``'s model state (and ``optimizer``'s) to the directory ``path``.

    ``target`` is a ``PipelineRunner`` (every rank of its group calls this; each writes its own
    share), a plain ``nn.Module`` or a state dict (one process holding the whole model).
    ``step`` and ``extra`` (anything JSON can hold) go to the manifest, which is returned.
    """
    view = _view(target)
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"extra= must be JSON-serialisable: {error}") from None
    if optimizer is not None and not view.names:
        raise CheckpointError("saving optimizer state needs the parameters' names: pass the nn.Module or "
                              "the runner, not a state dict")
    opt_tensors, opt_values, opt_groups = _optimizer_share(optimizer, view) if optimizer else ({}, {}, [])
    rng = {_RNG_CPU: torch.get_rng_state()} if not isinstance(target, Mapping) else {}
    if view.device.type == "cuda" and not isinstance(target, Mapping):
        rng[_RNG_CUDA] = torch.cuda.get_rng_state(view.device)
    mine = {"stages": view.stages, "tensors": {n: _describe(t) for n, t in view.state.items()},
            "opt_tensors": {n: _describe(t) for n, t in opt_tensors.items()}, "opt_values": opt_values,
            "opt_groups": opt_groups, "rng": sorted(rng), "id": uuid.uuid4().hex[:12], "aliases": view.aliases}
    everyone = view.gather(mine)
    root = Path(path)
    data = f"data-{everyone[0]['id']}"
    model_writer = _lowest_holder(r["tensors"] for r in everyone)
    opt_writer = _lowest_holder(r["opt_tensors"] for r in everyone)

    def files(rank: int) -> dict[str, str | None]:
        has_train = bool(everyone[rank]["rng"]) or any(w == rank for w in opt_writer.values())
        return {"model": f"{data}/model-{rank:05d}.safetensors",
                "train": f"{data}/train-{rank:05d}.safetensors" if has_train else None}

    # sharded values are gathered whole by every holder (collectives) before anything can fail
    model_share = whole_share(view.state, lambda name: model_writer[name] == view.rank)
    opt_share = whole_share(opt_tensors, lambda name: opt_writer[name] == view.rank)
    error: BaseException | None = None
    checksums: dict[str, str] = {}
    try:
        os.makedirs(root / data, exist_ok=True)
        model_file = files(view.rank)["model"]
        assert model_file is not None
        _write_tensors(model_share, root / model_file)
        checksums[model_file] = _sha256(root / model_file)
        train = files(view.rank)["train"]
        if train is not None:
            _write_tensors({**opt_share, **rng}, root / train)
            checksums[train] = _sha256(root / train)
    except Exception as caught:  # reported to every rank below, then re-raised here
        error = caught
    all_checksums: dict[str, str] = {}
    for share in _agree(view, error, root, data, f"writing its files under {root / data}", checksums):
        all_checksums.update(share)

    manifest = _manifest(view, everyone, files, model_writer, opt_writer, optimizer, step, extra, data)
    manifest["checksums"] = dict(sorted(all_checksums.items()))
    manifest["aliases"] = {alias: name for share in everyone for alias, name in share["aliases"].items()
                           if name in manifest["tensors"]}
    error = None
    if view.rank == 0:
        try:
            _commit(root, manifest)
        except Exception as caught:
            error = caught
    _agree(view, error, root, data, f"writing {root / MANIFEST}")
    return manifest


def _lowest_holder(per_rank: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    writer: dict[str, int] = {}
    for rank, names in enumerate(per_rank):
        for name in names:
            writer.setdefault(name, rank)
    return writer


def _agree(view: _View, error: BaseException | None, root: Path, data: str, doing: str,
           payload: Any = None) -> list[Any]:
    """Every rank learns whether any rank failed; then all raise (nobody waits on a dead peer).
    Returns every rank's ``payload`` when none failed."""
    shares = view.gather((None if error is None else f"{type(error).__name__}: {error}", payload))
    failures = [(rank, message) for rank, (message, _) in enumerate(shares) if message is not None]
    if not failures:
        return [share for _, share in shares]
    if view.rank == 0:
        shutil.rmtree(root / data, ignore_errors=True)
    if error is not None:
        raise error
    rank, message = failures[0]
    raise CheckpointError(f"saving the checkpoint failed on rank {rank} while {doing} ({message}); "
                          f"the previous checkpoint at {root} (if any) is untouched")


def _manifest(view: _View, everyone: list[dict], files: Callable[[int], dict], model_writer: dict,
              opt_writer: dict, optimizer: torch.optim.Optimizer | None, step: int | None, extra: Any,
              data: str) -> dict[str, Any]:
    from . import __version__

    tensors = {}
    stages = []
    for rank, share in enumerate(everyone):
        for stage, names in share["stages"].items():
            stages.append({"stage": int(stage), "rank": rank, "names": names})
    for entry in sorted(stages, key=lambda e: e["stage"]):
        for name in entry["names"]:
            writer = model_writer[name]
            tensors.setdefault(name, {**everyone[writer]["tensors"][name], "file": files(writer)["model"]})
    opt = None
    if optimizer is not None:
        values: dict[str, dict] = {}
        for share in reversed(everyone):  # the lowest rank's values win, like its tensors
            values.update(share["opt_values"])
        opt = {"class": type(optimizer).__name__,
               "param_groups": [{"rank": rank, **group} for rank, share in enumerate(everyone)
                                for group in share["opt_groups"]],
               "tensors": {name: {**everyone[rank]["opt_tensors"][name], "file": files(rank)["train"]}
                           for name, rank in sorted(opt_writer.items())},
               "values": values}
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "data": data, "step": step,
        "world_size": view.world_size, "n_stages": len({entry["stage"] for entry in stages}), **view.layout,
        "stages": sorted(stages, key=lambda e: e["stage"]),
        "ranks": [{"rank": rank, **files(rank), "rng": share["rng"]} for rank, share in enumerate(everyone)],
        "tensors": tensors, "optimizer": opt, "extra": extra,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "conveyor_version": __version__, "torch_version": torch.__version__,
    }


def _commit(root: Path, manifest: dict[str, Any]) -> None:
    temporary = root / f"{MANIFEST}.tmp"
    with open(temporary, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, root / MANIFEST)  # the commit: nothing after this may fail the save
    with contextlib.suppress(OSError):
        directory = os.open(root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    with contextlib.suppress(OSError):  # the previous save's files, and orphans of crashed saves
        for child in root.iterdir():
            if child.is_dir() and child.name.startswith("data-") and child.name != manifest["data"]:
                shutil.rmtree(child, ignore_errors=True)


# --- load ----------------------------------------------------------------------------------------
_STEP_DIR = re.compile(r"^step-(\d+)$")


def complete_steps(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(N, folder)`` of every ``step-N`` folder in ``directory`` that holds a finished
    checkpoint (a ``manifest.json``), by ``N``; folders of saves killed midway are skipped."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
                  and (p / MANIFEST).is_file())


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint among the ``step-N`` folders of ``directory`` (``None`` if
    there is none): what a restarted job resumes from. ``conveyor train`` saves to
    ``<dir>/step-NNNNNN``; a script saving the same way restarts with::

        found = conveyor.checkpoint.latest("ckpt")
        first = checkpoint.load(runner, found, optimizer)["step"] if found else 0
    """
    found = complete_steps(directory)
    return found[-1][1] if found else None


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the checkpoint in the directory ``path``."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {path}: {file} does not exist")
    try:
        with open(file) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: file {MANIFEST} cannot be read ({type(error).__name__}: "
                              f"{error}); the manifest is damaged") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint {path}: file {MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{file} is not a {FORMAT} of version <= {FORMAT_VERSION} "
                              f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    return manifest


class _Files:
    """Reads a checkpoint's tensors: only files inside its folder, each checked once against the
    manifest's checksum (when it has one), with safetensors (no pickle: nothing is executed)."""

    def __init__(self, root: Path, manifest: Mapping[str, Any]) -> None:
        self.root = root
        self.checksums: Mapping[str, str] | None = manifest.get("checksums")
        self.verified: set[str] = set()

    def _fail(self, file: str, problem: str, tensor: str | None = None) -> CheckpointError:
        where = f", tensor {tensor}" if tensor is not None else ""
        return CheckpointError(f"checkpoint {self.root}: file {file}{where}: {problem}")

    def _path(self, file: Any) -> Path:
        if not isinstance(file, str) or not file:
            raise self._fail(repr(file), "the manifest names no file; the manifest is damaged")
        path = (self.root / file).resolve()
        if not path.is_relative_to(self.root.resolve()) or os.path.isabs(file):
            raise self._fail(file, "is outside the checkpoint folder; refusing to read it (the manifest was "
                             "edited or damaged)")
        if not path.is_file():
            raise self._fail(file, "is missing (the checkpoint was copied incompletely or its files deleted)")
        if file not in self.verified:
            if self.checksums is not None:
                expected = self.checksums.get(file)
                if expected is None:
                    raise self._fail(file, "has no checksum in the manifest; the manifest is damaged")
                if _sha256(path) != expected:
                    raise self._fail(file, "checksum mismatch: its bytes changed after it was saved (corrupted, "
                                     "truncated or replaced); restore it from a copy or load another checkpoint")
            self.verified.add(file)
        return path

    def read(self, table: Mapping[str, Mapping[str, Any]], names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(table[name]["file"], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            path = self._path(file)
            key = None
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for key in keys:
                        out[key] = handle.get_tensor(key)
            except Exception as error:  # noqa: BLE001 - safetensors' own errors name neither file nor checkpoint
                raise self._fail(file, f"cannot be read as safetensors ({type(error).__name__}: {error}); it is "
                                 "truncated, corrupted or not a checkpoint file", key) from None
        return out


def _check_names(view: _View, manifest: dict, strict: bool) -> None:
    model: dict[str, list[int]] = {}
    aliases: set[str] = set()
    for shapes, tied in view.gather(({n: list(t.shape) for n, t in view.state.items()}, list(view.aliases))):
        model.update(shapes)
        aliases.update(tied)
    saved = {n: e["shape"] for n, e in manifest["tensors"].items() if n not in aliases}  # older saves held aliases
    shapes = [f"{n} (checkpoint {tuple(saved[n])}, model {tuple(s)})" for n, s in model.items()
              if n in saved and list(saved[n]) != list(s)]
    missing = [n for n in model if n not in saved] if strict else []
    unexpected = [n for n in saved if n not in model] if strict else []
    if shapes or missing or unexpected:
        lines = [f"the checkpoint does not fit this model (rank {view.rank}):"]
        for label, names in (("missing from the checkpoint", missing), ("unexpected (not in the model)", unexpected),
                             ("shape mismatch", shapes)):
            if names:
                lines.append(f"  {label}: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
        lines.append("  (was it saved from another model? load(..., strict=False) skips missing and unexpected "
                     "names, not shape mismatches)")
        raise CheckpointError("\n".join(lines))


def load(target: Any, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None, *,
         strict: bool = True) -> dict[str, Any]:
    """Load the checkpoint in ``path`` into ``target`` (a ``PipelineRunner``: every rank of its
    group calls this; or a plain ``nn.Module``), whatever layout saved it. Optimizer state is
    matched by parameter name. RNG states are restored when the world size is the one that
    saved. Returns the manifest (``manifest["step"]``, ``manifest["extra"]``)."""
    view = _view(target)
    if view.load_state is None:
        raise CheckpointError("load() needs a PipelineRunner or an nn.Module; for a state dict use load_full()")
    root = Path(path)
    manifest = read_manifest(root)
    _check_names(view, manifest, strict)
    present = [n for n in view.state if n in manifest["tensors"]]
    files = _Files(root, manifest)
    tensors = files.read(manifest["tensors"], present)
    tensors = {name: shard_like(value, view.state[name]) for name, value in tensors.items()}  # a DTensor's shard
    tensors.update({alias: tensors[name] for alias, name in view.aliases.items() if name in tensors})
    view.load_state(tensors, strict)
    if optimizer is not None:
        _load_optimizer(view, files, manifest, optimizer, strict)
    if manifest["world_size"] == view.world_size:
        entry = manifest["ranks"][view.rank]
        keys = entry.get("rng", [])
        if keys and entry.get("train"):
            table = {k: {"file": entry["train"]} for k in keys}
            rng = files.read(table, keys)
            torch.set_rng_state(rng[_RNG_CPU])
            if _RNG_CUDA in rng and view.device.type == "cuda":
                torch.cuda.set_rng_state(rng[_RNG_CUDA], view.device)
    return manifest


def _load_optimizer(view: _View, files: _Files, manifest: dict, optimizer: torch.optim.Optimizer,
                    strict: bool) -> None:
    root = files.root
    saved = manifest.get("optimizer")
    if saved is None:
        raise CheckpointError(f"the checkpoint at {root} has no optimizer state (it was saved without optimizer=)")
    if strict and saved["class"] != type(optimizer).__name__:
        raise CheckpointError(f"the checkpoint holds {saved['class']} state, not {type(optimizer).__name__}; "
                              "pass the same optimizer class (or strict=False)")
    group_of = {name: group for group in saved["param_groups"] for name in group["params"]}
    tensor_keys: dict[str, list[str]] = {}
    for key in saved["tensors"]:
        name, _, state_key = key.rpartition("/")
        tensor_keys.setdefault(name, []).append(state_key)
    current = optimizer.state_dict()
    mine = [view.names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    if None in mine:
        shape = next(tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in view.names)
        raise CheckpointError(f"rank {view.rank}: the optimizer holds a parameter of shape {shape} that is not one "
                              "of this rank's parameters; build it on runner.parameters()")
    tensors = files.read(saved["tensors"], [f"{n}/{k}" for n in mine for k in tensor_keys.get(n, [])])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for group, described in zip(optimizer.param_groups, current["param_groups"]):
        names = mine[index:index + len(group["params"])]
        for name in names:
            entry: dict[str, Any] = {k: _laid_out(tensors[f"{name}/{k}"], params[index])
                                     for k in tensor_keys.get(name, [])}
            entry.update({k: _from_json(v) for k, v in saved["values"].get(name, {}).items()})
            if entry:
                state[index] = entry
            index += 1
        sources = {json.dumps({k: v for k, v in group_of[n].items() if k not in ("params", "rank")},
                              sort_keys=True) for n in names if n in group_of}
        if len(sources) > 1:
            raise CheckpointError(f"rank {view.rank}: parameters {names} share one param group here but had "
                                  "different hyperparameters when saved; build the param groups as when saving")
        hyper = json.loads(sources.pop()) if sources else {}
        groups.append({**described, **{k: _from_json(v, described.get(k)) for k, v in hyper.items()
                                       if k in described}})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _laid_out(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """An optimizer state tensor shaped like its sharded (DTensor) parameter laid out as it (Adam's
    moments); anything else (a step count, a plain parameter's state) as read."""
    if is_dtensor(parameter) and value.dim() and tuple(value.shape) == tuple(parameter.shape):
        return shard_like(value, parameter)
    return value


def load_full(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The unsplit model's ``state_dict`` from any checkpoint, merged from every rank's files:
    ``model.load_state_dict(load_full(path))`` for the plain ``nn.Module``."""
    root = Path(path)
    manifest = read_manifest(root)
    tensors = _Files(root, manifest).read(manifest["tensors"], list(manifest["tensors"]))
    tensors.update({alias: tensors[name] for alias, name in manifest.get("aliases", {}).items() if name in tensors})
    return tensors


def save_full(state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
              optimizer: torch.optim.Optimizer | None = None, *, step: int | None = None,
              extra: Any = None) -> dict[str, Any]:
    """Save a plain model (an ``nn.Module`` with its optimizer, or a state dict) as a checkpoint
    that a pipeline of any layout loads with :func:`load`. Not collective: call it on one rank."""
    return save(state, path, optimizer, step=step, extra=extra)
