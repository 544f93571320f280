"""The ``conveyor`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> None:
    from .demo.train import DemoConfig, run_demo

    run_demo(DemoConfig(stages=args.stages, schedule=args.schedule, microbatches=args.microbatches,
                        steps=args.steps, batch_size=args.batch_size))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description="Pipeline-parallel training for PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a character transformer on Shakespeare with a 4-stage pipeline")
    demo.add_argument("--stages", type=int, default=4, help="pipeline stages = local processes (default 4)")
    demo.add_argument("--schedule", default="1f1b", help="gpipe or 1f1b (default 1f1b)")
    demo.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (default 8)")
    demo.add_argument("--steps", type=int, default=250, help="optimizer steps (default 250)")
    demo.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - one readable line unless --debug
        if args.debug:
            raise
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"conveyor {args.command}: {type(error).__name__}: {first_line} (rerun with --debug for details)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
