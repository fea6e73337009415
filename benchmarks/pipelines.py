"""The pipelines the fidelity and cost figures are measured on, built fresh (offline) with a uniform interface.

- ``digits-hf`` / ``digits-decay``: the 3-stage MLP on scikit-learn's digits (``testing.digits``; Hugging Face
  defaults, and material decay), 7 behaviors, custom-loop recorder, replay by stage functions;
- ``lm``: the 4-stage GPT-2 pipeline pretraining → SFT → LoRA (merged) → DPO (``examples.lm_pipeline``; Trainer
  and TRL, ``StageRecorder`` with replay data), 4 behaviors, replay from the recorded replay data;
- ``digits-undo`` / ``digits-first`` (:mod:`benchmarks.shortcut`): 4 stages with SGD + momentum, Adam, RMSprop
  and AdamW under four schedules, where a later stage partly unlearns a shortcut an earlier one learned; and 3 stages
  where the *first* stage is the accountable one (Adagrad, then short, slow fine-tunes); 7 digits behaviors,
  custom-loop recorder with curvature material, replay by stage functions;
- ``digits-demo``: the demo's pipeline (``examples.spurious_digits``, size ``small``): an MLP pretrained from its
  initialisation, then 200 AdamW steps on digits whose 7s carry a corner patch, then a short fine-tune; the demo's
  3 behaviors. Added after the demo's "estimators agree" named the wrong stage: without ``pretraining`` the
  ``patch`` stage learns the digits from scratch, which neither replay family's check sees at 25 %;
- ``toxicity``: all-MiniLM-L6-v2 fine-tuned on clean toxicity data, then on an identity-biased data refresh, then a
  terminal LoRA stage (``recipes/toxicity_classifier_minilm/pipeline.py``), 5 behaviors, replay by the recipe's
  stage functions.

Example:
    >>> from benchmarks.pipelines import PIPELINES
    >>> PIPELINES
    ('digits-hf', 'digits-decay', 'digits-undo', 'digits-first', 'digits-demo', 'lm', 'toxicity')
    >>> # pipe = build("digits-hf", seed=0, settings=Settings.make(quick=True), root=Path("/tmp/b"))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import REPO, Settings, import_script

PIPELINES = ("digits-hf", "digits-decay", "digits-undo", "digits-first", "digits-demo", "lm", "toxicity")
SHORTCUT = {"digits-undo": "undo", "digits-first": "first"}  # benchmarks.shortcut configurations
TOXICITY_RECIPE = REPO / "recipes" / "toxicity_classifier_minilm" / "pipeline.py"


@dataclass
class BenchPipeline:
    """One recorded pipeline, ready to be attributed: ledger, final model, behaviors and what replay needs."""

    name: str
    seed: int
    ledger: Any
    model: Any
    behaviors: dict[str, Any]
    stage_fns: dict[str, Any] | None = None
    loss_fns: dict[str, Any] | None = None
    curvature_options: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    description: str = ""
    notes: list[str] = field(default_factory=list)


def build(
    name: str, seed: int, settings: Settings, root: Path, early_checkpoint: float | None = None
) -> BenchPipeline:
    """Train and record pipeline ``name`` with ``seed`` under ``root`` (a fresh directory); every stage with an
    early checkpoint at that fraction of its steps when ``early_checkpoint`` is given (``record_stage``'s option)."""
    start = time.perf_counter()
    if name in SHORTCUT:
        pipe = _shortcut(name, seed, settings, root, early_checkpoint)
    elif name == "digits-demo":
        pipe = _demo(seed, root, early_checkpoint)
    elif name.startswith("digits-"):
        pipe = _digits(name.split("-", 1)[1], seed, settings, root, early_checkpoint)
    elif name == "lm":
        pipe = _lm(seed, settings, root, early_checkpoint)
    elif name == "toxicity":
        pipe = _toxicity(seed, settings, root, early_checkpoint)
    else:
        raise ValueError(f"unknown pipeline {name!r}; known: {PIPELINES}")
    pipe.build_seconds = time.perf_counter() - start
    pipe.ledger.check_model(pipe.model)
    return pipe


def _digits(config: str, seed: int, settings: Settings, root: Path, early: float | None = None) -> BenchPipeline:
    from hf_stage_attribution.testing.digits import build_digits_pipeline

    scale = settings.digits_steps_scale
    p = build_digits_pipeline(
        config, root / "ledger", seed=seed, steps_scale=scale, base_steps_scale=scale, early_checkpoint=early
    )
    steps = ", ".join(f"{s.name} {s.steps} steps {s.optimizer} wd={s.weight_decay}" for s in p.specs)
    return BenchPipeline(
        f"digits-{config}", seed, p.ledger, p.model, dict(p.behaviors), p.stage_fns,
        {s.name: p.loss_fn for s in p.ledger.stages},
        description=f"MLP 64-32-10 on sklearn digits; {steps}",
    )  # fmt: skip


def _shortcut(name: str, seed: int, settings: Settings, root: Path, early: float | None = None) -> BenchPipeline:
    from hf_stage_attribution.testing.digits import forward, loss

    from .shortcut import build_shortcut_pipeline, describe

    p = build_shortcut_pipeline(
        SHORTCUT[name], root / "ledger", seed=seed, steps_scale=settings.digits_steps_scale, early_checkpoint=early
    )
    return BenchPipeline(
        name, seed, p.ledger, p.model, dict(p.behaviors), p.stage_fns, {s.name: (forward, loss) for s in p.specs},
        description=describe(p.specs),
    )  # fmt: skip


def _demo(seed: int, root: Path, early: float | None = None) -> BenchPipeline:
    from hf_stage_attribution import StageLedger
    from hf_stage_attribution.examples.spurious_digits import SIZES, build_spurious_digits, demo_behaviors, digits_loss

    p = build_spurious_digits(root, size="small", seed=seed, early_checkpoint=early)  # the demo's size, at every scale
    ledger = StageLedger.load(p.ledger_dir)
    steps = SIZES["small"]["steps"]
    return BenchPipeline(
        "digits-demo", seed, ledger, p.model, demo_behaviors(p), p.stage_fns,
        {s.name: digits_loss() for s in ledger.stages},
        description=(
            f"the demo's pipeline (examples.spurious_digits, size 'small'): MLP 64-{SIZES['small']['hidden']}-10, "
            f"AdamW at constant rates; pretraining {steps['pretraining']} steps from the initialisation → patch "
            f"{steps['patch']} steps (every 7 with a corner patch) → finetune {steps['finetune']} steps"
        ),
    )  # fmt: skip


def _lm(seed: int, settings: Settings, root: Path, early: float | None = None) -> BenchPipeline:
    from transformers import AutoModelForCausalLM

    from hf_stage_attribution import StageLedger
    from hf_stage_attribution.examples.lm_pipeline import SIZES, build_lm_pipeline

    p = build_lm_pipeline(root, size=settings.lm_size, seed=seed, early_checkpoint=early)
    model = AutoModelForCausalLM.from_pretrained(p.model_dir, attn_implementation="eager")  # the saved final model
    model.eval()
    ledger = StageLedger.load(p.ledger_dir)
    behaviors = dict(p.behaviors)
    for behavior in behaviors.values():
        if getattr(behavior, "needs_prepare", False):
            behavior.prepare(model)
    behaviors.update(_lm_logprob_behaviors(p.tokenizer, seed))
    cfg = SIZES[settings.lm_size]
    return BenchPipeline(
        "lm", seed, ledger, model, behaviors,
        description=(
            f"GPT-2 (n_embd={cfg['n_embd']}, n_layer={cfg['n_layer']}) size {settings.lm_size!r}: pretraining "
            f"{cfg['pretraining']} → SFT {cfg['sft']} → LoRA {cfg['lora']} (merged) → DPO {cfg['dpo']} steps"
        ),
    )  # fmt: skip


def _lm_logprob_behaviors(tokenizer: Any, seed: int, n: int = 16) -> dict[str, Any]:
    """Per-sentence summed log-probability of clean and of toxic corpus sentences."""
    from hf_stage_attribution.behaviors import PerExample
    from hf_stage_attribution.behaviors.sequences import continuation_logprobs, encode
    from hf_stage_attribution.testing.lm import toy_corpus

    corpus = toy_corpus(seed)
    start = tokenizer.bos_token_id

    def logprob(model: Any, texts: list[str]) -> Any:
        conts = [encode(tokenizer, t) for t in texts]
        return continuation_logprobs(model, [[start]] * len(conts), conts, pad_id=tokenizer.pad_token_id)

    return {
        "logprob-clean": PerExample(logprob, corpus.clean[:n], name="logprob-clean", unit="nats"),
        "logprob-toxic": PerExample(logprob, corpus.toxic[:n], name="logprob-toxic", unit="nats"),
    }


def load_toxicity_recipe() -> Any:
    """The recipes engineer's ``pipeline.py`` imported by path (recipes are not a package)."""
    return import_script("hsa_bench_toxicity_pipeline", TOXICITY_RECIPE)


def _toxicity(seed: int, settings: Settings, root: Path, early: float | None = None) -> BenchPipeline:
    from hf_stage_attribution import StageLedger
    from hf_stage_attribution.behaviors import Classification

    recipe = load_toxicity_recipe()
    p = recipe.build_toxicity_pipeline(root, size=settings.toxicity_size, seed=seed, early_checkpoint=early)
    cfg = p.config
    behaviors = dict(p.behaviors)
    common = {"tokenizer": p.tokenizer, "max_length": cfg["max_length"]}
    for group in ("clean", "clean+term", "toxic", "toxic+term"):
        rows = [r for r in p.eval_rows if r["group"] == group]
        behaviors[f"toxic-margin/{group}"] = Classification(rows, measure="margin", target=1, name=group, **common)
    return BenchPipeline(
        "toxicity", seed, StageLedger.load(p.ledger_dir), p.model, behaviors, p.stage_fns,
        description=(
            f"all-MiniLM-L6-v2 (22.7M, pretrained) + 2-class head, size {settings.toxicity_size!r}: fine-tuning "
            f"{cfg['ft_steps']} steps (clean, balanced) → data-refresh {cfg['refresh_steps']} steps (identity term "
            f"tied to toxic labels) → LoRA {cfg['lora_steps']} steps (terminal, unmerged)"
        ),
    )  # fmt: skip
