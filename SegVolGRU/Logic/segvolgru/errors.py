"""Error types the engine raises for bad input, so callers (panel, command line) can tell them apart.

Every message names the problem and says what to do about it.
"""
from __future__ import annotations


class SegVolGRUError(Exception):
    """Base class of the engine's own errors."""


class InputError(SegVolGRUError, ValueError):
    """A volume, prompt or file given by the user cannot be used as it is (command line exit code 2)."""


class WeightsError(SegVolGRUError):
    """Model weights are missing, unreadable, of another model or fail their checksum (exit code 3)."""


class InstallError(SegVolGRUError, RuntimeError):
    """A dependency is missing or could not be installed in Slicer; the message says what to install or upgrade."""
