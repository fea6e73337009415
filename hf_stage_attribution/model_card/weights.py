"""Are the weights beside a model card the model its accountability section attributes?

A report names the final model of the ledger it attributes: ``report.ledger["final_digests"]``, the per-tensor
digests the recorder took at the end of the last stage (sha256 of each effective parameter's float32 values; a
LoRA stage's digest is of the merged weight). A card written into a model folder that holds other weights (the model
trained further without recording, a report of another run) would publish claims about a model nobody attributed.
:func:`check_card_weights` reads the folder's ``model.safetensors`` (or its ``model-XXXXX-of-YYYYY.safetensors``
shards) tensor by tensor and compares every tensor whose name the report knows with the recorded digest.

Weights saved in half precision (``model.to(torch.bfloat16).save_pretrained(...)`` of float32 weights, as models are
often published) round every value, so they hash otherwise without any training: they are compared with
``report.ledger["final_digests_rounded"]``, the digests of the attributed model rounded to bfloat16 and float16 (of
a half-precision model attributed itself, its own tensors; ``_internal/params.rounded_digests``: the attributor adds
them, at about 2 s for 135M parameters). Weights that were half precision when recorded, such as an imported bfloat16
checkpoint, hash as recorded.

What it cannot check, it says so rather than guess: tensors saved in half precision that match neither (the attributed
model rounded another way, or another model: the rounded values alone cannot tell), or with no rounded digests in the
report (built from a ledger without the model, or by a version before 2026-12-07), a folder with only a PEFT adapter
(``adapter_model.safetensors``: the base weights are elsewhere) or only ``pytorch_model.bin`` (never unpickled), and
a report without digests (built from effects alone, or written by a version before 2026-12-07).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> from hf_stage_attribution._internal.hashing import tensor_digest
    >>> folder, w = Path(tempfile.mkdtemp()), torch.ones(2, 2)
    >>> save_file({"w": w}, folder / "model.safetensors")
    >>> check_card_weights(folder, {"final_digests": {"w": tensor_digest(w)}}).summary()
    'the weights beside the card are the attributed model: 1 of 1 tensors match its recorded digests'
    >>> check_card_weights(folder, {"final_digests": {"w": tensor_digest(w + 1e-3)}}).differ
    ['w']
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._internal.hashing import combine_digests, files_identity, tensor_digest
from ..errors import LedgerFormatError, ModelCardError
from ..ledger.storage import open_safetensors

#: the weight files of a ``save_pretrained`` folder: one file, or shards named by transformers' convention
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
#: ``{(weight files with their identities, combined recorded digests): WeightsCheck}`` of the folders checked in this
#: process: ``KeepStageAttributionSection`` writes the card at every save, and hashing unchanged weights again cost
#: SmolLM2-135M about 1 s per write (a 7B model ≈ a minute). Weight files written again, replaced or removed check
#: again.
_CHECKED: dict[tuple, WeightsCheck] = {}
#: the escape named by every error below, as the API and the CLI spell it
ALLOW = "allow_other_weights=True (CLI: --allow-other-weights)"


@dataclass
class WeightsCheck:
    """What :func:`check_card_weights` found in ``folder``: tensors that ``match`` the recorded digests (``rounded`` of
    them saved in the half-precision dtypes ``rounded_dtypes`` and matching the attributed model rounded to them), the
    names that ``differ``, how many known tensors were ``unchecked`` (saved in a rounded dtype that could not be
    compared), the ``files`` read and those that were ``unreadable`` (not a safetensors file this package can parse:
    never a reason to refuse).

    Example:
        >>> WeightsCheck(Path("m"), ["model.safetensors"], matched=3).summary()
        'the weights beside the card are the attributed model: 3 of 3 tensors match its recorded digests'
    """

    folder: Path
    files: list[str]
    matched: int = 0
    rounded: int = 0
    rounded_dtypes: set[str] = field(default_factory=set)
    differ: list[str] = field(default_factory=list)
    unchecked: int = 0
    unchecked_dtypes: set[str] = field(default_factory=set)
    unreadable: list[str] = field(default_factory=list)

    @property
    def checked(self) -> int:
        return self.matched + len(self.differ)

    def summary(self) -> str:
        """One sentence for the console (and, for other weights, the card)."""
        if self.differ:
            shown = ", ".join(repr(n) for n in self.differ[:3]) + (", …" if len(self.differ) > 3 else "")
            return (
                f"the weights beside the card are not the attributed model: {len(self.differ)} of {self.checked} "
                f"tensors differ from its recorded digests ({shown})"
            )
        unread = f"{', '.join(self.unreadable)} could not be read" if self.unreadable else ""
        if not self.checked:
            why = (
                f"saved as {', '.join(sorted(self.unchecked_dtypes))}, not float32: rounded, so not comparable"
                if self.unchecked
                else unread or "no tensor there has the name of an attributed parameter"
            )
            return f"the weights beside the card could not be checked against the attributed model ({why})"
        extra = ""
        if self.rounded:
            dtypes = ", ".join(sorted(self.rounded_dtypes))
            extra = f" ({self.rounded} saved as {dtypes}: compared with the attributed model rounded to {dtypes})"
        extra += f"; {self.unchecked} more saved in another dtype were not checked" if self.unchecked else ""
        extra += f"; {unread}" if unread else ""
        return (
            f"the weights beside the card are the attributed model: {self.matched} of {self.checked} tensors match "
            f"its recorded digests{extra}"
        )


def weight_files(folder: Path) -> list[Path]:
    """The ``save_pretrained`` safetensors weight files directly in ``folder`` (sorted; symlinks are not read)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if WEIGHT_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink())


def check_card_weights(folder: str | Path, ledger: Mapping[str, Any] | None) -> WeightsCheck | None:
    """Compare the weights in ``folder`` with the final model a report's ``ledger`` summary names.

    Returns None when there is nothing to compare: no weight file in ``folder`` (see :data:`WEIGHT_FILE`), or no
    ``final_digests`` in ``ledger``. Streams one tensor at a time. The recorded digests are of float32 values: a
    float32 (or float64) tensor that hashes otherwise differs; a half-precision one that hashes the same (a model
    trained, or a checkpoint imported, in that precision) matches, and one that hashes otherwise is only
    ``unchecked`` (the recorded value rounded for the save looks the same). A file that cannot be parsed is listed in
    ``unreadable``, not read further (and never unpickled). Unchanged weight files are read once per process for
    the same digests (:data:`_CHECKED`).
    """
    folder = Path(folder)
    digests = (ledger or {}).get("final_digests")
    files = weight_files(folder)
    if not files or not isinstance(digests, Mapping) or not digests:
        return None
    rounded = _rounded_digests((ledger or {}).get("final_digests_rounded"))
    key = (
        files_identity(files),
        combine_digests({str(k): str(v) for k, v in digests.items()}),
        tuple((dtype, combine_digests(values)) for dtype, values in sorted(rounded.items())),
    )
    if key in _CHECKED:
        found = copy.deepcopy(_CHECKED[key])
        found.folder = folder
        return found
    check = WeightsCheck(folder, [p.name for p in files])
    for path in files:
        try:
            reader = open_safetensors(path)
            for name in reader.keys():
                if name not in digests:
                    continue
                dtype, _ = reader.info(name)
                found = tensor_digest(reader.get_tensor(name))
                dtype_name = _DTYPE_NAMES.get(dtype, dtype.lower())
                if found == digests[name]:
                    check.matched += 1
                elif dtype in ("F32", "F64"):
                    check.differ.append(name)
                elif found == rounded.get(dtype_name, {}).get(name):  # the attributed model, rounded for the save
                    check.matched += 1
                    check.rounded += 1
                    check.rounded_dtypes.add(dtype_name)
                else:  # rounded otherwise: another value may be the recorded one rounded, or another model's
                    check.unchecked += 1
                    check.unchecked_dtypes.add(dtype_name)
        except LedgerFormatError:
            check.unreadable.append(path.name)
    if files_identity(files) == key[0]:  # nothing was written meanwhile
        _CHECKED[key] = copy.deepcopy(check)
    return check


def require_attributed_weights(check: WeightsCheck | None, allow_other_weights: bool) -> None:
    """ModelCardError when ``check`` found weights that differ from the attributed model, unless
    ``allow_other_weights`` (then the section says so: :func:`weights_note`)."""
    if check is None or not check.differ or allow_other_weights:
        return
    raise ModelCardError(
        f"Expected the weights in {check.folder} to be the model the report attributes (the final model of its "
        f"ledger), found that {check.summary().split(': ', 1)[1]}. The model was changed after it was recorded "
        "(trained further, edited), or the report is of another run: attribute this model (record its later "
        "stages in the ledger and attribute again), or write the card beside the attributed model. Pass "
        f"{ALLOW} to write it here anyway (the section then says the weights differ); nothing was written."
    )


def weights_note(check: WeightsCheck | None) -> str | None:
    """The sentence the card section carries when it is written beside weights that differ (None otherwise)."""
    if check is None or not check.differ:
        return None
    return (
        f"Caution: {check.summary()}. Everything below describes the model the ledger recorded, not the weights "
        "published with this card."
    )


_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16"}


def _rounded_digests(value: Any) -> dict[str, dict[str, str]]:
    """``report.ledger["final_digests_rounded"]`` as ``{dtype name: {tensor name: digest}}`` of strings; anything
    else in a report read from disk (hand-edited, another version) is no rounded digest, not an error: those tensors
    are then only unchecked."""
    if not isinstance(value, Mapping):
        return {}
    return {
        str(dtype): {str(k): str(v) for k, v in values.items()}
        for dtype, values in value.items()
        if isinstance(values, Mapping)
    }
