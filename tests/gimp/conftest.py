"""Fixtures for the real-GIMP tests: see gimp_harness.py."""

from gimp_harness import gimp_run  # noqa: F401  (the module-scoped fixture)
