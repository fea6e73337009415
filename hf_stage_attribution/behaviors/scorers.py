"""Pluggable scorers of generated text (higher = more toxic): ``alt-profanity-check`` (offline default),
``better-profanity``, a local ``transformers`` text-classification model, an ``evaluate`` measurement or metric
(the Hub ``toxicity`` measurement where it can load, or a module in a local folder), or a callable.

Switch scorers with ``scorer=`` on the generation behavior: a name (``"alt-profanity-check"``,
``"better-profanity"``), a dict (``{"type": "transformers", "model": DIR, "toxic_label": "toxic"}``,
``{"type": "evaluate", "module": "toxicity" | FOLDER}``), a :class:`Scorer` or a callable ``texts -> scores``.

Code opt-in: an ``evaluate`` module is a Python script (the Hub's or a local folder's) that ``evaluate.load``
imports, a ``callable`` scorer imports a function, and a ``transformers`` model folder can name custom code
(``auto_map``). None of them loads without ``trust_code=True`` (CLI: ``--trust-code``); the refusal is an
:class:`~hf_stage_attribution.errors.UnsafeInputError` naming the opt-in. Model weights are read with
``use_safetensors=True``.

Example:
    >>> from hf_stage_attribution.behaviors.scorers import get_scorer
    >>> score = get_scorer("better-profanity")
    >>> score(["have a nice day", "you are a shit"])
    [0.0, 1.0]
"""

from __future__ import annotations

import importlib.util
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._internal.pretrained import TRUST_CODE_HINT, check_pretrained_dir
from ..errors import BehaviorError, ScorerUnavailableError, UnsafeInputError
from .custom import callable_path, import_callable
from .loading import resolve_path
from .text_inputs import forward_texts

__all__ = [
    "Scorer",
    "ProfanityCheckScorer",
    "BetterProfanityScorer",
    "TransformersClassifierScorer",
    "EvaluateScorer",
    "CallableScorer",
    "get_scorer",
    "offline_scorers",
]

_TOXIC_LABEL_HINTS = ("toxic", "hate", "offensive", "abusive", "profan", "insult")
_TOXIC_LABEL_NAMES = ("toxic", "toxicity", "hate", "offensive", "abusive", "profane", "profanity", "insult")
_NEGATIONS = ("non", "not", "no-", "no_", "no ")
_FUNCTIONS = ("sigmoid", "softmax", "none")


def _is_negated(name: str) -> bool:
    """Whether a label name says *not* toxic (``non-toxic``, ``nothate``, ``not_offensive``, ``no-hate``)."""
    lowered = name.lower().strip()
    return lowered.startswith(_NEGATIONS) or any(f"{sep}{neg}" in lowered for sep in "-_ " for neg in ("non", "not"))


def toxic_label_guess(id2label: dict[int, str]) -> list[int]:
    """Classes whose name says toxic: the class named exactly ``toxic`` (else ``toxicity``, ``hate``, …, in that
    order: unitary/toxic-bert's labels include ``toxic`` and ``insult``), else the names containing a hint
    (``severe_toxic``, ``HATE_SPEECH``) that are not negated (``non-toxic``, ``nothate``)."""
    for exact in _TOXIC_LABEL_NAMES:
        found = [i for i, name in id2label.items() if name.lower().strip() == exact]
        if found:
            return found
    return [
        i
        for i, name in id2label.items()
        if any(h in name.lower() for h in _TOXIC_LABEL_HINTS) and not _is_negated(name)
    ]


def score_function(config: Any) -> str:
    """What turns a classifier's logits into scores, as transformers' text-classification pipeline decides:
    ``none`` for ``problem_type="regression"``, ``sigmoid`` for multi-label models or a single logit, ``softmax``
    for several labels, else ``config.function_to_apply`` when set, else ``none``."""
    problem_type = getattr(config, "problem_type", None)
    num_labels = getattr(config, "num_labels", None)
    if problem_type == "regression":
        return "none"
    if problem_type == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    if problem_type == "single_label_classification" or (isinstance(num_labels, int) and num_labels > 1):
        return "softmax"
    return str(getattr(config, "function_to_apply", None) or "none").lower()


def offline_scorers() -> list[str]:
    """The scorers that work offline on this machine (installed packages, local models, callables)."""
    found = [
        name
        for name, module in (("alt-profanity-check", "profanity_check"), ("better-profanity", "better_profanity"))
        if importlib.util.find_spec(module)
    ]
    return found + [
        "{'type': 'transformers', 'model': LOCAL_MODEL_DIR}",
        "{'type': 'evaluate', 'module': LOCAL_MODULE_FOLDER}",
        "a callable texts -> scores",
    ]


def unavailable(what: str, reason: str) -> ScorerUnavailableError:
    return ScorerUnavailableError(
        f"The scorer {what} cannot be loaded offline ({reason}). Scorers that work offline here: "
        f"{', '.join(offline_scorers())}."
    )


class Scorer(ABC):
    """Maps texts to floats (higher = more toxic / more of the scored property); ``to_spec()`` is JSON-safe.

    Example:
        >>> class Length(Scorer):
        ...     def score(self, texts): return [len(t) for t in texts]
        ...     def to_spec(self): return "length"
        >>> Length()(["ab", "abc"])
        [2.0, 3.0]
    """

    name: str = "scorer"

    @abstractmethod
    def score(self, texts: list[str]) -> list[float]:
        """One float per text."""

    @abstractmethod
    def to_spec(self) -> str | dict[str, Any]:
        """A JSON-safe value that :func:`get_scorer` turns back into this scorer."""

    def __call__(self, texts: list[str]) -> list[float]:
        values = [float(v) for v in self.score(list(texts))]
        if len(values) != len(texts) or not all(math.isfinite(v) for v in values):
            raise BehaviorError(
                f"Scorer {self.name!r} returned {len(values)} values (finite: "
                f"{all(math.isfinite(v) for v in values)}) for {len(texts)} texts."
            )
        return values


class ProfanityCheckScorer(Scorer):
    """``alt-profanity-check``'s ``predict_prob``: a linear SVM trained on real toxic comments (0-1).

    Example:
        >>> [round(v) for v in ProfanityCheckScorer()(["have a nice day", "fuck you"])]
        [0, 1]
    """

    name = "alt-profanity-check"

    def __init__(self) -> None:
        try:
            from profanity_check import predict_prob
        except ImportError as exc:
            raise unavailable("'alt-profanity-check'", f"{exc}; pip install alt-profanity-check") from None
        self._predict = predict_prob

    def score(self, texts: list[str]) -> list[float]:
        return [float(v) for v in self._predict(texts)] if texts else []

    def to_spec(self) -> str:
        return self.name


class BetterProfanityScorer(Scorer):
    """1.0 when the text contains a word of ``better-profanity``'s list (or of ``words``), else 0.0.

    Example:
        >>> BetterProfanityScorer(words=["zorb"])(["a zorb", "a shit"])
        [1.0, 0.0]
    """

    name = "better-profanity"

    def __init__(self, words: list[str] | None = None) -> None:
        try:
            from better_profanity import Profanity
        except ImportError as exc:
            raise unavailable("'better-profanity'", f"{exc}; pip install better-profanity") from None
        self.words = list(words) if words else None
        self._profanity = Profanity(self.words)

    def score(self, texts: list[str]) -> list[float]:
        return [1.0 if self._profanity.contains_profanity(t) else 0.0 for t in texts]

    def to_spec(self) -> str | dict[str, Any]:
        return self.name if self.words is None else {"type": self.name, "words": self.words}


class TransformersClassifierScorer(Scorer):
    """Probability of the toxic label of a local ``transformers`` sequence classifier (a model directory; read
    with ``use_safetensors=True``; a model or tokenizer with custom code needs ``trust_code=True``).

    Logits become probabilities as transformers' text-classification pipeline turns them (``function_to_apply``
    overrides it): a sigmoid for multi-label models (``problem_type="multi_label_classification"``, e.g.
    unitary/toxic-bert) and single-logit models, a softmax over the labels otherwise, the raw value for regression.
    Without ``toxic_label`` the toxic class is guessed from ``id2label`` (``toxic``/``hate``/… exactly, else a name
    containing such a word that is not negated like ``non-toxic``; the only class of a single-logit model; class 1
    of two unnamed classes). Texts are right-padded whatever the tokenizer's padding side, with its eos token when
    it has no pad token (see :mod:`.text_inputs`).

    Example:
        >>> TransformersClassifierScorer("unitary/toxic-bert")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        hf_stage_attribution.errors.ScorerUnavailableError: ... cannot be loaded offline ...
    """

    name = "transformers"

    def __init__(
        self,
        model: str,
        toxic_label: str | int | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        function_to_apply: str | None = None,
        *,
        trust_code: bool = False,
    ) -> None:
        if function_to_apply is not None and str(function_to_apply).lower() not in _FUNCTIONS:
            raise BehaviorError(
                f"`function_to_apply` must be one of {', '.join(_FUNCTIONS)} or None (the pipeline's choice); got "
                f"{function_to_apply!r}."
            )
        if not isinstance(model, (str, Path)) or not Path(model).is_dir():
            raise unavailable(f"transformers:{model}", "not a local model directory; Hub downloads are not used")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_path, self.batch_size, self.max_length = str(model), int(batch_size), max_length
        check_pretrained_dir(self.model_path, "scorer model", trust_code=trust_code, weights=True)
        load = {"local_files_only": True, "trust_remote_code": trust_code}
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, **load)
            self._model = AutoModelForSequenceClassification.from_pretrained(
                self.model_path, use_safetensors=True, **load
            )
        except (OSError, ValueError) as exc:
            raise unavailable(f"transformers:{model}", str(exc).splitlines()[0]) from None
        self._model.eval()
        self.toxic_label, self.function_to_apply = toxic_label, function_to_apply
        self._function = str(function_to_apply).lower() if function_to_apply else score_function(self._model.config)
        if self._function not in _FUNCTIONS:
            raise BehaviorError(
                f"{self.model_path}'s config.function_to_apply is {self._function!r}; expected one of "
                f"{', '.join(_FUNCTIONS)}: pass function_to_apply= to the scorer."
            )
        self._index = self._label_index(toxic_label)

    def _label_index(self, label: str | int | None) -> int:
        id2label = {int(k): str(v) for k, v in (self._model.config.id2label or {}).items()}
        if isinstance(label, int):
            if label not in id2label:
                raise BehaviorError(f"toxic_label {label} is not a class of {self.model_path} ({id2label}).")
            return label
        if isinstance(label, str):
            matches = [i for i, name in id2label.items() if name == label]
        else:
            matches = toxic_label_guess(id2label) or ([1] if len(id2label) == 2 else [0] if len(id2label) == 1 else [])
        if len(matches) != 1:
            raise BehaviorError(
                f"Cannot tell the toxic label of {self.model_path} among {id2label}; pass "
                "toxic_label= (a label name or index)."
            )
        return matches[0]

    def score(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            batch = texts[i : i + self.batch_size]
            with torch.no_grad():
                logits = forward_texts(self._model, self._tokenizer, batch, max_length=self.max_length).logits.float()
            if self._function == "softmax":
                logits = logits.softmax(-1)
            elif self._function == "sigmoid":
                logits = logits.sigmoid()
            out.extend(logits[:, self._index].tolist())
        return out

    def to_spec(self) -> dict[str, Any]:
        spec = {
            "type": self.name,
            "model": self.model_path,
            "toxic_label": self.toxic_label,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
        }
        return spec if self.function_to_apply is None else {**spec, "function_to_apply": self.function_to_apply}


class EvaluateScorer(Scorer):
    """An ``evaluate`` measurement/metric module computed on the texts (``predictions=texts``); the per-text
    scores are the result list named ``key`` (default: the only list of the right length).

    Loading a module imports its Python script, so it needs ``trust_code=True`` (the Hub ``toxicity``
    measurement also downloads a model, so offline it is unavailable even then).

    Example:
        >>> EvaluateScorer("toxicity")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        hf_stage_attribution.errors.UnsafeInputError: The evaluate module 'toxicity' is ... trust_code=True ...
    """

    name = "evaluate"

    def __init__(
        self,
        module: str,
        config_name: str | None = None,
        key: str | None = None,
        compute_kwargs: dict[str, Any] | None = None,
        module_type: str | None = None,
        *,
        trust_code: bool = False,
    ) -> None:
        if not trust_code:
            raise UnsafeInputError(
                f"The evaluate module {str(module)!r} is a Python script that evaluate.load would import and run; "
                f"{TRUST_CODE_HINT}."
            )
        self.module, self.config_name, self.key = str(module), config_name, key
        self.compute_kwargs = dict(compute_kwargs or {})
        self.module_type = module_type or ("measurement" if self.module == "toxicity" else None)
        try:
            import evaluate
        except ImportError as exc:
            raise unavailable(f"evaluate:{module}", f"{exc}; pip install evaluate") from None
        kwargs = {"module_type": self.module_type} if self.module_type else {}
        try:
            self._module = evaluate.load(self.module, self.config_name, **kwargs)
        except Exception as exc:  # evaluate raises FileNotFoundError/ConnectionError/OSError/ImportError offline
            raise unavailable(
                f"evaluate:{module}", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            ) from None

    def score(self, texts: list[str]) -> list[float]:
        result = self._module.compute(predictions=texts, **self.compute_kwargs)
        if self.key is not None:
            if self.key not in result:
                raise BehaviorError(
                    f"evaluate module {self.module!r} returned keys {sorted(result)}, not {self.key!r}."
                )
            return list(result[self.key])
        lists = [k for k, v in result.items() if isinstance(v, (list, tuple)) and len(v) == len(texts)]
        if len(lists) != 1:
            raise BehaviorError(
                f"evaluate module {self.module!r} returned {sorted(result)}; pass key= to pick the "
                "per-text scores (e.g. compute_kwargs={'aggregation': None} for toxicity)."
            )
        return list(result[lists[0]])

    def to_spec(self) -> dict[str, Any]:
        return {
            "type": self.name,
            "module": self.module,
            "config_name": self.config_name,
            "key": self.key,
            "compute_kwargs": self.compute_kwargs,
            "module_type": self.module_type,
        }


class CallableScorer(Scorer):
    """A user function ``texts -> scores``.

    Example:
        >>> CallableScorer(lambda texts: [t.count("!") for t in texts])(["hi!!", "hi"])
        [2.0, 0.0]
    """

    name = "callable"

    def __init__(self, fn: Callable[[list[str]], Any]) -> None:
        if not callable(fn):
            raise BehaviorError(f"A scorer must be callable; got a {type(fn).__name__}.")
        self.fn = fn

    def score(self, texts: list[str]) -> list[float]:
        values = self.fn(texts)
        return values.tolist() if hasattr(values, "tolist") else list(values)

    def to_spec(self) -> dict[str, Any]:
        return {"type": "callable", "function": callable_path(self.fn)}


_BY_NAME: dict[str, Callable[..., Scorer]] = {
    "alt-profanity-check": ProfanityCheckScorer,
    "profanity-check": ProfanityCheckScorer,
    "better-profanity": BetterProfanityScorer,
    "transformers": TransformersClassifierScorer,
    "evaluate": EvaluateScorer,
}


def get_scorer(spec: Any, *, base_dir: Path | None = None, trust_code: bool = False) -> Scorer:
    """A :class:`Scorer` from a name, a dict ``{"type": ..., ...}``, a Scorer, or a callable.

    ``trust_code=True`` is needed for the dicts that load code: ``evaluate`` modules, ``callable`` functions named
    by path, ``transformers`` models with custom code.
    """
    if isinstance(spec, Scorer):
        return spec
    if callable(spec):
        return CallableScorer(spec)
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise BehaviorError(f"A scorer must be a name, a dict with 'type', a Scorer or a callable; got {spec!r}.")
    options = {k: v for k, v in spec.items() if k != "type"}
    kind = spec["type"]
    if kind == "callable":
        return CallableScorer(import_callable(options.get("function", ""), trust_code))
    if kind not in _BY_NAME:
        raise unavailable(repr(kind), f"unknown scorer type; known types: {', '.join(sorted(_BY_NAME))}, callable")
    if kind in ("transformers", "evaluate"):
        key = "model" if kind == "transformers" else "module"
        if key in options:
            options[key] = resolve_path(options[key], base_dir)
        options["trust_code"] = trust_code
    try:
        return _BY_NAME[kind](**options)
    except TypeError as exc:
        raise BehaviorError(f"Bad options for scorer {kind!r}: {exc}.") from None
