"""Argument validation shared by the lightning-eos callbacks.

Every callback checks its ``__init__`` arguments here, so that a bad value fails at construction
(before a Trainer exists) with one message format naming the callback, the argument, the value and
the accepted values::

    SharpnessMonitor: every_n_steps=0 is not supported; accepted values: a positive int.

Types are compared strictly: ``True`` is not an int, ``1`` is not a bool (a YAML ``1`` given to a
flag is a mistake, not a ``True``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["ArgCheck"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ArgCheck:
    """Validators for the arguments of the callback named ``owner``; each raises ``ValueError``."""

    def __init__(self, owner: str) -> None:
        self.owner = owner

    def fail(self, name: str, value: Any, accepted: str) -> ValueError:
        """The error for argument ``name``: say what was given and what is accepted."""
        return ValueError(f"{self.owner}: {name}={value!r} is not supported; accepted values: {accepted}.")

    def choice(self, name: str, value: Any, accepted: Sequence[Any]) -> None:
        """``value`` is one of ``accepted`` (same type and value)."""
        if not any(type(value) is type(a) and value == a for a in accepted):
            raise self.fail(name, value, ", ".join(map(repr, accepted)))

    def flag(self, name: str, value: Any) -> None:
        """``value`` is a bool."""
        self.choice(name, value, (True, False))

    def integer(self, name: str, value: Any) -> None:
        """``value`` is an int (not a bool)."""
        if not _is_int(value):
            raise self.fail(name, value, "an int")

    def int_at_least(
        self, name: str, value: Any, minimum: int, *, allow_none: bool = False, accepted: str | None = None
    ) -> None:
        """``value`` is an int ``>= minimum`` (or None if ``allow_none``)."""
        if value is None and allow_none:
            return
        if not _is_int(value) or value < minimum:
            text = accepted or ("a positive int" if minimum == 1 else f"an int >= {minimum}")
            raise self.fail(name, value, text + (" or None" if allow_none else ""))

    def positive_int(self, name: str, value: Any, *, allow_none: bool = False) -> None:
        """``value`` is an int ``>= 1`` (or None if ``allow_none``)."""
        self.int_at_least(name, value, 1, allow_none=allow_none)

    def positive_float(self, name: str, value: Any) -> None:
        """``value`` is a finite real number ``> 0``."""
        if not _is_real(value) or not (value > 0 and math.isfinite(value)):
            raise self.fail(name, value, "a finite float > 0")

    def unit_fraction(self, name: str, value: Any) -> None:
        """``value`` is a real number in ``(0, 1]``."""
        if not _is_real(value) or not 0.0 < value <= 1.0:
            raise self.fail(name, value, "a float in (0, 1]")

    def open_unit_interval(self, name: str, value: Any) -> None:
        """``value`` is a real number in ``(0, 1)``."""
        if not _is_real(value) or not 0.0 < value < 1.0:
            raise self.fail(name, value, "a float in (0, 1)")

    def log_prefix(self, name: str, value: Any) -> None:
        """``value`` is a non-empty str not ending in ``/`` (a TensorBoard tag prefix)."""
        if not isinstance(value, str) or not value or value.endswith("/"):
            raise self.fail(name, value, "a non-empty str not ending in '/'")

    def names(self, name: str, value: Any, what: str) -> None:
        """``value`` is None or a non-empty list of non-empty strings (``what`` they name)."""
        if value is None:
            return
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            raise self.fail(name, value, f"None or a non-empty list of {what}")
        if not all(isinstance(v, str) and v for v in value):
            raise self.fail(name, value, f"None or a non-empty list of {what}")

    def optional_callable(self, name: str, value: Any, signature: str) -> None:
        """``value`` is None or a callable (``signature`` describes it)."""
        if value is not None and not callable(value):
            raise self.fail(name, value, f"None or a callable {signature}")

    def callable_or_import_path(self, name: str, value: Any, signature: str) -> Callable[..., Any] | None:
        """Resolve a callable given directly or by dotted import path (what a YAML config holds)."""
        if value is None or callable(value):
            return value
        if isinstance(value, str) and "." in value:
            module_name, _, attr = value.rpartition(".")
            try:
                return getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"{self.owner}: {name}={value!r}: cannot import it ({err}).") from err
        raise self.fail(name, value, f"None, a callable {signature}, or its dotted import path")
