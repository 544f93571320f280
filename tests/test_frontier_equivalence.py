"""DualPipeV, V-Min, V-Half, V-ZB and ZB-H2 train exactly like the unsplit model (float64, every
stage in one process): 2 and 4 ranks, micro-batch counts from each schedule's least up (some not a
multiple of the rank count), with and without recompute, on an MLP, a model whose residual skips
every stage boundary, and a model whose first and last stages share a weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import conveyor
from conveyor.partition.pipe import Pipe

from models import DTYPE, WIDTH, _Named, _Tanh, batch, mlp, mse, skip_model, token_loss

ATOL = 1e-10
STEPS = 2  # gradients of the first step, weights after two Adam steps
VOCAB = 11

# schedule: (stages per rank, least micro-batches for p ranks)
SCHEDULES = {
    "dualpipev": (2, lambda p: 2 * p),
    "v-min": (2, lambda p: 1),
    "v-half": (2, lambda p: 1),
    "v-zb": (2, lambda p: 1),
    "zb-h2": (1, lambda p: 1),
}


def _microbatch_counts(name: str, p: int) -> list[int]:
    least = SCHEDULES[name][1](p)
    return sorted({least, 2 * p + 1})  # 2p + 1 is never a multiple of p


NEW = ("dualpipev", "v-min", "v-half", "zb-h2")
CONFIGS = ([(name, p, m, model, recompute)
            for name in NEW for p in (2, 4) for m in _microbatch_counts(name, p)
            for model in ("mlp", "skip", "tied") for recompute in (False, True)]
           + [(name, p, 3 * p, "mlp", recompute) for name in NEW for p in (2, 4) for recompute in (False, True)]
           + [("v-zb", 2, 5, model, recompute) for model in ("mlp", "skip", "tied") for recompute in (False, True)])


class TiedChain(nn.Module):
    """Embedding, ``n - 2`` Linear + tanh blocks, and a head that reuses the embedding's weight."""

    def __init__(self, n_stages: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, WIDTH, dtype=DTYPE)
        self.n_middle = n_stages - 2
        for index in range(self.n_middle):
            self.add_module(f"mid{index}", nn.Linear(WIDTH, WIDTH, dtype=DTYPE))
        self.norm = nn.LayerNorm(WIDTH, dtype=DTYPE)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        for index in range(self.n_middle):
            hidden = torch.tanh(getattr(self, f"mid{index}")(hidden))
        return self.norm(hidden) @ self.embed.weight.T


class _Head(nn.Module):
    def __init__(self, model: TiedChain) -> None:
        super().__init__()
        self.embed, self.norm = model.embed, model.norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden) @ self.embed.weight.T


def _tied_pipe(model: TiedChain) -> Pipe:
    middle = [_Named(**{f"mid{i}": getattr(model, f"mid{i}")}, act=_Tanh()) for i in range(model.n_middle)]
    pipe = Pipe([_Named(embed=model.embed), *middle, _Head(model)])
    pipe.ties = {"embed.weight": [0, model.n_middle + 1]}
    return pipe


def _model(kind: str, n_stages: int) -> tuple[nn.Module, Pipe]:
    """The unsplit model and a pipe of a fresh, identical copy."""
    if kind == "mlp":
        return mlp(layers=2 * n_stages), conveyor.pipeline(mlp(layers=2 * n_stages), n_stages=n_stages)
    if kind == "skip":
        return nn.Sequential(*skip_model(n_stages)), conveyor.pipeline(skip_model(n_stages))
    return TiedChain(n_stages), _tied_pipe(TiedChain(n_stages))


def _data(kind: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kind != "tied":
        return batch(step, rows=18)
    generator = torch.Generator().manual_seed(step)
    return (torch.randint(0, VOCAB, (18, 3), generator=generator),
            torch.randint(0, VOCAB, (18, 3), generator=generator))


def _train(module: nn.Module, step_fn, kind: str) -> tuple[dict, dict, list[float]]:
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    grads, losses = {}, []
    for step in range(STEPS):
        optimizer.zero_grad()
        x, y = _data(kind, step)
        losses.append(float(step_fn(x, y)))
        if step == 0:
            grads = {name: p.grad.clone() for name, p in module.named_parameters()}
        optimizer.step()
    return grads, module.state_dict(), losses


def _max_difference(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max((ours[name] - theirs[name]).abs().max().item() for name in theirs)


def _name(config: tuple) -> str:
    name, p, m, model, recompute = config
    return f"{name}-{p}ranks-{m}mb-{model}" + ("-recompute" if recompute else "")


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_gradients_weights_and_loss_equal_the_unsplit_model(config: tuple) -> None:
    name, p, m, kind, recompute = config
    n_stages = SCHEDULES[name][0] * p
    reference, pipe = _model(kind, n_stages)
    loss_fn = token_loss if kind == "tied" else mse
    pipeline = conveyor.LocalPipeline(pipe, schedule=name, n_microbatches=m, loss_fn=loss_fn, n_ranks=p,
                                      recompute=recompute)
    ours = _train(pipeline, lambda x, y: pipeline.step(x, target=y), kind)

    def unsplit_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(reference(x), y)
        loss.backward()
        return loss.detach()

    theirs = _train(reference, unsplit_step, kind)
    assert _max_difference(ours[0], theirs[0]) < ATOL
    assert _max_difference(ours[1], theirs[1]) < ATOL
    assert ours[2] == pytest.approx(theirs[2], abs=ATOL, rel=0)


def test_every_new_v_schedule_runs_on_its_v_placement() -> None:
    pipe = conveyor.pipeline(mlp(layers=16), n_stages=8)
    for name in ("dualpipev", "v-min", "v-half", "v-zb"):
        pipeline = conveyor.LocalPipeline(pipe, schedule=name, n_microbatches=8, loss_fn=mse, n_ranks=4)
        assert pipeline.schedule.placement == (0, 1, 2, 3, 3, 2, 1, 0)


def test_dualpipev_below_2p_microbatches_is_refused_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="raise n_microbatches to 8"):
        conveyor.LocalPipeline(conveyor.pipeline(mlp(layers=16), n_stages=8), schedule="dualpipev",
                               n_microbatches=7, loss_fn=mse, n_ranks=4)
