"""``StageRecording``: the framework-free recorder behind every front end (Trainer callback, custom loops).

Life cycle: ``begin()`` → ``step(batch=None)`` after every optimizer step (before the scheduler advances) →
``end()``. While a stage is recorded its files live in ``stages/.partial-<index>-<name>/``; only ``end()``
renames the directory into place and then lists the stage in ``ledger.json``, so a crash never leaves a
half-recorded stage in the ledger. Memory: one float32 copy of the *trainable* parameters (LoRA: of the factors).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .._internal.hashing import combine_digests, tensor_digest
from .._internal.memory import human_bytes
from .._internal.notices import notice
from .._internal.params import (
    base_parameters,
    floating_buffer_digests,
    lora_layers,
    merged_tensor,
    peft_recording_problems,
    state_digests,
    unwrap_model,
)
from .._internal.precision import HALF_DTYPES, storage_dtype
from ..errors import LedgerError
from .core import LedgerCore, utc_now
from .format import BASE_FORMAT_VERSION, FORMAT_VERSION, check_name
from .optimizer_info import (
    applied_learning_rates,
    describe_optimizer,
    describe_scheduler,
    gradients_synced,
    has_state,
    optimizer_state_stream,
    ownership_problem,
    step_marks,
    stepped_since,
)
from .residual import RESIDUAL_FILE, store_half
from .segments import MATERIALS, SegmentCapture, plan_segments
from .storage import (
    DirectoryLock,
    atomic_write_json,
    file_sha256,
    io_errors,
    open_safetensors,
    stage_dir_name,
    write_safetensors,
    write_safetensors_stream,
)


def _is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


class StageRecording:
    """Record one stage into a :class:`StageLedger`.

    Args:
        ledger: the ledger (or its directory).
        name: unique stage name. kind: ``pretraining``, ``sft``, ``lora``, ``dpo``, ... (``None``: ``lora`` when
            the model carries LoRA adapters, else ``custom``).
        model, optimizer, scheduler: what is being trained (the scheduler's type and start state go into
            ``stage.json["scheduler"]``, for the record).
        loss_fn: ``f(model, batch) -> scalar`` or ``(forward, loss)``; kept in memory for curvature products.
        num_steps: planned optimizer steps (needed to place curvature segments).
        curvature_segments: segments with curvature material (default 3; 0 turns it off).
        curvature_examples: examples kept per segment (default 256).
        curvature_material: ``"compact"`` (default: θ_mid interpolated from the stage's Δ, second moments stored as
            row/column means: a few kB per segment) or ``"full"`` (a float32 θ_mid snapshot and full second moments
            per segment, 2× the trainable parameters each; the most faithful ``aa-ggn``). See ``BENCHMARKS.md``.
        curvature_loss: JSON description of the loss for reloaded ledgers (e.g. ``{"type": "causal-lm"}``).
        metadata: extra JSON-safe fields for ``stage.json`` (trainer, datasets, seeds, ...: a custom loop's seed and
            data identity are recorded only here).
        is_main_process: only the main process writes (default: rank 0 of torch.distributed / ``RANK``).
        resume: continue an interrupted recording of the same stage from its last ``checkpoint()``.
        early_checkpoint: opt-in, a fraction ``f`` in (0, 1) of ``num_steps``: after ``m = max(1, ⌊f ·
            num_steps⌋)`` optimizer steps, save θ_m − θ_start (float32, LoRA merged) and the whole optimizer state
            (Adam: both moments and the step) to ``early_checkpoint/`` in the stage. Partial replay then reads the
            factual branch of this stage from it instead of replaying it (only the counterfactual branch runs;
            ``estimators/partial_replay.py``). Costs about 3 trainable-parameter sizes (Adam) on disk, beyond the
            K + 1.1 model sizes of a default ledger. Needs ``num_steps``.

    Example:
        >>> import tempfile, torch
        >>> from hf_stage_attribution import StageLedger
        >>> model = torch.nn.Linear(2, 1); opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        >>> rec = StageLedger(tempfile.mkdtemp()).record_stage("s1", model=model, optimizer=opt)
        >>> rec.begin()
        >>> opt.zero_grad(); model(torch.ones(4, 2)).sum().backward(); opt.step(); rec.step()
        >>> rec.end().num_steps
        1
    """

    def __init__(
        self,
        ledger: LedgerCore | str | os.PathLike,
        name: str,
        kind: str | None = "custom",
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        loss_fn: Callable | tuple[Callable, Callable] | None = None,
        *,
        num_steps: int | None = None,
        curvature_segments: int = 3,
        curvature_examples: int = 256,
        curvature_material: str = "compact",
        curvature_loss: dict | None = None,
        metadata: dict | None = None,
        is_main_process: bool | None = None,
        resume: bool = False,
        early_checkpoint: float | None = None,
    ) -> None:
        self.ledger = ledger if isinstance(ledger, LedgerCore) else LedgerCore(ledger)
        self.name = check_name(Path("stage name"), name)
        self.kind = kind
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.num_steps = num_steps
        self.curvature_segments = int(curvature_segments)
        self.curvature_examples = int(curvature_examples)
        if curvature_material not in MATERIALS:
            raise LedgerError(f"Expected curvature_material in {', '.join(MATERIALS)}, got {curvature_material!r}.")
        self.curvature_material = curvature_material
        if self.curvature_segments < 0 or self.curvature_examples < 0:
            raise LedgerError(
                f"`curvature_segments` and `curvature_examples` must be >= 0, got {curvature_segments}, "
                f"{curvature_examples}."
            )
        self.curvature_loss = (
            curvature_loss if curvature_loss is not None else ({"type": "custom"} if loss_fn else None)
        )
        self.metadata: dict = dict(metadata or {})
        self.early_checkpoint = check_early_checkpoint(early_checkpoint)
        self._early_step: int | None = None
        #: bytes a front end will add to the stage folder besides the recorder's own files (the Trainer callback's
        #: copy of the training dataset: ``{"replay_dataset": n}``), set before :meth:`begin`: projected and checked
        #: against free disk
        self.projected_extra: dict[str, int] = {}
        self.is_main = _is_main_process() if is_main_process is None else bool(is_main_process)
        self.resume = resume
        #: on a resume, match the model against the states the recording's checkpoints saw and drop the steps after
        #: the one it is at (a custom loop); the Trainer front end aligns with the Trainer's global step instead
        self.align_on_resume = True
        self._checkpoints: list[list] = []  # [steps recorded, digest of the model's state] at each checkpoint()
        self._resume_digest: str | None = None
        self.active = False
        self.finished = False
        self._begun = False  # begin() succeeded on this (main) process: step() and end() outside it are mistakes
        self.learning_rates: list[list[float]] = []
        self.skipped_steps: list[int] = []
        self._pending: list[Any] = []
        self._lock: DirectoryLock | None = None
        self.stage = None

    # --- context manager -------------------------------------------------------------------------------

    def __enter__(self) -> StageRecording:
        self.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end()
        else:
            self.abort()

    # --- begin -----------------------------------------------------------------------------------------

    def begin(self) -> None:
        """Snapshot the start of the stage; check the ledger belongs to this model and is continuous."""
        if self.model is None:
            raise LedgerError("StageRecording needs `model=`.")
        if self.active or self.finished:
            raise LedgerError(
                f"Stage {self.name!r}: begin() was called again, but the stage was already begun"
                + (" and has ended" if self.finished else "")
                + ". Call begin() once per recording (a `with ledger.record_stage(...) as rec:` block calls it for "
                "you); to record more training, start a new stage with ledger.record_stage(<another name>, ...)."
            )
        self._early_step = early_checkpoint_step(self.early_checkpoint, self.num_steps, self.name)
        if self._early_step is not None and self.optimizer is None:
            raise LedgerError(
                f"Stage {self.name!r}: early_checkpoint={self.early_checkpoint} saves the optimizer state, but no "
                "optimizer was given. Pass `optimizer=` to record_stage, or early_checkpoint=None."
            )
        self._check_recordable(unwrap_model(self.model))
        self._check_optimizer(unwrap_model(self.model))
        if not self.is_main:
            return
        self.model = unwrap_model(self.model)
        ledger = self.ledger
        with io_errors(ledger.dir):
            ledger.dir.mkdir(parents=True, exist_ok=True)
        self._lock = DirectoryLock(ledger.dir, f"recording stage {self.name!r}")
        self._lock.acquire()
        try:
            with io_errors(ledger.dir):  # read-only or full disk: a LedgerError, not a bare OSError
                self._begin_locked()
        except BaseException:
            self._lock.release()
            raise
        self.active = True
        self._begun = True
        if self._resume_digest is not None:
            try:
                self._align_with_model(self._resume_digest)
            except LedgerError:
                self.suspend()  # the partial stage stays for a resume from the right model
                raise

    def _check_recordable(self, model: torch.nn.Module) -> None:
        """Refuse, before anything is written, a PEFT model whose training the ledger cannot represent exactly."""
        problems = peft_recording_problems(model)
        if problems:
            raise LedgerError(
                f"Stage {self.name!r} cannot be recorded faithfully from this PeftModel: "
                + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
                + ". Nothing was written; the ledger is unchanged."
            )

    def _check_optimizer(self, model: torch.nn.Module) -> None:
        """Refuse, before anything is written, an optimizer that does not train this model's parameters."""
        if self.optimizer is None:
            return
        problem = ownership_problem(self.optimizer, model)
        if problem:
            raise LedgerError(
                f"Stage {self.name!r}: expected `optimizer=` to be the optimizer that steps this model's parameters "
                f"(built over model.parameters(), or the model's param groups), found one where {problem}. Pass the "
                "optimizer the training loop calls step() on; keep tensors that are not the model's parameters in "
                "another optimizer. Nothing was written; the ledger is unchanged."
            )

    def _begin_locked(self) -> None:
        ledger, model = self.ledger, self.model
        ledger.check_not_unindexed("nothing was written")  # before any write: θ_0 and the stages stay as they are
        self._check_disk(model)
        if (ledger.dir / "ledger.json").exists():
            ledger._reload()
            ledger._check_same_model(model)
        else:
            ledger._initialize(model)
        if any(s.name == self.name for s in ledger.stages):
            raise LedgerError(
                f"The ledger at {ledger.dir} already has a stage named {self.name!r}. Stage names are unique: "
                "choose another name (or use a new ledger directory)."
            )
        leftovers = [p for p in ledger.incomplete_stages() if p.is_symlink() or not p.name.startswith(".partial-")]
        if leftovers:  # an interrupted commit (or a planted link): refuse now rather than after training
            raise LedgerError(
                f"{leftovers[0]} is in the ledger's stages/ but not listed in ledger.json: left by an interrupted "
                f"recording. Remove it with `hf-stage-attribution inspect {ledger.dir} --remove-incomplete`."
            )
        final = ledger.dir / "stages" / stage_dir_name(len(ledger.stages), self.name)
        if final.is_symlink() or final.exists():  # not the package's (those are leftovers above): refuse now
            raise LedgerError(
                f"Expected no {final.name} in {final.parent} (where stage {self.name!r} will be stored), found one "
                "that ledger.json does not list and the package did not write. Move it out of stages/ (the package "
                "never deletes it), or use a new ledger directory."
            )
        self._lora = lora_layers(model)
        if self.kind is None:
            self.kind = "lora" if self._lora else "custom"
        self._params = base_parameters(model)
        self._names_by_id = self._name_parameters()
        self.index = len(ledger.stages)
        self.partial_dir = ledger.dir / "stages" / stage_dir_name(self.index, self.name, partial=True)
        digests = state_digests(model)
        resumed = self.resume and (self.partial_dir / "progress.json").exists()
        if not resumed:
            self._record_untracked(digests)
            self.index = len(ledger.stages)
            self.partial_dir = ledger.dir / "stages" / stage_dir_name(self.index, self.name, partial=True)
            if self.partial_dir.exists():
                shutil.rmtree(self.partial_dir)
            self.partial_dir.mkdir(parents=True)
        self.start_digests = digests if not resumed else self._load_progress()["start_digests"]
        self._buffer_digests = floating_buffer_digests(model)
        self._trainable = [n for n, p in self._params.items() if p.requires_grad and n not in self._lora]
        self._without_grad = list(self._trainable)  # shrinks as tensors get a gradient at an optimizer step
        self._marks_at_begin = self._step_marks()  # the optimizer's own record of steps taken, to compare at the end
        self.scheduler_description = describe_scheduler(self.scheduler)
        self._snapshot = self._take_snapshot(resumed)
        self._lora_start = self._lora_snapshot(resumed)
        self.optimizer_state_policy = "fresh"
        if self.optimizer is not None and has_state(self.optimizer) and not resumed:
            self.optimizer_state_policy = "continued"
            write_safetensors_stream(
                self.partial_dir / "optimizer_state.safetensors",
                *optimizer_state_stream(self.optimizer, self._names_by_id),
            )
        self._capture = SegmentCapture(
            self.partial_dir,
            self._segment_plan(),
            self.curvature_examples,
            self.curvature_material,
        )
        self.started_at = utc_now()
        self._t0 = time.time()
        self._resume_digest = combine_digests(digests) if resumed and self.align_on_resume else None
        if resumed:
            self._restore_progress()

    def _align_with_model(self, digest: str) -> None:
        """A custom loop resumed with ``resume=True``: the recording's progress is that of its last ``checkpoint()``,
        but the model may have been saved less often. Find the checkpoint whose model state it is and forget the
        steps recorded after it (they will be run again); refuse a model at none of them. A progress file written
        before these states were kept is trusted as it is."""
        saved = self._checkpoints
        if not saved or saved[-1][1] == digest:
            return
        matches = [int(steps) for steps, seen in saved if seen == digest]
        if not matches:
            raise LedgerError(
                f"Cannot resume stage {self.name!r}: the model is not in the state of any of the recording's "
                f"checkpoints (steps {[int(s) for s, _ in saved]}); it was last checkpointed after "
                f"{len(self.learning_rates)} step(s). Resume from a model saved where rec.checkpoint() was called "
                "(call it whenever you save the model), or record the stage again without resume=True."
            )
        steps = matches[-1]
        note = (
            f"Resumed from a model at step {steps} of the stage, before the recording's last checkpoint (step "
            f"{len(self.learning_rates)}): the {len(self.learning_rates) - steps} step(s) after it are recorded as "
            "they are run again."
        )
        warnings.warn(f"Stage {self.name!r}: {note}", UserWarning, stacklevel=4)
        self.truncate(steps)
        self._checkpoints = [entry for entry in saved if int(entry[0]) <= steps]
        self.metadata["notes"] = [*self.metadata.get("notes", []), note]

    def projected_bytes(self, model: torch.nn.Module | None = None) -> dict[str, int]:
        """The bytes this stage will add to the ledger, by part (``start``: θ_0 when the ledger is new, as stored;
        ``delta``: Δ of the trainable tensors, float32 or their half-precision dtype; ``lora``: the factors;
        ``segments``: curvature material, without the kept training examples, whose size depends on the batches;
        and what a front end adds, :attr:`projected_extra`: the Trainer callback's ``replay_dataset``)."""
        model = unwrap_model(model if model is not None else self.model)
        params = base_parameters(model)
        lora = lora_layers(model)
        new = not (self.ledger.dir / "ledger.json").exists()
        start = 0
        if new:  # θ_0: a half-precision weight in its own dtype, one under a LoRA adapter merged in float32
            start = sum(p.numel() * (4 if n in lora else storage_dtype(p.dtype).itemsize) for n, p in params.items())
        dense = sum(p.numel() for n, p in params.items() if p.requires_grad and n not in lora)
        factors = 0
        for base, info in lora.items():
            pair = info.factors()
            if pair is None:
                dense += params[base].numel()
            else:
                factors += 2 * (pair[0].numel() + pair[1].numel())  # end factors, and start factors when trained
        trainable = dense + factors // 2
        segments = len(self._segment_plan())
        if self.curvature_material == "full":
            per_segment = 8 * trainable  # θ_mid snapshot + second moments, float32
        else:
            per_segment = 4 * sum(
                (p.shape[0] + p.numel() // p.shape[0]) if p.dim() >= 2 else p.numel()
                for n, p in params.items() if p.requires_grad
            )  # fmt: skip
        continued = 8 * trainable if self.optimizer is not None and has_state(self.optimizer) else 0
        early = 0
        if early_checkpoint_step(self.early_checkpoint, self.num_steps, self.name) is not None:
            merged = dense + sum(params[base].numel() for base in lora if lora[base].factors() is not None)
            early = 4 * merged + 8 * trainable  # θ_m − θ_start (LoRA merged) + two moments (Adam)
        half = sum(
            p.numel() for n, p in params.items() if p.requires_grad and n not in lora and p.dtype in HALF_DTYPES
        )  # a half-precision Δ in its own dtype (+ a residual of the few entries it rounds, not projected)
        return {
            "start": start,
            "delta": 4 * dense - 2 * half,
            "lora": 4 * factors,
            "segments": segments * per_segment,  # + the kept training examples (batch-dependent, not projected)
            "optimizer_state": continued,
            "early_checkpoint": early,
            **{k: int(v) for k, v in self.projected_extra.items()},
        }

    def _segment_plan(self) -> list[tuple[int, int, int]]:
        """The curvature segments of this stage (none without a loss to compute curvature with)."""
        return plan_segments(self.num_steps, self.curvature_segments if (self.loss_fn or self.curvature_loss) else 0)

    def _check_disk(self, model: torch.nn.Module) -> None:
        """Print the projected size of this stage; refuse before any write when the disk cannot hold it."""
        parts = self.projected_bytes(model)
        total = sum(parts.values())
        shown = ", ".join(f"{k} {human_bytes(v)}" for k, v in parts.items() if v)
        notice(f"stage {self.name!r}: projected ledger growth {human_bytes(total)} ({shown}) in {self.ledger.dir}")
        probe = self.ledger.dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < total:
            raise LedgerError(
                f"Stage {self.name!r} needs about {human_bytes(total)} in {self.ledger.dir} ({shown}), but the disk "
                f"has {human_bytes(free)} free. Free space, choose a ledger directory on a larger disk, or record "
                "less (curvature_segments=0, or a LoRA stage)."
            )

    def _optimizer_description(self) -> dict | None:
        """Type and per-group hyperparameters; ``lr`` is the first applied rate (all are in ``learning_rates``)."""
        if self.optimizer is None:
            return None
        description = describe_optimizer(self.optimizer, self._names_by_id)
        for group, lr in zip(description["param_groups"], self.learning_rates[0] if self.learning_rates else []):
            group["lr"] = lr
        return description

    def _name_parameters(self) -> dict[int, str]:
        names = {id(p): n for n, p in self._params.items()}
        for base, info in self._lora.items():
            pair = info.factors()
            if pair is not None:
                names[id(pair[0])], names[id(pair[1])] = f"{base}::A", f"{base}::B"
        return names

    def _take_snapshot(self, resumed: bool) -> dict[str, torch.Tensor]:
        path = self.partial_dir / "start_trainable.safetensors"
        if resumed and path.exists():
            handle = open_safetensors(path)
            return {k: handle.get_tensor(k) for k in handle.keys()}
        # float32, except half-precision weights, kept in their own dtype: exact, and half the memory (SmolLM2-135M
        # in bf16: the float32 copy was +0.59 GB of peak RSS); the deltas below subtract it in float32 either way
        return {
            n: self._params[n].detach().to("cpu", storage_dtype(self._params[n].dtype)).clone()
            for n in self._trainable
        }

    def _lora_snapshot(self, resumed: bool) -> dict[str, torch.Tensor]:
        """Start factors (only where B is non-zero, i.e. the adapter was already trained) or start dense deltas."""
        path = self.partial_dir / "start_lora.safetensors"
        if resumed and path.exists():
            handle = open_safetensors(path)
            return {k: handle.get_tensor(k) for k in handle.keys()}
        out: dict[str, torch.Tensor] = {}
        for base, info in self._lora.items():
            pair = info.factors()
            if pair is None:
                out[f"{base}::dense"] = info.delta()
            elif bool(pair[1].detach().abs().sum() > 0):
                out[f"{base}::A0"] = pair[0].detach().to("cpu", torch.float32).clone()
                out[f"{base}::B0"] = pair[1].detach().to("cpu", torch.float32).clone()
        return out

    def _record_untracked(self, digests: dict[str, str]) -> None:
        ledger = self.ledger
        previous = ledger.final_digests
        changed = [n for n in ledger.parameter_names if previous.get(n) != digests.get(n)]
        if not changed:
            return
        merged = {}
        final = ledger.final_state()
        current = dict(_iter_selected_merged(self.model, changed, self._lora, self._params))
        for name in changed:
            merged[name] = current[name] - final[name]
        merged = {n: d for n, d in merged.items() if bool(d.abs().sum() > 0)}
        if not merged:
            return
        name = f"untracked-before-{self.name}"
        warnings.warn(
            f"The model's parameters at the start of stage {self.name!r} differ from the end of the previous stage "
            f"in {len(merged)} tensor(s) (e.g. {next(iter(merged))!r}): weights were edited or merged between runs. "
            f"Recording the difference as an explicit stage {name!r} of kind 'untracked'.",
            stacklevel=4,
        )
        index = len(ledger.stages)
        partial = ledger.dir / "stages" / stage_dir_name(index, name, partial=True)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        sha = write_safetensors(partial / "delta.safetensors", merged)
        info = {
            "format_version": BASE_FORMAT_VERSION, "index": index, "name": name, "kind": "untracked",
            "optimizer": None,
            "learning_rates": [], "num_steps": 0, "trainable_parameters": sorted(merged),
            "delta_file": "delta.safetensors",
            "optimizer_state_policy": "unknown", "start_hash": ledger.final_hash, "end_hash": combine_digests(digests),
            "end_digests": digests, "started_at": utc_now(), "finished_at": utc_now(), "segments": [],
            "notes": ["Parameters changed between recorded stages without a recorded training run."],
        }  # fmt: skip
        files = {"delta.safetensors": sha, "stage.json": atomic_write_json(partial / "stage.json", info)}
        self._commit(partial, name, "untracked", ledger.final_hash, info["end_hash"], files)

    # --- steps -----------------------------------------------------------------------------------------

    def observe_batch(self, batch: Any) -> None:
        """Offer a training batch seen during the current step (front ends call this from forward hooks)."""
        if self.active:
            self._pending.append(batch)

    def step(self, batch: Any = None, *, skipped: bool | None = None) -> None:
        """Call after ``optimizer.step()`` and before ``scheduler.step()``: records the applied learning rates.

        Under gradient accumulation (accelerate's ``accumulate``), calls on the micro-batches where the optimizer
        did not step (``optimizer.gradient_state.sync_gradients`` is False) record no step: their batches join the
        next optimizer step's. Call it before ``optimizer.zero_grad()`` where possible (the gradients then show
        which tensors were stepped; the optimizer's own state says it too, for torch optimizers).

        ``skipped=True`` says the optimizer did not apply this step (a mixed-precision overflow: ``GradScaler``
        or accelerate skipped it); the default reads accelerate's ``optimizer.step_was_skipped``. A skipped step's
        rate is kept in ``learning_rates`` and its index listed in ``skipped_steps``; propagation leaves it out.
        """
        if not self.active:
            if self.is_main:
                raise LedgerError(self._inactive_message("step()"))
            return  # only the main process records
        if self.optimizer is None:
            raise LedgerError(f"Stage {self.name!r}: step() needs the optimizer (pass `optimizer=` to record_stage).")
        if not gradients_synced(self.optimizer):
            # a gradient-accumulation micro-batch: accelerate's optimizer.step() did nothing; its batch belongs to
            # the optimizer step that follows (for the curvature material)
            if batch is not None:
                self._pending.append(batch)
            return
        if skipped is None:
            skipped = bool(getattr(self.optimizer, "step_was_skipped", False))
        if skipped:
            self.skipped_steps.append(len(self.learning_rates))
        self.learning_rates.append(applied_learning_rates(self.optimizer))
        self._note_gradients()
        batches = [*self._pending, *([batch] if batch is not None else [])]
        self._pending = []
        t = len(self.learning_rates) - 1
        with io_errors(self.partial_dir):
            self._capture.on_step(t, batches, self._midpoint_state)
            if self._early_step is not None and t + 1 == self._early_step:
                self._write_early_checkpoint()

    def _note_gradients(self) -> None:
        """Forget the trainable tensors that hold a gradient at this optimizer step: torch optimizers skip a tensor
        whose ``grad`` is None (no update, no weight decay), so the ones left at the end were never stepped. Only the
        tensors without a gradient so far are looked at: once each has had one, this costs nothing."""
        if self._without_grad:
            self._without_grad = [n for n in self._without_grad if self._params[n].grad is None]

    def _inactive_message(self, call: str) -> str:
        if not self._begun:
            return (
                f"Stage {self.name!r}: {call} before begin(): nothing is being recorded. Use `with "
                "ledger.record_stage(...) as rec:` around the training loop, or call rec.begin() before the first "
                "optimizer step."
            )
        state = "ended" if self.finished else "was aborted or suspended"
        return (
            f"Stage {self.name!r}: {call} after the stage {state}: this optimizer step is not part of any recorded "
            "stage. Call rec.step() inside the `with ledger.record_stage(...)` block (before end()); to record more "
            "training, start a new stage with ledger.record_stage(<another name>, ...)."
        )

    def _step_marks(self) -> dict[str, float | None]:
        if self.optimizer is None:
            return {}
        return step_marks(self.optimizer, {n: self._params[n] for n in self._trainable})

    def _unstepped_parameters(self, end_digests: dict[str, str]) -> list[str]:
        """Trainable tensors the optimizer never stepped in this stage, unchanged from start to end. A tensor was
        stepped when it held a gradient at a recorded step, or when the optimizer's own state for it advanced since
        begin() (a ``step`` counter, or a state that appeared: torch optimizers touch neither for a tensor without
        a gradient), so ``optimizer.zero_grad()`` before ``rec.step()`` loses nothing. Empty when no step was
        recorded or when neither source knows (no gradient on the parameters and no per-parameter optimizer state:
        e.g. DeepSpeed, which keeps both away from them)."""
        if not self.learning_rates:
            return []
        by_state = stepped_since(self._marks_at_begin, self._step_marks())
        if len(self._without_grad) == len(self._trainable) and not by_state:
            return []
        return sorted(
            n for n in self._without_grad if n not in by_state and end_digests.get(n) == self.start_digests.get(n)
        )

    def _write_early_checkpoint(self) -> None:
        """θ_m − θ_start and the whole optimizer state after ``m`` steps, one tensor at a time."""
        directory = self.partial_dir / EARLY_DIR
        directory.mkdir(exist_ok=True)
        stream, specs = self._moved_so_far()
        write_safetensors_stream(directory / "params_delta.safetensors", specs, stream)
        write_safetensors_stream(
            directory / "optimizer_state.safetensors", *optimizer_state_stream(self.optimizer, self._names_by_id)
        )

    def _moved_so_far(self) -> tuple[Iterator[tuple[str, torch.Tensor]], list]:
        """A stream of θ_now − θ_start (float32, LoRA merged) with its announced specs, one tensor at a time."""
        names = self._trainable + list(self._lora)
        specs = [(n, torch.float32, tuple(self._params[n].shape)) for n in names]

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for n in self._trainable:
                yield n, self._params[n].detach().to("cpu", torch.float32) - self._snapshot[n]
            for n in self._lora:
                yield n, self._lora_delta_now(n)

        return stream(), specs

    def _midpoint_state(self) -> tuple[Iterator[tuple[str, torch.Tensor]], list, tuple[list, Iterator] | None]:
        """A stream of θ_mid − θ_start with its announced specs, and the second moments as ``(specs, stream)``."""
        stream, specs = self._moved_so_far()
        moments = None
        if self.optimizer is not None:
            keys = ("exp_avg_sq", "square_avg", "sum", "max_exp_avg_sq", "step")  # Adam, RMSprop, Adagrad, amsgrad
            moments = optimizer_state_stream(self.optimizer, self._names_by_id, keys)
        return stream, specs, moments

    def _lora_delta_now(self, base: str) -> torch.Tensor:
        delta = self._lora[base].delta()
        if f"{base}::dense" in self._lora_start:
            return delta - self._lora_start[f"{base}::dense"]
        if f"{base}::A0" in self._lora_start:
            info = self._lora[base]
            start = self._lora_start[f"{base}::B0"] @ self._lora_start[f"{base}::A0"]
            if info.layer_type == "embedding" or info.fan_in_fan_out:
                start = start.T
            return delta - start * info.scaling
        return delta

    # --- checkpoint / resume ---------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Persist progress so that ``resume=True`` can continue this stage after an interruption. Call it where the
        model (and optimizer) are saved: a resume matches the model it is given against the states the checkpoints
        saw (one hash of the parameters per call) and continues from the one it is at."""
        if not self.active:
            return
        if not (self.partial_dir / "start_trainable.safetensors").exists():
            write_safetensors(self.partial_dir / "start_trainable.safetensors", self._snapshot)
            write_safetensors(self.partial_dir / "start_lora.safetensors", self._lora_start)
        if self.align_on_resume:  # one hash of the model per checkpoint, for a resume to match
            digest = combine_digests(state_digests(self.model))
            self._checkpoints = [e for e in self._checkpoints if int(e[0]) < len(self.learning_rates)]
            self._checkpoints.append([len(self.learning_rates), digest])
        atomic_write_json(
            self.partial_dir / "progress.json",
            {
                "checkpoints": self._checkpoints,  # the model's state at each checkpoint: what a resume matches
                "learning_rates": self.learning_rates,
                "skipped_steps": self.skipped_steps,
                "start_digests": self.start_digests,
                "optimizer_state_policy": self.optimizer_state_policy,
                "without_grad": self._without_grad,
                "optimizer_marks_at_begin": self._marks_at_begin,
                "segments": self._capture.state(),
                "started_at": self.started_at,
            },
        )

    def _load_progress(self) -> dict:
        with open(self.partial_dir / "progress.json", encoding="utf-8") as fh:
            return json.load(fh)

    def _restore_progress(self, completed_steps: int | None = None) -> None:
        progress = self._load_progress()
        self.learning_rates = progress["learning_rates"]
        self.skipped_steps = [int(t) for t in progress.get("skipped_steps", [])]
        self.optimizer_state_policy = progress["optimizer_state_policy"]
        without_grad = set(progress.get("without_grad", ()))  # absent (older progress files): none is known
        self._without_grad = [n for n in self._without_grad if n in without_grad]
        if isinstance(progress.get("optimizer_marks_at_begin"), dict):  # absent (older progress files): from here
            self._marks_at_begin = progress["optimizer_marks_at_begin"]
        self.started_at = progress["started_at"]
        self._capture.restore(progress["segments"], len(self.learning_rates))
        saved = progress.get("checkpoints")  # absent (older progress files): nothing to match a resume against
        if isinstance(saved, list) and all(isinstance(e, list) and len(e) == 2 for e in saved):
            self._checkpoints = [[int(steps), str(digest)] for steps, digest in saved]

    def truncate(self, completed_steps: int) -> None:
        """After resuming from a checkpoint at ``completed_steps``, forget steps recorded after it."""
        if self.active and len(self.learning_rates) > completed_steps:
            del self.learning_rates[completed_steps:]
            self.skipped_steps = [t for t in self.skipped_steps if t < completed_steps]
            self._capture.rewind(completed_steps)
            if self._early_step is not None and completed_steps < self._early_step:
                shutil.rmtree(self.partial_dir / EARLY_DIR, ignore_errors=True)  # written again when reached

    # --- end -------------------------------------------------------------------------------------------

    def update_metadata(self, **fields: Any) -> None:
        self.metadata.update(fields)

    @property
    def replay_dir(self) -> Path | None:
        """A directory inside the partial stage where front ends save what replay needs."""
        if not self.active:
            return None
        self.replay_path.mkdir(exist_ok=True)
        return self.replay_path

    @property
    def replay_path(self) -> Path:
        """Where :attr:`replay_dir` is, without making it (to read what a front end saved there, if anything)."""
        return self.partial_dir / "replay"

    def suspend(self) -> None:
        """Stop recording without finishing: keep the partial stage (for a later ``resume=True``), release the lock.

        Front ends call this when training was interrupted in this process and is about to resume from a checkpoint.
        """
        self.active = False
        if self._lock is not None:
            self._lock.release()

    def abort(self) -> None:
        """Drop the partial stage (used when training raised); the ledger keeps its earlier stages."""
        if self.active:
            shutil.rmtree(self.partial_dir, ignore_errors=True)
            self.active = False
        if self._lock is not None:
            self._lock.release()

    def end(self):
        """Write the stage's files, then list it in ``ledger.json``; returns the new :class:`Stage`."""
        if not self.active:
            if self.is_main and not self._begun:
                raise LedgerError(self._inactive_message("end()"))
            return None
        try:
            with io_errors(self.partial_dir):
                stage = self._end_locked()
        except BaseException:
            if self.partial_dir.is_dir() and not (self.partial_dir / "progress.json").exists():
                shutil.rmtree(self.partial_dir, ignore_errors=True)  # not resumable: leave no half-written stage
            raise
        finally:
            self.active = False
            if self._lock is not None:
                self._lock.release()
        self.finished = True
        self.stage = stage
        return stage

    def _end_locked(self):
        files: dict[str, str] = {}
        end_digests = state_digests(self.model)
        dense_names = list(self._trainable)
        frozen_changed = [
            n for n in self.ledger.parameter_names
            if n not in self._snapshot and n not in self._lora and end_digests.get(n) != self.start_digests.get(n)
        ]  # fmt: skip
        other_lora = [n for n in self._lora if self._lora[n].layer_type == "other"]
        if not self.learning_rates:
            moved = sum(1 for n, d in end_digests.items() if d != self.start_digests.get(n))
            warnings.warn(
                f"Stage {self.name!r} ended after 0 optimizer steps (`step()` was never called on its recording): "
                + (
                    "no parameter changed, so it records nothing but a zero delta. "
                    if not moved
                    else f"{moved} parameter tensor(s) changed without a recorded step; the delta holds that change. "
                )
                + "Call `rec.step()` after each `optimizer.step()` (StageRecorder does it for a Trainer).",
                stacklevel=3,
            )
        ran = len(self.learning_rates)
        if self.num_steps is not None and ran > int(self.num_steps):
            note = (
                f"The stage was planned with num_steps={self.num_steps} but took {ran} optimizer steps: its curvature "
                f"segments and early checkpoint were placed over the first {self.num_steps} steps only (the learning "
                "rates, the delta and replay cover all of them). Give num_steps the number of steps the loop runs."
            )
            warnings.warn(f"Stage {self.name!r}: {note}", stacklevel=3)
            self.metadata["notes"] = [*self.metadata.get("notes", []), note]
        if frozen_changed:
            warnings.warn(
                f"Stage {self.name!r}: {len(frozen_changed)} parameter(s) without requires_grad changed during the "
                f"stage (e.g. {frozen_changed[0]!r}); their change is recorded in the stage delta.",
                stacklevel=3,
            )
        moved_buffers = [n for n, d in floating_buffer_digests(self.model).items() if self._buffer_digests.get(n) != d]
        if moved_buffers:
            warnings.warn(
                f"Stage {self.name!r}: {len(moved_buffers)} floating-point buffer(s) changed during the stage (e.g. "
                f"{moved_buffers[0]!r}: BatchNorm running statistics or the like). The ledger records parameters "
                "only: replay and partial replay start every stage from the final model's buffers, so they agree with "
                "the recorded run only approximately. Put such layers in eval mode while training if they should not "
                "change.",
                stacklevel=3,
            )
        all_dense = dense_names + frozen_changed + other_lora
        residual: dict[str, torch.Tensor] = {}
        nonfinite: list[str] = []
        if all_dense:
            before = self.ledger.final_state() if frozen_changed else None

            def dense_delta(n: str) -> torch.Tensor:
                return self._params[n].detach().to("cpu", torch.float32) - self._snapshot[n]

            # a half-precision weight's Δ in its own dtype, the entries it rounds in a float32 residual (format 3)
            stored: dict[str, torch.dtype] = {}
            for n in dense_names:
                dtype = self._params[n].dtype
                if dtype in HALF_DTYPES and self._snapshot[n].dtype == dtype:
                    store_half(n, dense_delta(n), dtype, stored, residual)

            def deltas() -> Iterator[tuple[str, torch.Tensor]]:
                for n in dense_names:
                    yield n, dense_delta(n).to(stored.get(n, torch.float32))
                for n in frozen_changed:
                    merged = dict(_iter_selected_merged(self.model, [n], self._lora, self._params))[n]
                    yield n, merged - before[n]
                for n in other_lora:
                    yield n, self._lora_delta_now(n)

            def stream() -> Iterator[tuple[str, torch.Tensor]]:
                for n, value in deltas():
                    if not bool(torch.isfinite(value).all()):
                        nonfinite.append(n)
                    yield n, value

            specs = [(n, stored.get(n, torch.float32), tuple(self._params[n].shape)) for n in all_dense]
            files["delta.safetensors"] = write_safetensors_stream(
                self.partial_dir / "delta.safetensors", specs, stream()
            )
            if residual:
                files[RESIDUAL_FILE] = write_safetensors(self.partial_dir / RESIDUAL_FILE, residual)
        if nonfinite:  # recorded as it happened, but said: every estimate after this stage is undefined
            note = (
                f"{len(nonfinite)} parameter tensor(s) changed to NaN or infinite values in this stage (e.g. "
                f"{nonfinite[0]!r}): the training diverged (float16 weights: Adam's default eps=1e-8 is 0 in "
                "float16). Behaviors evaluated after this stage are not finite, so no estimate can be made; fix the "
                "training and record the stage again."
            )
            warnings.warn(f"Stage {self.name!r}: {note}", stacklevel=3)
            self.metadata["notes"] = [*self.metadata.get("notes", []), note]
        lora_info = None
        factor_layers = {n: i for n, i in self._lora.items() if i.layer_type != "other"}
        if self._lora:
            tensors: dict[str, torch.Tensor] = {}
            for base, info in factor_layers.items():
                a, b = info.factors()
                tensors[f"{base}::A"] = a.detach().to("cpu", torch.float32)
                tensors[f"{base}::B"] = b.detach().to("cpu", torch.float32)
                for key in ("A0", "B0"):
                    if f"{base}::{key}" in self._lora_start:
                        tensors[f"{base}::{key}"] = self._lora_start[f"{base}::{key}"]
            if tensors:
                files["lora.safetensors"] = write_safetensors(self.partial_dir / "lora.safetensors", tensors)
            lora_info = {
                "modules": {
                    n: {
                        "scaling": i.scaling,
                        "fan_in_fan_out": i.fan_in_fan_out,
                        "layer_type": i.layer_type,
                        "adapter": i.adapter,
                    }
                    for n, i in factor_layers.items()
                },
                "dense_modules": other_lora,
            }
        segments = self._capture.finish(files, completed=len(self.learning_rates))
        if self.num_steps is not None and segments == [] and self._capture.planned and self.learning_rates:
            warnings.warn(f"Stage {self.name!r}: no curvature segment reached its midpoint.", stacklevel=3)
        if self.curvature_segments and self.num_steps is None and (self.loss_fn or self.curvature_loss):
            warnings.warn(
                f"Stage {self.name!r}: no curvature material recorded because `num_steps` was not given; "
                "pass num_steps=... to record_stage to enable the `aa-ggn` estimator.",
                stacklevel=3,
            )
        if (self.partial_dir / "optimizer_state.safetensors").exists():
            files["optimizer_state.safetensors"] = file_sha256(self.partial_dir / "optimizer_state.safetensors")
        early = None
        if self._early_step is not None and self._early_step >= len(self.learning_rates):
            # the stage ended at (or before) its early step — a callback stopped it, or a best checkpoint cut it
            # there: the checkpoint is the stage's end, not a point inside it; nothing to keep
            shutil.rmtree(self.partial_dir / EARLY_DIR, ignore_errors=True)
        if self._early_step is not None and (self.partial_dir / EARLY_DIR / "optimizer_state.safetensors").exists():
            early = {"steps": self._early_step, "fraction": self.early_checkpoint}
            for part in ("params_delta", "optimizer_state"):
                rel = f"{EARLY_DIR}/{part}.safetensors"
                files[rel] = file_sha256(self.partial_dir / rel)
                early[f"{part}_file"] = rel
        end_hash = combine_digests(end_digests)
        unstepped = self._unstepped_parameters(end_digests)
        info = {
            "format_version": FORMAT_VERSION if residual else BASE_FORMAT_VERSION,  # older releases read the rest
            "index": self.index,
            "name": self.name,
            "kind": self.kind,
            "optimizer": self._optimizer_description(),
            **({"scheduler": self.scheduler_description} if self.scheduler_description else {}),
            "learning_rates": self.learning_rates,
            **({"skipped_steps": self.skipped_steps} if self.skipped_steps else {}),  # absent: all applied
            "num_steps": len(self.learning_rates),
            "trainable_parameters": sorted(set(all_dense) | set(self._lora)),
            **({"changed_without_grad": sorted(frozen_changed)} if frozen_changed else {}),
            **({"unstepped_parameters": unstepped} if unstepped else {}),  # absent: every trainable tensor stepped
            "delta_file": "delta.safetensors" if "delta.safetensors" in files else None,
            **({"delta_residual_file": RESIDUAL_FILE} if residual else {}),
            "lora_file": "lora.safetensors" if "lora.safetensors" in files else None,
            "lora": lora_info,
            "optimizer_state_policy": self.optimizer_state_policy,
            "optimizer_state_file": "optimizer_state.safetensors" if "optimizer_state.safetensors" in files else None,
            "start_hash": combine_digests(self.start_digests),
            "end_hash": end_hash,
            "end_digests": end_digests,
            "segments": segments,
            **({"early_checkpoint": early} if early else {}),  # absent: not recorded (opt-in)
            "curvature_loss": self.curvature_loss,
            "started_at": self.started_at,
            "finished_at": utc_now(),
            "wall_time_seconds": round(time.time() - self._t0, 3),
            **_json_safe_metadata(self.metadata),
        }
        for leftover in ("start_trainable.safetensors", "start_lora.safetensors", "progress.json"):
            (self.partial_dir / leftover).unlink(missing_ok=True)
        replay = self.partial_dir / "replay"
        if replay.is_dir():
            for path in sorted(replay.rglob("*")):
                if path.is_file():
                    files[str(path.relative_to(self.partial_dir))] = file_sha256(path)
        files["stage.json"] = atomic_write_json(self.partial_dir / "stage.json", info)
        stage = self._commit(self.partial_dir, self.name, self.kind, info["start_hash"], end_hash, files)
        self.ledger._remember_loss_fn(self.name, self.loss_fn)
        return stage

    def _commit(self, partial: Path, name: str, kind: str, start_hash: str, end_hash: str, files: dict[str, str]):
        ledger = self.ledger
        final = ledger.dir / "stages" / stage_dir_name(len(ledger.stages), name)
        if final.exists():
            raise LedgerError(
                f"Cannot finish stage {name!r}: {final} already exists (left by an earlier crash?). Remove it."
            )
        os.replace(partial, final)
        return ledger._append_stage(final.name, name, kind, start_hash, end_hash, files)


EARLY_DIR = "early_checkpoint"


def check_early_checkpoint(value: Any) -> float | None:
    """``early_checkpoint`` as a float in (0, 1), or None; :class:`LedgerError` otherwise.

    Example:
        >>> check_early_checkpoint(0.25), check_early_checkpoint(None)
        (0.25, None)
    """
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or not 0.0 < float(value) < 1.0:
        raise LedgerError(
            "`early_checkpoint` is the fraction of the stage's planned optimizer steps after which its parameters "
            f"and optimizer state are saved for partial replay: a number in (0, 1), got {value!r}. Pass e.g. "
            "early_checkpoint=0.25, or None to save nothing."
        )
    return float(value)


def early_checkpoint_step(fraction: float | None, num_steps: int | None, name: str) -> int | None:
    """The optimizer step count after which the early checkpoint is saved (None: none is saved).

    Example:
        >>> early_checkpoint_step(0.25, 150, "sft"), early_checkpoint_step(0.25, 1, "sft")
        (37, None)
    """
    if fraction is None:
        return None
    if num_steps is None:
        raise LedgerError(
            f"Stage {name!r}: early_checkpoint={fraction} is a fraction of the stage's planned optimizer steps, but "
            "`num_steps` was not given. Pass num_steps=... to record_stage, or early_checkpoint=None."
        )
    m = max(1, math.floor(fraction * int(num_steps) + 1e-9))  # never past the fraction: a budget f fits it
    return m if m < int(num_steps) else None  # a one-step stage has no step before its end to save


def _iter_selected_merged(model, names: list[str], lora: dict, params: dict) -> Iterator[tuple[str, torch.Tensor]]:
    for n in names:
        yield n, merged_tensor(n, params[n], lora)


def _json_safe_metadata(metadata: dict) -> dict:
    try:
        return json.loads(json.dumps(metadata, default=_fallback, allow_nan=False))
    except ValueError as exc:
        raise LedgerError(f"Stage metadata must be JSON-safe (no NaN/inf): {exc}") from exc


def _fallback(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


__all__ = ["StageRecording", "tensor_digest"]
