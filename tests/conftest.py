"""Shared fixtures: a one-rank process group in the test process for errors caught before any
communication; GPUs hidden unless CONVEYOR_TEST_CUDA=1; the helper modules of tests/helpers/
(models, workers, ...) importable by their plain names."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

# Tests import their helpers as ``import workers`` / ``from models import mlp``. Worker processes
# started by conveyor.launch (fork server or spawn) inherit this sys.path, so they unpickle
# functions of these modules by the same names.
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

if os.environ.get("CONVEYOR_TEST_CUDA") != "1":
    # The suite compares with CPU references, and runners default to CUDA where it exists: hide
    # GPUs (before anything initialises CUDA). tests/test_gpu.py runs with CONVEYOR_TEST_CUDA=1.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest
import torch
import torch.distributed as dist


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
