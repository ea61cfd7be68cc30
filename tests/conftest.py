"""Shared test set-up: every test runs in its own temporary working directory, so nothing a test (or Lightning,
or LightningCLI's saved config.yaml) writes by default lands in the repository."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
