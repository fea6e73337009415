"""Entry point of ``hf-stage-attribution``: collects the sub-commands and turns errors into one-line reasons."""

from __future__ import annotations

import argparse
import importlib
import sys

from .._internal.distributed import close_process_group, process_group_initialized
from .._internal.memory import is_out_of_memory, out_of_memory_message
from .._version import __version__
from ..errors import StageAttributionError
from .console import quiet_console

# Each module defines `register(subparsers)` adding one sub-command whose handler is `args.func(args) -> int`.
SUBCOMMANDS = [
    "hf_stage_attribution.cli.inspect_cmd",
    "hf_stage_attribution.cli.import_cmd",
    "hf_stage_attribution.cli.attribute_cmd",
    "hf_stage_attribution.cli.card_cmd",
    "hf_stage_attribution.cli.demo_cmd",
    "hf_stage_attribution.cli.intervene_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-stage-attribution",
        description="Which training stage is accountable for a model's behavior, and by how much.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).register(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--verbose",
            action="store_true",
            help="show third-party training logs, progress bars and warnings (hidden by default)",
        )
    return parser


def _version() -> str:

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2

    started_distributed = process_group_initialized()
    try:
        with quiet_console(verbose=args.verbose):
            return int(args.func(args) or 0)
    except StageAttributionError as exc:
        print(f"hf-stage-attribution {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hf-stage-attribution {args.command}: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        print(f"hf-stage-attribution {args.command}: error: {out_of_memory_message(exc)}", file=sys.stderr)
        return 1
    finally:
        if not started_distributed:
            # the command (Accelerate's PartialState) set up the process group under torchrun/accelerate launch:
            # close it, or gloo's threads may abort the process at interpreter exit
            close_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
