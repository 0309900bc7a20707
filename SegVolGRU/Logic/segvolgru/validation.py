"""Checks of plain values that enter from files, the API, MRML and the command line: voxel spacing, click
polarity, setting types, counts.

(Boxes and points are checked against a volume in :mod:`segvolgru.prompts`.)
"""
from __future__ import annotations

import argparse
import math
import numbers

import numpy as np

from .errors import InputError


def validate_spacing(spacing, source: str = "spacing") -> tuple[float, float, float]:
    """Three finite positive voxel sizes in mm, per array axis (K, J, I); InputError otherwise."""
    try:
        raw = list(np.ravel(np.asarray(spacing, dtype=object)))
        numeric = all(isinstance(s, (numbers.Real, np.floating, np.integer)) and not isinstance(s, (bool, np.bool_))
                      for s in raw)
        values = tuple(float(s) for s in raw) if numeric else ()
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise InputError(f"{source} {spacing!r} is not three finite positive millimetre values: give the voxel "
                         "size per array axis (K, J, I), e.g. (2.5, 0.8, 0.8)")
    return values  # type: ignore[return-value]


def as_polarity(value, click: str) -> bool:
    """A click's polarity: True/False (numpy's too) or the integers 1/0; anything else, such as the string
    "false", raises InputError naming ``click``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise InputError(f"{click}: 'positive' must be true or false (or 1 / 0), got {value!r}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


_KINDS = {
    "bool": lambda v: isinstance(v, (bool, np.bool_)),
    "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)),
    "float": _real,
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
    "tuple[float, float]": lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_real, v)),
}

_WORDS = {"bool": "True or False", "int": "an integer", "float": "a finite number", "str": "a string",
          "None": "None", "tuple[float, float]": "a pair of finite numbers"}


def check_setting(name: str, value, annotation: str) -> None:
    """Raise InputError unless ``value`` has a type of ``annotation`` ("float | None", "bool", ... as a dataclass
    field declares it; a float setting takes any finite real number, a bool setting only True or False)."""
    kinds = [kind.strip() for kind in annotation.split("|")]
    if not any(_KINDS[kind](value) for kind in kinds):
        raise InputError(f"invalid session setting {name}={value!r}: it must be "
                         f"{' or '.join(_WORDS[kind] for kind in kinds)}")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (thread counts), so that a bad one is a usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above zero (learning rates, minutes)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number above zero")
    return value


def add_correction_argument(parser) -> None:
    """``--correction default|none|FILE`` for the commands that load a model (argparse)."""
    parser.add_argument("--correction", default="default", metavar="default|none|FILE",
                        help="click corrector: default (the weights' own, else the shipped correction.pt), none, or "
                             "a corrector file")


def correction_choice(value: str) -> str | None:
    """The ``correction`` argument of ``load_model`` for a ``--correction`` value."""
    return None if value == "none" else value
