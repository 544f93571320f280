"""The 3D Llama example's core (examples/llama_3d.py, loaded from its path so launched workers
find it by this module's name) at tiny sizes, in float64."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

_PATH = Path(__file__).resolve().parents[2] / "examples" / "llama_3d.py"
if "llama_3d" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("llama_3d", _PATH)
    assert _spec is not None and _spec.loader is not None
    sys.modules["llama_3d"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["llama_3d"])
llama_3d = sys.modules["llama_3d"]


def tiny(pp: int = 2, dp: int = 1, tp: int = 2, checkpoint: str = "") -> Any:
    """The example's config at test size: 2 decoder layers, hidden 32, 4 heads over 2 KV heads."""
    return llama_3d.Config(pp=pp, dp=dp, tp=tp, layers=2, hidden=32, heads=4, kv_heads=2, seq=16, batch=8,
                           microbatches=2, steps=3, dtype="float64", checkpoint=checkpoint)


def fit_and_save(rank: int, world_size: int, config: Any) -> dict[str, Any]:
    """The example's training, then its checkpoint; a failed save is reported, not raised, so the
    losses are checked on their own."""
    runner, optimizer, losses = llama_3d.fit(config)
    saved = ""
    try:
        runner.save(config.checkpoint, optimizer, step=config.steps)
    except Exception as error:  # noqa: BLE001 - reported to the test
        saved = f"{type(error).__name__}: {error}"
    runner.close()
    return {"losses": losses, "save_error": saved}
