"""Shared fixtures: offline by construction, one thread, temporary HF caches."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


def pytest_terminal_summary(terminalreporter) -> None:
    """The releases the tests ran against (those a ledger records, ``ledger.core.framework_versions``), just before
    the short summary: CI installs the newest releases that ``pyproject.toml`` allows, so a failure that a new release
    caused names it (peft 0.22 stopped raising a deprecation that a test recorded, 2026-12-07)."""
    terminalreporter.write_sep("-", "libraries")
    try:  # a package that does not import must not hide the short summary below
        from hf_stage_attribution.ledger.core import framework_versions

        line = " ".join(f"{name}=={version}" for name, version in framework_versions().items())
    except Exception as exc:  # noqa: BLE001
        line = f"unknown: the package does not import ({exc!r})"
    terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _offline_hf_home(tmp_path_factory, monkeypatch):
    """Every test gets an empty HF cache and the hub in offline mode (huggingface_hub's own habit)."""
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
