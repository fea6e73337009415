"""Spurious reliance: the per-example gap in a classifier's margin (or a class logit) between an input with a
feature (a patch, an identity term, a trigger token) and the same input without it.

Example:
    >>> import torch
    >>> from hf_stage_attribution.behaviors import SpuriousReliance
    >>> clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    >>> patch = {"type": "patch", "value": 1.0, "region": [0, 2, 0, 2]}
    >>> b = SpuriousReliance([{"input": torch.zeros(4, 4).tolist()}], feature=patch, target=1)
    >>> b(clf).shape
    torch.Size([1])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import BehaviorError
from .base import ExampleBehavior, model_device
from .classification import (
    MEASURES,
    ClassifierInputs,
    check_measure,
    measure_values,
    resolve_targets,
)
from .loading import load_tokenizer, reference_path, spec_reference
from .registry import register

__all__ = ["SpuriousReliance", "apply_feature"]

FEATURE_TYPES = ("patch", "text", "trigger")


def check_feature(feature: dict[str, Any] | None, paired_key: str | None) -> dict[str, Any] | None:
    if (feature is None) == (paired_key is None):
        raise BehaviorError(
            "SpuriousReliance needs exactly one of `feature` (e.g. {'type': 'patch', 'value': 1.0, 'region': "
            "[0, 2, 0, 2]} or {'type': 'text', 'term': '...'}) and `paired_key` (the field holding the input "
            "with the feature)."
        )
    if feature is None:
        return None
    kind = feature.get("type")
    if kind not in FEATURE_TYPES:
        raise BehaviorError(f"Unknown feature type {kind!r}; known: {', '.join(FEATURE_TYPES)}.")
    if kind == "patch" and (len(feature.get("region", ())) != 4 or "value" not in feature):
        raise BehaviorError(f"A patch feature needs 'value' and 'region': [row0, row1, col0, col1]; got {feature}.")
    if kind in ("text", "trigger") and not isinstance(feature.get("term", feature.get("token")), str):
        raise BehaviorError(f"A {kind} feature needs a string 'term' (or 'token'); got {feature}.")
    if feature.get("position", "prefix") not in ("prefix", "suffix", "template"):
        raise BehaviorError(f"Feature 'position' must be prefix, suffix or template; got {feature['position']!r}.")
    return dict(feature)


def _insert(text: str, feature: dict[str, Any], present: bool) -> str:
    term = feature.get("term", feature.get("token")) if present else feature.get("neutral", "")
    position = feature.get("position", "prefix")
    if position == "template":
        placeholder = feature.get("placeholder", "{term}")
        if placeholder not in text:
            raise BehaviorError(f"Text {text!r} has no placeholder {placeholder!r} for a template feature.")
        return " ".join(text.replace(placeholder, term).split())
    if not term:
        return text
    return f"{term} {text}" if position == "prefix" else f"{text} {term}"


def _patch(x: torch.Tensor, feature: dict[str, Any], present: bool) -> torch.Tensor:
    if not present:
        return x
    shape = feature.get("image_shape")
    image = x.reshape(*x.shape[:-1], *shape) if shape else x  # flat inputs: reshape the last dim to an image
    if image.dim() < 2:
        raise BehaviorError(f"A patch needs inputs with at least 2 dims or 'image_shape'; got shape {tuple(x.shape)}.")
    r0, r1, c0, c1 = (int(v) for v in feature["region"])
    image = image.clone()
    image[..., r0:r1, c0:c1] = float(feature["value"])
    return image.reshape(x.shape)


def apply_feature(value: Any, feature: dict[str, Any], present: bool) -> Any:
    """The input with (``present=True``) or without the feature (text: insertion; tensors: a patch)."""
    if feature["type"] == "patch":
        return _patch(torch.as_tensor(value), feature, present)
    if not isinstance(value, str):
        raise BehaviorError(f"A {feature['type']} feature applies to text; got a {type(value).__name__}.")
    return _insert(value, feature, present)


@register
class SpuriousReliance(ClassifierInputs, ExampleBehavior):
    """Gap ``m(x with feature) − m(x without feature)`` of a classification measure ``m`` (default: margin of
    ``target``, or of each example's label); positive = the feature pushes the model toward the target class.

    Pairs come from a ``feature`` applied to each example's input (``patch``: set ``region`` of an image, or of
    a flat input reshaped to ``image_shape``, to ``value``; ``text``/``trigger``: insert ``term`` as a prefix or
    suffix, or into a ``{term}`` placeholder with ``position="template"``), or from ``paired_key`` naming the
    field that holds the input with the feature (the plain input is ``text``/``input``).

    Texts are truncated to ``max_length`` (default: the tokenizer's ``model_max_length``); an example whose two
    texts differ but encode to the same tokens (a suffix feature on a text longer than that) would measure a gap of
    0 whatever the model, so it is refused with a :class:`~hf_stage_attribution.errors.BehaviorError` naming the
    examples of the batch it found.

    Example:
        >>> import torch
        >>> rows = [{"input": [0.0, 0.0, 0.0, 0.0], "input_patched": [1.0, 0.0, 0.0, 0.0]}]
        >>> b = SpuriousReliance(rows, paired_key="input_patched", measure="logit", target=0)
        >>> b(torch.nn.Linear(4, 2)).shape
        torch.Size([1])
    """

    kind: ClassVar[str] = "spurious-reliance"
    _spec_fields: ClassVar[tuple[str, ...]] = (
        "feature", "paired_key", "measure", "target", "text_key", "input_key", "label_key", "max_length",
    )  # fmt: skip
    _spec_special: ClassVar[tuple[str, ...]] = ("tokenizer",)
    text_pair_key = None

    def __init__(
        self,
        examples: Any,
        *,
        feature: dict[str, Any] | None = None,
        paired_key: str | None = None,
        measure: str = "margin",
        target: int | str | None = None,
        tokenizer: Any = None,
        text_key: str = "text",
        input_key: str = "input",
        label_key: str = "label",
        max_length: int | None = None,
        name: str | None = None,
        batch_size: int = 32,
    ) -> None:
        self.measure = check_measure(measure)
        self.feature = check_feature(feature, paired_key)
        self.paired_key = paired_key
        super().__init__(examples, name=name or "spurious-reliance", batch_size=batch_size)
        self.target, self.text_key, self.input_key = target, text_key, input_key
        self.label_key, self.max_length = label_key, max_length
        self._tokenizer_ref = tokenizer
        self.tokenizer = load_tokenizer(tokenizer)
        self._check_text_has_tokenizer()
        unit, _ = MEASURES[measure]
        self.unit = f"difference in {unit}"
        what = self.feature["type"] if self.feature else f"the {paired_key!r} variant"
        self.description = (
            f"{self.name}: {measure} with the feature ({what}) minus without it; higher = the feature pushes the "
            "prediction more toward the target class (more reliance on the spurious feature)."
        )

    def _batch_values(self, model: torch.nn.Module, rows: list[Any], positions: range) -> torch.Tensor:
        plain, _ = self._inputs_of(rows)
        if self.paired_key is not None:
            missing = [i for i, r in enumerate(rows) if self.paired_key not in r]
            if missing:
                raise BehaviorError(f"Examples {missing[:5]} have no {self.paired_key!r} field (the paired input).")
            with_feature = [r[self.paired_key] for r in rows]
        else:
            with_feature = [apply_feature(v, self.feature, True) for v in plain]
            plain = [apply_feature(v, self.feature, False) for v in plain]
        inputs = self._encode(model, [*with_feature, *plain])
        if isinstance(inputs, dict):
            self._check_feature_kept(inputs, with_feature, plain, positions)
        logits = self._logits(model, inputs)
        labels = [self.target if self.target is not None else r.get(self.label_key) for r in rows]
        targets = resolve_targets(model, labels, model_device(model))
        values = measure_values(logits, torch.cat([targets, targets]), self.measure)
        return values[: len(rows)] - values[len(rows) :]

    def _check_feature_kept(
        self, inputs: dict[str, torch.Tensor], with_feature: list[Any], plain: list[Any], positions: range
    ) -> None:
        """Refuse examples whose texts differ but whose encodings do not: truncation (to ``max_length``, else the
        tokenizer's ``model_max_length``) cut the feature off, so the gap would be 0 whatever the model."""
        n = len(plain)
        same = (inputs["input_ids"][:n] == inputs["input_ids"][n:]).all(dim=1)
        if "attention_mask" in inputs:
            same &= (inputs["attention_mask"][:n] == inputs["attention_mask"][n:]).all(dim=1)
        found = same.nonzero().flatten().tolist()
        lost = [self.data.indices[positions[i]] for i in found if with_feature[i] != plain[i]]
        if lost:
            limit = self.max_length or getattr(self.tokenizer, "model_max_length", None)
            raise BehaviorError(
                f"{len(lost)} of the {n} examples in this batch (examples {lost[:10]} of the set) encode to the same "
                f"tokens with and without the feature after truncation to {limit} tokens, so they would measure a gap "
                "of 0 whatever the model; raise `max_length`, shorten these texts, or put the feature where "
                "truncation keeps it (position='prefix')."
            )

    def _spec_values(self) -> dict[str, Any]:
        return {} if self._tokenizer_ref is None else {"tokenizer": reference_path(self._tokenizer_ref, "tokenizer")}

    @classmethod
    def _spec_kwargs(cls, spec: dict[str, Any], base_dir: Path | None, trust_code: bool) -> dict[str, Any]:
        return {"tokenizer": spec_reference(spec.get("tokenizer"), base_dir, "tokenizer", trust_code=trust_code)}
