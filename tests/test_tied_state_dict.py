"""The stages' state dicts of a model with tied weights, merged, load with strict=True into the
unsplit model, tied aliases included (head.weight is embed.weight); so does a checkpoint's."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

import conveyor
from conveyor import checkpoint


class TiedHeadLM(nn.Module):
    """``head.weight`` is ``embed.weight``: the unsplit state_dict lists both names."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(11, 8, dtype=torch.float64)
        self.mid = nn.Linear(8, 8, dtype=torch.float64)
        self.head = nn.Linear(8, 11, bias=False, dtype=torch.float64)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.embed(ids))))


def _token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, 11), target.reshape(-1))


def _train_and_save(rank: int, world_size: int, path: str) -> dict:
    torch.set_num_threads(1)
    pipe = conveyor.pipeline(TiedHeadLM(), n_stages=world_size, example_args=(torch.zeros(2, 5, dtype=torch.long),))
    runner = conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=2, loss_fn=_token_loss)
    optimizer = torch.optim.SGD(runner.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    ids, target = (torch.randint(0, 11, (4, 5), generator=generator) for _ in range(2))
    optimizer.zero_grad()
    runner.step(ids, target=target)
    optimizer.step()
    checkpoint.save(runner, path, optimizer, step=1)
    return {name: tensor.detach().clone() for name, tensor in runner.state_dict().items()}


def test_merged_stage_state_dicts_and_a_checkpoint_load_strictly_into_the_tied_model(tmp_path: Path) -> None:
    path = tmp_path / "tied"
    per_rank = conveyor.launch(_train_and_save, 2, args=(str(path),), timeout=120)
    merged: dict = {}
    for state in per_rank:
        merged.update(state)
    assert merged.keys() == TiedHeadLM().state_dict().keys()
    assert torch.equal(merged["head.weight"], merged["embed.weight"])
    for state_dict in (merged, checkpoint.load_full(path)):
        model = TiedHeadLM(seed=1)
        model.load_state_dict(state_dict, strict=True)
        assert model.head.weight is model.embed.weight
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, merged[name]), name
    manifest = checkpoint.read_manifest(path)
    assert manifest["aliases"] == {"head.weight": "embed.weight"} and "head.weight" not in manifest["tensors"]


def test_a_tied_plain_module_round_trips_through_a_checkpoint_without_a_second_copy(tmp_path: Path) -> None:
    model = TiedHeadLM(seed=2)
    checkpoint.save_full(model, tmp_path / "plain")
    assert "head.weight" not in checkpoint.read_manifest(tmp_path / "plain")["tensors"]
    other = TiedHeadLM(seed=3)
    checkpoint.load(other, tmp_path / "plain")
    assert torch.equal(other.embed.weight, model.embed.weight) and other.head.weight is other.embed.weight
