"""Stages compiled with ``torch.compile``: their backward cannot be split into I and W.

AOTAutograd turns a compiled region into one autograd node whose backward computes the gradients
of its inputs and of its weights together. Asked for the input gradients only (``I``), the engine
still runs that whole node, and asked again for the weight gradients (``W``), it runs it again:
a split backward would cost two full backwards. So a stage whose module (or a submodule) is
compiled runs its whole backward at ``I`` time, accumulating the weight gradients there, and its
``W`` does nothing: the gradients are the same, the weight pass just cannot be deferred to fill
bubbles (docs/schedules.md measures it).
"""

from __future__ import annotations

import sys

import torch.nn as nn

__all__ = ["is_compiled"]


def is_compiled(module: nn.Module) -> bool:
    """Whether ``torch.compile`` compiled ``module`` or one of its submodules (``torch.compile(m)``
    or ``m.compile()``). Functions compiled inside ``forward`` are not seen: their stages split
    the backward, correctly but paying the compiled backward twice."""
    if "torch._dynamo" not in sys.modules:  # nothing can have been compiled
        return False
    optimized = getattr(getattr(sys.modules["torch._dynamo"], "eval_frame", None), "OptimizedModule", None)
    for sub in module.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            return True
        if optimized is not None and isinstance(sub, optimized):
            return True
    return False
