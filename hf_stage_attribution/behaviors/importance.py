"""Importance-weighted behaviors of a causal LM's own completions (generations, policy reward).

``prepare(final_model)`` fixes, for each prompt ``i``, ``m`` completions ``c_ij`` (sampled from the final model
θ_K with a per-sample seeded ``torch.Generator``, or given in the data), their scores ``s_ij`` (a constant:
toxicity, reward) and ``log p_θK(c_ij | prompt_i)``. The value of prompt ``i`` at parameters θ is then, with
``w_ij = exp(log p_θ(c_ij) − log p_θK(c_ij))`` (θ_K detached, gradient through θ):

- ``weighting="self-normalised"`` (default): ``Σ_j w_ij s_ij / Σ_j w_ij``, a self-normalised importance-sampling
  (SNIS) estimate of ``E_{c ~ p_θ(·|prompt_i)}[s]``; equals the sample mean at θ_K, its gradient there is the
  score-function surrogate with the group mean as baseline ``(1/m) Σ_j (s_ij − s̄_i) ∇ log p(c_ij)``. It stays
  within the range of the fixed scores (bounded, biased when θ is far from θ_K).
- ``weighting="plain"``: ``(1/m) Σ_j w_ij s_ij``, the unbiased IS estimate; its gradient at θ_K is exactly
  ``(1/m) Σ_j s_ij ∇ log p(c_ij)`` (score · ∇log p). High variance far from θ_K.

Both are estimates of the *expected* score under the model's sampling distribution (temperature / top-k
included), from a fixed, finite sample. Each prompt's value depends only on its own samples, so ``select``
splits exactly across processes, and a sample depends only on (seed, original example index, sample index).

Example:
    >>> from hf_stage_attribution.behaviors.importance import group_values
    >>> import torch
    >>> group_values(torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]), "self-normalised")
    tensor([0.5000], dtype=torch.float64)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._internal.hashing import values_checksum
from ..errors import BehaviorError
from .base import ExampleBehavior, eval_mode
from .sequences import continuation_logprobs, encode, fit_prompt, max_positions, sample_continuations, sample_seed

__all__ = ["SampledCompletionsBehavior", "group_values", "WEIGHTINGS"]

WEIGHTINGS = ("self-normalised", "plain")


def group_values(log_ratio: torch.Tensor, scores: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-group IS value from ``log_ratio`` and ``scores`` ``[groups, m]`` (float64)."""
    log_ratio, scores = log_ratio.double(), scores.double().to(log_ratio.device)
    if weighting == "self-normalised":
        return (log_ratio.softmax(dim=-1) * scores).sum(-1)
    return (log_ratio.exp() * scores).mean(-1)


class SampledCompletionsBehavior(ExampleBehavior):
    """Base: fixed completions per prompt, constant scores, importance weights w.r.t. the final model.

    Subclasses implement ``_score(prompts, completions) -> list[float]`` (called once, in :meth:`prepare`).

    Example:
        >>> from hf_stage_attribution.testing.lm import tiny_tokenizer, tiny_gpt2
        >>> class Length(SampledCompletionsBehavior):
        ...     kind = "completion-length"
        ...     def __init__(self, examples, tokenizer):
        ...         super().__init__(examples)
        ...         self._init_sampling(tokenizer, prompt_key="prompt", completion_key=None, num_samples=2,
        ...                             max_new_tokens=4, temperature=1.0, top_k=None, seed=0, weighting=None)
        ...     def _score(self, prompts, completions):
        ...         return [float(len(c)) for c in completions]
        >>> tok = tiny_tokenizer(); lm = tiny_gpt2(tok); b = Length([{"prompt": "hi"}], tok)
        >>> b.prepare(lm); b(lm).shape
        torch.Size([1])
    """

    _lm_fields: ClassVar[tuple[str, ...]] = (
        "prompt_key", "completion_key", "num_samples", "max_new_tokens", "temperature", "top_k", "seed", "weighting",
    )  # fmt: skip

    def _init_sampling(
        self,
        tokenizer: Any,
        *,
        prompt_key: str,
        completion_key: str | None,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        seed: int,
        weighting: str | None,
    ) -> None:
        if weighting is None:  # one given response per prompt makes self-normalised weights constant
            weighting = "plain" if completion_key is not None else "self-normalised"
        if weighting not in WEIGHTINGS:
            raise BehaviorError(f"`weighting` must be one of {WEIGHTINGS}; got {weighting!r}.")
        if int(num_samples) < 1 or int(max_new_tokens) < 1 or not float(temperature) > 0:
            raise BehaviorError(
                f"Need num_samples >= 1, max_new_tokens >= 1, temperature > 0; got {num_samples}, "
                f"{max_new_tokens}, {temperature}."
            )
        if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token_id", None) is None:
            raise BehaviorError("The tokenizer needs a pad or an eos token (set tokenizer.pad_token).")
        self.tokenizer = tokenizer
        self.prompt_key, self.completion_key = prompt_key, completion_key
        self.num_samples, self.max_new_tokens = int(num_samples), int(max_new_tokens)
        self.temperature, self.top_k, self.seed, self.weighting = float(temperature), top_k, int(seed), weighting

    @property
    def needs_prepare(self) -> bool:
        return "scores" not in self._state

    def needs_prepare_for(self, model: torch.nn.Module) -> bool:
        """Also when the completions, scores and ``log p_θK`` were taken on a model with other weights: the samples
        and their importance weights stand for the final model they were drawn from (a behavior object reused for a
        ledger extended by one stage kept the earlier model's samples: effects of the wrong sign, silently)."""
        return self.needs_prepare or getattr(self, "_prepared_on", None) != values_checksum(model)

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        raise NotImplementedError

    def _ids(self) -> tuple[int, int | None, int]:
        tok = self.tokenizer
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        start = tok.bos_token_id if tok.bos_token_id is not None else (eos if eos is not None else pad)
        return pad, eos, start

    def _given_completions(self, rows: list[dict[str, Any]]) -> list[list[str]]:
        missing = [i for i, r in enumerate(rows) if self.completion_key not in r]
        if missing:
            raise BehaviorError(f"Examples {missing[:5]} have no {self.completion_key!r} field (the given response).")
        given = [r[self.completion_key] for r in rows]
        return [list(g) if isinstance(g, list) else [g] for g in given]

    def _sampled_completions(self, model: torch.nn.Module, prompts: list[list[int]]) -> list[list[list[int]]]:
        pad, eos, _ = self._ids()
        m = self.num_samples
        flat_prompts = [p for p in prompts for _ in range(m)]
        seeds = [sample_seed(self.seed, idx, j) for idx in self.data.indices for j in range(m)]
        flat = sample_continuations(
            model,
            flat_prompts,
            seeds,
            max_new_tokens=self.max_new_tokens,
            eos_id=eos,
            pad_id=pad,
            temperature=self.temperature,
            top_k=self.top_k,
            batch_size=self.batch_size * m,
        )
        return [flat[i * m : (i + 1) * m] for i in range(len(prompts))]

    def _decode(self, prompt: list[int], completion: list[int]) -> str:
        """The completion's text as it continues the prompt (keeps a leading space that decoding alone drops)."""
        eos = self.tokenizer.eos_token_id
        body = [t for t in completion if t != eos]
        full = self.tokenizer.decode(prompt + body, skip_special_tokens=True)
        head = self.tokenizer.decode(prompt, skip_special_tokens=True)
        return full[len(head) :] if full.startswith(head) else self.tokenizer.decode(body, skip_special_tokens=True)

    def prepare(self, model: torch.nn.Module) -> None:
        """Fix the completions (sampled from ``model``, the final model), their scores and ``log p_θK``."""
        rows = self.data.rows()
        missing = [i for i, r in enumerate(rows) if not isinstance(r, dict) or self.prompt_key not in r]
        if missing:
            raise BehaviorError(f"Examples {missing[:5]} have no {self.prompt_key!r} field.")
        pad, eos, start = self._ids()
        limit = max_positions(model)
        raw_prompts = [encode(self.tokenizer, r[self.prompt_key]) for r in rows]
        with eval_mode(model), torch.no_grad():
            if self.completion_key is not None:  # given responses (one or a list per prompt), teacher-forced
                texts = self._given_completions(rows)  # scored as given (decoding may not restore spacing)
                completions = [[encode(self.tokenizer, t) for t in group] for group in texts]
                rooms = [None if limit is None else limit - max(len(c) for c in g) for g in completions]
                prompts = [fit_prompt(p, room, start) for p, room in zip(raw_prompts, rooms)]
            else:
                room = None if limit is None else limit - self.max_new_tokens
                prompts = [fit_prompt(p, room, start) for p in raw_prompts]
                completions = self._sampled_completions(model, prompts)
                texts = [[self._decode(p, c) for c in group] for p, group in zip(prompts, completions)]
            flat_scores = iter(
                self._score(
                    [r[self.prompt_key] for r, g in zip(rows, texts) for _ in g], [t for g in texts for t in g]
                )
            )
            state: dict[str, list[Any]] = {"prompt_ids": prompts, "completions": completions, "texts": texts}
            state["scores"] = [[next(flat_scores) for _ in g] for g in texts]
            state["final_logprobs"] = self._final_logprobs(model, state)
        self._state = state
        self._prepared_on = values_checksum(model)  # (select() copies carry it, as they carry the state)

    def _final_logprobs(self, model: torch.nn.Module, state: dict[str, list[Any]]) -> list[list[float]]:
        out: list[torch.Tensor] = []
        for start in range(0, len(self), self.batch_size):
            out.extend(self._logprobs(model, range(start, min(start + self.batch_size, len(self))), state))
        return [[float(v) for v in g] for g in out]

    def _logprobs(
        self, model: torch.nn.Module, positions: range, state: dict[str, list[Any]] | None = None
    ) -> list[torch.Tensor]:
        """``log p_θ(c_ij | prompt_i)`` for the prompts at ``positions``, one tensor per prompt."""
        pad, _, _ = self._ids()
        state = self._state if state is None else state
        prompts, completions = state["prompt_ids"], state["completions"]
        flat_p = [prompts[i] for i in positions for _ in completions[i]]
        flat_c = [c for i in positions for c in completions[i]]
        flat = continuation_logprobs(model, flat_p, flat_c, pad_id=pad, temperature=self.temperature, top_k=self.top_k)
        return list(flat.split([len(completions[i]) for i in positions]))

    def _batch_values(self, model: torch.nn.Module, rows: list[Any], positions: range) -> torch.Tensor:
        logps = self._logprobs(model, positions)
        out = []
        for i, lp in zip(positions, logps):
            final = torch.tensor(self._state["final_logprobs"][i], dtype=torch.float64, device=lp.device)
            scores = torch.tensor(self._state["scores"][i], dtype=torch.float64)
            out.append(group_values((lp.double() - final)[None], scores[None], self.weighting))
        return torch.cat(out).float()

    def samples(self) -> list[dict[str, Any]]:
        """The fixed completions per example: ``{"prompt", "completions", "scores", "final_logprobs"}``."""
        if self.needs_prepare:
            raise BehaviorError(f"Behavior {self.name!r} has no samples yet; call prepare(final_model) first.")
        rows = self.data.rows()
        return [
            {"prompt": r[self.prompt_key], "completions": t, "scores": s, "final_logprobs": lp}
            for r, t, s, lp in zip(rows, self._state["texts"], self._state["scores"], self._state["final_logprobs"])
        ]
