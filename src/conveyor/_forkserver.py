"""Imported by multiprocessing's fork server only (a preload of :func:`conveyor.launch`): when its
launcher is gone the server leaves at once, skipping the interpreter's slow teardown of torch, so
that no process of a job outlives its launcher by more than a moment."""

from __future__ import annotations

import atexit
import os

__all__: list[str] = []

atexit.register(os._exit, 0)  # registered first, so run last: after every other exit handler
