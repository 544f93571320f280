"""GPU check for one machine with one GPU: gradients equal the unsplit model's on CUDA, and the
per-step cost of each execution mode, written as a markdown section for BENCHMARKS.md.

    python bench/gpu_check.py [--out FILE]   # on the GPU machine (writes $OUT/ or out/gpu_check.md)
    python bench/gpu_check.py --cpu-dry-run # the same code on CPU, small and quick

Modes: ``unsplit`` (the model itself), ``local`` (LocalPipeline: both stages in this process,
each rank a CUDA stream), ``2 procs host-staged`` (two processes sharing the GPU over gloo,
values staged through pinned host memory). Equality: float32, atol 1e-5 + rtol 1e-4, for gpipe,
1f1b and zb-h1. Timing: stages that do no work, and GPT-2 small at bf16 (fp32 master weights).
Exit status 1 if any gradient differs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "src"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))
# the processes conveyor.launch starts import this checkout's conveyor and bench too
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import conveyor  # noqa: E402

from bench import gpt2_small  # noqa: E402
from bench.workloads import overhead_workload, sum_loss  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4
SCHEDULES = ["gpipe", "1f1b", "zb-h1"]
N_MICROBATCHES = 4


class Settings:
    """What one run measures: full size on CUDA, or small on CPU (the dry run)."""

    def __init__(self, dry_run: bool, gpt2_kind: str) -> None:
        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.transport = "host-staged"  # forced, so the dry run stages (copies) on CPU too
        self.shape = gpt2_small.TINY if dry_run else gpt2_small.SMALL
        self.tokens = (4, 16) if dry_run else (8, 512)  # (rows, sequence length) per batch
        self.warmup, self.steps = (1, 3) if dry_run else (3, 15)
        self.gpt2_kind = gpt2_kind if gpt2_kind != "auto" else (
            "transformers" if gpt2_small.have_transformers() else "builtin")
        self.note = ""


# --- models and data ---------------------------------------------------------------------------------
def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[layer for _ in range(4) for layer in (nn.Linear(64, 64), nn.GELU())])


def mlp_batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(32, 64, generator=generator).to(device),
            torch.randn(32, 64, generator=generator).to(device))


def token_batch(settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    shape = (*settings.tokens,)
    ids = torch.randint(0, settings.shape.vocab_size, shape, generator=generator)
    labels = torch.randint(0, settings.shape.vocab_size, shape, generator=generator)
    return ids.to(settings.device), labels.to(settings.device)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step: Callable[[], Any], device: str, warmup: int, steps: int) -> list[float]:
    """Milliseconds per step, each step synchronised (so the GPU's work is included)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - began) * 1e3)
    return times


def _zero(parameters: Any) -> None:
    for parameter in parameters:
        parameter.grad = None


# --- equality ------------------------------------------------------------------------------------------
def reference_grads(device: str) -> dict[str, torch.Tensor]:
    model = mlp().to(device)
    x, y = mlp_batch(device)
    mse(model(x), y).backward()
    return {n: p.grad.detach().cpu() for n, p in model.named_parameters()}


def compare(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[bool, float]:
    if ours.keys() != reference.keys():
        return False, float("inf")
    worst = max((ours[n] - reference[n]).abs().max().item() for n in reference)
    return all(torch.allclose(ours[n], reference[n], atol=ATOL, rtol=RTOL) for n in reference), worst


def local_grads(schedule: str, n_stages: int, device: str) -> dict[str, torch.Tensor]:
    pipeline = conveyor.LocalPipeline(conveyor.pipeline(mlp(), n_stages=n_stages), schedule=schedule,
                                      n_microbatches=N_MICROBATCHES, loss_fn=mse, devices=device)
    x, y = mlp_batch(device)
    pipeline.step(x, target=y)
    return {n: p.grad.detach().cpu() for n, p in pipeline.named_parameters()}


def process_grads(rank: int, world_size: int, settings: Settings) -> dict[str, Any]:
    """Two processes sharing the GPU (gloo): per schedule, this rank's gradients."""
    results: dict[str, Any] = {}
    for schedule in SCHEDULES:
        runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=world_size), schedule=schedule,
                                         n_microbatches=N_MICROBATCHES, loss_fn=mse, device=settings.device,
                                         transport=settings.transport)
        x, y = mlp_batch(settings.device)
        runner.step(x, target=y)
        results[schedule] = {n: p.grad.detach().cpu() for n, p in runner.named_parameters()}
        results["transport"] = type(runner.transport).__name__
        results["device"] = str(runner.device)
    return results


def equality(settings: Settings) -> tuple[list[str], bool]:
    reference = reference_grads(settings.device)
    rows, all_ok = [], True
    for n_stages in (2, 4):
        for schedule in SCHEDULES:
            ok, worst = compare(local_grads(schedule, n_stages, settings.device), reference)
            all_ok &= ok
            verdict = "OK" if ok else "MISMATCH"
            rows.append(f"| local, {n_stages} stages on one device | {schedule} | {worst:.2e} | {verdict} |")
    per_rank = conveyor.launch(process_grads, 2, args=(settings,), backend="gloo", timeout=300)
    for schedule in SCHEDULES:
        merged = {**per_rank[0][schedule], **per_rank[1][schedule]}
        ok, worst = compare(merged, reference)
        all_ok &= ok
        where = f"{per_rank[0]['device']}, {per_rank[0]['transport']}"
        rows.append(f"| 2 processes ({where}) | {schedule} | {worst:.2e} | {'OK' if ok else 'MISMATCH'} |")
    return rows, all_ok


# --- timing --------------------------------------------------------------------------------------------
def _workload(kind: str, settings: Settings, n_stages: int | None) -> tuple[Any, nn.Module, Any, tuple, Any, str]:
    """(pipe, unsplit model, loss, inputs, target, precision) for "no-work" or "gpt2" (no pipe
    when ``n_stages`` is None)."""
    if kind == "no-work":
        work = overhead_workload(n_stages or 2)
        return (conveyor.pipeline(work.stages), nn.Sequential(*overhead_workload(n_stages or 2).stages), sum_loss,
                (work.inputs.to(settings.device),), work.target.to(settings.device), "fp32")
    ids, labels = token_batch(settings)
    pipe, model = gpt2_small.build(settings.shape, n_stages, ids[:2, :8].cpu(), settings.gpt2_kind)
    return pipe, model, gpt2_small.lm_loss, (ids,), labels, "bf16"


def unsplit_step(kind: str, settings: Settings, accumulate: bool = False) -> Callable[[], None]:
    """A step of the unsplit model on the whole batch, or (``accumulate``) on the pipeline's
    micro-batches one after another: the fair baseline for a pipeline on one GPU, which runs
    micro-batch kernels too."""
    _, model, loss_fn, inputs, target, precision = _workload(kind, settings, None)
    model = model.to(settings.device)
    context = torch.autocast(torch.device(settings.device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    chunks = N_MICROBATCHES if accumulate else 1

    def step() -> None:
        _zero(model.parameters())
        for part_inputs, part_target in zip(zip(*(x.chunk(chunks) for x in inputs)), target.chunk(chunks)):
            with context:
                loss = loss_fn(model(*part_inputs), part_target) / chunks
            loss.backward()

    return step


def local_step(kind: str, settings: Settings) -> Callable[[], None]:
    """A step of LocalPipeline (1f1b, both stages in this process)."""
    pipe, _, loss_fn, inputs, target, precision = _workload(kind, settings, 2)
    pipeline = conveyor.LocalPipeline(pipe, schedule="1f1b", n_microbatches=N_MICROBATCHES, loss_fn=loss_fn,
                                      devices=settings.device, precision=precision)

    def step() -> None:
        _zero(pipeline.parameters())
        pipeline.step(*inputs, target=target)

    return step


def process_step(kind: str, settings: Settings, world_size: int) -> Callable[[], None]:
    """A step of this rank's PipelineRunner (1f1b, one stage per process, settings.transport)."""
    pipe, _, loss_fn, inputs, target, precision = _workload(kind, settings, world_size)
    runner = conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=N_MICROBATCHES, loss_fn=loss_fn,
                                     device=settings.device, transport=settings.transport, precision=precision)

    def step() -> None:
        _zero(runner.parameters())
        runner.step(*inputs, target=target)

    return step


def process_times(rank: int, world_size: int, kind: str, settings: Settings) -> list[float] | None:
    step = process_step(kind, settings, world_size)
    dist.barrier()
    times = timed(step, settings.device, settings.warmup, settings.steps)
    return times if rank == 0 else None


def time_workload(kind: str, settings: Settings) -> list[str]:
    def median_ms(step: Callable[[], None]) -> float:
        return statistics.median(timed(step, settings.device, settings.warmup, settings.steps))

    base = median_ms(unsplit_step(kind, settings))
    measured = {"unsplit": base,
                f"unsplit, {N_MICROBATCHES} micro-batches accumulated": median_ms(
                    unsplit_step(kind, settings, accumulate=True)),
                "local (1 process, 2 streams)": median_ms(local_step(kind, settings))}
    per_rank = conveyor.launch(process_times, 2, args=(kind, settings), backend="gloo", timeout=400)
    measured["2 processes, host-staged"] = statistics.median(per_rank[0])
    return [f"| {kind} | {mode} | {value:.2f} | {value - base:+.2f} |" for mode, value in measured.items()]


def timing(settings: Settings) -> list[str]:
    rows = time_workload("no-work", settings)
    try:
        rows += time_workload("gpt2", settings)
    except Exception as error:  # noqa: BLE001 - a transformers/torch pairing that cannot be split
        if settings.gpt2_kind != "transformers":
            raise
        settings.note = (f"The Hugging Face model could not be run here ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]}); the built-in GPT-2 was timed instead.")
        settings.gpt2_kind = "builtin"
        rows += time_workload("gpt2", settings)
    return rows


# --- report --------------------------------------------------------------------------------------------
def report(settings: Settings, equality_rows: list[str], ok: bool, timing_rows: list[str], seconds: float) -> str:
    device = torch.cuda.get_device_name(0) if not settings.dry_run else "CPU (dry run)"
    gpt2 = "Hugging Face GPT2LMHeadModel" if settings.gpt2_kind == "transformers" else "built-in GPT-2 (same shape)"
    shape = settings.shape
    lines = [
        f"## GPU check: {device}",
        "",
        f"**device** {device}; **torch** {torch.__version__}; **cuda** {torch.version.cuda}; "
        f"**python** {sys.version.split()[0]}; **date** {time.strftime('%Y-%m-%d')}; run took {seconds:.0f} s "
        "(`python bench/gpu_check.py`).",
        "",
        f"### Gradients equal the unsplit model's (float32, atol {ATOL:g} + rtol {RTOL:g}): "
        f"{'all OK' if ok else 'MISMATCH'}",
        "",
        "8-layer MLP (width 64), batch 32, 4 micro-batches; the unsplit model runs on the same device.",
        "",
        "| mode | schedule | max abs grad diff | result |",
        "|---|---|---|---|",
        *equality_rows,
        "",
        "### Per-step time of each mode (1f1b, 2 stages, 4 micro-batches; median ms)",
        "",
        f"no-work: stages `x * w` on an (8, 4) batch, fp32. gpt2: {gpt2}, {shape.n_layer} layers, width "
        f"{shape.n_embd}, vocab {shape.vocab_size}, random init, batch {settings.tokens[0]} x {settings.tokens[1]} "
        "tokens, bf16 autocast with fp32 master weights; the step is forward + backward (no optimizer). "
        "Overhead = mode - unsplit (whole batch); the accumulated row is the fair baseline for one GPU, where a "
        "pipeline runs micro-batch-sized kernels one after another. With two processes a tied embedding "
        "(Hugging Face's wte/lm_head) also exchanges its gradient through host memory after each step. "
        f"{settings.note}".rstrip(),
        "",
        "| workload | mode | ms per step | overhead ms |",
        "|---|---|---|---|",
        *timing_rows,
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="run the same code on CPU, small and quick")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file to write (default: $OUT/gpu_check.md, else out/gpu_check.md)")
    parser.add_argument("--gpt2", choices=["auto", "transformers", "builtin"], default="auto",
                        help="which GPT-2 implementation to time (auto: transformers when installed)")
    args = parser.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-dry-run to exercise the check on CPU", file=sys.stderr)
        return 2
    settings = Settings(args.cpu_dry_run, args.gpt2)
    if settings.dry_run:
        torch.set_num_threads(1)  # like each launched rank; more threads than free cores only adds noise
    out = args.out or Path(os.environ.get("OUT", "out")) / "gpu_check.md"  # out/ is git-ignored
    began = time.perf_counter()
    equality_rows, ok = equality(settings)
    print("\n".join(equality_rows), flush=True)
    timing_rows = timing(settings)
    text = report(settings, equality_rows, ok, timing_rows, time.perf_counter() - began)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
