"""examples/llama_3d.py at tiny size (float64): a Hugging Face Llama cut into 2 stages, tensor
parallel per decoder layer (and FSDP2 over dp in the slow 8-rank run), trains exactly like the
unsplit Hugging Face model in one process, and its checkpoint holds the unsplit model's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import conveyor

from llama_workers import fit_and_save, llama_3d, tiny

pytest.importorskip("transformers")

ATOL = 1e-10


def _run(tmp_path: Path, pp: int, dp: int, tp: int) -> tuple[dict, object]:
    config = tiny(pp=pp, dp=dp, tp=tp, checkpoint=str(tmp_path / "checkpoint"))
    per_rank = conveyor.launch(fit_and_save, pp * dp * tp, args=(config,), timeout=300)
    return per_rank[-1], config  # the last rank holds the last stage


@pytest.fixture(scope="module")
def pp2_tp2(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, object]:
    return _run(tmp_path_factory.mktemp("llama"), pp=2, dp=1, tp=2)


def _unsplit(config: object) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = llama_3d.build_model(config)
    losses = llama_3d.train_unsplit(config, model)
    return losses, llama_3d.sequential(model).state_dict()


def test_pp2_tp2_losses_equal_the_unsplit_hugging_face_models(pp2_tp2: tuple[dict, object]) -> None:
    result, config = pp2_tp2
    expected, _ = _unsplit(config)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected), atol=ATOL, rtol=0)


def test_pp2_tp2_checkpoint_holds_the_unsplit_models_trained_weights(pp2_tp2: tuple[dict, object]) -> None:
    result, config = pp2_tp2
    assert result["save_error"] == ""
    _, weights = _unsplit(config)
    saved = conveyor.load_full(config.checkpoint)
    assert sorted(saved) == sorted(weights)
    for name, value in weights.items():
        torch.testing.assert_close(saved[name], value, atol=ATOL, rtol=0, msg=name)


@pytest.mark.slow
def test_pp2_dp2_tp2_losses_equal_the_unsplit_hugging_face_models(tmp_path: Path) -> None:
    result, config = _run(tmp_path, pp=2, dp=2, tp=2)
    expected, _ = _unsplit(config)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected), atol=ATOL, rtol=0)


def test_balance_puts_the_embedding_first_and_the_head_last() -> None:
    assert llama_3d.balance(4, 2) == [3, 3]
    assert llama_3d.balance(5, 2) == [4, 3]
    assert llama_3d.balance(2, 2) == [2, 2]
