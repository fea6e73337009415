"""Reward behaviors: a reward model's score of (prompt, response) pairs, in two roles.

- :class:`PolicyReward` (``reward``): the attributed model is the **policy** (a causal LM); the reward model is
  a fixed scorer (``AutoModelForSequenceClassification`` with 1 label). Responses are sampled once from the
  final policy in ``prepare`` (or given under ``completion_key``), rewarded once, and the value at other policy
  parameters is the importance-weighted estimate of :mod:`.importance` (self-normalised per prompt for samples,
  plain ratio for given responses); its gradient at the final policy is the score-function surrogate
  ``reward · ∇ log p(response | prompt)``. Higher = the policy earns more reward.
- :class:`RewardModelScore` (``reward-model``): the attributed model **is** the reward model (e.g. a reward-modelling
  stage in the ledger): its scalar output on each pair (``measure="score"``), or chosen minus rejected
  (``measure="margin"``); differentiable in the reward model's parameters. Higher = more reward / preference.

The text scored is ``prompt + separator + response``.

Example:
    >>> from hf_stage_attribution.testing.lm import tiny_tokenizer, tiny_bert_classifier
    >>> from hf_stage_attribution.behaviors import RewardModelScore
    >>> tok = tiny_tokenizer(); rm = tiny_bert_classifier(tok, num_labels=1)
    >>> rows = [{"prompt": "you are", "chosen": " kind", "rejected": " a shit"}]
    >>> RewardModelScore(rows, tokenizer=tok, measure="margin")(rm).shape
    torch.Size([1])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import BehaviorError
from .base import ExampleBehavior, eval_mode
from .importance import SampledCompletionsBehavior
from .loading import folder_tokenizer, load_sequence_classifier, load_tokenizer, reference_path, spec_reference
from .registry import register
from .text_inputs import embedding_rows, forward_texts

__all__ = ["PolicyReward", "RewardModelScore", "reward_index", "reward_scores"]

REWARD_MEASURES = ("score", "margin")


def _vocab_slack(rows: int) -> int:
    """How many more embedding rows than tokenizer ids still count as the same vocabulary (embedding matrices are
    often padded: Qwen2.5 151936 rows for 151665 ids, Phi-2 51200 for 50295)."""
    return max(128, int(0.02 * rows))


def _label_names(model: torch.nn.Module, count: int) -> str:
    """``0: 'NEGATIVE', 1: 'POSITIVE'`` from ``config.id2label`` (indices alone where it names none)."""
    names = {int(k): v for k, v in (getattr(getattr(model, "config", None), "id2label", None) or {}).items()}
    return ", ".join(f"{i}: {names[i]!r}" if i in names else str(i) for i in range(count))


def reward_index(model: torch.nn.Module, label_index: int | None, labels: int | None = None) -> int:
    """The logit that is the reward: ``label_index``, or 0 for a one-label model. A classifier with several labels
    and no ``label_index`` is refused (its logit 0 is a class, often the negative one, not a reward)."""
    if label_index is not None:
        return int(label_index)
    if labels is None:
        labels = getattr(getattr(model, "config", None), "num_labels", None)
    if isinstance(labels, int) and labels > 1:
        raise BehaviorError(
            f"The reward model is a classifier with {labels} labels ({_label_names(model, labels)}; config.id2label) "
            "and no `label_index` says which logit is the reward; set label_index to the class whose logit should "
            "count as reward (a reward model trained as one, e.g. with TRL's RewardTrainer, has num_labels=1)."
        )
    return 0


def reward_scores(
    reward_model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    label_index: int | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """The reward model's output ``logits[:, label_index]`` on ``texts`` (differentiable; right-padded with the pad
    or eos token whatever the tokenizer's padding side, see :mod:`.text_inputs`). Without ``label_index`` the model
    must have a single output (``num_labels=1``)."""
    logits = forward_texts(reward_model, tokenizer, texts, max_length=max_length).logits
    if logits.dim() == 2:
        label_index = reward_index(reward_model, label_index, labels=logits.shape[-1])
    if logits.dim() != 2 or label_index is None or not 0 <= label_index < logits.shape[-1]:
        raise BehaviorError(
            f"The reward model returned logits of shape {tuple(logits.shape)}; expected "
            f"[batch, labels] with label_index {label_index} (a model with num_labels=1)."
        )
    return logits[:, label_index].float()


@register
class RewardModelScore(ExampleBehavior):
    """The reward model's own score (``measure="score"``, field ``response``) or preference margin
    (``measure="margin"``: ``r(prompt + chosen) − r(prompt + rejected)``), as a behavior of the reward model.

    Example:
        >>> from hf_stage_attribution.testing.lm import tiny_tokenizer, tiny_bert_classifier
        >>> tok = tiny_tokenizer()
        >>> b = RewardModelScore([{"prompt": "hi", "response": " there"}], tokenizer=tok)
        >>> b(tiny_bert_classifier(tok, num_labels=1)).shape
        torch.Size([1])
    """

    kind: ClassVar[str] = "reward-model"
    _spec_fields: ClassVar[tuple[str, ...]] = (
        "measure", "prompt_key", "response_key", "chosen_key", "rejected_key", "separator", "label_index",
        "max_length",
    )  # fmt: skip
    _spec_special: ClassVar[tuple[str, ...]] = ("tokenizer",)

    def __init__(
        self,
        examples: Any,
        *,
        tokenizer: Any,
        measure: str = "score",
        prompt_key: str = "prompt",
        response_key: str = "response",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
        separator: str = "",
        label_index: int | None = None,
        max_length: int | None = None,
        name: str | None = None,
        batch_size: int = 32,
    ) -> None:
        if measure not in REWARD_MEASURES:
            raise BehaviorError(f"`measure` must be one of {REWARD_MEASURES}; got {measure!r}.")
        super().__init__(examples, name=name or f"reward-model-{measure}", batch_size=batch_size)
        if tokenizer is None:
            raise BehaviorError(f"Behavior {self.name!r} needs the reward model's tokenizer.")
        self._tokenizer_ref, self.tokenizer = tokenizer, load_tokenizer(tokenizer)
        self.measure, self.prompt_key, self.response_key = measure, prompt_key, response_key
        self.chosen_key, self.rejected_key, self.separator = chosen_key, rejected_key, separator
        self.label_index = None if label_index is None else int(label_index)
        self.max_length = max_length
        if measure == "score":
            self.unit = "reward"
            self.description = f"{self.name}: the reward model's score of prompt + response; higher = more reward."
        else:
            self.unit = "reward margin"
            self.description = (
                f"{self.name}: reward of prompt + chosen minus prompt + rejected; higher = the "
                "reward model prefers the chosen response more."
            )

    def _texts(self, rows: list[dict[str, Any]], key: str, positions: range) -> list[str]:
        for r, row in enumerate(rows):
            if self.prompt_key not in row or key not in row:
                raise BehaviorError(f"Example {positions[r]} needs {self.prompt_key!r} and {key!r} fields.")
        return [f"{row[self.prompt_key]}{self.separator}{row[key]}" for row in rows]

    def _batch_values(self, model: torch.nn.Module, rows: list[Any], positions: range) -> torch.Tensor:
        if self.measure == "score":
            texts = self._texts(rows, self.response_key, positions)
        else:
            texts = self._texts(rows, self.chosen_key, positions) + self._texts(rows, self.rejected_key, positions)
        values = reward_scores(model, self.tokenizer, texts, label_index=self.label_index, max_length=self.max_length)
        return values if self.measure == "score" else values[: len(rows)] - values[len(rows) :]

    def _spec_values(self) -> dict[str, Any]:
        return {"tokenizer": reference_path(self._tokenizer_ref, "tokenizer")}

    @classmethod
    def _spec_kwargs(cls, spec: dict[str, Any], base_dir: Path | None, trust_code: bool) -> dict[str, Any]:
        return {"tokenizer": spec_reference(spec.get("tokenizer"), base_dir, "tokenizer", trust_code=trust_code)}


@register
class PolicyReward(SampledCompletionsBehavior):
    """A fixed reward model's estimated expected reward of the policy's responses to each prompt.

    The reward model's texts are encoded with ``reward_tokenizer``; left out, it is the tokenizer saved in the reward
    model's folder (``reward_model`` given as a folder, or an object loaded from one), else the policy's
    ``tokenizer``, which is refused (a :class:`~hf_stage_attribution.errors.BehaviorError` naming
    ``reward_tokenizer=``) when its vocabulary does not fit the reward model's embeddings.

    Example:
        >>> from hf_stage_attribution.testing.lm import tiny_tokenizer, tiny_gpt2, tiny_bert_classifier
        >>> tok = tiny_tokenizer(); policy = tiny_gpt2(tok); rm = tiny_bert_classifier(tok, num_labels=1)
        >>> b = PolicyReward([{"prompt": "you are"}], tokenizer=tok, reward_model=rm, num_samples=2)
        >>> b.prepare(policy)
        >>> b(policy).shape
        torch.Size([1])
    """

    kind: ClassVar[str] = "reward"
    _spec_fields: ClassVar[tuple[str, ...]] = (
        *SampledCompletionsBehavior._lm_fields, "separator", "label_index", "max_length",
    )  # fmt: skip
    _spec_special: ClassVar[tuple[str, ...]] = ("tokenizer", "reward_model", "reward_tokenizer")

    def __init__(
        self,
        examples: Any,
        *,
        tokenizer: Any,
        reward_model: Any,
        reward_tokenizer: Any = None,
        prompt_key: str = "prompt",
        completion_key: str | None = None,
        num_samples: int = 4,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
        weighting: str | None = None,
        separator: str = "",
        label_index: int | None = None,
        max_length: int | None = None,
        name: str | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(examples, name=name or "policy-reward", batch_size=batch_size)
        if tokenizer is None or reward_model is None:
            raise BehaviorError(f"Behavior {self.name!r} needs the policy's tokenizer and a reward_model.")
        self._tokenizer_ref, self._reward_ref = tokenizer, reward_model
        self._reward_tokenizer_ref = reward_tokenizer
        self._init_sampling(
            load_tokenizer(tokenizer),
            prompt_key=prompt_key,
            completion_key=completion_key,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            weighting=weighting,
        )
        self.reward_model = load_sequence_classifier(reward_model)
        if reward_tokenizer is not None:
            self.reward_tokenizer = load_tokenizer(reward_tokenizer)
        else:
            self.reward_tokenizer = folder_tokenizer(reward_model) or self._policy_tokenizer_for_reward()
        self.separator, self.max_length = separator, max_length
        try:
            reward_index(self.reward_model, label_index)  # a multi-label classifier needs label_index, said now
        except BehaviorError as exc:
            raise BehaviorError(f"Behavior {self.name!r} ({self.kind}): {exc}") from None
        self.label_index = None if label_index is None else int(label_index)
        self.unit = "expected reward"
        source = f"given {completion_key!r} responses" if completion_key else f"{self.num_samples} samples per prompt"
        self.description = (
            f"{self.name}: {self.weighting} importance-weighted estimate of the reward model's score of "
            f"the policy's responses ({source} from the final policy); higher = more reward."
        )

    def _policy_tokenizer_for_reward(self) -> Any:
        """The policy's tokenizer, when its vocabulary fits the reward model's (no folder tokenizer was found)."""
        size = len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else None
        config = getattr(self.reward_model, "config", None)
        rows = embedding_rows(self.reward_model) or getattr(config, "vocab_size", None)
        if isinstance(size, int) and isinstance(rows, int) and (size > rows or rows - size > _vocab_slack(rows)):
            raise BehaviorError(
                f"Behavior {self.name!r}: the reward model takes {rows} token ids (its input embeddings / "
                f"config.vocab_size) but the policy's tokenizer has {size}; without `reward_tokenizer` and without a "
                "tokenizer saved in the reward model's folder, the policy's tokenizer would encode the reward model's "
                "inputs. Pass reward_tokenizer= (the reward model's own tokenizer, an object or its folder)."
            )
        return self.tokenizer

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [f"{p}{self.separator}{c}" for p, c in zip(prompts, completions)]
        out: list[float] = []
        with eval_mode(self.reward_model), torch.no_grad(), self.truncation():
            for i in range(0, len(texts), self.batch_size):
                out.extend(
                    reward_scores(
                        self.reward_model,
                        self.reward_tokenizer,
                        texts[i : i + self.batch_size],
                        label_index=self.label_index,
                        max_length=self.max_length,
                    ).tolist()
                )
        return out

    def _spec_values(self) -> dict[str, Any]:
        spec = {
            "tokenizer": reference_path(self._tokenizer_ref, "tokenizer"),
            "reward_model": reference_path(self._reward_ref, "reward model"),
        }
        if self._reward_tokenizer_ref is not None:
            spec["reward_tokenizer"] = reference_path(self._reward_tokenizer_ref, "reward tokenizer")
        return spec

    @classmethod
    def _spec_kwargs(cls, spec: dict[str, Any], base_dir: Path | None, trust_code: bool) -> dict[str, Any]:
        return {
            key: spec_reference(spec.get(key), base_dir, key.replace("_", " "), trust_code=trust_code)
            for key in cls._spec_special
        }
