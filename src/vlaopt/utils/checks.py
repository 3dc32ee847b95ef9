"""Config validation shared by every dataclass config: one clear error naming the field and value."""

from __future__ import annotations

from typing import Any


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {', '.join(choices)}")


def check_positive(config: Any, prefix: str, *fields: str) -> None:
    """Raise unless each named integer field of `config` is a positive integer (not a bool)."""
    for field in fields:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{prefix}{field}={value!r} must be a positive integer")
