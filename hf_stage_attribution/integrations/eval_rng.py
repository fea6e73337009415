"""The global random generators after each evaluation a recorded Trainer stage ran during training, and their
restore in its replay.

An evaluation during training (``eval_strategy="steps"``/``"epoch"``, ``eval_on_start``) draws from the global
random generators (creating its dataloader's iterator alone draws one torch number), and a replay runs no
evaluation: every later dropout mask, NEFTune noise and masked-LM mask of the replay would differ from the recorded
run's (tiny GPT-2 with dropout 0.1, an evaluation every 2 of 6 steps: the replay missed θ_K by 63 % of the largest
update). So :class:`EvalRngLog` keeps the states of the torch CPU, CUDA/XPU and MPS generators, numpy's and Python's
``random`` right after the last evaluation at each step, the recorder saves them beside the stage's replay data
(:data:`EVAL_RNG_FILE`, safetensors, named in ``replay.json`` as ``eval_rng``), and :func:`eval_rng_callback` puts
them back at the step's ``on_step_end`` in the replay (``on_train_begin`` for ``eval_on_start``): where the
evaluation would have run, since ``Trainer._maybe_log_save_evaluate`` follows ``on_step_end`` with no draw between.
A replay (whole, partial or counterfactual) then draws the recorded run's random stream.

Example:
    >>> import random, torch
    >>> states, unsaved = capture_rng_states()
    >>> a, b = torch.rand(2), random.random()
    >>> restore_rng_states(states)
    >>> bool((torch.rand(2) == a).all()), random.random() == b, unsaved
    (True, True, [])
"""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..ledger.storage import atomic_write_json, open_safetensors, read_json, write_safetensors
from .replay_data import REPLAY_FILE

EVAL_RNG_FILE = "eval_rng.safetensors"
#: accelerator generators saved per device (``torch.<name>.get_rng_state_all``)
_DEVICE_GENERATORS = ("cuda", "xpu")
#: accelerators whose generators are not saved (noted in the stage when one is in use)
_UNSAVED_DEVICES = ("npu", "hpu", "mlu", "musa")
#: replay directories whose missing generator states were already warned about in this process
_WARNED: set[str] = set()


def _available(name: str) -> bool:
    module = getattr(torch, name, None)
    try:
        return bool(module is not None and module.is_available())
    except Exception:  # noqa: BLE001  (a half-installed backend)
        return False


def capture_rng_states() -> tuple[dict[str, torch.Tensor], list[str]]:
    """The states of the global random generators as exact CPU tensors (names ``torch``, ``cuda.<i>``, ``xpu.<i>``,
    ``mps``, ``numpy.*``, ``python.*``), and the generators in use it cannot save (other accelerators)."""
    states: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    for name in _DEVICE_GENERATORS:
        if _available(name):
            for index, state in enumerate(getattr(torch, name).get_rng_state_all()):
                states[f"{name}.{index}"] = state.cpu()
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state().cpu()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    if kind == "MT19937":
        states["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64).copy())
        states["numpy.pos"] = torch.tensor([int(pos), int(has_gauss)], dtype=torch.int64)
        states["numpy.gauss"] = torch.tensor([float(cached)], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    states["python.state"] = torch.tensor([int(version), *internal], dtype=torch.int64)
    states["python.gauss"] = torch.tensor([math.nan if gauss_next is None else gauss_next], dtype=torch.float64)
    return states, [name for name in _UNSAVED_DEVICES if _available(name)]


def restore_rng_states(states: dict[str, torch.Tensor]) -> None:
    """Put back the generator states :func:`capture_rng_states` returned (an accelerator's only for the devices
    present here)."""
    torch.set_rng_state(states["torch"])
    for name in _DEVICE_GENERATORS:
        if _available(name):
            module = getattr(torch, name)
            for index in range(module.device_count()):
                if f"{name}.{index}" in states:
                    module.set_rng_state(states[f"{name}.{index}"], index)
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])
    if "numpy.keys" in states:
        pos, has_gauss = (int(v) for v in states["numpy.pos"].tolist())
        keys = states["numpy.keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, pos, has_gauss, float(states["numpy.gauss"][0])))
    if "python.state" in states:
        version, *internal = (int(v) for v in states["python.state"].tolist())
        gauss = float(states["python.gauss"][0])
        random.setstate((version, tuple(internal), None if math.isnan(gauss) else gauss))


class EvalRngLog:
    """The generator states after the last evaluation at each step of one recorded stage (``StageRecorder``).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from hf_stage_attribution.ledger.storage import atomic_write_json
        >>> folder = Path(tempfile.mkdtemp()); _ = atomic_write_json(folder / "replay.json", {"format": 1})
        >>> log = EvalRngLog(); log.capture(2); log.save(folder)
        >>> sorted(EvalRngLog.resume(folder, at_step=4).states), read_json(folder / "replay.json")["eval_rng"]["steps"]
        ([2], [2])
    """

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.unsaved: set[str] = set()  # generators in use that it cannot save
        self._pending = False  # states captured since the last save

    def capture(self, step: int) -> None:
        """Keep the generators' states now, after an evaluation at global step ``step`` (a later one replaces it)."""
        self.states[int(step)], unsaved = capture_rng_states()
        self.unsaved.update(unsaved)
        self._pending = True

    def save(self, replay_dir: Path) -> None:
        """Write the states to :data:`EVAL_RNG_FILE` in ``replay_dir`` and name it in its ``replay.json`` as
        ``eval_rng`` (nothing when no evaluation ran, or none since the last save)."""
        if not self._pending:
            return
        replay_dir = Path(replay_dir)
        tensors = {f"{step}/{name}": t for step, states in self.states.items() for name, t in states.items()}
        write_safetensors(replay_dir / EVAL_RNG_FILE, tensors)
        info = read_json(replay_dir / REPLAY_FILE, "replay file")
        info["eval_rng"] = {"file": EVAL_RNG_FILE, "steps": sorted(self.states)}
        atomic_write_json(replay_dir / REPLAY_FILE, info)
        self._pending = False

    def notes(self) -> list[str]:
        """Notes for ``stage.json`` about the generators in use whose states it could not keep."""
        if not self.unsaved:
            return []
        return [
            f"replay: the evaluations during training may have drawn from the random generators of "
            f"{sorted(self.unsaved)}, whose states the recorder cannot save (it saves torch CPU, CUDA, XPU, MPS, "
            "numpy and Python `random`): a replay runs no evaluation, so it is exact only if the training drew "
            "nothing from them."
        ]

    @classmethod
    def resume(cls, replay_dir: Path, at_step: int) -> EvalRngLog:
        """The states an interrupted recording saved in ``replay_dir`` up to global step ``at_step`` (where the run
        resumes: the Trainer checkpoint there holds the generators as they were after its evaluation)."""
        log = cls()
        path = Path(replay_dir) / REPLAY_FILE
        entry = read_json(path, "replay file").get("eval_rng") if path.exists() else None
        if entry:
            saved = load_eval_rng(Path(replay_dir), entry)
            log.states = {s: v for s, v in saved.items() if s <= at_step}
            log._pending = len(log.states) < len(saved)  # the file must drop the steps run again
        return log


def load_eval_rng(replay_dir: Path, entry: dict) -> dict[int, dict[str, torch.Tensor]]:
    """``{global step: generator states}`` from the file ``replay.json``'s ``eval_rng`` entry names."""
    handle = open_safetensors(Path(replay_dir) / str(entry["file"]))
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key in handle.keys():
        step, name = key.split("/", 1)
        out.setdefault(int(step), {})[name] = handle.get_tensor(key)
    return out


def recorded_evaluations(info: dict) -> str | None:
    """How a stage evaluated before its last step, read from its recorded arguments (``replay.json``), as a phrase;
    ``None`` when it did not (an evaluation at the last step changes no training step).

    Example:
        >>> recorded_evaluations({"args": {"eval_strategy": "steps", "eval_steps": 2}, "stage_steps": [0, 6]})
        "eval_strategy='steps' every 2 steps"
        >>> recorded_evaluations({"args": {"eval_strategy": "steps", "eval_steps": 6}, "stage_steps": [0, 6]}) is None
        True
    """
    args = info.get("args") or {}
    start, end = (list(info.get("stage_steps") or []) + [0, None])[:2]
    start, end = int(start or 0), int(end) if end is not None else None
    if args.get("eval_on_start"):
        return "eval_on_start=True"
    strategy = str(args.get("eval_strategy") or "no")
    if strategy == "epoch":
        one_epoch = int(args.get("max_steps") or -1) <= 0 and float(args.get("num_train_epochs") or 0) <= 1
        return None if one_epoch else "eval_strategy='epoch'"
    if strategy != "steps":
        return None
    every = float(args.get("eval_steps") or args.get("logging_steps") or 0)
    if every <= 0 or end is None:
        return None
    if every < 1:  # a fraction of the run's steps, as the Trainer reads it
        every = math.ceil(max(int(args.get("max_steps") or 0), end) * every)
    every = int(every)
    low = max(start + 1, math.ceil(float(args.get("eval_delay") or 0)), 1)
    first = math.ceil(low / every) * every
    return f"eval_strategy='steps' every {every} steps" if first < end else None


def eval_rng_callback(stage: Any, info: dict, replay_dir: Path) -> Any:
    """The ``TrainerCallback`` a replay of ``stage`` adds to put back the generator states recorded after its
    evaluations; ``None`` when it evaluated during no step. A stage that did evaluate but whose replay data hold no
    states (recorded before they were saved) gets ``None`` and a warning, once per stage and process."""
    entry = info.get("eval_rng")
    if not entry:
        how = recorded_evaluations(info)
        key = str(Path(replay_dir).resolve())
        if how is not None and key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"Stage {getattr(stage, 'name', '?')!r} evaluated during training ({how}); each evaluation drew from "
                "the global random generators (its dataloader alone draws one torch number), and its replay data "
                f"hold no generator states after them (no {EVAL_RNG_FILE}: recorded before they were saved), while a "
                "replay runs no evaluation. The replay is exact only if the training had no randomness (no dropout, "
                "NEFTune noise or random collator such as masked-LM masking); otherwise every later random draw "
                "differs. Record the stage again with this version to replay it exactly.",
                UserWarning,
                stacklevel=3,
            )
        return None
    from transformers import TrainerCallback

    states = load_eval_rng(Path(replay_dir), entry)

    class _RestoreEvalRng(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # eval_on_start ran right after it
            if int(state.global_step) in states:
                restore_rng_states(states[int(state.global_step)])
            return control

        def on_step_end(self, args, state, control, **kwargs):  # the recorded evaluation ran right after it
            if int(state.global_step) in states:
                restore_rng_states(states[int(state.global_step)])
            return control

    return _RestoreEvalRng()
