"""``conveyor train``: train a workload (see :mod:`conveyor.workloads`) on a pipeline, with a
progress bar, periodic checkpoints, ``--resume`` and a timeline picture of the last step.

Checkpoints go to ``<checkpoint-dir>/step-<NNNNNN>`` (``conveyor.checkpoint.save``: model and optimizer under
the unsplit model's names, plus each rank's random state); ``--resume`` loads the highest step
there and continues with the same per-step batches, so the weights equal an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import complete_steps, latest
from .cli_args import require_extra
from .workloads import WorkloadSpec, load_workload

__all__ = ["TrainConfig", "latest_checkpoint", "run_train"]

TWO_STAGES_PER_RANK = ("interleaved-1f1b", "zb-v", "v-zb", "v-min", "v-half", "dualpipev")  # default --chunks 2


@dataclass(frozen=True)
class TrainConfig:
    spec: WorkloadSpec
    ranks: int = 4
    schedule: str = "1f1b"
    microbatches: int = 8
    chunks: int = 1            # stages per rank (TWO_STAGES_PER_RANK: 2)
    sizes: tuple[int, ...] | None = None  # blocks per stage (from the planner); None: balanced by parameters
    steps: int = 100
    batch_size: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # 0: only at the end
    keep: int = 2
    resume: bool = False
    timeline: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        at_least = {"ranks": 1, "microbatches": 1, "chunks": 1, "steps": 1, "batch_size": 1, "checkpoint_every": 0,
                    "keep": 1}
        for name, minimum in at_least.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < minimum):
                raise ValueError(f"TrainConfig.{name} must be an integer >= {minimum}, got {value!r}")


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The ``step-N`` folder with the highest ``N`` that holds a finished checkpoint (a manifest)."""
    return latest(directory)


def _prune(directory: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest complete checkpoints (``keep >= 1``: the newest complete
    one always stays); folders without a manifest (a save killed midway) never count, and are
    left alone."""
    for _, path in complete_steps(directory)[:-max(1, keep)]:
        shutil.rmtree(path, ignore_errors=True)


def check_checkpoint_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` and write a file into it, so that an unusable ``--checkpoint-dir``
    fails before the first step instead of at the first save."""
    root = Path(directory)
    probe = root / f".conveyor-write-test-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"conveyor")
        probe.unlink()
    except OSError as error:
        raise OSError(f"--checkpoint-dir {str(root)!r} is not usable: {error.strerror or error} "
                      "(checked before the first step; choose a writable folder)") from None
    return root


def _restarts(config: TrainConfig) -> int:
    """How often torchrun (``--max-restarts``) restarted this job: the most any rank was told.

    Every rank must agree, so they share it: after another node's failure an agent restarts its
    workers without counting a restart of its own (``TORCHELASTIC_RESTART_COUNT`` stays 0)."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or not config.checkpoint_dir:
        return 0
    counts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, int(os.environ["TORCHELASTIC_RESTART_COUNT"] or 0))
    return max(counts)


def _agreed_latest(directory: str, world_size: int) -> Path | None:
    """Rank 0's newest complete checkpoint, checked to be every rank's."""
    found = latest(directory)
    if world_size == 1:
        return found
    seen: list[Any] = [None] * world_size
    dist.all_gather_object(seen, None if found is None else str(found))
    if len(set(seen)) > 1:
        raise RuntimeError(f"the ranks see different newest checkpoints under {directory} ({seen}): "
                           "--checkpoint-dir must be one folder every rank reaches (a shared file system)")
    return found


def _worker(rank: int, world_size: int, config: TrainConfig) -> dict[str, Any]:
    import conveyor
    from conveyor import checkpoint
    from conveyor.timeline import gather, measured_bubble

    torch.manual_seed(config.spec.seed)
    workload = load_workload(config.spec)
    batch_size = config.batch_size or workload.batch_size
    model = workload.build_model()
    n_stages = len(config.sizes) if config.sizes else world_size * config.chunks
    example, _ = workload.inputs(0, max(2, batch_size // config.microbatches))
    pipe = conveyor.pipeline(model, n_stages=n_stages, balance=list(config.sizes) if config.sizes else "params",
                             example_args=example)
    runner = conveyor.PipelineRunner(pipe, schedule=config.schedule, n_microbatches=config.microbatches,
                                     loss_fn=workload.loss_fn)
    optimizer = workload.optimizer_for(runner.parameters())
    first = 0
    restarts = _restarts(config)
    if config.resume or (restarts and config.checkpoint_dir):
        found = _agreed_latest(config.checkpoint_dir or "", world_size)
        if found is None and config.resume:
            raise FileNotFoundError(f"--resume found no checkpoint under {config.checkpoint_dir}: train without "
                                    "--resume first (with --checkpoint-dir)")
        if found is not None:
            first = int(checkpoint.load(runner, found, optimizer)["step"] or 0)
        if restarts and rank == 0:
            print(f"restart {restarts}: " + (f"resuming from {found} (step {first})" if found else
                                            "no complete checkpoint yet, starting from step 0"), flush=True)
    shows = config.progress and rank == runner.schedule.placement[-1]
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())  # its default multiprocessing lock leaks a semaphore per rank

    losses: list[float] = []
    bubble = float("nan")
    start = time.perf_counter()
    def save(done: int) -> None:
        if config.checkpoint_dir and ((config.checkpoint_every and done % config.checkpoint_every == 0)
                                      or done == config.steps):
            path = Path(config.checkpoint_dir) / f"step-{done:06d}"
            checkpoint.save(runner, path, optimizer, step=done)
            dist.barrier()
            if rank == 0:
                _prune(Path(config.checkpoint_dir), config.keep)

    with tqdm(total=config.steps, initial=first, disable=not shows, unit="step", dynamic_ncols=True) as bar:
        if runner.schedule.is_streaming:  # asynchronous: stream chunks that drain at each checkpoint
            chunk = config.checkpoint_every or 10
            for chunk_start in range(first, config.steps, chunk):
                steps = range(chunk_start, min(config.steps, chunk_start + chunk))
                batches = ((tuple(inputs), target) for inputs, target in
                           (workload.inputs(step, batch_size) for step in steps))
                for index, loss in enumerate(runner.stream(batches, optimizer), 1):
                    losses.append(float(loss))
                    if index % config.microbatches == 0:
                        rate = len(losses) / config.microbatches * batch_size / (time.perf_counter() - start)
                        bar.set_postfix(loss=f"{losses[-1]:.3f}", samples_s=f"{rate:,.1f}", bubble=f"{bubble:.2f}")
                        bar.update()
                bubble = measured_bubble(gather(runner), world_size)
                save(steps[-1] + 1)
        else:
            for step in range(first, config.steps):
                inputs, target = workload.inputs(step, batch_size)
                optimizer.zero_grad()
                loss = runner.step(*inputs, target=target)
                optimizer.step()
                done = step + 1
                if done % 10 == 0 or done == config.steps:  # a collective: every rank decides alike
                    events = gather(runner)
                    bubble = measured_bubble(events, world_size)
                if loss is not None:
                    losses.append(float(loss))
                    rate = len(losses) * batch_size / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", samples_s=f"{rate:,.1f}", bubble=f"{bubble:.2f}")
                bar.update()
                save(done)
    events = gather(runner) if first < config.steps else []
    return {"losses": losses, "events": events if rank == 0 else None, "first_step": first,
            "seconds": time.perf_counter() - start, "bubble": bubble, "summary": repr(pipe) if rank == 0 else None}


def run_train(config: TrainConfig, *, timeout: float | None = None) -> dict[str, Any]:
    """Train on local processes (``conveyor.launch``), or join torchrun's job when its
    environment is set; print a summary and draw the last step's timeline."""
    import conveyor

    if config.resume and not config.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir (where the checkpoints are)")
    if config.checkpoint_dir:
        check_checkpoint_dir(config.checkpoint_dir)
    if config.timeline and not config.timeline.endswith(".json"):
        require_extra("matplotlib", "plot", "--timeline (a picture)")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: every rank reports its own share
        per_rank = [conveyor.run(_worker, config)]
    else:
        per_rank = conveyor.launch(_worker, config.ranks, args=(config,), timeout=timeout)
    trained = next((r for r in per_rank if r["losses"]), None)  # the last stage's rank
    head = per_rank[0]
    if head["summary"]:
        print(head["summary"])
    if trained is not None:
        losses = trained["losses"]
        print(f"steps {trained['first_step']}..{config.steps}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
              f"{len(losses) / trained['seconds']:.2f} steps/s, measured bubble {trained['bubble']:.2f}")
    elif head["first_step"] >= config.steps:
        print(f"nothing to do: the checkpoint is already at step {head['first_step']} of {config.steps}")
    if config.timeline and head["events"]:
        if config.timeline.endswith(".json"):
            print(f"wrote {conveyor.timeline.chrome_trace(head['events'], config.timeline)}")
        else:
            print(f"wrote {conveyor.timeline.render(head['events'], config.timeline)}")
    if config.checkpoint_dir and head["summary"]:
        print(f"checkpoint: {latest_checkpoint(config.checkpoint_dir)}")
    return {"losses": trained["losses"] if trained else [], "first_step": head["first_step"]}


def with_plan(config: TrainConfig, sizes: tuple[int, ...], schedule: str, microbatches: int) -> TrainConfig:
    """The config with the planner's choice of split, schedule and micro-batch count."""
    return replace(config, sizes=sizes, schedule=schedule, microbatches=microbatches, chunks=1)




def _train(args: argparse.Namespace) -> None:
    from .cli_plan import plan_workload, spec_from_args

    spec = spec_from_args(args)
    chunks = args.chunks or (2 if args.schedule in TWO_STAGES_PER_RANK else 1)
    config = TrainConfig(spec, ranks=args.stages, schedule=args.schedule, microbatches=args.microbatches,
                         chunks=chunks, steps=args.steps, batch_size=args.batch_size,
                         checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, keep=args.keep,
                         resume=args.resume, timeline=args.timeline)
    if args.plan:
        chosen = plan_workload(spec, args.stages, batch_size=args.batch_size, memory_per_rank=args.memory_per_rank)
        # conveyor train lays out one stage per rank (or chunks per rank): no replicated layouts
        best = next((c for c in chosen.candidates if c.fits and c.runnable and not c.replicas), None)
        if best is None:
            raise ValueError("the planner found no runnable configuration that fits; raise --memory-per-rank")
        print(f"plan: {best.label()} (split by {best.split}), predicted step {best.step_s * 1e3:.1f} ms")
        config = with_plan(config, best.sizes, best.schedule, best.n_microbatches)
    run_train(config, timeout=args.timeout)


def register(commands: argparse._SubParsersAction) -> None:
    from .cli_args import at_least, positive_float
    from .cli_plan import add_workload_arguments, parse_bytes

    parser = commands.add_parser("train", help="train a script, module, the demo or a transformers model on a pipeline",
                                 description="Train on a pipeline of local processes (or under torchrun) with "
                                             "checkpoints, --resume and a timeline picture. See docs/cli.md.")
    add_workload_arguments(parser)
    parser.add_argument("--stages", type=at_least(1), default=4, help="pipeline ranks = local processes (default 4)")
    parser.add_argument("--schedule", default="1f1b",
                        help="gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-h2, zb-v (v-zb), v-min, v-half, dualpipev, "
                             "pipedream, pipedream-2bw (default 1f1b)")
    parser.add_argument("--microbatches", type=at_least(1), default=8, help="micro-batches per step (default 8)")
    parser.add_argument("--chunks", type=at_least(1), default=None,
                        help="stages per rank (default 2 for interleaved-1f1b and the V schedules, else 1)")
    parser.add_argument("--steps", type=at_least(1), default=100, help="train up to this step (default 100)")
    parser.add_argument("--plan", action="store_true", help="profile and plan first; use the top runnable choice")
    parser.add_argument("--memory-per-rank", type=parse_bytes, default=None, help="with --plan: e.g. 8G")
    parser.add_argument("--checkpoint-dir", default=None, help="save checkpoints here (step-NNNNNN folders)")
    parser.add_argument("--checkpoint-every", type=at_least(0), default=0,
                        help="save every K steps (default: at the end)")
    parser.add_argument("--keep", type=at_least(1), default=2,
                        help="complete checkpoints to keep, the newest always among them (default 2)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    parser.add_argument("--timeline", default=None, help="draw the last step's timeline to this file (.png/.svg)")
    parser.add_argument("--timeout", type=positive_float, default=None, help="end the job after this many seconds")
    parser.set_defaults(handler=_train)
