"""Re-run a recorded Trainer/TRL stage from another start: the estimators' replay engine uses this to measure the
ground truth ``τ_k`` (ESTIMATORS.md §2) for stages recorded with ``StageRecorder(save_replay_data=True)``.

The config and trainer classes are imported by name, only from ``transformers`` and ``trl`` (never unpickled);
the dataset is ``load_from_disk`` (Arrow), the processing class ``from_pretrained`` of a local folder. Training
runs with ``output_dir`` in a temporary directory, ``report_to=[]``, no checkpoints and no Hub pushes, so no
README or model card anywhere is touched. It shows nothing of its own: the trainer's printer callbacks are removed,
the progress bars of transformers and datasets are off and the libraries' known-harmless warnings ignored while it
runs (a replay's loss dicts and bars on the screen would read as the user's training; its warnings were shown when
the stage was trained).

Example, on a ledger recorded with the Trainer callback and its replay data::

    ledger = StageLedger.load("ledger"); model = ...  # θ at the stage's (counterfactual) start
    model = replay_trainer_stage(ledger.stages[-1], model)  # trained exactly as the recorded stage was
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import inspect
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .._internal.distributed import replays_alone, single_process_world, world_size
from .._internal.hashing import combine_digests, files_identity
from .._internal.memory import collections_of_new_objects
from .._internal.model_state import add_autocast_wrapper, attention_switched, clean_copy, drop_accelerate_wrappers
from .._internal.notices import harmless_warnings_ignored, library_progress_bars_off
from .._internal.params import base_parameters, state_digests, unwrap_model
from .._internal.reuse import kept_replays, reusing
from ..errors import ReplayError
from ..ledger.stage import Stage
from ..ledger.storage import open_safetensors, read_json
from .eval_rng import eval_rng_callback
from .peft import config_from_json, wrap_with_adapter
from .recipe_check import recipe_check_callback
from .replay_data import REPLAY_FILE
from .run_info import attn_implementation, json_safe, training_arguments
from .trl import REFERENCE_OBJECTIVES, REWARD_OBJECTIVES, TEACHER_OBJECTIVES, stage_objective

_ALLOWED_MODULES = ("transformers", "trl")
# Recorded arguments a replay overrides: no Hub, no logging integrations, no checkpoints, no evaluation.
_OVERRIDES = {
    "report_to": [],
    "push_to_hub": False,
    "hub_token": None,
    "save_strategy": "no",
    "eval_strategy": "no",
    "eval_on_start": False,  # else the replay's Trainer, given no eval_dataset, raises before its first step
    "load_best_model_at_end": False,
    "resume_from_checkpoint": None,
    "disable_tqdm": True,
}


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Run a replayed training with Python's garbage collector frozen and automatic collection off.

    The objects alive on entry (the model, the loaded libraries: millions of them after ``import transformers``)
    go to the permanent generation (``gc.freeze``), so the full collections that a ``Trainer`` forces at the end of
    every ``train()`` (accelerate's ``free_memory``) only scan the objects made since; automatic collection is
    disabled for the run. Both are restored on exit, also on error. Reference counting still frees everything
    acyclic at once; the cyclic garbage made during the run — a finished ``Trainer`` is a cycle holding its
    optimizer's moments and, for DPO, a reference model — is collected on exit, before the objects are unfrozen, so
    the collection scans only the objects made since entry and the memory is back before the next stage (without it,
    each replayed DPO stage of SmolLM2-135M left ≈ 3× the parameter bytes behind until Python's next full
    collection). Nested uses (or a caller that froze objects itself, e.g. the replay estimators, which freeze what was
    alive when they began) leave the freeze to the outermost one but still collect on exit: that collection scans
    only the objects made since the outer freeze, so the run's garbage is gone when the stage returns at every depth.

    Example:
        >>> import gc
        >>> with frozen_gc():
        ...     gc.isenabled(), gc.get_freeze_count() > 0
        (False, True)
        >>> gc.isenabled(), gc.get_freeze_count()
        (True, 0)
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        # on exit: the run's cyclic garbage (a finished Trainer with its optimizer moments and reference model)
        # collected, scanned among the unfrozen objects only, before the next model-sized allocation
        with collections_of_new_objects():
            yield
    finally:
        if enabled:
            gc.enable()


def recorded_world_size(stage: Any) -> int:
    """The number of processes ``stage`` was trained in (the Trainer callback records it; 1 when not recorded).

    Example:
        >>> from types import SimpleNamespace
        >>> recorded_world_size(SimpleNamespace(info={"world_size": 2})), recorded_world_size(SimpleNamespace())
        (2, 1)
    """
    info = getattr(stage, "info", None)
    value = info.get("world_size") if isinstance(info, dict) else None
    try:
        return max(1, int(value or 1))
    except (TypeError, ValueError):
        return 1


@contextlib.contextmanager
def replay_world(stage: Any, model: Any = None) -> Iterator[None]:
    """The process world a replay of ``stage`` trains in: in a multi-process world (torchrun, ``accelerate
    launch``) whose size differs from the stage's recorded one (:func:`recorded_world_size`, typically 1), a
    single-process run (:func:`~hf_stage_attribution._internal.distributed.single_process_world`): each process of a
    multi-process attribution replays the whole stage for the stages it attributes, so its Trainer must
    neither wrap the model in DDP nor split the data across the processes — the trajectory is the recorded one and
    2 processes give the answer of 1. A stage recorded in a world of the current size replays in that world, as it
    was trained. Elsewhere (one process) nothing changes.

    ``model``, when given, is moved back to the device its parameters were on at entry if a single-process run moved
    it (on an accelerator a single-process Trainer trains on the first device, not this process's own).

    Example:
        >>> from types import SimpleNamespace
        >>> with replay_world(SimpleNamespace(info={"world_size": 1})):  # one process here: as it is
        ...     pass
    """
    recorded, current = recorded_world_size(stage), world_size()
    if recorded > 1 and recorded != current:  # measured: a 2-process recording replayed in 1 process, θ_K off by 0.06
        where = "1 process" if current == 1 else f"{current} processes, each as one process"
        warnings.warn(
            f"Stage {getattr(stage, 'name', '?')!r} was recorded in {recorded} processes (DDP) and is replayed in "
            f"{where}: each step sees other data than in the recorded run, so this replay, and the estimates and "
            f"verdicts built on it, are not the recorded training. Run the attribution in {recorded} processes "
            f"(torchrun --nproc_per_node {recorded}) to replay it as recorded.",
            UserWarning,
            stacklevel=3,
        )
    if not replays_alone(recorded):
        yield
        return
    device = next((p.device for p in model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    with single_process_world():
        yield
    if device is not None and any(p.device != device for p in model.parameters()):
        model.to(device)


def replays_each_alone(stages: Iterable[Any]) -> bool:
    """Whether every one of ``stages`` replays as a single-process run in this multi-process world
    (:func:`replay_world`), so that processes may replay different stages at the same time; False where one replays
    across the processes (recorded in a world of this size: every process must run it together), and in one process.

    Example:
        >>> from types import SimpleNamespace
        >>> replays_each_alone([SimpleNamespace(info={"world_size": 1})])  # one process here
        False
    """
    return all(replays_alone(recorded_world_size(stage)) for stage in stages)


def import_class(entry: dict, what: str) -> Any:
    """Import ``entry["module"].entry["class"]`` if the module is part of transformers or TRL."""
    module, name = str(entry.get("module") or ""), str(entry.get("class") or entry.get("function") or "")
    if module.split(".")[0] not in _ALLOWED_MODULES:
        raise ReplayError(
            f"The recorded {what} {module}.{name} is not from transformers/TRL, and replay imports nothing else. "
            f"Pass it explicitly to replay_trainer_stage (`{'trainer_cls' if what == 'trainer' else what}=`), or, "
            "through StageAttributor or the CLI, replay the stage with a stage function (stage_fns / --stage-fn) "
            "that trains it as it was."
        )
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ReplayError(
            f"Cannot import the recorded {what} {module}.{name} ({exc}): are the installed versions different?"
        ) from exc
    return obj


def trainer_class_problem(stage: Any) -> str | None:
    """Why the trainer class ``stage`` recorded cannot be imported by a replay, as a clause (``None`` when it can):
    replay imports only transformers' and TRL's classes, so a ``Trainer`` subclass of the user's (its own
    ``compute_loss``, say) needs ``trainer_cls=`` (:func:`replay_trainer_stage`) or a stage function.

    Example:
        >>> from types import SimpleNamespace
        >>> stage = SimpleNamespace(name="sft", info={"trainer": {"class": "WeightedTrainer", "module": "__main__"}})
        >>> trainer_class_problem(stage).split(",")[0]
        'it trained with the trainer class __main__.WeightedTrainer'
        >>> trainer_class_problem(SimpleNamespace(name="sft", info={"trainer": {"module": "trl.trainer"}})) is None
        True
    """
    path = unimported_trainer_class((getattr(stage, "info", None) or {}).get("trainer"))
    if path is None:
        return None
    return (
        f"it trained with the trainer class {path}, which a replay does not import (only transformers' and TRL's): "
        f"pass stage_fns={{{stage.name!r}: fn}} with fn training the stage with that trainer (or call "
        "integrations.replay.replay_trainer_stage(..., trainer_cls=...) yourself), or use a propagation estimator "
        "(aa-ggn, aa-fd)"
    )


def unimported_trainer_class(entry: Any) -> str | None:
    """``"module.Class"`` of a recorded trainer class (``stage.json["trainer"]``) that a replay does not import (it
    imports only transformers' and TRL's classes); None for theirs or where none is recorded.

    Example:
        >>> unimported_trainer_class({"class": "WeightedTrainer", "module": "my_lab.train"})
        'my_lab.train.WeightedTrainer'
        >>> unimported_trainer_class({"class": "SFTTrainer", "module": "trl.trainer.sft_trainer"}) is None
        True
    """
    if not isinstance(entry, dict) or not entry.get("module"):
        return None
    module = str(entry["module"])
    return None if module.split(".")[0] in _ALLOWED_MODULES else f"{module}.{entry.get('class')}"


def rebuild_arguments(info: dict, output_dir: str) -> Any:
    """The training config of the stage, rebuilt from its class name and recorded JSON fields.

    Only fields that differ from the class defaults are passed; fields whose default is ``None`` are often derived in
    ``__post_init__`` (e.g. GRPO's ``generation_batch_size`` from ``steps_per_generation``) and are passed only when
    the derived value differs from the recorded one. Any remaining difference is reported as a warning.
    """
    config_cls = import_class(info["config"], "config class")
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    recorded = {k: v for k, v in info["args"].items() if k in fields}
    overrides = {**{k: v for k, v in _OVERRIDES.items() if k in fields}, "output_dir": output_dir}
    explicit, derived = {}, {}
    for name, value in recorded.items():
        field = fields[name]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if value != default and name not in overrides:
            (derived if default is None else explicit)[name] = value

    def build(values: dict) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                return config_cls(**values, **overrides)
            except (TypeError, ValueError) as exc:
                raise ReplayError(f"Cannot rebuild the stage's {config_cls.__name__} from its record: {exc}") from exc

    config = build(explicit)
    missing = {k: v for k, v in derived.items() if json_safe(getattr(config, k, None)) != v}
    if missing:
        config = build({**explicit, **missing})
    rebuilt = training_arguments(config)
    differ = sorted(k for k, v in recorded.items() if k not in overrides and k in rebuilt and rebuilt[k] != v)
    if differ:
        warnings.warn(
            f"Replay: the rebuilt {config_cls.__name__} differs from the recorded arguments in {differ}.", stacklevel=3
        )
    return config


def _load_pretrained(path: Path, class_name: str) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    loader = AutoProcessor if "Processor" in class_name else AutoTokenizer
    return loader.from_pretrained(str(path), trust_remote_code=False)


def _processing_class(replay_dir: Path, info: dict) -> Any:
    entry = info.get("processing_class")
    if not entry:
        return None
    return _load_pretrained(replay_dir / entry["dir"], str(entry.get("class")))


def _collator(info: dict, processing_class: Any, replay_dir: Path) -> Any:
    entry = info.get("collator")
    if not entry or not entry.get("rebuildable"):
        return None
    obj = import_class(entry, "data_collator")
    if "function" in entry:
        return obj
    fields = {}
    for name, value in entry.get("fields", {}).items():
        if isinstance(value, dict) and value.get("$processing_class"):
            value = processing_class
        elif isinstance(value, dict) and "$pretrained" in value:
            value = _load_pretrained(replay_dir / value["$pretrained"], "Tokenizer")
        fields[name] = value
    return obj(**fields)


def replay_objective(stage: Any, info: dict) -> str:
    """The objective replay re-runs: the recorded TRL objective where the stage kind names only its family
    (:func:`~hf_stage_attribution.integrations.trl.stage_objective`), else the kind in the replay file."""
    trl = (getattr(stage, "info", None) or {}).get("trl") or {}
    return str(trl.get("objective") or info.get("kind") or stage_objective(stage))


def _reference(objective: str, info: dict, model: Any, ref_model: Any, output_dir: str) -> Any:
    """The reference model for the replay, following the recorded policy (the counterfactual start for a copy)."""
    ref = info.get("reference_model") or {}
    policy = str(ref.get("policy", ""))
    if ref_model is not None and objective in REFERENCE_OBJECTIVES and "synced every" in policy:
        # TRL's sync_ref_model mixes the policy into the reference in place: the replay trains a copy, or the model
        # the user gave would be changed by the first replay and stand for another reference in the next ones
        return clean_copy(ref_model)
    if ref_model is not None or objective not in REFERENCE_OBJECTIVES:
        return ref_model if objective not in TEACHER_OBJECTIVES else None
    if policy.startswith(("adapter disabled", "precomputed", "none")):
        return None
    if policy.startswith("copy of the stage start"):
        if objective in _REF_MODEL_OBJECTIVES:
            return clean_copy(model)
        # GRPO/RLOO load their reference from the model's path: point it at a copy of the replay's start.
        path = Path(output_dir) / "reference-start"
        model.save_pretrained(str(path))
        model.config._name_or_path = str(path)
        return None
    if policy.startswith("separate model") and objective in _REF_MODEL_OBJECTIVES:
        loaded = load_recorded_reference(ref, attn_implementation(model))
        if loaded is not None:
            return loaded
    raise ReplayError(
        f"The stage's reference model was {policy or 'not recorded'!r}: replay cannot rebuild it. Pass `ref_model=`"
        " (DPO/KTO/OnlineDPO), or for GRPO/RLOO give the model a `config._name_or_path` that holds the reference."
    )


#: objectives whose trainer takes the reference as ``ref_model=`` (GRPO/RLOO load it from the model's path)
_REF_MODEL_OBJECTIVES = ("dpo", "kto", "online_dpo")


def _teacher(stage: Stage, objective: str, model: Any, given: Any) -> Any:
    """The teacher of a distillation stage for its replay: ``given`` (``ref_model=``, as ``ref_models`` passes it),
    else rebuilt as recorded (``stage.info["trl"]["teacher_model"]``): a copy of the replay's start, or the separate
    model loaded from its recorded folder when that holds the recorded weights. ``None`` for other objectives and a
    stage that had no teacher model."""
    if objective not in TEACHER_OBJECTIVES:
        return None
    if given is not None:
        return given
    teacher = ((getattr(stage, "info", None) or {}).get("trl") or {}).get("teacher_model") or {}
    policy = str(teacher.get("policy", ""))
    if policy == "none":
        return None
    if policy.startswith("copy of the stage start"):
        return clean_copy(model).eval()
    loaded = load_recorded_reference(teacher) if policy.startswith("separate model") else None
    if loaded is None:
        raise ReplayError(f"Cannot replay stage {stage.name!r}: {teacher_problem(stage, objective, teacher)}.")
    return loaded


def teacher_problem(stage: Stage, objective: str, teacher: dict) -> str:
    """Why replay cannot rebuild the teacher of a distillation stage, and how to give it (a clause)."""
    path = str(teacher.get("name_or_path") or "")
    where = f" loaded from {path!r}, which is not a directory here" if path else " built in memory (no folder)"
    if not teacher:
        where = " that was not recorded (a ledger written before teachers were recorded)"
    return (
        f"stage {stage.name!r} ({objective}) trained against a teacher model{where} (state hash "
        f"{teacher.get('state_hash', '?')}), which its replay data do not hold: pass the teacher as "
        f"ref_models={{{stage.name!r}: teacher}} (CLI: --ref-model {stage.name}=PATH; replay_trainer_stage: "
        "ref_model=teacher), or stage_fns"
    )


def reference_problem(stage: Stage, ref_model: Any = None) -> str | None:
    """``None`` when replay can rebuild (or was given) the stage's reference model — for a distillation stage its
    teacher, which ``ref_model`` then stands for — else why not and what to do. Cheap: reads the recorded policy and,
    for a separate model, checks that its recorded path exists."""
    replay_dir = getattr(stage, "replay_dir", None)
    if replay_dir is None or not (Path(replay_dir) / REPLAY_FILE).exists():
        return None  # the missing replay data is reported by replay itself
    info = read_json(Path(replay_dir) / REPLAY_FILE, "replay file")
    objective = replay_objective(stage, info)
    if ref_model is not None:
        return given_reference_problem(stage, objective, info, ref_model)
    if objective in TEACHER_OBJECTIVES:
        teacher = ((getattr(stage, "info", None) or {}).get("trl") or {}).get("teacher_model") or {}
        policy, path = str(teacher.get("policy", "")), str(teacher.get("name_or_path") or "")
        if policy == "none" or policy.startswith("copy of the stage start"):
            return None
        if policy.startswith("separate model") and path and Path(path).is_dir():
            return None
        return teacher_problem(stage, objective, teacher)
    if objective not in REFERENCE_OBJECTIVES:
        return None
    ref = info.get("reference_model") or {}
    policy = str(ref.get("policy", ""))
    if policy.startswith(("adapter disabled", "precomputed", "none", "copy of the stage start")):
        return None
    path = str(ref.get("name_or_path") or "")
    if policy.startswith("separate model") and objective in _REF_MODEL_OBJECTIVES and path and Path(path).is_dir():
        return None
    where = f" loaded from {path!r}, which is not a directory here" if path else ""
    return (
        f"stage {stage.name!r} ({objective}) trained against a separate reference model{where} (state hash "
        f"{ref.get('state_hash', '?')}): pass it as ref_models={{{stage.name!r}: model}} (CLI: --ref-model "
        f"{stage.name}=PATH)"
    )


def reward_problem(stage: Stage, reward_funcs: Any = None) -> str | None:
    """``None`` when ``stage`` needs no reward functions to replay (or was given them), else why it does and how to
    give them, as a clause: a GRPO/RLOO/OnlineDPO stage scores its generations with reward functions (Python
    callables or reward models) that no ledger can hold.

    Example:
        >>> from types import SimpleNamespace
        >>> grpo = SimpleNamespace(name="rl", kind="grpo", info={"trl": {"reward_functions": ["reward_len"]}})
        >>> reward_problem(grpo).split(": a ledger")[0]
        "stage 'rl' (grpo) scores its generations with reward functions (recorded: ['reward_len'])"
        >>> reward_problem(grpo, [len]) is None
        True
    """
    if reward_funcs is not None:
        return None
    trl = (getattr(stage, "info", None) or {}).get("trl") or {}
    objective = str(trl.get("objective") or stage_objective(stage))
    if objective not in REWARD_OBJECTIVES:
        return None
    names = trl.get("reward_functions")
    return (
        f"stage {stage.name!r} ({objective}) scores its generations with reward functions (recorded: {names}): "
        "a ledger holds no Python functions, so pass them as reward_funcs={"
        f"{stage.name!r}: [fn, ...]}} (CLI: --reward-func {stage.name}=MODULE:FUNCTION, or {stage.name}=PATH of a "
        "reward model; replay_trainer_stage: reward_funcs=[fn, ...]), or stage_fns"
    )


#: ``{folder identity: state hash}`` of the reference folders hashed in this process (:func:`_folder_identity`): a
#: default attribution replays a DPO stage up to six times, and hashing the reference each time cost SmolLM2-135M
#: 0.5 s per replay (a 7B model ≈ 30 s). A folder whose files changed in any way hashes again.
_VERIFIED_REFERENCES: dict[tuple, str] = {}


def _folder_identity(path: Path) -> tuple:
    """A folder as its resolved path and the :func:`files_identity` of the files in it."""
    return (str(path.resolve()), files_identity(f for f in path.iterdir() if f.is_file()))


def load_recorded_reference(ref: dict, attention: str | None = None) -> Any:
    """The separate reference model of a DPO/KTO stage, loaded from its recorded path when that path holds exactly
    the recorded weights (TRL's ``ref_model=None`` reloads the reference from ``config._name_or_path``); ``None``
    when the path is missing. A path whose weights differ from the recorded state hash is an error. The hash of an
    unchanged folder is computed once per process (:data:`_VERIFIED_REFERENCES`).

    It is loaded in the recorded dtype and attention implementation (``ref["dtype"]``, ``ref["attn_implementation"]``;
    ledgers recorded before they were kept: float32 and ``attention``, the policy's, as TRL loads it): the kernels
    round differently, and a DPO stage replayed against an ``sdpa`` reference of an ``eager`` run missed its update
    by 2e-5 in float32 and by all of it under bf16 autocast."""
    path = str(ref.get("name_or_path") or "")
    if not path or not Path(path).is_dir():
        return None
    from transformers import AutoModelForCausalLM

    folder = _folder_identity(Path(path))
    options: dict[str, Any] = {"dtype": ref.get("dtype") if ref.get("dtype") in ("bfloat16", "float16") else "float32"}
    attention = ref.get("attn_implementation") or attention
    if attention:
        options["attn_implementation"] = attention
    loaded = AutoModelForCausalLM.from_pretrained(path, **options)
    unchanged = _folder_identity(Path(path)) == folder  # nothing was written there while it loaded
    found = _VERIFIED_REFERENCES.get(folder) if unchanged else None
    if found is None:  # hashed once per unchanged folder and process
        found = combine_digests(state_digests(loaded))
        if unchanged:
            _VERIFIED_REFERENCES[folder] = found
    if ref.get("state_hash") and found != ref["state_hash"]:
        raise ReplayError(
            f"The stage's reference model was loaded from {path!r}, but the weights there now differ from the "
            f"recorded ones (state hash {found[:12]} vs {str(ref['state_hash'])[:12]}). Pass the original reference "
            "as ref_models={stage name: model} (CLI: --ref-model STAGE=PATH)."
        )
    loaded.eval()
    return loaded


def replay_trainer_stage(
    stage: Stage,
    model: Any,
    *,
    train_dataset: Any = None,
    data_collator: Any = None,
    ref_model: Any = None,
    reward_funcs: Any = None,
    trainer_cls: type | None = None,
    peft_config: Any = None,
    max_steps: int | None = None,
    optimizer_out: dict | None = None,
    grad_every: int = 1,
    **trainer_kwargs: Any,
) -> Any:
    """Train ``model`` (θ at the stage's start, plain transformers model) exactly as ``stage`` was trained.

    Returns the trained model in base parameter names: the same object trained in place, or for a PEFT stage the
    base model with the adapter (rebuilt from the recorded config and start weights) trained and merged.
    GRPO/RLOO/OnlineDPO stages need ``reward_funcs=`` (Python functions are not saved); a stage whose reference model
    was a separate model that replay cannot load from its recorded folder needs ``ref_model=``, and so does a
    distillation stage (DistillationTrainer, GKD) whose teacher it cannot: there ``ref_model`` is the teacher. The
    base parameters train exactly when the stage trained them
    (:func:`match_recorded_trainables`: a layer frozen when the stage was recorded stays frozen). The stage trains
    as recorded in two more respects: accelerate's mixed-precision wrapper that an earlier Trainer left on ``model``
    is taken off (in place; the replay's Trainer then autocasts as the recorded arguments say, and none is left on
    the result), and the model trains with the attention implementation the stage recorded (``stage.json``'s
    ``trainer.attn_implementation``; its own comes back afterwards; a warning names both where it cannot switch).

    ``max_steps=m`` stops after the first ``m`` optimizer steps of the *full* recipe (a callback sets
    ``control.should_training_stop``; the recorded ``max_steps`` and hence the learning-rate schedule are unchanged):
    the partial replay of ESTIMATORS.md §4b. ``optimizer_out``, when given a dict, receives the optimizer's state
    at the stop as ``{base parameter name: {state key: tensor}}`` (only tensors the optimizer trains under their
    base name; a PEFT stage's adapter factors are not base parameters and are left out).

    ``grad_every=s > 1`` replays with gradient reuse (:func:`with_gradient_reuse`): the forward and backward pass
    run on every ``s``-th optimizer step only, the steps in between re-use that gradient (the strided replay of
    ``estimators.strided_replay``); not for trainers that generate inside the training step (GRPO, RLOO, OnlineDPO,
    distillation).
    """
    if max_steps is not None and int(max_steps) < 0:
        raise ReplayError(f"`max_steps` must be a non-negative number of optimizer steps or None, got {max_steps!r}.")
    if stage.optimizer_state_policy == "continued":
        raise ReplayError(
            f"Stage {stage.name!r} continued the previous stage's optimizer state (stage boundaries inside one run, "
            "or a second train() of the same Trainer); it cannot be replayed on its own. Replay the whole run with a "
            "stage function (stage_fns), or record its stages as separate runs (a new Trainer for each)."
        )
    replay_dir = getattr(stage, "replay_dir", None)
    if replay_dir is None or not (Path(replay_dir) / REPLAY_FILE).exists():
        raise ReplayError(
            f"Stage {stage.name!r} has no replay data: record it with StageRecorder(..., save_replay_data=True), "
            "or give the replay engine a stage function (stage_fns)."
        )
    replay_dir = Path(replay_dir)
    info = read_json(replay_dir / REPLAY_FILE, "replay file")
    kind = info.get("kind") or stage.kind
    objective = replay_objective(stage, info)
    if objective in REWARD_OBJECTIVES and reward_funcs is None:
        names = (stage.info.get("trl") or {}).get("reward_functions")
        raise ReplayError(
            f"Replaying {objective} stage {stage.name!r} needs `reward_funcs=` (recorded: {names}): a ledger holds no "
            "Python functions. Pass the stage's reward functions (or reward models) as reward_funcs=[fn, ...]."
        )
    recorded = info.get("args") or {}
    packed = [k for k in ("packing", "padding_free") if "packing" in recorded and recorded.get(k)]
    if packed and train_dataset is None:  # SFTTrainer would pack the saved (packed) dataset again
        raise ReplayError(
            f"Stage {stage.name!r} trained with SFT {' and '.join(f'{k}=True' for k in packed)}: its replay data hold "
            "the dataset as SFTTrainer had already packed it, which a replay would pack again, so it would not train "
            "on the recorded batches. Replay it with a stage function (stage_fns) that runs the SFTTrainer on the "
            "original dataset."
        )
    if int(grad_every) < 1:
        raise ReplayError(f"`grad_every` must be a positive number of optimizer steps, got {grad_every!r}.")
    if int(grad_every) > 1 and (str(kind).lower() in NO_GRADIENT_REUSE or objective in NO_GRADIENT_REUSE):
        raise ReplayError(
            f"Stage {stage.name!r} ({objective}) generates its training data inside the training step; it cannot be "
            "replayed with gradient reuse (grad_every > 1). Use estimator='replay' or 'partial-replay'."
        )
    trainer_cls = trainer_cls or import_class(info["trainer"], "trainer")
    match_recorded_trainables(model, stage)
    drop_accelerate_wrappers(model)  # a model a Trainer prepared: the replay's Trainer must set up its own autocast
    inherited_autocast(stage, model)  # ... unless the recorded stage trained under an earlier Trainer's
    given = {
        "train_dataset": train_dataset,
        "data_collator": data_collator,
        "ref_model": ref_model,
        "reward_funcs": reward_funcs,
        "peft_config": peft_config,
        "trainer_kwargs": trainer_kwargs,
        "max_steps": None if max_steps is None else int(max_steps),
        "optimizer_out": optimizer_out,
        "grad_every": int(grad_every),
    }
    output_dir = tempfile.mkdtemp(prefix="hsa-replay-")
    try:
        # not the user's training; a 1-process recording replays as one process in each process of a larger world
        with (
            replay_world(stage, model),
            recorded_attention(stage, model),
            frozen_gc(),
            harmless_warnings_ignored(),
            library_progress_bars_off(),
        ):
            trained = _run(stage, model, info, replay_dir, objective, trainer_cls, output_dir, given)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
        # the replay's Trainer left its autocast wrapper: evaluations of the result, and the next stage's replay on
        # the same model, must not run under it
        drop_accelerate_wrappers(model)
    drop_accelerate_wrappers(trained)
    return trained


def inherited_autocast(stage: Any, model: Any) -> bool:
    """Put on ``model`` the mixed-precision wrapper the recorded stage started with, when it did (stage.json
    ``trainer.inherited_autocast_wrapper``: the model an earlier ``Trainer(bf16=True)`` had trained still carried
    accelerate's autocast wrapper, so this stage's accelerate left the model as it was and it trained under that
    wrapper). A DPO stage trained so after a bf16 SFT stage lands 0.024 away from the same DPO on a fresh model
    (tiny GPT-2, 3 steps: more than its whole update), so a replay from a clean copy needs the wrapper back: an
    autocast forward in the stage's recorded precision with float32 outputs, marked prepared, as accelerate makes it.
    Returns whether it did."""
    trainer = (getattr(stage, "info", None) or {}).get("trainer")
    if not isinstance(trainer, dict) or not trainer.get("inherited_autocast_wrapper"):
        return False
    args = (getattr(stage, "info", None) or {}).get("training_arguments") or {}
    dtype = torch.bfloat16 if args.get("bf16") else torch.float16 if args.get("fp16") else None
    if dtype is None or not isinstance(model, torch.nn.Module):
        return False
    add_autocast_wrapper(model, dtype, "cuda" if torch.cuda.is_available() and not args.get("use_cpu") else "cpu")
    return True


def recorded_attn_implementation(stage: Any) -> str | None:
    """The attention implementation (``config._attn_implementation``: ``eager``, ``sdpa``, ...) the stage trained
    with, as the recorder stored it in ``stage.json``'s ``trainer`` entry; None for ledgers written before it did.

    Example:
        >>> from types import SimpleNamespace
        >>> recorded_attn_implementation(SimpleNamespace(info={"trainer": {"attn_implementation": "eager"}}))
        'eager'
    """
    trainer = (getattr(stage, "info", None) or {}).get("trainer")
    value = trainer.get("attn_implementation") if isinstance(trainer, dict) else None
    return value if isinstance(value, str) and value else None


@contextlib.contextmanager
def recorded_attention(stage: Any, model: Any) -> Iterator[None]:
    """Train ``model`` with the attention implementation ``stage`` recorded (:func:`recorded_attn_implementation`)
    inside the block, and give it back its own on exit. The kernels round differently (under bf16 autocast a
    stage recorded with ``eager`` and replayed with ``sdpa`` misses θ_K by more than its own largest update), so a
    model loaded with another default (``from_pretrained`` picks ``sdpa``) would not replay the recorded training.
    Where the model cannot switch, a warning names both. Nothing changes for a ledger that recorded none."""
    recorded, current = recorded_attn_implementation(stage), attn_implementation(model)
    if recorded is None or current is None or recorded == current:
        yield
        return
    with attention_switched(model, recorded) as switched:
        if not switched:
            warnings.warn(
                f"Stage {getattr(stage, 'name', '?')!r} was trained with attention implementation {recorded!r}, but "
                f"the model replaying it uses {current!r} and cannot switch: the kernels round differently, so this "
                f"replay (and the estimates built on it) does not reproduce the recorded training exactly. Load the "
                f"model with attn_implementation={recorded!r}.",
                UserWarning,
                stacklevel=4,
            )
        yield


#: the :func:`files_identity` of each stage's replay files that hashed as ``ledger.json`` recorded in this process (a
#: default attribution replays a stage several times; an edited or replaced file changes its identity: hashed again)
_VERIFIED_REPLAY_DATA: set[tuple] = set()


def replay_files_problem(stage: Stage) -> str | None:
    """``None`` when ``stage``'s replay files (dataset, tokenizer, collator, replay file) hash as ``ledger.json``
    recorded (:meth:`~hf_stage_attribution.ledger.stage.Stage.changed_file`), else which one does not, as a clause:
    an edited or replaced dataset was replayed silently (the first stage's effect 31 % off), though
    ``StageLedger.verify()`` would have caught it. Ledgers recorded before replay files were hashed are not checked.
    Hashed once per unchanged set of files and process."""
    files = [path for path, _ in stage.recorded_files("replay/")] if hasattr(stage, "recorded_files") else []
    if not files:
        return None
    identity = files_identity(files)
    if identity in _VERIFIED_REPLAY_DATA:
        return None
    path = stage.changed_file("replay/")
    if path is not None:
        state = "is missing" if not path.is_file() else "does not match the hash recorded in ledger.json"
        return (
            f"its replay data file {path} {state}: the dataset, tokenizer or collator it would replay with "
            "changed after the stage was recorded, so a replay would train on other data than the stage did. "
            "Restore the file (StageLedger.verify() checks every file), or pass "
            f"stage_fns={{{stage.name!r}: fn}} with fn training the stage on its original data"
        )
    _VERIFIED_REPLAY_DATA.add(identity)
    return None


#: ``{id(model given): the recorded state hash it matched}`` within one attribution (``_internal.reuse``): a DPO
#: stage is replayed several times, and hashing a 7B reference costs about 30 s
_VERIFIED_GIVEN: dict[int, str] = kept_replays({})


def given_reference_problem(stage: Stage, objective: str, info: dict, given: Any) -> str | None:
    """``None`` unless ``given``, a reference model (or a distillation stage's teacher) passed for the replay
    (``ref_models``), differs from the one the stage trained against, where it recorded a separate model with a state
    hash: another model, or the right one trained further in place, replays another counterfactual (33 % and 13 % off
    on a tiny GPT-2, silently). A stage whose reference was a copy of its start, or that recorded no hash, is not
    checked."""
    if objective in TEACHER_OBJECTIVES:
        recorded, what = ((getattr(stage, "info", None) or {}).get("trl") or {}).get("teacher_model") or {}, "teacher"
    elif objective in REFERENCE_OBJECTIVES:
        recorded, what = info.get("reference_model") or {}, "reference model"
    else:
        return None
    expected = recorded.get("state_hash")
    if not expected or not str(recorded.get("policy", "")).startswith("separate model"):
        return None
    if not hasattr(given, "parameters") or (reusing() and _VERIFIED_GIVEN.get(id(given)) == expected):
        return None
    found = combine_digests(state_digests(unwrap_model(given)))
    if found != expected:
        where = recorded.get("name_or_path") or "a model built in memory"
        return (
            f"the {what} given for stage {stage.name!r} (ref_models) is not the one it trained against: its weights "
            f"hash to {found[:12]}, the recorded {what}'s ({where!r}) to {str(expected)[:12]}. Pass the {what} the "
            "stage used, unchanged: another model, or that one trained further, replays another counterfactual"
        )
    if reusing():
        _VERIFIED_GIVEN[id(given)] = expected
    return None


def _run(stage, model, info, replay_dir, objective, trainer_cls, output_dir, given) -> Any:
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    problem = replay_files_problem(stage) or (
        given_reference_problem(stage, objective, info, given["ref_model"]) if given["ref_model"] is not None else None
    )
    if problem:
        raise ReplayError(f"Cannot replay stage {stage.name!r}: {problem}.")
    args = rebuild_arguments(info, output_dir)
    processing_class = _processing_class(replay_dir, info)
    dataset = given["train_dataset"]
    if dataset is None:
        if not info.get("dataset"):
            raise ReplayError(
                f"Stage {stage.name!r}: its training dataset was not saved with its replay data; pass "
                "`train_dataset=` (replay_trainer_stage), or, through StageAttributor or the CLI, a stage function "
                "(stage_fns / --stage-fn) that trains the stage on the same data."
            )
        from datasets import load_from_disk

        dataset = load_from_disk(str(replay_dir / info["dataset"]["dir"]))
    collator = given["data_collator"]
    if collator is None:
        collator = _collator(info, processing_class, replay_dir)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    reference = _reference(objective, info, model, given["ref_model"], output_dir)
    teacher = _teacher(stage, objective, model, given["ref_model"])
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    train_model = model
    if info.get("peft"):
        peft_info = info["peft"]
        active = peft_info.get("active_adapter") or "default"
        cfg = given["peft_config"] or config_from_json(peft_info["adapters"][active])
        start = None
        if peft_info.get("adapter_start_file"):
            handle = open_safetensors(replay_dir / peft_info["adapter_start_file"])
            start = {k: handle.get_tensor(k) for k in handle.keys()}
        train_model = wrap_with_adapter(model, cfg, start, adapter_name=active)
    steps = list(info.get("stage_steps") or [0, None])
    if given["max_steps"] is not None:  # stop early; the schedule still spans the whole recorded stage
        stop = int(steps[0] or 0) + given["max_steps"]
        steps[1] = stop if steps[1] is None else min(int(steps[1]), stop)

    class _StopAtStageEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if steps[1] is not None and state.global_step >= steps[1]:
                control.should_training_stop = True
            return control

    kwargs = {"model": train_model, "args": args, "train_dataset": dataset, "processing_class": processing_class}
    if collator is not None:
        kwargs["data_collator"] = collator
    if reference is not None:
        kwargs["ref_model"] = reference
    if teacher is not None:
        kwargs["teacher_model"] = teacher
    if given["reward_funcs"] is not None:
        kwargs["reward_funcs"] = given["reward_funcs"]
    accepted = inspect.signature(trainer_cls.__init__).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted or k in ("model", "args")}
    kwargs.update(given["trainer_kwargs"])
    # the recorded optimizer and learning rates, or a ReplayError (integrations/recipe_check.py)
    check = recipe_check_callback(stage, int(steps[0] or 0))
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), _StopAtStageEnd(), check]
    if given["grad_every"] > 1:
        trainer_cls = with_gradient_reuse(trainer_cls, given["grad_every"], start=int(steps[0] or 0))
    # the random generators as the recorded run's evaluations left them (a replay runs none; integrations/eval_rng.py)
    restore_rng = eval_rng_callback(stage, info, replay_dir)
    if restore_rng is not None:
        kwargs["callbacks"] = [*kwargs["callbacks"], restore_rng]
    trainer = trainer_cls(**kwargs)
    for printer in (PrinterCallback, ProgressCallback):  # a replay's loss dicts would read as the user's training
        trainer.remove_callback(printer)
    _check_collator(stage, info, trainer, collator is not None)
    if given["max_steps"] != 0:
        trainer.train()
    if given["optimizer_out"] is not None:  # the trainer is dropped on return: its moments are shared, not copied
        given["optimizer_out"].update(optimizer_state_by_name(model, trainer.optimizer, copy=False))
    if name_or_path is not None:
        model.config._name_or_path = name_or_path
    if info.get("peft"):
        merged = trainer.model.merge_and_unload() if hasattr(trainer.model, "merge_and_unload") else train_model
        for name, param in merged.named_parameters():
            with contextlib.suppress(KeyError):
                param.requires_grad_(flags[name])
        return merged
    return model


def match_recorded_trainables(model: Any, stage: Stage) -> None:
    """Give ``model``'s base parameters the ``requires_grad`` flags they had when ``stage`` was recorded: trainable
    exactly when the ledger lists them among the stage's ``trainable_parameters`` and not among the parameters it
    changed without ``requires_grad`` (the training code edited those in place; the optimizer did not train them).

    A replayed stage runs on a copy of the *final* model, whose flags are the last stage's (a ``PeftModel`` is
    unloaded with every parameter trainable): a parameter the user froze before a dense stage (an embedding matrix,
    say) would otherwise be trained by its replay, and replay with nothing removed would not reproduce ``θ_K``.
    Left alone: LoRA stages (the adapter wrapper sets the flags), stages without training, and ledgers that list no
    trainable parameters (written before the list existed).

    Example:
        >>> from types import SimpleNamespace
        >>> import torch
        >>> m = torch.nn.Linear(2, 1)
        >>> stage = SimpleNamespace(trainable_parameters=["bias"], lora=None, num_steps=3, learning_rates=[0.1] * 3)
        >>> match_recorded_trainables(m, stage)
        >>> m.weight.requires_grad, m.bias.requires_grad
        (False, True)
    """
    names = set(getattr(stage, "trainable_parameters", None) or ()) - set(getattr(stage, "changed_without_grad", ()))
    if not names or getattr(stage, "lora", None) or not (stage.num_steps and stage.learning_rates):
        return
    for name, param in base_parameters(model).items():
        param.requires_grad_(name in names)


#: stage kinds and TRL objectives that generate their training data inside ``training_step`` (skipping it changes
#: later steps' data): GRPO, RLOO, PPO, OnlineDPO, GKD and DistillationTrainer (on-policy completions)
NO_GRADIENT_REUSE = ("grpo", "rloo", "ppo", "online_dpo", "gkd", "distillation")


def with_gradient_reuse(trainer_cls: type, grad_every: int, start: int = 0) -> type:
    """A subclass of ``trainer_cls`` (a ``transformers.Trainer`` or TRL trainer) whose training step runs the forward
    and backward pass only on optimizer steps ``t`` with ``(t - start) % grad_every == 0``; on the steps in between
    it puts that step's gradient back (as clipped) and returns a zero loss, so the optimizer, the learning-rate
    schedule, clipping and the data order run as recorded. ``grad_every=1`` returns ``trainer_cls`` itself.

    The gradient-reuse form of a stage function that builds a Trainer (the strided replay of
    ``estimators.strided_replay``); its memory is one extra copy of the trainable parameters' gradients. Not for
    trainers that generate inside the training step (GRPO, RLOO: their buffers would skip a generation).

    Example:
        >>> from transformers import Trainer
        >>> with_gradient_reuse(Trainer, 1) is Trainer, with_gradient_reuse(Trainer, 4).__name__
        (True, 'GradientReuseTrainer')
    """
    every = int(grad_every)
    if every < 1:
        raise ReplayError(f"`grad_every` must be a positive number of optimizer steps, got {grad_every!r}.")
    if every == 1:
        return trainer_cls

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        step = int(self.state.global_step)
        cached = getattr(self, "_hsa_reused_grads", None)
        if (step - start) % every == 0 or cached is None:
            loss = trainer_cls.training_step(self, model, inputs, num_items_in_batch)
            # references, not copies: clipping scales them in place (the gradient the optimizer used) and
            # zero_grad() drops them from the parameters without touching the tensors
            self._hsa_reused_grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]
            return loss
        if getattr(self, "_hsa_restored_at", None) != step:
            for param, grad in cached:
                param.grad = grad.clone()
            self._hsa_restored_at = step
        return torch.zeros((), device=self.args.device)

    return type(f"GradientReuse{trainer_cls.__name__}", (trainer_cls,), {"training_step": training_step})


def stop_after_steps_callback(max_steps: int, start: int = 0, optimizer_out: dict | None = None) -> Any:
    """A ``TrainerCallback`` that stops training once ``state.global_step`` reaches ``start + max_steps`` (without
    touching ``max_steps`` in the arguments, so the learning-rate schedule is the whole stage's), and on stopping puts
    the optimizer's state by base parameter name into ``optimizer_out`` (see :func:`optimizer_state_by_name`).

    It turns a stage function that accepts Trainer callbacks into the step-limited form partial replay needs
    (``estimators.replay.run_stage`` adds it to such a function's ``callbacks`` itself); its ``stopped_at`` attribute
    is the step it stopped the training at, ``None`` while it has not fired.

    Example (a stage function in the step-limited form)::

        def fn(model, max_steps=None):
            callbacks = [] if max_steps is None else [stop_after_steps_callback(max_steps)]
            Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks).train()
            return model
    """
    from transformers import TrainerCallback

    class _StopAfterSteps(TrainerCallback):
        stopped_at: int | None = None  # the step it stopped the training at (None: it never fired)

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step >= start + max_steps:
                control.should_training_stop = True
                self.stopped_at = int(state.global_step)
                if optimizer_out is not None and model is not None:
                    optimizer_out.update(optimizer_state_by_name(model, optimizer))
            return control

    return _StopAfterSteps()


def optimizer_state_by_name(model: Any, optimizer: Any, copy: bool = True) -> dict[str, dict[str, Any]]:
    """``{base parameter name: {state key: CPU tensor copy}}`` of ``optimizer`` (torch or accelerate-wrapped) for
    the parameters of ``model`` it holds state for; ``{}`` without an optimizer. ``copy=False`` shares the CPU
    tensors instead (for an optimizer that is dropped right after: a copy would only double the moments' memory).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> sorted(optimizer_state_by_name(model, opt)["weight"])
        ['momentum_buffer']
    """
    state = getattr(optimizer, "state", None)
    if not state:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, param in base_parameters(model).items():
        entry = state.get(param) if hasattr(state, "get") else None
        if entry:
            out[name] = {k: (v.detach().to("cpu", copy=copy) if hasattr(v, "detach") else v) for k, v in entry.items()}
    return out


def _check_collator(stage: Stage, info: dict, trainer: Any, rebuilt: bool) -> None:
    entry = info.get("collator")
    if rebuilt or not entry or "class" not in entry:
        return
    found = type(getattr(trainer, "data_collator", None)).__qualname__
    if found != entry["class"]:
        raise ReplayError(
            f"Stage {stage.name!r} was trained with the data collator {entry['class']}, but the rebuilt trainer uses "
            f"{found}. Pass `data_collator=` to replay_trainer_stage."
        )
