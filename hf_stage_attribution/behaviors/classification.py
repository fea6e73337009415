"""Classification behaviors: class logit, logit margin, probability, log-probability, cross-entropy.

Works for Hugging Face sequence-classification models (text in, tokenized with the given tokenizer /
processing class) and for any ``nn.Module`` classifier returning logits (tensor inputs, images included).

Example:
    >>> import torch
    >>> from hf_stage_attribution.behaviors import Classification
    >>> clf = torch.nn.Linear(4, 3)
    >>> b = Classification([{"input": [1.0, 0.0, 0.0, 0.0], "label": 2}], measure="margin")
    >>> b(clf).shape
    torch.Size([1])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import BehaviorError
from .base import ExampleBehavior, model_device
from .loading import load_tokenizer, reference_path, spec_reference
from .registry import register
from .text_inputs import encode_texts, padding_id, pooling_pad_id

__all__ = ["Classification", "MEASURES", "classifier_logits", "label_ids", "measure_values", "resolve_targets"]

MEASURES: dict[str, tuple[str, str]] = {  # measure -> (unit, sign convention)
    "logit": ("logit", "higher = the model scores the target class higher"),
    "margin": ("logit margin", "higher = more confident in the target class"),
    "probability": ("probability", "higher = more probability on the target class"),
    "log-probability": ("nats (log-probability)", "higher = more likely target class"),
    "cross-entropy": ("nats (cross-entropy)", "higher = worse on the target class"),
}
_MEASURE_TEXT = {
    "logit": "logit",
    "margin": "logit margin (its logit minus the best other logit)",
    "probability": "softmax probability",
    "log-probability": "log-softmax probability",
    "cross-entropy": "cross-entropy loss",
}


def check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise BehaviorError(f"Unknown classification measure {measure!r}; known measures: {', '.join(MEASURES)}.")
    return measure


def classifier_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, classes]`` of a classifier called on a dict of tensors (HF) or a tensor (nn.Module)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise BehaviorError(
            f"The classifier returned {shape}; expected logits of shape [batch, classes] (a tensor or an output "
            "with .logits)."
        )
    return logits


def measure_values(logits: torch.Tensor, targets: torch.Tensor, measure: str) -> torch.Tensor:
    """Per-row value of ``measure`` for class ``targets`` (long tensor) from ``logits [batch, classes]``."""
    logits = logits.float()
    n_classes = logits.shape[-1]
    if int(targets.max()) >= n_classes or int(targets.min()) < 0:
        raise BehaviorError(f"Target classes {sorted(set(targets.tolist()))} are outside the model's {n_classes}.")
    if measure == "logit":
        return logits.gather(1, targets[:, None]).squeeze(1)
    if n_classes < 2:
        raise BehaviorError(f"The measure {measure!r} needs at least 2 classes; the model has {n_classes}.")
    if measure == "margin":
        own = logits.gather(1, targets[:, None]).squeeze(1)
        mask = torch.nn.functional.one_hot(targets, n_classes).bool()
        return own - logits.masked_fill(mask, float("-inf")).max(dim=1).values
    log_probs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    if measure == "probability":
        return log_probs.exp()
    if measure == "log-probability":
        return log_probs
    return -log_probs  # cross-entropy


def label_ids(model: torch.nn.Module) -> dict[str, int]:
    """Label name -> class index from ``model.config``: ``label2id``, completed by inverting ``id2label`` (a config
    reloaded from disk may have ``id2label`` names and no or default ``label2id``)."""
    config = getattr(model, "config", None)
    names = {str(v): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return {**names, **{str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}}


def resolve_targets(model: torch.nn.Module, labels: list[Any], device: torch.device) -> torch.Tensor:
    """Class indices from ints or label names (through ``model.config.label2id``, else its ``id2label``)."""
    label2id = label_ids(model)
    out = []
    for label in labels:
        if isinstance(label, str):
            if label not in label2id:
                raise BehaviorError(
                    f"Label {label!r} is not a class name of the model (config.label2id / id2label: "
                    f"{sorted(label2id)}); use a class index or one of these names."
                )
            label = label2id[label]
        if label is None:
            raise BehaviorError("An example has no label and the behavior has no `target`; set one of them.")
        out.append(int(label))
    return torch.tensor(out, dtype=torch.long, device=device)


def stack_inputs(values: list[Any], model: torch.nn.Module) -> torch.Tensor:
    """Stack per-example inputs (tensors, arrays, nested lists) into a batch on the model's device/dtype."""
    device = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    batch = torch.stack([torch.as_tensor(v) for v in values]).to(device)
    return batch.to(dtype) if batch.is_floating_point() else batch


class ClassifierInputs:
    """Mixin: turn rows into classifier inputs, text (with a tokenizer) or tensors."""

    data: Any
    name: str
    kind: ClassVar[str]
    tokenizer: Any
    text_key: str
    text_pair_key: str | None
    input_key: str
    max_length: int | None

    def _encode(self, model: torch.nn.Module, texts: list[Any], pairs: list[Any] | None = None) -> Any:
        """Stacked tensors, or (with a tokenizer) the texts right-padded as :mod:`.text_inputs` describes."""
        if self.tokenizer is None:
            return stack_inputs(texts, model)
        pad_id = padding_id(self.tokenizer, model)
        return encode_texts(
            self.tokenizer, texts, pairs, max_length=self.max_length, pad_id=pad_id, device=model_device(model)
        )

    def _logits(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """:func:`classifier_logits` of ``inputs`` from :meth:`_encode` (a score head gets a pad id if it has none)."""
        if not isinstance(inputs, dict):
            return classifier_logits(model, inputs)
        with pooling_pad_id(model, padding_id(self.tokenizer, model)):
            return classifier_logits(model, inputs)

    def _check_text_has_tokenizer(self) -> None:
        """Text examples without a tokenizer fail here, when the behavior is built, not after the model loaded."""
        if self.tokenizer is not None or len(self.data) == 0:
            return
        if self.data.is_dataset:
            fields = set(self.data.items.column_names)
        else:
            first = self.data.rows(0, 1)[0]
            fields = set(first) if isinstance(first, dict) else set()
        if self.text_key in fields and self.input_key not in fields:
            raise BehaviorError(
                f"Behavior {self.name!r} ({self.kind}): its examples have a {self.text_key!r} field and no "
                f"{self.input_key!r} tensor, and it has no tokenizer; text examples need 'tokenizer' (a local folder "
                "with the model's tokenizer, usually the model's own folder, or a tokenizer object)."
            )

    def _inputs_of(self, rows: list[dict[str, Any]]) -> tuple[list[Any], list[Any] | None]:
        key = self.text_key if self.tokenizer is not None else self.input_key
        missing = [i for i, r in enumerate(rows) if not isinstance(r, dict) or key not in r]
        if missing:
            raise BehaviorError(f"Examples {missing[:5]} have no {key!r} field; every example needs one.")
        pairs = [r[self.text_pair_key] for r in rows] if self.tokenizer is not None and self.text_pair_key else None
        return [r[key] for r in rows], pairs


@register
class Classification(ClassifierInputs, ExampleBehavior):
    """A classifier's logit / margin / probability / log-probability / cross-entropy on a target class.

    Examples are dicts with ``text`` (and optionally a pair field) when a ``tokenizer`` is given (HF sequence
    classification), else ``input`` (anything ``torch.as_tensor`` accepts); the class is ``target`` when set,
    else each example's ``label`` (an index or a name from ``config.label2id``).

    Example:
        >>> import torch
        >>> clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> b = Classification([{"input": [[1.0, 2.0], [0.0, 1.0]]}], measure="probability", target=1)
        >>> float(b(clf)[0].detach()) < 1.0
        True
    """

    kind: ClassVar[str] = "classification"
    _spec_fields: ClassVar[tuple[str, ...]] = (
        "measure", "target", "text_key", "text_pair_key", "input_key", "label_key", "max_length",
    )  # fmt: skip
    _spec_special: ClassVar[tuple[str, ...]] = ("tokenizer",)

    def __init__(
        self,
        examples: Any,
        *,
        measure: str = "margin",
        target: int | str | None = None,
        tokenizer: Any = None,
        text_key: str = "text",
        text_pair_key: str | None = None,
        input_key: str = "input",
        label_key: str = "label",
        max_length: int | None = None,
        name: str | None = None,
        batch_size: int = 32,
    ) -> None:
        self.measure = check_measure(measure)
        super().__init__(examples, name=name or f"classification-{measure}", batch_size=batch_size)
        self.target, self.text_key, self.text_pair_key = target, text_key, text_pair_key
        self.input_key, self.label_key, self.max_length = input_key, label_key, max_length
        self._tokenizer_ref = tokenizer
        self.tokenizer = load_tokenizer(tokenizer)
        self._check_text_has_tokenizer()
        self.unit, sign = MEASURES[measure]
        which = f"class {target!r}" if target is not None else f"each example's {label_key!r} class"
        self.description = f"{self.name}: {_MEASURE_TEXT[measure]} of {which} ({sign})."

    def _targets(self, model: torch.nn.Module, rows: list[dict[str, Any]]) -> torch.Tensor:
        labels = [self.target if self.target is not None else r.get(self.label_key) for r in rows]
        return resolve_targets(model, labels, model_device(model))

    def _batch_values(self, model: torch.nn.Module, rows: list[Any], positions: range) -> torch.Tensor:
        texts, pairs = self._inputs_of(rows)
        logits = self._logits(model, self._encode(model, texts, pairs))
        return measure_values(logits, self._targets(model, rows), self.measure)

    def _spec_values(self) -> dict[str, Any]:
        return {} if self._tokenizer_ref is None else {"tokenizer": reference_path(self._tokenizer_ref, "tokenizer")}

    @classmethod
    def _spec_kwargs(cls, spec: dict[str, Any], base_dir: Path | None, trust_code: bool) -> dict[str, Any]:
        return {"tokenizer": spec_reference(spec.get("tokenizer"), base_dir, "tokenizer", trust_code=trust_code)}
