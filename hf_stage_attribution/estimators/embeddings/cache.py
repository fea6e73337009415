"""Stage embeddings ``v_k`` (ESTIMATORS.md §3, §4a), computed tensor by tensor and cached beside the ledger.

``v_k = (D_K ⊙ … ⊙ D_{k+1}) ⊙ Δ_k`` (+ the momentum tail where stage ``k+1`` continued the optimizer state) for
``kind="aa-linear"``; ``kind="aa-ggn"``/``"aa-hvp"`` carry ``v`` through each later stage with curvature
(``estimators.curvature.propagate``); ``kind="delta"`` is ``Δ_k`` itself, read from the ledger (no copy is made).

The cache is ``<ledger>/embeddings/<kind>.safetensors``, keys ``"<stage index>/<param name>"`` (float32; a tensor
that is absent is zero), metadata holding the ledger fingerprint, the kind, the options and the package version (an
upgrade may change how embeddings are computed); a cache that does not match is recomputed. Beside it,
``<kind>.safetensors.sha256`` holds the file's sha256 as it was written: a cache whose bytes no longer hash to it
(changed, corrupted, or its write interrupted), or that has no digest, is recomputed, never used (hashed once per
process while the file's size, modification time and inode stay the same).
:class:`StageEmbeddings` reads it lazily (memory-mapped), one tensor at a time.

For ``aa-ggn``/``aa-hvp`` the options include the loss each stage's curvature products use: a fingerprint of the
callable(s) (``loss_fns[name]``, else the loss remembered at recording; see
:func:`~hf_stage_attribution._internal.fingerprint.callable_fingerprint`: qualified name, bytecode and constants,
closure values, defaults) or the built-in loss the ledger names. A loss that cannot be keyed (a callable object, a
closure over a model) is never served from the cache: the embeddings are recomputed and a warning says why.

Example:
    >>> import tempfile
    >>> from hf_stage_attribution.testing.digits import build_digits_pipeline
    >>> pipe = build_digits_pipeline("decay", tempfile.mkdtemp(), steps_scale=0.05, base_steps_scale=0.05)
    >>> ledger, model, behavior = pipe.ledger, pipe.model, pipe.behaviors["margin_7"]
    >>> emb = stage_embeddings(ledger, kind="aa-linear")
    >>> emb.stage_indices, [name for name, v in emb.items(0)]  # v_1 of the first stage, tensor by tensor
    ([0, 1, 2], ['0.weight', '0.bias', '2.weight', '2.bias'])
    >>> torch.equal(emb.get(2, "0.weight"), ledger.stages[2].delta_tensor("0.weight"))  # the last stage: Δ_K
    True
"""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..._internal.fingerprint import value_fingerprint
from ..._internal.hashing import file_identity
from ..._version import __version__
from ...errors import EstimatorError, UnsupportedOptimizerError, unknown_name
from ...ledger.core import LedgerCore
from ...ledger.storage import atomic_write_bytes, file_sha256, open_safetensors
from ..curvature.propagation import curvature_settings
from ..selection import lacks_optimizer_information
from .write import write_curvature, write_linear

KINDS = ("delta", "aa-linear", "aa-ggn", "aa-hvp")
FORMAT_NAME = "hf-stage-attribution-embeddings"
FORMAT_VERSION = "1"
_NORMS: dict[tuple, float] = {}


class StageEmbeddings:
    """Lazy read access to the ``v_k`` of a ledger's stages.

    Attributes: ``kind``, ``stage_indices``, ``approximations`` (list of sentences), ``diagnostics`` (dict).

    Example:
        >>> import tempfile, torch
        >>> from hf_stage_attribution import StageLedger
        >>> model, ledger = torch.nn.Linear(2, 1), StageLedger(tempfile.mkdtemp())
        >>> for name, decay in (("a", 0.0), ("b", 0.5)):
        ...     opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=decay)
        ...     with ledger.record_stage(name, model=model, optimizer=opt) as rec:
        ...         for _ in range(2):
        ...             opt.zero_grad(); model(torch.ones(1, 2)).sum().backward(); opt.step(); rec.step()
        >>> emb = stage_embeddings(ledger, "aa-linear")
        >>> v, delta = emb.get(0, "weight"), ledger.stages[0].delta_tensor("weight")
        >>> round(float(v[0, 0] / delta[0, 0]), 4)  # D_b = (1 − 0.1·0.5)²
        0.9025
    """

    def __init__(self, ledger: LedgerCore, kind: str, path: Path | None = None) -> None:
        self.ledger, self.kind, self.path = ledger, kind, path
        self._shapes = ledger.parameter_shapes
        self.approximations: list[str] = []
        self.diagnostics: dict[str, Any] = {}
        self._keys: dict[int, list[str]] = {}
        self._unchanged: dict[int, set[str]] = {}  # v_k = the recorded delta, read from the ledger (not copied)
        self._handle = None
        if path is None:  # "delta": straight from the ledger
            self.stage_indices = [s.index for s in ledger.stages]
            return

        self._handle = open_safetensors(path)
        meta = self._handle.metadata() or {}
        self.stage_indices = json.loads(meta.get("stages", "[]"))
        self.approximations = json.loads(meta.get("approximations", "[]"))
        self.diagnostics = json.loads(meta.get("diagnostics", "{}"))
        for key in self._handle.keys():
            index, _, name = key.partition("/")
            self._keys.setdefault(int(index), []).append(name)
        for index, names in json.loads(meta.get("unchanged", "{}")).items():
            self._unchanged[int(index)] = set(names)

    def _check_stage(self, k: int) -> None:
        """An EstimatorError for a stage this file does not hold (its tensors would read as zeros)."""
        if k not in self.stage_indices:
            raise EstimatorError(
                f"Expected the {self.kind} embeddings in {self.path} to hold stage {k}, found stages "
                f"{self.stage_indices}: the cache was replaced while it was read (two processes writing it at once?). "
                "Compute it on one process first (StageAttributor does), or recompute (recompute_embeddings=True)."
            )

    def equals_delta(self, k: int) -> bool:
        """Whether ``v_k`` is stage ``k``'s recorded delta ``Δ_k`` tensor for tensor, as the cache records it (the
        later stages carry it unchanged: e.g. ``aa-linear`` through Adam(W) without weight decay).

        Example:
            >>> import tempfile, torch
            >>> from hf_stage_attribution import StageLedger
            >>> model, ledger = torch.nn.Linear(2, 1), StageLedger(tempfile.mkdtemp())
            >>> for name, decay in (("a", 0.0), ("b", 0.5), ("c", 0.0)):
            ...     opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=decay)
            ...     with ledger.record_stage(name, model=model, optimizer=opt) as rec:
            ...         opt.zero_grad(); model(torch.ones(1, 2)).sum().backward(); opt.step(); rec.step()
            >>> emb = stage_embeddings(ledger, "aa-linear")
            >>> emb.equals_delta(1), emb.equals_delta(0)  # carried on through no decay / through decay
            (True, False)
        """
        self._check_stage(k)
        if self._handle is None:
            return self.kind == "delta"
        return not self._keys.get(k) and set(self.ledger.stages[k].delta_names()) <= self._unchanged.get(k, set())

    def names(self, k: int) -> list[str]:
        """Names of the tensors where ``v_k`` may be non-zero."""
        self._check_stage(k)
        if self._handle is None:
            return self.ledger.stages[k].delta_names()
        stored, same = self._keys.get(k, []), self._unchanged.get(k, set())
        if not same:
            return list(stored)
        return [n for n in self.ledger.parameter_names if n in same or n in stored]

    def get(self, k: int, name: str) -> torch.Tensor:
        """``v_k`` of one tensor (float32; zeros where the embedding does not touch it)."""
        self._check_stage(k)
        if self._handle is None or name in self._unchanged.get(k, ()):
            return self.ledger.stages[k].delta_tensor(name)
        if name in self._keys.get(k, ()):
            return self._handle.get_tensor(f"{k}/{name}")
        return torch.zeros(self._shapes[name], dtype=torch.float32)

    def items(self, k: int) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, v_k tensor)`` for every tensor ``v_k`` touches, one at a time."""
        for name in self.names(k):
            yield name, self.get(k, name)

    def norm(self, k: int) -> float:
        """``‖v_k‖`` (computed once per cache file and process: every estimate reports it)."""
        if self.path is None:
            key = (str(self.ledger.dir), self.ledger.fingerprint, self.kind, k)
        else:
            key = (str(self.path), file_identity(self.path), k)
        if key not in _NORMS:
            _NORMS[key] = float(sum(float(t.double().pow(2).sum()) for _, t in self.items(k)) ** 0.5)
        return _NORMS[key]

    def __repr__(self) -> str:
        return f"StageEmbeddings(kind={self.kind!r}, stages={self.stage_indices}, path={self.path})"


def _options_key(options: Mapping[str, Any]) -> str:
    """The options as they key the cache: JSON values as they are; the model (whose parameters the ledger
    fingerprint already pins) left out; anything else by its fingerprint, or a one-off value when it has none
    (so such a cache is never reused)."""
    safe: dict[str, Any] = {}
    for k, v in sorted(options.items()):
        if isinstance(v, torch.nn.Module):
            continue
        try:
            json.dumps(v)
            safe[k] = v
        except (TypeError, ValueError):
            safe[k] = value_fingerprint(v) or f"unkeyable-{uuid.uuid4().hex}"
    return json.dumps(safe, sort_keys=True)


def _loss_key(ledger: LedgerCore, loss_fns: Mapping[str, Any] | None) -> tuple[dict[str, str], list[str]]:
    """``{stage name: what its curvature loss is}`` and the names whose loss cannot be keyed."""
    key: dict[str, str] = {}
    unkeyable: list[str] = []
    for stage in ledger.stages:
        spec = (loss_fns or {}).get(stage.name) or getattr(stage, "loss_fn", None)
        if spec is None:  # the built-in loss named in stage.json: pinned by the ledger fingerprint
            key[stage.name] = "recorded"
            continue
        digest = value_fingerprint(spec)
        if digest is None:
            unkeyable.append(stage.name)
            digest = f"unkeyable-{uuid.uuid4().hex}"
        key[stage.name] = digest
    return key, unkeyable


def _resolve_stages(ledger: LedgerCore, stages: Any) -> list[int]:
    if stages is None:
        return [s.index for s in ledger.stages]
    return sorted({ledger.stage(s).index for s in stages})


def stage_embeddings(
    ledger: LedgerCore,
    kind: str = "aa-linear",
    stages: Any = None,
    *,
    allow_identity_propagation: bool = False,
    loss_fns: Mapping[str, Any] | None = None,
    recompute: bool = False,
    **curvature_options: Any,
) -> StageEmbeddings:
    """Compute (or read from the cache) the stage embeddings of ``kind`` for ``stages`` (indices or names; all).

    ``allow_identity_propagation`` passes deltas through stages with an unknown optimizer with ``D = 1`` instead of
    raising :class:`~hf_stage_attribution.errors.UnsupportedOptimizerError`. ``loss_fns`` and ``curvature_options``
    go to the curvature-aware propagation (``aa-ggn``/``aa-hvp`` only); ``preset="cheap"`` selects a named setting
    (:data:`~.curvature.CURVATURE_PRESETS`).
    """
    if kind not in KINDS:
        raise unknown_name("embedding kind", kind, KINDS)
    if kind == "delta":
        return StageEmbeddings(ledger, kind)
    wanted = _resolve_stages(ledger, stages)
    if not allow_identity_propagation:
        require_optimizer_information(ledger, kind, wanted)
    if kind in ("aa-ggn", "aa-hvp"):
        curvature_options = curvature_settings(curvature_options)
    options = {"allow_identity_propagation": allow_identity_propagation, **curvature_options}
    path = Path(ledger.embeddings_dir) / f"{kind}.safetensors"
    if kind in ("aa-ggn", "aa-hvp"):
        options["loss_fns"], unkeyable = _loss_key(ledger, loss_fns)
        if unkeyable and path.exists() and not recompute:
            warnings.warn(
                f"{kind}: the curvature loss of stage(s) {unkeyable} cannot be fingerprinted (a callable object, a "
                "bound method or a closure over something other than numbers, strings, tensors and functions), so "
                "cached embeddings cannot be shown to match it; recomputing them. Pass plain functions (a "
                "(forward, loss) pair) in loss_fns to let the cache be reused.",
                stacklevel=2,
            )
    if path.exists() and not recompute:
        cached, stored = _read_if_fresh(ledger, kind, path, options, wanted)
        if cached is not None:
            return cached
        wanted = sorted(set(wanted) | set(stored))  # the cache grows: stages computed before are kept
    if kind == "aa-linear":
        sha = write_linear(ledger, path, wanted, allow_identity_propagation, _metadata(ledger, kind, options, wanted))
    else:
        mode = "ggn" if kind == "aa-ggn" else "hvp"
        sha = write_curvature(
            ledger, path, wanted, mode, allow_identity_propagation, loss_fns, curvature_options,
            _metadata(ledger, kind, options, wanted),
        )  # fmt: skip
    atomic_write_bytes(_digest_path(path), sha.encode("ascii"))
    _VERIFIED[str(path)] = file_identity(path)
    return StageEmbeddings(ledger, kind, path)


def require_optimizer_information(ledger: LedgerCore, kind: str, wanted: list[int]) -> None:
    """Propagation through a stage whose optimizer is unknown would silently equal task-vector negation: refuse
    (:class:`~hf_stage_attribution.errors.UnsupportedOptimizerError`) when a stage after the first of ``wanted``
    was imported without its optimizer and learning rates. The replaying estimators call it before any replay.
    """

    first = min(wanted, default=len(ledger.stages))
    blind = [s.name for s in ledger.stages[first + 1 :] if lacks_optimizer_information(s)]
    if blind:
        raise UnsupportedOptimizerError(
            f"{kind} needs the optimizer and learning rates of later stage(s) {blind}, which were imported from "
            "checkpoints without them. Use delta-linear/delta-fd, add the optimizer to the import spec, or pass "
            "allow_identity_propagation=True to treat those stages as leaving the delta unchanged."
        )


def _metadata(ledger: LedgerCore, kind: str, options: Mapping[str, Any], wanted: list[int]) -> dict[str, str]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "package_version": __version__,  # an upgrade may change how embeddings are computed: never serve old ones
        "fingerprint": ledger.fingerprint,
        "options": _options_key(options),
        "stages": json.dumps(wanted),
    }


#: the identity (size, modification time, inode) of each cache file that hashed to its digest in this process
_VERIFIED: dict[str, tuple] = {}


def _digest_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def _intact(path: Path) -> bool:
    """Whether the cache file's bytes hash to the digest written beside it (a missing digest: not shown intact)."""
    identity = file_identity(path)
    if identity is None:
        return False
    if _VERIFIED.get(str(path)) == identity:
        return True
    try:
        expected = _digest_path(path).read_bytes().decode("ascii", "replace").strip()
        if file_sha256(path) != expected:
            return False
    except OSError:
        return False
    _VERIFIED[str(path)] = identity
    return True


def _read_if_fresh(ledger: LedgerCore, kind: str, path: Path, options: Mapping[str, Any], wanted: list[int]):
    """``(embeddings, [])`` when the cache serves ``wanted``; ``(None, stages worth keeping)`` otherwise."""
    if not _intact(path):
        if _digest_path(path).exists():
            warnings.warn(
                f"The cached {kind} embeddings {path} do not hash to the digest written with them (changed, "
                "corrupted, or their write was interrupted); recomputing them.",
                stacklevel=3,
            )
        return None, []
    try:
        emb = StageEmbeddings(ledger, kind, path)
        meta = emb._handle.metadata() or {}
    except Exception:  # a corrupt or unreadable cache is recomputed
        return None, []
    same = (
        meta.get("format") == FORMAT_NAME
        and meta.get("format_version") == FORMAT_VERSION
        and meta.get("kind") == kind
        and meta.get("package_version") == __version__
        and meta.get("fingerprint") == ledger.fingerprint
        and meta.get("options") == _options_key(options)
    )
    if same and set(wanted) <= set(emb.stage_indices):
        return emb, []
    return None, (list(emb.stage_indices) if same else [])
