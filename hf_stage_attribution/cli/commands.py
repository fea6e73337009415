"""The sub-commands of ``hf-stage-attribution``: which module defines each, and its one line in the top-level help.

``main`` imports only the module of the command being run (``attribute`` imports the estimators, transformers and
the rest: 8 s before any work on this machine; ``card`` needs none of that), and lists the others from this table.

Example:
    >>> command_module("validate"), command_help("card")
    ('hf_stage_attribution.cli.attribute_cmd', 'Write (or refresh) the accountability section of a model card.')
"""

from __future__ import annotations

#: command → (the module whose ``register(subparsers)`` adds it, its help line); in the order ``--help`` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("hf_stage_attribution.cli.inspect_cmd", "Show the stages recorded in a ledger."),
    "import-checkpoints": (
        "hf_stage_attribution.cli.import_cmd",
        "Build a ledger from published checkpoints (Hub revisions, local or Trainer folders, adapters).",
    ),
    "attribute": ("hf_stage_attribution.cli.attribute_cmd", "Estimate each stage's effect on each behavior."),
    "validate": (
        "hf_stage_attribution.cli.attribute_cmd",
        "Compare an estimator with replayed training (fidelity figures).",
    ),
    "card": ("hf_stage_attribution.cli.card_cmd", "Write (or refresh) the accountability section of a model card."),
    "demo": (
        "hf_stage_attribution.cli.demo_cmd",
        "Train, record, attribute, validate and publish two tiny pipelines (offline).",
    ),
    "intervene": (
        "hf_stage_attribution.cli.intervene_cmd",
        "Scale a stage's contribution down (θ_K − α·v_k) and measure target vs. utility.",
    ),
}
#: every module that defines commands, in the order of :data:`COMMANDS`
SUBCOMMANDS = list(dict.fromkeys(module for module, _ in COMMANDS.values()))


#: the commands that use neither transformers nor datasets: the quiet console does not import them to quiet them
WITHOUT_TRAINING_LIBRARIES = frozenset({"card", "inspect"})


def command_module(name: str) -> str:
    """The module that defines command ``name``."""
    return COMMANDS[name][0]


def command_help(name: str) -> str:
    """Command ``name``'s line in the top-level help (its ``add_parser(help=...)``)."""
    return COMMANDS[name][1]
