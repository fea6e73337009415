"""The default estimator (``auto``): ``aa-ggn`` where the ledger holds curvature material, else ``aa-linear``.

"Curvature material" means: every later stage that took optimizer steps (the stages any ``v_k`` is carried
through) has recorded segments, a known optimizer, and a loss the curvature products can use (``loss_fns``, the
in-memory ``loss_fn`` of this process, or a built-in ``curvature_loss`` type). The result names the estimator used
and why.

Example:
    >>> # name, reason = choose_estimator(ledger)
    >>> # r = estimators.get("auto").estimate(ledger, model, behavior); r.estimator, r.reason
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import StageAttributionError
from .base import Estimator, get, register
from .curvature.products import resolve_loss
from .curvature.propagation import CURVATURE_PRESETS, curvature_memory_problem
from .propagation.rules import recorded_family


def choose_estimator(ledger: Any, loss_fns: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(estimator name, reason)`` by the default rule of ESTIMATORS.md §4."""
    blind = [s.name for s in ledger.stages[1:] if lacks_optimizer_information(s)]
    if blind:
        return "delta-linear", (
            f"later stage(s) {blind} were imported from checkpoints without optimizer information, so only "
            "task-vector estimators (delta-*) apply; give the stages' optimizer and learning rates in the import spec "
            "to enable aa-*"
        )
    later = [s for s in ledger.stages[1:] if s.num_steps and s.learning_rates]
    if not later:
        return "aa-linear", "no stage after the first took optimizer steps, so there is no curvature to propagate"
    missing = [s.name for s in later if not s.segments]
    if missing:
        return "aa-linear", (
            f"later stage(s) {missing} hold no curvature material (record them with curvature_segments=3 for aa-ggn)"
        )
    unknown = [s.name for s in later if recorded_family(s.optimizer) is None]
    if unknown:
        return "aa-linear", f"later stage(s) {unknown} used an optimizer the curvature propagation does not know"
    no_loss = []
    for stage in later:
        try:
            resolve_loss(stage, loss_fns, "ggn")
        except StageAttributionError:
            no_loss.append(stage.name)
    if no_loss:
        return "aa-linear", (
            f"later stage(s) {no_loss} have curvature segments but no usable (forward, loss) pair; pass "
            "loss_fns={stage name: (forward, loss)} to use aa-ggn"
        )
    too_big = curvature_memory_problem(ledger, 0, CURVATURE_PRESETS["default"]["krylov_size"])
    if too_big is not None:
        return "aa-linear", f"aa-ggn would not fit in memory: {too_big}"
    return "aa-ggn", f"every later stage ({', '.join(s.name for s in later)}) holds curvature material"


def lacks_optimizer_information(stage: Any) -> bool:
    """A stage that changed the model through training we know nothing of (imported without optimizer info)."""
    source = stage.info.get("source") or {}
    return stage.optimizer is None and source.get("type") == "checkpoints" and stage.kind != "untracked"


@register
class Auto(Estimator):
    """Apply the default rule, then run the chosen estimator; ``result.reason`` says why it was chosen.

    Example:
        >>> from hf_stage_attribution import estimators
        >>> estimators.get("auto").name
        'auto'
    """

    name = "auto"
    description = "aa-ggn where the ledger holds curvature material, else aa-linear."

    def resolve(self, ledger: Any, loss_fns: Mapping[str, Any] | None = None) -> Estimator:
        """The estimator the default rule picks for ``ledger`` (an instance; its ``name`` says which)."""
        return get(choose_estimator(ledger, loss_fns)[0])

    def prepare(self, ledger, stages=None, model=None, **options):
        self.resolve(ledger, options.get("loss_fns")).prepare(ledger, stages, model, **options)

    def estimate(self, ledger, model, behavior, stages=None, **options):
        chosen, reason = choose_estimator(ledger, options.get("loss_fns"))
        result = get(chosen).estimate(ledger, model, behavior, stages, **options)
        result.reason = reason
        result.diagnostics["auto"] = {"chosen": chosen, "reason": reason}
        return result
