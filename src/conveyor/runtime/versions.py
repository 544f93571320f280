"""Weight stashing: the versions of one stage's weights that asynchronous schedules run with.

Version ``n`` is the stage's weights after ``n`` updates. The live parameters (the ones the
user's optimizer holds) are always the newest version; every version a forward may use is a
detached copy, so the optimizer can update the live parameters in place while older versions
still serve the backwards of micro-batches in flight. A version is dropped once no stashed
micro-batch uses it and no later forward can ask for it (forward versions never decrease, and
an update says which version the next forward uses). ``peak`` counts the copies held at once,
besides the live parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["WeightVersions"]


class WeightVersions:
    """The stashed weight versions of one stage module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.live = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.store: dict[int, dict[str, torch.Tensor]] = {}
        self.users: dict[int, int] = {}   # version -> stashed micro-batches that use it
        self.newest = 0                   # updates applied so far
        self.floor = 0                    # the oldest version a future forward may ask for
        self.peak = 0
        self._snapshot()

    def _snapshot(self) -> None:
        self.store[self.newest] = {name: p.detach().clone().requires_grad_(True) for name, p in self.live.items()}
        self.peak = max(self.peak, len(self.store))

    def weights(self, version: int) -> dict[str, torch.Tensor]:
        """The tensors of ``version`` (leaves that collect the gradient of a backward)."""
        if version not in self.store:
            raise RuntimeError(f"weight version {version} is not stashed (held: {sorted(self.store)}); "
                               "a forward asked for a version older than an earlier forward's")
        return self.store[version]

    def acquire(self, version: int) -> dict[str, torch.Tensor]:
        """The tensors of ``version`` for a forward whose backward will come later."""
        weights = self.weights(version)
        self.users[version] = self.users.get(version, 0) + 1
        self.floor = max(self.floor, version)
        return weights

    def release(self, version: int) -> None:
        """A backward on ``version`` is done: move its gradient to the live parameters."""
        for name, tensor in self.store[version].items():
            if tensor.grad is not None:
                live = self.live[name]
                live.grad = tensor.grad if live.grad is None else live.grad.add_(tensor.grad)
                tensor.grad = None
        self.users[version] -= 1
        if not self.users[version]:
            del self.users[version]
        self._prune()

    def updated(self, floor: int | None = None) -> None:
        """The optimizer has stepped the live parameters: they are the next version. ``floor``:
        no later forward uses an older version than this (the program says so)."""
        self.newest += 1
        if floor is not None:
            self.floor = max(self.floor, floor)
        self._prune()
        self._snapshot()

    def _prune(self) -> None:
        for version in [v for v in self.store if v < self.floor and v not in self.users]:
            del self.store[version]
