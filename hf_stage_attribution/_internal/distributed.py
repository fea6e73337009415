"""The process world: closing a torch.distributed process group so that the process exits cleanly, and running a
replayed training as a single-process run inside a multi-process world (:func:`single_process_world`)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

#: Environment variables that make accelerate (``PartialState``, ``get_cpu_distributed_information``) or transformers
#: (``TrainingArguments``) set up a multi-process run: the ranks and world sizes of torchrun / ``accelerate launch``,
#: of MPI launchers, and accelerate's launcher switches for sharded training. :func:`single_process_world` hides them.
LAUNCHER_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
    "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE",
    "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_MEGATRON_LM",
)  # fmt: skip

#: depth of :func:`single_process_world` blocks this process is inside (the world looks like one process there)
_ISOLATED = [0]


def process_group_initialized() -> bool:
    """Whether a torch.distributed process group exists, without importing torch when nothing has.

    Example:
        >>> process_group_initialized()
        False
    """
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def close_process_group() -> bool:
    """Destroy the default process group, first freeing the objects that still hold it; whether there was one.

    ``torch.distributed.destroy_process_group`` only drops the registry's references. A DDP-wrapped model that a
    reference cycle keeps alive (a finished ``Trainer`` is one) still holds gloo's process group, which is then
    destroyed during interpreter shutdown, where its threads can abort the process ("terminate called without an
    active exception", SIGABRT, seen on about 1 run in 10 of a 2-process recording under load). A full collection
    first destroys it while the interpreter is alive.

    Example:
        >>> close_process_group()  # no process group in this process: nothing to do
        False
    """
    if not process_group_initialized():
        return False
    gc.collect()
    sys.modules["torch.distributed"].destroy_process_group()
    return True


def is_main_process() -> bool:
    """Whether this process writes shared files (a card, a report): rank 0 of an initialised torch.distributed
    process group; else rank 0 by the launcher's ``RANK`` (or ``LOCAL_RANK``) environment variable, as torchrun and
    ``accelerate launch`` set it; else the main process of accelerate's state when something initialised one; else
    True. Creates no distributed state (a plain ``PartialState()`` on CPU sees one process on every rank, and each
    would write).

    Example:
        >>> is_main_process()
        True
    """
    if process_group_initialized():  # torch.distributed is imported then: no import (or torch) needed here
        return sys.modules["torch.distributed"].get_rank() == 0
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value.lstrip("-").isdigit():
            return int(value) == 0
    state = sys.modules.get("accelerate.state")
    partial_state = getattr(state, "PartialState", None)
    if partial_state is not None and partial_state._shared_state:  # initialised by the caller: its answer
        return bool(partial_state().is_main_process)
    return True


def world_size() -> int:
    """The number of processes of the current world: the process group's size when there is one, else the launcher's
    ``WORLD_SIZE`` (1 without one); 1 inside :func:`single_process_world`.

    Example:
        >>> world_size()
        1
    """
    if _ISOLATED[0]:
        return 1
    if process_group_initialized():
        return int(sys.modules["torch.distributed"].get_world_size())
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def replays_alone(recorded_world_size: Any) -> bool:
    """Whether a training recorded in a world of ``recorded_world_size`` processes (``None``: not recorded, taken as
    1) must be replayed as a single-process run here (:func:`single_process_world`): the current world has more than
    one process and a different size. Each process of a multi-process attribution replays its own stages' later stages
    whole, so a replay of a 1-process recording must not be spread over the processes;
    a recording made in a world of the current size replays in that world, as it was trained.

    Example:
        >>> replays_alone(1), replays_alone(None)  # one process here: nothing to isolate
        (False, False)
    """
    try:
        recorded = int(recorded_world_size or 1)
    except (TypeError, ValueError):
        recorded = 1
    current = world_size()
    return current > 1 and recorded != current


def _accelerate_state_classes() -> list[type]:
    state = sys.modules.get("accelerate.state")
    if state is None:  # accelerate not imported yet: importing it here is what any Trainer would do anyway
        try:
            import accelerate.state as state
        except ImportError:
            return []
    classes = [getattr(state, name, None) for name in ("PartialState", "AcceleratorState", "GradientState")]
    return [cls for cls in classes if isinstance(cls, type) and "_shared_state" in vars(cls)]


def _swap_shared_state(cls: type) -> Any:
    """Give ``cls`` (an accelerate Borg class) a fresh, empty shared state; returns what to restore. The original
    dict is left untouched: existing instances (the attributor's ``PartialState``) keep using it."""
    raw = vars(cls)["_shared_state"]
    if isinstance(raw, dict):  # accelerate's ``SharedDict`` is a plain dict without torch_xla
        cls._shared_state = {}
        return raw
    storage = raw._storage  # ThreadLocalSharedDict (torch_xla): a descriptor around the dict
    raw._storage = {}
    return storage


def _restore_shared_state(cls: type, saved: Any) -> None:
    raw = vars(cls)["_shared_state"]
    if isinstance(raw, dict):
        cls._shared_state = saved
    else:
        raw._storage = saved


@contextlib.contextmanager
def single_process_world() -> Iterator[None]:
    """Inside the block, accelerate and transformers see a single process: a ``Trainer`` built there neither wraps
    the model in DDP nor splits its data across the processes, even in a torchrun / ``accelerate launch`` world.

    Accelerate's process state is a set of Borg singletons (``PartialState``, ``AcceleratorState``,
    ``GradientState``). Their shared state is swapped for fresh empty dicts for the block (the original dicts are not
    cleared: the state objects made before, such as the attributor's ``PartialState``, keep working and are back
    for new instances on exit — ``TrainingArguments`` resets the shared state in place, which inside the block only
    clears the fresh dicts), and the launcher's environment variables (:data:`LAUNCHER_ENV`) are hidden. Everything
    comes back on exit, also on error; the torch.distributed process group is not touched (no collective runs in
    the block unless the code inside calls one itself). Nested blocks are a no-op. On an accelerator the block's
    ``Trainer`` uses the first device (``cuda:0``); the current device is restored on exit.

    Example:
        >>> import os
        >>> from accelerate import PartialState
        >>> os.environ["WORLD_SIZE"] = "2"
        >>> with single_process_world():
        ...     "WORLD_SIZE" in os.environ, PartialState(cpu=True).num_processes, world_size()
        (False, 1, 1)
        >>> os.environ.pop("WORLD_SIZE")
        '2'
    """
    if _ISOLATED[0]:
        yield
        return
    classes = _accelerate_state_classes()
    hidden = {name: os.environ[name] for name in LAUNCHER_ENV if name in os.environ}
    torch = sys.modules.get("torch")
    cuda_device = torch.cuda.current_device() if torch is not None and torch.cuda.is_initialized() else None
    # "process group is initialized, but parallel_mode != DISTRIBUTED": exactly what the block is for
    args_logger = logging.getLogger("transformers.training_args")
    level = args_logger.level
    saved: list[tuple[type, Any]] = []
    entered = False
    try:
        for cls in classes:
            saved.append((cls, _swap_shared_state(cls)))
        for name in hidden:
            del os.environ[name]
        args_logger.setLevel(logging.ERROR)
        _ISOLATED[0] += 1
        entered = True
        yield
    finally:
        if entered:
            _ISOLATED[0] -= 1
        args_logger.setLevel(level)
        for name in LAUNCHER_ENV:  # what the block's code set for them goes; the launcher's values come back
            if name in hidden:
                os.environ[name] = hidden[name]
            else:
                os.environ.pop(name, None)
        for cls, state in reversed(saved):
            _restore_shared_state(cls, state)
        if cuda_device is not None and torch.cuda.current_device() != cuda_device:
            torch.cuda.set_device(cuda_device)
