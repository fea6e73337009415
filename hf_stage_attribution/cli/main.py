"""Entry point of ``hf-stage-attribution``: collects the sub-commands and turns errors into one-line reasons."""

from __future__ import annotations

import argparse
import importlib
import sys

from .._internal.distributed import close_process_group, process_group_initialized
from .._internal.memory import is_out_of_memory, out_of_memory_message
from .._version import __version__
from ..errors import StageAttributionError
from .commands import COMMANDS, SUBCOMMANDS, command_help, command_module, uses_training_libraries
from .console import quiet_console

#: build_parser's default: every command's module, with all their arguments (what the tests and the docs inspect)
ALL = "*"


def build_parser(command: str | None = ALL) -> argparse.ArgumentParser:
    """The parser of ``hf-stage-attribution``: with ``command`` (a command name, as :func:`command_in` finds it),
    only that command's module is imported and registered whole, the others are listed by their help line
    (:data:`~.commands.COMMANDS`); ``None`` (no command given) lists them all; :data:`ALL` registers every module.
    Each module defines ``register(subparsers)`` adding its sub-command(s), whose handler is
    ``args.func(args) -> int``."""
    parser = argparse.ArgumentParser(
        prog="hf-stage-attribution",
        description="Which training stage is accountable for a model's behavior, and by how much.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = SUBCOMMANDS if command == ALL else [command_module(command)] if command in COMMANDS else []
    for module_name in modules:
        importlib.import_module(module_name).register(sub)
    for name in COMMANDS:  # the commands not imported: their line in the listing (an unknown name is refused)
        if name not in sub.choices:
            sub.add_parser(name, help=command_help(name))
    for command_parser in sub.choices.values():
        command_parser.add_argument(
            "--verbose",
            action="store_true",
            help="show third-party training logs, progress bars and warnings (hidden by default)",
        )
    return parser


def command_in(argv: list[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (the top-level options, ``--help`` and
    ``--version``, take no value), or None.

    Example:
        >>> command_in(["card", "report", "--readme", "m"]), command_in(["--help"])
        ('card', None)
    """
    return next((word for word in argv if not word.startswith("-")), None)


def _version() -> str:

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_in(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2

    started_distributed = process_group_initialized()
    try:
        with quiet_console(verbose=args.verbose, training_libraries=uses_training_libraries(args.command)):
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
