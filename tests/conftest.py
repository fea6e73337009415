"""Shared fixtures: offline by construction, one thread, temporary HF caches."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

#: The libraries the package plugs into: the end of every test run names their releases.
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub", "safetensors")


def pytest_terminal_summary(terminalreporter) -> None:
    """The releases the tests ran against, just before the short summary: CI installs the newest releases that
    ``pyproject.toml`` allows, so a failure that a new release caused names it (peft 0.22 stopped raising a
    deprecation that a test recorded, 2026-12-07)."""
    from importlib.metadata import PackageNotFoundError, version

    def release(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    terminalreporter.write_sep("-", "libraries")
    terminalreporter.write_line(" ".join(f"{name}=={release(name)}" for name in LIBRARIES))


@pytest.fixture(autouse=True)
def _offline_hf_home(tmp_path_factory, monkeypatch):
    """Every test gets an empty HF cache and the hub in offline mode (huggingface_hub's own habit)."""
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
