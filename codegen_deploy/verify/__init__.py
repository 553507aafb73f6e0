"""Checks against the reference: export validation, parity between two sessions, Polygraphy comparison."""

from .parity import Tolerance, compare_sessions

__all__ = ["Tolerance", "compare_sessions"]
