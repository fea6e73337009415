"""How far to trust a behavior's top-stage claim and stage ranking: a verdict from the evidence a run has.

Pure functions of per-stage mean effects (numpy only). Three verdicts:

- ``"verified"`` (label "verified by replay"): exact replay ran for every stage and agrees with the estimate on the
  top stage, the signs of the stages that moved the behavior, the ranking, and the sizes: every stage that moved the
  behavior has an estimated ``|effect|`` within a factor of :data:`SIZE_RATIO_MAX` of replay's (the bar a second
  opinion's sizes must meet for "agree"; else "unreliable: replay disagrees — <stage>'s size is N× replay's").
  Replay is exact for the examples it ran on, not for the behavior they sample: where its own examples do not
  separate its top two stages (a paired bootstrap, ``evidence["replay"]["top_separation"]``), an estimate naming the
  runner-up is not contradicted on the top stage or on those two's order, and the label says so ("verified by
  replay — replay does not separate <top> and <runner-up>"; effects that are replay itself, "replay (ground truth)",
  say the same: "replay (ground truth) — its examples do not separate <top> and <runner-up>"); replay given as means
  only carries no sampling, so the top stages must then be equal. Replay of only some of the stages verifies
  nothing, but it is checked all the same on the stages it ran for (``evidence["replay_some_stages"]``): a
  disagreement there is "unreliable: replay disagrees — on the stages it ran for (...): <why>", and where it agrees
  the verdict is the second opinions';
- ``"agree"`` (label "estimated — estimators agree"): no replay, but a second opinion (the linear/finite-difference
  pair of the linearisation gap, another estimator such as task-vector negation) that gives every stage of the
  estimate an effect (one that leaves stages out is no check, ``evidence["second_opinions_partial"]``, though a
  contradiction on the stages it covers still counts) names the same top stage (not tied with another: a tie broken
  by stage order confirms nothing, ``evidence["second_opinion_top_ties"]``) and ranking, another estimator than
  the sibling gives every stage that moved the behavior a size within a factor of :data:`SIZE_RATIO_MAX` (else that
  stage's sign is not settled), the linearisation gap is small and the top stage's ``|effect|`` interval is clear of
  the runner-up's (a behavior of one example has no sampling interval: that check does not apply, and neither
  passes nor fails the verdict);
- ``"unreliable"`` (label "estimated — unreliable: <why>", or "unreliable: replay disagrees — <why>"): anything else,
  including an estimate with nothing to check it against.

A finite-difference estimate of the ledger's last stage, f(θ_K) − f(θ_K − Δ_K), is replay itself (no later stage to
carry the update through): there its linear sibling's reading and the linearisation gap measure the linear read-out's
own error, not the estimate's, so for the finite-difference side of a pair that stage takes the estimate's value in
the sibling's opinion and leaves the gap out (:func:`exact_stages`, ``evidence["exact_stages"]``; the report marks
the gap ``fd_exact`` where the linear reading was computed).
For the linear side the same gap is its own error there and counts.

The same holds at every stage when a finite-difference replaying estimate (``partial-replay``) is checked by another
replay family (:data:`REPLAY_FAMILIES`, ``strided-replay`` at the same budget): f(θ_K) − f(θ_K − v_k) reads its
replayed embedding exactly, so its error is in ``v_k``, which the other family estimates by another route through
the same training; the gap measures only how curved f is along ``v_k``, i.e. the linear read-out's error. The gap
then stays in the evidence (``evidence["linearisation_gap_counted"] = False``) and is not a reason for "unreliable"
(:func:`gap_counts`). Measured against replay (BENCHMARKS.md §8, six pipelines, the default's verdicts): every one of
the 12 behaviors that the gap alone called unreliable was verified by replay, and "agree" went from 32 behaviors to
44, replay verifying all of them (41 under the size bar of "verified" added later, 2026-12-06: 3 have a non-top
stage 2.3–3.5× replay's size); with task-vector negation as the check the gap still screens out wrong claims
(without it, 43 of 49 "agree"s verified instead of 34 of 38), so there, and for every other estimator, it counts.

The bootstrap intervals of a report resample the behavior's examples only: they say nothing about the estimator's
own error, which is what the verdict is about (:data:`INTERVAL_SCOPE` is put in every verdict's evidence).
A behavior no stage moved (every effect exactly 0) has no top stage: ``evidence["top_stage"]`` is None and no
ranking is checked; a second opinion that moved it at any stage contradicts "no stage moved it" ("unreliable:
<name> moved it (<stage> <value>, ...)"; the linear sibling's reading is judged by the linearisation gap instead).

Example:
    >>> v = assess_trust({"pre": 0.1, "sft": 2.0, "dpo": -0.5}, estimator="aa-linear",
    ...                  second_opinions={"aa-fd": {"pre": 0.12, "sft": 1.9, "dpo": -0.45}})
    >>> v["verdict"], v["label"]
    ('agree', 'estimated — estimators agree')
    >>> label = assess_trust({"pre": 0.1, "sft": 2.0}, estimator="aa-linear", replay={"pre": 3.0, "sft": 1.0})["label"]
    >>> label.split("; ")[0]
    'unreliable: replay disagrees — replay names pre as the top stage, the estimate sft'
    >>> label.split("; ")[1]
    "pre's size is 0.033× replay's (+0.1 vs +3)"
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

VERIFIED, AGREE, UNRELIABLE = "verified", "agree", "unreliable"
VERDICTS = (VERIFIED, AGREE, UNRELIABLE)
LABEL_VERIFIED = "verified by replay"
LABEL_AGREE = "estimated — estimators agree"
#: The label of a report whose effects are replay itself: it is the ground truth, not something replay verified.
LABEL_GROUND_TRUTH = "replay (ground truth)"

#: Stages compared by rank must keep their order up to one adjacent swap among four or more stages (Spearman of a
#: single adjacent swap of 4 stages is 0.8); with three stages this means the exact order. It is the bar of a ranking
#: claim, for replay and for a second opinion alike: a card lists every stage in order, so the order is claimed.
SPEARMAN_MIN = 0.8
#: Signs must agree on at least 90 % of the stages that moved the behavior (the benchmark's sign-agreement bar); with
#: up to 9 such stages that is all of them. A positive/negative effect is the claim "the stage raised/lowered it".
SIGN_AGREEMENT_MIN = 0.9
#: A stage whose |effect| is under 5 % of the largest |effect| (in either of the two estimates compared) did not move
#: the behavior noticeably; its sign is noise and is not counted. The same floor stops near-zero stages from
#: deciding the top stage in a comparison.
NEGLIGIBLE_SHARE = 0.05
#: The linearisation gap ``|fd − linear| / max_k |effect_k|`` above which the first-order read-out is not trusted
#: (ESTIMATORS.md §4): a quarter of the largest effect is enough to reorder stages whose effects differ by less,
#: and it means f is visibly curved along the stage's update, where the linear and the finite-difference reading
#: of the same propagated update can both be far from replay.
LINEARISATION_GAP_MAX = 0.25
#: Two estimators that give a stage the same sign but sizes more than this factor apart do not settle that sign:
#: their disagreement is then larger than the smaller of the two, so an error of that size reaches zero. Seen on
#: a real model (the MiniLM recipe): partial and strided replay at one budget both said +, 1.62 and 0.79, replay
#: said −0.68. Counted for stages that moved the behavior (:data:`NEGLIGIBLE_SHARE`), against a second opinion
#: other than the linear sibling (whose disagreement is the linearisation gap, judged on its own scale).
SIZE_RATIO_MAX = 2.0
#: Estimators that re-run the later stages' training themselves (part of it exactly, or all of it with stale
#: gradients): each one's error is in its replayed embedding, and the other reaches the same effect by another
#: route through the same training, so one is an independent check of the other's finite-difference reading.
#: (The estimators' own names, ``estimators.selection.PARTIAL_REPLAY`` and ``second_opinion.STRIDED_REPLAY``: this
#: module stays free of the estimators' imports, and tests/estimators/test_second_opinion.py keeps them equal.)
REPLAY_FAMILIES = frozenset({"partial-replay", "strided-replay"})
_ROUNDING = 1e-9  # a figure exactly at a bar (Spearman 0.8 computed as 0.7999999999999999) meets it
#: What the report's intervals cover: said in every verdict, so the card can show it beside the numbers.
INTERVAL_SCOPE = (
    "the intervals cover example sampling only (a percentile bootstrap over the behavior's examples), not the "
    "estimator's own error"
)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equal-length sequences (``nan`` with fewer than 2 values or a constant side).

    Example:
        >>> round(spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]), 12)
        0.5
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2:
        return math.nan
    rx, ry = _ranks(x) - (x.size + 1) / 2.0, _ranks(y) - (y.size + 1) / 2.0
    denom = float(np.linalg.norm(rx) * np.linalg.norm(ry))
    return float(rx @ ry) / denom if denom > 0 else math.nan


def top_of(effects: Mapping[str, float]) -> str:
    """The stage of largest ``|effect|`` (ties to the first in order), as ``AttributionReport.top_stage``."""
    names = list(effects)
    return names[int(np.argmax([abs(float(effects[s])) for s in names]))]


def top_tie(effects: Mapping[str, float]) -> list[str]:
    """The stages (in order) that share the largest ``|effect|`` (to :data:`SAME_NUMBERS` of it) when two or more do;
    ``[]`` when one stage is largest or no stage moved. :func:`top_of` breaks such a tie by stage order, which is no
    ranking: a second opinion that ties the estimate's top stage with another does not confirm it.

    Example:
        >>> top_tie({"pre": 0.1, "sft": 1.9, "dpo": -1.9}), top_tie({"pre": 0.1, "sft": 2.0, "dpo": -1.9})
        (['sft', 'dpo'], [])
    """
    sizes = {s: abs(float(v)) for s, v in effects.items()}
    largest = max(sizes.values(), default=0.0)
    tied = [s for s, v in sizes.items() if largest - v <= SAME_NUMBERS * largest]
    return tied if largest > 0.0 and len(tied) > 1 else []


def _common(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The stages of ``a`` (in its order) that ``b`` also has, and both estimates' effects there."""
    stages = [s for s in a if s in b]
    return stages, np.array([float(a[s]) for s in stages]), np.array([float(b[s]) for s in stages])


def _moved(est: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Which stages moved the behavior: |effect| at least :data:`NEGLIGIBLE_SHARE` of the largest, in either."""
    scale_e, scale_r = float(np.abs(est).max(initial=0.0)), float(np.abs(ref).max(initial=0.0))
    moved = (np.abs(est) >= NEGLIGIBLE_SHARE * scale_e) & (scale_e > 0)
    return moved | ((np.abs(ref) >= NEGLIGIBLE_SHARE * scale_r) & (scale_r > 0))


def compare(estimate: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, Any]:
    """Agreement of two per-stage mean effects over their common stages (in ``estimate``'s order).

    Returns ``{"stages", "top_stage", "reference_top_stage", "top_stage_equal", "spearman", "sign_agreement",
    "signs_compared"}``; ``sign_agreement`` is over stages where either side moved the behavior by at least
    :data:`NEGLIGIBLE_SHARE` of its largest effect (``nan`` when none did).

    Example:
        >>> c = compare({"a": 1.0, "b": -0.2, "c": 0.01}, {"a": 0.8, "b": -0.3, "c": -0.001})
        >>> c["top_stage_equal"], c["sign_agreement"], c["signs_compared"]
        (True, 1.0, 2)
    """
    stages, est, ref = _common(estimate, reference)
    moved = _moved(est, ref)
    agree = np.sign(est[moved]) == np.sign(ref[moved])
    top_e = top_of(dict(zip(stages, est))) if stages else None
    top_r = top_of(dict(zip(stages, ref))) if stages else None
    return {
        "stages": len(stages),
        "top_stage": top_e,
        "reference_top_stage": top_r,
        "top_stage_equal": top_e == top_r,
        "spearman": spearman(est, ref),
        "sign_agreement": float(agree.mean()) if agree.size else math.nan,
        "signs_compared": int(agree.size),
    }


def sign_disagreements(estimate: Mapping[str, float], reference: Mapping[str, float]) -> list[str]:
    """The stages (in ``estimate``'s order) that moved the behavior where ``reference`` gives the other sign.

    Example:
        >>> sign_disagreements({"ft": 1.62, "new": 2.09, "lora": -0.7}, {"ft": -0.68, "new": 2.0, "lora": -0.7})
        ['ft']
    """
    stages, est, ref = _common(estimate, reference)
    off = _moved(est, ref) & (np.sign(est) != np.sign(ref))
    return [s for s, flag in zip(stages, off) if flag]


def _disagreements(
    c: Mapping[str, Any],
    ours: str,
    theirs: str,
    estimate: Mapping[str, float] | None = None,
    reference: Mapping[str, float] | None = None,
) -> list[str]:
    """Why comparison ``c`` (of ``ours`` against the reference ``theirs``) fails the bars, in words; given the two
    estimates, a sign disagreement names its stages and both values."""
    why = []
    if not c["top_stage_equal"] and theirs == "replay":
        why.append(f"replay names {c['reference_top_stage']} as the top stage, {ours} {c['top_stage']}")
    elif not c["top_stage_equal"]:
        why.append(f"{ours} and {theirs} name different top stages ({c['top_stage']} and {c['reference_top_stage']})")
    if not math.isnan(c["sign_agreement"]) and c["sign_agreement"] < SIGN_AGREEMENT_MIN - _ROUNDING:
        wrong = round((1.0 - c["sign_agreement"]) * c["signs_compared"])
        named = sign_disagreements(estimate, reference) if estimate is not None and reference is not None else []
        which = ", ".join(f"{s}: {float(estimate[s]):+.4g} vs {float(reference[s]):+.4g}" for s in named)  # type: ignore[index]
        which = f" ({which})" if which else ""
        why.append(f"{ours} and {theirs} disagree on the sign of {wrong} of {c['signs_compared']} stages{which}")
    if c["stages"] >= 3 and not math.isnan(c["spearman"]) and c["spearman"] < SPEARMAN_MIN - _ROUNDING:
        why.append(f"{theirs} ranks the stages differently (Spearman {c['spearman']:.2f})")
    return why


def _moved_where_still(estimator: str, name: str, values: Mapping[str, float], where: str = "") -> list[str]:
    """The reason "<name> moved it (<stage> <value>, ...) where <estimator> put every effect<where> at 0" when the
    second opinion (or replay) ``values`` moved the behavior at a stage; ``[]`` when it too put every effect at 0.

    Example:
        >>> _moved_where_still("lora-exact", "delta-fd", {"pre": 0.0, "sft": -2.0})
        ['delta-fd moved it (sft -2) where lora-exact put every effect at 0']
        >>> _moved_where_still("lora-exact", "delta-fd", {"pre": 0.0, "sft": 0.0})
        []
    """
    moved = ", ".join(f"{s} {v:+.4g}" for s, v in values.items() if v != 0.0)
    return [f"{name} moved it ({moved}) where {estimator} put every effect{where} at 0"] if moved else []


def unsettled_signs(estimate: Mapping[str, float], other: Mapping[str, float]) -> list[str]:
    """Stages (in ``estimate``'s order) that moved the behavior, where ``other`` gives the same sign but a size more
    than :data:`SIZE_RATIO_MAX` times larger or smaller.

    Example:
        >>> unsettled_signs({"ft": 1.62, "refresh": 2.09, "lora": -0.73}, {"ft": 0.79, "refresh": 2.08, "lora": -0.73})
        ['ft']
        >>> unsettled_signs({"a": 1.0, "b": 0.01}, {"a": 0.6, "b": 0.001})  # b moved nothing
        []
    """
    stages, est, ref = _common(estimate, other)
    small, large = np.minimum(np.abs(est), np.abs(ref)), np.maximum(np.abs(est), np.abs(ref))
    # opposite signs (or a zero) are the sign check's business
    off = _moved(est, ref) & (est * ref > 0.0) & (large > SIZE_RATIO_MAX * small + _ROUNDING)
    return [s for s, flag in zip(stages, off) if flag]


def _abs_interval(low: float, high: float) -> tuple[float, float]:
    """The interval of ``|effect|`` for an interval ``[low, high]`` of the effect."""
    if low <= 0.0 <= high:
        return 0.0, max(-low, high)
    return min(abs(low), abs(high)), max(abs(low), abs(high))


def _has_interval(interval: Any) -> bool:
    """Whether ``interval`` is a ``(low, high)`` pair of numbers (a behavior of one example has none: ``None``)."""
    return interval is not None and all(isinstance(v, int | float) and not isinstance(v, bool) for v in interval)


def intervals_overlap(
    effects: Mapping[str, float], intervals: Mapping[str, tuple[float, float] | None]
) -> tuple[bool | None, str | None, str | None]:
    """Whether the ``|effect|`` intervals of the top stage and the runner-up overlap, and those two stages; ``None``
    instead of a bool when either has no interval (one example: no sampling interval), so the check did not apply.

    Example:
        >>> intervals_overlap({"a": 1.0, "b": -0.9}, {"a": (0.8, 1.2), "b": (-1.0, -0.8)})
        (True, 'a', 'b')
        >>> intervals_overlap({"a": 2.0, "b": -1.0}, {"a": None, "b": None})
        (None, 'a', 'b')
    """
    ranked = sorted(effects, key=lambda s: -abs(float(effects[s])))
    if len(ranked) < 2 or ranked[0] not in intervals or ranked[1] not in intervals:
        return False, (ranked[0] if ranked else None), None
    if not (_has_interval(intervals[ranked[0]]) and _has_interval(intervals[ranked[1]])):
        return None, ranked[0], ranked[1]
    top_low, _ = _abs_interval(*intervals[ranked[0]])
    _, second_high = _abs_interval(*intervals[ranked[1]])
    return top_low <= second_high, ranked[0], ranked[1]


def size_overlap_text(first: str, second: str, intervals: Mapping[str, tuple[float, float]]) -> str:
    """The reason "the sizes of <first> and <second> overlap within their intervals (|first| ≥ a, |second| ≤ b)": what
    :func:`intervals_overlap` compares (the ranges of ``|effect|``, not the intervals of the signed effects).

    Example:
        >>> size_overlap_text("sft", "dpo", {"sft": (1.462, 10.49), "dpo": (-1.655, -1.128)})
        'the sizes of sft and dpo overlap within their intervals (|sft| ≥ 1.462, |dpo| ≤ 1.655)'
    """
    top_low, _ = _abs_interval(*intervals[first])
    _, second_high = _abs_interval(*intervals[second])
    return (
        f"the sizes of {first} and {second} overlap within their intervals (|{first}| ≥ {top_low:.4g}, "
        f"|{second}| ≤ {second_high:.4g})"
    )


def size_mismatches(estimate: Mapping[str, float], replay: Mapping[str, float]) -> dict[str, float]:
    """``{stage: |estimate| / |replay|}`` for the stages that moved the behavior where the two have the same sign but
    sizes more than :data:`SIZE_RATIO_MAX` apart (:func:`unsettled_signs`): the size bar of "verified by replay".

    Example:
        >>> size_mismatches({"pre": -9.268, "sft": 0.4747}, {"pre": -8.025, "sft": 2.004})
        {'sft': 0.2369}
    """
    return {s: round(abs(float(estimate[s])) / abs(float(replay[s])), 4) for s in unsettled_signs(estimate, replay)}


def no_stage_moved(effects: Mapping[str, float]) -> bool:
    """Whether every effect is exactly 0 (then there is no top stage to name, nor a ranking)."""
    return all(float(v) == 0.0 for v in effects.values())


def _largest_gap(gaps: Mapping[str, Mapping[str, float]] | None) -> tuple[float | None, str | None]:
    values = {s: float(g.get("relative_gap", 0.0)) for s, g in (gaps or {}).items()}
    if not values:
        return None, None
    stage = max(values, key=lambda s: values[s])
    return values[stage], stage


def exact_stages(
    effects: Mapping[str, float], estimator: str, pair: Sequence[str] | None, last_stage: str | None
) -> list[str]:
    """``[last_stage]`` when ``estimator`` is the finite-difference side of its linearisation ``pair`` and the
    effects cover the ledger's last stage, where f(θ_K) − f(θ_K − Δ_K) is replay itself; else ``[]``.

    Example:
        >>> exact_stages({"sft": 1.0, "dpo": 0.2}, "aa-fd", ["aa-linear", "aa-fd"], "dpo")
        ['dpo']
        >>> exact_stages({"sft": 1.0, "dpo": 0.2}, "aa-linear", ["aa-linear", "aa-fd"], "dpo")
        []
    """
    return [last_stage] if _fd_side(estimator, pair) and last_stage in effects else []


def _fd_side(estimator: str, pair: Sequence[str] | None) -> bool:
    """Whether ``estimator`` is the finite-difference side of its linearisation ``pair`` ``[linear, fd]``."""
    names = [str(n) for n in pair or ()]
    return len(names) == 2 and estimator == names[1]


def gap_counts(estimator: str, linearisation_pair: Sequence[str] | None, checked_by: Sequence[str]) -> bool:
    """Whether the linearisation gap is a reason to distrust ``estimator``: not when it is the finite-difference side
    of its pair, replays (:data:`REPLAY_FAMILIES`), and another replay family among ``checked_by`` checked it — the
    gap is then the linear read-out's own error (module docstring); in every other case it is.

    Example:
        >>> pair = ["partial-replay-linear", "partial-replay"]
        >>> gap_counts("partial-replay", pair, ["partial-replay-linear", "strided-replay"])
        False
        >>> gap_counts("partial-replay", pair, ["partial-replay-linear", "delta-fd"])
        True
        >>> gap_counts("partial-replay-linear", pair, ["partial-replay", "strided-replay"])
        True
    """
    independent = replay_checks(estimator, checked_by)
    return not (_fd_side(estimator, linearisation_pair) and estimator in REPLAY_FAMILIES and independent)


def replay_checks(estimator: str, names: Iterable[str]) -> list[str]:
    """The estimators among ``names`` that check ``estimator`` by replaying the later stages another way: the other
    replay families (:data:`REPLAY_FAMILIES`), in the order given.

    Example:
        >>> replay_checks("partial-replay", ["partial-replay-linear", "strided-replay", "delta-fd"])
        ['strided-replay']
    """
    return [str(n) for n in names if n in REPLAY_FAMILIES and n != estimator]


def _replay_tie(c: Mapping[str, Any], replay_tie: Sequence[str] | None) -> list[str] | None:
    """``[replay's top, the estimate's top]`` where the two differ and ``replay_tie`` says replay's examples do not
    separate exactly these two (replay's top and its runner-up); else None."""
    if c["top_stage_equal"] or not replay_tie or len(replay_tie) != 2:
        return None
    first, second = (str(s) for s in replay_tie)
    if (c["reference_top_stage"], c["top_stage"]) != (first, second):
        return None
    return [first, second]


def _tied_spearman(effects: Mapping[str, float], truth: Mapping[str, float], tied: Sequence[str]) -> float:
    """Spearman of the estimate against replay with replay's two ``tied`` stages given one rank (their mean value)
    where they moved the behavior the same way; their signs differing, replay's values as they are."""
    first, second = tied
    ranked = dict(truth)
    if math.copysign(1.0, truth[first]) == math.copysign(1.0, truth[second]):
        ranked[first] = ranked[second] = (truth[first] + truth[second]) / 2.0
    stages = list(effects)
    return spearman([effects[s] for s in stages], [ranked[s] for s in stages])


def _ground_truth(
    effects: Mapping[str, float], top: str | None, replay_tie: Sequence[str] | None, evidence: dict[str, Any]
) -> dict[str, Any]:
    """The verdict of effects that are replay itself: ground truth for the examples it ran on. Where those examples do
    not separate its top two stages (``replay_tie``, replay's top first) the label says so, as it does where the same
    replay validates an estimate; ``evidence["replay"]`` is where the report keeps replay's ``top_separation``."""
    evidence["replay"] = {"ground_truth": True, "top_stage": top, "stages": len(effects)}
    pair = [str(s) for s in replay_tie or ()]
    if top is None or len(pair) != 2 or pair[0] != top or pair[1] not in effects:
        return _finish(VERIFIED, LABEL_GROUND_TRUTH, "The effects are exact replay (ground truth).", evidence)
    first, second = pair
    evidence["replay_top_tie"] = pair
    reason = (
        f"The effects are exact replay (ground truth) for the examples it ran on; it moved the behavior about as much "
        f"at {first} ({effects[first]:+.4g}) as at {second} ({effects[second]:+.4g}), a difference its examples do "
        "not separate, so replay does not tell which moved it more."
    )
    return _finish(
        VERIFIED, f"{LABEL_GROUND_TRUTH} — its examples do not separate {first} and {second}", reason, evidence
    )


def _partial_replay(
    effects: Mapping[str, float],
    truth: Mapping[str, float],
    replay_tie: Sequence[str] | None,
    evidence: dict[str, Any],
) -> list[str]:
    """Where replay ran for some of the stages of ``effects`` only (``truth``): the estimate's disagreements with it
    there (top stage among them, signs, ranking, sizes, as for full replay), recorded in
    ``evidence["replay_some_stages"]``; ``[]`` when it agrees there."""
    ours = {s: effects[s] for s in truth}
    c = compare(ours, truth)
    sizes = size_mismatches(ours, truth)
    evidence["replay_some_stages"] = {
        **c,
        "not_run": [s for s in effects if s not in truth],
        "sign_disagreements": sign_disagreements(ours, truth),
        "size_ratios_off": sizes,
    }
    still, truth_still = no_stage_moved(ours), no_stage_moved(truth)
    if still and truth_still:
        return []
    if still:
        return _moved_where_still("the estimate", "replay", truth, " there")
    tied = None if truth_still else _replay_tie(c, replay_tie)
    judged = c
    if tied:
        evidence["replay_some_stages"]["top_tie"] = tied
        judged = {**c, "top_stage_equal": True, "spearman": _tied_spearman(ours, truth, tied)}
    why = _disagreements(judged, "the estimate", "replay", ours, truth)
    return why + [f"{s}'s size is {r:.2g}× replay's ({ours[s]:+.4g} vs {truth[s]:+.4g})" for s, r in sizes.items()]


def _finish(verdict: str, label: str, reason: str, evidence: dict[str, Any]) -> dict[str, Any]:
    evidence["intervals"] = INTERVAL_SCOPE
    return {"verdict": verdict, "label": label, "reason": f"{reason} Note: {INTERVAL_SCOPE}.", "evidence": evidence}


def assess_trust(
    effects: Mapping[str, float],
    *,
    estimator: str,
    intervals: Mapping[str, tuple[float, float] | None] | None = None,
    second_opinions: Mapping[str, Mapping[str, float]] | None = None,
    linearisation_gap: Mapping[str, Mapping[str, float]] | None = None,
    linearisation_pair: Sequence[str] | None = None,
    replay: Mapping[str, float] | None = None,
    exact_stages: Sequence[str] | None = None,
    replay_tie: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The verdict on one behavior's top-stage claim and ranking (``BehaviorDiagnostics.trust``).

    Args:
        effects: ``{stage: mean effect}`` of the chosen estimator, in stage order.
        estimator: its name (``"replay"`` is exact: verified, labelled "replay (ground truth)", and "— its examples
            do not separate <top> and <runner-up>" with ``replay_tie``).
        intervals: ``{stage: (low, high)}`` bootstrap intervals of the effects (``None`` for a stage without one: a
            behavior of one example, where the interval check does not apply).
        second_opinions: ``{estimator: {stage: mean effect}}`` of other estimators of the same behavior.
        linearisation_gap: ``{stage: {"relative_gap", ...}}`` (``BehaviorDiagnostics.linearisation_gap``) of
            ``linearisation_pair``.
        replay: ``{stage: mean effect}`` measured by exact replay; it verifies when it covers every stage of
            ``effects``, and covering some stages only it can still contradict the estimate there.
        exact_stages: stages where the estimate is exact (:func:`exact_stages`: the ledger's last stage of a
            finite-difference reading): the linear sibling (``linearisation_pair[0]``) takes the estimate's value
            there and their gap is left out.
        replay_tie: ``(replay's top stage, its runner-up)`` where replay's own examples do not separate the two
            (:func:`~.build.replay_top_separation`, from replay's per-example values). An estimate naming the
            runner-up is then not contradicted on the top stage — replay is exact for the examples it ran on, not for
            the behavior they sample — and the label says replay ties the two; signs, ranking and sizes are checked
            as always. Replay given as means only cannot say this, and the top stages must then be equal.

    Returns ``{"verdict", "label", "reason", "evidence"}`` (JSON-safe apart from ``nan`` figures).

    Example:
        >>> assess_trust({"a": 1.0, "b": 0.1}, estimator="aa-linear")["label"]
        'estimated — unreliable: nothing to check it against (no replay, no second estimate)'
    """
    effects = {str(s): float(v) for s, v in effects.items()}
    if not effects:
        raise ValueError("assess_trust needs the effect of at least one stage")
    still = no_stage_moved(effects)
    top = None if still else top_of(effects)
    evidence: dict[str, Any] = {"estimator": estimator, "top_stage": top, "stages": len(effects)}
    if estimator == "replay":
        return _ground_truth(effects, top, replay_tie, evidence)
    if replay is not None and all(s in replay for s in effects):
        truth = {s: float(replay[s]) for s in effects}
        c = compare(effects, truth)
        sizes = size_mismatches(effects, truth)
        evidence["replay"] = c
        evidence["replay_sign_disagreements"] = sign_disagreements(effects, truth)
        evidence["replay_size_ratios_off"] = sizes
        if still and no_stage_moved(truth):
            reason = "Exact replay agrees: no stage moved the behavior (every effect is 0 in both)."
            return _finish(VERIFIED, LABEL_VERIFIED, reason, evidence)
        tied = None if still else _replay_tie(c, replay_tie)
        judged = c
        if tied:  # replay does not rank its top two: neither the top stage nor their order counts against the estimate
            evidence["replay_top_tie"] = tied
            judged = {**c, "top_stage_equal": True, "spearman": _tied_spearman(effects, truth, tied)}
            evidence["replay_tie_spearman"] = judged["spearman"]
        why = _disagreements(judged, "the estimate", "replay", effects, truth)
        if still:  # the estimate names no top stage; replay does
            why = [f"replay names {c['reference_top_stage']} as the top stage, the estimate none (every effect 0)"]
        why += [
            f"{s}'s size is {ratio:.2g}× replay's ({effects[s]:+.4g} vs {truth[s]:+.4g})" for s, ratio in sizes.items()
        ]
        if not why and tied:
            first, second = tied
            reason = (
                f"Exact replay agrees within its own example sampling: it moved the behavior about as much at {first} "
                f"({truth[first]:+.4g}) as at {second} ({truth[second]:+.4g}), a difference its examples do not "
                f"separate, so the estimate's top stage {top} is not contradicted; signs agree on "
                f"{c['signs_compared']} stage(s) that moved the behavior, "
                + (
                    f"Spearman over {c['stages']} stages {judged['spearman']:.2f} with those two as tied, "
                    if c["stages"] >= 3
                    else ""
                )
                + f"and every stage that moved the behavior has an estimated size within a factor of "
                f"{SIZE_RATIO_MAX:g} of replay's."
            )
            label = f"{LABEL_VERIFIED} — replay does not separate {first} and {second}"
            return _finish(VERIFIED, label, reason, evidence)
        if not why:
            reason = (
                f"Exact replay agrees: it names {top} as the top stage too, signs agree on {c['signs_compared']} "
                f"stage(s) that moved the behavior, Spearman over {c['stages']} stages {c['spearman']:.2f}, and every "
                f"stage that moved the behavior has an estimated size within a factor of {SIZE_RATIO_MAX:g} of "
                "replay's."
            )
            return _finish(VERIFIED, LABEL_VERIFIED, reason, evidence)
        text = "; ".join(why)
        return _finish(
            UNRELIABLE, f"unreliable: replay disagrees — {text}", f"Exact replay disagrees: {text}.", evidence
        )

    checked = "Not checked by replay"
    ran = [s for s in effects if s in (replay or {})]
    if ran:  # replay of some stages only: no verification, but a contradiction there is one
        why = _partial_replay(effects, {s: float(replay[s]) for s in ran}, replay_tie, evidence)  # type: ignore[index]
        if why:
            text = f"on the stages it ran for ({', '.join(ran)}): " + "; ".join(why)
            return _finish(
                UNRELIABLE, f"unreliable: replay disagrees — {text}", f"Exact replay disagrees {text}.", evidence
            )
        checked = (
            f"Checked by replay on {', '.join(ran)} only (it agrees there on the top stage among them, the signs and "
            f"the sizes), not on {', '.join(s for s in effects if s not in ran)}, so not verified"
        )
    why = []
    checks: list[str] = []
    opinions = {name: dict(values) for name, values in (second_opinions or {}).items() if name != estimator}
    exact = [str(s) for s in exact_stages or () if str(s) in effects]
    if exact:  # the linear sibling's reading there is its own first-order error, not a view of the estimate's
        evidence["exact_stages"] = exact
        pair = list(linearisation_pair or [])
        sibling = opinions.get(str(pair[0])) if len(pair) == 2 else None
        for stage in exact if sibling is not None else ():
            sibling[stage] = effects[stage]
        linearisation_gap = {s: g for s, g in (linearisation_gap or {}).items() if s not in exact}
    evidence["second_opinions"] = {}
    same: list[str] = []
    sized: list[str] = []  # second opinions whose sizes were compared (not the linear sibling)
    partial: dict[str, list[str]] = {}  # second opinions that left stages out: {name: the stages left out}
    sibling = [str(n) for n in linearisation_pair or () if str(n) != estimator]
    for name, values in opinions.items():
        common = {s: v for s, v in effects.items() if s in values}
        if not common:
            continue
        c = compare(common, {s: float(values[s]) for s in common})
        evidence["second_opinions"][name] = c
        if len(common) == len(effects) and _same_numbers(effects, values):
            same.append(name)  # the same computation by another name (aa-fd where nothing changes the carry)
            continue
        missing = [s for s in effects if s not in values]
        if missing:  # no check of the stages it left out; a contradiction where it ran still counts
            partial[name] = missing
        else:
            checks.append(name)
        tied = [] if still else top_tie({s: float(values[s]) for s in common})
        if c["top_stage"] in tied:  # it ranks the estimate's top stage level with another: no confirmation of it
            evidence.setdefault("second_opinion_top_ties", {})[name] = tied
            size = abs(float(values[tied[0]]))
            why.append(f"{name} gives {', '.join(tied)} the same size ({size:.4g}), so it does not confirm {top}")
            c = {**c, "top_stage_equal": True}  # the tie is the reason, not the stage order that broke it
        if not still:
            why.extend(_disagreements(c, estimator, name, common, values))
        elif name not in sibling or not linearisation_gap:  # the sibling's reading is judged by the gap
            why.extend(_moved_where_still(estimator, name, {s: float(values[s]) for s in common}))
        wrong_signs = sign_disagreements(common, values)
        if wrong_signs:
            evidence.setdefault("sign_disagreements", {})[name] = wrong_signs
        if name in sibling:
            continue
        if not missing:
            sized.append(name)
        unsettled = unsettled_signs(common, values)
        evidence.setdefault("unsettled_signs", {})[name] = unsettled
        if unsettled:
            pairs = ", ".join(f"{s} ({common[s]:+.3g} vs {float(values[s]):+.3g})" for s in unsettled)
            fold = f"{SIZE_RATIO_MAX:g}-fold"
            why.append(f"{estimator} and {name} differ more than {fold} on {pairs}, so the sign is not settled")
    if same:
        evidence["same_as_estimate"] = same
    gap, gap_stage = _largest_gap(linearisation_gap)
    uncounted = ""
    if gap is not None:
        evidence["max_relative_linearisation_gap"] = gap
        evidence["linearisation_gap_stage"] = gap_stage
        evidence["linearisation_pair"] = list(linearisation_pair or [])
        counted = gap_counts(estimator, linearisation_pair, checks)
        evidence["linearisation_gap_counted"] = counted
        if counted:
            checks.append("linearisation gap")
            if gap > LINEARISATION_GAP_MAX:
                why.append(f"relative linearisation gap {gap:.2f} on stage {gap_stage}")
        else:
            uncounted = (
                f" The linearisation gap ({gap:.2f} of the largest effect, on {gap_stage}) is the linear read-out's "
                f"error: {estimator} reads its replayed embedding exactly, and another replay family checked that "
                "embedding, so the gap is not counted."
            )
    interval_note = ", and the top stage's |effect| interval is clear of the runner-up's"
    if intervals and not still:
        overlap, first, second = intervals_overlap(effects, intervals)
        evidence["top_two_intervals_overlap"] = overlap
        if overlap is None:
            evidence["interval_check"] = "did not apply: one example, no sampling interval"
            interval_note = "; the interval check did not apply (one example: no sampling interval)"
        elif overlap and first is not None and second is not None:
            why.append(size_overlap_text(first, second, intervals))  # type: ignore[arg-type]
    elif still:
        interval_note = "; no stage moved the behavior (every effect is 0), so there is no top stage to rank"
    left_out = "; ".join(f"{n} gave no effect for {', '.join(m)} (not counted as a check)" for n, m in partial.items())
    if partial:
        evidence["second_opinions_partial"] = partial
    if not checks:
        why.insert(0, f"nothing to check it against (no replay; {left_out})" if partial else
                   "nothing to check it against (no replay, no second estimate)")  # fmt: skip
    elif not sized:  # the sibling reads the same stage embeddings: it checks the read-out, not the embeddings
        named = f"{', '.join(same)} gave the same numbers as {estimator}" if same else "no second estimate ran"
        named += f"; {left_out}" if partial else ""
        readers = [c for c in checks if c != "linearisation gap"]
        what = f"{', '.join(readers)} read(s) the same stage embeddings" if readers else "only the read-outs compared"
        why.append(f"no independent second opinion ({named}; {what})")
    if why:
        text = "; ".join(why)
        return _finish(UNRELIABLE, f"estimated — unreliable: {text}", f"{checked}; {text}.", evidence)
    reason = (
        f"{checked}; {', '.join(checks)} agree(s) with {estimator} on the top stage ({top}), the signs "
        f"and the ranking{interval_note}."
        if not still
        else f"{checked}; {', '.join(checks)} agree(s) with {estimator}{interval_note}."
    )
    if sized:
        reason += (
            f" {', '.join(sized)} also put(s) every stage that moved the behavior within a factor of "
            f"{SIZE_RATIO_MAX:g} of {estimator}'s size."
        )
    reason += uncounted
    if partial:
        reason += f" {left_out}: a second opinion checks only the stages it covers."
    if same:
        reason += (
            f" {', '.join(same)} gave the same numbers as {estimator} (the same computation by another route, e.g. "
            "aa-fd and task-vector negation where the later stages carry an update unchanged), so it is not counted "
            "as a check."
        )
    return _finish(AGREE, LABEL_AGREE, reason, evidence)


#: Two estimates whose stage effects differ by at most this share of the largest |effect| are the same numbers (a
#: second opinion that computed what the estimate computed, to float precision, is not a second opinion).
SAME_NUMBERS = 1e-9


def _same_numbers(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Whether ``b`` gives ``a``'s numbers on every stage of ``a``, to :data:`SAME_NUMBERS` of the largest |effect|.

    Example:
        >>> _same_numbers({"x": 1.0, "y": -0.5}, {"x": 1.0, "y": -0.5 + 1e-12}), _same_numbers({"x": 1.0}, {"x": 0.9})
        (True, False)
    """
    scale = max([abs(v) for v in a.values()] + [abs(float(b[s])) for s in a] + [0.0])
    return all(abs(float(b[s]) - v) <= SAME_NUMBERS * scale for s, v in a.items())


def stored_figures_trust(
    rows: Sequence[Any],
    diagnostics: Any,
    estimator: str,
    fidelity: Mapping[str, Any] | None = None,
    last_stage: str | None = None,
) -> dict[str, Any]:
    """The verdict of a behavior assessed from a report's stored figures alone (a report written before verdicts
    existed): its rows' effects, intervals and ``replay_effect``, the two readings of its linearisation pair, and
    the report's replay ``fidelity`` when that covers this behavior alone (then it is this behavior's agreement);
    ``last_stage``, the ledger's, is exact for a finite-difference estimate (:func:`exact_stages`).

    Example:
        >>> from hf_stage_attribution.report.schema import ReportRow
        >>> rows = [ReportRow("a", 0, "f", "aa-linear", 0.1, 0.0, 0.2, [0.1]),
        ...         ReportRow("b", 1, "f", "aa-linear", 2.0, 1.9, 2.1, [2.0])]
        >>> stored_figures_trust(rows, None, "aa-linear")["verdict"]
        'unreliable'
    """
    effects = {r.stage: float(r.effect) for r in rows}
    intervals = {
        r.stage: (float(r.ci_low), float(r.ci_high)) if r.ci_low is not None and r.ci_high is not None else None
        for r in rows
    }
    replayed = {r.stage: r.replay_effect for r in rows}
    replay = replayed if all(v is not None for v in replayed.values()) else None
    figures = _own_fidelity(fidelity, rows[0].behavior) if rows and replay is None else None
    if figures is not None and estimator != "replay":
        verdict = _fidelity_verdict(figures, top_of(effects))
        verdict["evidence"]["assessed_from"] = "the report's replay fidelity (it was written without a verdict)"
        return verdict
    pair = list(getattr(diagnostics, "linearisation_pair", None) or [])
    gaps = dict(getattr(diagnostics, "linearisation_gap", None) or {})
    opinions = {}
    if len(pair) == 2 and gaps and estimator in pair:
        other = pair[1] if pair[0] == estimator else pair[0]
        key = "fd" if other == pair[1] else "linear"
        opinions[other] = {s: float(g[key]) for s, g in gaps.items() if key in g}
    exact = exact_stages(effects, estimator, pair, last_stage)
    verdict = assess_trust(
        effects, estimator=estimator, intervals=intervals, second_opinions=opinions, linearisation_gap=gaps or None,
        linearisation_pair=pair or None, replay=replay, exact_stages=exact,
    )  # fmt: skip
    verdict["evidence"]["assessed_from"] = "the report's stored figures (it was written without a verdict)"
    return verdict


def _own_fidelity(fidelity: Mapping[str, Any] | None, behavior: str) -> dict[str, Any] | None:
    """``fidelity["all"]`` when it was computed on ``behavior`` alone (``estimators.fidelity`` layout), else None."""
    block = (fidelity or {}).get("all")
    if not isinstance(block, Mapping) or set(block.get("scale_free_error_per_behavior") or {}) != {behavior}:
        return None
    if any(not isinstance(block.get(k), int | float) for k in ("top_stage_agreement", "sign_agreement")):
        return None
    return dict(block)


def _fidelity_verdict(figures: Mapping[str, Any], top: str) -> dict[str, Any]:
    """The replay verdict from one behavior's fidelity figures (top-stage agreement, sign agreement, Spearman, the
    scale-free error). They hold no per-stage sizes, so they cannot meet the size bar of "verified by replay": where
    they agree the verdict is "unreliable" saying so. The scale-free error (``median_k |τ̂_k − τ_k| / max_k |τ_k|``)
    is at most 1 when every stage that moved the behavior is within :data:`SIZE_RATIO_MAX` of replay's size (such a
    stage is off by at most its replay size, a stage that moved nothing by a few % of the largest), so one above 1
    is replay disagreeing on sizes.

    Example:
        >>> figures = {"n_pairs": 3, "top_stage_agreement": 1.0, "sign_agreement": 1.0, "spearman": 1.0}
        >>> _fidelity_verdict({**figures, "scale_free_error": 4.5}, "sft")["label"].split(" (")[0]
        "unreliable: replay disagrees — sizes: the median stage's error is 4.5× replay's largest |effect|"
        >>> _fidelity_verdict({**figures, "scale_free_error": 0.1}, "sft")["verdict"]
        'unreliable'
    """
    evidence: dict[str, Any] = {"top_stage": top, "replay": {k: figures.get(k) for k in (
        "n_pairs", "top_stage_agreement", "sign_agreement", "spearman", "scale_free_error")}}  # fmt: skip
    why = []
    if figures["top_stage_agreement"] < 1.0:
        why.append(f"replay names another top stage than {top}")
    if figures["sign_agreement"] < SIGN_AGREEMENT_MIN - _ROUNDING:
        why.append(f"signs agree on {100 * figures['sign_agreement']:.0f} % of the stages")
    rho = figures.get("spearman")
    if isinstance(rho, int | float) and (figures.get("n_pairs") or 0) >= 3 and rho < SPEARMAN_MIN - _ROUNDING:
        why.append(f"replay ranks the stages differently (Spearman {rho:.2f})")
    error = figures.get("scale_free_error")
    if isinstance(error, int | float) and not isinstance(error, bool) and error > 1.0 + _ROUNDING:
        why.append(
            f"sizes: the median stage's error is {error:.2g}× replay's largest |effect| (above 1: a stage that moved "
            f"the behavior is more than {SIZE_RATIO_MAX:g}-fold off replay's size)"
        )
    if why:
        text = "; ".join(why)
        return _finish(
            UNRELIABLE, f"unreliable: replay disagrees — {text}", f"Exact replay disagrees: {text}.", evidence
        )
    text = (
        "replay's stored figures agree on the top stage, the signs and the ranking, but hold no per-stage sizes to "
        f"check against the {SIZE_RATIO_MAX:g}-fold bar of {LABEL_VERIFIED!r}"
    )
    return _finish(UNRELIABLE, f"estimated — unreliable: {text}", f"Exact replay agrees in part: {text}.", evidence)
