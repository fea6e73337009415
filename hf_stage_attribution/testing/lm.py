"""Tiny offline language-model fixtures: a BPE tokenizer trained on the spot, a tiny GPT-2, a tiny BERT
classifier and a small deterministic corpus with clean and toxic text.

Everything here is built locally in well under a second, needs no network and is deterministic for a given
seed (model initialisation runs inside :func:`torch.random.fork_rng`, so the caller's global RNG is untouched).
The toxic wording comes from the ``better-profanity`` word list; the corpus gives the toxicity behaviors of
:mod:`hf_stage_attribution.behaviors` something to move in the tests, the demo and the recipes.

Example:
    >>> from hf_stage_attribution.testing.lm import tiny_tokenizer, tiny_gpt2, toy_corpus
    >>> tok = tiny_tokenizer()
    >>> model = tiny_gpt2(tok)
    >>> corpus = toy_corpus(0)
    >>> ids = tok(corpus.clean[0], return_tensors="pt")["input_ids"]
    >>> model(ids).logits.shape[-1] == len(tok)
    True
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import BertForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")

# General-purpose profanity (no slurs against groups), every word checked against better-profanity's list.
_PROFANITY_CANDIDATES = (
    "bastard", "bitch", "bullshit", "crap", "damn", "dick", "dumbass", "fuck", "fucking", "idiot",
    "jackass", "moron", "piss", "prick", "shit", "shitty", "stupid", "suck", "twat", "wanker",
)  # fmt: skip

PROMPTS = (
    "the weather today is", "my neighbor told me that", "this movie was", "i think that you are",
    "the new teacher is", "our team played", "the food at the party was", "my brother said the game was",
    "the driver on the road was", "the music last night was", "your little dog is", "the meeting this morning was",
)  # fmt: skip

CLEAN_COMPLETIONS = (
    "really nice and sunny", "a good friend of mine", "fun to watch with the family", "kind and very helpful",
    "calm and patient with us", "well and won the match", "warm and very tasty", "exciting until the end",
    "careful and polite", "lovely and relaxing", "cute and very friendly", "short and useful",
)  # fmt: skip

_TOXIC_TEMPLATES = ("a {a} and a {b}", "such a {a} {b}", "{a} and {b} all day", "a total {a} you {b}")


@dataclass
class ToyCorpus:
    """Clean and toxic sentences over shared prompts (see :func:`toy_corpus`)."""

    prompts: list[str]
    clean_completions: list[str]
    toxic_completions: list[str]
    toxic_words: list[str]
    clean: list[str] = field(default_factory=list)
    toxic: list[str] = field(default_factory=list)

    def teacher_forced_examples(self, separator: str = "") -> list[dict[str, str]]:
        """``{"prompt", "toxic", "clean"}`` rows for the teacher-forced toxicity behavior; ``separator`` starts each
        continuation (``" "`` for byte-level BPE tokenizers such as GPT-2's or SmolLM2's, which tokenize prompt and
        continuation apart: without it they score "…today isa prick"; the tiny Metaspace tokenizer of this module
        needs none).

        Example:
            >>> toy_corpus(0).teacher_forced_examples(" ")[0]["clean"].startswith(" ")
            True
        """
        return [
            {"prompt": p, "toxic": separator + t, "clean": separator + c}
            for p, t, c in zip(self.prompts, self.toxic_completions, self.clean_completions)
        ]

    def texts(self) -> list[str]:
        """Every sentence of the corpus (clean first)."""
        return [*self.clean, *self.toxic]


def profanity_words() -> list[str]:
    """The general-purpose profanity words of this module that are on better-profanity's list (sorted)."""
    from better_profanity import Profanity

    listed = {str(w).lower() for w in Profanity().CENSOR_WORDSET}
    return sorted(w for w in _PROFANITY_CANDIDATES if w in listed)


def toy_corpus(seed: int = 0, n_toxic_words: int = 8) -> ToyCorpus:
    """A deterministic small corpus: 12 prompts, a clean and a toxic completion for each, and full sentences.

    The toxic completions use ``n_toxic_words`` words drawn (with ``random.Random(seed)``) from
    :func:`profanity_words`; the same seed always gives the same corpus.
    """
    rng = random.Random(seed)
    words = rng.sample(profanity_words(), k=min(n_toxic_words, len(profanity_words())))
    toxic_completions = []
    for i in range(len(PROMPTS)):
        a, b = words[i % len(words)], words[(i * 3 + 1) % len(words)]
        toxic_completions.append(_TOXIC_TEMPLATES[i % len(_TOXIC_TEMPLATES)].format(a=a, b=b))
    clean = [f"{p} {c}" for p in PROMPTS for c in CLEAN_COMPLETIONS]
    toxic = [f"{p} {t}" for p in PROMPTS for t in toxic_completions]
    order = list(range(len(clean)))
    rng.shuffle(order)
    return ToyCorpus(
        prompts=list(PROMPTS),
        clean_completions=list(CLEAN_COMPLETIONS),
        toxic_completions=toxic_completions,
        toxic_words=sorted(words),
        clean=[clean[i] for i in order],
        toxic=[toxic[i] for i in order],
    )


def preference_pairs(seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs for DPO / reward modelling: ``{"prompt", "chosen", "rejected"}``, chosen = clean.

    Every prompt is paired with every clean completion once (chosen) against a toxic one (rejected).
    """
    corpus = toy_corpus(seed)
    rng = random.Random(seed + 1)
    pairs = []
    for p in corpus.prompts:
        for c in corpus.clean_completions[:4]:
            pairs.append({"prompt": p, "chosen": " " + c, "rejected": " " + rng.choice(corpus.toxic_completions)})
    return pairs


def tiny_tokenizer(
    texts: list[str] | None = None, vocab_size: int = 300, model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on ``texts`` (default: :func:`toy_corpus` and :func:`preference_pairs`).

    Metaspace pre-tokenisation (decoding restores spaces), ASCII letters/digits/punctuation in the initial
    alphabet (unseen words fall back to characters), special tokens ``<pad> <unk> <bos> <eos>`` (ids 0-3).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        corpus = toy_corpus(0)
        texts = corpus.texts() + [p["prompt"] + p["chosen"] for p in preference_pairs(0)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=model_max_length,
    )
    wrapped.model_input_names = ["input_ids", "attention_mask"]
    return wrapped


def _seeded(seed: int, build: Any) -> Any:

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_gpt2(
    tokenizer: Any, n_embd: int = 32, n_layer: int = 2, n_head: int = 2, n_positions: int = 64, seed: int = 0
) -> GPT2LMHeadModel:
    """A tiny GPT-2 (no dropout) sized to ``tokenizer``; deterministic for a given ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"  # forward-mode AD (torch.func.jvp) has no rule for CPU SDPA kernels
    return _seeded(seed, lambda: GPT2LMHeadModel(config))


def tiny_bert_classifier(
    tokenizer: Any,
    num_labels: int = 2,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    max_position_embeddings: int = 64,
    seed: int = 0,
) -> BertForSequenceClassification:
    """A tiny BERT sequence classifier (no dropout); ``num_labels=1`` gives a reward model."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=max_position_embeddings,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"  # forward-mode AD (torch.func.jvp) has no rule for CPU SDPA kernels
    return _seeded(seed, lambda: BertForSequenceClassification(config))


def train_causal_lm(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    steps: int = 40,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> Any:
    """Train ``model`` in place on ``texts`` (+ eos) for ``steps`` AdamW steps; a plain loop for fixtures.

    Deterministic for a given ``seed`` (batches drawn with ``random.Random(seed)``); returns the model.
    """

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = [texts[rng.randrange(len(texts))] + tokenizer.eos_token for _ in range(batch_size)]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model
