"""Lay out folders as revisions of a repo in a Hugging Face cache, exactly as huggingface_hub stores downloads.

``models--<org>--<name>/blobs/<sha256>`` holds each file once, ``snapshots/<commit>/<path>`` links to the blobs and
``refs/<revision>`` names a commit. Tests, the recipe and the benchmark use it to import "Hub" revisions offline
(``HF_HUB_OFFLINE=1``) through the real huggingface_hub resolution.

Example:
    >>> import tempfile, pathlib
    >>> src = pathlib.Path(tempfile.mkdtemp()); (src / "config.json").write_text("{}")
    2
    >>> commits = lay_out_hub_cache(tempfile.mkdtemp(), "org/tiny", {"v1": src})
    >>> len(commits["v1"])
    40
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ..errors import CheckpointImportError
from ..ledger.storage import file_sha256


def lay_out_hub_cache(
    cache_dir: str | os.PathLike, repo_id: str, revisions: dict[str, str | os.PathLike], symlinks: bool = True
) -> dict[str, str]:
    """Store each folder of ``revisions`` (``{revision name: folder}``) as a commit of ``repo_id``; return the commits.

    A revision name that is itself a 40-hex commit hash is stored without a ref. ``symlinks=False`` copies files
    into the snapshots (what huggingface_hub does where symlinks are unavailable).
    """
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise CheckpointImportError(f"Expected a repo id 'org/name', got {repo_id!r}.")
    root = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    commits: dict[str, str] = {}
    for revision, folder in revisions.items():
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if not files:
            raise CheckpointImportError(f"Expected files to store as revision {revision!r}, found none in {folder}.")
        digests = {str(p.relative_to(folder)): file_sha256(p) for p in files}
        commit = hashlib.sha1("\n".join(f"{k}:{v}" for k, v in sorted(digests.items())).encode()).hexdigest()
        if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
            commit = revision
        for rel, blob in digests.items():
            blob_path = root / "blobs" / blob
            blob_path.parent.mkdir(parents=True, exist_ok=True)
            if not blob_path.exists():
                shutil.copyfile(folder / rel, blob_path)
            target = root / "snapshots" / commit / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() or target.is_symlink():
                target.unlink()
            if symlinks:
                target.symlink_to(os.path.relpath(blob_path, target.parent))
            else:
                shutil.copyfile(blob_path, target)
        if commit != revision:
            ref = root / "refs" / revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(commit)
        commits[revision] = commit
    return commits
