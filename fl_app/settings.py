"""The building block of the run-config schema: one typed, checked setting."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Union

Scalar = Union[bool, int, float, str]
ConfigCheck = Callable[[Mapping[str, Scalar]], None]
"""A cross-key rule: takes every key's value, raises ConfigError naming the keys at fault."""


class ConfigError(ValueError):
    """A run-config value is unknown, mistyped or out of range (raised before training)."""


def module_checks(modules: Iterable[ModuleType]) -> list[ConfigCheck]:
    """The `check_config(values)` of each module that defines one (modules that contribute
    `SETTINGS` may also contribute cross-key rules this way)."""
    return [module.check_config for module in modules if hasattr(module, "check_config")]


@dataclass(frozen=True)
class Setting:
    """One run-config key: its type, default, allowed values or range, and help text.

    `choices` may be a sequence or a zero-argument callable (for registries filled at
    import time). `low`/`high` bound numbers; `low_open`/`high_open` make a bound strict.
    `check` is an extra predicate for values that no range describes (e.g. model names
    that may also be a `.keras` path); `check_hint` explains what it accepts.
    """

    key: str
    type: type
    default: Scalar
    help: str
    group: str = "general"
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    check: Callable[[Scalar], bool] | None = field(default=None, compare=False)
    check_hint: str = ""

    def allowed(self) -> list[str] | None:
        """Return the allowed values, or None when any value of the type is allowed."""
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    def describe_range(self) -> str:
        """Human-readable description of what values this key accepts."""
        allowed = self.allowed()
        parts = []
        if allowed is not None:
            parts.append("one of " + ", ".join(repr(a) for a in allowed))
        if self.check_hint:
            parts.append(self.check_hint)
        if self.low is not None or self.high is not None:
            lo = "" if self.low is None else f"{self.low} {'<' if self.low_open else '<='} "
            hi = "" if self.high is None else f" {'<' if self.high_open else '<='} {self.high}"
            parts.append(f"{lo}value{hi}")
        return " or ".join(parts) if parts else f"any {self.type.__name__}"

    def coerce(self, value: object) -> Scalar:
        """Return `value` as this setting's type, or raise ConfigError naming the key."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise ConfigError(
                f"run-config key '{self.key}' must be of type {self.type.__name__}, "
                f"got {value!r} ({type(value).__name__}); allowed: {self.describe_range()}"
            )
        self._check_value(value)
        return value

    def _check_value(self, value: Scalar) -> None:
        allowed = self.allowed()
        in_choices = allowed is not None and value in allowed
        passes_check = self.check is not None and self.check(value)
        if (allowed is not None or self.check is not None) and not (in_choices or passes_check):
            raise ConfigError(
                f"run-config key '{self.key}' has invalid value {value!r}; "
                f"allowed: {self.describe_range()}"
            )
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            too_low = self.low is not None and (
                value <= self.low if self.low_open else value < self.low
            )
            too_high = self.high is not None and (
                value >= self.high if self.high_open else value > self.high
            )
            if too_low or too_high or value != value:  # value != value catches NaN
                raise ConfigError(
                    f"run-config key '{self.key}' is out of range: {value!r}; "
                    f"allowed: {self.describe_range()}"
                )
