"""Files of a report: atomic writes (temporary file + ``os.replace``) and reading a report's JSON safely."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ..errors import ReportError, StageAttributionError

_KNOWN_KEYS = {
    "format", "format_version", "rows", "stages", "behaviors", "estimator", "estimator_reason", "approximations",
    "diagnostics", "fidelity", "ledger", "versions", "interval",
}  # fmt: skip


def atomic_write_bytes(path: Path, data: bytes, error_cls: type[StageAttributionError] = ReportError) -> bool:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    A crash leaves either the old file or the new one, never a half-written file. An existing file keeps its
    permission bits. Returns False (and writes nothing) when the file already holds exactly ``data``.
    """
    path = Path(path)
    try:
        if path.is_file() and path.read_bytes() == data:
            return False
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise error_cls(
            f"Cannot write {path}: {exc.strerror or exc}. Expected an existing, writable directory; nothing was "
            "changed."
        ) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise error_cls(f"Cannot write {path}: {exc.strerror or exc}; any previous file is unchanged.") from exc
    return True


def _reject_constant(name: str) -> Any:
    raise ReportError(f"Expected finite numbers in the report JSON, found {name}: regenerate the report.")


def load_report_dict(path_or_str: str | Path, fmt: str, version: int) -> dict[str, Any]:
    """The dict of a report JSON (a path, or the JSON text itself), checked for its format and version."""
    if isinstance(path_or_str, Path) or not str(path_or_str).lstrip().startswith("{"):
        path = Path(path_or_str)
        if not path.is_file():
            raise ReportError(
                f"Expected a report JSON file at {path}, found none. Pass the `stage_attribution.json` (or "
                "`report.json`) written by `hf-stage-attribution attribute`, or the JSON text itself."
            )
        text = path.read_text(encoding="utf-8")
    else:
        text = str(path_or_str)
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ReportError(f"Expected report JSON, got invalid JSON ({exc}). Regenerate the report.") from exc
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ReportError(f"Expected a report with format {fmt!r}, found {found!r}: this is not a stage report.")
    found_version = data.get("format_version")
    if not isinstance(found_version, int) or found_version < 1:
        raise ReportError(f"Expected an integer report format_version >= 1, found {found_version!r}.")
    if found_version > version:
        raise ReportError(
            f"This report has format_version {found_version}, newer than the {version} this version of "
            "hf-stage-attribution reads: upgrade hf-stage-attribution."
        )
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        warnings.warn(f"Ignoring unknown report keys {unknown} (written by a newer version?).", stacklevel=3)
        data = {k: v for k, v in data.items() if k in _KNOWN_KEYS}
    return data
