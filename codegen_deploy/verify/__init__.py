"""Checks against the reference: export validation, parity between two sessions, Polygraphy comparison;
one Tolerance and one Report for all of them."""

from .parity import compare_sessions
from .report import Report, Row
from .tolerance import Tolerance, tolerance_for

__all__ = ["Report", "Row", "Tolerance", "compare_sessions", "tolerance_for"]
