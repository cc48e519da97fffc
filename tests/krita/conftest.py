"""Fixtures for the real-Krita tests (helpers live in harness.py)."""

from __future__ import annotations

import pytest

from .harness import krita_missing


@pytest.fixture(scope="module")
def krita_required():
    reason = krita_missing()
    if reason:
        pytest.skip(reason)
