"""One trace per job: rank 0 traces and cuts, the other ranks rebuild the same stages."""

from __future__ import annotations

import pytest

import conveyor

pytest.importorskip("transformers")

import hf_workers as hw  # noqa: E402


@pytest.fixture(scope="module")
def shipped() -> list[dict]:
    return conveyor.launch(hw.shipping_worker, 2, timeout=240)


def test_only_rank_0_runs_torch_export(shipped: list[dict]) -> None:
    assert [result["exports"] for result in shipped] == [2, 0]  # the Llama and the refused model


def test_every_rank_holds_the_same_stage_graphs_and_summary(shipped: list[dict]) -> None:
    assert shipped[1]["code"] == shipped[0]["code"]
    assert shipped[1]["summary"] == shipped[0]["summary"]


def test_rebuilt_stages_compute_the_unsplit_models_output(shipped: list[dict]) -> None:
    assert all(result["equal"] for result in shipped)


def test_a_split_refused_on_rank_0_is_refused_on_every_rank(shipped: list[dict]) -> None:
    assert "cannot cut TwoBlocks into 5 stages" in shipped[0]["refused"]
    assert shipped[1]["refused"] == shipped[0]["refused"]
