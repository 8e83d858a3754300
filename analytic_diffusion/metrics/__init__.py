"""Metrics on samples and denoisers."""
from .memorization import MEMORIZATION_THRESHOLD, MemorizationReport, memorization

__all__ = ["MEMORIZATION_THRESHOLD", "MemorizationReport", "memorization"]
