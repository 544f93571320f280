"""Hugging Face decoder-only causal LMs: cache-capable stages built from the model's own modules.

A traced stage runs a fixed graph and cannot keep a key/value cache. For generation each stage
is rebuilt from the original module classes (the embeddings, its slice of the decoder layers,
the final norm and the head) *bound* to the stage's own tensors: a shallow copy of each module
whose parameters are the ones the pipeline's stage holds (by the unsplit model's names), so
training, checkpoints and tied weights (GPT-2's ``wte``/``lm_head``) carry over unchanged.

Each stage runs the model's own decoder forward (``model.model`` / ``model.transformer``) on
its slice: a copy of the config with ``num_hidden_layers`` set to the slice's length and the
layers renumbered from 0, so a ``DynamicCache`` for the stage holds exactly its layers. Stages
after the first take the hidden state as ``inputs_embeds`` (additive position embeddings such
as GPT-2's ``wpe`` are zero there: the first stage added them); stages before the last skip the
final norm; the last stage applies the head to the last position.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = ["DecoderLayout", "GenerationStage", "SUPPORTED_MODEL_TYPES", "decoder_layout", "generation_stages"]

# families whose decoder forward takes inputs_embeds, position_ids, attention_mask and a cache
# and only adds embeddings this module neutralises (checked in tests against model.generate)
SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", "llama", "mistral", "mixtral", "phi", "phi3", "qwen2", "qwen3")


@dataclass(frozen=True)
class DecoderLayout:
    """Where a causal LM keeps its parts (attribute paths in the unsplit model)."""

    base: str                     # the decoder model: "model" or "transformer"
    layers: str                   # its ModuleList of decoder layers: "layers" or "h"
    norm: str                     # its final norm: "norm" or "ln_f"
    head: str                     # the output projection: "lm_head"
    positions: tuple[str, ...]    # additive position embeddings of the decoder ("wpe"), first stage only
    n_layers: int

    def layer_name(self, index: int) -> str:
        return f"{self.base}.{self.layers}.{index}"


def decoder_layout(model: nn.Module) -> DecoderLayout:
    """The layout of a supported decoder-only causal LM, or a ValueError saying what is supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if config is None or model_type not in SUPPORTED_MODEL_TYPES or getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"generate() supports Hugging Face decoder-only causal LMs of the types "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}; {name} (model_type={model_type!r}) is not one of them. "
                         "Run model.generate on the unsplit model, or see docs/generation.md")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError(f"{name} scales attention by the inverse layer index, which a stage's renumbered layers "
                         "would change; generate() does not support scale_attn_by_inverse_layer_idx=True")
    base_name = getattr(model, "base_model_prefix", "model")
    base = getattr(model, base_name, None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None:
        raise ValueError(f"generate() needs {name} to have a decoder ({base_name!r}) and an output head")
    layers = next((n for n in ("layers", "h") if isinstance(getattr(base, n, None), nn.ModuleList)), None)
    norms = ("norm", "ln_f", "final_layernorm", "final_layer_norm")
    norm = next((n for n in norms if isinstance(getattr(base, n, None), nn.Module)), None)
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    if layers is None or norm is None or head_name is None:
        raise ValueError(f"generate() cannot find the decoder layers, final norm or head of {name}")
    positions = tuple(n for n in ("wpe",) if isinstance(getattr(base, n, None), nn.Embedding))
    return DecoderLayout(base_name, layers, norm, head_name, positions, len(getattr(base, layers)))


class _ZeroPositions(nn.Module):
    """Stands in for additive position embeddings on stages after the first (x + 0 is exact)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*position_ids.shape, self.width), device=position_ids.device)


def _canonical(model: nn.Module) -> dict[int, str]:
    names = {id(t): n for n, t in model.named_buffers()}
    names.update({id(t): n for n, t in model.named_parameters()})
    return names


def _bind(module: nn.Module, tensors: dict[str, torch.Tensor], canonical: dict[int, str],
          device: torch.device) -> nn.Module:
    """A shallow copy of ``module`` (recursively) whose parameters and buffers are the stage's
    tensors of the same (unsplit-model) names. A parameter the stage does not hold becomes a
    meta tensor (its use would fail loudly); a buffer it does not hold (rotary frequencies used
    only on the first stage by the trace) is the model's own, moved to ``device``."""
    clone = copy.copy(module)
    clone._parameters = {}
    for key, parameter in module._parameters.items():
        name = canonical.get(id(parameter)) if parameter is not None else None
        if parameter is None:
            clone._parameters[key] = None
        elif name in tensors:
            clone._parameters[key] = tensors[name]  # type: ignore[assignment]
        else:
            clone._parameters[key] = nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=False)
    clone._buffers = {}
    for key, buffer in module._buffers.items():
        name = canonical.get(id(buffer)) if buffer is not None else None
        if buffer is None:
            clone._buffers[key] = None
        elif name in tensors:
            clone._buffers[key] = tensors[name]
        else:
            if buffer.is_meta:
                raise ValueError(f"buffer {name!r} is on the meta device and not held by this stage, so the stage "
                                 "cannot compute with it for generate(); build the model on a real device")
            clone._buffers[key] = buffer.to(device)
    clone._modules = {key: None if child is None else _bind(child, tensors, canonical, device)
                      for key, child in module._modules.items()}
    return clone


def _stage_config(config: Any, first: int, count: int) -> Any:
    config = copy.deepcopy(config)
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = count
    if isinstance(layer_types, (list, tuple)):
        config.layer_types = list(layer_types)[first:first + count]
    return config


def _renumber(layer: nn.Module, index: int) -> None:
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


class GenerationStage(nn.Module):
    """One stage of a causal LM for generation: the decoder on layers ``first .. first+count-1``.

    ``forward(x, attention_mask, position_ids, cache)`` takes token ids (first stage) or the
    previous stage's hidden state, and returns the hidden state, or on the last stage the
    float32 logits of the last position (as ``model.generate`` scores them).
    """

    def __init__(self, model: nn.Module, layout: DecoderLayout, tensors: dict[str, torch.Tensor], *,
                 first: int, count: int, is_first: bool, is_last: bool, device: torch.device) -> None:
        super().__init__()
        canonical = _canonical(model)
        base = getattr(model, layout.base)
        self.config = _stage_config(base.config, first, count)
        decoder = copy.copy(base)
        decoder._parameters, decoder._buffers = {}, {}
        decoder._modules = {}
        for key, child in base._modules.items():
            if key == layout.layers:
                layers = []
                for offset in range(count):
                    layer = _bind(child[first + offset], tensors, canonical, device)
                    _renumber(layer, offset)
                    layers.append(layer)
                decoder._modules[key] = nn.ModuleList(layers)
            elif key == layout.norm and not is_last:
                decoder._modules[key] = nn.Identity()
            elif key in layout.positions and not is_first:
                decoder._modules[key] = _ZeroPositions(child.embedding_dim)
            else:
                decoder._modules[key] = None if child is None else _bind(child, tensors, canonical, device)
        decoder.config = self.config
        decoder.gradient_checkpointing = False
        self.decoder = decoder
        self.head = _bind(model.get_submodule(layout.head), tensors, canonical, device) if is_last else None
        self.is_first, self.is_last = is_first, is_last
        self.first, self.count = first, count
        self.eval()

    def new_cache(self) -> Any:
        """An empty key/value cache for this stage's layers (one per lane)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                cache: Any) -> torch.Tensor:
        options = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                       use_cache=True)
        if self.is_first:
            output = self.decoder(input_ids=x, **options)
        else:
            output = self.decoder(inputs_embeds=x, **options)
        hidden = output[0]
        if self.head is None:
            return hidden
        return self.head(hidden[:, -1:, :])[:, -1, :].to(dtype=torch.float32)


def _layers_of(module: nn.Module, layout: DecoderLayout) -> set[int]:
    prefix = f"{layout.base}.{layout.layers}."
    held = set()
    for name, _ in module.named_parameters(remove_duplicate=False):
        if name.startswith(prefix):
            held.add(int(name[len(prefix):].split(".")[0]))
    return held


def stage_layers(stage_modules: Sequence[nn.Module], layout: DecoderLayout) -> list[tuple[int, int]]:
    """``(first layer, count)`` of every stage, or a ValueError if the cut does not fall between
    decoder layers (a layer's parameters on two stages) or a stage holds no layer."""
    held = [_layers_of(module, layout) for module in stage_modules]
    ranges: list[tuple[int, int]] = []
    expected = 0
    for index, layers in enumerate(held):
        if not layers:
            raise ValueError(f"stage {index} holds no decoder layer of {layout.base}.{layout.layers}; generate() "
                             "needs every stage to hold at least one whole decoder layer (cut with n_stages or at "
                             "decoder layers)")
        first, last = min(layers), max(layers)
        if first != expected or layers != set(range(first, last + 1)):
            raise ValueError(f"stage {index} holds decoder layers {sorted(layers)}, which do not continue where "
                             "the previous stage stopped: generate() needs the stages cut between whole decoder "
                             "layers, in order")
        ranges.append((first, last - first + 1))
        expected = last + 1
    for index in range(len(held) - 1):
        if held[index] & held[index + 1]:
            shared = sorted(held[index] & held[index + 1])
            raise ValueError(f"decoder layer {shared[0]} is cut between stages {index} and {index + 1}; "
                             "generate() needs the stages cut between whole decoder layers")
    if expected != layout.n_layers:
        raise ValueError(f"the stages hold decoder layers 0..{expected - 1} of {layout.n_layers}")
    return ranges


def generation_stages(model: nn.Module, stage_modules: dict[int, nn.Module], all_stage_modules: Sequence[nn.Module],
                      devices: dict[int, torch.device]) -> dict[int, GenerationStage]:
    """The generation stage of every index in ``stage_modules`` (the stages held here, on
    ``devices``), bound to those modules' tensors."""
    layout = decoder_layout(model)
    ranges = stage_layers(all_stage_modules, layout)
    last = len(all_stage_modules) - 1
    stages = {}
    for index, module in stage_modules.items():
        tensors = dict(module.named_parameters(remove_duplicate=False))
        tensors.update(dict(module.named_buffers(remove_duplicate=False)))
        first, count = ranges[index]
        stages[index] = GenerationStage(model, layout, tensors, first=first, count=count, is_first=index == 0,
                                        is_last=index == last, device=devices[index])
    return stages
