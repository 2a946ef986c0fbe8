"""Value checks shared by the library API and the entry points: each raises ValueError naming the bad value; and
one_line, an exception as one line of an error message."""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any



def one_line(error: BaseException) -> str:
    """An exception as `Type: first line of its message`."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise ValueError naming `name`, the bad `value` and the valid `choices`."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def check_int(name: str, value: Any, low: int) -> None:
    """Raise ValueError unless `value` is an integer >= low."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:  # numpy's too
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy's numbers too


def check_fraction(name: str, value: Any) -> None:
    """Raise ValueError unless `value` is a number in (0, 1]."""
    if not _is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1]; got {value!r}")


def check_unit_interval(name: str, value: Any) -> None:
    """Raise ValueError unless `value` is a number in [0, 1]."""
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]; got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise ValueError unless `value` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """Raise ValueError unless `value` is a finite number >= 0."""
    if not _is_number(value) or not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """Raise ValueError unless `value` is a finite number > 0."""
    if not _is_number(value) or not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse `type=`: the text as an integer >= low (check_int's bound), else argparse's usage error naming
    the bad text."""

    def parse(text: str) -> int:
        try:
            value = int(text)
            check_int("", value, low)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {text!r}") from None
        return value

    return parse


def positive_number(text: str) -> float:
    """An argparse `type=`: the text as a finite number > 0 (check_positive's bound), else argparse's usage error
    naming the bad text."""
    try:
        value = float(text)
        check_positive("", value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text!r}") from None
    return value


def output_file(text: str) -> Path:
    """An argparse `type=`: a file path the results can be written to (not a directory, no file among its folders),
    checked before the work rather than after it."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file path, e.g. {path / 'results.json'}")
    folder = next(folder for folder in path.absolute().parents if folder.exists())
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {folder} is a file, not a folder")
    return path
