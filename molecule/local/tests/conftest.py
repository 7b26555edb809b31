"""Markers of the local scenario's checks."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "uninstalled: checks after make uninstall (side_effect.yml runs them)"
    )
