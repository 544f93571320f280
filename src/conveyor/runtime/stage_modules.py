"""What PipelineRunner and LocalPipeline share about the stage modules they hold: parameters and
state under the unsplit model's names, and the train/eval switch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from ..partition.pipe import stage_aliases

__all__ = ["StageModules", "original_name"]

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")  # wrappers that nest the module


def original_name(name: str) -> str:
    """``name`` without the components wrappers insert (activation checkpointing's, FSDP1's)."""
    for prefix in _WRAPPER_PREFIXES:
        if prefix in name:
            name = name.replace(prefix, "")
    return name


class StageModules:
    """A mixin over ``modules`` (the stage modules held here, in stage order)."""

    @property
    def modules(self) -> list[nn.Module]:
        raise AttributeError(f"{type(self).__name__} must define the stage modules it holds")

    def _where(self) -> str:
        """A prefix for messages that name this holder (e.g. ``"rank 2: "``)."""
        return ""

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters under the unsplit model's names; one shared by two stage modules appears
        once (separate copies of a tie, on different devices, appear once per copy)."""
        seen: set[int] = set()
        for module in self.modules:
            for name, parameter in module.named_parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    yield original_name(name), parameter

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, parameter in self.named_parameters():
            yield parameter

    @property
    def state_aliases(self) -> dict[str, str]:
        """``{alias: name}``: the tied names of the unsplit model (``head.weight``) that
        :meth:`state_dict` gives as the tensor held under another name (``embed.weight``)."""
        aliases: dict[str, str] = {}
        for module in self.modules:
            aliases.update(stage_aliases(module))
        return aliases

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers under the unsplit model's names (the first copy of a tie), tied
        aliases included: the stages' state dicts, merged, load with ``strict=True`` into the
        unsplit model."""
        state: dict[str, torch.Tensor] = {}
        for module in self.modules:
            own = module.state_dict()
            for name, value in own.items():
                state.setdefault(name, value)
            for alias, name in stage_aliases(module).items():
                if name in own:
                    state.setdefault(alias, own[name])
        return state

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load the entries of ``state_dict`` that belong to the stages held here (others, and tied
        aliases, ignored: the tensor loads under the name the stage holds it by)."""
        for module in self.modules:
            own = module.state_dict().keys()
            missing = [name for name in own if name not in state_dict]
            if strict and missing:
                raise KeyError(f"{self._where()}state_dict lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=strict)

    def train(self, mode: bool = True) -> Any:
        for module in self.modules:
            module.train(mode)
        return self

    def eval(self) -> Any:
        return self.train(False)
