"""The output folder of an intervention: which files in it belong to a saved model or an earlier intervention, when
it may be written into, and writing it whole or not at all.

Everything is first written into a hidden sibling folder ``.<name>.partial-*``; a new output folder is that folder
renamed into place, an existing one (with ``overwrite``) receives its files at the end, and the files of the earlier
intervention that the new one does not write are removed then. A save that is killed part way leaves only the hidden
folder, which no later save reads or trips over.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "notes.txt").write_text("mine")
    >>> check_output_folder(folder, overwrite=False)  # other files are fine
    >>> _ = (folder / "model.safetensors").write_bytes(b"theirs")
    >>> check_output_folder(folder, overwrite=False)
    Traceback (most recent call last):
    ...
    hf_stage_attribution.errors.InterventionError: ... already holds a saved model or an intervention's files ...
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import InterventionError
from .card import SECTION_BEGIN, SECTION_END

SWEEP_JSON = "intervention.json"
SWEEP_PLOT = "intervention_sweep.png"
README = "README.md"
# what save_pretrained (model, adapter, tokenizer) and an intervention write: a folder holding any of these is refused
SAVED_FILES = (
    README, SWEEP_JSON, SWEEP_PLOT, "config.json", "generation_config.json", "adapter_config.json", "*.safetensors",
    "*.bin", "*.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "chat_template.*", "*.model",
)  # fmt: skip
RESULT_FORMAT = "hf-stage-attribution/intervention"


def saved_files(out: Path) -> list[str]:
    """The names of the files in ``out`` that a saved model or an intervention writes (see :data:`SAVED_FILES`)."""
    if not out.is_dir():
        return []
    return sorted(
        p.name
        for p in out.iterdir()
        if not p.is_dir() and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in SAVED_FILES)
    )


def _text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _is_our_card(path: Path) -> bool:
    text = _text(path)
    if text is None or text.count(SECTION_BEGIN) != 1 or text.count(SECTION_END) != 1:
        return False
    return text.index(SECTION_BEGIN) < text.index(SECTION_END)


def _is_our_sweep(path: Path) -> bool:
    try:
        return json.loads(_text(path) or "").get("format") == RESULT_FORMAT
    except (ValueError, AttributeError):
        return False


def check_output_folder(out: str | Path, overwrite: bool, option: str = "overwrite=True") -> None:
    """Refuse (an :class:`InterventionError`; nothing written) an output folder that is a file, or that holds a saved
    model's or an intervention's files (:data:`SAVED_FILES`) unless ``overwrite``. Even with ``overwrite``, a
    ``README.md`` without this package's intervention section and an ``intervention.json`` of another kind are
    refused: they are someone else's. ``option`` names the switch in the message (the CLI's ``--overwrite``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InterventionError(
            f"Expected the output folder {out} to be a directory (existing or new), found a file. Choose another "
            "directory; nothing was written."
        )
    found = saved_files(out)
    if found and not overwrite:
        listing = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise InterventionError(
            f"{out} already holds a saved model or an intervention's files ({listing}); expected a new folder or one "
            f"without such files. Choose another directory, or pass {option} to replace an intervention this package "
            "saved there; nothing was written."
        )
    readme, sweep = out / README, out / SWEEP_JSON
    if README in found and not _is_our_card(readme):
        raise InterventionError(
            f"Expected {readme} to be absent or a card this package wrote (one '{SECTION_BEGIN}' … '{SECTION_END}' "
            f"section), found another card, which {option} does not replace. Move it away or choose another "
            "directory; nothing was written."
        )
    if SWEEP_JSON in found and not _is_our_sweep(sweep):
        raise InterventionError(
            f"Expected {sweep} to be absent or an intervention result ({RESULT_FORMAT}), found another file, which "
            f"{option} does not replace. Move it away or choose another directory; nothing was written."
        )


def leftover_partials(out: Path, own: Path | None = None) -> list[Path]:
    """Hidden ``.<name>.partial-*`` folders beside ``out`` that an interrupted save left (other than ``own``)."""
    if not out.parent.is_dir():
        return []
    prefix = f".{out.name}.partial-"
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and p != own)


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A new hidden folder beside ``out`` to write into; removed (with everything in it) when the body fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    mask = os.umask(0o022)
    os.umask(mask)
    with contextlib.suppress(OSError):
        partial.chmod(0o777 & ~mask)  # mkdtemp's 0700 would hide the saved model from a shared team
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def install(partial: Path, out: Path) -> None:
    """Put the files of ``partial`` in place as ``out``: a rename when ``out`` is new; otherwise each file moved in
    (the card and the sweep JSON last), then the earlier intervention's files the new one did not write removed."""
    if not out.exists():
        os.rename(partial, out)
        return
    new = sorted(partial.iterdir(), key=lambda p: (p.name in (README, SWEEP_JSON), p.name))
    stale = [name for name in saved_files(out) if name not in {p.name for p in new}]
    for path in new:
        os.replace(path, out / path.name)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(partial, ignore_errors=True)


__all__ = [
    "README",
    "SAVED_FILES",
    "SWEEP_JSON",
    "SWEEP_PLOT",
    "check_output_folder",
    "install",
    "leftover_partials",
    "saved_files",
    "staged",
]
