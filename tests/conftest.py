"""Shared pytest setup: makes the `support` harness package importable.

The integration fixtures live in tests/integration/conftest.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
