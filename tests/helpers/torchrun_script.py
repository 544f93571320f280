"""Run under torchrun by test_torchrun.py: a 4-stage 1F1B step through conveyor.run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import conveyor  # noqa: E402

import workers  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    grads = conveyor.run(workers.torchrun_grads)
    torch.save(grads, Path(sys.argv[1]) / f"grads-{os.environ['RANK']}.pt")
