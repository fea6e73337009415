"""The default estimator (``auto``): partial replay where the later stages can be replayed, else ``aa-ggn-fd`` where
the ledger holds curvature material, else ``aa-fd`` (``delta-fd`` when a later stage's optimizer is unknown); every
choice is read out by finite difference.

The rule, in order (:func:`choose_estimator`):

1. a later stage imported from checkpoints without optimizer information → ``delta-fd`` (task-vector negation);
   likewise a later stage whose optimizer the propagation rules do not know (torch ``Adamax``, ``NAdam``, HF
   ``adafactor`` ...): every estimator that carries a removed stage's delta (``aa-*``, partial replay's carry of the
   rest) would refuse it, and the reason names the stage and its optimizer;
2. every later stage that took optimizer steps can be replayed *step-limited* — the ledger holds its replay data
   (``StageRecorder(..., save_replay_data=True)``) or ``stage_fns`` has a function with a ``max_steps`` keyword —
   → ``partial-replay`` at :data:`~.partial_replay.DEFAULT_BUDGET` (25 % of replay's optimizer steps), read out by
   finite difference: that read-out is exact for the terminal stage and at budget 1 (it *is* replay there), where
   the linear read-out keeps the first-order error of the behavior;
3. otherwise ``delta-fd`` when a later stage's coupled weight decay under a second-moment preconditioner (``Adam``,
   ``RMSprop``, ``Adagrad`` with ``weight_decay``) cannot be carried because the ledger holds no second moments for it
   (:func:`~.propagation.stage.carry_problem`); else ``aa-ggn-fd`` when every later stage holds curvature material
   and its Krylov basis fits in memory, else ``aa-fd``: the ``aa-linear`` carry (learning rates, momentum, weight
   decay) read out by finite difference. When the basis has to go to scratch disk (above 64 MiB, about 0.56 M
   parameters), the reason says so and names ``aa-fd`` as the fast choice on large models (on SmolLM2-135M ``aa-ggn``
   took about 13 min with the ``cheap`` preset and had not finished after 19.5 min with the default one, ``aa-fd`` took
   56 s).

The finite-difference read-out is the choice in step 3 for the same reason as in step 2: f(θ_K) − f(θ_K − v_k) is
exact for the last stage (v_K = Δ_K), where the linear read-out keeps the behavior's first-order error, and it costs
one evaluation per stage and no forward-mode pass. Measured against replay on the benchmark pipelines
(``BENCHMARKS.md`` §1, all (stage, behavior) pairs, what the card claims): Spearman of ``aa-fd`` 0.50 / 0.69 / 0.92 /
0.99 / 0.98 / 0.98 against ``aa-linear``'s 0.54 / 0.70 / 0.85 / 0.94 / 0.72 / 0.97 (higher on four pipelines, by up to
0.26; lower on digits-hf and digits-decay, by 0.05 and 0.01; mean sign agreement 88 % against 84 %, top stage 71 %
against 72 %), and never worse than task-vector negation, which ``aa-linear`` was on five of six (non-terminal
pairs); ``delta-fd`` against ``delta-linear`` likewise. On SmolLM2-135M (``BENCHMARKS.md`` §9) ``aa-fd`` took
64.8 s against ``aa-linear``'s 76.4 s and came within 3.1 % of replay's effect of the SFT stage on
both behaviors, where ``aa-linear`` was 47 % low on one and 2.3× high on the other.

With curvature the same holds. A curvature-aware carry comes first where it fits: it carries how the later stages react
to a removed update, which neither task-vector negation nor the curvature-free carry can (the two give the same numbers
wherever the later stages ran Adam without weight decay); where its Krylov basis fits neither in memory nor in the
scratch directory, ``auto`` says so and runs ``aa-fd``. Measured, its finite-difference reading ``aa-ggn-fd`` against
the linear one ``aa-ggn`` (``auto``'s choice until 2026-12-07) on the seven pipelines (digits-hf, digits-decay,
digits-undo, digits-first, digits-demo, lm, toxicity): Spearman over all pairs 0.54 / 0.84 / 0.98 / 0.99 / 0.90 / 0.98
/ 0.98 against 0.78 / 0.79 / 0.95 / 0.95 / 0.76 / 0.77 / 0.90: of the 42 figures (Spearman, sign and top-stage
agreement; all and non-terminal pairs) 27 higher, 7 equal, 8 lower (5 of them on digits-hf, where ``aa-ggn`` stays
ahead: 0.78 against 0.54); not worse than task-vector negation on five pipelines, where ``aa-ggn`` was on one
(digits-decay; it lost 0.30 of Spearman to it on lm); "estimators agree" right 17 of 18 times against 12 of 13.

"Curvature material" means: every later stage that took optimizer steps (the stages any ``v_k`` is carried
through) has recorded segments, a known optimizer, and a loss the curvature products can use (``loss_fns``, the
in-memory ``loss_fn`` of this process, or a built-in ``curvature_loss`` type). The result names the estimator used
and why.

Example:
    >>> import tempfile
    >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
    >>> pipe = build_digits_pipeline("decay", tempfile.mkdtemp(), steps_scale=0.05, base_steps_scale=0.05)
    >>> ledger, model, behavior = pipe.ledger, pipe.model, pipe.behaviors["margin_7"]
    >>> name, reason = choose_estimator(ledger)  # no replay data, no stage functions: no partial replay
    >>> name, reason.split(";")[0]
    ('aa-ggn-fd', 'every later stage (digits-patch, digits-clean) holds curvature material')
    >>> from hf_stage_attribution import estimators
    >>> r = estimators.get("auto").estimate(ledger, model, behavior)
    >>> r.estimator, r.reason == choose_estimator(ledger)[1]
    ('aa-ggn-fd', True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._internal.memory import human_bytes
from ..errors import StageAttributionError
from ..ledger.core import LedgerCore
from ..ledger.stage import Stage
from .base import Estimator, get, register
from .curvature.products import resolve_loss
from .curvature.propagation import CURVATURE_PRESETS, curvature_basis_on_disk, curvature_memory_problem
from .partial_plan import unreplayed_stages
from .propagation.rules import recorded_family
from .propagation.stage import carry_problem, next_trained, trains
from .replay import can_replay, replay_inputs, stage_replay_problem, unreplayable_route

PARTIAL_REPLAY = "partial-replay"
PARTIAL_REPLAY_BUDGET = 0.25  # = partial_replay.DEFAULT_BUDGET (a test keeps them equal)


def choice_inputs(options: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`choose_estimator` reads from an estimator's ``options`` besides the stage and loss functions: the
    reference models and reward functions replay would be given, and partial replay's budget.

    Example:
        >>> choice_inputs({"budget": 1.0})
        {'ref_models': None, 'reward_funcs': None, 'budget': 1.0}
    """
    return {**replay_inputs(options), "budget": options.get("budget", PARTIAL_REPLAY_BUDGET)}


def choose_estimator(
    ledger: LedgerCore,
    loss_fns: Mapping[str, Any] | None = None,
    stage_fns: Mapping[str, Any] | None = None,
    *,
    partial_replay: bool = True,
    ref_models: Mapping[str, Any] | None = None,
    reward_funcs: Mapping[str, Any] | None = None,
    budget: float = PARTIAL_REPLAY_BUDGET,
) -> tuple[str, str]:
    """``(estimator name, reason)`` by the rule in the module docstring; ``budget``: partial replay's (the default
    unless the caller gives one), which the reason names and which decides whether it would replay any step.

    ``partial_replay=False`` skips step 2: what ``auto`` picks where no later stage can be replayed, even when the
    ledger holds replay data (the benchmarks compare the propagation estimators on such ledgers). ``ref_models`` and
    ``reward_funcs`` (``{stage name: ...}``) are what replay would be given: a later stage whose replay data need a
    reference model or reward functions that were not given cannot be replayed.

    Example:
        >>> import tempfile, torch
        >>> from hf_stage_attribution import StageLedger
        >>> model, ledger = torch.nn.Linear(2, 1), StageLedger(tempfile.mkdtemp())
        >>> for name, steps in (("a", 1), ("b", 8)):
        ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ...     with ledger.record_stage(name, model=model, optimizer=opt) as rec:
        ...         for _ in range(steps):
        ...             opt.zero_grad(); model(torch.ones(1, 2)).sum().backward(); opt.step(); rec.step()
        >>> choose_estimator(ledger)[0]
        'aa-fd'
        >>> fns = {"b": lambda model, max_steps=None: None}
        >>> choose_estimator(ledger, stage_fns=fns)[0]  # 25 % of b's 8 steps: one step from each start
        'partial-replay'
        >>> choose_estimator(ledger, stage_fns=fns, partial_replay=False)[0]  # as if no stage could be replayed
        'aa-fd'
    """
    blind = [s.name for s in ledger.stages[1:] if lacks_optimizer_information(s)]
    if blind:
        return "delta-fd", (
            f"later stage(s) {blind} were imported from checkpoints without optimizer information, so only "
            "task-vector estimators (delta-*) apply, read out by finite difference (exact for the last stage); give "
            "the stages' optimizer and learning rates in the import spec to enable aa-*"
        )
    later = [s for s in ledger.stages[1:] if s.num_steps and s.learning_rates]
    if not later:
        return "aa-fd", "no stage after the first took optimizer steps, so there is no curvature to propagate"
    unknown = [s for s in later if recorded_family(s.optimizer) is None]
    if unknown:
        return "delta-fd", _no_carry_reason([carry_problem(s) or s.name for s in unknown])
    fns = dict(stage_fns or {})
    inputs = {"ref_models": ref_models, "reward_funcs": reward_funcs}
    bare = unreplayed_stages(ledger, range(len(ledger.stages)), budget)
    if partial_replay and all(can_replay(s, fns, step_limited=True, **inputs) for s in later) and bare:
        non_terminal = [s.name for s in ledger.stages[:-1] if any(trains(t) for t in ledger.stages[s.index + 1 :])]
        if set(non_terminal) <= set(bare):  # partial replay would be the propagation-only carry everywhere
            fallback = _without_replay(ledger, later, loss_fns)
            return fallback[0], (
                f"{fallback[1]}; partial replay not used: at budget {budget:g} it would replay no "
                "optimizer step for any stage ("
                + (
                    "a budget of 0 buys none"
                    if budget <= 0
                    else f"a step from each of two starts costs more than {budget:.0%} of replay's steps: the later "
                    "stages are too short"
                )
                + "), so it would be the propagation-only carry; estimator='replay' re-runs them whole"
            )
    if partial_replay and all(can_replay(s, fns, step_limited=True, **inputs) for s in later):
        how = sorted({"stage functions" if s.name in fns else "recorded replay data" for s in later})
        early = [s.name for s in later if getattr(s, "early_checkpoint", None) is not None]
        unreplayed = (
            f"; at that budget no step fits for {bare} (their next stage is too short), whose estimates are the "
            "propagation-only carry (aa-fd)"
            if bare
            else ""
        )
        return PARTIAL_REPLAY, (
            f"every later stage ({', '.join(s.name for s in later)}) can be replayed step by step "
            f"({' and '.join(how)}), so a short exact replay of the next stage(s) at budget "
            f"{budget:g} ({budget * 100:g} % of replay's optimizer steps) stands in for the first-order carry of "
            "their early, nonlinear steps (it ranked the stages better than propagation alone on the benchmark "
            "pipelines, BENCHMARKS.md §8, but not on every run with short stages: its trust verdicts check it "
            "against replay, which re-runs them whole); read out by finite "
            "difference, which is exact for the last stage and equals replay at budget 1"
            + (f"; the factual branch of {early} is read from their recorded early checkpoints" if early else "")
            + unreplayed
        )
    fallback = _without_replay(ledger, later, loss_fns)
    if not partial_replay:
        return fallback
    unreplayable = [s for s in later if not can_replay(s, fns, step_limited=True, **inputs)]
    # a stage's own problem first (one that continued the optimizer state has no replay data, and recording them
    # would not help): only the rest lack replay data and a stage function
    blocked = [(s, stage_replay_problem(s, **inputs)) for s in unreplayable if s.name not in fns]
    blocked = [(s, why) for s, why in blocked if why]
    others = [s for s in unreplayable if s not in [b for b, _ in blocked]]
    why_not = [f"stage {s.name!r} cannot be replayed {unreplayable_route(s)}: {why}" for s, why in blocked]
    if others:
        imported = all(s.imported_from is not None for s in others)
        why_not.append(
            f"later stage(s) {[s.name for s in others]} have neither replay data "
            + ("(imported from checkpoints, which carry none)" if imported else
               "(StageRecorder(..., save_replay_data=True))")
            + " nor a step-limited stage function (fn(model, max_steps=None), or fn(model, callbacks=None) handing "
            "the callbacks to its Trainer)"
        )  # fmt: skip
    return fallback[0], f"{fallback[1]}; partial replay not used: " + "; ".join(why_not)


def _no_carry_reason(problems: list[str]) -> str:
    """The reason ``auto`` gives for ``delta-fd`` when a later stage cannot be propagated."""
    return (
        "; ".join(problems)
        + ". Every aa-* estimator carries a removed stage's delta through each later stage and would refuse, so "
        "task-vector negation (delta-fd: no propagation, exact for the last stage) is used; replay (stage_fns or "
        "replay data) gives the ground truth"
    )


def _without_replay(ledger: LedgerCore, later: list[Any], loss_fns: Mapping[str, Any] | None) -> tuple[str, str]:
    following = {s.index: next_trained(ledger.stages, s.index) for s in later}
    stuck = [why for s in later if (why := carry_problem(s, following[s.index])) is not None]
    if stuck:
        return "delta-fd", _no_carry_reason(stuck)
    missing = [s for s in later if not s.segments]
    if missing:
        names = [s.name for s in missing]
        if all(s.imported_from is not None for s in missing):  # checkpoints carry none: only a recorded run has it
            return "aa-fd", (
                f"later stage(s) {names} hold no curvature material (imported from checkpoints, which carry none; "
                "aa-ggn-fd needs the stages recorded with curvature_segments=3)"
            )
        return "aa-fd", (
            f"later stage(s) {names} hold no curvature material (record them with curvature_segments=3 for aa-ggn-fd)"
        )
    no_loss = []
    for stage in later:
        try:
            resolve_loss(stage, loss_fns, "ggn")
        except StageAttributionError:
            no_loss.append(stage.name)
    if no_loss:
        return "aa-fd", (
            f"later stage(s) {no_loss} have curvature segments but no usable (forward, loss) pair; pass "
            "loss_fns={stage name: (forward, loss)} (CLI: --loss-fn STAGE=MODULE:FORWARD,LOSS) to use aa-ggn-fd"
        )
    krylov = CURVATURE_PRESETS["default"]["krylov_size"]
    too_big = curvature_memory_problem(ledger, 0, krylov)
    if too_big is not None:
        return "aa-fd", f"aa-ggn-fd would not fit in memory: {too_big}"
    reason = f"every later stage ({', '.join(s.name for s in later)}) holds curvature material"
    on_disk = curvature_basis_on_disk(ledger, 0, krylov)
    if on_disk is not None:  # measured, not guessed: what that costs on a real model (BENCHMARKS.md §9)
        reason += (
            f"; its Krylov basis ({human_bytes(on_disk)}) goes to scratch disk, which grows with the model: on "
            "SmolLM2-135M aa-ggn took about 13 min with the cheap preset (unfinished after 19.5 min with the default "
            "one) where aa-fd took 56 s (BENCHMARKS.md §9), so estimator='aa-fd' (CLI --estimator aa-fd) is the fast "
            "choice on large models"
        )
    return "aa-ggn-fd", reason


def lacks_optimizer_information(stage: Stage) -> bool:
    """A stage that changed the model through training we know nothing of (imported without optimizer info)."""
    return stage.optimizer is None and stage.imported_from is not None and stage.kind != "untracked"


@register
class Auto(Estimator):
    """Apply the default rule (module docstring), then run the chosen estimator; ``result.reason`` says why.

    Options: ``stage_fns`` and ``loss_fns`` (they decide the rule and go to the chosen estimator), ``budget``
    (partial replay's, default 0.25), and every option of the chosen estimator.

    Example:
        >>> from hf_stage_attribution import estimators
        >>> estimators.get("auto").name
        'auto'
    """

    name = "auto"
    #: what the rule can pick: their options are auto's (:meth:`accepted_options`)
    candidates = (PARTIAL_REPLAY, "aa-ggn-fd", "aa-fd", "delta-fd")

    @classmethod
    def accepted_options(cls) -> frozenset[str] | None:
        """The options of every estimator the rule can pick: each goes to the chosen one (a budget only means
        something to partial replay, and is dropped when the rule picks another)."""
        return frozenset().union(*(type(get(name)).accepted_options() or () for name in cls.candidates))

    description = (
        "delta-fd when a later stage was imported without optimizer information or used an optimizer the "
        "propagation does not know; else partial-replay (budget "
        "0.25, finite-difference read-out) where every later stage can be replayed step by step (replay data or "
        "stage_fns with max_steps, or callbacks for their Trainer); else delta-fd when a later stage's coupled decay "
        "cannot be carried (no recorded second moments); else aa-ggn-fd where the ledger holds curvature material, "
        "else aa-fd."
    )

    def resolve(
        self,
        ledger: LedgerCore,
        loss_fns: Mapping[str, Any] | None = None,
        stage_fns: Mapping[str, Any] | None = None,
        **inputs: Any,
    ) -> Estimator:
        """The estimator the default rule picks for ``ledger`` (an instance; its ``name`` says which); ``inputs``:
        the ``ref_models`` and ``reward_funcs`` replay would be given (:func:`choose_estimator`)."""
        return get(choose_estimator(ledger, loss_fns, stage_fns, **inputs)[0])

    def prepare(self, ledger, stages=None, model=None, **options):
        inputs = choice_inputs(options)
        self.resolve(ledger, options.get("loss_fns"), options.get("stage_fns"), **inputs).prepare(
            ledger, stages, model, **options
        )

    def estimate(self, ledger, model, behavior, stages=None, **options):
        inputs = choice_inputs(options)
        chosen, reason = choose_estimator(ledger, options.get("loss_fns"), options.get("stage_fns"), **inputs)
        if chosen == PARTIAL_REPLAY:
            options.setdefault("budget", PARTIAL_REPLAY_BUDGET)
        else:  # a budget only means something to partial replay; the reason says why it was not chosen
            options.pop("budget", None)
            options.pop("budget_unit", None)
        result = get(chosen).estimate(ledger, model, behavior, stages, **options)
        result.reason = reason
        result.diagnostics["auto"] = {"chosen": chosen, "reason": reason}
        return result
