"""Built-in curvature losses for TRL preference stages (DPO), so ``aa-ggn`` works on ledgers recorded with TRL.

A recorded DPO stage carries ``curvature_loss={"type": "dpo", "beta": β, "loss_type": ["sigmoid"], ...}`` and
its captured batches hold the policy's inputs with chosen and rejected sequences concatenated along the batch
(chosen first) and ``labels = -100`` on prompt and padding. ``forward`` returns each row's summed completion
log-probability; ``loss`` is TRL's sigmoid DPO loss ``−log σ(β((lp_c − ref_c) − (lp_r − ref_r)))``. Splitting
at the log-probabilities makes ``Jᵀ H J`` a valid (PSD) Gauss–Newton matrix of the DPO loss. The reference
log-probabilities come from the stage's start θ_{j−1} (TRL's reference policy "copy of the stage start", or
"adapter disabled" for a PEFT policy), or — for TRL's default ``ref_model=None``, which reloads
``config._name_or_path`` — from that separate model, reloaded from its recorded path after checking its recorded
weight hash (as replay does); computed once per batch.

Example, on a ledger with a recorded TRL DPO stage::

    forward, loss = dpo_loss_pair(ledger, model, ledger.stage("dpo"))
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..._internal.memory import release_freed_memory
from ..._internal.model_state import clean_copy
from ..._internal.params import unwrap_model
from ...errors import MissingCurvatureError
from ...integrations.replay import load_recorded_reference
from ...ledger.core import LedgerCore
from ...ledger.stage import Stage
from ..replay import load_state

REFERENCE_POLICIES = ("copy of the stage start", "adapter disabled")
SEPARATE_REFERENCE = "separate model"


def sequence_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of the labelled (non -100) tokens of every row (float32, differentiable)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    logits = (out.logits if hasattr(out, "logits") else out[0])[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def _reference_record(stage: Stage) -> dict:
    return (stage.info.get("trl") or {}).get("reference_model") or {}


def dpo_support_problem(stage: Stage) -> str | None:
    """``None`` when the built-in loss reproduces the stage's recorded DPO setup, else what it does not support."""
    spec = getattr(stage, "curvature_loss", None) or {}
    ref = _reference_record(stage)
    policy = str(ref.get("policy") or "")
    loss_types = spec.get("loss_type") or ["sigmoid"]
    loss_types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    if spec.get("type") != "dpo":
        return f"the recorded loss is {spec.get('type')!r}, not 'dpo'"
    if loss_types != ["sigmoid"]:
        return f"the built-in DPO loss is TRL's 'sigmoid' loss; the stage used {loss_types}"
    if policy in REFERENCE_POLICIES or (policy.startswith(SEPARATE_REFERENCE) and ref.get("name_or_path")):
        return None
    return f"its reference model was {policy or 'not recorded'!r}, which the built-in loss cannot rebuild"


def supports_dpo(stage: Stage) -> bool:
    """Whether the stage's recorded DPO setup is one the built-in loss reproduces."""
    return dpo_support_problem(stage) is None


class _Reference:
    """The DPO reference policy, built when its log-probabilities are first needed and dropped once a sample's are
    cached (:func:`dpo_loss_pair`'s ``prepare``), so that it is not a second model held through the products."""

    def __init__(self, build: Callable[[], torch.nn.Module]) -> None:
        self._build, self._model = build, None

    def get(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self._build().eval().requires_grad_(False)
        return self._model

    def drop(self) -> None:
        if self._model is not None:
            alive = weakref.ref(self._model)
            self._model = None
            # a copy of a trained model may sit in a reference cycle (a patched forward): only then is a full
            # collection needed to free it (it walks every live object, 0.2 s a time after the transformers import;
            # run per curvature segment, it was a third of aa-ggn's time on the LM pipeline)
            release_freed_memory(collect=alive() is not None)


def dpo_loss_pair(ledger: LedgerCore, model: torch.nn.Module, stage: Stage) -> tuple[Callable, Callable]:
    """``(forward, loss)`` for a recorded DPO stage; ``model`` lends its architecture to the reference.

    The reference model is built when its log-probabilities are first needed (a recorded path that is gone is an
    error at once; a path whose weights differ from the recorded hash, when it is loaded) and dropped by
    ``loss.prepare(batches)`` once those batches' log-probabilities are cached."""

    beta = float((stage.curvature_loss or {}).get("beta", 0.1))
    ref = _reference_record(stage)
    if str(ref.get("policy") or "").startswith(SEPARATE_REFERENCE):

        def gone() -> MissingCurvatureError:
            return MissingCurvatureError(
                f"Stage {stage.name!r}: its DPO reference was loaded from {ref.get('name_or_path')!r}, which is not "
                "there any more. Put the reference back at that path, pass `loss_fns={stage name: (forward, loss)}`, "
                "or use --estimator aa-fd."
            )

        path = str(ref.get("name_or_path") or "")
        if not path or not Path(path).is_dir():
            raise gone()

        def build() -> torch.nn.Module:
            loaded = load_recorded_reference(ref)  # checks the recorded weight hash; None: the path is gone
            if loaded is None:
                raise gone()
            return loaded
    else:

        def build() -> torch.nn.Module:
            reference = clean_copy(unwrap_model(model))
            if hasattr(reference, "peft_config") and hasattr(reference, "unload"):
                reference = reference.unload()
            load_state(reference, ledger.state_at(stage.index - 1))
            return reference

    reference = _Reference(build)
    cache: dict[tuple, torch.Tensor] = {}

    def ref_logprobs(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ids, labels = batch["input_ids"], batch["labels"]
        key = (tuple(ids.shape), int(ids.sum()), int(labels.sum()), int((ids * labels.clamp(min=0)).sum()))
        if key not in cache:
            with torch.no_grad():
                cache[key] = sequence_logprobs(reference.get(), batch)
        return cache[key]

    def loss(logps: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        half = logps.shape[0] // 2
        ref = ref_logprobs(batch).to(logps.dtype)
        margin = (logps[:half] - ref[:half]) - (logps[half:] - ref[half:])
        return -torch.nn.functional.logsigmoid(beta * margin).mean()

    def prepare(batches: list[Mapping[str, torch.Tensor]]) -> None:
        # the reference's log-probabilities, computed before any product: a first forward of the reference inside a
        # functorch transform (the products of larger models) leaves tensors of that transform's level in its
        # caches, which the next product's level refuses ("escaped?")
        for batch in batches:
            ref_logprobs(batch)
        reference.drop()  # every product of these batches reads the cache: no second model held through them

    loss.prepare = prepare  # type: ignore[attr-defined]
    return sequence_logprobs, loss
