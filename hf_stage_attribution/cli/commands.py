"""The sub-commands of ``hf-stage-attribution``: which module defines each, and its one line in the top-level help.

``main`` imports only the module of the command being run (``attribute`` imports the estimators and torch, 4 s on
this machine, and transformers only once it loads a model; ``card`` needs none of that), and lists the others from
this table.

Example:
    >>> command_module("validate"), command_help("card")
    ('hf_stage_attribution.cli.attribute_cmd', 'Write (or refresh) the accountability section of a model card.')
    >>> uses_training_libraries("card"), uses_training_libraries("attribute")
    (False, True)
"""

from __future__ import annotations

from typing import NamedTuple


class Command(NamedTuple):
    """One sub-command: the module whose ``register(subparsers)`` adds it, its help line, and whether it uses
    transformers or datasets (``False``: the quiet console does not import them to quiet them, 3 s)."""

    module: str
    help: str
    training_libraries: bool = True


#: every sub-command, in the order ``--help`` lists them
COMMANDS: dict[str, Command] = {
    "inspect": Command("hf_stage_attribution.cli.inspect_cmd", "Show the stages recorded in a ledger.", False),
    "import-checkpoints": Command(
        "hf_stage_attribution.cli.import_cmd",
        "Build a ledger from published checkpoints (Hub revisions, local or Trainer folders, adapters).",
    ),
    "attribute": Command("hf_stage_attribution.cli.attribute_cmd", "Estimate each stage's effect on each behavior."),
    "validate": Command(
        "hf_stage_attribution.cli.attribute_cmd", "Compare an estimator with replayed training (fidelity figures)."
    ),
    "card": Command(
        "hf_stage_attribution.cli.card_cmd", "Write (or refresh) the accountability section of a model card.", False
    ),
    "demo": Command(
        "hf_stage_attribution.cli.demo_cmd",
        "Train, record, attribute, validate and publish two tiny pipelines (offline).",
    ),
    "intervene": Command(
        "hf_stage_attribution.cli.intervene_cmd",
        "Scale a stage's contribution down (θ_K − α·v_k) and measure target vs. utility.",
    ),
}
#: every module that defines commands, in the order of :data:`COMMANDS`
SUBCOMMANDS = list(dict.fromkeys(command.module for command in COMMANDS.values()))


def command_module(name: str) -> str:
    """The module that defines command ``name``."""
    return COMMANDS[name].module


def command_help(name: str) -> str:
    """Command ``name``'s line in the top-level help (its ``add_parser(help=...)``)."""
    return COMMANDS[name].help


def uses_training_libraries(name: str | None) -> bool:
    """Whether command ``name`` may use transformers or datasets (an unknown name: assume so)."""
    command = COMMANDS.get(name) if name is not None else None
    return command is None or command.training_libraries
