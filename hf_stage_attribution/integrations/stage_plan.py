"""Which stage of the ledger each global step of a Trainer run belongs to (``StageRecorder(stage_boundaries=...)``).

Example:
    >>> from hf_stage_attribution.integrations.stage_plan import parse_boundaries, plan_parts
    >>> [(p.name, p.start, p.end) for p in plan_parts("main", None, parse_boundaries("main", {"anneal": 800}), 1000)]
    [('main', 0, 800), ('anneal', 800, 1000)]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..errors import LedgerError


@dataclass(frozen=True)
class StagePart:
    """One stage of the run: global steps ``[start, end)``; ``kind`` None means "infer it"."""

    name: str
    kind: str | None
    start: int
    end: int


def parse_boundaries(first: str, boundaries: dict[str, int | dict] | None) -> list[tuple[str, int, str | None]]:
    """``[(name, step, kind), ...]`` sorted by step, validated (positive steps; distinct names and steps)."""
    if not boundaries:
        return []
    out: list[tuple[str, int, str | None]] = []
    for name, value in boundaries.items():
        step, kind = (value.get("step"), value.get("kind")) if isinstance(value, dict) else (value, None)
        if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
            raise LedgerError(
                f"`stage_boundaries[{name!r}]` must be a positive global step (an int, or {{'step': int, 'kind': "
                f"str}}), got {value!r}."
            )
        out.append((str(name), step, kind))
    out.sort(key=lambda item: item[1])
    names = [first] + [name for name, _, _ in out]
    steps = [step for _, step, _ in out]
    if len(set(names)) != len(names) or len(set(steps)) != len(steps):
        raise LedgerError(
            f"`stage_boundaries` needs distinct stage names (also distinct from {first!r}) and distinct steps, got "
            f"{boundaries!r}."
        )
    return out


def plan_parts(
    first: str, first_kind: str | None, boundaries: list[tuple[str, int, str | None]], max_steps: int
) -> list[StagePart]:
    """The stages of a run of ``max_steps`` optimizer steps; boundaries at or after the end are dropped (warned)."""
    kept = [(name, step, kind) for name, step, kind in boundaries if step < max_steps]
    dropped = [name for name, step, _ in boundaries if step >= max_steps]
    if dropped:
        warnings.warn(
            f"StageRecorder: stage boundaries {dropped} are at or after the run's last step ({max_steps}); those "
            "stages are not recorded.",
            stacklevel=3,
        )
    names = [first] + [name for name, _, _ in kept]
    kinds = [first_kind] + [kind or first_kind for _, _, kind in kept]
    steps = [0] + [step for _, step, _ in kept] + [max_steps]
    return [StagePart(names[i], kinds[i], steps[i], steps[i + 1]) for i in range(len(steps) - 1)]
