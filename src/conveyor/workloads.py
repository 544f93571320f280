"""What ``conveyor train`` and ``conveyor plan`` run: a model, its data and its loss.

A *source* is one of:

- ``demo``: the demo's character transformer on the packaged Shakespeare text;
- a Python file (``path/to/train_me.py``) or an importable module name (``mypkg.job``) that defines
  ``build_model() -> nn.Module``, ``batch(step: int, batch_size: int) -> (inputs, target)``
  (deterministic in ``step``, so a resumed run sees the same data) and ``loss_fn(output, target)``;
  optionally ``optimizer(parameters) -> torch.optim.Optimizer`` (default AdamW, lr 1e-3) and
  ``BATCH_SIZE`` (default 16). ``inputs`` is a tensor or a tuple of tensors;
- a Hugging Face causal-LM model type from the installed ``transformers`` (``gpt2``, ``llama``,
  ...; optionally written ``hf:gpt2``): its config with random weights (never a download), small by
  default, trained on the Shakespeare text as bytes.

Every rank builds the workload from the same :class:`WorkloadSpec` (a few strings and numbers,
cheap to send to processes) and the same seed, so the ranks hold the same initial model. Every
source is seeded from ``spec.seed``: a script or module is imported, and its ``build_model()``
called, right after ``torch.manual_seed(seed)``; its ``batch(step, ...)`` runs with the global
random state set from ``(seed, step)`` and restored afterwards, so a resumed run sees the same
model and data as a straight one.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Workload", "WorkloadSpec", "causal_lm_loss", "load_workload"]


@dataclass(frozen=True)
class WorkloadSpec:
    """Where the model comes from and how big to make it (sizes apply to demo and transformers)."""

    source: str = "demo"
    layers: int | None = None
    width: int | None = None
    heads: int | None = None
    seq_len: int | None = None
    full_size: bool = False  # transformers: keep the config's default sizes (GPT-2 small: 124M)
    seed: int = 0


@dataclass
class Workload:
    name: str
    build_model: Callable[[], nn.Module]
    batch: Callable[[int, int], tuple[Any, Any]]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    make_optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]
    batch_size: int = 16

    def optimizer_for(self, parameters: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
        """The workload's optimizer over ``parameters``; a rank whose stages hold none (a stage
        that is only an activation) gets one that updates nothing, since torch's optimizers
        refuse an empty parameter list."""
        chosen = list(parameters)
        if not chosen:
            return torch.optim.SGD([nn.Parameter(torch.zeros(0))], lr=0.0)
        return self.make_optimizer(iter(chosen))

    def inputs(self, step: int, batch_size: int) -> tuple[tuple, Any]:
        """``(inputs as a tuple, target)`` of a step's batch."""
        inputs, target = self.batch(step, batch_size)
        return (inputs if isinstance(inputs, tuple) else (inputs,)), target


def causal_lm_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy of a language model's logits (a tensor, or an output with ``.logits``)."""
    logits = output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _adamw(parameters: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=1e-3)


def _text_windows(tokens: torch.Tensor, seq_len: int, seed: int) -> Callable[[int, int], tuple[Any, Any]]:
    def batch(step: int, batch_size: int) -> tuple[Any, Any]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
        index = starts[:, None] + torch.arange(seq_len)
        return tokens[index], tokens[index + 1]
    return batch


def _demo(spec: WorkloadSpec) -> Workload:
    from .demo.charlm import CharDataset, char_transformer, lm_loss, load_text

    data = CharDataset(load_text(), "train")
    seq_len = spec.seq_len or 64

    def build() -> nn.Module:
        torch.manual_seed(spec.seed)
        return char_transformer(data.vocab_size, width=spec.width or 128, depth=spec.layers or 4,
                                heads=spec.heads or 4, seq_len=seq_len)
    return Workload("demo (character transformer)", build, _text_windows(data.tokens, seq_len, spec.seed), lm_loss,
                    lambda parameters: torch.optim.AdamW(parameters, lr=3e-3), 32)


def _transformers(spec: WorkloadSpec, model_type: str) -> Workload:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    from .demo.charlm import load_text

    logging.set_verbosity_error()
    seq_len = spec.seq_len or 128
    sizes: dict[str, Any] = {} if spec.full_size else {
        "num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 4, "vocab_size": 256}
    for key, value in (("num_hidden_layers", spec.layers), ("hidden_size", spec.width),
                       ("num_attention_heads", spec.heads)):
        if value is not None:
            sizes[key] = value
    config = AutoConfig.for_model(model_type, use_cache=False, **sizes)
    if getattr(config, "max_position_embeddings", seq_len) < seq_len:
        config.max_position_embeddings = seq_len
    tokens = torch.tensor(list(load_text().encode("utf-8")), dtype=torch.long)
    if config.vocab_size < 256:
        raise ValueError(f"{model_type} with vocab_size {config.vocab_size} cannot hold byte tokens; use >= 256")

    def build() -> nn.Module:
        torch.manual_seed(spec.seed)
        return AutoModelForCausalLM.from_config(config)
    return Workload(f"{model_type} ({'default' if spec.full_size else 'small'} config, random init)", build,
                    _text_windows(tokens, seq_len, spec.seed), causal_lm_loss, _adamw, 8)


def _module(source: str) -> Any:
    path = Path(source)
    if source.endswith(".py"):
        if not path.is_file():
            raise FileNotFoundError(f"no training script at {source}; give a .py file, a module name, 'demo' or a "
                                    "transformers model type such as gpt2")
        name = f"conveyor_user_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            return sys.modules[name]
        loader = importlib.util.spec_from_file_location(name, path)
        assert loader is not None and loader.loader is not None
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module
        loader.loader.exec_module(module)
        return module
    return importlib.import_module(source)


def _seeded_build(build: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def build_model() -> nn.Module:
        torch.manual_seed(seed)
        return build()
    return build_model


def _seeded_batch(batch: Callable[[int, int], tuple[Any, Any]], seed: int) -> Callable[[int, int], tuple[Any, Any]]:
    """``batch`` run under the global random state of ``(seed, step)``, the caller's state restored."""
    def seeded(step: int, batch_size: int) -> tuple[Any, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + step)
            return batch(step, batch_size)
    return seeded


def _user(source: str, seed: int) -> Workload:
    torch.manual_seed(seed)  # module-level randomness of a first import
    module = _module(source)
    missing = [name for name in ("build_model", "batch", "loss_fn") if not hasattr(module, name)]
    if missing:
        raise AttributeError(f"{source} does not define {missing}: a training script defines build_model(), "
                             "batch(step, batch_size) and loss_fn(output, target) (see docs/cli.md)")
    return Workload(source, _seeded_build(module.build_model, seed), _seeded_batch(module.batch, seed),
                    module.loss_fn, getattr(module, "optimizer", _adamw), int(getattr(module, "BATCH_SIZE", 16)))


def _model_type(source: str) -> str | None:
    name = source.removeprefix("hf:")
    if importlib.util.find_spec("transformers") is None:
        return None
    from transformers import CONFIG_MAPPING

    return name if name in CONFIG_MAPPING else None


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def load_workload(spec: WorkloadSpec) -> Workload:
    """Build the workload a spec names (see the module docstring): ``demo``, a ``.py`` file, a
    transformers model type (``hf:`` prefix optional; it wins over a module of the same name), or
    an importable module."""
    source = spec.source
    if source == "demo":
        return _demo(spec)
    if source.endswith(".py"):
        return _user(source, spec.seed)
    model_type = _model_type(source)
    if model_type is not None:
        return _transformers(spec, model_type)
    if not source.startswith("hf:") and _importable(source):
        return _user(source, spec.seed)
    raise ValueError(f"{source!r} is neither 'demo', a .py file, an importable module, nor a transformers "
                     "model type (e.g. gpt2); check the spelling")
