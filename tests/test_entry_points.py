"""What PipelineRunner and LocalPipeline share through the executor core and entry.py: option
checks, anomaly detection, close() and the context manager."""

from __future__ import annotations

import pytest
import torch

import conveyor

from models import batch, mlp, mse


def _local(**options: object) -> conveyor.LocalPipeline:
    return conveyor.LocalPipeline(conveyor.pipeline(mlp(), n_stages=2), schedule="1f1b", n_microbatches=2,
                                  loss_fn=mse, **options)


def _runner(**options: object) -> conveyor.PipelineRunner:
    return conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=1), schedule="1f1b", n_microbatches=2,
                                   loss_fn=mse, **options)


def test_a_misspelt_runner_option_lists_the_runner_and_schedule_options(one_rank_group: None) -> None:
    with pytest.raises(TypeError, match=r"PipelineRunner got an unexpected option 'recomptue'; runner options: "
                                        r"schedule, .*recompute.*timeout; schedule '1f1b' takes: replicas$"):
        _runner(recomptue=True)


def test_a_misspelt_local_pipeline_option_lists_the_options() -> None:
    with pytest.raises(TypeError, match=r"LocalPipeline got an unexpected option 'detect_anomally'; runner "
                                        r"options: .*detect_anomaly.*; schedule '1f1b' takes: replicas$"):
        _local(detect_anomally=True)


def test_a_schedule_option_still_reaches_its_generator(one_rank_group: None) -> None:
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=1), schedule="pipedream", n_microbatches=2,
                                     loss_fn=mse, vertical_sync=True)
    assert runner.schedule.name == "pipedream (vertical sync)"


def test_the_runner_takes_a_timeout_in_seconds(one_rank_group: None) -> None:
    assert _runner(timeout=12.5).timeout == 12.5
    with pytest.raises(ValueError, match=r"timeout must be a positive number of seconds, got 0"):
        _runner(timeout=0)


def test_a_stream_refuses_token_weighting_it_cannot_honour(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match=r"schedule 'pipedream' cannot honour loss_weighting='tokens'.*"
                                         r"keep loss_weighting='rows'"):
        conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=1), schedule="pipedream", n_microbatches=2,
                                loss_fn=mse, loss_weighting="tokens")


def _poison(module: object, args: object, output: torch.Tensor) -> torch.Tensor:
    return output * float("nan")


def test_a_local_pipeline_with_detect_anomaly_names_where_a_nan_appeared() -> None:
    pipeline = _local(detect_anomaly=True)
    x, y = batch(0)
    pipeline.step(x, target=y)  # a clean step first
    pipeline.stages[1].module.register_forward_hook(_poison)
    with pytest.raises(conveyor.PipelineError, match=r"^rank 1, stage 1, micro-batch 0, action 1F0: "
                                                      r"FloatingPointError: the loss contains NaN"):
        pipeline.step(x, target=y)


def test_a_local_pipeline_without_detect_anomaly_lets_a_nan_through() -> None:
    pipeline = _local()
    pipeline.stages[1].module.register_forward_hook(_poison)
    x, y = batch(0)
    assert torch.isnan(pipeline.step(x, target=y))


def test_a_local_pipeline_records_every_lanes_actions_in_its_trace() -> None:
    pipeline = _local()
    x, y = batch(0)
    pipeline.step(x, target=y)
    assert sorted((event.rank, event.action) for event in pipeline.trace) == sorted(
        (rank, str(action)) for rank, actions in enumerate(pipeline.schedule.ranks) for action in actions)


def test_close_releases_the_transport_once_and_later_calls_are_refused(one_rank_group: None) -> None:
    runner = _runner()
    closed = []
    runner.transport.close = lambda: closed.append(True)  # type: ignore[attr-defined]
    runner.close()
    runner.close()
    assert closed == [True]
    x, y = batch(0)
    with pytest.raises(RuntimeError, match=r"this PipelineRunner is closed: build a new one"):
        runner.step(x, target=y)
    with pytest.raises(RuntimeError, match=r"this PipelineRunner is closed"):
        runner.forward(x)


def test_a_with_block_closes_the_runner(one_rank_group: None) -> None:
    with _runner() as runner:
        x, y = batch(0)
        runner.step(x, target=y)
    with pytest.raises(RuntimeError, match=r"this PipelineRunner is closed"):
        runner.step(x, target=y)


def test_a_with_block_closes_a_local_pipeline() -> None:
    x, y = batch(0)
    with _local() as pipeline:
        pipeline.step(x, target=y)
    with pytest.raises(RuntimeError, match=r"this LocalPipeline is closed"):
        pipeline.step(x, target=y)
