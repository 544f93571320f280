"""The ``conveyor`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> None:
    from .demo.train import DemoConfig, run_demo

    run_demo(DemoConfig(stages=args.stages, schedule=args.schedule, microbatches=args.microbatches,
                        steps=args.steps, batch_size=args.batch_size, checkpoint_dir=args.checkpoint_dir,
                        resume=args.resume))


def _timeline(args: argparse.Namespace) -> None:
    from .cli_args import require_extra
    from .schedule import simulate
    from .timeline import chrome_trace, measured_bubble, render, sleep_costs, sleep_pipeline_trace

    if args.output and not args.output.endswith(".json"):
        require_extra("matplotlib", "plot", "timeline -o (a picture)")
    stage_seconds = (args.forward_ms / 1e3, args.input_grad_ms / 1e3, args.weight_grad_ms / 1e3)
    n_stages = args.stages or args.ranks
    predicted = simulate(args.schedule, n_stages, args.microbatches, sleep_costs(n_stages, stage_seconds),
                         n_ranks=args.ranks)
    events = predicted.events
    line = f"{args.schedule}: {args.ranks} ranks, {n_stages} stages, {args.microbatches} micro-batches; " \
           f"simulated bubble {predicted.bubble:.3f}, makespan {predicted.makespan * 1e3:.1f} ms"
    if args.run:
        events = sleep_pipeline_trace(args.schedule, args.ranks, n_stages, args.microbatches, stage_seconds)
        span = max(e.end for e in events) - min(e.start - e.waited for e in events)
        line += f"; measured bubble {measured_bubble(events, args.ranks):.3f}, step {span * 1e3:.1f} ms"
    print(line)
    if args.output:
        writer = chrome_trace if args.output.endswith(".json") else render
        print(f"wrote {writer(events, args.output)}")


def _generate(args: argparse.Namespace) -> None:
    from .demo.generate import GenerateConfig, run_generate

    run_generate(GenerateConfig(model=args.model, stages=args.stages, steps=args.steps,
                                prompts=tuple(args.prompt) if args.prompt else GenerateConfig.prompts,
                                max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                                temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                                seed=args.seed))


def _bench(args: argparse.Namespace) -> None:
    import importlib
    from pathlib import Path

    repository = Path(__file__).resolve().parents[2]
    if (repository / "bench" / "__main__.py").is_file() and str(repository) not in sys.path:
        sys.path.insert(0, str(repository))
    try:
        bench = importlib.import_module("bench.__main__")
    except ModuleNotFoundError:
        raise RuntimeError("the benchmarks (bench/) are not importable: they live in the conveyor repository, run "
                           "`conveyor bench` from a checkout installed with pip install -e .") from None
    argv = (["--quick"] if args.quick else []) + (["--only", *args.only] if args.only else []) + \
        (["--out", args.out] if args.out else [])
    code = bench.main(argv)
    if code:
        raise RuntimeError(f"the benchmarks exited with status {code}")


def build_parser() -> argparse.ArgumentParser:
    from . import cli_plan, cli_train
    from .cli_args import at_least, non_negative_float

    parser = argparse.ArgumentParser(prog="conveyor", description="Pipeline-parallel training for PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a character transformer on Shakespeare with a 4-stage pipeline")
    demo.add_argument("--stages", type=at_least(1), default=4, help="pipeline stages = local processes (default 4)")
    demo.add_argument("--schedule", default="1f1b", help="gpipe or 1f1b (default 1f1b)")
    demo.add_argument("--microbatches", type=at_least(1), default=8, help="micro-batches per step (default 8)")
    demo.add_argument("--steps", type=at_least(1), default=250, help="optimizer steps (default 250)")
    demo.add_argument("--batch-size", type=at_least(1), default=32, help="sequences per step (default 32)")
    demo.add_argument("--checkpoint-dir", default=None, help="save the last step here (step-NNNNNN folders)")
    demo.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    demo.set_defaults(handler=_demo)
    timeline = commands.add_parser(
        "timeline", help="simulate (or run with --run, on sleeping stages) a schedule and draw its timeline")
    timeline.add_argument("--schedule", default="1f1b", help="schedule name (default 1f1b)")
    timeline.add_argument("--ranks", type=at_least(1), default=4, help="processes (default 4)")
    timeline.add_argument("--stages", type=at_least(1), default=None, help="stages (default: one per rank)")
    timeline.add_argument("--microbatches", type=at_least(1), default=8, help="micro-batches (default 8)")
    timeline.add_argument("--forward-ms", type=non_negative_float, default=10.0,
                          help="forward time of a stage (default 10)")
    timeline.add_argument("--input-grad-ms", type=non_negative_float, default=10.0,
                          help="input-gradient time (default 10)")
    timeline.add_argument("--weight-grad-ms", type=non_negative_float, default=10.0,
                          help="weight-gradient time (default 10)")
    timeline.add_argument("--run", action="store_true", help="run it on local processes and draw what happened")
    timeline.add_argument("-o", "--output", help="write a picture (.png/.svg/.pdf; needs matplotlib: pip "
                                                 "install 'conveyor[plot]') or a Chrome trace (.json)")
    timeline.set_defaults(handler=_timeline)
    generate = commands.add_parser(
        "generate", help="train a small GPT-2 or Llama on Shakespeare with a pipeline, then generate text",
        description="Build a small Hugging Face causal LM from a config, train it for a few steps on a pipeline "
                    "and sample from it with runner.generate (a KV cache on every stage; docs/generation.md).")
    generate.add_argument("--model", choices=["gpt2", "llama"], default="gpt2", help="architecture (default gpt2)")
    generate.add_argument("--stages", type=int, default=2, help="pipeline stages = local processes (default 2)")
    generate.add_argument("--steps", type=int, default=30, help="training steps before sampling (default 30)")
    generate.add_argument("--prompt", action="append", help="a prompt (repeat for several; default four names)")
    generate.add_argument("--max-new-tokens", type=int, default=80, help="tokens to generate (default 80)")
    generate.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    generate.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    generate.add_argument("--top-k", type=int, default=20, help="sample among the k likeliest (default 20; 0: all)")
    generate.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default off)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and sampling")
    generate.set_defaults(handler=_generate)
    cli_train.register(commands)
    cli_plan.register(commands)
    bench = commands.add_parser("bench", help="run the benchmarks (python -m bench) and write BENCHMARKS.md",
                                description="Run the repository's bench/ package: conveyor beside "
                                            "torch.distributed.pipelining.")
    bench.add_argument("--quick", action="store_true", help="tiny versions of everything (a smoke test)")
    bench.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    bench.add_argument("--out", default=None, help="report path (default BENCHMARKS.md)")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - one readable line unless --debug
        if args.debug:
            raise
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        details = [line for line in str(getattr(error, "details", "") or "").splitlines() if line.strip()]
        if details:  # a rank's failure: its exception's last line says what went wrong
            first_line += f": {details[-1].strip()}"
        print(f"conveyor {args.command}: {type(error).__name__}: {first_line} (rerun with --debug for details)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
