"""Argument types for the ``conveyor`` command: numbers checked at parse time, so that a bad flag is
an argparse error naming it (``argument --microbatches: must be at least 1, got 0``) before any work."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable

__all__ = ["at_least", "positive_float", "non_negative_float", "require_extra"]


def at_least(minimum: int) -> Callable[[str], int]:
    """An ``int`` argument type that refuses values below ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A ``float`` argument type that refuses zero, negative and non-finite values."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A ``float`` argument type that refuses negative and non-finite values."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Raise ``ModuleNotFoundError`` naming the pip extra when an optional dependency is missing."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ModuleNotFoundError(f"{purpose} needs {module}, which is not installed: pip install 'conveyor[{extra}]'",
                                  name=module)
