"""The run-config schema's building blocks: a typed, checked `Setting`, the `Schema` that
resolves raw values against a list of them, the resolved `RunConfig`, and `LayerSettings`,
the base of each layer's typed settings read from it.

This module imports nothing of the project's: every layer declares its own settings with
it, and the app layer (`fl_app.app.config`) collects them into the app's one `Schema`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Self

Scalar = bool | int | float | str
ConfigCheck = Callable[[Mapping[str, Scalar]], None]
"""A cross-key rule: takes every key's value, raises ConfigError naming the keys at fault."""


KEYS_LISTED_AT = "pyproject.toml [tool.flwr.app.config] and docs/config.md list every key"


class ConfigError(ValueError):
    """A run-config value is unknown, mistyped or out of range (raised before training)."""


def did_you_mean(word: str, candidates: Iterable[str], n: int = 1) -> str:
    """`"; did you mean 'x'?"` naming the closest of `candidates` to a misspelt `word` (at
    most `n` of them, by difflib's similarity >= 0.6), or "" when none is that close."""
    close = difflib.get_close_matches(word, [str(c) for c in candidates], n=n)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


@dataclass(frozen=True)
class Setting:
    """One run-config key: its type, default, allowed values or range, and help text.

    `choices` may be a sequence or a zero-argument callable (for registries filled at
    import time). `low`/`high` bound numbers; `low_open`/`high_open` make a bound strict.
    `check` is an extra predicate for values that no range describes (e.g. model names
    that may also be a `.keras` path); `check_hint` explains what it accepts.
    """

    key: str
    type: type[Scalar]
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
            hint = did_you_mean(str(value), allowed) if allowed and isinstance(value, str) else ""
            raise ConfigError(
                f"run-config key '{self.key}' has invalid value {value!r}; "
                f"allowed: {self.describe_range()}{hint}"
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


class Schema:
    """Every key of an app (each declared once) and its rules across keys.

    `resolve(raw)` checks raw values (from `context.run_config` or `--run-config`) and
    returns a `RunConfig`, which remembers this schema so that `RunConfig.replace`
    re-validates the same way.
    """

    def __init__(self, settings: Iterable[Setting], checks: Iterable[ConfigCheck] = ()) -> None:
        self.settings: dict[str, Setting] = {}
        for setting in settings:
            if setting.key in self.settings:
                raise RuntimeError(f"run-config key '{setting.key}' is declared twice")
            self.settings[setting.key] = setting
        self.checks = list(checks)

    def defaults(self) -> dict[str, Scalar]:
        """The default value of every key (what `[tool.flwr.app.config]` must hold)."""
        return {key: s.default for key, s in self.settings.items()}

    def resolve(self, raw: Mapping[str, object]) -> RunConfig:
        """Validate `raw` against the schema and fill in defaults.

        Raises ConfigError naming the key at fault for an unknown key, a wrong type, an
        out-of-range value or a broken rule across keys, before any training starts.
        """
        unknown = sorted(set(raw) - set(self.settings))
        if unknown:
            named = "; ".join(f"unknown run-config key {key!r}"
                              f"{did_you_mean(key, self.settings)}" for key in unknown)
            raise ConfigError(f"{named} ({KEYS_LISTED_AT})")
        values = {key: s.coerce(raw[key]) if key in raw else s.default
                  for key, s in self.settings.items()}
        for check in self.checks:
            check(values)
        return RunConfig(values, self)


class RunConfig(Mapping[str, Scalar]):
    """A resolved, validated run config; read it like Flower's `context.run_config`."""

    def __init__(self, values: Mapping[str, Scalar], schema: Schema) -> None:
        self._values = dict(values)
        self.schema = schema

    def __getitem__(self, key: str) -> Scalar:
        try:
            return self._values[key]
        except KeyError:
            raise KeyError(f"unknown run-config key '{key}'") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunConfig) and self._values == other._values

    def replace(self, **changes: Scalar) -> RunConfig:
        """Return a copy with some keys changed (python-style names: out_dir -> out-dir)."""
        raw = dict(self._values)
        raw.update({k.replace("_", "-"): v for k, v in changes.items()})
        return self.schema.resolve(raw)


@dataclass(frozen=True)
class LayerSettings:
    """The base of a layer's typed settings: a frozen dataclass whose field `dirichlet_alpha`
    holds run-config key `dirichlet-alpha`. The app layer builds each once from the resolved
    run config (`from_config`); the layer's code takes it, never the whole config, and it
    is hashable, so a cache keyed by it survives changes to other layers' keys."""

    @classmethod
    def from_config(cls, values: Mapping[str, object]) -> Self:
        """The settings read from a resolved run config (every field's key must be there)."""
        return cls(**{f.name: values[f.name.replace("_", "-")] for f in fields(cls)})


def module_checks(modules: Sequence[object]) -> ConfigCheck:
    """One rule that runs the `check_config(values)` of each module defining one (modules
    that contribute `SETTINGS` may contribute cross-key rules this way), looked up on
    every call."""

    def check(values: Mapping[str, Scalar]) -> None:
        for module in modules:
            if hasattr(module, "check_config"):
                module.check_config(values)

    return check
