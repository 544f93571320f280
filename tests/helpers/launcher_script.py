"""Run as a process of its own by test_launcher_death.py: conveyor.launch of 2 ranks that train
a tiny pipeline step after step until they are ended, each writing its pid and a step count."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import conveyor  # noqa: E402

from models import batch, mlp, mse  # noqa: E402


def train_forever(rank: int, world_size: int, folder: str) -> None:
    torch.set_num_threads(1)
    Path(folder, f"rank-{rank}.pid").write_text(str(os.getpid()))
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=world_size), schedule="1f1b",
                                     n_microbatches=4, loss_fn=mse)
    x, y = batch(0)
    step = 0
    while True:
        runner.step(x, target=y)
        step += 1
        Path(folder, f"rank-{rank}.steps").write_text(str(step))


if __name__ == "__main__":
    Path(sys.argv[1], "launcher.pid").write_text(str(os.getpid()))
    conveyor.launch(train_forever, 2, args=(sys.argv[1],), timeout=120)
