"""Curvature-vector products of a stage's training loss at a checkpoint, on a captured sample (ESTIMATORS.md §4a).

The loss is split into ``forward(model, batch) -> outputs`` and ``loss(outputs, batch) -> scalar``. The Gauss–Newton
product is ``Jᵀ H_L J v`` (``J`` the Jacobian of the outputs in the parameters, ``H_L`` the Hessian of the loss in
the outputs), computed with ``torch.func`` (``jvp`` for ``J v``, forward-over-reverse for ``H_L``, ``vjp`` for
``Jᵀ``) on ``functional_call`` of the model with the checkpoint's parameters substituted; the Hessian product is
forward-over-reverse on the whole loss. Nothing is materialised but the vectors.

Built-in losses for stages recorded through the Hugging Face Trainer (``stage.curvature_loss["type"]``), all on
``model(**batch).logits`` (``labels`` removed from the inputs): ``causal-lm`` (shifted next-token cross-entropy,
``-100`` ignored; labels default to ``input_ids`` with padding masked), ``masked-lm`` / ``token-classification``
(unshifted), ``sequence-classification`` (cross-entropy; mean squared error for one output, binary cross-entropy for
multi-label float labels) and ``regression``.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    >>> spec = ((lambda m, b: m(b[0])), (lambda out, b: torch.nn.functional.cross_entropy(out, b[1])))
    >>> op = CurvatureOperator(model, dict(model.named_parameters()), [batch], spec, mode="ggn")
    >>> v = {"weight": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), "bias": torch.zeros(2)}
    >>> out = op.apply(v, ["weight", "bias"])
    >>> float(sum((out[k] * v[k].double()).sum() for k in v)) > 0   # Gauss–Newton is PSD
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..._internal.memory import trim_heap
from ..._internal.params import base_parameters, unwrap_model
from ...errors import MissingCurvatureError, ModelMismatchError
from ...ledger.core import LedgerCore
from ...ledger.stage import Stage
from .scratch import CHUNK, TensorFile, pieces
from .trl import dpo_loss_pair, dpo_support_problem, supports_dpo

LossSpec = tuple[Callable, Callable] | Callable


# --- built-in losses on logits ----------------------------------------------------------------------------------


def _logits(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def _token_labels(batch: Mapping[str, Any]) -> torch.Tensor:
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    return labels


def _causal_lm_loss(logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    labels = _token_labels(batch)[..., 1:]
    logits = logits[..., :-1, :]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def _token_loss(logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    labels = _token_labels(batch)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def _sequence_loss(logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """As transformers' sequence classifiers: MSE for one output (regression), binary cross-entropy for float labels
    shaped like the logits (multi-label), cross-entropy otherwise."""
    labels = batch["labels"]
    if logits.shape[-1] == 1:
        return torch.nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(logits.shape[:-1]))
    if labels.is_floating_point() and labels.shape == logits.shape:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return torch.nn.functional.cross_entropy(logits, labels)


BUILTIN_LOSSES: dict[str, tuple[Callable, Callable]] = {
    "causal-lm": (_logits, _causal_lm_loss),
    "masked-lm": (_logits, _token_loss),
    "token-classification": (_logits, _token_loss),
    "sequence-classification": (_logits, _sequence_loss),
    "regression": (_logits, _sequence_loss),
}


def resolve_loss(
    stage: Stage, loss_fns: Mapping[str, LossSpec] | None, mode: str, *, ledger: LedgerCore = None, model: Any = None
) -> LossSpec:
    """The loss of ``stage`` for curvature products: ``loss_fns[stage.name]``, else the in-memory ``stage.loss_fn``,
    else the built-in loss named by ``stage.curvature_loss`` (TRL DPO stages too: their reference log-probabilities
    need ``ledger`` and ``model``; without them a placeholder check is done). Gauss–Newton needs a pair."""
    spec = (loss_fns or {}).get(stage.name) or getattr(stage, "loss_fn", None)
    kind = (getattr(stage, "curvature_loss", None) or {}).get("type")
    if spec is None and kind in BUILTIN_LOSSES:
        spec = BUILTIN_LOSSES[kind]
    if spec is None and kind == "dpo" and supports_dpo(stage):
        spec = dpo_loss_pair(ledger, model, stage) if ledger is not None and model is not None else (None, None)
    if spec is None and kind == "dpo":
        raise MissingCurvatureError(
            f"Stage {stage.name!r}: the built-in DPO loss for curvature products does not apply: "
            f"{dpo_support_problem(stage)}. Pass `loss_fns={{{stage.name!r}: (forward, loss)}}` (forward(model, "
            "batch) -> outputs, loss(outputs, batch) -> scalar; CLI: --loss-fn STAGE=MODULE:FORWARD,LOSS), or use "
            "--estimator aa-fd."
        )
    if spec is None:
        raise MissingCurvatureError(
            f"Stage {stage.name!r}: curvature products need the stage's loss, found none (curvature_loss="
            f"{getattr(stage, 'curvature_loss', None)!r}; built-in types: {', '.join(BUILTIN_LOSSES)}). Pass "
            f"`loss_fns={{{stage.name!r}: (forward, loss)}}` (forward(model, batch) -> outputs, loss(outputs, batch) "
            "-> scalar; CLI: --loss-fn STAGE=MODULE:FORWARD,LOSS), or record the stage with `loss_fn=`."
        )
    if mode == "ggn" and not (isinstance(spec, tuple) and len(spec) == 2):
        raise MissingCurvatureError(
            f"Stage {stage.name!r}: Gauss–Newton products need the loss split as a pair (forward(model, batch) -> "
            "outputs, loss(outputs, batch) -> scalar), got a single callable. Pass the pair in `loss_fns`, or use "
            "the Hessian estimator (aa-hvp), which works with f(model, batch) -> scalar."
        )
    return spec


# --- the operator ---------------------------------------------------------------------------------------------------


class _Call(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, fn: Callable) -> None:
        super().__init__()
        self.m, self.fn = model, fn

    def forward(self, batch: Any) -> Any:
        return self.fn(self.m, batch)


def _concat(batches: Sequence[Any], chunk_rows: int) -> list[Any]:
    """Concatenate compatible batches along the first dimension into chunks of at most ``chunk_rows`` rows."""

    def rows(b: Any) -> int:
        first = next(iter(b.values())) if isinstance(b, Mapping) else (b[0] if isinstance(b, (tuple, list)) else b)
        return int(first.shape[0])

    def cat(group: list[Any]) -> Any:
        b0 = group[0]
        if isinstance(b0, Mapping):
            return {k: torch.cat([g[k] for g in group]) for k in b0}
        if isinstance(b0, (tuple, list)):
            return tuple(torch.cat([g[i] for g in group]) for i in range(len(b0)))
        return torch.cat(group)

    try:
        out, current, n = [], [], 0
        for b in batches:
            if current and n + rows(b) > chunk_rows:
                out.append(cat(current))
                current, n = [], 0
            current.append(b)
            n += rows(b)
        if current:
            out.append(cat(current))
        return out
    except (RuntimeError, TypeError, KeyError, IndexError, AttributeError):
        return list(batches)  # ragged or exotic batches: use them one by one


def _token_count(batch: Mapping[str, Any], loss: Callable) -> int:
    """Tokens that a built-in token loss (``_causal_lm_loss``, ``_token_loss``) averages over in ``batch``."""
    labels = _token_labels(batch)
    labels = labels[..., 1:] if loss is _causal_lm_loss else labels
    return int((labels != -100).sum())


def _row_chunks(batches: list[Any], weights: list[int], loss: LossSpec, rows: int) -> tuple[list[Any], list[float]]:
    """Each batch of a built-in token loss split into chunks of ``rows`` rows, each weighted by the batch's weight
    times its share of the batch's tokens: the token mean over the batch is the chunks' token means so weighted, so
    the weighted sum of the chunks' products is the batch's product (up to the order of float summation), while a
    product's activations and graph are those of a chunk. Other losses (which need not be means over rows or
    tokens), batches whose tensors are not all split by row, and batches with no token to average are kept whole;
    chunks with no token are dropped (their share is zero)."""
    token_losses = (_causal_lm_loss, _token_loss)
    if not (isinstance(loss, tuple) and loss[0] is _logits and any(loss[1] is f for f in token_losses)):
        return batches, list(weights)
    out_b: list[Any] = []
    out_w: list[float] = []
    for b, w in zip(batches, weights):
        n = _rows(b)
        whole = n <= rows or not isinstance(b, Mapping)
        whole = whole or any(not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != n for v in b.values())
        total = 0 if whole else _token_count(b, loss[1])
        if total == 0:
            out_b.append(b)
            out_w.append(w)
            continue
        for lo in range(0, n, rows):
            chunk = {k: v[lo : lo + rows] for k, v in b.items()}
            count = _token_count(chunk, loss[1])
            if count:
                out_b.append(chunk)
                out_w.append(w * count / total)
    return out_b, out_w


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _rows(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    return min((int(v.shape[0]) for v in values if isinstance(v, torch.Tensor) and v.dim()), default=1)


def _math_attention() -> Any:
    """Scaled-dot-product attention through its composite ("math") kernel: the fused CPU/GPU kernels have no
    forward-mode derivative, which the Gauss–Newton and Hessian products need."""

    return sdpa_kernel(SDPBackend.MATH)


class _TangentDot(torch.autograd.Function):
    """``(g · v).sum()`` for a gradient ``g`` and a tangent ``v = read()`` that is read again in the backward pass
    instead of being kept for it: the gradient flowing into ``g`` is ``grad · v``, with ``v`` rebuilt at that
    moment, so the tangents of a Hessian product are not all held between its two backward passes (same values as
    ``(g * v).sum()``: the backward of ``sum`` then ``mul`` is ``grad · v`` too). ``read()`` returns a fresh tensor
    each call, which both passes multiply in place (no second temporary of the tensor's size)."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, read: Callable[[], torch.Tensor]) -> torch.Tensor:
        ctx.read = read
        return read().mul_(g).sum()  # in place in the fresh copy that read() returns: no second temporary

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.read().mul_(grad), None


class CurvatureOperator:
    """``v ↦ C̄ v``: Gauss–Newton (``mode="ggn"``) or Hessian (``"hvp"``) of a loss at given parameters, on a sample.

    ``state`` maps base parameter names to the checkpoint's values (all of them); vectors are dicts of base names.
    ``products`` counts operator applications (each is one pass over the whole sample). ``cache_graphs`` keeps
    each batch's forward graph between products (much faster; memory: the activations of the whole sample).
    ``product_rows`` (without ``cache_graphs``, built-in token losses only): each product runs over chunks of that
    many rows of a batch, weighted by their tokens (:func:`_row_chunks`): the same product up to float summation
    order, with a chunk's activations and graph instead of the batch's. ``sample_rows``: the rows of the sample.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        state: Mapping[str, torch.Tensor],
        batches: Sequence[Any],
        loss: LossSpec,
        mode: str = "ggn",
        *,
        chunk_rows: int = 512,
        cache_graphs: bool = True,
        in_place: bool = False,
        product_rows: int | None = None,
    ) -> None:

        if mode not in ("ggn", "hvp"):
            raise ValueError(f"`mode` must be 'ggn' or 'hvp', got {mode!r}.")
        if not batches:
            raise MissingCurvatureError("Curvature products need captured example batches, found none.")
        self.model, self.mode = unwrap_model(model), mode
        ref = next(self.model.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        ids = {id(p): n for n, p in self.model.named_parameters()}
        base = base_parameters(self.model)
        self.module_name = {b: "m." + ids[id(p)] for b, p in base.items()}
        self.fixed: dict[str, torch.Tensor] = {}
        for b in base:
            if b not in state:
                raise ModelMismatchError(f"The ledger state has no tensor for the model's parameter {b!r}.")
        # in_place: the checkpoint's values are written into the model's own parameters (their values kept in a
        # scratch file and put back by release()), so that no second copy of the model is held during the products
        self._saved: TensorFile | None = TensorFile() if in_place else None
        self._swapped: dict[str, torch.nn.Parameter] = {}
        try:
            for b, p in base.items():
                if self._saved is None:
                    self.fixed[self.module_name[b]] = state[b].to(self.device, p.dtype)
                    continue
                self._saved[b] = p.detach()
                self._swapped[b] = p
                with torch.no_grad():
                    p.copy_(state[b].to(self.device, p.dtype))
                self.fixed[self.module_name[b]] = p.detach()
        except BaseException:
            self.release()
            raise
        base_ids = {id(q) for q in base.values()}
        for name, p in self.model.named_parameters():  # un-merged LoRA factors: switch the adapter off (B = 0)
            if id(p) not in base_ids and ".lora_B." in f".{name}.".replace("lora_embedding_B", "lora_B"):
                self.fixed["m." + name] = torch.zeros_like(p)
        self.batches = [_to(b, self.device) for b in _concat(list(batches), chunk_rows)]
        self.weights: list[float] = [_rows(b) for b in self.batches]
        self.sample_rows = sum(self.weights)
        if product_rows is not None and not cache_graphs:
            self.batches, self.weights = _row_chunks(self.batches, self.weights, loss, max(1, int(product_rows)))
        if isinstance(loss, tuple):
            self.forward_call, self.loss = _Call(self.model, loss[0]), loss[1]
            self.scalar_call = _Call(self.model, lambda m, b: loss[1](loss[0](m, b), b))
        else:
            self.forward_call, self.loss, self.scalar_call = None, None, _Call(self.model, loss)
        self.products = 0
        self.cache_graphs = cache_graphs
        self._cache: tuple[tuple[str, ...], list[Callable]] | None = None
        prepare = getattr(self.loss if self.loss is not None else loss, "prepare", None)
        if callable(prepare):  # a loss with constants of its own (DPO's reference log-probabilities): computed
            prepare(self.batches)  # here, outside the functorch transforms of the products

    def release(self) -> None:
        """Drop the substituted parameters, the batches and any cached graphs (the operator is unusable after); with
        ``in_place``, put the model's own parameter values back (exactly)."""
        self.fixed, self.batches, self.weights, self._cache = {}, [], [], None
        saved, self._saved = getattr(self, "_saved", None), None
        if saved is not None:
            with torch.no_grad():
                for b, p in self._swapped.items():
                    p.copy_(saved[b])
            self._swapped = {}
            saved.close()

    def __del__(self) -> None:
        self.release()  # never leave the model holding the checkpoint's values

    def _primals(self, names: Sequence[str]) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The module keys of ``names`` (base names) and their substituted values; a clear error for a name the
        model does not have."""
        for n in names:
            if n not in self.module_name:
                raise ModelMismatchError(f"The model has no parameter {n!r} (base name) for curvature products.")
        keys = [self.module_name[n] for n in names]
        return keys, {k: self.fixed[k] for k in keys}

    def apply(self, vector: Mapping[str, torch.Tensor], out_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``(C̄ v)`` restricted to ``out_names`` (float64 tensors); names absent from ``vector`` are zero."""
        names = list(dict.fromkeys([*out_names, *vector]))
        keys, primals = self._primals(names)
        tangents = {
            self.module_name[n]: (vector[n] if n in vector else torch.zeros(()))
            .to(self.device, self.fixed[self.module_name[n]].dtype)
            .expand_as(self.fixed[self.module_name[n]])
            .contiguous()
            for n in names
        }
        total = {k: torch.zeros_like(primals[k], dtype=torch.float64) for k in keys}
        for fn, w in zip(self._closures(primals), self.weights):
            out = fn(tangents)
            for k in keys:
                total[k] += w * out[k].to(torch.float64)
        self.products += 1
        scale = 1.0 / self.sample_rows
        return {n: total[self.module_name[n]].cpu() * scale for n in out_names}

    def apply_flat(
        self, flat: torch.Tensor, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]]
    ) -> torch.Tensor:
        """``C̄ v`` for ``v`` laid end to end over ``names`` (float64, in that order and with those shapes), as the same
        flat float64 vector: :meth:`apply` without building dicts of float64 tensors per product."""
        out = torch.empty(flat.numel(), dtype=torch.float64)
        return self.apply_into(out, flat, names, shapes)

    def apply_into(
        self,
        out: torch.Tensor,
        flat: torch.Tensor,
        names: Sequence[str],
        shapes: Mapping[str, tuple[int, ...]],
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`apply_flat` written into the preallocated float64 vector ``out`` (returned): each batch's product
        is added tensor by tensor into ``out`` (no concatenated or float64 copy of it), and its graph is freed
        before the next batch (unless the graphs are cached). ``scale``: a flat vector multiplying ``flat``
        elementwise first (``C̄ (s ⊙ v)``), one tensor at a time (no scaled copy of ``flat``)."""
        keys, primals = self._primals(names)
        sizes = [math.prod(shapes[n]) for n in names]
        tangents = {}
        scales = scale.split(sizes) if scale is not None else [None] * len(sizes)
        for k, n, part, sp in zip(keys, names, flat.split(sizes), scales):
            part = part if sp is None else part * sp
            tangents[k] = part.to(self.device, self.dtype).view(shapes[n]).to(primals[k].dtype)
        cpu = out.device == self.device
        total = out if cpu else torch.empty(out.numel(), dtype=torch.float64, device=self.device)
        total.zero_()
        parts = total.split(sizes)
        for fn, w in zip(self._closures(primals), self.weights):
            product = fn(tangents)
            with torch.no_grad():  # values only; the views of ``total`` may come from a no-grad caller
                for k, part in zip(keys, parts):
                    part.add_(product.pop(k).reshape(-1), alpha=w)
            del product
        self.products += 1
        total.div_(self.sample_rows)
        if not cpu:
            out.copy_(total)
        return out

    def apply_parts(
        self,
        names: Sequence[str],
        shapes: Mapping[str, tuple[int, ...]],
        source: Callable[[int, int, int], torch.Tensor],
        write: Callable[[int, int, torch.Tensor], None],
        read: Callable[[int, int, int], torch.Tensor] | None = None,
        finish: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> None:
        """``C̄ v`` handed over in pieces, so that neither ``v`` nor the result is ever a whole float64 vector in RAM:
        ``source(i, lo, hi)`` gives the flat coordinates ``lo..hi`` of tensor ``names[i]`` of ``v`` (float64; asked
        for in pieces of at most ``CHUNK`` values), ``write(i, lo, values)`` takes the flat
        coordinates ``lo..lo+len(values)`` of that tensor of the result (float64 on the CPU; pieces of at most
        ``CHUNK`` values). With several batches the running sums go through ``write`` and come back through
        ``read(i, lo, hi)``; ``finish(i, lo, values)`` is applied (in place) to each piece of the result before its
        last write. A piece that ``source`` or ``read`` returns is used up before the next call of the same function
        and may be changed in place: the callers hand out views of buffers they reuse. Same arithmetic as
        :meth:`apply_into` (elementwise, piece by piece).

        The float64 running sums and casts of the pieces go through two ``CHUNK`` buffers reused piece after piece: a
        new 512 KiB tensor per piece is, below glibc's mmap threshold, a fresh mapping whose pages all fault in."""
        keys, primals = self._primals(names)
        sizes = [math.prod(shapes[n]) for n in names]
        on_cpu = self.device.type == "cpu"
        work = torch.empty(2, CHUNK, dtype=torch.float64, device=self.device)  # a running sum, a float64 addend

        def tangent(i: int, dtype: torch.dtype | None = None) -> torch.Tensor:
            """v's tensor i in ``dtype`` (default: the parameter's), filled piece by piece."""
            out = torch.empty(sizes[i], dtype=dtype or primals[keys[i]].dtype, device=self.device)
            for lo, hi in pieces(sizes[i], CHUNK):
                piece = source(i, lo, hi)
                # one rounding to the operator's dtype, cast in place when that is the tensor's own
                out[lo:hi] = piece if out.dtype == self.dtype else piece.to(self.device, self.dtype)
            return out.view(shapes[names[i]])

        closures = self._closures(primals)
        if len(closures) > 1 and read is None:
            raise ValueError("apply_parts: several batches need `read` for the running sums.")
        lazy = self.mode == "hvp" and not self.cache_graphs  # the tangents are taken from `source` when needed
        tangents = {} if lazy else {k: tangent(i) for i, k in enumerate(keys)}
        if self.mode == "ggn" and not self.cache_graphs:
            # Gauss–Newton without cached graphs: H_L J v of every batch first (the size of the outputs), then the
            # tangents are dropped and the pullbacks run (same operations as _ggn, batch by batch)
            hjvs = [self._eval(self._ggn_hjv, primals, tangents, b) for b in self.batches]
            tangents.clear()
            closures = [lambda t, u=u, b=b, **kw: self._eval(self._ggn_pullback, primals, u, b)
                        for u, b in zip(hjvs, self.batches)]  # fmt: skip
            del hjvs
        total = self.sample_rows

        def accumulate(i: int, values: torch.Tensor | None, b: int, w: float, last: bool) -> None:
            """Tensor ``i`` of batch ``b``'s product (``None``: zero) added into its float64 running sum."""
            flat = None if values is None else values.detach().reshape(-1)
            with torch.no_grad():  # piece by piece, through the reused buffers (`work`)
                for lo, hi in pieces(sizes[i], CHUNK):
                    if b == 0:
                        acc = work[0, : hi - lo].zero_()
                    else:
                        acc = read(i, lo, hi)
                        acc = acc if on_cpu else work[0, : hi - lo].copy_(acc)
                    if flat is not None:
                        addend = flat[lo:hi]
                        if addend.dtype != torch.float64:  # exactly the float64 values add_ would promote it to
                            addend = work[1, : hi - lo].copy_(addend)
                        acc.add_(addend, alpha=w)
                    if last:
                        acc = acc.div_(total).cpu()
                        if finish is not None:
                            finish(i, lo, acc)
                    write(i, lo, acc.cpu())
                    del acc

        if self.mode == "hvp" and not self.cache_graphs:
            # Hessian without cached graphs: each tensor of a batch's product is added into its running sum as soon as
            # the backward pass hands it over, so that no whole product is held, and each tensor of v is read when
            # the batch's backward passes need it (twice per batch: same values as _hvp each time)
            if len(self.batches) > 1:
                tangent = self._staged(keys, primals, tangent)
            for b, (batch, w) in enumerate(zip(self.batches, self.weights)):
                last = b == len(self.batches) - 1
                done = self._eval(self._hvp_into, primals, tangent, batch,
                                  sink=lambda i, t, b=b, w=w, last=last: accumulate(i, t, b, w, last))  # fmt: skip
                for i in range(len(keys)):
                    if i not in done:  # a tensor the loss does not reach: its product is zero
                        accumulate(i, None, b, w, last)
            del tangents
            self.products += 1
            return
        order = sorted(range(len(keys)), key=sizes.__getitem__)
        for b, (fn, w) in enumerate(zip(closures, self.weights)):
            last = b == len(closures) - 1
            # the last batch of a product without cached graphs may drop the tangents once it no longer needs them
            product = fn(tangents, consume_tangents=True) if last and not self.cache_graphs else fn(tangents)
            for i in order:  # smallest tensors first: the largest's float64 sum is made once the rest is freed
                accumulate(i, product.pop(keys[i]), b, w, last)
            del product
        del tangents
        self.products += 1

    def _staged(self, keys: list[str], primals: dict[str, torch.Tensor],
                build: Callable[[int, torch.dtype], torch.Tensor]) -> Callable[[int], torch.Tensor]:  # fmt: skip
        """``v`` built once by ``build(i, dtype)`` (tensor by tensor, in the operator's dtype) into a scratch file
        (:class:`TensorFile`), and a ``tangent(i)`` that reads tensor ``i`` back, cast to its parameter's dtype: the
        Hessian products without cached graphs read each tensor of ``v`` twice per batch, and building it (a float64
        row of the Krylov basis times the preconditioner's square root, on disk for large models) would otherwise run
        that often — 16 times per product for 8 captured rows, most of the products' time on the 3.7M CI model. Same
        values as building it each time (the same two casts)."""
        staged = TensorFile(dtype=self.dtype, prefix="hfsa-tangent-")
        for i, k in enumerate(keys):
            staged[k] = build(i, self.dtype)
        return lambda i: staged[keys[i]].to(self.device, primals[keys[i]].dtype)

    def _closures(self, primals: dict[str, torch.Tensor]) -> list[Callable]:
        """Per batch, ``tangents ↦ C̄_batch · tangents``. With ``cache_graphs`` the forward graph of each batch is
        built once per set of differentiated tensors and reused by every product (backward passes only)."""
        key = tuple(primals)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        was_training = self.model.training
        self.model.eval()
        try:
            with _math_attention():
                if self.cache_graphs:
                    try:
                        closures = [self._closure(primals, b) for b in self.batches]
                        self._cache = (key, closures)
                        return closures
                    except (NotImplementedError, RuntimeError):
                        self.cache_graphs = False  # an op without double backward: recompute per product
                plain = self._ggn if self.mode == "ggn" else self._hvp
                return [lambda t, b=b, **kw: self._eval(plain, primals, t, b, **kw) for b in self.batches]
        finally:
            self.model.train(was_training)

    def _eval(self, fn: Callable, primals: dict, tangents: dict, batch: Any, **kw: Any) -> dict[str, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            with _math_attention():
                return fn(primals, tangents, batch, **kw)
        finally:
            self.model.train(was_training)
            trim_heap()  # the batch's small allocations freed: their heap pages back, or the next ones creep up

    def _closure(self, primals: dict[str, torch.Tensor], batch: Any) -> Callable:
        """One batch's product as a closure over retained autograd graphs (built once, reused per product):
        Hessian: double backward of the gradient; Gauss–Newton: ``J v`` by differentiating ``Jᵀ u`` in ``u``,
        ``H_L`` by double backward of the loss in the outputs, ``Jᵀ`` by backward of the outputs."""

        keys = list(primals)
        params = [primals[k].detach().requires_grad_(True) for k in keys]
        leaves = dict(zip(keys, params))
        rest = self._rest(primals)
        grad = torch.autograd.grad

        def pack(values: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
            return {k: torch.zeros_like(p) if v is None else v for k, p, v in zip(keys, params, values)}

        with torch.enable_grad():
            if self.mode == "hvp":
                loss = functional_call(self.scalar_call, {**rest, **leaves}, (batch,))
                g = grad(loss, params, create_graph=True, allow_unused=True)
                live = [i for i, x in enumerate(g) if x is not None and x.requires_grad]

                def hvp(t: dict) -> dict[str, torch.Tensor]:
                    if not live:
                        return pack([None] * len(keys))
                    out = grad([g[i] for i in live], params, [t[keys[i]] for i in live], retain_graph=True,
                               allow_unused=True)  # fmt: skip
                    return pack(out)

                return hvp
            out = functional_call(self.forward_call, {**rest, **leaves}, (batch,))
            outs, spec = torch.utils._pytree.tree_flatten(out)
            outs = [o for o in outs if isinstance(o, torch.Tensor)]
            dummies = [torch.zeros_like(o, requires_grad=True) for o in outs]
            gu = grad(outs, params, dummies, create_graph=True, allow_unused=True)
            gu_live = [i for i, x in enumerate(gu) if x is not None and x.requires_grad]
            detached = [o.detach().requires_grad_(True) for o in outs]
            loss = self.loss(torch.utils._pytree.tree_unflatten(detached, spec), batch)
            gl = grad(loss, detached, create_graph=True, allow_unused=True)
            gl_live = [i for i, x in enumerate(gl) if x is not None and x.requires_grad]

        def ggn(t: dict) -> dict[str, torch.Tensor]:
            if not gu_live or not gl_live:
                return pack([None] * len(keys))
            jv = grad([gu[i] for i in gu_live], dummies, [t[keys[i]] for i in gu_live], retain_graph=True,
                      allow_unused=True)  # fmt: skip
            jv = [torch.zeros_like(d) if x is None else x for d, x in zip(dummies, jv)]
            hjv = grad([gl[i] for i in gl_live], detached, [jv[i] for i in gl_live], retain_graph=True,
                       allow_unused=True)  # fmt: skip
            hjv = [torch.zeros_like(d) if x is None else x for d, x in zip(detached, hjv)]
            return pack(grad(outs, params, hjv, retain_graph=True, allow_unused=True))

        return ggn

    def _rest(self, primals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.fixed.items() if k not in primals}

    def _ggn(self, primals: dict, tangents: dict, batch: Any, consume_tangents: bool = False) -> dict[str, Any]:
        """One batch's Gauss–Newton product; ``consume_tangents``: empty ``tangents`` once ``J v`` is formed (the
        caller's last use of them), so that they are not held during the backward pass."""
        hjv = self._ggn_hjv(primals, tangents, batch)
        if consume_tangents:
            tangents.clear()
        return self._ggn_pullback(primals, hjv, batch)

    def _ggn_hjv(self, primals: dict, tangents: dict, batch: Any) -> Any:
        """``H_L J v`` on one batch (the size of the batch's outputs)."""
        rest = self._rest(primals)

        def f(p: dict) -> Any:
            return functional_call(self.forward_call, {**rest, **p}, (batch,))

        out, jv = jvp(f, (primals,), (tangents,))
        out = torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)
        _, hjv = jvp(grad(lambda o: self.loss(o, batch)), (out,), (jv,))
        del out, jv  # not needed for the backward pass: freed before its graph is built
        return hjv

    def _ggn_pullback(self, primals: dict, hjv: Any, batch: Any) -> dict[str, Any]:
        """``Jᵀ u`` on one batch for ``u = H_L J v`` (:meth:`_ggn_hjv`): the forward pass again, then its backward."""
        rest = self._rest(primals)

        def f(p: dict) -> Any:
            return functional_call(self.forward_call, {**rest, **p}, (batch,))

        pullback = vjp(f, primals)[1]  # the outputs themselves are not kept
        return pullback(hjv)[0]

    def _hvp(self, primals: dict, tangents: dict, batch: Any, consume_tangents: bool = False) -> dict[str, Any]:
        """One batch's Hessian product by double backward (the gradient with its graph, then the gradient of
        ``g·v``), as the cached closures do, the graph freed on return: about a third less memory than
        ``torch.func.jvp`` of ``grad`` (forward-over-reverse) on a GPT-2 (4.8× vs 7.4× the parameter bytes)."""
        rest = self._rest(primals)
        keys = list(primals)
        params = [primals[k].detach().requires_grad_(True) for k in keys]
        with torch.enable_grad():
            loss = functional_call(self.scalar_call, {**rest, **dict(zip(keys, params))}, (batch,))
            g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            del loss
            live = [i for i, x in enumerate(g) if x is not None and x.requires_grad]
            out: Sequence[torch.Tensor | None] = [None] * len(keys)
            if live:
                # g·v, then the gradient grads g nothing it does not need: each product g_i ⊙ v_i keeps v_i (not g_i)
                # for the backward pass, so the gradient itself is freed before the second backward pass runs; the
                # gradient flowing into each g_i is exactly v_i (1 · v_i), as with v passed as grad_outputs
                dot = torch.stack([(g[i] * tangents[keys[i]]).sum() for i in live]).sum()
                del g
                out = torch.autograd.grad(dot, params, allow_unused=True)
                del dot
            else:
                del g
        return {k: torch.zeros_like(p) if o is None else o.detach() for k, p, o in zip(keys, params, out)}

    def _hvp_into(self, primals: dict, tangent: Callable[[int], torch.Tensor], batch: Any,
                  sink: Callable[[int, torch.Tensor], None]) -> set:  # fmt: skip
        """One batch's Hessian product handed to ``sink(i, values)`` tensor by tensor (``i`` the position in
        ``primals``) as the backward passes produce them, so that neither the gradient nor the product is ever
        whole: a hook on each parameter's leaf takes its gradient from the first backward pass into ``g·v``
        (``g_i · v_i`` by :class:`_TangentDot`, which keeps neither: ``v_i = tangent(i)`` is read when the dot is
        formed and again when the second backward pass needs it; the gradient flowing into ``g_i`` is exactly
        ``v_i``, as with ``v`` passed as grad_outputs) and its product from the second one into ``sink``. Returns
        the positions handed over (the others are zero). Same values as :meth:`_hvp`."""
        rest = self._rest(primals)
        keys = list(primals)
        params = [primals[k].detach().requires_grad_(True) for k in keys]
        parts: list[torch.Tensor] = []
        done: set[int] = set()
        second = [False]

        def take(p: torch.Tensor, i: int) -> None:
            g, p.grad = p.grad, None
            if second[0]:
                if g is not None:
                    done.add(i)
                    sink(i, g)
            elif g is not None and g.requires_grad:
                parts.append(_TangentDot.apply(g, lambda i=i: tangent(i)))  # v_i read again when needed

        hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: take(p, i)) for i, p in enumerate(params)]
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*create_graph=True will create a reference cycle")
                loss = functional_call(self.scalar_call, {**rest, **dict(zip(keys, params))}, (batch,))
                if loss.requires_grad:
                    torch.autograd.backward(loss, inputs=params, create_graph=True)
                del loss
                if parts:
                    dot = torch.stack(parts).sum()
                    parts.clear()
                    second[0] = True
                    torch.autograd.backward(dot, inputs=params)
                    del dot
        finally:
            for h in hooks:
                h.remove()
        return done
