"""Argument checks shared by the public functions: each names the bad parameter."""

from __future__ import annotations

import numpy as np


def is_integer(value) -> bool:
  """Whether `value` is a Python or numpy integer (a bool is not)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(name: str, value) -> int:
  """`value` as an `int` if it is a Python or numpy integer above 0 (not a bool,
  not a float that happens to be whole); else a ValueError naming `name`."""
  if not is_integer(value) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def nonnegative_int(name: str, value) -> int:
  """`value` as an `int` if it is a Python or numpy integer of at least 0."""
  if not is_integer(value) or value < 0:
    raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
  return int(value)
