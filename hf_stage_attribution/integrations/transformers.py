"""``StageRecorder``: a ``transformers.TrainerCallback`` that records a training run into a stage ledger.

It works unchanged with ``Trainer`` and every TRL trainer (they subclass it) and only forwards what the Trainer
tells it to the framework-free :class:`~hf_stage_attribution.ledger.recorder.StageRecording`:

- ``on_train_begin``: start the stage (θ at the start, optimizer, planned steps), record the run's metadata,
  save replay data if asked, and hook the model's forward to offer training batches for curvature material;
- ``on_optimizer_step`` (after ``optimizer.step()``, *before* ``lr_scheduler.step()`` in transformers 5):
  record the applied learning rate of every param group;
- ``on_step_end``: end a stage and start the next at a ``stage_boundaries`` step (same optimizer: "continued");
- ``on_step_end``/``on_save`` when the Trainer saves: persist progress, so a resumed run continues the stage;
- ``on_train_end``: finish the stage and remove the hooks.
"""

from __future__ import annotations

import os
import re
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .._internal.model_state import has_autocast_wrapper
from .._internal.params import state_digests, unwrap_model
from ..errors import LedgerError
from ..ledger.ledger import StageLedger
from ..ledger.recorder import StageRecording, check_early_checkpoint
from ..ledger.storage import atomic_write_json, read_json
from .eval_rng import EvalRngLog
from .recipe_check import given_optimizer_reason
from .replay import unimported_trainer_class
from .replay_data import REPLAY_FILE, projected_dataset_bytes, save_stage_replay_data
from .run_info import find_trainer, train_dataset
from .stage_metadata import RunContext, build_metadata, optimizer_warning, resolve_trainer_class
from .stage_plan import StagePart, parse_boundaries, plan_parts
from .trl import infer_curvature_loss, infer_stage_kind, training_mode_warnings, training_precision

# Forward keyword arguments that are loss bookkeeping, not inputs (kept out of the captured batches).
_NOT_INPUTS = ("num_items_in_batch",)
# Ledger directory → the StageRecorder holding an unfinished recording there, in this process.
_ACTIVE: dict[str, weakref.ReferenceType] = {}


class StageRecorder(TrainerCallback):
    """Record a ``Trainer``/TRL run as one stage (or several, with ``stage_boundaries``) of a stage ledger.

    Args:
        ledger_dir: the ledger directory (created on first use; later runs append stages).
        stage_name: the stage's unique name in the ledger.
        stage_kind: ``pretraining``, ``sft``, ``lora``, ``dpo``, ...; default: inferred from the config class
            (``SFTConfig`` → ``sft``, ``DPOConfig`` → ``dpo``, ...; plain ``TrainingArguments`` → ``fine-tuning``,
            or ``lora`` on a PEFT model).
        save_replay_data: also save what :func:`~hf_stage_attribution.integrations.replay.replay_trainer_stage`
            needs (dataset, processing class, arguments, collator, PEFT config, reference policy).
        curvature_segments, curvature_examples: curvature material per stage (``0`` segments turns it off).
        curvature_material: ``"compact"`` (default, a few kB per segment) or ``"full"`` (θ_mid snapshots and full
            second moments, 2× the trainable parameters per segment); see :class:`StageRecording`.
        stage_boundaries: ``{"anneal": 800}`` ends ``stage_name`` after global step 800 and records the rest of
            the run as stage ``anneal`` (values may also be ``{"step": 800, "kind": "..."}``).
        trainer_class: overrides the trainer class recorded (default: the trainer found on the call stack).
        early_checkpoint: opt-in fraction in (0, 1) of each stage's steps after which its parameters and optimizer
            state are saved, so that partial replay runs only the counterfactual branch of that stage (about 3
            trainable-parameter sizes on disk with Adam); see :class:`StageRecording`.

    Example:
        >>> import tempfile, torch
        >>> from datasets import Dataset
        >>> from transformers import Trainer, TrainingArguments
        >>> from hf_stage_attribution import StageLedger, StageRecorder
        >>> from hf_stage_attribution.testing.lm import tiny_gpt2, tiny_tokenizer
        >>> tok = tiny_tokenizer(); model = tiny_gpt2(tok)
        >>> data = Dataset.from_dict({"input_ids": [[4, 5, 6, 7]] * 8, "labels": [[4, 5, 6, 7]] * 8})
        >>> out = tempfile.mkdtemp()
        >>> args = TrainingArguments(out, max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        ...                          disable_tqdm=True, logging_strategy="no", save_strategy="no")
        >>> recorder = StageRecorder(out + "/ledger", "pretrain", stage_kind="pretraining")
        >>> _ = Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder]).train()  # doctest: +ELLIPSIS
        {'train_runtime': ...}
        >>> [(s.name, s.kind, s.num_steps) for s in StageLedger.load(out + "/ledger").stages]
        [('pretrain', 'pretraining', 2)]
    """

    def __init__(
        self,
        ledger_dir: str | os.PathLike,
        stage_name: str,
        stage_kind: str | None = None,
        save_replay_data: bool = False,
        curvature_segments: int = 3,
        curvature_examples: int = 256,
        stage_boundaries: dict[str, int | dict] | None = None,
        trainer_class: str | type | None = None,
        curvature_material: str = "compact",
        early_checkpoint: float | None = None,
    ) -> None:
        self.ledger_dir = Path(ledger_dir)
        self.stage_name = stage_name
        self.stage_kind = stage_kind
        self.save_replay_data = bool(save_replay_data)
        self.curvature_segments = int(curvature_segments)
        self.curvature_examples = int(curvature_examples)
        self.curvature_material = curvature_material
        self.early_checkpoint = check_early_checkpoint(early_checkpoint)
        self.trainer_class = trainer_class
        self._boundaries = parse_boundaries(stage_name, stage_boundaries)
        self.recording: StageRecording | None = None
        self.recorded_stages: list = []
        self._part: StagePart | None = None
        self._parts: list[StagePart] = []
        self._context: RunContext | None = None
        self._hooks: list[Any] = []
        self._finalizer: weakref.finalize | None = None
        self._skipped_steps: list[int] = []
        self._empty_reason: str | None = None  # why a stage boundary's part ends with no step (said when dropped)
        self._inherited_autocast: bool | None = None  # on_init_end: the model carried an earlier Trainer's wrapper
        self._init_optimizers: tuple[Any, Any] = (None, None)  # on_init_end: what the Trainer was given
        self._eval_rng: EvalRngLog | None = None  # generator states after evaluations (a replayable stage's)

    @property
    def ledger(self) -> StageLedger:
        return StageLedger(self.ledger_dir)

    # --- events -----------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        # before this Trainer prepares the model: does it still carry an earlier Trainer's autocast wrapper? Then
        # this Trainer's accelerate leaves the model as it is and the stage trains under that wrapper, which a
        # replay from a clean copy must put back to land on the recorded run (integrations/replay.py)
        model = kwargs.get("model")
        # the autocast wrapper itself (accelerate installs it only with native mixed precision), not just the
        # "prepared" flag a float32 Trainer leaves too
        self._inherited_autocast = has_autocast_wrapper(unwrap_model(model)) if model is not None else None
        # an optimizer or scheduler the user gave the Trainer: a replay would build the arguments' defaults instead
        self._init_optimizers = (kwargs.get("optimizer"), kwargs.get("lr_scheduler"))
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        self._take_over_interrupted()
        if self.recorded_stages and self.recording is None:
            raise LedgerError(
                f"This StageRecorder already recorded {[s.name for s in self.recorded_stages]} in {self.ledger_dir}; "
                "a second train() call is a new stage: create a new StageRecorder with a new stage name."
            )
        trainer = find_trainer()
        self._context = RunContext(
            args=args,
            trainer=trainer,
            model=kwargs.get("model"),
            optimizer=kwargs.get("optimizer"),
            scheduler=kwargs.get("lr_scheduler"),
            train_dataloader=kwargs.get("train_dataloader"),
            processing_class=kwargs.get("processing_class"),
            is_main=bool(state.is_world_process_zero),
        )
        self._parts = plan_parts(self.stage_name, self.stage_kind, self._boundaries, int(state.max_steps))
        step = int(state.global_step)
        current = next((p for p in self._parts if p.start <= step < p.end), None)
        if current is None:
            if int(state.max_steps) <= 0 and state.is_world_process_zero:
                warnings.warn(
                    f"StageRecorder: this train() takes no optimizer step (max_steps = {state.max_steps}: "
                    f"num_train_epochs = {getattr(args, 'num_train_epochs', None)!r}, or an empty dataset), so "
                    f"nothing is recorded for stage {self.stage_name!r}.",
                    UserWarning,
                    stacklevel=2,
                )
            return control  # resuming a run that had already finished: nothing left to record
        if step > 0:
            self._check_resumable(current, step)
        self._start(current, resume_at=step if step > 0 else None)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        recording = self.recording
        if recording is None or not recording.active:
            return control
        # accelerate's AcceleratedOptimizer sets step_was_skipped when its GradScaler found an overflow (fp16):
        # the parameters and the scheduler did not move, so propagation must leave this step out
        skipped = bool(getattr(kwargs.get("optimizer"), "step_was_skipped", False))
        if skipped:
            self._skipped_steps.append(int(state.global_step) + 1)
        recording.step(skipped=skipped)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        part = self._part
        if part is not None and int(state.global_step) == part.end and part.end < int(state.max_steps):
            following = self._parts[self._parts.index(part) + 1]
            self._finish()
            self._start(following, resume_at=None)
            strategy = getattr(args, "save_strategy", "no")
            if getattr(strategy, "value", strategy) != "no":
                control.should_save = True  # a checkpoint at the boundary: a crash after it resumes in the new stage
        if control.should_save:
            self._checkpoint()
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        # an evaluation during the stage drew from the random generators and its replay runs none: keep their states
        # after the last evaluation at this step, for the replay to put back (integrations/eval_rng.py)
        if self._eval_rng is not None and self.recording is not None and self.recording.active:
            self._eval_rng.capture(int(state.global_step))
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._checkpoint()
        return control

    def on_save(self, args, state, control, **kwargs):
        self._checkpoint()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._end_at_best_checkpoint(args, state)
        self._finish()
        self._remove_hooks()
        self._part = None
        return control

    # --- recording --------------------------------------------------------------------------------------

    def _start(self, part: StagePart, resume_at: int | None) -> None:
        ctx = self._context
        kind = infer_stage_kind(ctx.args, ctx.model, part.kind)
        mode_notes = training_mode_warnings(ctx.args, unwrap_model(ctx.model), ctx.trainer) if ctx.is_main else []
        for message in mode_notes:
            warnings.warn(f"Stage {part.name!r}: {message}", stacklevel=2)
        recording = StageRecording(
            self.ledger_dir,
            part.name,
            kind=kind,
            model=ctx.model,
            optimizer=ctx.optimizer,
            scheduler=ctx.scheduler,
            num_steps=part.end - part.start,
            curvature_segments=self.curvature_segments,
            curvature_examples=self.curvature_examples,
            curvature_material=self.curvature_material,
            early_checkpoint=self.early_checkpoint,
            curvature_loss=infer_curvature_loss(kind, ctx.args, ctx.model),
            is_main_process=ctx.is_main,
            resume=resume_at is not None,
        )
        recording.align_on_resume = False  # _align_resumed aligns with the Trainer's global step
        if self.save_replay_data and part.start == 0 and resume_at is None:  # a copy of the training dataset
            dataset = train_dataset(ctx.trainer, ctx.train_dataloader)
            recording.projected_extra["replay_dataset"] = projected_dataset_bytes(dataset)  # not the tokenizer (MBs)
        recording.begin()
        self.recording, self._part, self._skipped_steps = recording, part, []
        if not recording.active:
            return  # not the main process: only rank 0 records
        _ACTIVE[str(self.ledger_dir.resolve())] = weakref.ref(self)
        # If this recorder is dropped while its stage is unfinished (train() raised), free the lock and the hooks.
        self._finalizer = weakref.finalize(self, _release, recording, self._hooks)
        notes: list[str] = list(mode_notes)  # kept in stage.json: the warning alone was lost with the console
        if resume_at is not None:
            notes += self._align_resumed(recording, part, resume_at)
        trainer_class = resolve_trainer_class(self.trainer_class, ctx)
        metadata, more_notes = build_metadata(ctx, kind, part, trainer_class, recording, self._boundaries)
        precision = training_precision(ctx.args, unwrap_model(ctx.model), ctx.trainer)
        if precision is not None:  # what the report's precision note reads (the note above says it in words)
            metadata["training_precision"] = precision
        if self._inherited_autocast is not None and isinstance(metadata.get("trainer"), dict):
            metadata["trainer"]["inherited_autocast_wrapper"] = self._inherited_autocast
        given = given_optimizer_reason(*self._init_optimizers, ctx.trainer)
        if given and isinstance(metadata.get("trainer"), dict):
            metadata["trainer"]["optimizer_given"] = given
            notes.append(
                f"The stage trains with {given}: a Trainer replay would rebuild the optimizer and schedule from the "
                "TrainingArguments instead, so the stage is replayed only by a stage function (stage_fns)."
            )
        notes += more_notes
        warning = optimizer_warning(ctx.optimizer)
        if warning is not None:
            warnings.warn(f"Stage {part.name!r}: {warning}", UserWarning, stacklevel=3)
            notes.append(warning)
        if self.save_replay_data:
            notes += save_stage_replay_data(recording, ctx, kind, part, trainer_class, metadata)
            unimported = unimported_trainer_class(trainer_class)
            if unimported:  # said when it is recorded, not first when a replay is asked for
                notes.append(
                    f"replay: the stage trained with the trainer class {unimported}, which a replay does not import "
                    f"(only transformers' and TRL's): pass stage_fns={{{part.name!r}: fn}} to replay it (or "
                    "integrations.replay.replay_trainer_stage(..., trainer_cls=...))."
                )
            if part.start == 0:  # a replayable stage; a resumed one keeps the states saved before the interruption
                self._eval_rng = EvalRngLog.resume(recording.replay_dir, resume_at) if resume_at else EvalRngLog()
        metadata["notes"] = notes
        recording.update_metadata(**metadata)
        self._attach_hook(ctx.model)

    def _align_resumed(self, recording: StageRecording, part: StagePart, step: int) -> list[str]:
        done = step - part.start
        have = len(recording.learning_rates)
        recording.truncate(done)
        if have >= done:
            return [f"Resumed from a Trainer checkpoint at global step {step} (step {done} of this stage)."]
        if have > 0:
            tail = "; the learning rates of the missing steps are absent from the record."
        elif any(s.name == f"untracked-before-{part.name}" for s in recording.ledger.stages):
            tail = ": their parameter change is recorded as the 'untracked' stage before it."
        elif recording.ledger.exists and recording.ledger.stages:
            # begin() found the model at the ledger's final state (else it would have recorded an untracked stage)
            tail = (
                f": the stage starts at the resumed state, where the ledger's last stage "
                f"{recording.ledger.stages[-1].name!r} ends, and holds the steps this run takes from there."
            )
        else:
            tail = ": they are not recorded (the ledger starts at the resumed state)."
        message = (
            f"Stage {part.name!r} resumed at global step {step}, but the recording's last checkpoint holds {have} of "
            f"its {done} completed steps{tail}"
        )
        warnings.warn(message, UserWarning, stacklevel=4)
        return [message]

    def _checkpoint(self) -> None:
        if self.recording is not None and self.recording.active:
            if self._eval_rng is not None:  # a resumed run continues from what is on disk
                self._eval_rng.save(self.recording.replay_dir)
            self.recording.checkpoint()

    def _end_at_best_checkpoint(self, args: Any, state: Any) -> None:
        """``load_best_model_at_end``: the Trainer put back the parameters of its best checkpoint after the last step,
        so the stage's update ends at that checkpoint's step. Record the stage as its steps up to there (learning
        rates, curvature segments, replay's stop; the schedule stays the whole run's), as for a stage an
        early-stopping callback stopped there. A replay that ran every step would land on the last step's
        parameters, not the recorded ones (a tiny GPT-2, best at step 2 of 6: 90 % of the largest update off)."""
        recording, part = self.recording, self._part
        if recording is None or not recording.active or part is None or not getattr(args, "load_best_model_at_end", 0):
            return
        best = best_checkpoint_step(state)
        if best is None or best >= int(state.global_step):
            return
        notes = list(recording.metadata.get("notes", []))
        if best == part.start:  # the best checkpoint is this stage's start: its whole update was discarded
            recording.truncate(0)  # _finish drops it, as a stage stopped at its boundary
            self._empty_reason = (
                f"The Trainer loaded its best checkpoint (global step {best}, load_best_model_at_end), the start of "
                f"stage {part.name!r}: the stage's update was discarded, so it is not recorded."
            )
            return
        if best < part.start:  # an earlier stage of this run holds the best checkpoint: this one ends before it began
            notes.append(
                f"The Trainer loaded its best checkpoint (global step {best}) at the end (load_best_model_at_end), "
                f"which is before this stage began (step {part.start}): the stage's update takes the parameters back "
                "to that step, and it cannot be replayed."
            )
            recording.update_metadata(notes=notes, replay={"supported": False, "reason": notes[-1]})
            return
        recording.truncate(best - part.start)  # _finish then stops the replay there (the schedule is the run's)
        notes.append(
            f"The Trainer loaded its best checkpoint (global step {best} of {int(state.global_step)}) at the end "
            "(load_best_model_at_end): the stage's parameters end there, so it is recorded as its first "
            f"{best - part.start} optimizer steps (learning rates and curvature segments up to that step; a replay "
            "stops there, with the learning-rate schedule of the whole run)."
        )
        recording.update_metadata(notes=notes)

    def _stop_replay_where_the_stage_ended(self, recording: StageRecording) -> None:
        """A stage that ended before its planned end — a callback stopped training, or ``load_best_model_at_end``
        cut it at its best step — is replayed up to the steps it took (the learning-rate schedule stays the whole
        run's): its replay data were saved at its start with the planned end (a tiny GPT-2 stopped at step 3 of 8
        replayed all 8 and missed θ_K by 1.6× the stage's update)."""
        part = self._part
        replay_file = recording.replay_path / REPLAY_FILE  # not .replay_dir: that makes the folder
        if part is None or not recording.metadata.get("replay") or not replay_file.exists():
            return
        end = part.start + len(recording.learning_rates)
        info = read_json(replay_file, "replay file")
        if list(info.get("stage_steps") or []) != [part.start, end]:
            info["stage_steps"] = [part.start, end]
            atomic_write_json(replay_file, info)

    def _finish(self) -> None:
        recording = self.recording
        if recording is None:
            return
        part = self._part
        empty_boundary_part = (
            recording.active and part is not None and part.start > 0 and not recording.learning_rates
        ) and state_digests(recording.model) == recording.start_digests
        if empty_boundary_part:
            # training stopped exactly at a stage boundary: the next stage took no step. Committed, it was an empty
            # stage whose name a resume from the boundary's checkpoint could not use any more
            recording.abort()
            reason = self._empty_reason or (
                f"Training stopped at the boundary of stage {part.name!r} (global step {part.start}), before its "
                f"first step: it is not recorded. Resuming this run from checkpoint-{part.start} records it."
            )
            warnings.warn(reason, UserWarning, stacklevel=3)
            self._close()
            return
        if recording.active:
            self._stop_replay_where_the_stage_ended(recording)
            if self._skipped_steps:
                notes = list(recording.metadata.get("notes", []))
                notes.append(
                    f"The optimizer skipped global steps {self._skipped_steps} (mixed-precision overflow): their "
                    "learning rates were not applied; stage.json lists them in `skipped_steps` and propagation "
                    "leaves them out."
                )
                recording.update_metadata(notes=notes)
            if self._eval_rng is not None:  # before end(): it lists the replay files with their hashes
                self._eval_rng.save(recording.replay_dir)
                if self._eval_rng.notes():
                    recording.update_metadata(notes=[*recording.metadata.get("notes", []), *self._eval_rng.notes()])
            stage = recording.end()
            if stage is not None:
                self.recorded_stages.append(stage)
        self._close()

    def _close(self) -> None:
        """Forget the finished (or dropped) recording: its finalizer, its evaluation states, the active entry."""
        if self._finalizer is not None:
            self._finalizer.detach()
        self.recording, self._eval_rng, self._empty_reason = None, None, None
        _ACTIVE.pop(str(self.ledger_dir.resolve()), None)

    # --- interruption and resume ------------------------------------------------------------------------

    def release(self) -> None:
        """Let go of a stage whose ``train()`` raised, in a process that goes on (a notebook): its partial stage is
        kept for a resume, the ledger's lock and the model's hooks are freed. Until then (or until this recorder is
        garbage-collected) the ledger stays locked by this process. ``trainer.train(resume_from_checkpoint=...)``
        with a ``StageRecorder`` on the same ledger resumes the stage; ``hf-stage-attribution inspect DIR
        --remove-incomplete`` drops it. Does nothing when no stage is being recorded.

        Example:
            >>> import tempfile
            >>> StageRecorder(tempfile.mkdtemp(), "sft").release()  # nothing recorded yet: nothing to let go
        """
        self._suspend()
        self._close()
        self._part = None

    def _suspend(self) -> None:
        """Keep an interrupted recording's partial stage for resume; release the ledger lock and the hooks."""
        if self.recording is not None and self.recording.active:
            self.recording.suspend()
        self.recording = None
        self._remove_hooks()
        _ACTIVE.pop(str(self.ledger_dir.resolve()), None)

    def _take_over_interrupted(self) -> None:
        """A train() of this process that raised left a recording open: suspend it so this run can resume it."""
        ref = _ACTIVE.get(str(self.ledger_dir.resolve()))
        other = ref() if ref is not None else None
        if other is None or other.recording is None or not other.recording.active:
            return
        if other is not self:
            warnings.warn(
                f"StageRecorder: taking over the unfinished recording of stage {other.recording.name!r} in "
                f"{self.ledger_dir} left by an interrupted train() in this process.",
                UserWarning,
                stacklevel=3,
            )
        other._suspend()

    def _check_resumable(self, part: StagePart, step: int) -> None:
        if not self._context.is_main:
            return
        ledger = self.ledger
        names = [s.name for s in ledger.stages] if ledger.exists else []
        if part.name in names and ledger.stage(part.name).num_steps == step - part.start:
            raise LedgerError(
                f"Stage {part.name!r} in {self.ledger_dir} finished after {step - part.start} step(s), at global step "
                f"{step}, where this run resumes; this run goes on to step {part.end} (max_steps or "
                "num_train_epochs raised after it finished?). A finished stage is not extended: record the "
                f"continuation as a new stage, e.g. StageRecorder({str(self.ledger_dir)!r}, "
                f"'{part.name}-continued')."
            )
        if part.name in names:
            raise LedgerError(
                f"Resuming at global step {step} inside stage {part.name!r} (steps {part.start}..{part.end}), but "
                f"{self.ledger_dir} already holds a finished stage {part.name!r}. Resume from the checkpoint at the "
                f"stage boundary (checkpoint-{part.end}, saved by StageRecorder when checkpoints are on) or a later "
                "one, or record into a new ledger directory."
            )
        missing = [p.name for p in self._parts if p.end <= part.start and p.name not in names]
        if missing:
            warnings.warn(
                f"Resuming inside stage {part.name!r}, but earlier stage(s) {missing} of this run are not in "
                f"{self.ledger_dir}: their change will be recorded as an 'untracked' stage.",
                UserWarning,
                stacklevel=3,
            )

    # --- batches for curvature material -----------------------------------------------------------------

    def _attach_hook(self, model: torch.nn.Module | None) -> None:
        if model is None or self._hooks:
            return
        recorder = weakref.ref(self)  # the model must not keep an interrupted recorder alive

        def offer_batch(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            owner = recorder()
            recording = owner.recording if owner is not None else None
            if recording is None or not recording.active or not module.training or not torch.is_grad_enabled():
                return None
            batch = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in _NOT_INPUTS}
            if args and isinstance(args[0], torch.Tensor) and "input_ids" not in batch:
                batch["input_ids"] = args[0]
            if batch:
                recording.observe_batch(batch)
            return None

        self._hooks.append(model.register_forward_pre_hook(offer_batch, with_kwargs=True))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def best_checkpoint_step(state: Any) -> int | None:
    """The global step of the Trainer's best checkpoint (``state.best_global_step``, or the number in
    ``state.best_model_checkpoint``'s ``checkpoint-N``), or None.

    Example:
        >>> from types import SimpleNamespace
        >>> best_checkpoint_step(SimpleNamespace(best_global_step=None, best_model_checkpoint="out/checkpoint-20"))
        20
    """
    step = getattr(state, "best_global_step", None)
    if isinstance(step, int) and step > 0:
        return step
    match = re.search(r"checkpoint-(\d+)$", str(getattr(state, "best_model_checkpoint", None) or "").rstrip("/\\"))
    return int(match.group(1)) if match else None


def _release(recording: StageRecording, hooks: list) -> None:
    """Finalizer of a recorder dropped mid-stage: keep the partial stage for resume, free the lock and hooks."""
    recording.suspend()
    for handle in hooks:
        handle.remove()
    hooks.clear()
