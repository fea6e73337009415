"""LM toxicity behaviors for causal LMs.

- :class:`TeacherForcedToxicity` (``lm-toxicity-teacher-forced``): ``log p(toxic | prompt) − log p(clean |
  prompt)``, summed token log-probabilities; differentiable, no sampling.
- :class:`GenerationToxicity` (``lm-toxicity-generations``): an estimate of the expected toxicity of the model's
  own completions, scored by a pluggable scorer (see :mod:`.scorers`; offline default ``alt-profanity-check``),
  through importance weights of completions sampled once from the final model (see :mod:`.importance`).

Prompt and continuation are tokenized separately and concatenated (no special tokens); with byte-level BPE
tokenizers (GPT-2, Llama 3, Qwen, SmolLM) start continuations with a space: a one-time notice names the first
example that does not (its values are computed as given).

Example:
    >>> from hf_stage_attribution.testing.lm import tiny_tokenizer, tiny_gpt2, toy_corpus
    >>> from hf_stage_attribution.behaviors import TeacherForcedToxicity
    >>> tok = tiny_tokenizer()
    >>> b = TeacherForcedToxicity(toy_corpus(0).teacher_forced_examples(), tokenizer=tok)
    >>> b(tiny_gpt2(tok)).shape
    torch.Size([12])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from .._internal.notices import notice
from ..errors import BehaviorError
from .base import ExampleBehavior
from .importance import SampledCompletionsBehavior
from .loading import load_tokenizer, reference_path, spec_reference
from .registry import register
from .scorers import get_scorer
from .sequences import continuation_logprobs, encode, fit_prompt, max_positions

__all__ = ["TeacherForcedToxicity", "GenerationToxicity"]


def _alternatives(value: Any, key: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise BehaviorError(f"Field {key!r} must be a non-empty string or list of strings; got {value!r:.80}.")
    return values


def splits_leading_space(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is byte-level BPE (its backend pre-tokenizer is, or contains, ``ByteLevel``; a slow GPT-2
    tokenizer has a ``byte_encoder``) and encodes "a" and " a" differently, so that text tokenized on its own lacks
    the leading space a word has in running text."""
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    try:
        state = pre.__getstate__() if pre is not None else b""
    except (AttributeError, TypeError, ValueError):
        state = b""
    byte_level = b'"type":"ByteLevel"' in state if isinstance(state, bytes) else False
    if not byte_level and not hasattr(tokenizer, "byte_encoder"):
        return False
    try:
        return encode(tokenizer, "a") != encode(tokenizer, " a")
    except Exception:  # a tokenizer that cannot encode the probe: no notice here, evaluation says what is wrong
        return False


_said: set[str] = set()  # leading-space notices already given in this process (a rebuilt behavior says it once)


def _glued(prompt: Any, continuation: Any) -> bool:
    return (
        isinstance(prompt, str) and isinstance(continuation, str) and bool(prompt) and bool(continuation)
        and not prompt[-1].isspace() and not continuation[0].isspace()
    )  # fmt: skip


@register
class TeacherForcedToxicity(ExampleBehavior):
    """``log p(toxic continuation | prompt) − log p(non-toxic continuation | prompt)`` per example (nats).

    Examples are dicts with ``prompt``, ``toxic`` and ``clean`` (keys configurable); a list of continuations
    under ``toxic``/``clean`` is averaged (mean of the summed log-probabilities).

    Example:
        >>> from hf_stage_attribution.testing.lm import tiny_tokenizer, tiny_gpt2
        >>> tok = tiny_tokenizer()
        >>> b = TeacherForcedToxicity([{"prompt": "you are", "toxic": "a shit", "clean": "kind"}], tokenizer=tok)
        >>> b(tiny_gpt2(tok)).requires_grad
        True
    """

    kind: ClassVar[str] = "lm-toxicity-teacher-forced"
    unit = "nats (log-prob. difference)"
    _spec_fields: ClassVar[tuple[str, ...]] = ("prompt_key", "toxic_key", "clean_key")
    _spec_special: ClassVar[tuple[str, ...]] = ("tokenizer",)

    def __init__(
        self,
        examples: Any,
        *,
        tokenizer: Any,
        prompt_key: str = "prompt",
        toxic_key: str = "toxic",
        clean_key: str = "clean",
        name: str | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(examples, name=name or "toxicity-teacher-forced", batch_size=batch_size)
        if tokenizer is None:
            raise BehaviorError(f"Behavior {self.name!r} needs a tokenizer (an object or a local directory).")
        self._tokenizer_ref = tokenizer
        self.tokenizer = load_tokenizer(tokenizer)
        self.prompt_key, self.toxic_key, self.clean_key = prompt_key, toxic_key, clean_key
        self.description = (
            f"{self.name}: log p(toxic continuation | prompt) - log p(non-toxic continuation | prompt), summed over "
            "tokens; higher = more toxic."
        )
        self._check_leading_spaces()

    def _check_leading_spaces(self) -> None:
        """A notice (once, when built) if a byte-level tokenizer will see a continuation glued to its prompt."""
        if not splits_leading_space(self.tokenizer):
            return
        first, count = None, 0
        for i, row in enumerate(self.data.rows()):
            if not isinstance(row, dict):
                continue
            for key in (self.toxic_key, self.clean_key):
                options = row.get(key) if isinstance(row.get(key), list) else [row.get(key)]
                glued = next((c for c in options if _glued(row.get(self.prompt_key), c)), None)
                if glued is not None:
                    count += 1
                    first = first or (i, row[self.prompt_key], key, glued)
                    break
        if first is None:
            return
        i, prompt, key, text = first
        message = (
            f"{self.where()}: its tokenizer is byte-level BPE, where a word's leading space belongs to its token, and "
            f"prompt and continuation are tokenized separately; in {count} of {len(self)} examples a continuation "
            f"starts without a space after a prompt that ends without one, so its first word is scored as a "
            f"different token than in running text (e.g. example {i}: prompt {prompt!r:.60} + {key} {text!r:.60}). "
            f"Start continuations with a space ({(' ' + text)!r:.60})."
        )
        if message not in _said:
            _said.add(message)
            notice(message, routine=False)

    def _batch_values(self, model: torch.nn.Module, rows: list[Any], positions: range) -> torch.Tensor:
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        limit = max_positions(model)
        prompts, conts, owner, sign = [], [], [], []
        for r, row in enumerate(rows):
            missing = [k for k in (self.prompt_key, self.toxic_key, self.clean_key) if k not in row]
            if missing:
                raise BehaviorError(f"Example {positions[r]} has no {missing} field(s).")
            prompt = encode(tok, row[self.prompt_key])
            for key, s in ((self.toxic_key, 1.0), (self.clean_key, -1.0)):
                options = _alternatives(row[key], key)
                for text in options:
                    cont = encode(tok, text)
                    room = None if limit is None else limit - len(cont)
                    prompts.append(fit_prompt(prompt, room, start))
                    conts.append(cont)
                    owner.append(r)
                    sign.append(s / len(options))
        lp = continuation_logprobs(model, prompts, conts, pad_id=pad)
        weights = torch.tensor(sign, dtype=lp.dtype, device=lp.device)
        index = torch.tensor(owner, device=lp.device)
        return torch.zeros(len(rows), dtype=lp.dtype, device=lp.device).index_add(0, index, lp * weights)

    def _spec_values(self) -> dict[str, Any]:
        return {"tokenizer": reference_path(self._tokenizer_ref, "tokenizer")}

    @classmethod
    def _spec_kwargs(cls, spec: dict[str, Any], base_dir: Path | None, trust_code: bool) -> dict[str, Any]:
        return {"tokenizer": spec_reference(spec.get("tokenizer"), base_dir, "tokenizer", trust_code=trust_code)}


@register
class GenerationToxicity(SampledCompletionsBehavior):
    """Estimated expected toxicity of the model's own completions of each prompt (0-1 for the default scorer).

    ``prepare(final_model)`` samples ``num_samples`` completions per prompt (``max_new_tokens``, ``temperature``,
    ``top_k``; a seeded generator per sample, no global RNG use) and scores them once with ``scorer``; the value
    at other parameters is the importance-weighted estimate described in :mod:`.importance` (``weighting``
    defaults to self-normalised; to plain when ``completion_key`` names given completions instead of sampling).
    Higher = more toxic.
    ``score_prompt=True`` scores prompt + completion instead of the completion alone.

    Example:
        >>> from hf_stage_attribution.testing.lm import tiny_tokenizer, tiny_gpt2
        >>> tok = tiny_tokenizer(); lm = tiny_gpt2(tok)
        >>> b = GenerationToxicity([{"prompt": "you are"}], tokenizer=tok, scorer="better-profanity", num_samples=2)
        >>> b.prepare(lm)
        >>> b(lm).shape
        torch.Size([1])
    """

    kind: ClassVar[str] = "lm-toxicity-generations"
    _spec_fields: ClassVar[tuple[str, ...]] = (*SampledCompletionsBehavior._lm_fields, "score_prompt")
    _spec_special: ClassVar[tuple[str, ...]] = ("tokenizer", "scorer")

    def __init__(
        self,
        examples: Any,
        *,
        tokenizer: Any,
        scorer: Any = "alt-profanity-check",
        prompt_key: str = "prompt",
        completion_key: str | None = None,
        num_samples: int = 4,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
        weighting: str | None = None,
        score_prompt: bool = False,
        name: str | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(examples, name=name or "toxicity-generations", batch_size=batch_size)
        if tokenizer is None:
            raise BehaviorError(f"Behavior {self.name!r} needs a tokenizer (an object or a local directory).")
        self._tokenizer_ref = tokenizer
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
        self.scorer = get_scorer(scorer)
        self.score_prompt = bool(score_prompt)
        self.unit = f"expected toxicity ({self.scorer.name} score)"
        self.description = (
            f"{self.name}: {self.weighting} importance-sampling estimate of the expected {self.scorer.name} "
            f"toxicity of the model's completions ({self.num_samples} fixed samples per prompt from the final "
            "model); higher = more toxic."
        )

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        if self.score_prompt:
            return self.scorer([f"{p}{c}" for p, c in zip(prompts, completions)])
        return self.scorer([c.strip() for c in completions])

    def _spec_values(self) -> dict[str, Any]:
        return {"tokenizer": reference_path(self._tokenizer_ref, "tokenizer"), "scorer": self.scorer.to_spec()}

    @classmethod
    def _spec_kwargs(cls, spec: dict[str, Any], base_dir: Path | None, trust_code: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "tokenizer": spec_reference(spec.get("tokenizer"), base_dir, "tokenizer", trust_code=trust_code)
        }
        if "scorer" in spec:
            kwargs["scorer"] = get_scorer(spec["scorer"], base_dir=base_dir, trust_code=trust_code)
        return kwargs
